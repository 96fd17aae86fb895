"""CIFAR-10 (source data), CIFAR-10-C and CIFAR-Flip (targets).

- `cifar10c`: Hendrycks & Dietterich's CIFAR-10-C. Each `<corruption>.npy` holds the
  10,000 CIFAR-10 test images corrupted at severities 1..5, stacked in five equal blocks
  (severity 1 first), and `labels.npy` the matching labels. Only the requested severity's
  block is read (memory-mapped). The block size is derived as len / 5 and checked, so a
  small file with the same structure (our test fixtures) is read by the same code.
- `cifar-flip`: CIFAR-10's test batch with every label y replaced by 9 - y.
- Source data for both: CIFAR-10's python batches (50,000 train, 10,000 test).

Target splits follow the public reference code: n_target class-balanced training images,
then 10 per class for validation and 90 per class for test, disjoint, from the 10,000
images of one corruption at severity 5 (or of the test batch, for the flip).

Images are normalised with the CIFAR-10 channel statistics unless a loader is given
`normalization=(mean, std)`: the sweep passes the architecture's own (e.g. `wrn28-10`
expects [0, 1] pixels, `resnet26-gn` mean = std = 0.5), so the weights see what they
were trained on. The python batches are read with an unpickler that admits only what
those files hold (dicts, lists, bytes, ints and numpy arrays): a crafted batch cannot
run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, check_int
from .base import (Benchmark, DataError, Normalization, ShiftTask, SourceData, TensorSplit,
                   draw_splits, mean_std, to_float_images)
from .images import find_dir, require_file

NUM_CLASSES = 10
SEVERITIES = 5
# CIFAR-10 training-set channel statistics; source and target share them.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NORMALIZATION = (CIFAR10_MEAN, CIFAR10_STD)  # the loaders' default; each benchmark declares it

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")
"""The 15 standard corruptions (the paper's average is over these)."""
EXTRA_CORRUPTIONS = ("gaussian_blur", "saturate", "spatter", "speckle_noise")
"""The 4 held-out corruptions also shipped in CIFAR-10-C."""
PUBLIC_CODE_CORRUPTIONS = ("defocus_blur", "frost", "gaussian_blur", "gaussian_noise",
                           "glass_blur", "impulse_noise", "jpeg_compression", "motion_blur",
                           "pixelate", "saturate", "shot_noise", "snow", "spatter",
                           "speckle_noise", "zoom_blur")
"""What the public code's README runs (defocus_blur in its first sample command, the 14
others in its sweep command): gaussian_blur, saturate, spatter and speckle_noise instead of
brightness, contrast, elastic_transform and fog."""

LAYOUT_C = """\
CIFAR-10-C (https://zenodo.org/record/2535967, CIFAR-10-C.tar), extracted:
  <data-dir>/CIFAR-10-C/   (or <data-dir> itself)
    labels.npy              uint8/int (50000,), labels in 0..9
    <corruption>.npy        uint8 (50000, 32, 32, 3), severities 1..5 stacked in blocks of 10000
  corruptions: """ + ", ".join(CORRUPTIONS + EXTRA_CORRUPTIONS)

LAYOUT_BATCHES = """\
CIFAR-10 python version (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz), extracted:
  <data-dir>/cifar-10-batches-py/   (or <data-dir> itself)
    data_batch_1 .. data_batch_5, test_batch
  each a pickled dict with b"data" uint8 (10000, 3072) (channel-major 3x32x32 rows)
  and b"labels" (10000 ints in 0..9)"""


# ---------------------------------------------------------------- CIFAR-10-C

def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{what}: cannot read {path} as a .npy array ({err}); the file may be "
                        f"truncated or corrupt. Expected:\n{LAYOUT_C}") from None
    if not isinstance(array, np.ndarray):      # np.load reads a .npz archive whatever its name
        array.close()
        raise DataError(f"{what}: {path} is a .npz archive, not a .npy array. Expected:\n"
                        f"{LAYOUT_C}")
    return array


def read_cifar10c(data_dir, corruption: str, severity: int = 5) -> tuple[np.ndarray, torch.Tensor]:
    """One corruption at one severity of CIFAR-10-C.

    Returns: images uint8 (m, 32, 32, 3), memory-mapped (m = 10,000 for the real files),
    and labels int64 (m,).
    """
    what = f"cifar10c/{corruption}"
    if corruption not in CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise ConfigError(f"unknown CIFAR-10-C corruption {corruption!r}; known: "
                          f"{', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)}")
    check_int("severity", severity, maximum=SEVERITIES)
    root = find_dir(data_dir, ["CIFAR-10-C"], "labels.npy", LAYOUT_C, "cifar10c")
    images = _load_npy(require_file(root / f"{corruption}.npy", LAYOUT_C, what), what)
    labels = _load_npy(root / "labels.npy", what)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{what}: {root / (corruption + '.npy')} must be uint8 of shape "
                        f"(n, 32, 32, 3), got {images.dtype} {images.shape}")
    n = len(images)
    if n == 0 or n % SEVERITIES:
        raise DataError(f"{what}: {root / (corruption + '.npy')} has {n} images; expected a "
                        f"positive multiple of {SEVERITIES} (one equal block per severity, "
                        f"50000 in the real dataset)")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: {root / 'labels.npy'} must be integer of shape ({n},) to "
                        f"match {corruption}.npy, got {labels.dtype} {labels.shape}")
    block = n // SEVERITIES
    rows = slice((severity - 1) * block, severity * block)
    y = torch.from_numpy(np.array(labels[rows], dtype=np.int64))   # a copy: the map is read-only
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DataError(f"{what}: labels in {root / 'labels.npy'} must lie in 0..9, "
                        f"got [{int(y.min())}, {int(y.max())}]")
    return images[rows], y


def _tensor_splits(images: np.ndarray, labels: torch.Tensor, indices, name: str,
                   normalization: Normalization | None = None):
    """Only the chosen rows are read from (possibly memory-mapped) `images`."""
    mean, std = mean_std(normalization, NORMALIZATION)
    splits = []
    for split_name, idx in zip(("train", "val", "test"), indices):
        x = to_float_images(np.asarray(images[idx.numpy()]), mean, std)
        splits.append(TensorSplit(x, labels[idx], name=f"{name}/{split_name}"))
    return splits


def check_corruption_files(data_dir, shifts) -> None:
    """DataError naming every corruption of `shifts` with no `<corruption>.npy` (a partial
    download), before a sweep spends hours on the corruptions before the missing one."""
    root = find_dir(data_dir, ["CIFAR-10-C"], "labels.npy", LAYOUT_C, "cifar10c")
    missing = [s for s in shifts if not (root / f"{s}.npy").is_file()]
    if missing:
        raise DataError(f"cifar10c: {len(missing)} of the {len(shifts)} corruptions to run have "
                        f"no file in {root}: {', '.join(s + '.npy' for s in missing)}. Is the "
                        f"download complete? (--shifts runs the others); expected:\n{LAYOUT_C}")


def load_cifar10c(data_dir, shift: str, n_target: int, val_per_class: int, test_per_class: int,
                  seed: int, severity: int = 5,
                  normalization: Normalization | None = None) -> ShiftTask:
    """CIFAR-10-C target task for one corruption (`shift`); `normalization`: see the
    module docstring."""
    BENCHMARKS["cifar10c"].check_shifts(shift)
    images, labels = read_cifar10c(data_dir, shift, severity)
    idx = draw_splits(labels, NUM_CLASSES, n_target, val_per_class, test_per_class, seed,
                      f"cifar10c/{shift}")
    train, val, test = _tensor_splits(images, labels, idx, f"cifar10c/{shift}", normalization)
    return ShiftTask("cifar10c", shift, NUM_CLASSES, train, val, test)


def load_cifar10c_official(data_dir, shift: str, n_target: int, val_per_class: int,
                           test_per_class: int, seed: int, severity: int = 5,
                           normalization: Normalization | None = None) -> ShiftTask:
    """`load_cifar10c` limited to the corruptions the public code runs (cifar10c-official)."""
    BENCHMARKS["cifar10c-official"].check_shifts(shift)
    return load_cifar10c(data_dir, shift, n_target, val_per_class, test_per_class, seed,
                         severity, normalization)


# ---------------------------------------------------------------- CIFAR-10 batches

# The only globals a CIFAR-10 python batch refers to: numpy's array reconstructor (under
# its numpy 1 and numpy 2 module names), ndarray, dtype, and `_codecs.encode`, which
# protocol-2 pickles written by Python 3 use for bytes. Anything else is refused.
_ARRAY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_BATCH_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
}


class BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses every other global
    (a pickle can name any importable callable and run it while loading)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _BATCH_GLOBALS:
            return _BATCH_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR-10 batch holds "
                                     "only dicts, lists, bytes, numbers and numpy arrays")


def _read_batch(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    what = f"CIFAR-10 batch {path.name}"
    require_file(path, LAYOUT_BATCHES, what)
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError) as err:
        raise DataError(f"{what}: cannot unpickle {path} ({err!r}); the file may be truncated "
                        f"or corrupt. Expected:\n{LAYOUT_BATCHES}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{what}: {path} must be a dict with keys b'data' and b'labels', "
                        f"got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{what}: b'data' in {path} must be uint8 of shape (n, 3072), "
                        f"got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: b'labels' in {path} must be {len(data)} integers, "
                        f"got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{what}: labels in {path} must lie in 0..9, "
                        f"got [{labels.min()}, {labels.max()}]")
    # rows are channel-major (R plane, G plane, B plane), each 32x32 row-major
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, torch.from_numpy(labels.astype(np.int64))


def read_cifar10(data_dir, train: bool) -> tuple[np.ndarray, torch.Tensor]:
    """CIFAR-10 train (data_batch_1..5) or test (test_batch) images uint8 (n, 32, 32, 3)."""
    root = find_dir(data_dir, ["cifar-10-batches-py"], "test_batch", LAYOUT_BATCHES, "cifar-10")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    parts = [_read_batch(root / name) for name in names]
    return np.concatenate([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def load_cifar10_source(data_dir, severity: int = 5,
                        normalization: Normalization | None = None) -> SourceData:
    """CIFAR-10 train and test sets for pretraining, normalised with the CIFAR-10 mean/std
    or with `normalization` (the architecture's own, see the module docstring).

    `severity` is CIFAR-10-C's option, accepted (and unused: source images are clean) so
    that a protocol's [data] table can be passed to load_task and load_source alike.
    """
    mean, std = mean_std(normalization, NORMALIZATION)
    splits = []
    for train in (True, False):
        images, labels = read_cifar10(data_dir, train)
        name = "cifar10/" + ("train" if train else "test")
        splits.append(TensorSplit(to_float_images(images, mean, std), labels, name=name))
    return SourceData("cifar10", NUM_CLASSES, 3, splits[0], splits[1])


def load_cifar_flip(data_dir, shift: str, n_target: int, val_per_class: int,
                    test_per_class: int, seed: int,
                    normalization: Normalization | None = None) -> ShiftTask:
    """CIFAR-10 test images with labels y -> 9 - y (an output-level shift)."""
    BENCHMARKS["cifar-flip"].check_shifts(shift)
    images, labels = read_cifar10(data_dir, train=False)
    flipped = (NUM_CLASSES - 1) - labels
    idx = draw_splits(flipped, NUM_CLASSES, n_target, val_per_class, test_per_class, seed,
                      "cifar-flip")
    train, val, test = _tensor_splits(images, flipped, idx, "cifar-flip", normalization)
    return ShiftTask("cifar-flip", shift, NUM_CLASSES, train, val, test)


BENCHMARKS = {
    "cifar10c": Benchmark(
        name="cifar10c", shifts=CORRUPTIONS + EXTRA_CORRUPTIONS, num_classes=NUM_CLASSES,
        in_channels=3, layout=LAYOUT_C + "\nsource data (pretraining): " + LAYOUT_BATCHES,
        load_task=load_cifar10c, load_source=load_cifar10_source,
        normalization=NORMALIZATION, check_shift_files=check_corruption_files),
    "cifar-flip": Benchmark(
        name="cifar-flip", shifts=("flip",), num_classes=NUM_CLASSES, in_channels=3,
        layout=LAYOUT_BATCHES, load_task=load_cifar_flip, load_source=load_cifar10_source,
        normalization=NORMALIZATION),
    # The same data as the public code runs it (its corruption list; protocol
    # cifar10c-official): a name of its own keeps its results apart from cifar10c's.
    "cifar10c-official": Benchmark(
        name="cifar10c-official", shifts=PUBLIC_CODE_CORRUPTIONS, num_classes=NUM_CLASSES,
        in_channels=3, layout=LAYOUT_C + "\nsource data (pretraining): " + LAYOUT_BATCHES,
        load_task=load_cifar10c_official, load_source=load_cifar10_source,
        normalization=NORMALIZATION, check_shift_files=check_corruption_files),
}
