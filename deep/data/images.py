"""Helpers shared by the paper-benchmark loaders.

- `ImageTransform`: the deterministic 224-px evaluation transform of ImageNet-style
  benchmarks (resize the shorter side, centre crop, ImageNet mean/std), in PIL and numpy
  so torchvision is not needed.
- `list_images`, `find_dir`, `require_file`, `read_text`: on-disk checks whose errors name the path
  and the layout expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, check_int
from .base import DataError, class_balanced_indices, folder_problem, seeded, split_counts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class ImageTransform:
    """PIL RGB image -> normalised float32 tensor (3, crop, crop).

    Resizes so the shorter side is `resize` px (bilinear, aspect ratio kept), then takes
    the centre `crop` x `crop` square, as torchvision's Resize(resize) + CenterCrop(crop)
    do. `resize=None` skips the resize (ImageNet-C images are already 224 x 224).
    Deterministic: no augmentation, so cached activations stay valid. A class rather than
    a closure so DataLoader workers can pickle it.
    """

    def __init__(self, resize: int | None = 256, crop: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        check_int("crop", crop)  # (what --data crop=0 or -32 would hand to PIL)
        if resize is not None and check_int("resize", resize) < crop:
            raise ConfigError(f"resize must be at least crop ({crop}), got {resize}")
        self.resize, self.crop = resize, crop
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image
        w, h = image.size
        if self.resize is not None and min(w, h) != self.resize:
            # the longer side is truncated exactly as torchvision's Resize does
            size = ((self.resize, int(self.resize * h / w)) if w <= h
                    else (int(self.resize * w / h), self.resize))
            image = image.resize(size, Image.BILINEAR)
            w, h = image.size
        if min(w, h) < self.crop:
            raise DataError(f"image of {w}x{h} px is smaller than the {self.crop}-px crop "
                            f"(resize={self.resize})")
        left = int(round((w - self.crop) / 2.0))
        top = int(round((h - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((x - self.mean) / self.std)

    def __repr__(self) -> str:
        return f"ImageTransform(resize={self.resize}, crop={self.crop})"


def find_dir(data_dir, names: Sequence[str], marker: str, layout: str, what: str) -> Path:
    """The first of `data_dir`, `data_dir/<name>` that contains `marker`.

    Lets users point --data-dir either at the dataset folder itself or at its parent.
    Raises DataError quoting `layout` when none does, or when data_dir is None.
    """
    if data_dir is None:
        raise DataError(f"{what}: no data directory given; pass --data-dir pointing at:\n{layout}")
    root = Path(data_dir).expanduser()
    problem = folder_problem(root)
    if problem:
        raise DataError(f"{what}: data directory {root} {problem}; expected:\n{layout}")
    for candidate in [root] + [root / name for name in names]:
        if (candidate / marker).exists():
            return candidate
    tried = ", ".join(str(c / marker) for c in [root] + [root / n for n in names])
    raise DataError(f"{what}: {marker} not found (tried {tried}); expected:\n{layout}")


def require_file(path: Path, layout: str, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: missing file {path}; expected:\n{layout}")
    return path


def read_text(path: Path, layout: str, what: str) -> str:
    """The text of a dataset's metadata file (UTF-8; a leading BOM dropped), a DataError
    when it is missing or not text: another download saved under its name, or a damaged
    copy, must not end in a UnicodeDecodeError traceback."""
    require_file(path, layout, what)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{what}: {path} is not a text file (byte {err.start} is not UTF-8); "
                        f"the file may be corrupt or another file saved under its name. "
                        f"Expected:\n{layout}") from None


def list_images(folder: Path, layout: str, what: str) -> list[Path]:
    """Sorted image files (.JPEG/.jpg/.png, any case) directly inside `folder`.

    Raises DataError when the folder is missing or holds no image.
    """
    if not folder.is_dir():
        raise DataError(f"{what}: missing folder {folder}; expected:\n{layout}")
    with os.scandir(folder) as entries:  # d_type from the directory: no stat per file
        files = sorted(Path(e.path) for e in entries
                       if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())
    if not files:
        raise DataError(f"{what}: no image files (.JPEG/.jpg/.png) in {folder}; expected:\n{layout}")
    return files


def check_all_classes(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """Every class in [0, num_classes) occurs (a clearer message than a draw that comes up short)."""
    counts = torch.bincount(labels, minlength=num_classes)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        raise DataError(f"{what}: no example of class(es) {missing}")


def draw_group_splits(groups: torch.Tensor, partition: torch.Tensor, n_target: int,
                      val_per_class: int, test_per_class: int, seed: int, what: str,
                      target_partition: int = 1,
                      test_partition: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-balanced target draws for a benchmark with 2 classes x 2 spurious values.

    Args:
        groups: int64 (n,), group = 2 * label + spurious attribute, in 0..3.
        partition: int64 (n,), the dataset's official split of each example (0/1/2 =
            train/val/test).
        n_target: training images from `target_partition`, spread evenly over the 4 groups.
        val_per_class: validation images per class from the rest of `target_partition`,
            half from each of the class's two groups.
        test_per_class: test images per class from `test_partition`, half per group;
            0 = every image of `test_partition`.
    Returns: disjoint int64 index tensors (train, val, test) into `groups`.
    """
    check_int("n_target", n_target)
    check_int("val_per_class", val_per_class)
    check_int("test_per_class", test_per_class, minimum=0)  # 0: every test image
    g = seeded(seed)
    target_pool = partition == target_partition
    test_pool = partition == test_partition
    check_all_classes(groups[target_pool], 4, f"{what} (groups of split {target_partition})")
    # Drawn test, val, then train (as `draw_splits`): a seed's test and validation images
    # do not depend on n_target, and its training sets are nested as n_target grows.
    if test_per_class == 0:
        test = torch.nonzero(test_pool).flatten()
    else:
        check_all_classes(groups[test_pool], 4, f"{what} (groups of split {test_partition})")
        test = class_balanced_indices(groups, split_counts(test_per_class, 2) * 2, g,
                                      exclude=~test_pool, what=f"{what} (test split, per group)")
    used = ~target_pool
    per_group = split_counts(val_per_class, 2) * 2  # group 2y + s gets the s-th share
    val = class_balanced_indices(groups, per_group, g, exclude=used,
                                 what=f"{what} (val split, per group)")
    used[val] = True
    train = class_balanced_indices(groups, split_counts(n_target, 4), g, exclude=used,
                                   what=f"{what} (train split, per group)")
    return train, val, test
