"""The Fashion-MNIST loader and the five fmnist-* benchmarks.

Most tests run on a fake Fashion-MNIST written by the test in the real IDX format
(full size, random pixels) whose images carry their own index in three pixels,
so every split can be traced back to the test image it came from. The real files
are tested when present (REQUIRE_FMNIST=1 turns a skip into a failure).
"""

import gzip
import struct

import numpy as np
import pytest
import torch

from deep.data import DataError, get_benchmark
from deep.data import fmnist as F
from deep.data.base import split_counts
from deep.errors import ConfigError
from tests.doc_text import doc_text

FMNIST_NAMES = ["fmnist-c", "fmnist-breeds", "fmnist-flip", "fmnist-spurious", "fmnist-blocknoise"]
SMALL = dict(n_target=100, val_per_class=5, test_per_class=20)   # keeps the tests fast


# ----------------------------------------------------------------------------- fixtures

def idx_bytes(magic: int, dims: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack(">" + "I" * (2 + len(dims) - 1), magic, *dims) + data


def write_idx(path, magic, dims, data, compress=True):
    raw = idx_bytes(magic, dims, data)
    if compress:
        with gzip.open(str(path) + ".gz", "wb", compresslevel=1) as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def fake_images(count: int, seed: int) -> np.ndarray:
    """Random uint8 (count, 28, 28) whose pixels (14, 0..2) spell the image index."""
    images = np.random.default_rng(seed).integers(0, 200, size=(count, 28, 28), dtype=np.uint8)
    index = np.arange(count)
    images[:, 14, 0], images[:, 14, 1], images[:, 14, 2] = index // 65536, index // 256 % 256, index % 256
    return images


def fake_labels(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(count) % 10).astype(np.uint8)


def write_fake(folder, compress=True, **overrides):
    """The four files of a full-size fake Fashion-MNIST; `overrides` replace a file's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for (split, kind), (stem, count) in F.FILES.items():
        if stem in overrides:
            (folder / stem).write_bytes(overrides[stem])
            continue
        if kind == "images":
            write_idx(folder / stem, 2051, (count, 28, 28), fake_images(count, len(stem)).tobytes(), compress)
        else:
            write_idx(folder / stem, 2049, (count,), fake_labels(count, len(stem)).tobytes(), compress)
    return folder


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return write_fake(tmp_path_factory.mktemp("fashion"))


def source_index(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation and read the index spelled in pixels (14, 0..2)."""
    pixels = torch.round((images[:, 0, 14, :3] * F.STD[0] + F.MEAN[0]) * 255).long().numpy()
    return pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return torch.round((images[:, 0] * F.STD[0] + F.MEAN[0]) * 255).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- real files

def test_real_files_load_with_the_published_counts_and_statistics(real_fmnist):
    data = F.load_fashion_mnist()
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int64
    # Fashion-MNIST is exactly balanced: 6000 / 1000 images per class.
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    # The first training image is an ankle boot, the first test image too (Xiao et al.'s files).
    assert data.train_labels[0] == 9 and data.test_labels[0] == 9
    # MEAN / STD are the training set's pixel statistics.
    pixels = data.train_images / 255.0
    assert abs(pixels.mean() - F.MEAN[0]) < 5e-4 and abs(pixels.std() - F.STD[0]) < 5e-4
    assert F.load_fashion_mnist() is data                      # cached
    assert not data.train_images.flags.writeable               # shared, so read-only


def test_real_fmnist_c_task_is_class_balanced(real_fmnist):
    task = get_benchmark("fmnist-c").load_task(None, "contrast", 1000, 10, 90, seed=0)
    assert (len(task.train), len(task.val), len(task.test)) == (1000, 100, 900)
    assert torch.bincount(task.train.labels).tolist() == [100] * 10
    # Contrast 0.15 squeezes every image: its pixel std drops well below the clean one.
    clean = get_benchmark("fmnist-flip").load_task(None, "flip", 1000, 10, 90, seed=0)
    assert task.test.images.std(dim=(1, 2, 3)).mean() < 0.3 * clean.test.images.std(dim=(1, 2, 3)).mean()


# ----------------------------------------------------------------------------- locating files

def test_resolve_dir_prefers_argument_then_environment_then_debian(monkeypatch, tmp_path):
    monkeypatch.delenv(F.ENV_VAR, raising=False)
    assert F.resolve_dir(None) == F.DEFAULT_DIR
    monkeypatch.setenv(F.ENV_VAR, str(tmp_path / "env"))
    assert F.resolve_dir(None) == tmp_path / "env"
    assert F.resolve_dir(tmp_path / "arg") == tmp_path / "arg"


def test_environment_variable_is_used(monkeypatch, fake_dir):
    monkeypatch.setenv(F.ENV_VAR, str(fake_dir))
    data = F.load_fashion_mnist()
    assert data.train_images.shape == (60000, 28, 28)
    np.testing.assert_array_equal(data.test_labels, fake_labels(10000, len("t10k-labels-idx1-ubyte")))


def test_gzip_and_uncompressed_files_give_the_same_arrays(tmp_path, fake_dir):
    plain = write_fake(tmp_path / "plain", compress=False)
    a, b = F.load_fashion_mnist(fake_dir), F.load_fashion_mnist(plain)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_missing_folder_and_missing_file_name_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(F.ENV_VAR, raising=False)
    with pytest.raises(DataError, match="does not exist") as err:
        F.load_fashion_mnist(tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    # "~" is the home folder, as for the other loaders (it was read as a folder named ~)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match=f"folder {tmp_path}/nowhere does not exist"):
        F.load_fashion_mnist("~/nowhere")
    folder = tmp_path / "three"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", 2051, (0, 28, 28), b"")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\[\.gz\] not found") as err:
        F.load_fashion_mnist(folder)
    message = str(err.value)
    for hint in ("apt-get install dataset-fashion-mnist", "--data-dir", F.ENV_VAR, F.UPSTREAM):
        assert hint in message


# ----------------------------------------------------------------------------- damaged files

def labels_file(tmp_path, raw: bytes, name="labels"):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("raw, match", [
    (idx_bytes(2051, (3,), bytes(3)), "magic number 2051, expected 2049"),
    (idx_bytes(2049, (4,), bytes(4)), "header says 4 items, expected 3"),
    (idx_bytes(2049, (3,), bytes(2)), "truncated"),
    (idx_bytes(2049, (3,), bytes(5)), "trailing data"),
    (b"\x00\x00", "shorter than the IDX header"),
    (idx_bytes(2049, (3,), bytes([0, 9, 10])), "label 10 outside 0..9"),
])
def test_damaged_labels_file_raises_naming_it(tmp_path, raw, match):
    path = labels_file(tmp_path, raw)
    with pytest.raises(DataError, match=match) as err:
        F.read_labels(path, 3)
    assert str(path) in str(err.value)


def test_images_file_checks_magic_and_item_shape(tmp_path):
    path = labels_file(tmp_path, idx_bytes(2051, (2, 32, 32), bytes(2 * 32 * 32)), "images")
    with pytest.raises(DataError, match=r"items of shape \(32, 32\), expected \(28, 28\)"):
        F.read_images(path, 2)
    path.write_bytes(idx_bytes(2049, (2,), bytes(2)))
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        F.read_images(path, 2)
    path.write_bytes(idx_bytes(2051, (2, 28, 28), bytes(2 * 784)))
    assert F.read_images(path, 2).shape == (2, 28, 28)


def test_truncated_and_corrupt_gzip_raise(tmp_path):
    raw = gzip.compress(idx_bytes(2049, (3,), bytes(3)) * 1000)
    cut = labels_file(tmp_path, raw[: len(raw) // 2], "cut.gz")
    with pytest.raises(DataError, match="damaged") as err:
        F.read_labels(cut, 3)
    assert "cut.gz" in str(err.value)
    junk = labels_file(tmp_path, b"this is not gzip at all", "junk.gz")
    with pytest.raises(DataError, match="damaged"):
        F.read_labels(junk, 3)


def test_damaged_file_in_a_folder_is_named_and_label_count_must_match(tmp_path):
    # Images and labels disagree: 60000 images but a labels file holding 59999.
    short = idx_bytes(2049, (59999,), bytes(59999))
    folder = write_fake(tmp_path / "short", **{"train-labels-idx1-ubyte": short})
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: header says 59999 items, expected 60000"):
        F.load_fashion_mnist(folder)


# ----------------------------------------------------------------------------- splits, every benchmark

def shift_of(name):
    return {"fmnist-c": "brightness"}.get(name, get_benchmark(name).shifts[0])


@pytest.mark.parametrize("name", FMNIST_NAMES)
def test_splits_are_sized_balanced_disjoint_and_deterministic(name, fake_dir):
    bench = get_benchmark(name)
    assert bench.in_channels == 1 and bench.load_source is not None
    task = bench.load_task(fake_dir, shift_of(name), seed=3, **SMALL)
    k = bench.num_classes
    expected = {"train": split_counts(100, k), "val": [5] * k, "test": [20] * k}
    indices = {}
    for split in ("train", "val", "test"):
        s = getattr(task, split)
        assert s.images.shape[1:] == (1, 28, 28) and s.images.dtype == torch.float32
        assert torch.bincount(s.labels, minlength=k).tolist() == expected[split]
        if name != "fmnist-c":   # corrupted pixels no longer spell the index
            indices[split] = source_index(s.images)
    if indices:
        all_idx = np.concatenate(list(indices.values()))
        assert len(set(all_idx.tolist())) == len(all_idx), "splits overlap"
        assert all_idx.max() < 10000   # drawn from the test images
    again = bench.load_task(fake_dir, shift_of(name), seed=3, **SMALL)
    other = bench.load_task(fake_dir, shift_of(name), seed=4, **SMALL)
    assert torch.equal(task.train.images, again.train.images)
    assert torch.equal(task.test.labels, again.test.labels)
    assert not torch.equal(task.train.images, other.train.images)
    assert (task.perturb is not None) == (name == "fmnist-blocknoise")
    assert (task.group_names is not None) == bench.has_groups == (name == "fmnist-spurious")


def test_test_and_val_do_not_depend_on_n_target_and_train_sets_are_nested(fake_dir):
    load = get_benchmark("fmnist-flip").load_task
    small = load(fake_dir, "flip", n_target=50, val_per_class=5, test_per_class=20, seed=1)
    large = load(fake_dir, "flip", n_target=300, val_per_class=5, test_per_class=20, seed=1)
    np.testing.assert_array_equal(source_index(small.test.images), source_index(large.test.images))
    np.testing.assert_array_equal(source_index(small.val.images), source_index(large.val.images))
    assert set(source_index(small.train.images)) <= set(source_index(large.train.images))


def test_bad_arguments_raise(fake_dir):
    bench = get_benchmark("fmnist-c")
    with pytest.raises(ConfigError, match=r"unknown shift\(s\) \['frost'\] of fmnist-c; known: "
                                          "gaussian_noise, "):
        bench.load_task(fake_dir, "frost", **SMALL)
    with pytest.raises(ValueError, match="n_target must be at least 1"):
        bench.load_task(fake_dir, "brightness", n_target=0, val_per_class=5, test_per_class=5)
    with pytest.raises(DataError, match="1000 examples left, 1001 requested"):
        bench.load_task(fake_dir, "brightness", n_target=100, val_per_class=5, test_per_class=1001)
    with pytest.raises(ConfigError, match=r"unknown shift\(s\) \['fourth'\] of fmnist-blocknoise"):
        get_benchmark("fmnist-blocknoise").load_task(fake_dir, "fourth", **SMALL)


# ----------------------------------------------------------------------------- per benchmark

def test_fmnist_c_is_a_fixed_corrupted_copy_of_the_test_images(fake_dir):
    data = F.load_fashion_mnist(fake_dir)
    bright = F.corrupted_test_images(fake_dir, "brightness")
    expected = np.minimum(data.test_images / 255 + 0.3, 1) * 255
    assert bright.dtype == np.uint8 and np.abs(bright - expected).max() <= 0.5 + 1e-3   # rounded to uint8
    task = get_benchmark("fmnist-c").load_task(fake_dir, "brightness", seed=0, **SMALL)
    rows = {row.tobytes() for row in bright}
    assert all(img.tobytes() in rows for img in to_uint8(task.train.images))
    # A random corruption is one fixed data set: the split seed picks images, corruption_seed the noise.
    noisy = F.corrupted_test_images(fake_dir, "gaussian_noise")
    assert noisy is F.corrupted_test_images(fake_dir, "gaussian_noise")        # cached
    assert not np.array_equal(noisy, F.corrupted_test_images(fake_dir, "gaussian_noise", corruption_seed=1))
    clean = data.test_images.astype(float)
    mild = F.corrupted_test_images(fake_dir, "gaussian_noise", severity=1)
    assert np.abs(mild - clean).mean() < np.abs(noisy - clean).mean()   # sigma 0.04 < 0.10


def test_fmnist_c_rounds_to_the_nearest_uint8(fake_dir):
    """Guards np.rint before the uint8 cast: brightness at severity 1 adds 0.05 * 255 = 12.75
    levels, stored as +13 (truncation would store +12) where it does not reach 255."""
    data = F.load_fashion_mnist(fake_dir)
    bright = F.corrupted_test_images(fake_dir, "brightness", severity=1)
    expected = np.minimum(data.test_images.astype(int) + 13, 255)
    np.testing.assert_array_equal(bright, expected)


def test_each_corruption_draws_its_own_noise(fake_dir):
    """Guards the corruption's name in the noise seed: gaussian_noise (x + 0.10 z) and
    speckle_noise (x + 0.20 x z) at severity 5 would otherwise share z, and their
    changes to the same pixels would be almost perfectly correlated."""
    clean = F.load_fashion_mnist(fake_dir).test_images[:2000].astype(float)
    gauss = F.corrupted_test_images(fake_dir, "gaussian_noise")[:2000] - clean
    speckle = F.corrupted_test_images(fake_dir, "speckle_noise")[:2000] - clean
    mid = (clean > 60) & (clean < 190)                  # away from clipping at 0 and 255
    assert abs(np.corrcoef(gauss[mid], speckle[mid])[0, 1]) < 0.05


def test_fmnist_c_source_is_the_training_set(fake_dir):
    source = get_benchmark("fmnist-c").load_source(fake_dir)
    assert source.benchmark == "fmnist" and source.num_classes == 10 and source.in_channels == 1
    assert len(source.train) == 60000 and len(source.test) == 10000
    np.testing.assert_array_equal(source_index(source.train.images[:500]), np.arange(500))
    assert get_benchmark("fmnist-flip").load_source(fake_dir).benchmark == "fmnist"
    assert get_benchmark("fmnist-blocknoise").load_source(fake_dir).benchmark == "fmnist"


def test_fmnist_flip_labels_are_nine_minus_the_original(fake_dir):
    data = F.load_fashion_mnist(fake_dir)
    task = get_benchmark("fmnist-flip").load_task(fake_dir, "flip", seed=0, **SMALL)
    for split in (task.train, task.val, task.test):
        original = data.test_labels[source_index(split.images)]
        np.testing.assert_array_equal(split.labels.numpy(), 9 - original)


def test_fmnist_breeds_superclasses_are_the_ones_docs_fmnist_md_lists():
    """docs/fmnist.md states which subclasses the source model sees and which are the
    target's; the paragraph is parsed here, so a swap in the code (Shirt to the source
    side, say) or in the doc is caught."""
    import re
    doc = doc_text("docs/fmnist.md")
    listed = re.search(r"\(source subclasses \| target subclasses\): (.*?)\. Bag", doc).group(1)
    documented = {}
    for entry in listed.split("; "):
        name, sides = entry.split(" = ")
        documented[name] = tuple({c.strip() for c in side.split(", ")} for side in sides.split(" | "))
    assert documented["top"] == ({"T-shirt/top", "Pullover"}, {"Shirt", "Coat"})  # the parse
    in_code = {name: tuple({F.CLASS_NAMES[i] for i in side} for side in sides)
               for name, sides in F.SUPERCLASSES.items()}
    assert in_code == documented


def test_fmnist_breeds_uses_disjoint_subclasses_of_the_same_superclasses(fake_dir):
    source_sub = [set(s) for s, _ in F.SUPERCLASSES.values()]
    target_sub = [set(t) for _, t in F.SUPERCLASSES.values()]
    for s, t in zip(source_sub, target_sub):
        assert s and t and not s & t
    used = set().union(*source_sub, *target_sub)
    assert used == set(range(10)) - {8}   # every class but Bag, each once
    data = F.load_fashion_mnist(fake_dir)
    bench = get_benchmark("fmnist-breeds")
    assert bench.num_classes == 3
    task = bench.load_task(fake_dir, "subpopulation", seed=0, **SMALL)
    for split in (task.train, task.val, task.test):
        classes = data.test_labels[source_index(split.images)]
        for cls, sup in zip(classes, split.labels.tolist()):
            assert cls in target_sub[sup]
    source = bench.load_source(fake_dir)
    assert source.benchmark == "fmnist-breeds" and source.num_classes == 3
    classes = data.train_labels[source_index(source.train.images)]
    for cls, sup in zip(classes, source.train.labels.tolist()):
        assert cls in source_sub[sup]
    # Every source-subclass training image is used: 6000 per subclass.
    assert torch.bincount(source.train.labels).tolist() == [6000 * len(s) for s in source_sub]


def mark_of(images: torch.Tensor) -> np.ndarray:
    """1 where the top corners are white, 0 where the bottom ones are; asserts exactly one."""
    pixels = to_uint8(images)
    top = (pixels[:, 1:5, 1:5] == 255).all(axis=(1, 2)) & (pixels[:, 1:5, 23:27] == 255).all(axis=(1, 2))
    bottom = (pixels[:, 23:27, 1:5] == 255).all(axis=(1, 2)) & (pixels[:, 23:27, 23:27] == 255).all(axis=(1, 2))
    assert np.all(top ^ bottom)
    return top.astype(int)


def agreement(split) -> float:
    a = F.attribute(split.labels.numpy())
    cue = mark_of(split.images)
    np.testing.assert_array_equal(split.groups.numpy(), 2 * a + cue)   # groups = (A(y), mark)
    return float((cue == a).mean())


def test_fmnist_spurious_mark_tracks_the_label_in_the_source_only(fake_dir):
    bench = get_benchmark("fmnist-spurious")
    source = bench.load_source(fake_dir)
    sub = source.train.subset(torch.arange(0, 60000, 7))   # every 7th image keeps the test quick
    assert abs(agreement(sub) - 0.95) < 0.01
    assert float((source.train.groups.numpy() % 2 == F.attribute(source.train.labels.numpy())).mean()) == 0.95
    per_class = [(source.train.groups[source.train.labels == c] % 2 == F.attribute(np.array([c]))[0])
                 .float().mean().item() for c in range(10)]
    np.testing.assert_allclose(per_class, 0.95, atol=1e-9)      # exact per class: 5700 of 6000
    assert agreement(source.test.subset(torch.arange(0, 10000, 3))) == pytest.approx(0.95, abs=0.02)

    balanced = bench.load_task(fake_dir, "balanced", seed=0, **SMALL)
    assert balanced.group_names == F.GROUP_NAMES and len(F.GROUP_NAMES) == 4
    for split in (balanced.train, balanced.val, balanced.test):   # 10, 5 and 20 per class
        assert agreement(split) == 0.5   # odd class sizes round down and up in turn
    assert torch.bincount(balanced.test.groups).tolist() == [50] * 4
    reversed_ = bench.load_task(fake_dir, "reversed", seed=0, **SMALL)
    assert agreement(reversed_.test) == 0.0
    # The marks sit on the images that fmnist-c and fmnist-blocknoise draw for the same seed.
    clean = get_benchmark("fmnist-blocknoise").load_task(fake_dir, "first", seed=0, **SMALL)
    np.testing.assert_array_equal(source_index(balanced.test.images), source_index(clean.test.images))


def test_which_images_carry_the_agreeing_mark_is_drawn_per_seed(fake_dir):
    """Guards the cue generator seeded by the split seed: with one generator for every seed,
    the class-sorted splits of two seeds (same class counts) would put the top mark at the
    same positions, seed after seed."""
    bench = get_benchmark("fmnist-spurious")
    groups = [bench.load_task(fake_dir, "balanced", seed=seed, **SMALL).train.groups
              for seed in (0, 1)]
    assert not torch.equal(*groups)


def test_draw_cues_rejects_bad_agreement():
    for bad in (1.5, -0.5, True):
        with pytest.raises(DataError, match=rf"^agreement must be a fraction in \[0, 1\], got {bad}$"):
            F.draw_cues(np.arange(10), bad, torch.Generator())


# ----------------------------------------------------------------------------- blocknoise

def toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3)
                               ).eval()


def test_perturb_parameters_touches_only_the_prefixes_with_the_requested_relative_norm():
    model = toy_model()
    model(torch.zeros(1, 1, 8, 8))   # materialise the lazy layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    touched = F.perturb_parameters(model, ("1", "2"), scale=0.5, seed=0)
    assert touched == ["1.weight", "1.bias", "2.weight", "2.bias"]
    after = model.state_dict()
    for name, value in after.items():
        if name in touched and before[name].norm() == 0:   # batch-norm bias at init: noise scaled to 0
            assert torch.equal(value, before[name]), name
        elif name in touched:
            ratio = (value - before[name]).norm() / before[name].norm()
            assert abs(ratio.item() - 0.5) < 1e-5, name
        else:   # other blocks, and batch-norm running statistics, are untouched
            assert torch.equal(value, before[name]), name
    again = toy_model()
    again(torch.zeros(1, 1, 8, 8))
    F.perturb_parameters(again, ("1", "2"), 0.5, seed=0)
    assert torch.equal(again[2].weight, model[2].weight)   # fixed per seed
    other = toy_model()
    other(torch.zeros(1, 1, 8, 8))
    F.perturb_parameters(other, ("1", "2"), 0.5, seed=1)
    assert not torch.equal(other[2].weight, model[2].weight)
    with pytest.raises(ValueError, match="no parameter"):
        F.perturb_parameters(model, ("layer9",), 0.5, 0)
    with pytest.raises(ValueError, match="positive"):
        F.perturb_parameters(model, ("1",), 0.0, 0)


@pytest.mark.parametrize("block, prefixes", [("first", ("conv1", "bn1", "layer1")), ("second", ("layer2",)),
                                             ("third", ("layer3",)), ("last", ("fc",))])
def test_blocknoise_task_perturbs_only_its_block_of_resnet26(fake_dir, block, prefixes):
    pytest.importorskip("deep.blocks")
    models = pytest.importorskip("deep.models")
    task = get_benchmark("fmnist-blocknoise").load_task(fake_dir, block, seed=0, **SMALL)
    model = models.build_model("resnet26", 10, in_channels=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task.perturb(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    in_block = {k for k, _ in model.named_parameters()
                if any(k == p or k.startswith(p + ".") for p in prefixes)}
    # Batch-norm biases start at zero, so their noise (scaled to their norm) is zero too.
    assert changed == {k for k in in_block if before[k].norm() > 0}
    assert changed and all(k.split(".")[0] in prefixes for k in changed)


def _calibrate_on_a_stand_in(monkeypatch, test_images):
    """deep.calibrate on a source model that is a 1-weight stand-in, zero at first, whose
    perturbation for noise seed s adds scale x (1 + s): its "accuracy" is its weight."""
    from types import SimpleNamespace

    from deep import calibrate
    from deep.data.base import TensorSplit
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    test = TensorSplit(test_images, torch.zeros(len(test_images), dtype=torch.long))
    bench = SimpleNamespace(pretrained=lambda arch, data_dir: "source.pt", num_classes=1,
                            in_channels=1, load_source=lambda data_dir: SimpleNamespace(test=test))
    monkeypatch.setattr(calibrate, "get_benchmark", lambda name: bench)
    monkeypatch.setattr(calibrate, "load_model", lambda *args, **kwargs: model)

    def perturbation(block, arch, scale, seed):
        def perturb(net):
            with torch.no_grad():
                net.weight += scale * (1 + seed)
        return perturb
    monkeypatch.setattr(calibrate, "block_perturbation", perturbation)
    return calibrate


def test_calibration_perturbs_the_unperturbed_model_each_time_on_the_last_test_images(
        monkeypatch):
    """`python -m deep.calibrate`: every (block, scale, noise seed) starts again from the
    source weights (perturbations never pile up) and is scored on the last `images` test
    images. The source model is a 1-weight stand-in whose "accuracy" is its weight."""
    from types import SimpleNamespace

    calibrate = _calibrate_on_a_stand_in(monkeypatch, torch.arange(10.0).view(10, 1, 1, 1))
    scored = []

    def evaluate(net, split):
        scored.append(split.images.flatten().tolist())
        return SimpleNamespace(acc=net.weight.item())
    monkeypatch.setattr(calibrate, "evaluate", evaluate)
    table = calibrate.blocknoise_accuracy([0.5, 2.0], images=4, seeds=(0, 1))
    assert table.pop(("none", 0.0)) == 0.0
    assert table == {(block, scale): 1.5 * scale            # mean of scale x 1 and scale x 2
                     for block in F.BLOCKNOISE_SHIFTS for scale in (0.5, 2.0)}
    assert scored == [[6.0, 7.0, 8.0, 9.0]] * (1 + 2 * 2 * len(F.BLOCKNOISE_SHIFTS))


@pytest.fixture
def calibrate_on_ten_images(monkeypatch):
    """deep.calibrate with a 10-image test split and a stand-in model; `loaded` records
    whether the model was loaded (a refused value must be refused before that)."""
    from types import SimpleNamespace

    from deep import calibrate
    from deep.data.base import TensorSplit
    test = TensorSplit(torch.zeros(10, 1, 1, 1), torch.zeros(10, dtype=torch.long))
    bench = SimpleNamespace(pretrained=lambda arch, data_dir: "source.pt", num_classes=1,
                            in_channels=1, load_source=lambda data_dir: SimpleNamespace(test=test))
    loaded = []
    monkeypatch.setattr(calibrate, "get_benchmark", lambda name: bench)
    monkeypatch.setattr(calibrate, "load_model",
                        lambda *args, **kwargs: loaded.append(1) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(calibrate, "block_perturbation", lambda *args: lambda net: None)
    monkeypatch.setattr(calibrate, "evaluate", lambda net, split: SimpleNamespace(acc=len(split)))
    return calibrate, loaded


def test_calibration_refuses_more_images_than_the_test_split_holds(calibrate_on_ten_images,
                                                                   capsys):
    """15 of 10 images would wrap round to negative indices and count 5 images twice."""
    calibrate, loaded = calibrate_on_ten_images
    assert calibrate.blocknoise_accuracy([1.0], images=10)[("none", 0.0)] == 10
    loaded.clear()
    with pytest.raises(ConfigError, match="images .*at most 10, the number of test images.*got 15"):
        calibrate.blocknoise_accuracy([1.0], images=15)
    for bad in (dict(images=0), dict(scales=[0.0]), dict(scales=[float("nan")]),
                dict(scales=[1.0], seeds=())):
        with pytest.raises(ConfigError):
            calibrate.blocknoise_accuracy(**{"scales": [1.0], **bad})
    assert not loaded
    assert calibrate.main(["--images", "15"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: images (--images) must be at most 10") and "Traceback" not in err


def test_calibration_averages_over_every_noise_seed(monkeypatch):
    """Guards the mean over `seeds`: with three seeds whose perturbations give "accuracy"
    1, 2 and 3 times the scale, each cell is 2 times the scale (a sum over the seeds
    divided by 2, right for the default two seeds only, would give 3 times)."""
    from types import SimpleNamespace

    calibrate = _calibrate_on_a_stand_in(monkeypatch, torch.zeros(4, 1, 1, 1))
    monkeypatch.setattr(calibrate, "evaluate",
                        lambda net, split: SimpleNamespace(acc=net.weight.item()))
    table = calibrate.blocknoise_accuracy([0.5], images=4, seeds=(0, 1, 2))
    assert table == {("none", 0.0): 0.0, **{(block, 0.5): 1.0 for block in F.BLOCKNOISE_SHIFTS}}


def test_calibration_prints_one_row_per_block_with_its_default_scale(monkeypatch, capsys):
    """`python -m deep.calibrate`'s table: accuracies in points, one column per scale, the
    separator row as wide as the header, and the default scale of each block (0.45,
    0.75, 0.65, 3: deep.data.fmnist.NOISE_SCALES). With no flags it scores the five
    documented scales on the last 2,000 test images."""
    from deep import calibrate
    table = {("none", 0.0): 0.93, **{(block, s): 0.5 + s / 10 for block in F.BLOCKNOISE_SHIFTS
                                     for s in (0.5, 2.0)}}
    monkeypatch.setattr(calibrate, "blocknoise_accuracy", lambda scales, images: table)
    assert calibrate.run([0.5, 2.0], 10) == 0
    assert capsys.readouterr().out.splitlines() == [
        "unperturbed: 93.0 %", "| block | 0.5 | 2 | default |", "|---|---|---|---|",
        "| first | 55.0 | 70.0 | 0.45 |", "| second | 55.0 | 70.0 | 0.75 |",
        "| third | 55.0 | 70.0 | 0.65 |", "| last | 55.0 | 70.0 | 3 |"]
    asked = []
    monkeypatch.setattr(calibrate, "run",
                        lambda scales, images: asked.append((scales, images)) or 0)
    assert calibrate.main([]) == 0
    assert asked == [([0.1, 0.25, 0.5, 1.0, 2.0], 2000)]


@pytest.mark.parametrize("argv, message", [
    (["--scales", "abc"], "--scales: expected comma-separated positive numbers, got 'abc'"),
    (["--scales", "1,-2"], "--scales: expected comma-separated positive numbers"),
    (["--images", "0"], "--images: expected an integer >= 1, got '0'"),
    (["--images", "-5"], "--images: expected an integer >= 1, got '-5'"),
    (["--images", "many"], "--images: expected an integer, got 'many'")])
def test_calibration_command_line_refuses_bad_values_without_a_traceback(
        calibrate_on_ten_images, capsys, argv, message):
    calibrate, loaded = calibrate_on_ten_images
    with pytest.raises(SystemExit) as exit_:
        calibrate.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert not loaded


# ----------------------------------------------------------------------------- protocols

@pytest.mark.parametrize("name", FMNIST_NAMES)
def test_protocol_matches_the_benchmark_and_its_data_options_are_accepted(name, fake_dir):
    from deep.protocol import load_protocol
    protocol = load_protocol(name)
    bench = get_benchmark(name)
    assert protocol.arch == "resnet26" and set(protocol.shifts) <= set(bench.shifts)
    assert protocol.methods == ["first", "second", "third", "last", "all", "lp-ft", "gradual-first-last",
                                "gradual-last-first", "l1sp", "auto-rgn", "auto-snr"]
    shift = "brightness" if name == "fmnist-c" else protocol.shifts[0]
    task = bench.load_task(fake_dir, shift, n_target=10, val_per_class=1, test_per_class=1, seed=0,
                           **protocol.data)
    assert task.benchmark == name
    if protocol.data:   # the same options reach load_source, which accepts (and may ignore) them
        assert bench.load_source(fake_dir, **protocol.data).num_classes == bench.num_classes
    with pytest.raises(TypeError):
        bench.load_task(fake_dir, shift, 10, 1, 1, 0, no_such_option=1)


def test_blocknoise_perturbation_is_fixed_by_noise_seed_not_by_the_split_seed(fake_dir):
    """Guards load_fmnist_blocknoise seeding the noise with `noise_seed`: tasks of two split
    seeds share one perturbation (like a fixed corrupted set); another noise_seed changes it."""
    import copy
    models = pytest.importorskip("deep.models")
    bench = get_benchmark("fmnist-blocknoise")
    base = models.build_model("resnet26", 10, in_channels=1).eval()

    def perturbed(seed, noise_seed):
        task = bench.load_task(fake_dir, "last", seed=seed, noise_seed=noise_seed, **SMALL)
        model = copy.deepcopy(base)
        task.perturb(model)
        return model.state_dict()

    first, second = perturbed(seed=0, noise_seed=0), perturbed(seed=1, noise_seed=0)
    assert not torch.equal(first["fc.weight"], base.state_dict()["fc.weight"])   # it does perturb
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = perturbed(seed=0, noise_seed=1)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def test_draw_cues_rounds_the_running_count_to_nearest():
    """Guards draw_cues rounding floor(agreement * running count + 1/2), not down: with 3
    images per class at agreement 0.5, class 0 agrees for floor(1.5 + .5) = 2 and class 1
    for floor(3 + .5) - 2 = 1 (rounding down would give 1 and 2)."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    cues = F.draw_cues(labels, 0.5, torch.Generator().manual_seed(0))
    agree = cues == F.attribute(labels)
    assert [int(agree[labels == c].sum()) for c in (0, 1)] == [2, 1]


def test_fmnist_c_severity_zero_raises_config_error(fake_dir):
    """Guards the early severity check of fmnist-c: severity 0 is a ConfigError naming the
    option, not whatever the corruption itself makes of it."""
    with pytest.raises(ConfigError, match="fmnist-c: severity"):
        F.corrupted_test_images(fake_dir, "brightness", severity=0)


@pytest.mark.filterwarnings("ignore:.*expects inputs normalised")  # not the point here
@pytest.mark.parametrize("arch, first_block", [("resnet50-public", ("conv1", "layer1")),
                                               ("wrn28-10", ("conv1", "block1"))])
def test_blocknoise_perturbs_the_block_of_the_architecture_being_run(fake_dir, arch, first_block):
    """The loader_options a sweep passes give the loader the sweep's --arch: resnet26's
    `first` (conv1, bn1, layer1) would take WRN's final `bn1`, and resnet50-public's `bn1`,
    which neither network counts in its first block."""
    from deep.models import build_model
    from deep.normalization import loader_options
    bench = get_benchmark("fmnist-blocknoise")
    options = loader_options(bench.load_task, bench.name, arch, {})
    assert options["arch"] == arch
    task = bench.load_task(fake_dir, "first", seed=0, **SMALL, **options)
    model = build_model(arch, 10, in_channels=1).eval()
    before = {k: v.clone() for k, v in model.named_parameters()}
    task.perturb(model)
    changed = {k.split(".")[0] for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == set(first_block)
    with pytest.raises(ConfigError, match=r"data option arch='resnet26' contradicts .* 'wrn28-10'"):
        loader_options(bench.load_task, bench.name, "wrn28-10", {"arch": "resnet26"})
    with pytest.raises(ConfigError, match=r"shift 'first' perturbs the model's block 'first', "
                                          r"and clip-vit-tiny has none .*known: embedding"):
        bench.load_task(fake_dir, "first", seed=0, **SMALL,
                        **loader_options(bench.load_task, bench.name, "clip-vit-tiny", {}))


@pytest.mark.parametrize("name, shift, option, message", [
    ("fmnist-blocknoise", "first", {"noise_scale": float("inf")}, "noise_scale must be a positive number"),
    ("fmnist-blocknoise", "first", {"noise_seed": -1}, "noise_seed must be at least 0"),
    ("fmnist-c", "brightness", {"corruption_seed": -1}, "corruption_seed must be at least 0"),
    # the target loader takes the source's options only to share one [data] table; a bad
    # one is still refused, not saved in the results' configuration as if it had been used
    ("fmnist-spurious", "balanced", {"source_agreement": 5}, r"source_agreement must be a fraction in \[0, 1\]"),
    ("fmnist-spurious", "balanced", {"cue_seed": -7}, "cue_seed must be at least 0"),
])
def test_bad_loader_options_are_refused_by_name(fake_dir, name, shift, option, message):
    with pytest.raises(ConfigError, match=f"{name}: {message}"):
        get_benchmark(name).load_task(fake_dir, shift, seed=0, **SMALL, **option)


def test_plain_source_test_split_is_the_t10k_files(fake_dir):
    """Guards the source test split read from the t10k files, not from the first 10,000
    training images (whose pixels also spell indices 0..9999): the pixels and labels are
    the ones this test wrote into t10k-images / t10k-labels."""
    source = get_benchmark("fmnist-c").load_source(fake_dir)
    images = fake_images(10000, len("t10k-images-idx3-ubyte"))
    labels = fake_labels(10000, len("t10k-labels-idx1-ubyte"))
    np.testing.assert_array_equal(to_uint8(source.test.images[:300]), images[:300])
    np.testing.assert_array_equal(source.test.labels.numpy(), labels)


def test_fmnist_breeds_source_test_split_holds_the_source_subclasses(fake_dir):
    """Guards the source model's test split drawn from the source side of SUPERCLASSES
    (the target subclasses are the shift the model must not have seen): every test image
    of a source subclass, 1000 per class in the fake files."""
    source_sub = [set(s) for s, _ in F.SUPERCLASSES.values()]
    data = F.load_fashion_mnist(fake_dir)
    test = get_benchmark("fmnist-breeds").load_source(fake_dir).test
    classes = data.test_labels[source_index(test.images)]
    for cls, sup in zip(classes, test.labels.tolist()):
        assert cls in source_sub[sup]
    assert torch.bincount(test.labels).tolist() == [1000 * len(s) for s in source_sub]


def test_each_severity_draws_its_own_noise(fake_dir):
    """Guards the severity in the noise seed of a fixed corrupted set, as the docstring says
    (draws depend on corruption_seed, corruption and severity): gaussian_noise at
    severities 1 and 5 would otherwise add 0.04 z and 0.10 z, perfectly correlated."""
    clean = F.load_fashion_mnist(fake_dir).test_images[:2000].astype(float)
    mild = F.corrupted_test_images(fake_dir, "gaussian_noise", severity=1)[:2000] - clean
    strong = F.corrupted_test_images(fake_dir, "gaussian_noise", severity=5)[:2000] - clean
    mid = (clean > 60) & (clean < 190)                  # away from clipping at 0 and 255
    assert abs(np.corrcoef(mild[mid], strong[mid])[0, 1]) < 0.05


def test_fmnist_flip_images_are_the_t10k_images(fake_dir):
    """Guards the flip task's images read from the test files: the training images carry
    the same index pixels (indices below 10,000 too), so the whole image is compared with
    the t10k image this test wrote at that index."""
    images = fake_images(10000, len("t10k-images-idx3-ubyte"))
    task = get_benchmark("fmnist-flip").load_task(fake_dir, "flip", seed=0, **SMALL)
    for split in (task.train, task.val, task.test):
        np.testing.assert_array_equal(to_uint8(split.images), images[source_index(split.images)])


def test_two_tensors_of_one_shape_get_different_noise():
    """Guards the tensor's name in the noise seed: two equal layers of the same shape, both
    perturbed, must not stay equal (one shared draw would move them together)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].load_state_dict(model[0].state_dict())
    F.perturb_parameters(model, ("0", "1"), scale=0.5, seed=0)
    assert not torch.equal(model[0].weight, model[1].weight)
    assert not torch.equal(model[0].bias, model[1].bias)


def test_calibration_refuses_even_one_image_more_than_the_test_split_holds(
        calibrate_on_ten_images):
    """Guards the bound itself: 11 of 10 images is refused (arange(-1, 10) would score the
    last image twice), 10 of 10 is accepted."""
    calibrate, loaded = calibrate_on_ten_images
    with pytest.raises(ConfigError, match="at most 10.*got 11"):
        calibrate.blocknoise_accuracy([1.0], images=11)
    assert not loaded
    assert calibrate.blocknoise_accuracy([1.0], images=10)[("none", 0.0)] == 10


@pytest.mark.parametrize("bad, message", [
    (dict(images=0), r"images \(--images\)"),
    (dict(scales=[0.0]), r"noise scale \(--scales\) must be a positive number, got 0\.0"),
    (dict(scales=[float("nan")]), r"noise scale \(--scales\) must be a positive number"),
    (dict(seeds=()), "seeds must name at least one noise seed"),
])
def test_calibration_refuses_each_bad_value_for_its_own_reason(calibrate_on_ten_images, bad,
                                                               message):
    """Guards each of blocknoise_accuracy's checks on its own: with `images` within the
    10-image split (the default 2000 is refused by the images bound whatever else is
    wrong), a bad scale, no seeds or 0 images is still a ConfigError naming that value,
    raised before the model is loaded."""
    calibrate, loaded = calibrate_on_ten_images
    with pytest.raises(ConfigError, match=message):
        calibrate.blocknoise_accuracy(**{"scales": [1.0], "images": 10, **bad})
    assert not loaded
