"""Checkpoints: our own format, torchvision ResNet-50 weight files, manifests.

Our format is a `torch.save`d dict:

    {"format": "surgical-ft-checkpoint", "version": 1, "arch": "resnet26",
     "num_classes": 10, "in_channels": 3, "state_dict": {...}, "meta": {...}}

`meta` holds JSON-like values only (it travels into manifests and reports). A
manifest is a JSON file beside the checkpoint (`model.pt` -> `model.pt.json`)
that records its sha256 and how it was made; `verify_checkpoint` checks a file
against it (manifests and atomic writes live in `deep.files`, re-exported here).
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import check_seed
from .files import (CheckpointError, atomic_write_bytes, manifest_path, sha256_file,  # noqa: F401
                    verify_checkpoint, write_manifest)
from .models import (architecture_names, build_model, get_architecture, matches_any,
                     same_network, vit)

FORMAT = "surgical-ft-checkpoint"
VERSION = 1
RANDOM_INIT = "none"


@dataclass
class Checkpoint:
    arch: str
    num_classes: int
    in_channels: int
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def build(self, where: str = "") -> nn.Module:
        """The network with these weights loaded (key names and shapes checked); `where`
        (the file's path) leads any error."""
        model = build_model(self.arch, self.num_classes, self.in_channels)
        what = f"{self.arch} checkpoint"
        load_state_strict(model, self.state_dict, what=f"{where} ({what})" if where else what)
        return model


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


# --- reading files safely ----------------------------------------------------------
#
# torch.load(weights_only=True) rebuilds tensors and plain containers only; a file that
# names any other global (a pickle can name any importable callable, and unpickling
# calls it) is refused. Checkpoints written by other projects also hold numpy scalars,
# e.g. MEMO's {"net": ..., "err_cls": np.float64(...)}: those are admitted, exactly
# numpy's scalar constructor, `numpy.dtype` and the numeric dtype classes, none of which
# can reach code. Anything else needs trust_checkpoint=True (CLI: --trust-checkpoint).

TRUST_HINT = "trust_checkpoint=True (command line: --trust-checkpoint)"
STATE_DICT_KEYS = ("state_dict", "net", "model", "model_state_dict")
"""Where wrapped state dicts sit: RobustBench/torchvision, TTT/MEMO, other trainers, and
PyTorch's own recipe for a general checkpoint (its "Saving and loading" tutorial)."""
STRIPPED_PREFIXES = ("module.", "model.")
"""Key prefixes of DataParallel (`module.`) and of wrapper models (`model.`), removed."""

_NUMERIC_DTYPE_CLASSES = (
    "BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType", "Int32DType",
    "UInt32DType", "Int64DType", "UInt64DType", "LongDType", "ULongDType", "LongLongDType",
    "ULongLongDType", "Float16DType", "Float32DType", "Float64DType", "LongDoubleDType",
    "Complex64DType", "Complex128DType", "CLongDoubleDType")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint names globals that safe loading does not admit."""


def numpy_safe_globals() -> list:
    """What safe loading admits beyond torch's own allowlist: numpy's scalar constructor
    (under its numpy 2 name and the numpy 1 name of files written before 2024),
    `numpy.dtype`, and the dtype classes of numeric types (numpy >= 1.25)."""
    import numpy as np

    scalar = type(np.float64(0)).__reduce__(np.float64(0))[0]
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    allowed += [getattr(dtypes, name) for name in _NUMERIC_DTYPE_CLASSES
                if dtypes is not None and hasattr(dtypes, name)]
    return allowed


def read_torch_file(path: Path, trust_checkpoint: bool = False, what: str = "checkpoint") -> object:
    """torch.load on CPU, safe unless `trust_checkpoint` (which may run code from the file).
    `what` names the file in errors ("checkpoint", "class text embeddings", ...)."""
    path = Path(path).expanduser()  # `--init=~/w.pt` reaches us unexpanded by the shell
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    with open(path, "rb") as f:
        start = f.read(32)  # enough to tell a zip archive, torch's legacy pickle, a plain one
    protocol = _plain_pickle_protocol(start)
    if protocol is not None:   # torch.load cannot read these, trusted or not
        raise CheckpointError(
            f"{what} {path} is a plain pickle (protocol {protocol}), not a torch.save file. "
            f"If you trust it (unpickling runs whatever the file asks), read it with "
            f"pickle.load and re-save the state dict with torch.save(state_dict, path)")
    _check_torch_format(start, path, what)
    _check_checksums(path, what)
    try:
        if trust_checkpoint:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_globals(path, err)
        if refused:
            raise UnsafeCheckpointError(
                f"{what} {path} refers to {', '.join(refused)}, which safe loading does not "
                f"admit (it admits tensors, plain containers and numpy scalars). Load it only "
                f"if you trust the file, with {TRUST_HINT}: that runs whatever the file asks "
                f"while unpickling") from None
        if _pickle_protocol(start) not in (None, 2):   # torch's safe unpickler reads protocol 2 only
            raise UnsafeCheckpointError(
                f"{what} {path} is in torch's legacy format with a pickle protocol that "
                f"safe loading cannot read. Load it only if you trust the file, with "
                f"{TRUST_HINT}, or re-save it with torch.save(...) (zip format)") from None
        raise CheckpointError(f"cannot read {what} {path}: {_torch_reason(err)}") from None
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(f"cannot read {what} {path}: {_torch_reason(err)}") from None


def _check_torch_format(start: bytes, path: Path, what: str) -> None:
    """torch.save writes a zip archive, or (before torch 1.6, or with
    _use_new_zipfile_serialization=False) a pickle that starts with its PROTO opcode:
    anything else (`start`: the file's first bytes) is no torch file at all, trusted or not."""
    if not start:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted download?")
    if start.startswith(b"PK\x03\x04") or start[0] == 0x80:
        return
    if start[8:10] == b'{"':  # safetensors: an 8-byte header length, then its JSON header
        raise CheckpointError(f"{what} {path} is a safetensors file, not one written by "
                              f"torch.save: convert it with safetensors.torch.load_file, then "
                              f"torch.save(state_dict, 'weights.pt')")
    raise CheckpointError(f"{what} {path} is not a file written by torch.save (neither a zip "
                          f"archive nor a pickle; it starts with {start[:4]!r}){_impostor(start)}")


def _impostor(start: bytes) -> str:
    """What a weight file that is no torch file often is instead, with what to do ("" if
    none of those): the web page a failed download saved (Google Drive's quota page, as
    RobustBench's downloads meet), or the pointer a clone without git-lfs leaves."""
    if start.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return ": it is an HTML page (a failed download?); download it again"
    if start.startswith(b"version https://git-lfs"):
        return ": it is a Git LFS pointer, not the weights; run `git lfs pull` in its repository"
    return ""


def _check_checksums(path: Path, what: str) -> None:
    """torch.save records a CRC-32 for each part of its zip archive, but torch.load never
    checks them: a copy spoiled inside a tensor (its directory intact, unlike a truncated
    one) would load other weights without a word. Parts saved without one (CRC 0,
    torch.serialization.set_crc32_options(False)) are not checked; a file that is no
    readable zip archive is left to torch.load's own message."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        for part in archive.infolist():
            if not part.CRC:
                continue
            try:
                with archive.open(part) as stream:  # zipfile checks the CRC at the end
                    while stream.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise CheckpointError(f"{what} {path} is damaged: {err} (a bad download or "
                                      f"copy?); fetch or copy it again") from None


def _torch_reason(err: Exception) -> str:
    """torch's reason in one line: the unpickler's own words where the message has them
    (its advice to retry with weights_only=False is this module's --trust-checkpoint
    hint, given only where it helps), else the first line. A legacy-format file cut short
    fails inside the unpickler with only "EOFError" or a struct message: said plainly."""
    if isinstance(err, (EOFError, struct.error)):
        return ("the file ends early or is damaged (truncated: an interrupted download or "
                "copy?); fetch or copy it again")
    text = str(err)
    found = re.search(r"WeightsUnpickler error: (.*)", text)
    line = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    return line.strip() or type(err).__name__


def _pickle_protocol(start: bytes) -> int | None:
    """The pickle protocol of a torch file in the legacy format (which starts with its
    pickled magic number), from the file's first bytes; None for anything else (zip
    archives, other files)."""
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:]
    return start[1] if len(start) > 2 and start[0] == 0x80 and magic in start else None


def _plain_pickle_protocol(start: bytes) -> int | None:
    """The protocol of a file written by pickle.dump (protocol >= 2, which starts with
    its PROTO opcode; torch.save's legacy format starts so too, but with its pickled
    magic number next), from its first bytes; None for anything else."""
    if len(start) < 2 or start[0] != 0x80 or start[1] < 2 or _pickle_protocol(start):
        return None
    return start[1]


def _refused_globals(path: Path, err: Exception) -> list[str]:
    """The globals of `path` outside the allowlist, read from the archive's pickle (zip
    format) or, failing that, from torch's message."""
    found: list[str] = []
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001  (legacy format or unreadable: use the message)
        pass
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(err))
        found = [a or b for a, b in found]
    return sorted(set(found))


def load_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> Checkpoint:
    """Read a checkpoint in our format (see the module docstring)."""
    path = Path(path)
    return _own_checkpoint(read_torch_file(path, trust_checkpoint), path)


def _own_checkpoint(raw: object, path: Path) -> Checkpoint:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (for another project's weight "
                              "file use load_torchvision_state or load_model)")
    missing = {"arch", "num_classes", "in_channels", "state_dict"} - set(raw)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
    counts = {k: raw[k] for k in ("num_classes", "in_channels")}
    if (not isinstance(raw["arch"], str) or not _is_state_dict(raw["state_dict"])
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in counts.values())):
        raise CheckpointError(f"{path}: malformed {FORMAT} file: expected arch (a name), "
                              f"num_classes and in_channels (positive integers) and state_dict "
                              f"(name -> tensor); got arch={raw['arch']!r}, num_classes="
                              f"{counts['num_classes']!r}, in_channels={counts['in_channels']!r}"
                              f", state_dict of type {type(raw['state_dict']).__name__}")
    return Checkpoint(raw["arch"], int(raw["num_classes"]), int(raw["in_channels"]),
                      raw["state_dict"], raw.get("meta", {}))


def load_torchvision_state(path: str | Path, trust_checkpoint: bool = False,
                           arch: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a weight file of this or another project (see `extract_state_dict`:
    torchvision, RobustBench, TTT/MEMO layouts), read safely unless `trust_checkpoint`.
    A file of ours for another network than `arch` is refused (`check_recorded_arch`)."""
    path = Path(path)
    raw = read_torch_file(path, trust_checkpoint)
    check_recorded_arch(raw, arch, str(path))
    return extract_state_dict(raw, str(path))


def check_recorded_arch(raw: object, arch: str | None, where: str) -> None:
    """A file of ours names its network: refuse it for another one, even when every tensor
    fits (clip-vit-b16-gelu's weights would run with QuickGELU in clip-vit-b16)."""
    if arch is None or not (isinstance(raw, dict) and raw.get("format") == FORMAT):
        return
    recorded = raw.get("arch")
    if isinstance(recorded, str) and recorded in architecture_names() \
            and not same_network(recorded, arch):
        raise CheckpointError(f"{where} holds arch={recorded}, not {arch}: give --arch {recorded}")


def extract_state_dict(raw: object, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """name -> tensor from what a weight file held.

    Accepted: our format; a raw state dict; one wrapped under `state_dict` (RobustBench,
    many trainers), `net` (TTT/MEMO: beside "err_cls", "optimizer", ...), `model` or
    `model_state_dict` (PyTorch's general-checkpoint recipe).
    Leading `module.` (DataParallel) and `model.` (wrapper models) are removed from
    every key, as RobustBench's loader does.
    """
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return raw["state_dict"]
    if isinstance(raw, nn.Module):   # torch.save(model): readable only when trusted
        raw = raw.state_dict()
    if isinstance(raw, dict) and not _is_state_dict(raw):
        wrapped = [k for k in STATE_DICT_KEYS if _is_state_dict(raw.get(k))]
        if not wrapped:
            keys = ", ".join(repr(k) for k in list(raw)[:8])
            raise CheckpointError(f"{where}: expected a state dict (name -> tensor), raw or under "
                                  f"one of {', '.join(STATE_DICT_KEYS)}; found keys {keys}. If "
                                  f"the weights sit under another key, load the file yourself "
                                  f"and re-save them with torch.save(state_dict, path)")
        raw = raw[wrapped[0]]
    if not _is_state_dict(raw):
        raise CheckpointError(f"{where}: expected a state dict (name -> tensor), got "
                              f"{type(raw).__name__}")
    return _strip_prefixes(raw, where)


def _is_state_dict(value: object) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _strip_prefixes(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        while name.startswith(STRIPPED_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise CheckpointError(f"{where}: keys {key!r} and another both become {name!r} once "
                                  f"the prefixes {', '.join(STRIPPED_PREFIXES)} are removed")
        out[name] = value
    return out


def optional_key(name: str) -> bool:
    """Whether a weight file may lack this key: BatchNorm's `num_batches_tracked` (old
    torchvision files omit it)."""
    return name.endswith("num_batches_tracked")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str = "state dict") -> None:
    """Load `state` into `model`; any missing, unexpected or misshapen key is an error,
    but for an `optional_key`.
    """
    expected = model.state_dict()
    optional = {k for k in expected if optional_key(k)}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    # float64 weights load as float32 (a cast); integer weights, or NaN/inf, are not weights.
    values = [f"{k}: {state[k].dtype}" for k in expected if k in state
              and expected[k].is_floating_point() and not state[k].is_floating_point()]
    values += [f"{k}: NaN or inf" for k in expected if k in state
               and state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if missing or unexpected or shapes or values:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_head(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_head(shapes)}")
        if values:
            parts.append(f"bad values ({len(values)}): {_head(values)}")
        raise CheckpointError(f"{what} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def load_backbone(model: nn.Module, path: str | Path, trust_checkpoint: bool = False,
                  head: tuple[str, ...] = ("fc",), arch: str | None = None) -> list[str]:
    """Initialise `model` from a weight file (ours, torchvision layout, a CLIP state dict
    for a CLIP ViT) whose classifier may have another number of classes (e.g.
    ImageNet's 1000).

    Every tensor must fit except those under the module prefixes `head` (the
    architecture's `last` block), which keep their fresh initialisation when their
    shape differs. Returns the names skipped. The file is read safely unless
    `trust_checkpoint` (see `load_model`). A file of ours for another network than
    `arch` (the name `model` was built from) is refused.
    """
    raw = _read_weights(Path(path), trust_checkpoint)
    check_recorded_arch(raw, arch, str(path))
    state = _state_for(model, raw, str(path))
    expected = model.state_dict()
    skipped = sorted(k for k in state if matches_any(k, head) and k in expected
                     and state[k].shape != expected[k].shape)
    kept = {k: v for k, v in state.items() if k not in skipped}
    kept.update({k: expected[k] for k in skipped})
    load_state_strict(model, kept, what=str(path))
    return skipped


def _read_weights(path: Path, trust_checkpoint: bool) -> object:
    """What a weight file holds, read once (some files are 150 MB)."""
    # CLIP ViT hook (deep.models.vit): OpenAI's TorchScript .pt refused unless trusted
    path = path.expanduser()
    if vit.is_torchscript_archive(path):
        return vit.torchscript_state(path, trust=trust_checkpoint)
    return read_torch_file(path, trust_checkpoint)


def _state_for(model: nn.Module, raw: object, where: str) -> dict[str, torch.Tensor]:
    """The state dict in `raw` as `model` names it."""
    state = extract_state_dict(raw, where)
    if isinstance(model, vit.CLIPImageClassifier):  # CLIP ViT hook: text tower dropped
        state = vit.image_tower_state(state, model, where)
    return state


def _head(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_model(checkpoint: str | Path, arch: str, num_classes: int, in_channels: int,
               seed: int = 0, trust_checkpoint: bool = False) -> nn.Module:
    """The pretrained network to tune.

    Args:
        checkpoint: our format; another project's weight file whose keys are the
            architecture's module names (torchvision ResNet-50, RobustBench WideResNet,
            TTT/MEMO ResNet-26: see `extract_state_dict`); or "none" for a random
            initialisation (seeded; smoke tests only, results are meaningless).
        arch, num_classes, in_channels: what the benchmark needs; an own-format
            checkpoint must agree.
        trust_checkpoint: read the file with full unpickling (it may run code); only
            for files whose source you trust and that safe loading refuses.
    """
    if str(checkpoint) == RANDOM_INIT:
        check_seed("seed", seed)
        warnings.warn("checkpoint 'none': RANDOM INITIALISATION, results mean nothing "
                      "(use only for smoke tests)", stacklevel=2)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_model(arch, num_classes, in_channels)
    path = Path(checkpoint)
    raw = _read_weights(path, trust_checkpoint)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        ckpt = _own_checkpoint(raw, path)
        if ckpt.arch not in architecture_names():  # else "unknown arch" without the file
            raise CheckpointError(f"{path} holds arch={ckpt.arch}, which is not registered here "
                                  f"(known: {', '.join(architecture_names())}): import the module "
                                  f"that registers it (deep.models.register_architecture) first")
        found = (ckpt.arch, ckpt.num_classes, ckpt.in_channels)
        if (same_network(ckpt.arch, arch), *found[1:]) != (True, num_classes, in_channels):
            raise CheckpointError(f"{path} holds arch={found[0]}, num_classes={found[1]}, "
                                  f"in_channels={found[2]}; the benchmark needs arch={arch}, "
                                  f"num_classes={num_classes}, in_channels={in_channels}")
        ckpt.arch = arch  # the same network under the name whose blocks are wanted
        return ckpt.build(str(path))
    model = build_model(arch, num_classes, in_channels)
    state = _state_for(model, raw, str(path))
    try:
        load_state_strict(model, state, what=f"{path}")
    except CheckpointError as err:
        hint = _refusal_hint(model, state, arch, num_classes, in_channels)
        if not hint:
            raise
        raise CheckpointError(f"{err}; {hint}") from None
    return model


def _refusal_hint(model: nn.Module, state: dict[str, torch.Tensor], arch: str,
                  num_classes: int, in_channels: int) -> str:
    """What a refused file of another project most likely holds and what to do ("" if
    unknown): another registered network, or this one with a classifier of another size."""
    fits = [name for name in _fitting_archs(state, num_classes, in_channels)
            if not same_network(name, arch)]
    if fits:
        return (f"its keys and shapes are exactly those of {' or '.join(fits)}: give --arch "
                f"{fits[0]}")
    head = get_architecture(arch).prefixes("last")
    if _only_head_differs(model, state, head):
        return (f"only its classifier ({', '.join(head)}) differs in size: train this benchmark's "
                f"source model from it first, `python -m deep pretrain --init FILE` (a classifier "
                f"of another size is re-initialised), and give that model")
    return ""


def _only_head_differs(model: nn.Module, state: dict[str, torch.Tensor],
                       head: tuple[str, ...]) -> bool:
    """Whether `state` has `model`'s keys and every shape but some under `head`
    (ImageNet weights for a 2-class benchmark)."""
    expected = model.state_dict()
    optional = {k for k in expected if optional_key(k)}
    same_keys = set(state) <= set(expected) and set(expected) - set(state) <= optional
    differ = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    return same_keys and bool(differ) and all(matches_any(k, head) for k in differ)


def _fitting_archs(state: dict[str, torch.Tensor], num_classes: int,
                   in_channels: int) -> list[str]:
    """The registered architectures whose keys and shapes `state` has exactly: another
    project's file names no network, so a refusal says which one it holds (MEMO's file
    given to our BatchNorm `resnet26`). Built on the meta device: shapes only, no memory."""
    def shapes(source: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in source.items() if not optional_key(k)}
    given, fits = shapes(state), []
    for name in architecture_names():
        try:
            with torch.device("meta"):
                candidate = build_model(name, num_classes, in_channels)
        except Exception:  # noqa: BLE001  (one that cannot take these sizes fits nothing)
            continue
        if shapes(candidate.state_dict()) == given:
            fits.append(name)
    return fits
