"""CelebA (Liu et al., 2015) as a spurious-correlation benchmark: hair colour vs gender.

Label: Blond_Hair (0 not blond, 1 blond); spurious attribute: Male (0 female, 1 male);
group = 2 * label + male. Blond men are rare (about 1% of the training split), so a model
trained on the source split leans on gender. Average and worst-group accuracy are reported.

Source: the official training partition (0). Target: a small group-balanced set from the
validation partition (1), validation draws from the rest of partition 1, test = partition
2 (all of it by default) -- the same construction as for Waterbirds, following DFR
(Kirichenko et al., 2022). The paper's exact target-set sizes for CelebA were not found
(its public code covers only CIFAR-10-C and ImageNet-C); treat ours as a choice.

Images (178 x 218) are resized so the shorter side is 224 and centre-cropped to 224,
which matches the usual CenterCrop(178) + Resize(224) up to interpolation order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .base import Benchmark, DataError, ShiftTask, SourceData, file_split
from .images import (IMAGENET_MEAN, IMAGENET_STD, ImageTransform, draw_group_splits, find_dir,
                     read_text)

NUM_ATTRIBUTES = 40
GROUP_NAMES = ("not_blond_female", "not_blond_male", "blond_female", "blond_male")

LAYOUT = """\
CelebA (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html: Img/img_align_celeba.zip,
Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt), arranged as:
  <data-dir>/celeba/   (or <data-dir> itself; the layout torchvision uses)
    img_align_celeba/000001.jpg ...        the aligned and cropped JPEGs
    list_attr_celeba.txt                   line 1: number of images; line 2: the 40
                                           attribute names; then '<file> <40 values +1/-1>'
    list_eval_partition.txt                '<file> <0|1|2>' (train/val/test)"""


def read_attributes(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """Returns (attribute names, file names, int64 (n, 40) values in {-1, +1})."""
    lines = read_text(path, LAYOUT, "celeba").splitlines()
    if len(lines) < 2:
        raise DataError(f"celeba: {path} must start with a count line and an attribute-name line")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataError(f"celeba: line 1 of {path} must be the number of images, "
                        f"got {lines[0]!r}") from None
    names = lines[1].split()
    if len(names) != NUM_ATTRIBUTES:
        raise DataError(f"celeba: line 2 of {path} must name {NUM_ATTRIBUTES} attributes, "
                        f"got {len(names)}")
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != count:
        raise DataError(f"celeba: {path} announces {count} images on line 1 but lists "
                        f"{len(rows)}; the file may be truncated")
    for number, fields in enumerate(rows, 3):
        if len(fields) != NUM_ATTRIBUTES + 1:
            raise DataError(f"celeba: line {number} of {path} must hold a file name and "
                            f"{NUM_ATTRIBUTES} values, got {len(fields)} fields")
    # one parse of all values (a Python loop over 8 M strings takes seconds); numpy only
    # warns, and stops, at a value that is not an integer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            flat = np.fromstring(" ".join(" ".join(f[1:]) for f in rows), dtype=np.int64,
                                 sep=" ")
        except (ValueError, DeprecationWarning):
            flat = np.empty(0)
    if flat.size != count * NUM_ATTRIBUTES:
        raise DataError(f"celeba: {path} holds a non-integer attribute value")
    table = torch.from_numpy(flat.reshape(count, NUM_ATTRIBUTES))
    files = [f[0] for f in rows]
    if len(set(files)) != len(files):      # the image would be drawn twice
        seen: set[str] = set()
        repeated = next(f for f in files if f in seen or seen.add(f))
        raise DataError(f"celeba: {path} lists {repeated} more than once "
                        f"(line {files.index(repeated, files.index(repeated) + 1) + 3})")
    if ((table != 1) & (table != -1)).any():
        bad = int(torch.nonzero((table != 1) & (table != -1))[0, 0]) + 3
        raise DataError(f"celeba: attribute values in {path} must be +1 or -1 (line {bad})")
    return names, files, table


def read_partition(path: Path, files: list[str]) -> torch.Tensor:
    """The official partition (0/1/2) of each file, in the order of `files`."""
    partition = {}
    for number, line in enumerate(read_text(path, LAYOUT, "celeba").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"celeba: line {number} of {path} must be '<file> <0|1|2>', "
                            f"got {line!r}")
        if fields[0] in partition:   # which of its two partitions holds the image?
            raise DataError(f"celeba: line {number} of {path} lists {fields[0]} a second time")
        partition[fields[0]] = int(fields[1])
    missing = [f for f in files if f not in partition]
    if missing:
        raise DataError(f"celeba: {len(missing)} image(s) of list_attr_celeba.txt have no "
                        f"partition in {path}, e.g. {missing[0]}")
    return torch.tensor([partition[f] for f in files], dtype=torch.int64)


def read_celeba(data_dir, target_attribute: str, spurious_attribute: str):
    """Returns (image folder, files, label, spurious, partition) for every image."""
    root = find_dir(data_dir, ["celeba"], "list_attr_celeba.txt", LAYOUT, "celeba")
    names, files, table = read_attributes(root / "list_attr_celeba.txt")
    for attribute in (target_attribute, spurious_attribute):
        if attribute not in names:
            raise ConfigError(f"unknown CelebA attribute {attribute!r}; known: {', '.join(names)}")
    partition = read_partition(root / "list_eval_partition.txt", files)
    label = (table[:, names.index(target_attribute)] == 1).long()
    spurious = (table[:, names.index(spurious_attribute)] == 1).long()
    image_dir = root / "img_align_celeba"
    if not image_dir.is_dir():
        raise DataError(f"celeba: missing image folder {image_dir}; expected:\n{LAYOUT}")
    return image_dir, files, label, spurious, partition


def load_celeba(data_dir, shift: str, n_target: int, val_per_class: int, test_per_class: int,
                seed: int, target_attribute: str = "Blond_Hair", spurious_attribute: str = "Male",
                resize: int | None = 224, crop: int = 224, num_workers: int = 0) -> ShiftTask:
    """Target task (shift "group-balanced"): train/val from partition 1, test from 2."""
    BENCHMARKS["celeba"].check_shifts(shift)
    image_dir, files, label, spurious, partition = read_celeba(
        data_dir, target_attribute, spurious_attribute)
    groups = 2 * label + spurious
    idx = draw_group_splits(groups, partition, n_target, val_per_class, test_per_class, seed,
                            "celeba")
    transform = ImageTransform(resize=resize, crop=crop)
    splits = [file_split(image_dir, files, label, groups, part, transform, num_workers,
                         f"celeba/{name}", "list_attr_celeba.txt", LAYOUT)
              for name, part in zip(("train", "val", "test"), idx)]
    names = GROUP_NAMES if (target_attribute, spurious_attribute) == ("Blond_Hair", "Male") else \
        tuple(f"{target_attribute}={a}_{spurious_attribute}={b}" for a in (0, 1) for b in (0, 1))
    return ShiftTask("celeba", shift, 2, *splits, group_names=names)


def load_celeba_source(data_dir, target_attribute: str = "Blond_Hair",
                       spurious_attribute: str = "Male", resize: int | None = 224,
                       crop: int = 224, num_workers: int = 0) -> SourceData:
    """The official training partition (0) and test partition (2), with groups."""
    image_dir, files, label, spurious, partition = read_celeba(
        data_dir, target_attribute, spurious_attribute)
    groups = 2 * label + spurious
    transform = ImageTransform(resize=resize, crop=crop)
    train, test = (file_split(image_dir, files, label, groups,
                              torch.nonzero(partition == p).flatten(), transform, num_workers,
                              f"celeba/source-{name}", "list_attr_celeba.txt", LAYOUT)
                   for p, name in ((0, "train"), (2, "test")))
    if len(train) == 0 or len(test) == 0:
        raise DataError("celeba: list_eval_partition.txt has no image in partition 0 or 2")
    return SourceData("celeba", 2, 3, train, test)


BENCHMARKS = {
    "celeba": Benchmark(name="celeba", shifts=("group-balanced",), num_classes=2, in_channels=3,
                        layout=LAYOUT, load_task=load_celeba, load_source=load_celeba_source,
                        has_groups=True, normalization=(IMAGENET_MEAN, IMAGENET_STD)),
}
