"""ImageNet-C (Hendrycks & Dietterich, 2019) as a target for an ImageNet ResNet-50.

On disk, one folder of JPEGs per (corruption, severity, class): 50 images of each of the
1,000 classes (the corrupted ImageNet validation set), already resized and centre-cropped
to 224 x 224. Class indices are the positions of the wnids in sorted order, the standard
ImageNet order that torchvision-layout ResNet-50 weights predict (as ImageFolder does).

Target splits follow the public reference code: n_target class-balanced training images
(5,000 = 5 per class), then 10 per class for validation and 10 per class for test,
disjoint, from one corruption at severity 5.

The real dataset has 1,000 class folders and the loader insists on them: with fewer, the
class indices would not be ImageNet's. `expected_classes` lowers that bar for subsets
and fixtures only; labels are then positions among the wnids present.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .base import Benchmark, DataError, FileSplit, ShiftTask
from .images import ImageTransform, draw_splits, find_dir, list_images

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")
EXTRA_CORRUPTIONS = ("gaussian_blur", "saturate", "spatter", "speckle_noise")
# the download's tar files (noise.tar, blur.tar, ...) name these groups; some users keep them
GROUPS = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
          "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
          "weather": ("snow", "frost", "fog", "brightness", "spatter"),
          "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate")}
NUM_CLASSES = 1000
WNID = re.compile(r"^n\d{8}$")

LAYOUT = """\
ImageNet-C (https://zenodo.org/record/2235448: blur.tar, digital.tar, noise.tar,
weather.tar, extra.tar), extracted into one folder:
  <data-dir>/ImageNet-C/   (or <data-dir> itself)
    <corruption>/<severity>/<wnid>/*.JPEG      e.g. fog/5/n01440764/ILSVRC2012_val_00000293.JPEG
  (<data-dir>/<group>/<corruption>/... with group = noise|blur|weather|digital|extra also works)
  1000 wnid folders per severity, 50 JPEGs (224x224) each; severities 1..5
  corruptions: """ + ", ".join(CORRUPTIONS + EXTRA_CORRUPTIONS)


def corruption_dir(data_dir, corruption: str) -> Path:
    """The folder holding `<severity>/<wnid>/` for `corruption`."""
    if corruption not in CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise ValueError(f"unknown ImageNet-C corruption {corruption!r}; known: "
                         f"{', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)}")
    group = next((g for g, members in GROUPS.items() if corruption in members), "extra")
    names = ["ImageNet-C", f"ImageNet-C/{group}", group, "extra", "ImageNet-C/extra"]
    return find_dir(data_dir, names, corruption, LAYOUT, f"imagenet-c/{corruption}") / corruption


def read_imagenet_c(data_dir, corruption: str, severity: int = 5,
                    expected_classes: int = NUM_CLASSES) -> tuple[list[Path], torch.Tensor, list[str]]:
    """All image paths of one corruption and severity, their labels and the sorted wnids."""
    what = f"imagenet-c/{corruption}/{severity}"
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    folder = corruption_dir(data_dir, corruption) / str(severity)
    if not folder.is_dir():
        raise DataError(f"{what}: missing folder {folder}; expected:\n{LAYOUT}")
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir() and WNID.match(p.name))
    if len(wnids) != expected_classes:
        raise DataError(f"{what}: found {len(wnids)} class folders (n########) in {folder}, "
                        f"expected {expected_classes}. Class indices are only ImageNet's when "
                        f"all 1000 are present (set the data option expected_classes only for "
                        f"a deliberate subset). Expected:\n{LAYOUT}")
    paths, labels = [], []
    for index, wnid in enumerate(wnids):
        files = list_images(folder / wnid, LAYOUT, what)
        paths += files
        labels += [index] * len(files)
    return paths, torch.tensor(labels, dtype=torch.int64), wnids


def load_imagenet_c(data_dir, shift: str, n_target: int, val_per_class: int,
                    test_per_class: int, seed: int, severity: int = 5,
                    expected_classes: int = NUM_CLASSES, resize: int | None = None,
                    crop: int = 224, num_workers: int = 0) -> ShiftTask:
    """ImageNet-C target task for one corruption (`shift`).

    `resize=None` keeps the stored 224-px images as they are (the reference code only
    converts them to tensors); the ImageNet mean/std normalisation matches torchvision
    ResNet-50 weights.
    """
    paths, labels, wnids = read_imagenet_c(data_dir, shift, severity, expected_classes)
    num_classes = len(wnids)
    idx = draw_splits(labels, num_classes, n_target, val_per_class, test_per_class, seed,
                      f"imagenet-c/{shift}")
    transform = ImageTransform(resize=resize, crop=crop)
    splits = [FileSplit([paths[i] for i in part.tolist()], labels[part], None, transform,
                        num_workers=num_workers, name=f"imagenet-c/{shift}/{name}")
              for name, part in zip(("train", "val", "test"), idx)]
    return ShiftTask("imagenet-c", shift, num_classes, *splits)


BENCHMARKS = {
    "imagenet-c": Benchmark(
        name="imagenet-c", shifts=CORRUPTIONS + EXTRA_CORRUPTIONS, num_classes=NUM_CLASSES,
        in_channels=3, layout=LAYOUT, load_task=load_imagenet_c, load_source=None),
}
