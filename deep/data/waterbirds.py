"""Waterbirds (Sagawa et al., 2020): bird type with a spurious background.

CUB bird photographs pasted on Places backgrounds. Label y: 0 landbird, 1 waterbird;
spurious attribute place: 0 land, 1 water; group = 2 * y + place. In the official
training split 95% of the birds sit on their matching background; in validation and test
the background is independent of the label. Average and worst-group accuracy are reported.

Source (the pretrained model's data): the training split (split 0).
Target: the paper tunes on a small labelled set in which the spurious correlation does
not hold. We draw it, group balanced, from the validation split (split 1), as DFR
(Kirichenko et al., 2022, which the paper cites) does; validation draws come from the rest
of split 1 and the test set is split 2 (all of it by default). We did not find the
paper's exact target-set recipe for this benchmark (the public code covers only the
CIFAR-10-C and ImageNet-C experiments), so treat the sizes as ours.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from .base import Benchmark, DataError, ShiftTask, SourceData, file_split
from .images import (IMAGENET_MEAN, IMAGENET_STD, ImageTransform, draw_group_splits, find_dir,
                     read_text)

COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
GROUP_NAMES = ("landbird_land", "landbird_water", "waterbird_land", "waterbird_water")

LAYOUT = """\
Waterbirds (https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz),
extracted:
  <data-dir>/waterbird_complete95_forest2water2/   (or <data-dir> itself)
    metadata.csv      columns img_id,img_filename,y,split,place,place_filename
                      y 0/1 = landbird/waterbird, place 0/1 = land/water,
                      split 0/1/2 = train/val/test
    <img_filename>    e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"""


def read_metadata(data_dir) -> tuple[Path, list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dataset folder, image files, y, place, split), one entry per row."""
    root = find_dir(data_dir, ["waterbird_complete95_forest2water2"], "metadata.csv", LAYOUT,
                    "waterbirds")
    path = root / "metadata.csv"
    with io.StringIO(read_text(path, LAYOUT, "waterbirds"), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"waterbirds: {path} lacks column(s) {missing}; header is "
                            f"{reader.fieldnames}; expected:\n{LAYOUT}")
        files, values, first_line = [], [], {}
        for line, row in enumerate(reader, 2):
            if None in row.values():   # csv fills a short row's missing columns with None
                raise DataError(f"waterbirds: line {line} of {path} has fewer fields than the "
                                f"header's {len(reader.fieldnames)}; the file may be truncated "
                                f"(an interrupted download or copy)")
            try:
                v = (int(row["y"]), int(row["place"]), int(row["split"]))
            except (TypeError, ValueError):
                raise DataError(f"waterbirds: line {line} of {path}: y, place and split must be "
                                f"integers, got {row['y']!r}, {row['place']!r}, "
                                f"{row['split']!r}") from None
            if v[0] not in (0, 1) or v[1] not in (0, 1) or v[2] not in (0, 1, 2):
                raise DataError(f"waterbirds: line {line} of {path}: y and place must be 0/1 "
                                f"and split 0/1/2, got y={v[0]} place={v[1]} split={v[2]}")
            if not row["img_filename"]:
                raise DataError(f"waterbirds: line {line} of {path}: empty img_filename")
            if row["img_filename"] in first_line:   # could be drawn into two splits at once
                raise DataError(f"waterbirds: line {line} of {path} lists "
                                f"{row['img_filename']} again (first on line "
                                f"{first_line[row['img_filename']]}); each image is one row")
            first_line[row["img_filename"]] = line
            files.append(row["img_filename"])
            values.append(v)
    if not values:
        raise DataError(f"waterbirds: {path} has no rows")
    y, place, split = torch.tensor(values, dtype=torch.int64).unbind(1)
    return root, files, y, place, split


def load_waterbirds(data_dir, shift: str, n_target: int, val_per_class: int,
                    test_per_class: int, seed: int, resize: int | None = 256, crop: int = 224,
                    num_workers: int = 0) -> ShiftTask:
    """Target task (shift "group-balanced"): train/val from split 1, test from split 2.

    n_target is spread evenly over the 4 groups, val_per_class (and test_per_class,
    0 = the whole test split) evenly over each class's 2 groups.
    """
    BENCHMARKS["waterbirds"].check_shifts(shift)
    root, files, y, place, split = read_metadata(data_dir)
    groups = 2 * y + place
    idx = draw_group_splits(groups, split, n_target, val_per_class, test_per_class, seed,
                            "waterbirds")
    transform = ImageTransform(resize=resize, crop=crop)
    splits = [file_split(root, files, y, groups, part, transform, num_workers,
                         f"waterbirds/{name}", "metadata.csv", LAYOUT)
              for name, part in zip(("train", "val", "test"), idx)]
    return ShiftTask("waterbirds", shift, 2, *splits, group_names=GROUP_NAMES)


def load_waterbirds_source(data_dir, resize: int | None = 256, crop: int = 224,
                           num_workers: int = 0) -> SourceData:
    """The official training split (split 0) and test split (split 2), with groups."""
    root, files, y, place, split = read_metadata(data_dir)
    groups = 2 * y + place
    transform = ImageTransform(resize=resize, crop=crop)
    train, test = (file_split(root, files, y, groups, torch.nonzero(split == s).flatten(),
                              transform, num_workers, f"waterbirds/source-{name}",
                              "metadata.csv", LAYOUT)
                   for s, name in ((0, "train"), (2, "test")))
    if len(train) == 0 or len(test) == 0:
        raise DataError("waterbirds: metadata.csv has no rows with split 0 (train) or 2 (test)")
    return SourceData("waterbirds", 2, 3, train, test)


BENCHMARKS = {
    "waterbirds": Benchmark(name="waterbirds", shifts=("group-balanced",), num_classes=2,
                            in_channels=3, layout=LAYOUT, load_task=load_waterbirds,
                            load_source=load_waterbirds_source, has_groups=True,
                            normalization=(IMAGENET_MEAN, IMAGENET_STD)),
}
