"""MEMO's AugMix-style test-time augmentations, written on image tensors.

MEMO (Zhang et al. 2022; public code `zhangmarvin/memo`, CIFAR experiments) makes B
augmented copies of one test image, each one an AugMix mixture:

    x0 = random crop (zero padding 4) + random horizontal flip of the image
    chain_i = 1..3 operations drawn uniformly from OPERATIONS, applied to x0   (i = 1..3)
    copy = m * x0 + (1 - m) * sum_i w_i chain_i,   w ~ Dirichlet(1, 1, 1),  m ~ Beta(1, 1)

Each operation draws its strength as level ~ U(0.1, severity) on AugMix's 0..10
scale (MEMO uses severity 1, so its operations are mild: rotations of 0-2 degrees,
shears up to 0.03, a solarize threshold above 230/255) and, for signed operations,
a random sign. Geometric operations fill uncovered pixels with grey (128/255), as
MEMO's PIL calls do.

Differences from MEMO's PIL code, all deliberate:
- Works on float tensors (C, H, W) of any channel count (grayscale Fashion-MNIST,
  RGB CIFAR), so no PIL round trip per copy; the histogram operations (autocontrast,
  equalize, posterize, solarize) quantise to 256 levels per channel as PIL does,
  the geometric ones interpolate bilinearly in floats (PIL rounds to uint8 after each).
- Translations scale with the image side (side / 3 on the 0..10 scale, as MEMO's
  32 / 3 for CIFAR); at severity 1 on 28-px images that rounds to 0 pixels, exactly
  as MEMO's integer rounding does for levels below 0.94 on 32-px images.
- Randomness comes from a `torch.Generator`, so a seed gives the same copies.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError

GREY = 128 / 255          # MEMO's fillcolor=128 for rotate / shear / translate
LEVELS = 255              # 8-bit images: the histogram operations work on 256 levels


# --- random draws ------------------------------------------------------------------

def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _sign(generator: torch.Generator) -> float:
    return -1.0 if _uniform(generator) > 0.5 else 1.0


def _level(generator: torch.Generator, severity: float) -> float:
    """AugMix's strength draw: U(0.1, severity) on the 0..10 scale, as a fraction of 10."""
    return _uniform(generator, 0.1, severity) / 10.0


def _dirichlet_ones(k: int, generator: torch.Generator) -> torch.Tensor:
    """Dirichlet(1, ..., 1): normalised Exp(1) draws (Gamma(1) is Exp(1))."""
    e = -torch.log1p(-torch.rand(k, generator=generator, dtype=torch.float64))
    return (e / e.sum()).float()


# --- operations on one image (C, H, W) in [0, 1] -----------------------------------

def _quantised(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * LEVELS).to(torch.int64)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's 8-bit [min, max] to [0, 255] with PIL's lookup table,
    int(level * scale + offset) with scale = 255 / (max - min), offset = -min * scale
    (in float64, as PIL's Python floats, so the truncation matches level for level);
    a flat channel is left alone."""
    q = _quantised(x).double()
    lo = q.amin(dim=(1, 2), keepdim=True)
    hi = q.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    # tensor / tensor: a number / tensor is computed through the reciprocal, one ulp off
    scale = torch.full_like(span, LEVELS) / span.clamp(min=1)
    stretched = torch.trunc(q * scale + (-lo * scale)).clamp(0, LEVELS)
    return (torch.where(span > 0, stretched, q) / LEVELS).float()


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel, with PIL's lookup table: step = (pixels -
    count of the top occupied level) // 255, lut[i] = (step // 2 + pixels below i) // step."""
    q = _quantised(x)
    out = torch.empty(x.shape, dtype=torch.float32)
    for c in range(q.shape[0]):
        hist = torch.bincount(q[c].flatten(), minlength=LEVELS + 1)
        occupied = torch.nonzero(hist).flatten()
        step = int(hist.sum() - hist[occupied[-1]]) // LEVELS
        if len(occupied) <= 1 or step == 0:
            out[c] = q[c].float() / LEVELS
            continue
        below = torch.cumsum(hist, 0) - hist
        lut = ((step // 2 + below) // step).clamp(max=LEVELS)
        out[c] = lut[q[c]].float() / LEVELS
    return out


def posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the top `bits` bits of each 8-bit level."""
    mask = ~((1 << (8 - bits)) - 1) & 0xFF
    return (_quantised(x) & mask).float() / LEVELS


def solarize(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert the levels at or above `threshold` (0..256)."""
    q = _quantised(x)
    return torch.where(q >= threshold, LEVELS - q, q).float() / LEVELS


def affine(x: torch.Tensor, matrix: Sequence[Sequence[float]]) -> torch.Tensor:
    """Sample x at matrix @ (u, v, 1) for every output position (u, v) in normalised
    coordinates [-1, 1] (bilinear); positions outside the image read grey."""
    theta = torch.tensor([matrix], dtype=x.dtype)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    moved = F.grid_sample((x - GREY)[None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    return moved[0] + GREY


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    h, w = x.shape[1:]
    return affine(x, [[math.cos(a), -math.sin(a) * h / w, 0.0],
                      [math.sin(a) * w / h, math.cos(a), 0.0]])


def shear_x(x: torch.Tensor, amount: float) -> torch.Tensor:
    """PIL's (1, s, 0, 0, 1, 0): input column = column + s * row, rows counted from the top."""
    h, w = x.shape[1:]
    return affine(x, [[1.0, amount * h / w, amount * h / w], [0.0, 1.0, 0.0]])


def shear_y(x: torch.Tensor, amount: float) -> torch.Tensor:
    h, w = x.shape[1:]
    return affine(x, [[1.0, 0.0, 0.0], [amount * w / h, 1.0, amount * w / h]])


def translate_x(x: torch.Tensor, pixels: int) -> torch.Tensor:
    return affine(x, [[1.0, 0.0, 2.0 * pixels / x.shape[2]], [0.0, 1.0, 0.0]])


def translate_y(x: torch.Tensor, pixels: int) -> torch.Tensor:
    return affine(x, [[1.0, 0.0, 0.0], [0.0, 1.0, 2.0 * pixels / x.shape[1]]])


# --- the operation list, each with MEMO's strength scaling --------------------------

Operation = Callable[[torch.Tensor, torch.Generator, float], torch.Tensor]


def _op_rotate(x, g, severity):
    return rotate(x, _sign(g) * int(_level(g, severity) * 30))


def _op_solarize(x, g, severity):
    return solarize(x, 256 - int(_level(g, severity) * 256))


def _op_shear_x(x, g, severity):
    return shear_x(x, _sign(g) * _level(g, severity) * 0.3)


def _op_shear_y(x, g, severity):
    return shear_y(x, _sign(g) * _level(g, severity) * 0.3)


def _op_translate_x(x, g, severity):
    return translate_x(x, int(_sign(g) * int(_level(g, severity) * x.shape[2] / 3)))


def _op_translate_y(x, g, severity):
    return translate_y(x, int(_sign(g) * int(_level(g, severity) * x.shape[1] / 3)))


def _op_posterize(x, g, severity):
    return posterize(x, 4 - int(_level(g, severity) * 4))


OPERATIONS: dict[str, Operation] = {
    "autocontrast": lambda x, g, s: autocontrast(x),
    "equalize": lambda x, g, s: equalize(x),
    "rotate": _op_rotate,
    "solarize": _op_solarize,
    "shear_x": _op_shear_x,
    "shear_y": _op_shear_y,
    "translate_x": _op_translate_x,
    "translate_y": _op_translate_y,
    "posterize": _op_posterize,
}


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4,
              flip: bool = True) -> torch.Tensor:
    """Random crop of the image padded with `padding` black pixels, then a random
    horizontal flip (MEMO's RandomCrop(32, padding=4) + RandomHorizontalFlip)."""
    h, w = x.shape[1:]
    if padding:
        padded = F.pad(x, (padding,) * 4)
        top = int(torch.randint(0, 2 * padding + 1, (), generator=generator))
        left = int(torch.randint(0, 2 * padding + 1, (), generator=generator))
        x = padded[:, top:top + h, left:left + w]
    if flip and _uniform(generator) < 0.5:
        x = x.flip(-1)
    return x


class MemoAugmenter:
    """B AugMix copies of a normalised image, returned normalised.

    Args:
        mean, std: the per-channel normalisation the images were loaded with (the
            architecture's own when it declares one: `deep.adapt.runner.
            stream_normalisation`), to go back to pixels in [0, 1] (where the histogram
            operations are defined) and return.
        severity: AugMix strength on the 0..10 scale (MEMO: 1).
        width: chains mixed per copy (MEMO/AugMix: 3); max_depth: operations per chain,
            drawn from 1..max_depth (3).
        padding: of the random crop (MEMO's CIFAR code: 4); flip: random horizontal flip.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], severity: float = 1.0,
                 width: int = 3, max_depth: int = 3, padding: int = 4, flip: bool = True):
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise ConfigError(f"mean and std must be per-channel sequences of equal length with "
                             f"positive std, got mean={mean}, std={std}")
        if not (0.1 < severity <= 10) or width < 1 or max_depth < 1 or padding < 0:
            raise ConfigError(f"expected 0.1 < severity <= 10, width >= 1, max_depth >= 1, "
                             f"padding >= 0; got {severity}, {width}, {max_depth}, {padding}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.severity, self.width, self.max_depth = severity, width, max_depth
        self.padding, self.flip = padding, flip
        self.names = list(OPERATIONS)

    def __call__(self, image: torch.Tensor, copies: int,
                 generator: torch.Generator) -> torch.Tensor:
        """(C, H, W) normalised -> (copies, C, H, W) normalised augmented copies."""
        if image.ndim != 3 or image.shape[0] != len(self.mean):
            raise ConfigError(f"expected one image of shape ({len(self.mean)}, H, W), "
                             f"got {tuple(image.shape)}")
        if copies < 1:
            raise ConfigError(f"copies must be >= 1, got {copies}")
        pixels = (image.float() * self.std + self.mean).clamp(0, 1)
        out = torch.stack([self.augmix(pixels, generator) for _ in range(copies)])
        return (out - self.mean) / self.std

    def augmix(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One AugMix copy of an image in [0, 1] (see the module docstring)."""
        base = crop_flip(pixels, generator, self.padding, self.flip)
        weights = _dirichlet_ones(self.width, generator)
        keep = _uniform(generator)  # Beta(1, 1) is U(0, 1)
        mix = torch.zeros_like(base)
        for w in weights.tolist():
            x = base
            depth = int(torch.randint(1, self.max_depth + 1, (), generator=generator))
            for _ in range(depth):
                name = self.names[int(torch.randint(len(self.names), (), generator=generator))]
                x = OPERATIONS[name](x, generator, self.severity)
            mix += w * x
        return keep * base + (1 - keep) * mix
