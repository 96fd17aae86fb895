"""CLIP's ViT image tower in plain torch, with CLIP's parameter names, plus a linear head.

Written from the published architecture (OpenAI's `clip/model.py`, open_clip): no
torchvision, timm or open_clip import. ViT-B/16:

    conv1 (16x16 patches, stride 16, no bias) -> 196 tokens of width 768
    class token prepended, positional embedding (197 x 768) added, ln_pre
    12 pre-LayerNorm blocks: x + attn(ln_1(x)); x + mlp(ln_2(x))
        attn: 12 heads, packed in_proj_weight/in_proj_bias (q, k, v rows), out_proj
        mlp: c_fc (768 -> 3072), QuickGELU x * sigmoid(1.702 x), c_proj (3072 -> 768)
    ln_post on the class token, @ proj (768 x 512): the CLIP image embedding
    head: L2-normalised embedding -> Linear(512, num_classes)

Keys are CLIP's (`visual.conv1.weight`, `visual.transformer.resblocks.0.attn.in_proj_weight`,
...), so an image tower loads from a CLIP state dict unchanged; the text tower's keys
are ignored (`image_tower_state`). The head sees the L2-normalised embedding, as a
zero-shot classifier does, so a head set from class text embeddings (`set_zero_shot_head`)
reproduces CLIP's zero-shot logits.

The model is a `StagedModel`: the embedding, each block, the projection and the head
are stages, so the prefix cache works for the frozen prefix of the transformer.

Weight files: `python -m deep.clip prepare --help` (deep/clip.py) turns a CLIP state dict
(or, when you trust it, OpenAI's TorchScript `.pt`) into a checkpoint of this toolkit;
`deep.checkpoints.load_model` calls `is_torchscript_archive`, `torchscript_state` and
`image_tower_state` from here.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check_choice
from ..files import CheckpointError
from .registry import Architecture, register_architecture
from .staged import StagedModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOWER = "visual."
HEAD = "head"
# The first name component of the text tower's keys in OpenAI's and open_clip's files
# (with the scalars beside it; OpenAI's TorchScript archives also hold input_resolution,
# context_length, vocab_size), which a CLIP file holds and an image model ignores.
TEXT_TOWER = ("transformer", "token_embedding", "positional_embedding", "ln_final",
              "text_projection", "logit_scale", "logit_bias", "attn_mask", "text",
              "input_resolution", "context_length", "vocab_size")
DEFAULT_LOGIT_SCALE = 100.0  # exp of CLIP's trained logit_scale (clamped at 100)


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a CLIP image tower. `activation`: "quick_gelu" (OpenAI's weights) or
    "gelu" (open_clip's models trained without QuickGELU, e.g. its LAION ViT-B-16)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    output_dim: int = 512
    activation: str = "quick_gelu"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.layers < 3:
            raise ConfigError(f"layers must be >= 3 (first3 and last3 are blocks), got {self.layers}")
        check_choice("activation", self.activation, sorted(ACTIVATIONS))

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}

CONFIGS = {
    "clip-vit-b16": ViTConfig(),
    "clip-vit-b16-gelu": ViTConfig(activation="gelu"),
    # the same network, small enough for CPU tests: 32-px inputs, 8-px patches, 6 blocks
    "clip-vit-tiny": ViTConfig(image_size=32, patch_size=8, width=32, layers=6, heads=2,
                               mlp_width=128, output_dim=16),
}


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (CLIP's keys):
    `in_proj_weight` (3d, d) holds the q, k, v projections stacked, `out_proj` (d -> d)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's initialisation
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, tokens, width) -> (b, tokens, width)."""
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block (CLIP's `ResidualAttentionBlock`)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = Attention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config.width, config.mlp_width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(config)
                                         for _ in range(config.layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP's image tower: (b, C, H, W) -> (b, output_dim), tokens batch-first."""

    def __init__(self, config: ViTConfig, in_channels: int = 3):
        super().__init__()
        self.config = config
        d, scale = config.width, config.width ** -0.5
        self.conv1 = nn.Conv2d(in_channels, d, config.patch_size, stride=config.patch_size,
                               bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(d))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.tokens, d))
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(config)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Parameter(scale * torch.randn(d, config.output_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens (b, 1 + patches, width) after ln_pre."""
        size = self.config.image_size
        if x.ndim != 4 or tuple(x.shape[-2:]) != (size, size):
            raise ConfigError(image_size_error(self.config, tuple(x.shape)))
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (b, patches, width), row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> the image embedding (b, output_dim)."""
        return self.ln_post(tokens[:, 0, :]) @ self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.transformer(self.embed(x)))


def image_size_error(config: ViTConfig, shape: tuple[int, ...]) -> str:
    """Why a ViT refuses input of `shape`, and the ways out that exist. The model cannot
    see the loader, so the crop/resize options are offered only for loaders that have
    them; a ViT of another size is a new entry of CONFIGS (every registered ViT has a
    fixed image size and patch grid)."""
    size, grid = config.image_size, config.image_size // config.patch_size
    expected = f"this ViT takes images of {size}x{size} px, shape (batch, channels, {size}, {size})"
    if len(shape) != 4:
        return (f"{expected}; got a tensor of shape {shape}, not a batch of images "
                f"(batch, channels, height, width)")
    h, w = shape[-2:]
    registered = ", ".join(f"{name} {c.image_size} px" for name, c in CONFIGS.items())
    loader = (f"if the benchmark's loader has crop and resize options (image-folder loaders "
              f"such as waterbirds' do; in-memory ones such as synthetic's and Fashion-MNIST's "
              f"do not, and --data with an option the loader lacks is refused with the list of "
              f"those it has), pass --data crop={size} --data resize={size}")
    if h != w:
        return (f"{expected}; got {h}x{w} px images (shape {shape}), and every ViT here takes "
                f"square images ({registered}). To fix: {loader}")
    return (f"{expected}; got {h}x{w} px images (shape {shape}). To fix: {loader}; otherwise "
            f"use an architecture built for {h}x{w} px: every registered ViT has a fixed image "
            f"size ({registered}), so pick a non-ViT --arch, or add ViTConfig(image_size={h}, "
            f"patch_size=P), P dividing {h}, under a new name to CONFIGS and to _register's "
            f"notes in deep/models/vit.py (a checkpoint of this arch, e.g. CLIP's weights, "
            f"fits only its {grid}x{grid} patch grid)")


class CLIPImageClassifier(StagedModel):
    """`visual` (CLIP's image tower, CLIP's key names) + `head` on the normalised embedding.

    Stages: 0 the embedding (conv1, class and positional embeddings, ln_pre), 1..L the
    blocks, L+1 ln_post and proj (+ L2 normalisation), L+2 the head.
    """

    def __init__(self, config: ViTConfig, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config, in_channels)
        self.head = nn.Linear(config.output_dim, num_classes)
        self.stage_prefixes = stage_prefixes(config.layers)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding (b, output_dim), not normalised."""
        return self.visual(x)

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        layers = self.config.layers
        if index == 0:
            return self.visual.embed(x)
        if 1 <= index <= layers:
            return self.visual.transformer.resblocks[index - 1](x)
        if index == layers + 1:
            return F.normalize(self.visual.project(x), dim=-1)
        if index == layers + 2:
            return self.head(x)
        raise IndexError(f"stage index must be in [0, {layers + 3}), got {index}")


EMBEDDING = ("visual.conv1", "visual.class_embedding", "visual.positional_embedding",
             "visual.ln_pre")


def _blocks(indices) -> tuple[str, ...]:
    return tuple(f"visual.transformer.resblocks.{i}" for i in indices)


def stage_prefixes(layers: int) -> tuple[tuple[str, ...], ...]:
    return (EMBEDDING, *((b,) for b in _blocks(range(layers))),
            ("visual.ln_post", "visual.proj"), (HEAD,))


def block_options(layers: int) -> dict[str, tuple[str, ...]]:
    """The paper's options for a CLIP ViT, in forward order. ln_post and proj belong to
    no single option (only to "all"), as in the paper's table."""
    return {"embedding": EMBEDDING, "first3": _blocks(range(3)),
            "last3": _blocks(range(layers - 3, layers)), "last": (HEAD,)}


def build(arch: str, num_classes: int, in_channels: int = 3) -> CLIPImageClassifier:
    if arch not in CONFIGS:
        raise ConfigError(f"unknown CLIP ViT {arch!r}; known: {', '.join(CONFIGS)}")
    return CLIPImageClassifier(CONFIGS[arch], num_classes, in_channels)


def _register() -> None:
    notes = {"clip-vit-b16": "CLIP ViT-B/16 image tower (OpenAI weights, QuickGELU) + linear head",
             "clip-vit-b16-gelu": "CLIP ViT-B/16 with GELU (open_clip's non-OpenAI weights)",
             "clip-vit-tiny": "CLIP ViT, tiny (32 px, 6 blocks of width 32): tests only"}
    for name, config in CONFIGS.items():
        register_architecture(Architecture(
            name, build=lambda c, k, name=name: build(name, c, k),
            blocks=block_options(config.layers), normalization=(CLIP_MEAN, CLIP_STD),
            notes=notes[name], needs_init=name != "clip-vit-tiny"))


_register()


# --- weight files -----------------------------------------------------------------

def is_torchscript_archive(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive (OpenAI's released `.pt` files are): a zip
    holding `constants.pkl` or a `code/` folder under its root folder, which `torch.save`
    archives never have (their root folder is named after the file, `code.pt` included)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if parts[-1] == "constants.pkl" or "code" in parts[1:-1]:
                return True
    return False


def torchscript_refusal(path: str | Path) -> str:
    """Why a TorchScript archive is not read, and how to read it anyway."""
    return (f"{path} is a TorchScript archive (as OpenAI's CLIP .pt files are). Reading one "
            "runs code stored inside it, so it is refused by default. If you trust the file, "
            "convert it once into a plain checkpoint:\n"
            f"  python -m deep.clip prepare --weights {path} --trust-torchscript "
            "--num-classes N --out clip.pt\n"
            "(or load it directly with trust_checkpoint=True / --trust-checkpoint), or use "
            "open_clip's plain state dict of the same weights instead.")


def torchscript_state(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive when `trust` (reading it runs the archive's
    code: trusted files only); otherwise CheckpointError saying how to convert it."""
    if not trust:
        raise CheckpointError(torchscript_refusal(path))
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # torch raises many types for a bad archive
        raise CheckpointError(f"cannot read TorchScript archive {path}: {err}") from None
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def image_tower_state(state: dict[str, torch.Tensor], model: CLIPImageClassifier,
                      what: str = "state dict") -> dict[str, torch.Tensor]:
    """The entries of a CLIP state dict that `model` takes: `visual.*` (the image tower)
    and `head.*` when the file has a head; the text tower's keys are dropped. A file
    without a head (CLIP's own) gets a fresh head seeded with 0, so the same file always
    gives the same network.

    Raises CheckpointError when the file holds no image tower at all, or another
    configuration's (named, instead of every key's shape).
    """
    tower = {k: v for k, v in state.items() if k.startswith(IMAGE_TOWER)}
    if not tower:
        sample = ", ".join(sorted(state)[:5])
        raise CheckpointError(f"{what} holds no CLIP image tower (no key starts with "
                         f"{IMAGE_TOWER!r}; first keys: {sample or 'none'})")
    _check_configuration(tower, model, what)
    heads = {k: v for k, v in state.items() if k.startswith(HEAD + ".")}
    if not heads:
        # A fine-tuned classifier saved under another name (fc.*, classifier.*) would be
        # dropped silently and the `none` row would score a random head: say so.
        other = sorted(k for k in state if not k.startswith(IMAGE_TOWER)
                       and not k.split(".")[0] in TEXT_TOWER)
        if other:
            warnings.warn(f"{what}: keys outside CLIP's image and text towers were ignored "
                          f"({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}); the "
                          f"model gets a fresh head seeded with 0. If they are a "
                          f"classification head, rename them to {HEAD}.weight and "
                          f"{HEAD}.bias", stacklevel=3)
    tower.update(heads or seeded_head_state(model))
    return tower


def _check_configuration(tower: dict[str, torch.Tensor], model: CLIPImageClassifier,
                         what: str) -> None:
    """A file whose image tower is another configuration's (ViT-B/16 weights for
    clip-vit-tiny, say) names that configuration; one that fits none is left to the
    strict load, which names the shapes."""
    def shapes(config: ViTConfig) -> dict:
        with torch.device("meta"):  # shapes only: no memory, no init
            visual = VisionTransformer(config, model.visual.conv1.in_channels)
        return {IMAGE_TOWER + k: tuple(v.shape) for k, v in visual.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in tower.items()}
    if given == shapes(model.config):
        return
    fits = [name for name, config in sorted(CONFIGS.items()) if given == shapes(config)]
    if fits:
        ours = [name for name, config in sorted(CONFIGS.items()) if config == model.config]
        raise CheckpointError(f"{what} holds the image tower of {' or '.join(fits)}, not of "
                              f"{' or '.join(ours) or 'this model'}: give --arch {fits[0]}")


def seeded_head_state(model: CLIPImageClassifier, seed: int = 0) -> dict[str, torch.Tensor]:
    """`head.weight`, `head.bias` of a freshly initialised head (nn.Linear's init), seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = nn.Linear(model.head.in_features, model.head.out_features)
    return {f"{HEAD}.{k}": v.detach() for k, v in head.state_dict().items()}


def logit_scale(state: dict[str, torch.Tensor]) -> float:
    """CLIP's logit scale (exp of the stored `logit_scale`), or 100 when the file lacks it."""
    value = state.get("logit_scale")
    return float(value.exp().clamp(max=DEFAULT_LOGIT_SCALE)) if value is not None \
        else DEFAULT_LOGIT_SCALE


def set_zero_shot_head(model: CLIPImageClassifier, text_embeddings: torch.Tensor,
                       scale: float = DEFAULT_LOGIT_SCALE) -> None:
    """Head = scale * the L2-normalised class text embeddings, bias 0: the model's logits
    are then CLIP's zero-shot logits, scale * cos(image embedding, class embedding).

    Args:
        text_embeddings: (num_classes, output_dim), e.g. CLIP's text embeddings of one
            prompt per class (averaged over prompts if you like), any norm.
    """
    expected = tuple(model.head.weight.shape)
    if not isinstance(text_embeddings, torch.Tensor) or text_embeddings.ndim != 2 \
            or tuple(text_embeddings.shape) != expected:
        got = tuple(text_embeddings.shape) if isinstance(text_embeddings, torch.Tensor) \
            else type(text_embeddings).__name__
        raise CheckpointError(f"class text embeddings must be a tensor of shape "
                         f"[num_classes, embedding] = {list(expected)}, got {got}")
    weights = text_embeddings.detach().float()
    if not torch.isfinite(weights).all() or (weights.norm(dim=1) == 0).any():
        raise CheckpointError("class text embeddings must be finite and non-zero in every row")
    with torch.no_grad():
        model.head.weight.copy_(scale * F.normalize(weights, dim=1))
        model.head.bias.zero_()
