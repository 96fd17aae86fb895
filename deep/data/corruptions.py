"""Image corruptions after the CIFAR-10-C recipe, adapted to 28x28 grayscale.

Hendrycks & Dietterich (ICLR 2019) built CIFAR-10-C by applying 19 corruption
functions at five severities to the CIFAR-10 test set. This module re-implements
15 of them for grayscale images (numpy / scipy / PIL only; no OpenCV, scikit-image
or ImageMagick):

    noise    gaussian_noise, shot_noise, impulse_noise, speckle_noise
    blur     gaussian_blur, defocus_blur, glass_blur, motion_blur, zoom_blur
    weather  fog, brightness
    digital  contrast, elastic_transform, pixelate, jpeg_compression

Left out: frost (needs the original frost photographs), snow and spatter (built
from OpenCV edge/distance operations), saturate (colour only).

Parameters are the CIFAR-10 ones (`PARAMS`, severities 1..5). Pixel-scale
parameters (noise levels, brightness, contrast, JPEG quality, pixelate factor)
are kept; spatial ones in pixels (blur sigmas and radii, glass-blur sigma, the
motion-blur line) are multiplied by 28/32 so that a blur covers the same
fraction of the object; elastic_transform's parameters are fractions of the
image size in the recipe, so they scale by themselves; zoom factors are ratios
and are kept. Differences from the recipe, all deliberate:

- defocus_blur: the disk kernel is anti-aliased by its exact pixel coverage
  (supersampled) instead of thresholding a disk on the integer grid, so the
  scaled radius 1.3125 gives a blur between a plus and a 3x3 box rather than
  jumping to the plus shape; the recipe's small Gaussian alias blur is kept, unscaled
  (it smooths the kernel's own edge, and the supersampled coverage does most of that).
- motion_blur: ImageMagick's kernel (one-sided line of taps with Gaussian
  weights exp(-i^2 / 2 sigma^2), i = 0 .. 2 ceil(radius), offsets rounded to whole
  pixels, edge pixels repeated) re-implemented in numpy.
- glass_blur does what the recipe's code did on RGB images rather than what it
  says: the in-place "swap" of pixel views copies, so each pixel takes the value
  of a random neighbour at offset {-1, 0}^2 (numpy's randint(-1, 1) excludes 1).
- Images are floats in [0, 1] on both sides; the caller quantises (the
  Fashion-MNIST benchmark rounds to uint8, as CIFAR-10-C stores uint8).

Every function takes `x` (float (n, H, W) or (H, W) in [0, 1]), `severity` (1..5)
and `rng` (a `numpy.random.Generator`; required by the random corruptions, ignored
by the deterministic ones), and returns float32 of the same shape in [0, 1].
The same generator state gives the same output. Work is vectorised over the batch
except where PIL needs one image at a time (pixelate, jpeg_compression).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import check_int

SPATIAL_SCALE = 28 / 32
"""Fashion-MNIST side over CIFAR side: multiplies the recipe's pixel-unit spatial parameters."""

# CIFAR-10-C severity 1..5 values (Hendrycks' make_cifar_c.py); spatial ones scaled below.
PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],           # noise std
    "shot_noise": [500, 250, 100, 75, 50],                      # photons per unit intensity
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],            # fraction of pixels replaced
    "speckle_noise": [0.06, 0.10, 0.12, 0.16, 0.20],            # multiplicative noise std
    "gaussian_blur": [s * SPATIAL_SCALE for s in (0.4, 0.6, 0.7, 0.8, 1.0)],  # sigma, px
    "defocus_blur": [(r * SPATIAL_SCALE, a) for r, a in            # (disk radius px, alias sigma px)
                     ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))],
    "glass_blur": [(s * SPATIAL_SCALE, d, k) for s, d, k in        # (sigma px, max shift px, iterations)
                   ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))],
    "motion_blur": [(r * SPATIAL_SCALE, s * SPATIAL_SCALE) for r, s in  # (radius px, sigma px)
                    ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))],
    "zoom_blur": [1.06, 1.11, 1.16, 1.21, 1.26],                # zooms 1.00, 1.01, .. below this
    "fog": [(0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)],  # (strength, decay)
    "brightness": [0.05, 0.10, 0.15, 0.20, 0.30],               # added to intensity
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],                    # factor on (x - mean)
    "elastic_transform": [(0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),  # (alpha, sigma,
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],  # affine shift) x image side
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],                  # downsampling factor
    "jpeg_compression": [80, 65, 58, 50, 40],                   # JPEG quality
}

MIN_SIDE = 8


# ----------------------------------------------------------------------------- checks

def _as_batch(x: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """Validate images and return them as float64 (n, H, W), plus whether a batch axis was added."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: images must be a numpy array, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: images must be floating point in [0, 1], got dtype {x.dtype}"
                         + (" (divide uint8 images by 255 first)" if x.dtype == np.uint8 else ""))
    if x.ndim not in (2, 3):
        raise ValueError(f"{name}: images must have shape (H, W) or (n, H, W), got {x.shape}")
    single = x.ndim == 2
    batch = x[None] if single else x
    if min(batch.shape[1:]) < MIN_SIDE:
        raise ValueError(f"{name}: images must be at least {MIN_SIDE}x{MIN_SIDE}, got {batch.shape[1:]}")
    if batch.size and not np.isfinite(batch).all():
        raise ValueError(f"{name}: images contain NaN or infinite values")
    if batch.size and (batch.min() < -1e-6 or batch.max() > 1 + 1e-6):
        raise ValueError(f"{name}: images must lie in [0, 1], got values in "
                         f"[{batch.min():.3g}, {batch.max():.3g}]")
    return np.clip(batch.astype(np.float64), 0.0, 1.0), single


def _param(name: str, severity: int):
    return PARAMS[name][check_int(f"{name}: severity", severity, error=ValueError, maximum=5) - 1]


def _need_rng(name: str, rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{name}: rng must be a numpy Generator (np.random.default_rng(seed)), "
                         f"got {type(rng).__name__}")
    return rng


def _finish(out: np.ndarray, single: bool) -> np.ndarray:
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return out[0] if single else out


def _blur(x: np.ndarray, sigma: float, mode: str = "nearest") -> np.ndarray:
    """Gaussian filter over the two spatial axes of (n, H, W); skimage's defaults (truncate 4)."""
    return ndimage.gaussian_filter(x, sigma=(0.0, sigma, sigma), mode=mode, truncate=4.0)


# ----------------------------------------------------------------------------- noise

def gaussian_noise(x, severity=5, rng=None):
    """x + N(0, sigma^2) per pixel, clipped; sigma 0.10 at severity 5."""
    x, single = _as_batch(x, "gaussian_noise")
    sigma = _param("gaussian_noise", severity)
    rng = _need_rng("gaussian_noise", rng)
    return _finish(x + rng.normal(0.0, sigma, size=x.shape), single)


def shot_noise(x, severity=5, rng=None):
    """Poisson(c x) / c, clipped: photon noise with c = 50 photons per unit at severity 5."""
    x, single = _as_batch(x, "shot_noise")
    c = _param("shot_noise", severity)
    rng = _need_rng("shot_noise", rng)
    return _finish(rng.poisson(x * c) / c, single)


def impulse_noise(x, severity=5, rng=None):
    """Salt and pepper: a fraction `amount` of pixels set to 0 or 1 with equal odds."""
    x, single = _as_batch(x, "impulse_noise")
    amount = _param("impulse_noise", severity)
    rng = _need_rng("impulse_noise", rng)
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out = np.where(hit, salt.astype(np.float64), x)
    return _finish(out, single)


def speckle_noise(x, severity=5, rng=None):
    """x + x N(0, sigma^2), clipped: multiplicative noise, sigma 0.20 at severity 5."""
    x, single = _as_batch(x, "speckle_noise")
    sigma = _param("speckle_noise", severity)
    rng = _need_rng("speckle_noise", rng)
    return _finish(x + x * rng.normal(0.0, sigma, size=x.shape), single)


# ----------------------------------------------------------------------------- blur

def gaussian_blur(x, severity=5, rng=None):
    """Gaussian filter, sigma 1.0 * 28/32 px at severity 5, edges repeated."""
    x, single = _as_batch(x, "gaussian_blur")
    return _finish(_blur(x, _param("gaussian_blur", severity)), single)


def disk_kernel(radius: float, alias_sigma: float, supersample: int = 16) -> np.ndarray:
    """Normalised disk kernel: each weight is the fraction of that pixel covered by the disk.

    The recipe thresholds x^2 + y^2 <= r^2 on the integer grid and then applies a
    3x3 Gaussian of `alias_sigma`; exact coverage keeps sub-pixel radii meaningful.
    """
    half = int(np.ceil(radius + 0.5))
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5       # sub-pixel offsets
    centres = np.arange(-half, half + 1)
    pos = (centres[:, None] + sub[None, :]).ravel()                 # (side * supersample,)
    inside = (pos[:, None] ** 2 + pos[None, :] ** 2) <= radius ** 2
    side = len(centres)
    cover = inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
    cover = ndimage.gaussian_filter(cover, alias_sigma, mode="constant", radius=1)  # cv2 3x3
    return cover / cover.sum()


def defocus_blur(x, severity=5, rng=None):
    """Convolution with an anti-aliased disk of radius 1.5 * 28/32 px (severity 5)."""
    x, single = _as_batch(x, "defocus_blur")
    radius, alias = _param("defocus_blur", severity)
    kernel = disk_kernel(radius, alias)
    # cv2.filter2D's default border reflects without repeating the edge: scipy's "mirror".
    return _finish(ndimage.convolve(x, kernel[None], mode="mirror"), single)


def glass_blur(x, severity=5, rng=None):
    """Blur, replace pixels by random up/left neighbours, blur again.

    What CIFAR-10-C actually did: the recipe "swaps" x[h, w] with a neighbour at
    offset (dy, dx) in {-1, 0}^2 in place, sweeping from the bottom-right. On RGB
    arrays the tuple swap assigns through pixel views, so the second assignment
    writes the neighbour back onto itself: each pixel takes its neighbour's value,
    and the neighbour (visited later in the sweep) still holds its original value.
    A pass is therefore one gather, done here for the whole batch. The middle image
    is truncated to 8 bits as in the recipe. Severity 5: sigma 0.4 * 28/32 px, two passes.
    """
    x, single = _as_batch(x, "glass_blur")
    sigma, delta, passes = _param("glass_blur", severity)
    rng = _need_rng("glass_blur", rng)
    n, h, w = x.shape
    y = np.floor(_blur(x, sigma) * 255.0) / 255.0
    # The sweep covers rows and columns delta + 1 .. side - delta (range(side - delta, delta, -1)).
    rows = np.arange(delta + 1, h - delta + 1)[None, :, None]
    cols = np.arange(delta + 1, w - delta + 1)[None, None, :]
    images = np.arange(n)[:, None, None]
    for _ in range(passes):
        # numpy's randint(-delta, delta) excludes delta: offsets in {-delta, .., delta - 1}.
        dr = rng.integers(-delta, delta, size=(n, rows.size, cols.size))
        dc = rng.integers(-delta, delta, size=(n, rows.size, cols.size))
        moved = y.copy()
        moved[:, delta + 1:h - delta + 1, delta + 1:w - delta + 1] = y[images, rows + dr, cols + dc]
        y = moved
    return _finish(_blur(y, sigma), single)


def motion_blur(x, severity=5, rng=None):
    """Line blur in a random direction (uniform in [-45, 45] degrees), ImageMagick-style.

    Taps i = 0 .. 2 ceil(radius) at whole-pixel offsets round(i (cos a, sin a)) from
    the pixel, weights exp(-i^2 / 2 sigma^2), normalised; pixels outside repeat the
    edge. Severity 5: radius 9 * 28/32, sigma 2.5 * 28/32 px.
    """
    x, single = _as_batch(x, "motion_blur")
    radius, sigma = _param("motion_blur", severity)
    rng = _need_rng("motion_blur", rng)
    n, h, w = x.shape
    angle = np.deg2rad(rng.uniform(-45.0, 45.0, size=n))
    taps = np.arange(2 * int(np.ceil(radius)) + 1)
    weights = np.exp(-taps ** 2 / (2.0 * sigma ** 2))
    weights /= weights.sum()
    # ImageMagick rounds with ceil(v - 0.5); x offset follows cos, y offset follows sin.
    dc = np.ceil(taps[:, None] * np.cos(angle)[None, :] - 0.5).astype(int)   # (taps, n)
    dr = np.ceil(taps[:, None] * np.sin(angle)[None, :] - 0.5).astype(int)
    images = np.arange(n)[:, None, None]
    rr = np.arange(h)[None, :, None]
    cc = np.arange(w)[None, None, :]
    out = np.zeros_like(x)
    for t, weight in enumerate(weights):
        r = np.clip(rr + dr[t][:, None, None], 0, h - 1)
        c = np.clip(cc + dc[t][:, None, None], 0, w - 1)
        out += weight * x[images, r, c]
    return _finish(out, single)


def _linear_zoom_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation with end points aligned, as scipy.ndimage.zoom(order=1)."""
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom (n, H, W) images about their centre by `factor` >= 1, keeping the size (bilinear).

    Crops the central ceil(side / factor) pixels, enlarges them by `factor` and trims
    the result back to the centre; the enlargement is separable, so two small matrices
    do it for the whole batch.
    """
    h, w = x.shape[1:]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    zh, zw = round(ch * factor), round(cw * factor)
    t, l = (zh - h) // 2, (zw - w) // 2
    rows = _linear_zoom_matrix(ch, zh)[t:t + h]
    cols = _linear_zoom_matrix(cw, zw)[l:l + w]
    return rows @ x[:, top:top + ch, left:left + cw] @ cols.T


def zoom_blur(x, severity=5, rng=None):
    """Average of the image and its centre zooms by 1.00, 1.01, .., 1.25 (severity 5)."""
    x, single = _as_batch(x, "zoom_blur")
    top = _param("zoom_blur", severity)
    factors = np.arange(1.0, top, 0.01)
    total = x.copy()
    for factor in factors:
        total += _clipped_zoom(x, factor)
    return _finish(total / (len(factors) + 1), single)


# ----------------------------------------------------------------------------- weather

def plasma_fractal(n: int, rng: np.random.Generator, size: int = 32, decay: float = 3.0) -> np.ndarray:
    """Diamond-square height maps, float64 (n, size, size) scaled to [0, 1] each.

    `size` must be a power of two. `decay` divides the random amplitude at every
    halving of the step: larger decay, smoother map.
    """
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma_fractal: size must be a power of two >= 2, got {size}")
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def jitter(values):
        return values / 4 + wibble * rng.uniform(-wibble, wibble, values.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        m[:, half::step, half::step] = jitter(square)
        centres = m[:, half::step, half::step]
        corners = m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = jitter(centres + np.roll(centres, 1, axis=1)
                                           + corners + np.roll(corners, -1, axis=2))
        m[:, half::step, 0::step] = jitter(centres + np.roll(centres, 1, axis=2)
                                           + corners + np.roll(corners, -1, axis=1))
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)


def fog(x, severity=5, rng=None):
    """Add a plasma-fractal haze of strength 1.5, then rescale to keep each image's maximum."""
    x, single = _as_batch(x, "fog")
    strength, decay = _param("fog", severity)
    rng = _need_rng("fog", rng)
    n, h, w = x.shape
    size = 1 << max(5, int(np.ceil(np.log2(max(h, w)))))   # 32 for 28x28, as for CIFAR
    haze = plasma_fractal(n, rng, size, decay)[:, :h, :w]
    peak = x.max(axis=(1, 2), keepdims=True)
    return _finish((x + strength * haze) * peak / (peak + strength), single)


def brightness(x, severity=5, rng=None):
    """Add 0.3 to the intensity (the HSV value of a gray pixel is its intensity)."""
    x, single = _as_batch(x, "brightness")
    return _finish(x + _param("brightness", severity), single)


# ----------------------------------------------------------------------------- digital

def contrast(x, severity=5, rng=None):
    """(x - mean) * c + mean with each image's mean, c = 0.15 at severity 5."""
    x, single = _as_batch(x, "contrast")
    c = _param("contrast", severity)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _finish((x - mean) * c + mean, single)


def elastic_transform(x, severity=5, rng=None):
    """Random affine warp, then a smooth random displacement field (bilinear, reflected edges).

    With side L (28): the three corners of a centred triangle move by up to 0.03 L px;
    the displacement is alpha = 0.1 L times uniform(-1, 1) noise smoothed by a
    Gaussian of sigma 0.03 L px (severity 5).
    """
    x, single = _as_batch(x, "elastic_transform")
    alpha, sigma, shift = (v * min(x.shape[1:]) for v in _param("elastic_transform", severity))
    rng = _need_rng("elastic_transform", rng)
    n, h, w = x.shape
    # Random affine: three reference points (row, col) and their jittered images.
    centre = np.array([h // 2, w // 2], dtype=np.float64)
    arm = min(h, w) // 3
    src = np.stack([centre + arm, centre + [arm, -arm], centre - arm])           # (3, 2)
    dst = src[None] + rng.uniform(-shift, shift, size=(n, 3, 2))                 # (n, 3, 2)
    # The map output -> input sends dst to src: solve [dst 1] A = src for A (3, 2).
    ones = np.ones((n, 3, 1))
    inverse = np.linalg.solve(np.concatenate([dst, ones], axis=2), np.broadcast_to(src, (n, 3, 2)))
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    grid = np.stack([rr, cc, np.ones_like(rr)], axis=-1)                         # (h, w, 3)
    where = np.einsum("hwk,nkd->nhwd", grid, inverse)                            # (n, h, w, 2)
    images = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], (n, h, w))
    # cv2.warpAffine's default border (reflect without repeating the edge) is scipy's "mirror".
    warped = ndimage.map_coordinates(x, [images, where[..., 0], where[..., 1]], order=1, mode="mirror")
    # Smooth displacement field, one per image, in pixels.
    field = rng.uniform(-1.0, 1.0, size=(2, n, h, w))
    field = ndimage.gaussian_filter(field, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=3.0) * alpha
    out = ndimage.map_coordinates(warped, [images, rr + field[0], cc + field[1]], order=1, mode="reflect")
    return _finish(out, single)


def _pil_each(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(img)), dtype=np.float64) for img in x]) \
        if len(x) else x.copy()


def pixelate(x, severity=5, rng=None):
    """Box-downsample to int(0.65 side) and box-upsample back (PIL, float precision)."""
    x, single = _as_batch(x, "pixelate")
    factor = _param("pixelate", severity)
    h, w = x.shape[1:]
    small = (int(w * factor), int(h * factor))
    out = _pil_each(x.astype(np.float32),
                    lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))
    return _finish(out, single)


def jpeg_compression(x, severity=5, rng=None):
    """8-bit JPEG round trip at quality 40 (severity 5); the output is on the 8-bit grid."""
    x, single = _as_batch(x, "jpeg_compression")
    quality = _param("jpeg_compression", severity)

    def round_trip(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("L").copy()

    pixels = np.rint(x * 255.0).astype(np.uint8)
    return _finish(_pil_each(pixels, round_trip) / 255.0, single)


# ----------------------------------------------------------------------------- registry

CORRUPTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
"""Name -> corruption, in the order of the CIFAR-10-C paper's families."""

RANDOM = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
                    "glass_blur", "motion_blur", "fog", "elastic_transform"})
"""Corruptions that draw from `rng`; the others are deterministic functions of the image."""


def corrupt(x: np.ndarray, name: str, severity: int = 5,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply the corruption `name` at `severity` (1..5); see the module docstring."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](x, severity=severity, rng=rng)
