"""CIFAR-10-C, CIFAR-Flip and the CIFAR-10 source data on fixtures in the real layouts."""

import pickle

import numpy as np
import pytest
import torch

from deep.data import DataError, get_benchmark
from deep.data import cifar10
from deep.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, read_cifar10c
from deep.errors import ConfigError
from tests.deep.fixtures import writers


def pixels(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: float (n, 3, 32, 32) -> uint8-valued (n, 3) of pixel (0, 0)."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3)
    std = torch.tensor(CIFAR10_STD).view(1, 3)
    return torch.round((images[:, :, 0, 0] * std + mean) * 255).numpy().astype(int)


@pytest.fixture
def cifar_dir(tmp_path):
    writers.write_cifar10c(tmp_path)
    writers.write_cifar10_batches(tmp_path)
    return tmp_path


def test_cifar10c_reads_severity_5_class_balanced_disjoint(cifar_dir):
    task = get_benchmark("cifar10c").load_task(cifar_dir, "fog", n_target=20, val_per_class=1,
                                               test_per_class=1, seed=0)
    block_labels = np.load(cifar_dir / "CIFAR-10-C" / "labels.npy")[:40]
    rows = {}
    for name in ("train", "val", "test"):
        split = getattr(task, name)
        assert split.images.dtype == torch.float32 and split.images.shape[1:] == (3, 32, 32)
        px = pixels(split.images)
        assert (px[:, 0] == 200).all(), "red = 40 * severity: every image must come from severity 5"
        rows[name] = px[:, 1]
        # the label travels with its image: blue = 20 * label, and labels.npy agrees
        assert (px[:, 2] == 20 * split.labels.numpy()).all()
        assert (block_labels[px[:, 1]] == split.labels.numpy()).all()
    assert np.bincount(task.train.labels, minlength=10).tolist() == [2] * 10
    assert np.bincount(task.val.labels, minlength=10).tolist() == [1] * 10
    assert np.bincount(task.test.labels, minlength=10).tolist() == [1] * 10
    all_rows = np.concatenate(list(rows.values()))
    assert len(set(all_rows.tolist())) == len(all_rows) == 40, "splits must be disjoint"
    assert task.num_classes == 10 and task.shift == "fog" and task.group_names is None


def test_cifar10c_seed_determinism_and_severity_option(cifar_dir):
    load = get_benchmark("cifar10c").load_task
    a = load(cifar_dir, "fog", 10, 1, 2, seed=3)
    b = load(cifar_dir, "fog", 10, 1, 2, seed=3)
    c = load(cifar_dir, "fog", 10, 1, 2, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not np.array_equal(pixels(a.train.images)[:, 1], pixels(c.train.images)[:, 1])
    s1 = load(cifar_dir, "gaussian_noise", 10, 1, 2, seed=0, severity=1)
    assert (pixels(s1.train.images)[:, 0] == 40).all()


def test_cifar10c_memory_maps_the_file(cifar_dir, monkeypatch):
    calls = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)
    assert calls and all(k.get("mmap_mode") == "r" for k in calls)


def test_cifar_source_decodes_channel_major_batches(cifar_dir):
    source = get_benchmark("cifar10c").load_source(cifar_dir)
    assert source.num_classes == 10 and source.in_channels == 3
    assert source.train.images.shape == (200, 3, 32, 32) and len(source.test) == 40
    px = pixels(source.train.images)
    assert sorted(set(px[:, 0].tolist())) == [10, 20, 30, 40, 50]  # the five data batches
    assert (px[:, 2] == 20 * source.train.labels.numpy()).all()
    # the whole image, not just pixel (0, 0), carries the batch's planes
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    img = torch.round((source.test.images[7] * std + mean) * 255)
    assert (img[0] == 60).all() and (img[1] == 7).all()


def test_cifar_flip_maps_y_to_9_minus_y_from_the_test_batch(cifar_dir):
    task = get_benchmark("cifar-flip").load_task(cifar_dir, "flip", 10, 1, 2, seed=0)
    for split in (task.train, task.val, task.test):
        px = pixels(split.images)
        assert (px[:, 0] == 60).all(), "target images come from test_batch"
        assert (split.labels.numpy() == 9 - px[:, 2] // 20).all()
    rows = np.concatenate([pixels(s.images)[:, 1] for s in (task.train, task.val, task.test)])
    assert len(set(rows.tolist())) == len(rows) == 40


# ---------------------------------------------------------------- bad input

def test_no_data_dir_names_the_layout():
    with pytest.raises(DataError, match="--data-dir.*\n.*CIFAR-10-C"):
        get_benchmark("cifar10c").load_task(None, "fog", 10, 1, 1, seed=0)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        get_benchmark("cifar-flip").load_task(None, "flip", 10, 1, 1, seed=0)


def test_missing_directory_and_files(tmp_path, cifar_dir):
    with pytest.raises(DataError, match="does not exist"):
        get_benchmark("cifar10c").load_task(tmp_path / "nope", "fog", 10, 1, 1, seed=0)
    (cifar_dir / "CIFAR-10-C" / "fog.npy").unlink()
    with pytest.raises(DataError, match="missing file .*fog.npy"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)
    (cifar_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        get_benchmark("cifar10c").load_source(cifar_dir)


def test_unknown_corruption_and_severity(cifar_dir):
    with pytest.raises(ConfigError, match=r"unknown shift\(s\) \['fogg'\] of cifar10c; known: "):
        get_benchmark("cifar10c").load_task(cifar_dir, "fogg", 10, 1, 1, seed=0)
    with pytest.raises(ConfigError, match="unknown CIFAR-10-C corruption 'fogg'"):
        read_cifar10c(cifar_dir, "fogg")
    with pytest.raises(ConfigError, match="severity must be an integer in 1..5, got 6"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0, severity=6)
    # the public code's benchmark offers its own corruptions only, though the file is there
    with pytest.raises(ConfigError, match=r"\['fog'\] of cifar10c-official; known: defocus_blur"):
        get_benchmark("cifar10c-official").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)
    with pytest.raises(ConfigError, match=r"\['fogg'\] of cifar-flip; known: flip$"):
        get_benchmark("cifar-flip").load_task(cifar_dir, "fogg", 10, 1, 1, seed=0)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((200, 32, 32), np.uint8), r"uint8 of shape \(n, 32, 32, 3\)"),
    (np.zeros((200, 28, 28, 3), np.uint8), r"uint8 of shape \(n, 32, 32, 3\)"),
    (np.zeros((200, 32, 32, 3), np.float32), r"uint8 of shape \(n, 32, 32, 3\)"),
    (np.zeros((198, 32, 32, 3), np.uint8), "multiple of 5"),
])
def test_wrong_array_shape_or_dtype(cifar_dir, bad, message):
    np.save(cifar_dir / "CIFAR-10-C" / "fog.npy", bad)
    with pytest.raises(DataError, match=message):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)


def test_labels_out_of_range_or_mismatched(cifar_dir):
    path = cifar_dir / "CIFAR-10-C" / "labels.npy"
    labels = np.load(path)
    labels[-1] = 10  # in the severity-5 block
    np.save(path, labels)
    with pytest.raises(DataError, match=r"labels.npy must lie in 0..9, got \[0, 10\]"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)
    np.save(path, labels[:100])
    with pytest.raises(DataError, match=r"labels.npy must be integer of shape \(200,\)"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)


def test_truncated_npy(cifar_dir):
    writers.truncate(cifar_dir / "CIFAR-10-C" / "fog.npy", keep=0.7)
    with pytest.raises(DataError, match="fog.npy.*truncated"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)


def test_an_npz_archive_under_an_npy_name_is_named(cifar_dir):
    path = cifar_dir / "CIFAR-10-C" / "fog.npy"
    images = np.load(path)
    with open(path, "wb") as f:
        np.savez(f, images=images)
    with pytest.raises(DataError, match="fog.npy is a .npz archive, not a .npy array"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)


def test_too_few_images_for_the_requested_splits(cifar_dir):
    with pytest.raises(DataError, match=r"class 0 has \d+ examples left, \d+ requested"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 3, seed=0)


def test_bad_cifar_batches(cifar_dir):
    batch_path = cifar_dir / "cifar-10-batches-py" / "test_batch"
    writers.truncate(batch_path)
    with pytest.raises(DataError, match="test_batch.*truncated"):
        get_benchmark("cifar-flip").load_task(cifar_dir, "flip", 10, 1, 1, seed=0)
    batch = {b"data": np.zeros((40, 3072), np.uint8), b"labels": [0] * 39 + [10]}
    batch_path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"must lie in 0..9, got \[0, 10\]"):
        get_benchmark("cifar-flip").load_task(cifar_dir, "flip", 10, 1, 1, seed=0)
    batch_path.write_bytes(pickle.dumps({b"data": np.zeros((40, 3072), np.uint8)}, protocol=2))
    with pytest.raises(DataError, match="b'labels'"):
        get_benchmark("cifar-flip").load_task(cifar_dir, "flip", 10, 1, 1, seed=0)
    batch_path.write_bytes(pickle.dumps({b"data": np.zeros((40, 1024), np.uint8),
                                         b"labels": [0] * 40}, protocol=2))
    with pytest.raises(DataError, match=r"\(n, 3072\)"):
        get_benchmark("cifar-flip").load_task(cifar_dir, "flip", 10, 1, 1, seed=0)


@pytest.mark.parametrize("severity", [1, 3])
def test_read_cifar10c_takes_exactly_one_severity_block(cifar_dir, severity):
    """Guards the slice of read_cifar10c: a severity below 5 is its own block of n / 5 rows,
    in order, with no image of the next severity (red = 40 * severity in the fixture)."""
    images, labels = read_cifar10c(cifar_dir, "fog", severity)
    n = len(np.load(cifar_dir / "CIFAR-10-C" / "fog.npy", mmap_mode="r"))
    assert len(images) == len(labels) == n // 5
    assert (np.asarray(images[:, 0, 0, 0]) == 40 * severity).all()
    assert np.asarray(images[:, 0, 0, 1]).tolist() == list(range(n // 5))   # rows 0.. of the block


def test_cifar10c_images_keep_their_orientation_and_the_cifar10_statistics(cifar_dir):
    """Guards what the constant-plane fixture cannot see: rows and columns swapped on the
    way to (C, H, W), and the normalisation constants themselves (the other tests
    un-normalise with the module's own). Here red = row, green = column, and the values
    are the CIFAR-10 training-set statistics, mean (0.4914, 0.4822, 0.4465), std (0.2470,
    0.2435, 0.2616), written out."""
    images = np.load(cifar_dir / "CIFAR-10-C" / "fog.npy")
    images[:, :, :, 0] = np.arange(32)[:, None]
    images[:, :, :, 1] = 4 * np.arange(32)[None, :]
    np.save(cifar_dir / "CIFAR-10-C" / "fog.npy", images)
    train = get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0).train
    x = train.images
    rows = torch.arange(32, dtype=torch.float32)[:, None].expand(32, 32)
    red = (rows / 255 - 0.4914) / 0.2470
    green = (4 * rows.T / 255 - 0.4822) / 0.2435
    blue = (20 * train.labels.float() / 255 - 0.4465) / 0.2616            # blue = 20 * label
    assert torch.allclose(x[:, 0], red.expand_as(x[:, 0]), atol=1e-5)
    assert torch.allclose(x[:, 1], green.expand_as(x[:, 1]), atol=1e-5)
    assert torch.allclose(x[:, 2], blue[:, None, None].expand_as(x[:, 2]), atol=1e-5)


def test_cifar_batches_keep_rows_and_columns_apart(cifar_dir):
    """Guards the channel-major decoding of a python batch beyond constant planes: a row is
    3072 bytes, the red 32x32 plane first, each plane row-major, so byte 1024 * c + 32 * h
    + w is channel c of pixel (h, w). Here red = h and green = 4 * w, written by hand."""
    planes = np.zeros((40, 3, 32, 32), np.uint8)
    planes[:, 0] = np.arange(32)[:, None]
    planes[:, 1] = 4 * np.arange(32)[None, :]
    batch = {b"data": planes.reshape(40, 3072), b"labels": [i % 10 for i in range(40)]}
    (cifar_dir / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    raw = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))                    # pixels / 255, no shift
    image = get_benchmark("cifar10c").load_source(cifar_dir, normalization=raw).test.images[3]
    h = torch.arange(32, dtype=torch.float32)
    assert torch.allclose(image[0], (h[:, None] / 255).expand(32, 32))
    assert torch.allclose(image[1], (4 * h[None, :] / 255).expand(32, 32))


def test_cifar_flip_normalises_as_asked(cifar_dir):
    """Guards load_cifar_flip passing `normalization` on (the sweep hands it the model's
    own): with mean 0 and std 1 a pixel is its value / 255; the fixture's test batch has
    red = 60 and blue = 20 * label."""
    raw = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    task = get_benchmark("cifar-flip").load_task(cifar_dir, "flip", 10, 1, 2, seed=0,
                                                 normalization=raw)
    x = task.train.images
    assert torch.allclose(x[:, 0], torch.full_like(x[:, 0], 60 / 255))
    original = 9 - task.train.labels.float()                     # the label before the flip
    assert torch.allclose(x[:, 2, 0, 0], 20 * original / 255)


def test_cifar10c_severity_zero_is_refused(cifar_dir):
    """Guards the lower bound of the severity check: severity 0 would slice rows -block..0,
    an empty block, instead of an error naming the option."""
    with pytest.raises(ConfigError, match="severity must be an integer in 1..5, got 0"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0, severity=0)


def test_the_data_dir_may_be_the_dataset_folder_itself(cifar_dir):
    """As the layouts say, "<data-dir>/CIFAR-10-C/ (or <data-dir> itself)", and the same for
    cifar-10-batches-py: --data-dir may point at the dataset folder, not only its parent."""
    task = get_benchmark("cifar10c").load_task(cifar_dir / "CIFAR-10-C", "fog", 10, 1, 1, seed=0)
    assert (pixels(task.train.images)[:, 0] == 200).all()
    flip = get_benchmark("cifar-flip").load_task(cifar_dir / "cifar-10-batches-py", "flip", 10,
                                                 1, 1, seed=0)
    assert (pixels(flip.train.images)[:, 0] == 60).all()


# the CIFAR-10-C.tar archive (zenodo record 2535967): 19 corruption files beside labels.npy
CIFAR10C_TAR = ("brightness", "contrast", "defocus_blur", "elastic_transform", "fog", "frost",
                "gaussian_blur", "gaussian_noise", "glass_blur", "impulse_noise",
                "jpeg_compression", "motion_blur", "pixelate", "saturate", "shot_noise", "snow",
                "spatter", "speckle_noise", "zoom_blur")


def test_cifar10c_offers_every_corruption_file_of_the_archive(cifar_dir):
    """CIFAR-10-C.tar holds 19 corruptions, the 15 of the paper's average and 4 held out
    (gaussian_blur, saturate, spatter, speckle_noise): cifar10c offers all 19, and a held-out
    one reads like any other."""
    assert sorted(get_benchmark("cifar10c").shifts) == sorted(CIFAR10C_TAR)
    writers.write_cifar10c(cifar_dir, corruptions=("speckle_noise",))
    images, labels = read_cifar10c(cifar_dir, "speckle_noise", severity=2)
    assert (np.asarray(images[:, 0, 0, 0]) == 80).all() and len(labels) == len(images)


def test_negative_labels_are_refused(cifar_dir):
    """labels.npy may be a signed integer array: a -1 in the block read is named, as a label
    of 10 is, not passed on as a class index."""
    path = cifar_dir / "CIFAR-10-C" / "labels.npy"
    labels = np.load(path).astype(np.int64)
    labels[-1] = -1                                                     # in the severity-5 block
    np.save(path, labels)
    with pytest.raises(DataError, match=r"labels.npy must lie in 0..9, got \[-1, 9\]"):
        get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 1, seed=0)


def test_int64_labels_are_copied_out_of_the_read_only_file(cifar_dir, monkeypatch):
    """labels.npy already int64: the labels must still be a copy, not a tensor over the
    read-only memory map (torch warns that writing to it is undefined; a write would fault)."""
    path = cifar_dir / "CIFAR-10-C" / "labels.npy"
    np.save(path, np.load(path).astype(np.int64))
    maps = []
    load = cifar10._load_npy
    monkeypatch.setattr(cifar10, "_load_npy", lambda *a: maps.append(load(*a)) or maps[-1])
    _, labels = read_cifar10c(cifar_dir, "fog", severity=5)
    mapped = next(m for m in maps if m.ndim == 1)
    assert labels.dtype == torch.int64 and labels.tolist() == mapped[-len(labels):].tolist()
    assert not np.shares_memory(labels.numpy(), mapped)


def test_labels_come_from_the_severity_block_of_their_images(cifar_dir):
    """labels.npy has one label per row of <corruption>.npy: the labels of the severity-5
    images are rows 4n/5.. of it, not the first block's. Here the severity-5 block is
    relabelled (y -> (y + 3) % 10) and its images' blue plane rewritten to 20 * new label."""
    path = cifar_dir / "CIFAR-10-C" / "labels.npy"
    labels = np.load(path)
    block = len(labels) // 5
    labels[4 * block:] = (labels[4 * block:] + 3) % 10
    np.save(path, labels)
    images = np.load(cifar_dir / "CIFAR-10-C" / "fog.npy")
    images[4 * block:, :, :, 2] = 20 * labels[4 * block:, None, None]
    np.save(cifar_dir / "CIFAR-10-C" / "fog.npy", images)
    x, y = read_cifar10c(cifar_dir, "fog", severity=5)
    assert np.array_equal(y.numpy(), labels[4 * block:])
    assert np.array_equal(np.asarray(x[:, 0, 0, 2]), 20 * y.numpy())


def test_a_partial_download_names_each_missing_corruption_file(cifar_dir):
    """Before a sweep: every requested corruption without its <corruption>.npy is named
    (fixture: gaussian_noise and fog only); the present ones pass; cifar10c-official checks
    the same way."""
    for name in ("cifar10c", "cifar10c-official"):
        get_benchmark(name).check_local_data(cifar_dir, ["gaussian_noise"])
        with pytest.raises(DataError, match=r"2 of the 3 corruptions .*: snow.npy, zoom_blur.npy"):
            get_benchmark(name).check_local_data(cifar_dir, ["snow", "gaussian_noise", "zoom_blur"])
    get_benchmark("cifar10c").check_local_data(cifar_dir, ["gaussian_noise", "fog"])


def test_the_official_loader_reads_the_severity_asked(cifar_dir):
    """cifar10c-official passes `severity` on: severity 2 is the second block (red = 80)."""
    task = get_benchmark("cifar10c-official").load_task(cifar_dir, "gaussian_noise", 10, 1, 1,
                                                        seed=0, severity=2)
    assert (pixels(task.train.images)[:, 0] == 80).all()


def test_the_splits_are_named_after_the_benchmark_shift_and_split(cifar_dir):
    """Each split says where it came from (messages, caches): <benchmark>/<shift>/<split>,
    the train, val and test splits in that order (their sizes tell them apart here)."""
    task = get_benchmark("cifar10c").load_task(cifar_dir, "fog", 10, 1, 2, seed=0)
    assert [(s.name, len(s)) for s in (task.train, task.val, task.test)] == [
        ("cifar10c/fog/train", 10), ("cifar10c/fog/val", 10), ("cifar10c/fog/test", 20)]


def test_a_batch_with_fewer_labels_than_images_is_refused(cifar_dir):
    """One label per 3072-byte row: a test_batch of 40 images and 39 labels is named, not
    read as 40 images beside 39 labels."""
    batch = {b"data": np.zeros((40, 3072), np.uint8), b"labels": [i % 10 for i in range(39)]}
    (cifar_dir / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"b'labels' in .*test_batch must be 40 integers"):
        get_benchmark("cifar-flip").load_task(cifar_dir, "flip", 10, 1, 1, seed=0)
