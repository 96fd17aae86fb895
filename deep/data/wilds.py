"""WILDS Camelyon17 and FMoW, read from the layouts the `wilds` package downloads.

The `wilds` package itself is not needed (it requires torchvision): the metadata CSVs are
read here with the split rules of its dataset classes (camelyon17_dataset.py,
fmow_dataset.py), stated below.

Camelyon17-WILDS (v1.0): 96 x 96 histopathology patches, label `tumor` (0/1), from
5 hospitals (`center` 0..4). Centers 0, 3, 4 form the training split (`split` 0) and the
in-distribution validation split (`split` 1); every patch of center 1 is the OOD
validation split, every patch of center 2 the OOD test split. Metric: average accuracy.

FMoW-WILDS (v1.1): 224 x 224 satellite images, 62 land-use classes. Rows with split
`seq` are dropped; image `images/rgb_img_{i}.png` belongs to row i of rgb_metadata.csv
(counted with the `seq` rows). Split by time (UTC timestamps): before 2013 are the
train / ID val / ID test splits (the row's `split`), rows of split `val` from 2013-2015
the OOD validation split, rows of split `test` from 2016 on the OOD test split. Region:
`country_code` mapped through country_code_mapping.csv (`alpha-3` -> `region`), "Other"
when a code is not there. Metric: worst-region accuracy, "Other" excluded.

Target tasks (shift = the WILDS split the target is drawn from): "ood-test" (Camelyon17
hospital 2; FMoW 2016 and later) and "ood-val" (hospital 1; FMoW 2013-2015). From that
split a seeded draw takes the test set (test_per_class per class; 0 = every image left
after the validation and training draws), then the validation set, then the n_target
training images, all disjoint, as the paper's benchmarks adapt to the distribution they
are tested on. Camelyon17 draws are class balanced. FMoW's 62 classes are far from
balanced in a split, so its draws are uniform over the split: val_per_class x 62
validation images (the total of a balanced draw), likewise for the test set and n_target.
Regions are the splits' groups (`Split.groups`), "Other" as group -1, which counts in
the average and in no group, so worst-group accuracy is WILDS' worst-region accuracy
and `select = "worst_group_val_acc"` selects by it.

Source data (pretraining the source model, e.g. fine-tuning CLIP): the training split,
tested on the in-distribution validation split.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..errors import check_int
from ..models.vit import CLIP_MEAN, CLIP_STD
from .base import (Benchmark, DataError, FileSplit, Normalization, ShiftTask, SourceData,
                   class_balanced_indices, file_split, mean_std, seeded, split_counts)
from .images import ImageTransform, find_dir, require_file

SHIFTS = ("ood-test", "ood-val")
CAMELYON_VERSION = "1.0"
FMOW_VERSION = "1.1"
# The loaders' default (CLIP's), which each benchmark declares as its own.
NORMALIZATION = (CLIP_MEAN, CLIP_STD)
CAMELYON_COLUMNS = ("patient", "node", "x_coord", "y_coord", "tumor", "slide", "center",
                    "split")
FMOW_COLUMNS = ("split", "category", "country_code", "timestamp")
FMOW_SPLITS = ("train", "val", "test", "seq")
# The order of WILDS' `categories` list: class index = position.
FMOW_CATEGORIES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility",
    "park", "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison",
    "race_track", "railway_bridge", "recreational_facility", "road_bridge", "runway",
    "shipyard", "shopping_mall", "single-unit_residential", "smokestack", "solar_farm",
    "space_facility", "stadium", "storage_tank", "surface_mine", "swimming_pool", "toll_booth",
    "tower", "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo")
REGIONS = ("Asia", "Europe", "Africa", "Americas", "Oceania")  # group index = position
OTHER_REGION = "Other"  # group -1: in the average, in no group
OOD_VAL_YEAR, OOD_TEST_YEAR = 2013, 2016

CAMELYON_LAYOUT = f"""\
Camelyon17-WILDS v{CAMELYON_VERSION} (as `wilds` downloads it, or
https://worksheets.codalab.org/bundles/0xe45e15f39fb54e9d9e919556af67aabe), extracted:
  <data-dir>/camelyon17_v{CAMELYON_VERSION}/   (or <data-dir> itself)
    RELEASE_v{CAMELYON_VERSION}.txt     WILDS' version file (in the archive)
    metadata.csv         an unnamed index column, then
                         patient,node,x_coord,y_coord,tumor,slide,center,split
    patches/patient_<P>_node_<N>/patch_patient_<P>_node_<N>_x_<X>_y_<Y>.png   (96 x 96)"""

FMOW_LAYOUT = f"""\
FMoW-WILDS v{FMOW_VERSION} (as `wilds` downloads it, or
https://worksheets.codalab.org/bundles/0xaec91eb7c9d548ebb15e1b5e60f966ab), extracted:
  <data-dir>/fmow_v{FMOW_VERSION}/   (or <data-dir> itself)
    RELEASE_v{FMOW_VERSION}.txt          WILDS' version file (in the archive)
    rgb_metadata.csv          split,img_filename,img_path,spatial_reference,epsg,category,
                              visible,img_width,img_height,country_code,cloud_cover,
                              timestamp,lat,lon (split train/val/test/seq)
    country_code_mapping.csv  alpha-3 -> region (and other columns)
    images/rgb_img_<i>.png    224 x 224, i = the row of rgb_metadata.csv (from 0)"""


@dataclass
class Table:
    """One WILDS dataset as tensors: a file, a label and the WILDS split of every example."""

    root: Path
    files: list[str]          # image paths relative to root
    labels: torch.Tensor      # int64 (n,)
    splits: dict[str, torch.Tensor]  # WILDS split name -> bool mask (n,)
    groups: torch.Tensor | None = None  # int64 (n,), -1 = in no group


def dataset_root(data_dir, name: str, version: str, marker: str, layout: str) -> Path:
    """The dataset folder, which must hold `marker` and WILDS' RELEASE file."""
    root = find_dir(data_dir, [f"{name}_v{version}"], marker, layout, name)
    release = root / f"RELEASE_v{version}.txt"
    if not release.is_file():
        # The archive ships this file and `wilds` takes its presence for "downloaded";
        # its absence means another version or an extraction that did not get that far.
        raise DataError(f"{name}: {release} is missing: the download is incomplete or of "
                        f"another version (the v{version} archive holds it); "
                        f"expected:\n{layout}")
    return root


def _check_header(reader: csv.DictReader, path: Path, columns, layout: str, what: str) -> None:
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{what}: {path} lacks column(s) {missing}; header is "
                        f"{reader.fieldnames}; expected:\n{layout}")


# --- Camelyon17 -------------------------------------------------------------------

def read_camelyon17(data_dir) -> Table:
    root = dataset_root(data_dir, "camelyon17", CAMELYON_VERSION, "metadata.csv",
                        CAMELYON_LAYOUT)
    path = root / "metadata.csv"
    files, values = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM is not part of a name
        reader = csv.DictReader(f)
        _check_header(reader, path, CAMELYON_COLUMNS, CAMELYON_LAYOUT, "camelyon17")
        for line, row in enumerate(reader, 2):
            files.append(_camelyon_row(row, line, path, values))
    if not files:
        raise DataError(f"camelyon17: {path} has no rows")
    tumor, center, split = torch.tensor(values, dtype=torch.int64).unbind(1)
    training_centers = (center == 0) | (center == 3) | (center == 4)
    masks = {"train": training_centers & (split == 0), "id_val": training_centers & (split == 1),
             "val": center == 1, "test": center == 2}
    return Table(root, files, tumor, masks)


def _camelyon_row(row: dict, line: int, path: Path, values: list) -> str:
    """Validate one metadata row, append (tumor, center, split), return its image path."""
    try:
        tumor, center, split = (int(row[k]) for k in ("tumor", "center", "split"))
        x, y = int(row["x_coord"]), int(row["y_coord"])
    except (TypeError, ValueError):
        raise DataError(f"camelyon17: line {line} of {path}: tumor, center, split, x_coord and "
                        f"y_coord must be integers, got {row}") from None
    if tumor not in (0, 1) or center not in range(5) or split not in (0, 1):
        raise DataError(f"camelyon17: line {line} of {path}: tumor must be 0/1, center 0..4 and "
                        f"split 0/1, got tumor={tumor} center={center} split={split}")
    patient, node = row["patient"], row["node"]
    if not patient or not node:
        raise DataError(f"camelyon17: line {line} of {path}: empty patient or node")
    values.append((tumor, center, split))
    # the file names keep the patient's zero padding ("004"), as WILDS reads it as a string
    return (f"patches/patient_{patient}_node_{node}/"
            f"patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png")


# --- FMoW -------------------------------------------------------------------------

def read_regions(path: Path) -> dict[str, str]:
    """country_code_mapping.csv: alpha-3 country code -> region (one of REGIONS, or
    OTHER_REGION; a blank region, as Antarctica's, is "Other" too). Another name is
    refused: it would put its countries in no region, out of the worst-region accuracy."""
    require_file(path, FMOW_LAYOUT, "fmow")
    with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM is not part of a name
        reader = csv.DictReader(f)
        _check_header(reader, path, ("alpha-3", "region"), FMOW_LAYOUT, "fmow")
        regions = {}
        for line, row in enumerate(reader, start=2):
            region = (row["region"] or "").strip() or OTHER_REGION
            if region not in (*REGIONS, OTHER_REGION):
                raise DataError(f"fmow: line {line} of {path}: region {row['region']!r} is not "
                                f"one of WILDS' {', '.join(REGIONS)} (or {OTHER_REGION}, or "
                                f"blank)")
            regions[row["alpha-3"]] = region
        return regions


def parse_timestamp(text: str, line: int, path: Path) -> datetime:
    """An ISO 8601 timestamp as UTC (one without a zone is taken as UTC)."""
    try:
        stamp = datetime.fromisoformat(text.strip())
    except (TypeError, ValueError, AttributeError):
        raise DataError(f"fmow: line {line} of {path}: timestamp {text!r} is not ISO 8601 "
                        f"(e.g. 2015-04-10T10:31:34Z)") from None
    return stamp.replace(tzinfo=timezone.utc) if stamp.tzinfo is None \
        else stamp.astimezone(timezone.utc)


def read_fmow(data_dir) -> Table:
    root = dataset_root(data_dir, "fmow", FMOW_VERSION, "rgb_metadata.csv", FMOW_LAYOUT)
    regions = read_regions(root / "country_code_mapping.csv")
    path = root / "rgb_metadata.csv"
    category_index = {c: i for i, c in enumerate(FMOW_CATEGORIES)}
    region_index = {r: i for i, r in enumerate(REGIONS)}
    files, values = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM is not part of a name
        reader = csv.DictReader(f)
        _check_header(reader, path, FMOW_COLUMNS, FMOW_LAYOUT, "fmow")
        for row_number, row in enumerate(reader):
            line = row_number + 2
            split = row["split"]
            if split not in FMOW_SPLITS:
                raise DataError(f"fmow: line {line} of {path}: split must be one of "
                                f"{FMOW_SPLITS}, got {split!r}")
            if split == "seq":  # sequestered: no label released; keeps its image number
                continue
            if row["category"] not in category_index:
                raise DataError(f"fmow: line {line} of {path}: unknown category "
                                f"{row['category']!r} (not one of WILDS' 62)")
            year = parse_timestamp(row["timestamp"], line, path).year
            region = regions.get(row["country_code"], OTHER_REGION)
            files.append(f"images/rgb_img_{row_number}.png")
            values.append((category_index[row["category"]], region_index.get(region, -1),
                           FMOW_SPLITS.index(split), year))
    if not files:
        raise DataError(f"fmow: {path} has no labelled rows (every row is split 'seq')")
    labels, groups, split, year = torch.tensor(values, dtype=torch.int64).unbind(1)
    before = year < OOD_VAL_YEAR
    ood_val = (year >= OOD_VAL_YEAR) & (year < OOD_TEST_YEAR)
    masks = {"train": before & (split == 0), "id_val": before & (split == 1),
             "id_test": before & (split == 2), "val": ood_val & (split == 1),
             "test": (year >= OOD_TEST_YEAR) & (split == 2)}
    return Table(root, files, labels, masks, groups)


# --- drawing target sets ----------------------------------------------------------

def _uniform_indices(available: torch.Tensor, count: int, generator: torch.Generator,
                     what: str) -> torch.Tensor:
    pool = torch.nonzero(available).flatten()
    if len(pool) < count:
        raise DataError(f"{what}: {len(pool)} examples left, {count} requested")
    return pool[torch.randperm(len(pool), generator=generator)[:count]]


def draw_target(labels: torch.Tensor, pool: torch.Tensor, num_classes: int, n_target: int,
                val_per_class: int, test_per_class: int, seed: int, balanced: bool,
                what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint (train, val, test) indices from the examples where `pool` is True.

    Drawn in the order test, val, train from one generator seeded by `seed`, so the
    validation set of a seed (and a test set of test_per_class > 0) does not depend on
    n_target, and its training sets are nested as n_target grows. test_per_class 0: the
    test set is every pool example left after the validation and training draws (so it
    shrinks as n_target grows). balanced: per class (as
    `class_balanced_indices`); otherwise uniform over the pool, per-class counts times
    num_classes in total.
    """
    check_int("n_target", n_target)
    check_int("val_per_class", val_per_class)
    check_int("test_per_class", test_per_class, minimum=0)  # 0: the rest of the split
    g = seeded(seed)
    used = ~pool

    def draw(per_class: list[int], name: str) -> torch.Tensor:
        where = f"{what} ({name} split)"
        if balanced:
            picked = class_balanced_indices(labels, per_class, g, exclude=used, what=where)
        else:
            picked = _uniform_indices(~used, sum(per_class), g, where)
        used[picked] = True
        return picked

    test = draw([test_per_class] * num_classes, "test") if test_per_class else None
    val = draw([val_per_class] * num_classes, "val")
    train = draw(split_counts(n_target, num_classes), "train")
    if test is None:
        test = torch.nonzero(~used).flatten()
        if len(test) == 0:
            raise DataError(f"{what} (test split): no example left after the validation and "
                            "training draws")
    return train, val, test


# --- tasks ------------------------------------------------------------------------

def _table_split(table: Table, idx: torch.Tensor, transform, num_workers: int, name: str,
                 layout: str) -> FileSplit:
    return file_split(table.root, table.files, table.labels, table.groups, idx, transform,
                      num_workers, name, "the metadata", layout)


def _pool(table: Table, shift: str, benchmark: str) -> torch.Tensor:
    pool = table.splits["test" if shift == "ood-test" else "val"]
    if not pool.any():
        raise DataError(f"{benchmark}: the metadata has no example in the WILDS "
                        f"{'OOD test' if shift == 'ood-test' else 'OOD validation'} split")
    return pool


def _load_task(benchmark: str, table: Table, layout: str, num_classes: int, shift: str,
               n_target: int, val_per_class: int, test_per_class: int, seed: int,
               balanced: bool, resize: int | None, crop: int, num_workers: int,
               normalization: Normalization | None) -> ShiftTask:
    idx = draw_target(table.labels, _pool(table, shift, benchmark), num_classes, n_target,
                      val_per_class, test_per_class, seed, balanced, f"{benchmark}/{shift}")
    transform = _transform(resize, crop, normalization)
    splits = [_table_split(table, part, transform, num_workers, f"{benchmark}/{name}", layout)
              for name, part in zip(("train", "val", "test"), idx)]
    group_names = REGIONS if table.groups is not None else None
    return ShiftTask(benchmark, shift, num_classes, *splits, group_names=group_names)


def _transform(resize: int | None, crop: int,
               normalization: Normalization | None) -> ImageTransform:
    # CLIP's statistics unless the model declares others (deep.normalization)
    mean, std = mean_std(normalization, NORMALIZATION)
    return ImageTransform(resize=resize, crop=crop, mean=mean, std=std)


def _load_source(benchmark: str, table: Table, layout: str, num_classes: int,
                 resize: int | None, crop: int, num_workers: int,
                 normalization: Normalization | None) -> SourceData:
    transform = _transform(resize, crop, normalization)
    train, test = (_table_split(table, torch.nonzero(table.splits[s]).flatten(), transform,
                                num_workers, f"{benchmark}/source-{s}", layout)
                   for s in ("train", "id_val"))
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{benchmark}: the metadata has no example in the WILDS train or "
                        "ID validation split")
    return SourceData(benchmark, num_classes, 3, train, test)


def load_camelyon17(data_dir, shift: str, n_target: int, val_per_class: int,
                    test_per_class: int, seed: int, resize: int | None = 224, crop: int = 224,
                    num_workers: int = 0,
                    normalization: Normalization | None = None) -> ShiftTask:
    """Target task from hospital 2 ("ood-test") or 1 ("ood-val"), class balanced.
    The 96-px patches are upsampled to `resize` (bilinear), then centre-cropped;
    `normalization` (mean, std): CLIP's when None."""
    BENCHMARKS["camelyon17"].check_shifts(shift)
    return _load_task("camelyon17", read_camelyon17(data_dir), CAMELYON_LAYOUT, 2, shift,
                      n_target, val_per_class, test_per_class, seed, True, resize, crop,
                      num_workers, normalization)


def load_camelyon17_source(data_dir, resize: int | None = 224, crop: int = 224,
                           num_workers: int = 0,
                           normalization: Normalization | None = None) -> SourceData:
    return _load_source("camelyon17", read_camelyon17(data_dir), CAMELYON_LAYOUT, 2, resize,
                        crop, num_workers, normalization)


def load_fmow(data_dir, shift: str, n_target: int, val_per_class: int, test_per_class: int,
              seed: int, resize: int | None = 224, crop: int = 224,
              num_workers: int = 0, normalization: Normalization | None = None) -> ShiftTask:
    """Target task from 2016 on ("ood-test") or 2013-2015 ("ood-val"), uniform draws,
    regions as groups; `normalization` (mean, std): CLIP's when None."""
    BENCHMARKS["fmow"].check_shifts(shift)
    return _load_task("fmow", read_fmow(data_dir), FMOW_LAYOUT, len(FMOW_CATEGORIES), shift,
                      n_target, val_per_class, test_per_class, seed, False, resize, crop,
                      num_workers, normalization)


def load_fmow_source(data_dir, resize: int | None = 224, crop: int = 224,
                     num_workers: int = 0,
                     normalization: Normalization | None = None) -> SourceData:
    return _load_source("fmow", read_fmow(data_dir), FMOW_LAYOUT, len(FMOW_CATEGORIES), resize,
                        crop, num_workers, normalization)


BENCHMARKS = {
    "camelyon17": Benchmark(name="camelyon17", shifts=SHIFTS, num_classes=2, in_channels=3,
                            layout=CAMELYON_LAYOUT, load_task=load_camelyon17,
                            load_source=load_camelyon17_source, has_groups=False,
                            normalization=NORMALIZATION),
    "fmow": Benchmark(name="fmow", shifts=SHIFTS, num_classes=len(FMOW_CATEGORIES),
                      in_channels=3, layout=FMOW_LAYOUT, load_task=load_fmow,
                      load_source=load_fmow_source, has_groups=True,
                      normalization=NORMALIZATION),
}
