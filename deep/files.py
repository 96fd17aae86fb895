"""Files that must never be half written, one writer per output (`sole_writer`), and
manifests that say what a file holds.

Bottom layer (no model, no data): the engine, the sweep, the reports and the data
loaders all write through `atomic_write_bytes`, and loaders check committed source
models with `verify_checkpoint`.

A manifest is a JSON file beside a checkpoint (`model.pt` -> `model.pt.json`) that
records its sha256, its size and how it was made (the resolved configuration).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import ConfigError, DeepError

# The folder that holds this package: the repository in a git checkout.
CHECKOUT = Path(__file__).resolve().parents[1]


class CheckpointError(DeepError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


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


def check_output(path: str | Path, what: str = "--out", folder: bool = False) -> Path:
    """`path` if results can be written there (a file, or with `folder` a folder, whose
    parent folders are created now); else a ConfigError before any work is done, rather
    than an OSError once it is."""
    path = Path(path).expanduser()
    if path.is_symlink():  # write the file it names: an atomic rename would replace the link
        path = Path(os.path.realpath(path))
    if path.is_dir() != folder and path.exists():
        kind = "a folder" if path.is_dir() else "a file"
        raise ConfigError(f"{what} {path} is {kind}; {'a folder' if folder else 'a file'} is "
                          "expected")
    directory = path if folder else path.parent
    blocking = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"{what} {path}: {blocking} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot write in {directory} "
                          f"({err.strerror or err})") from None
    return path


_HELD: set[str] = set()  # the outputs this process holds (a two-stage sweep's inner sweeps)


@contextlib.contextmanager
def sole_writer(path: str | Path, what: str = "--out"):
    """Hold `path` for this process while it writes it: a second process that would write
    the same file (a sweep, an adaptation run, a pretraining) is refused at once, rather
    than each rewriting the file with its own rows and losing the other's.

    The lock is `flock` on `.<name>.lock` beside the file (beside its target, for a
    symlink), so it goes with the process even when that is killed (a stale lock file is
    taken over); the file is removed on exit. Re-entrant within a process. On entry, the
    temp files a killed writer left beside `path` are removed."""
    path = Path(path)
    real = os.path.realpath(path)
    if real in _HELD:
        yield path
        return
    lock = Path(real).with_name(f".{Path(real).name}.lock")
    fd = _take_lock(lock, path, what)  # None: a file system without locks (warned)
    if fd is not None:
        _HELD.add(real)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
    try:
        remove_stale_temps(path)
        yield path
    finally:
        if fd is not None:
            _HELD.discard(real)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            os.close(fd)


def _take_lock(lock: Path, path: Path, what: str) -> int | None:
    """An open descriptor of `lock` holding its flock; None where locks are unsupported."""
    while True:
        try:  # O_NOFOLLOW: a symlink planted at the lock's name is not written through
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ConfigError(f"{what} {path}: cannot create its lock file {lock} "
                              f"({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{what} {path} is being written by {holder}; wait for it to "
                              f"finish, or write to another {what}") from None
        except OSError as err:  # a file system without locks (some network mounts)
            os.close(fd)
            warnings.warn(f"cannot lock {lock} ({err.strerror or err}): make sure no other "
                          f"process writes {path} meanwhile", stacklevel=4)
            return None
        try:
            if os.fstat(fd).st_ino == os.lstat(lock).st_ino:
                return fd  # the lock file still at its path: ours
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by its last holder while we opened it: take the new one


# The files written beside an output, whose temp files a killed writer may leave.
SIBLINGS = ("", ".json", ".state", ".config.json")


def remove_stale_temps(path: str | Path, siblings: tuple[str, ...] = SIBLINGS) -> None:
    """Remove the temp files `atomic_write_bytes` leaves beside `path` (and beside its
    manifest, run state and configuration record) when a writer is killed; another
    output's temps (`model.pt.v2`'s beside `model.pt`) are not matched. Call it only as
    the sole writer of `path` (`sole_writer`): another writer's temp is not stale."""
    path = Path(path)
    for sibling in siblings:
        # mkstemp's names: .<name>.<8 random characters>.tmp
        pattern = f".{glob.escape(path.name + sibling)}.{'[a-z0-9_]' * 8}.tmp"
        for stale in path.parent.glob(pattern):
            stale.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` (UTF-8) into `path`, atomically."""
    data = text.encode()
    atomic_write_bytes(path, lambda f: f.write(data))


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
    out = manifest_path(checkpoint)
    atomic_write_text(out, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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


def save_figure(fig, path_stem: Path) -> list[Path]:
    """`fig` as <stem>.png and <stem>.pdf, each written atomically (the PDF without its
    creation date, so the same data give the same bytes); closes the figure. The caller
    holds the folder's `sole_writer`: the temps a killed writer left of these files go."""
    import matplotlib.pyplot as plt

    paths = []
    for suffix in (".png", ".pdf"):
        path = Path(path_stem).with_suffix(suffix)
        remove_stale_temps(path, siblings=("",))
        metadata = {"CreationDate": None} if suffix == ".pdf" else None
        atomic_write_bytes(path, lambda f: fig.savefig(f, format=suffix[1:], dpi=150,
                                                       metadata=metadata))
        paths.append(path)
    plt.close(fig)
    return paths


def remove_figure(path_stem: Path) -> None:
    """Delete <stem>.png and <stem>.pdf, for a summary that has no such plot this time: an
    older one left beside the new table would show other data."""
    for suffix in (".png", ".pdf"):
        Path(path_stem).with_suffix(suffix).unlink(missing_ok=True)


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: str) -> str:
    """Where cells on `device` run, for the `machine` column: the GPU's name, or the CPU
    model with the instruction set torch dispatches to and the torch threads of this
    process, and the torch build. Rows agree bit for bit only between runs on the same
    kind of machine (on CPU: the same threads; docs/fmnist.md#same-seed-same-numbers)."""
    if torch.device(device).type == "cuda":
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        threads = torch.get_num_threads()
        where = (f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, "
                 f"{threads} thread{'s' if threads > 1 else ''}")
        capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
        where += f", ONEDNN_MAX_CPU_ISA={capped}" if capped else ""
    return f"{where}; torch {torch.__version__}"


@functools.lru_cache(maxsize=1)
def code_commit() -> str | None:
    """The git commit of the code that runs (the repository holding this package), with
    "+dirty" when tracked files under deep/ or configs/ differ from it; None outside a
    git checkout (an installed copy) or without git. Recorded in every results row."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=CHECKOUT, text=True,
                             capture_output=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "deep", "configs"], cwd=CHECKOUT, text=True, capture_output=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
