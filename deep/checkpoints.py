"""Checkpoints: our own format, torchvision ResNet-50 weight files, manifests.

Our format is a `torch.save`d dict:

    {"format": "surgical-ft-checkpoint", "version": 1, "arch": "resnet26",
     "num_classes": 10, "in_channels": 3, "state_dict": {...}, "meta": {...}}

`meta` holds JSON-like values only (it travels into manifests and reports). A
manifest is a JSON file beside the checkpoint (`model.pt` -> `model.pt.json`)
that records its sha256 and how it was made; `verify_checkpoint` checks a file
against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import build_model

FORMAT = "surgical-ft-checkpoint"
VERSION = 1
RANDOM_INIT = "none"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


@dataclass
class Checkpoint:
    arch: str
    num_classes: int
    in_channels: int
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The network with these weights loaded (key names and shapes checked)."""
        model = build_model(self.arch, self.num_classes, self.in_channels)
        load_state_strict(model, self.state_dict, what=f"{self.arch} checkpoint")
        return model


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call write(file_object) on a temp file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, num_classes: int,
                    in_channels: int, meta: dict | None = None) -> Path:
    """Write the model in our format, atomically (a kill never leaves half a file).

    `meta` is stored as plain JSON types, so the file loads with torch.load's safe
    `weights_only=True` (a str subclass such as torch.__version__ would not)."""
    payload = {"format": FORMAT, "version": VERSION, "arch": arch, "num_classes": num_classes,
               "in_channels": in_channels, "meta": json.loads(json.dumps(dict(meta or {}))),
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    return Path(path)


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint in our format (see the module docstring)."""
    path = Path(path)
    raw = _torch_load(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (for a torchvision ResNet-50 "
                              "weight file use load_torchvision_state)")
    missing = {"arch", "num_classes", "in_channels", "state_dict"} - set(raw)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
    return Checkpoint(raw["arch"], int(raw["num_classes"]), int(raw["in_channels"]),
                      raw["state_dict"], raw.get("meta", {}))


def load_torchvision_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision-layout state dict from a file: a raw state dict, or one wrapped in
    {"state_dict": ...} or {"model": ...}, with an optional DataParallel "module." prefix."""
    path = Path(path)
    raw = _torch_load(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return raw["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor)")
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return raw


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str = "state dict") -> None:
    """Load `state` into `model`; any missing, unexpected or misshapen key is an error.

    BatchNorm's `num_batches_tracked` may be absent (old torchvision files omit it).
    """
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_head(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_head(shapes)}")
        raise CheckpointError(f"{what} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def load_backbone(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise `model` from a state dict file (ours or torchvision-layout) whose
    classifier may have another number of classes (e.g. ImageNet's 1000).

    Every tensor must fit except those of the final classifier (`fc.*`), which keep
    their fresh initialisation when their shape differs. Returns the names skipped.
    """
    state = load_torchvision_state(path)
    expected = model.state_dict()
    skipped = sorted(k for k in state if k.startswith("fc.") and k in expected
                     and state[k].shape != expected[k].shape)
    kept = {k: v for k, v in state.items() if k not in skipped}
    kept.update({k: expected[k] for k in skipped})
    load_state_strict(model, kept, what=str(path))
    return skipped


def _head(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_model(checkpoint: str | Path, arch: str, num_classes: int, in_channels: int,
               seed: int = 0) -> nn.Module:
    """The pretrained network to tune.

    Args:
        checkpoint: our format, a torchvision-layout state dict file, or "none" for a
            random initialisation (seeded; smoke tests only, results are meaningless).
        arch, num_classes, in_channels: what the benchmark needs; an own-format
            checkpoint must agree.
    """
    if str(checkpoint) == RANDOM_INIT:
        warnings.warn("checkpoint 'none': RANDOM INITIALISATION, results mean nothing "
                      "(use only for smoke tests)", stacklevel=2)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_model(arch, num_classes, in_channels)
    path = Path(checkpoint)
    raw_format = _torch_load(path)
    if isinstance(raw_format, dict) and raw_format.get("format") == FORMAT:
        ckpt = load_checkpoint(path)
        found = (ckpt.arch, ckpt.num_classes, ckpt.in_channels)
        if found != (arch, num_classes, in_channels):
            raise CheckpointError(f"{path} holds arch={found[0]}, num_classes={found[1]}, "
                                  f"in_channels={found[2]}; the benchmark needs arch={arch}, "
                                  f"num_classes={num_classes}, in_channels={in_channels}")
        return ckpt.build()
    model = build_model(arch, num_classes, in_channels)
    load_state_strict(model, load_torchvision_state(path), what=f"{path}")
    return model


# --- manifests -------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".json")


def write_manifest(checkpoint: str | Path, **fields) -> Path:
    """Write `<checkpoint>.json` with the file's sha256 and size plus `fields`."""
    checkpoint = Path(checkpoint)
    manifest = {"file": checkpoint.name, "sha256": sha256_file(checkpoint),
                "bytes": checkpoint.stat().st_size, **fields}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    out = manifest_path(checkpoint)
    atomic_write_bytes(out, lambda f: f.write(text.encode()))
    return out


def verify_checkpoint(checkpoint: str | Path, manifest: str | Path | None = None) -> dict:
    """Check a checkpoint file against its manifest; return the manifest.

    Raises CheckpointError when either file is missing or the sha256 differs.
    """
    checkpoint = Path(checkpoint)
    manifest = Path(manifest) if manifest is not None else manifest_path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint file not found: {checkpoint}")
    if not manifest.is_file():
        raise CheckpointError(f"manifest not found: {manifest}")
    try:
        info = json.loads(manifest.read_text())
        expected = info["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest}: not a manifest with a sha256 ({err})") from None
    actual = sha256_file(checkpoint)
    if actual != expected:
        raise CheckpointError(f"{checkpoint}: sha256 {actual} does not match the manifest "
                              f"{manifest} ({expected}); the file is corrupt or was replaced")
    return info
