"""deep.data.base: the class-balanced draws every loader relies on."""

from __future__ import annotations

import pytest
import torch

from deep.data import benchmark_names, get_benchmark
from deep.data.base import DataError, class_balanced_indices, draw_splits, seeded, split_counts


def test_per_class_counts_line_up_with_class_indices_even_when_a_class_is_absent():
    labels = torch.tensor([0, 0, 0, 2, 2, 2])           # class 1 missing
    with pytest.raises(DataError, match="class 1 has 0 examples left, 1 requested"):
        class_balanced_indices(labels, [1, 1, 1], seeded(0))
    idx = class_balanced_indices(labels, [2, 0, 1], seeded(0))
    assert labels[idx].tolist() == [0, 0, 2]


def test_a_negative_count_is_refused_not_sliced_from_the_end():
    labels = torch.arange(2).repeat(5)
    with pytest.raises(DataError, match="t: the count of class 1 must be at least 0, got -1"):
        class_balanced_indices(labels, [2, -1], seeded(0), what="t")


def test_draw_splits_are_disjoint_balanced_nested_and_seeded():
    labels = torch.arange(10).repeat(50)                 # 10 classes x 50 images
    small = draw_splits(labels, 10, 30, 2, 5, seed=3, what="t")
    large = draw_splits(labels, 10, 100, 2, 5, seed=3, what="t")
    train, val, test = large
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == 100 + 20 + 50
    assert torch.bincount(labels[train]).tolist() == [10] * 10
    assert torch.equal(small[2], test) and torch.equal(small[1], val)   # test/val fixed by seed
    assert set(small[0].tolist()) <= set(train.tolist())                # nested training sets
    assert not torch.equal(draw_splits(labels, 10, 30, 2, 5, seed=4, what="t")[2], test)
    with pytest.raises(ValueError, match="val_per_class must be at least 1"):
        draw_splits(labels, 10, 30, 0, 5, seed=3, what="t")


def test_split_counts_give_the_remainder_to_the_first_classes():
    # Guards the remainder going to the last classes (the docstring's rule; 13 = 10 + 3).
    assert split_counts(7, 3) == [3, 2, 2]
    labels = torch.arange(10).repeat(50)
    train, _, _ = draw_splits(labels, 10, 13, 1, 1, seed=0, what="t")
    assert torch.bincount(labels[train], minlength=10).tolist() == [2, 2, 2] + [1] * 7


def test_a_seeds_test_set_does_not_depend_on_val_per_class():
    # Guards drawing val before test: another val_per_class would change the test images.
    labels = torch.arange(10).repeat(50)
    a = draw_splits(labels, 10, 30, 2, 5, seed=3, what="t")
    b = draw_splits(labels, 10, 30, 7, 5, seed=3, what="t")
    assert torch.equal(a[2], b[2])


def test_file_split_takes_the_rows_files_labels_and_groups(tmp_path):
    from PIL import Image
    from deep.data.base import FileSplit, file_split
    files = [f"a/{i}.png" for i in range(4)]
    (tmp_path / "a").mkdir()
    for i, name in enumerate(files):
        Image.new("RGB", (2, 2), (60 * i, 0, 0)).save(tmp_path / name)
    labels, groups = torch.tensor([0, 1, 0, 1]), torch.tensor([3, 2, 1, 0])
    transform = lambda im: torch.tensor(im.getpixel((0, 0)), dtype=torch.float32)[:, None, None]
    split = file_split(tmp_path, files, labels, groups, torch.tensor([3, 1]), transform, 0,
                       "bench/train", "meta.csv", "LAYOUT")
    assert isinstance(split, FileSplit) and split.name == "bench/train"
    assert split.paths == [str(tmp_path / "a/3.png"), str(tmp_path / "a/1.png")]
    assert split.labels.tolist() == [1, 1] and split.groups.tolist() == [0, 2]
    (x, y, g), = split.batches(2)
    assert x[:, 0, 0, 0].tolist() == [180.0, 60.0] and y.tolist() == [1, 1]
    ungrouped = file_split(tmp_path, files, labels, None, torch.tensor([0]), transform, 0,
                           "bench/val", "meta.csv", "LAYOUT")
    assert ungrouped.groups is None and ungrouped.labels.tolist() == [0]


def test_file_split_names_the_split_the_metadata_and_the_layout_of_missing_files(tmp_path):
    from deep.data.base import file_split
    (tmp_path / "there.png").write_bytes(b"")
    files = ["there.png", "gone.png", "also-gone.png"]
    with pytest.raises(DataError) as err:
        file_split(tmp_path, files, torch.tensor([0, 1, 0]), None, torch.tensor([0, 1, 2]),
                   None, 0, "bench/test", "meta.csv", "<data-dir>/meta.csv\n<data-dir>/*.png")
    assert str(err.value) == (f"bench/test: 2 image file(s) listed in meta.csv are missing, "
                              f"e.g. {tmp_path / 'gone.png'}; expected:\n"
                              "<data-dir>/meta.csv\n<data-dir>/*.png")
    # only the rows asked for are checked
    split = file_split(tmp_path, files, torch.tensor([0, 1, 0]), None, torch.tensor([0]), None,
                       0, "bench/test", "meta.csv", "")
    assert len(split) == 1


def test_to_float_images_maps_each_pixel_by_hand():
    """uint8 (n, H, W, C) -> (n, C, H, W) with out[i, c, h, w] = (a[i, h, w, c] / 255 - m[c]) / s[c].
    Square images: a rows/columns swap keeps the shape, so only the values can catch it."""
    import numpy as np
    from deep.data.base import to_float_images
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 5, 5, 3), dtype=np.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.4, 0.8)
    out = to_float_images(rgb, mean, std)
    assert out.shape == (2, 3, 5, 5) and out.dtype == torch.float32
    for i in range(2):
        for c in range(3):
            for h in range(5):
                for w in range(5):
                    expected = (rgb[i, h, w, c] / 255 - mean[c]) / std[c]
                    assert abs(out[i, c, h, w].item() - expected) < 1e-5, (i, c, h, w)
    grey = rgb[..., 0]
    out = to_float_images(grey, (0.3,), (0.6,))
    assert out.shape == (2, 1, 5, 5)
    assert abs(out[1, 0, 3, 1].item() - (grey[1, 3, 1] / 255 - 0.3) / 0.6) < 1e-5


def test_a_task_refuses_a_label_equal_to_num_classes():
    """Guards `>=` in ShiftTask's label check: label 2 of a 2-class task is out of range."""
    from deep.data.base import ShiftTask, TensorSplit
    split = lambda labels: TensorSplit(torch.zeros(len(labels), 1, 2, 2), torch.tensor(labels))
    ShiftTask("b", "s", 2, split([0, 1]), split([1]), split([0]))
    with pytest.raises(DataError, match=r"b/s: val labels must lie in \[0, 2\), got \[1, 2\]"):
        ShiftTask("b", "s", 2, split([0, 1]), split([1, 2]), split([0]))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_shuffled_file_batches_keep_each_image_with_its_label_and_group(tmp_path, num_workers):
    """Guards labels and groups indexed by the shuffled order, like the images: image i is
    red 40 i with label i and group 5 - i, and every example of every batch must agree."""
    from PIL import Image
    from deep.data.base import FileSplit
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    for i, path in enumerate(paths):
        Image.new("RGB", (2, 2), (40 * i, 0, 0)).save(path)
    transform = _RedPixel()
    split = FileSplit(paths, torch.arange(6), 5 - torch.arange(6), transform, num_workers)
    seen = []
    for x, y, g in split.batches(4, shuffle=True, generator=seeded(0)):
        red = (x[:, 0, 0, 0] / 40).round().long()
        assert torch.equal(red, y) and torch.equal(g, 5 - y)
        seen += y.tolist()
    assert seen == torch.randperm(6, generator=seeded(0)).tolist() != list(range(6))


class _RedPixel:
    """The red value of pixel (0, 0) as a (1, 1, 1) tensor (a class: workers pickle it)."""

    def __call__(self, image):
        return torch.tensor(float(image.getpixel((0, 0))[0]))[None, None, None]


@pytest.mark.parametrize("benchmark", [b for b in benchmark_names() if b != "synthetic"])
def test_a_file_given_as_the_data_folder_is_named_as_a_file(tmp_path, benchmark):
    """The Fashion-MNIST and BREEDS loaders said such a folder "does not exist"."""
    (tmp_path / "a-file").write_text("x")
    bench = get_benchmark(benchmark)
    with pytest.raises(DataError, match=f"{tmp_path}/a-file is a file, not a folder"):
        bench.load_task(tmp_path / "a-file", bench.shifts[0], 4, 1, 1, 0)


def test_a_normalisation_std_of_zero_is_refused():
    """Guards `std > 0` in mean_std: a zero std would divide every pixel of that channel
    by zero (inf / nan images) instead of stopping with an error naming the option."""
    from deep.data.base import mean_std
    with pytest.raises(ValueError, match=r"std > 0, got mean=\(0.5, 0.5, 0.5\), std=\(0.5, 0.0, "):
        mean_std(((0.5,) * 3, (0.5, 0.0, 0.5)), ((0.0,) * 3, (1.0,) * 3))
    assert mean_std(None, ((0.1, 0.2, 0.3), (1, 2, 3))) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))


def test_a_task_refuses_a_negative_label():
    """Guards the lower bound of ShiftTask's label check (-1 marks "no group" in groups,
    never a class)."""
    from deep.data.base import ShiftTask, TensorSplit
    split = lambda labels: TensorSplit(torch.zeros(len(labels), 1, 2, 2), torch.tensor(labels))
    with pytest.raises(DataError, match=r"b/s: test labels must lie in \[0, 2\), got \[-1, 1\]"):
        ShiftTask("b", "s", 2, split([0, 1]), split([1]), split([-1, 1]))


def test_file_split_subset_keeps_each_path_with_its_label_and_group(tmp_path):
    """Guards FileSplit.subset indexing the groups like the paths and labels."""
    from deep.data.base import FileSplit
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    split = FileSplit(paths, torch.tensor([0, 1, 2, 3]), torch.tensor([30, 31, 32, 33]), None)
    sub = split.subset([2, 0, 3, 1])
    assert sub.paths == [str(tmp_path / f"{i}.png") for i in (2, 0, 3, 1)]
    assert sub.labels.tolist() == [2, 0, 3, 1] and sub.groups.tolist() == [32, 30, 33, 31]


def test_an_image_removed_after_the_split_was_made_is_a_data_error_naming_it(tmp_path):
    """file_split checks the files when a task is made; one deleted later (a cleanup while
    a sweep runs) still ends in a DataError naming it, not a bare FileNotFoundError."""
    from PIL import Image
    from deep.data.base import FileSplit
    path = tmp_path / "gone.png"
    Image.new("RGB", (2, 2)).save(path)
    split = FileSplit([path], torch.tensor([0]), None, _RedPixel())
    path.unlink()
    with pytest.raises(DataError, match=f"image file missing: {path}"):
        list(split.batches(1))


def test_shuffled_tensor_batches_keep_each_image_with_its_label_and_group():
    """The TensorSplit twin of the FileSplit check above: image i holds the value i, label i
    and group 5 - i; every batch of a shuffled pass must agree."""
    from deep.data.base import TensorSplit
    split = TensorSplit(torch.arange(6.0).view(6, 1, 1, 1), torch.arange(6), 5 - torch.arange(6))
    seen = []
    for x, y, g in split.batches(4, shuffle=True, generator=seeded(0)):
        assert torch.equal(x.flatten().long(), y) and torch.equal(g, 5 - y)
        seen += y.tolist()
    assert seen == torch.randperm(6, generator=seeded(0)).tolist() != list(range(6))


def test_a_normalisation_with_a_mean_or_std_of_the_wrong_length_is_refused():
    """Guards both length checks in mean_std: two numbers for three channels would fail
    deep in the loader (or broadcast one number over all channels) instead of naming the
    option."""
    from deep.data.base import mean_std
    with pytest.raises(ValueError, match=r"3 numbers each and std > 0, got mean=\(0.5, 0.5\)"):
        mean_std(((0.5, 0.5), (0.2, 0.2, 0.2)), ((0.0,) * 3, (1.0,) * 3))
    with pytest.raises(ValueError, match=r"3 numbers each and std > 0, got mean=\(0.5, 0.5, "
                                         r"0.5\), std=\(0.2, 0.2\)"):
        mean_std(((0.5,) * 3, (0.2, 0.2)), ((0.0,) * 3, (1.0,) * 3))


def test_benchmark_names_are_listed_alphabetically():
    """Guards `sorted` in benchmark_names: the CLI's choices and the "unknown benchmark"
    message list them alphabetically, not in the order of `_MODULES`' lines."""
    names = benchmark_names()
    assert names == sorted(names) and names[0] == "camelyon17"
    with pytest.raises(DataError, match=r"unknown benchmark 'nope'; known: camelyon17, celeba, "
                                        r"cifar-flip, cifar10c, "):
        get_benchmark("nope")


def test_a_split_refuses_labels_or_groups_of_another_length_than_its_images():
    """Guards the length checks of `_check_labels`: one label or group short would pair
    every later image with another example's label (or fail mid-epoch on an index)."""
    from deep.data.base import FileSplit, TensorSplit
    images = torch.zeros(3, 1, 2, 2)
    with pytest.raises(DataError, match=r"s: labels must be int64 of shape \(3,\), got torch.int64 \(2,\)"):
        TensorSplit(images, torch.tensor([0, 1]), name="s")
    with pytest.raises(DataError, match=r"s: groups must be int64 of shape \(3,\), got torch.int64 \(2,\)"):
        TensorSplit(images, torch.tensor([0, 1, 0]), torch.tensor([0, 1]), name="s")
    with pytest.raises(DataError, match=r"f: labels must be int64 of shape \(2,\)"):
        FileSplit(["a.png", "b.png"], torch.tensor([0, 1, 0]), None, None, name="f")


def test_one_count_for_every_class_takes_only_the_classes_present():
    """Guards `torch.unique` in class_balanced_indices: with one int count, the classes
    are those in `labels` (class 1 absent here is not a class short of examples)."""
    labels = torch.tensor([0, 0, 2, 2, 5, 5])
    idx = class_balanced_indices(labels, 1, seeded(0))
    assert labels[idx].tolist() == [0, 2, 5]


def test_file_split_subset_keeps_the_transform_workers_and_name():
    """Guards FileSplit.subset passing its settings on: a subset decoded without the
    workers asked for would run a 224-px benchmark's decoding in the main process."""
    from deep.data.base import FileSplit
    transform = _RedPixel()
    split = FileSplit(["a.png", "b.png"], torch.tensor([0, 1]), None, transform,
                      num_workers=3, name="bench/val")
    sub = split.subset([1])
    assert (sub.transform, sub.num_workers, sub.name) == (transform, 3, "bench/val")


def test_file_split_takes_a_folder_named_like_an_image_for_a_missing_file(tmp_path):
    """Guards `is_file` in file_split: a folder where the metadata lists an image (an
    archive unpacked one level too deep) is missing when the task is made, not a decode
    error hours later."""
    from deep.data.base import file_split
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").mkdir()
    with pytest.raises(DataError, match=r"bench/train: 1 image file\(s\) listed in meta.csv are "
                                        r"missing, e.g. .*a/0.png"):
        file_split(tmp_path, ["a/0.png"], torch.tensor([0]), None, torch.tensor([0]), None, 0,
                   "bench/train", "meta.csv", "")


@pytest.mark.parametrize("n", [1, 4, 5, 9])
def test_tensor_batches_visit_every_example_once_a_last_batch_of_one_included(n):
    """Guards the range of TensorSplit.batches: a last batch of a single example (5 and 9
    examples in batches of 4, a split of one) is yielded, not dropped."""
    from deep.data.base import TensorSplit
    split = TensorSplit(torch.arange(float(n)).view(n, 1, 1, 1), torch.arange(n))
    sizes = [len(y) for _, y, _ in split.batches(4)]
    assert sizes == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert torch.cat([y for _, y, _ in split.batches(4)]).tolist() == list(range(n))


def test_a_draw_of_no_class_is_an_empty_index_tensor():
    """Guards the dtype of class_balanced_indices' empty result: int64, so it indexes a
    split (a float tensor is no index: `labels[idx]` would raise)."""
    labels = torch.tensor([0, 1, 1])
    idx = class_balanced_indices(labels, [], seeded(0))
    assert idx.dtype == torch.int64 and labels[idx].tolist() == []
