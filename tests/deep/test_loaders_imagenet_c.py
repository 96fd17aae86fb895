"""ImageNet-C on a fixture tree `ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG`."""

import shutil
from collections import Counter

import pytest
import torch

from deep.data import DataError, get_benchmark
from deep.data.images import IMAGENET_MEAN, IMAGENET_STD
from deep.data.imagenet_c import IMAGENET_WNIDS, read_imagenet_c
from deep.errors import ConfigError
from tests.deep.fixtures import writers

WNIDS = writers.IMAGENET_C_WNIDS
INDEX = {0: WNIDS[0], 151: WNIDS[1], 999: WNIDS[2]}  # their ImageNet class indices


@pytest.fixture
def imagenet_c(tmp_path):
    return writers.write_imagenet_c(tmp_path)


def load(data_dir, seed=0, **options):
    options.setdefault("allow_subset", True)
    return get_benchmark("imagenet-c").load_task(data_dir, "fog", n_target=6, val_per_class=1,
                                                 test_per_class=2, seed=seed, **options)


def test_standard_class_list():
    assert len(IMAGENET_WNIDS) == len(set(IMAGENET_WNIDS)) == 1000
    assert list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)
    assert {i: IMAGENET_WNIDS[i] for i in INDEX} == INDEX


def test_splits_labels_and_severity(imagenet_c):
    task = load(imagenet_c)
    assert task.num_classes == 1000, "labels are ImageNet class indices even for a subset"
    seen = []
    for split, per_class in ((task.train, 2), (task.val, 1), (task.test, 2)):
        assert Counter(split.labels.tolist()) == {c: per_class for c in INDEX}
        for path, label in zip(split.paths, split.labels.tolist()):
            parts = path.split("/")
            assert parts[-4:-1] == ["fog", "5", INDEX[label]]
        seen += split.paths
    assert len(set(seen)) == len(seen) == 15


def test_the_requested_severity_is_the_folder_read(imagenet_c):
    # Guards a loader that reads the default severity 5 whatever is asked.
    task = load(imagenet_c, severity=3)
    for split in (task.train, task.val, task.test):
        assert {path.split("/")[-3] for path in split.paths} == {"3"}


def test_images_are_decoded_to_normalised_224px(imagenet_c):
    x, y, g = next(load(imagenet_c).test.batches(6))
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32 and g is None
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((x * std + mean) * 255).mean(dim=(2, 3))
    position = {c: i for i, c in enumerate(sorted(INDEX))}  # the writer colours by position
    expected = torch.tensor([[*writers._class_color(position[int(c)])[:2], 250] for c in y],
                            dtype=torch.float32)
    assert torch.allclose(rgb, expected, atol=3), "JPEG colours within 3 levels"


def test_seed_determinism(imagenet_c):
    assert load(imagenet_c, seed=1).train.paths == load(imagenet_c, seed=1).train.paths
    assert load(imagenet_c, seed=1).train.paths != load(imagenet_c, seed=2).train.paths


def test_grouped_download_layout(imagenet_c):
    (imagenet_c / "ImageNet-C" / "weather").mkdir()
    shutil.move(imagenet_c / "ImageNet-C" / "fog", imagenet_c / "ImageNet-C" / "weather" / "fog")
    assert "/weather/fog/5/" in load(imagenet_c).train.paths[0]


# What each tar file of the download (zenodo.org/record/2235448) extracts.
DOWNLOAD = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
            "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
            "weather": ("snow", "frost", "fog", "brightness"),
            "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
            "extra": ("gaussian_blur", "saturate", "spatter", "speckle_noise")}


@pytest.mark.parametrize("tar, corruption", [(t, c) for t, cs in DOWNLOAD.items() for c in cs])
def test_every_corruption_is_found_in_the_folder_of_its_tar_file(tmp_path, tar, corruption):
    from deep.data.imagenet_c import corruption_dir
    folder = tmp_path / "ImageNet-C" / tar / corruption
    folder.mkdir(parents=True)
    assert corruption_dir(tmp_path, corruption) == folder


def test_requires_all_1000_classes_by_default(imagenet_c):
    with pytest.raises(DataError, match="found 3 class folders.*expected 1000.*allow_subset"):
        get_benchmark("imagenet-c").load_task(imagenet_c, "fog", 6, 1, 2, seed=0)


def test_folder_that_is_not_an_imagenet_class(imagenet_c):
    (imagenet_c / "ImageNet-C" / "fog" / "5" / "n99999999").mkdir()
    with pytest.raises(DataError, match="not ImageNet class wnids, e.g. 'n99999999'"):
        load(imagenet_c)


def test_missing_data_and_bad_names(tmp_path, imagenet_c):
    with pytest.raises(DataError, match="--data-dir.*\n.*ImageNet-C"):
        load(None)
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"unknown shift\(s\) \['smog'\] of imagenet-c; known: "):
        get_benchmark("imagenet-c").load_task(imagenet_c, "smog", 6, 1, 2, seed=0)
    with pytest.raises(ConfigError, match="unknown ImageNet-C corruption 'smog'"):
        read_imagenet_c(imagenet_c, "smog")
    with pytest.raises(DataError, match="snow not found"):
        get_benchmark("imagenet-c").load_task(imagenet_c, "snow", 6, 1, 2, seed=0)
    shutil.rmtree(imagenet_c / "ImageNet-C" / "fog" / "5")
    with pytest.raises(DataError, match="missing folder .*fog/5"):
        load(imagenet_c)


def test_empty_class_folder(imagenet_c):
    for f in (imagenet_c / "ImageNet-C" / "fog" / "5" / WNIDS[1]).iterdir():
        f.unlink()
    with pytest.raises(DataError, match=f"no image files .*{WNIDS[1]}"):
        load(imagenet_c)


def test_corrupt_jpeg_fails_naming_the_file(imagenet_c):
    task = load(imagenet_c)
    bad = task.train.paths[3]
    writers.corrupt_jpeg(bad)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        for _ in task.train.batches(4):
            pass


def test_one_missing_class_folder_of_1000_is_refused_and_named(tmp_path):
    """Guards the class-count check at its edge: 999 of the 1000 folders (n02085620,
    ImageNet class 151, left out) is a partial download, refused before any image is read."""
    folder = tmp_path / "ImageNet-C" / "fog" / "5"
    for wnid in IMAGENET_WNIDS:
        if wnid != "n02085620":
            (folder / wnid).mkdir(parents=True)
    with pytest.raises(DataError, match=r"found 999 class folders .*expected 1000 \(missing e\.g\. "
                                        r"n02085620\)"):
        read_imagenet_c(tmp_path, "fog")


@pytest.mark.parametrize("severity", ["5", 5.0, True, 0, 6])
def test_a_severity_that_is_not_an_integer_in_1_to_5_is_refused(imagenet_c, severity):
    """Called from Python, "5" used to end in a TypeError, 5.0 and True in a missing folder
    "5.0" / "True"; the CIFAR-10-C loader already refused them."""
    with pytest.raises(ConfigError, match="severity must be"):
        load(imagenet_c, severity=severity)


def test_stored_224px_images_are_used_as_they_are(tmp_path):
    """Guards the ImageNet-C default resize=None: the stored images are already 224 x 224,
    so each pixel is only normalised, (value / 255 - mean) / std with ImageNet's mean
    (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) written out here; a resize to 256
    and a crop back would resample them. The image is noise, so resampling shows."""
    import numpy as np
    from PIL import Image
    writers.write_imagenet_c(tmp_path, per_class=3)
    task = get_benchmark("imagenet-c").load_task(tmp_path, "fog", 3, 1, 1, seed=0,
                                                 allow_subset=True)
    path = task.test.paths[0]
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, "JPEG", quality=95)
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB"), dtype=np.float64)  # what the JPEG decodes to
    x, _, _ = next(task.test.batches(1))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((stored / 255 - mean) / std).transpose(2, 0, 1)
    assert np.allclose(x[0].numpy(), expected, atol=1e-5)


def test_a_data_dir_without_any_corruption_gets_the_loaders_own_message(tmp_path):
    """When no corruption of the run has a folder (the wrong --data-dir), the up-front
    check raises the loader's message (which paths were tried), not "N of N are missing"."""
    from deep.data.imagenet_c import check_corruption_folders
    with pytest.raises(DataError, match=r"imagenet-c/fog: fog not found \(tried "):
        check_corruption_folders(tmp_path, ["fog", "snow"])
