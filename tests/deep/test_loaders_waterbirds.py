"""Waterbirds on a fixture `waterbird_complete95_forest2water2/metadata.csv` + JPEGs."""

import csv
import re
from collections import Counter

import pytest
import torch

from deep.data import DataError, get_benchmark
from deep.data.images import IMAGENET_MEAN, IMAGENET_STD
from tests.deep.fixtures import writers


@pytest.fixture
def waterbirds(tmp_path):
    return writers.write_waterbirds(tmp_path)


def metadata(root):
    with open(root / "waterbird_complete95_forest2water2" / "metadata.csv", newline="") as f:
        return {r["img_filename"]: r for r in csv.DictReader(f)}


def load(root, seed=0, test_per_class=0, **options):
    return get_benchmark("waterbirds").load_task(
        root, "group-balanced", n_target=8, val_per_class=4, test_per_class=test_per_class,
        seed=seed, resize=36, crop=32, **options)


def test_group_balanced_splits_from_the_official_partitions(waterbirds):
    rows = metadata(waterbirds)
    task = load(waterbirds)
    assert task.num_classes == 2 and len(task.group_names) == 4
    seen = []
    for split, partition, per_group in ((task.train, "1", 2), (task.val, "1", 2),
                                        (task.test, "2", 6)):
        assert Counter(split.groups.tolist()) == {g: per_group for g in range(4)}
        for path, y, group in zip(split.paths, split.labels.tolist(), split.groups.tolist()):
            row = rows[path.split("waterbird_complete95_forest2water2/")[1]]
            assert row["split"] == partition
            assert y == int(row["y"]) and group == 2 * int(row["y"]) + int(row["place"])
        seen += split.paths
    assert len(set(seen)) == len(seen)
    assert len(task.test) == 24, "test_per_class=0 keeps the whole test split"
    assert Counter(load(waterbirds, test_per_class=4).test.groups.tolist()) == {0: 2, 1: 2,
                                                                                2: 2, 3: 2}


@pytest.mark.parametrize("test_per_class", [0, 4])
def test_a_seeds_test_and_validation_images_do_not_depend_on_n_target(waterbirds, test_per_class):
    """Drawn test, val, then train: an n_target sweep scores every size on one test set,
    and its training sets are nested."""
    task = lambda n: get_benchmark("waterbirds").load_task(
        waterbirds, "group-balanced", n_target=n, val_per_class=2, test_per_class=test_per_class,
        seed=1, resize=36, crop=32)
    small, large = task(4), task(16)
    assert small.test.paths == large.test.paths and small.val.paths == large.val.paths
    assert set(small.train.paths) < set(large.train.paths)


def test_images_match_their_rows(waterbirds):
    """The decoded picture is the one the row describes (colour encodes y and place)."""
    x, y, g = next(load(waterbirds).test.batches(24))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((x * std + mean) * 255).mean(dim=(2, 3))
    place = g - 2 * y
    assert torch.allclose(rgb[:, 0], 200.0 * y + 20, atol=4)
    assert torch.allclose(rgb[:, 2], 200.0 * place + 20, atol=4)


def test_seed_determinism(waterbirds):
    assert load(waterbirds, seed=2).train.paths == load(waterbirds, seed=2).train.paths
    assert load(waterbirds, seed=2).train.paths != load(waterbirds, seed=3).train.paths


def test_source_is_the_training_split(waterbirds):
    source = get_benchmark("waterbirds").load_source(waterbirds, resize=36, crop=32)
    assert Counter(source.train.groups.tolist()) == {0: 6, 1: 2, 2: 2, 3: 6}
    assert len(source.test) == 24 and source.num_classes == 2


def test_source_test_split_is_split_2_and_train_split_0(waterbirds):
    """Guards the source test split read from split 1 (the fixture's splits 1 and 2 are
    the same size, so a count alone cannot tell them apart)."""
    rows = metadata(waterbirds)
    source = get_benchmark("waterbirds").load_source(waterbirds, resize=36, crop=32)
    for split, partition in ((source.train, "0"), (source.test, "2")):
        files = [p.split("waterbird_complete95_forest2water2/")[1] for p in split.paths]
        assert sorted(files) == sorted(f for f, r in rows.items() if r["split"] == partition)
        for f, y, group in zip(files, split.labels.tolist(), split.groups.tolist()):
            assert y == int(rows[f]["y"]) and group == 2 * int(rows[f]["y"]) + int(rows[f]["place"])


def test_not_enough_of_a_group(waterbirds):
    # 6 images of group 0 in the target partition; validation (drawn first) took 1
    with pytest.raises(DataError, match="train split, per group.*class 0 has 5 examples left, 7"):
        get_benchmark("waterbirds").load_task(waterbirds, "group-balanced", 28, 2, 0, seed=0)


@pytest.mark.parametrize("counts, message", [
    ((8, 4, -1), "test_per_class must be at least 0, got -1"),
    ((8, -2, 0), "val_per_class must be at least 1, got -2"),
    ((8.0, 4, 0), "n_target must be an integer, got 8.0"),
])
def test_bad_draw_counts_are_refused_not_sliced(waterbirds, counts, message):
    """pool[:-1] would have kept all but one test image."""
    from deep.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        get_benchmark("waterbirds").load_task(waterbirds, "group-balanced", *counts, seed=0,
                                              resize=36, crop=32)


def rewrite(root, edit):
    path = root / "waterbird_complete95_forest2water2" / "metadata.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def test_missing_column(waterbirds):
    rewrite(waterbirds, lambda lines: [",".join(l.split(",")[:4] + l.split(",")[5:]) for l in lines])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['place'\]"):
        load(waterbirds)


def test_out_of_range_label(waterbirds):
    rewrite(waterbirds, lambda lines: lines[:3] + [lines[3].replace(",0,0,", ",2,0,", 1)] + lines[4:])
    with pytest.raises(DataError, match="line 4 of .*metadata.csv: y and place must be 0/1"):
        load(waterbirds)


def test_out_of_range_place(waterbirds):
    """Guards the place check: place 2 would make group 2y + 2, another group's index."""
    rewrite(waterbirds, lambda lines: lines[:3] + [lines[3].replace(",0,0,0,", ",0,0,2,", 1)] + lines[4:])
    with pytest.raises(DataError, match="line 4 of .*metadata.csv: y and place must be 0/1.*place=2"):
        load(waterbirds)


def test_missing_image_and_directory(waterbirds, tmp_path):
    with pytest.raises(DataError, match="(?s)--data-dir.*metadata.csv"):
        load(None)
    with pytest.raises(DataError, match="metadata.csv not found"):
        load(tmp_path / "waterbird_complete95_forest2water2" / "001.Black_footed_Albatross")
    row = next(r for r in metadata(waterbirds).values() if r["split"] == "2")
    (waterbirds / "waterbird_complete95_forest2water2" / row["img_filename"]).unlink()
    with pytest.raises(DataError, match=r"waterbirds/test: 1 image file\(s\) listed in "
                                         r"metadata.csv are missing, e.g. .*"
                                         f"{re.escape(row['img_filename'])}; expected:\nWaterbirds \\("):
        load(waterbirds)


def test_corrupt_jpeg(waterbirds):
    task = load(waterbirds)
    writers.corrupt_jpeg(task.val.paths[0])
    with pytest.raises(DataError, match="cannot decode image"):
        list(task.val.batches(4))


def test_an_odd_val_per_class_gives_each_class_exactly_that_many_images():
    """Guards draw_group_splits' validation shares: with val_per_class odd, each class gets
    exactly val_per_class images, the larger half from its first group (2y + 0)."""
    from deep.data.images import draw_group_splits
    groups = torch.arange(400) % 4                     # group = 2 * label + spurious
    partition = torch.where(torch.arange(400) < 300, 1, 2)
    train, val, test = draw_group_splits(groups, partition, n_target=8, val_per_class=3,
                                         test_per_class=4, seed=0, what="toy")
    assert Counter(groups[val].tolist()) == {0: 2, 1: 1, 2: 2, 3: 1}
    assert Counter((groups[val] // 2).tolist()) == {0: 3, 1: 3}
    assert (partition[val] == 1).all() and not set(val.tolist()) & set(train.tolist())
    assert Counter(groups[test].tolist()) == {g: 2 for g in range(4)}


def test_a_drawn_test_split_comes_from_the_test_partition(waterbirds):
    """With test_per_class > 0 the test images are drawn from the official test split
    (partition 2), apart from the training and validation images of partition 1."""
    rows = metadata(waterbirds)
    task = load(waterbirds, test_per_class=4)
    partition = lambda split: {rows[p.split("waterbird_complete95_forest2water2/")[1]]["split"]
                               for p in split.paths}
    assert partition(task.test) == {"2"} and partition(task.train) == partition(task.val) == {"1"}
    assert not set(task.test.paths) & (set(task.train.paths) | set(task.val.paths))


def test_a_truncated_metadata_file_says_so(waterbirds):
    """An interrupted copy ends mid-row: the message names the short line and the likely
    cause, not "y, place and split must be integers, got None, None, None"."""
    path = waterbirds / "waterbird_complete95_forest2water2" / "metadata.csv"
    text = path.read_text()
    path.write_text(text[:text.index("\n", len(text) // 2) + 12])
    with pytest.raises(DataError, match=r"line \d+ of .*metadata.csv has fewer fields than the "
                                        r"header's 6; the file may be truncated"):
        load(waterbirds)


def test_an_image_listed_twice_is_refused(waterbirds):
    """A repeated row (e.g. two metadata files concatenated) would let one image be drawn
    into the target training set and the validation set at once, or count twice in test."""
    n = len(metadata(waterbirds)) + 1            # lines in the file: header + one per image
    rewrite(waterbirds, lambda lines: lines + [lines[-1]])
    with pytest.raises(DataError, match=rf"line {n + 1} of .*metadata.csv lists .*\.jpg again "
                                        rf"\(first on line {n}\)"):
        load(waterbirds)


def test_group_names_follow_the_group_index_of_bird_and_place(waterbirds):
    """Guards GROUP_NAMES' order against group = 2 y + place: each example's group name
    must say its row's bird (y 0 landbird, 1 waterbird) and place (0 land, 1 water)."""
    rows = metadata(waterbirds)
    task = load(waterbirds)
    for path, group in zip(task.test.paths, task.test.groups.tolist()):
        row = rows[path.split("waterbird_complete95_forest2water2/")[1]]
        bird = "waterbird" if row["y"] == "1" else "landbird"
        place = "water" if row["place"] == "1" else "land"
        assert task.group_names[group] == f"{bird}_{place}"


def test_a_metadata_file_with_no_rows_is_named(waterbirds):
    """A header alone (an empty export) is a DataError naming the file, not an IndexError."""
    rewrite(waterbirds, lambda lines: lines[:1])
    with pytest.raises(DataError, match="metadata.csv has no rows"):
        load(waterbirds)


@pytest.mark.parametrize("partition_of_group_3, counts, where", [
    (2, dict(n_target=2, val_per_class=1, test_per_class=0), "groups of split 1"),
    (1, dict(n_target=4, val_per_class=2, test_per_class=1), "groups of split 2"),
])
def test_a_partition_missing_a_group_is_refused_even_when_no_draw_needs_it(
        partition_of_group_3, counts, where):
    """Guards check_all_classes in draw_group_splits: with val_per_class=1 and n_target=2
    (or test_per_class=1) the counts per group are [1, 0, 1, 0] and [1, 1, 0, 0], so no
    draw asks for group 3; a partition without it must still be refused, or the worst
    group would be taken over 3 groups without a word."""
    from deep.data.images import draw_group_splits
    groups = torch.arange(40) % 4
    partition = torch.where(torch.arange(40) < 20, 1, 2)
    partition[groups == 3] = partition_of_group_3
    with pytest.raises(DataError, match=rf"toy \({where}\): no example of class\(es\) \[3\]"):
        draw_group_splits(groups, partition, seed=0, what="toy", **counts)


def test_the_seed_draws_the_validation_and_test_images_too(waterbirds):
    """Guards every draw of draw_group_splits using the seeded generator: each seed is a
    replicate with its own validation (and drawn test) images, not only its own training
    images (2 of each group's 6 in split 1 here, so four seeds cannot all agree by chance)."""
    tasks = [load(waterbirds, seed=seed, test_per_class=4) for seed in range(4)]
    assert len({tuple(t.val.paths) for t in tasks}) > 1
    assert len({tuple(t.test.paths) for t in tasks}) > 1
