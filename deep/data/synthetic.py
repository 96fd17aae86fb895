"""`synthetic`: a built-in benchmark that needs no data, so every command runs in seconds.

Images are 3 x 16 x 16, four classes. Class k is an oriented colour grating
(orientation k * 45 degrees) with a random phase, plus pixel noise. Each class
has two subpopulations that differ in the grating's frequency and colour: the
source (pretraining) data uses subpopulation A. Shifts, one of each kind:

| shift | kind | target data |
|---|---|---|
| `noise` | input | subpopulation A plus strong Gaussian pixel noise (sigma 1.0) |
| `feature` | feature | subpopulation B (same classes, different gratings) |
| `flip` | output | subpopulation A with labels permuted, y -> 3 - y |
| `spurious` | output, groups | subpopulation A, labels rotated (y -> y + 1 mod 4), and a 4x4 corner patch of a class colour that matches the new label in 90% of training images and at random (25%) in validation and test. Groups = (label, patch matches label): 8 groups, worst-group accuracy reported |

The source model is trained on the fly on the source data with the project's one
training loop and `SOURCE_RECIPE`, deterministically, and cached on disk under
$SURGICAL_FT_CACHE (default ~/.cache/surgical-ft) so that sweep workers and later
runs reuse it (`deep.pretrain.cached_source_model`; this data module never imports
the engine).
"""

from __future__ import annotations

import math
import zlib

import torch

from ..errors import check_int
from .base import (Benchmark, DataError, ShiftTask, SourceData, TensorSplit,
                   class_balanced_indices, seeded, split_counts)

NAME = "synthetic"
NUM_CLASSES = 4
CHANNELS = 3
SIZE = 16
SHIFTS = ("noise", "feature", "flip", "spurious")
POOL_PER_CLASS = 400          # target images generated per class and shift
SOURCE_TRAIN_PER_CLASS = 300
SOURCE_TEST_PER_CLASS = 100
LAYOUT = "nothing: the synthetic benchmark is generated in memory"
# How the source model is pretrained (deep.pretrain.PretrainConfig fields).
SOURCE_RECIPE = {"epochs": 6, "lr": 0.05, "seed": 0, "augment": "none", "batch_size": 64}


def _palette() -> torch.Tensor:
    g = seeded(1234)
    return torch.rand(2, NUM_CLASSES, CHANNELS, generator=g) * 2 - 1   # (subpop, class, C)


def generate(labels: torch.Tensor, subpopulation: int, generator: torch.Generator,
             noise: float = 0.3, size: int = SIZE, channels: int = CHANNELS) -> torch.Tensor:
    """Images (n, channels, size, size) float32 for int64 `labels` (n,) in [0, 4), from
    subpopulation 0 (A) or 1 (B). channels <= 3."""
    check_int("channels", channels, error=DataError)
    if channels > CHANNELS:  # the palette has 3 colour channels; more would be copies of none
        raise DataError(f"channels must be at most {CHANNELS} (the gratings' colour channels), "
                        f"got {channels}")
    n = len(labels)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = labels.float() * math.pi / NUM_CLASSES
    freq = 2.0 if subpopulation == 0 else 3.5
    phase = torch.rand(n, generator=generator) * 2 * math.pi
    proj = (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy)
    wave = torch.sin(2 * math.pi * freq * proj + phase[:, None, None])          # (n, H, W)
    colour = _palette()[subpopulation][labels][:, :channels]                    # (n, C)
    images = wave[:, None] * (0.5 + 0.5 * colour[:, :, None, None].abs()) * colour.sign()[:, :, None, None]
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images.float().contiguous()


def _balanced_labels(per_class: int) -> torch.Tensor:
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def _no_folder(data_dir) -> None:
    """A folder given to the synthetic benchmark is a mistake (the user meant their own
    data); reading nothing from it would report synthetic numbers as if they were theirs."""
    if data_dir is not None:
        raise DataError(f"{NAME} is generated in memory and reads no folder, but was given "
                        f"{str(data_dir)!r}: drop --data-dir, or name the benchmark of that "
                        "data (python -m deep protocols lists them)")


def load_source(data_dir=None) -> SourceData:
    """Subpopulation A, clean: 1200 training and 400 test images."""
    _no_folder(data_dir)
    g = seeded(7)
    train_y = _balanced_labels(SOURCE_TRAIN_PER_CLASS)
    test_y = _balanced_labels(SOURCE_TEST_PER_CLASS)
    train = TensorSplit(generate(train_y, 0, g), train_y, name="synthetic/source-train")
    test = TensorSplit(generate(test_y, 0, g), test_y, name="synthetic/source-test")
    return SourceData(NAME, NUM_CLASSES, CHANNELS, train, test)


def _pool(shift: str, part: str) -> TensorSplit:
    """The fixed target pool of one shift: POOL_PER_CLASS images per class."""
    g = seeded(zlib.crc32(f"{shift}/{part}".encode()))
    labels = _balanced_labels(POOL_PER_CLASS)
    images = generate(labels, 1 if shift == "feature" else 0, g)  # drawn for the source label
    groups = None
    if shift == "noise":
        images = images + 1.0 * torch.randn(images.shape, generator=g)
    elif shift == "flip":
        labels = NUM_CLASSES - 1 - labels
    elif shift == "spurious":
        labels = (labels + 1) % NUM_CLASSES
        agree_rate = 0.9 if part == "train" else 1 / NUM_CLASSES
        agree = torch.rand(len(labels), generator=g) < agree_rate
        other = (labels + torch.randint(1, NUM_CLASSES, labels.shape, generator=g)) % NUM_CLASSES
        cue = torch.where(agree, labels, other)
        images[:, :, :4, :4] = 2.0 * _palette()[0][cue][:, :, None, None]
        groups = labels * 2 + (cue == labels).long()
    return TensorSplit(images.float().contiguous(), labels, groups, name=f"synthetic/{shift}/{part}")


def load_task(data_dir=None, shift: str = "noise", n_target: int = 200, val_per_class: int = 25,
              test_per_class: int = 100, seed: int = 0) -> ShiftTask:
    """Class-balanced train / val / test drawn (by `seed`) from the shift's fixed pools.

    Training images come from the shift's "train" pool, validation and test from
    disjoint parts of its "eval" pool (for `spurious` the two pools differ in
    how often the patch matches the label).
    """
    BENCHMARKS[NAME].check_shifts(shift)  # first, as every loader does
    _no_folder(data_dir)
    check_int("n_target", n_target, error=DataError)
    # 0 passes here: ShiftTask says which flag makes the split non-empty
    for name, value in (("val_per_class", val_per_class), ("test_per_class", test_per_class)):
        check_int(name, value, minimum=0, error=DataError)
    if n_target > NUM_CLASSES * POOL_PER_CLASS:
        raise DataError(f"synthetic/{shift}: n_target={n_target} exceeds the "
                        f"{NUM_CLASSES * POOL_PER_CLASS} target training images available")
    if val_per_class + test_per_class > POOL_PER_CLASS:
        raise DataError(f"synthetic/{shift}: val_per_class + test_per_class = "
                        f"{val_per_class + test_per_class} exceeds the {POOL_PER_CLASS} per class available")
    # test, val, then train, as `draw_splits`: a seed's test and validation images do not
    # depend on n_target (an n_target sweep, or an adaptation stream, scores on one test set)
    g = seeded(seed)
    train_pool, eval_pool = _pool(shift, "train"), _pool(shift, "eval")
    test_idx = class_balanced_indices(eval_pool.labels, test_per_class, g,
                                      what=f"synthetic/{shift} test")
    used = torch.zeros(len(eval_pool), dtype=torch.bool)
    used[test_idx] = True
    val_idx = class_balanced_indices(eval_pool.labels, val_per_class, g, exclude=used,
                                     what=f"synthetic/{shift} val")
    train_idx = class_balanced_indices(train_pool.labels, split_counts(n_target, NUM_CLASSES), g,
                                       what=f"synthetic/{shift} train")
    groups = (tuple(f"y={y},patch {'matches' if m else 'differs'}"
                    for y in range(NUM_CLASSES) for m in (0, 1)) if shift == "spurious" else None)
    return ShiftTask(NAME, shift, NUM_CLASSES, train_pool.subset(train_idx),
                     eval_pool.subset(val_idx), eval_pool.subset(test_idx), group_names=groups)


BENCHMARKS = {
    NAME: Benchmark(NAME, SHIFTS, NUM_CLASSES, CHANNELS, LAYOUT, load_task, load_source,
                    has_groups=True, source_recipe=SOURCE_RECIPE, check_data_dir=_no_folder,
                    # not pixels: values around [-1, 1], read as [0, 1] by pixel augmentations
                    normalization=((0.5,) * CHANNELS, (0.5,) * CHANNELS)),
}
