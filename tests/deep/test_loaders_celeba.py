"""CelebA on a fixture `celeba/{img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt}`."""

import os
import re
from collections import Counter

import pytest
import torch

from deep.data import DataError, get_benchmark
from deep.data.celeba import read_attributes
from deep.data.images import IMAGENET_MEAN, IMAGENET_STD
from tests.deep.fixtures import writers


@pytest.fixture
def celeba(tmp_path):
    return writers.write_celeba(tmp_path)


def load(root, seed=0, test_per_class=0, **options):
    return get_benchmark("celeba").load_task(root, "group-balanced", n_target=8, val_per_class=4,
                                             test_per_class=test_per_class, seed=seed,
                                             resize=32, crop=32, **options)


def truth(root):
    """(partition, blond, male) per file, read directly from the fixture's text files."""
    lines = (root / "celeba" / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    attrs = {l.split()[0]: l.split()[1:] for l in lines[2:]}
    parts = dict(l.split() for l in (root / "celeba" / "list_eval_partition.txt").read_text().splitlines())
    return {f: (int(parts[f]), int(v[names.index("Blond_Hair")] == "1"),
                int(v[names.index("Male")] == "1")) for f, v in attrs.items()}


def test_groups_and_partitions(celeba):
    facts = truth(celeba)
    task = load(celeba)
    assert task.group_names == ("not_blond_female", "not_blond_male", "blond_female", "blond_male")
    seen = []
    for split, partition, per_group in ((task.train, 1, 2), (task.val, 1, 2), (task.test, 2, 6)):
        assert Counter(split.groups.tolist()) == {g: per_group for g in range(4)}
        for path, y, group in zip(split.paths, split.labels.tolist(), split.groups.tolist()):
            p, blond, male = facts[path.rsplit("/", 1)[1]]
            assert p == partition and y == blond and group == 2 * blond + male
        seen += split.paths
    assert len(set(seen)) == len(seen)


def test_images_match_their_attributes(celeba):
    x, y, g = next(load(celeba).test.batches(24))
    assert x.shape == (24, 3, 32, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((x * std + mean) * 255).mean(dim=(2, 3))
    assert torch.allclose(rgb[:, 0], 200.0 * y + 20, atol=4)
    assert torch.allclose(rgb[:, 2], 200.0 * (g - 2 * y) + 20, atol=4)


def test_seed_determinism_and_other_attributes(celeba):
    assert load(celeba, seed=1).val.paths == load(celeba, seed=1).val.paths
    assert load(celeba, seed=1).val.paths != load(celeba, seed=2).val.paths
    with pytest.raises(ValueError, match="unknown CelebA attribute 'Blonde_Hair'"):
        load(celeba, target_attribute="Blonde_Hair")


def test_source_is_partition_0(celeba):
    source = get_benchmark("celeba").load_source(celeba, resize=32, crop=32)
    assert Counter(source.train.groups.tolist()) == {0: 6, 1: 6, 2: 6, 3: 1}
    assert len(source.test) == 24


def test_source_test_split_is_partition_2_and_train_partition_0(celeba):
    """Guards the source test split read from partition 1 (the fixture's partitions 1 and
    2 are the same size, so a count alone cannot tell them apart)."""
    facts = truth(celeba)
    source = get_benchmark("celeba").load_source(celeba, resize=32, crop=32)
    for split, partition in ((source.train, 0), (source.test, 2)):
        files = [path.rsplit("/", 1)[1] for path in split.paths]
        assert sorted(files) == sorted(f for f, (p, _, _) in facts.items() if p == partition)
        for f, y, group in zip(files, split.labels.tolist(), split.groups.tolist()):
            _, blond, male = facts[f]
            assert y == blond and group == 2 * blond + male


def test_attribute_file_parsing(celeba):
    names, files, table = read_attributes(celeba / "celeba" / "list_attr_celeba.txt")
    assert len(names) == 40 and names[9] == "Blond_Hair" and names[20] == "Male"
    assert len(files) == len(table) == 19 + 48 and table.shape[1] == 40
    assert set(table.unique().tolist()) == {-1, 1}


def test_truncated_or_malformed_attribute_file(celeba):
    path = celeba / "celeba" / "list_attr_celeba.txt"
    text = path.read_text()
    writers.truncate(path, keep=0.5)
    with pytest.raises(DataError, match="announces 67 images on line 1 but lists"):
        load(celeba)
    path.write_text(text.replace("Male ", "Mal ", 1).replace(" Young", ""))
    with pytest.raises(DataError, match="line 2 of .* must name 40 attributes, got 39"):
        load(celeba)
    lines = text.splitlines()
    lines[5] = lines[5][:-2] + " 0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"must be \+1 or -1 \(line 6\)"):
        load(celeba)
    lines = text.splitlines()
    lines[6] = lines[4].split()[0] + " " + lines[6].split(maxsplit=1)[1]   # line 7 = line 5's file
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"lists {lines[4].split()[0]} more than once \(line 7\)"):
        load(celeba)


def test_partition_file_problems(celeba):
    path = celeba / "celeba" / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match="1 image.* have no partition"):
        load(celeba)
    path.write_text("\n".join([lines[0].replace(" ", " 3 ")] + lines[1:]) + "\n")
    with pytest.raises(DataError, match="line 1 of .*list_eval_partition.txt"):
        load(celeba)


def test_missing_data(celeba, tmp_path):
    with pytest.raises(DataError, match="(?s)--data-dir.*list_attr_celeba.txt"):
        load(None)
    with pytest.raises(DataError, match="list_attr_celeba.txt not found"):
        load(tmp_path / "celeba" / "img_align_celeba")
    (celeba / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="missing file .*list_eval_partition.txt"):
        load(celeba)


def test_missing_and_corrupt_image(celeba):
    task = load(celeba)
    writers.corrupt_jpeg(task.train.paths[1])
    with pytest.raises(DataError, match="cannot decode image .*jpg"):
        list(task.train.batches(8))
    os.unlink(task.test.paths[0])
    with pytest.raises(DataError, match=r"celeba/test: 1 image file\(s\) listed in "
                                         r"list_attr_celeba.txt are missing, e.g. "
                                         f"{re.escape(task.test.paths[0])}; expected:\n"):
        load(celeba)


def test_non_integer_attribute_value(celeba):
    path = celeba / "celeba" / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:-2] + " x"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="non-integer attribute value"):
        load(celeba)


def test_an_image_listed_twice_in_the_partition_file_is_refused(celeba):
    """The later line used to win silently: an image in two partitions is a damaged file."""
    path = celeba / "celeba" / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    name, part = lines[0].split()
    path.write_text("\n".join(lines + [f"{name} {(int(part) + 1) % 3}"]) + "\n")
    with pytest.raises(DataError, match=rf"line {len(lines) + 1} of .*list_eval_partition.txt "
                                        rf"lists {name} a second time"):
        load(celeba)


def test_other_attributes_give_their_labels_groups_and_group_names(celeba):
    """Guards the target and spurious options reaching the labels, and the group names of
    other attributes in group order 2 * label + spurious: here Male is the label and
    Blond_Hair the spurious attribute (the fixture's partitions 1 and 2 hold all four)."""
    facts = truth(celeba)
    task = load(celeba, target_attribute="Male", spurious_attribute="Blond_Hair")
    assert task.group_names == ("Male=0_Blond_Hair=0", "Male=0_Blond_Hair=1",
                                "Male=1_Blond_Hair=0", "Male=1_Blond_Hair=1")
    for split in (task.train, task.val, task.test):
        for path, y, group in zip(split.paths, split.labels.tolist(), split.groups.tolist()):
            _, blond, male = facts[path.rsplit("/", 1)[1]]
            assert y == male and group == 2 * male + blond


def test_a_missing_image_folder_is_named(celeba):
    """Without img_align_celeba/ (the zip not extracted) the error names that folder, not
    the first of the thousands of images it should hold."""
    import shutil
    shutil.rmtree(celeba / "celeba" / "img_align_celeba")
    with pytest.raises(DataError, match="celeba: missing image folder .*img_align_celeba"):
        load(celeba)


def test_the_order_of_the_attribute_lines_does_not_matter(celeba):
    """Guards the partition looked up per file name: with list_attr_celeba.txt's rows in
    reverse order, every image still gets its own partition, label and group."""
    path = celeba / "celeba" / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + lines[2:][::-1]) + "\n")
    facts = truth(celeba)
    task = load(celeba)
    for split, partition in ((task.train, 1), (task.val, 1), (task.test, 2)):
        for path_, y, group in zip(split.paths, split.labels.tolist(), split.groups.tolist()):
            p, blond, male = facts[path_.rsplit("/", 1)[1]]
            assert p == partition and y == blond and group == 2 * blond + male


def test_a_partition_line_with_an_extra_field_is_refused(celeba):
    """Guards the exact '<file> <0|1|2>' format: a third field (two files run together, or
    another list pasted in) is a damaged line, not read as its first two fields."""
    path = celeba / "celeba" / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    lines[2] += " 1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 3 of .*list_eval_partition.txt must be"):
        load(celeba)


def rewrite_line(path, number, edit):
    """Replace line `number` (1-based) of a text file with `edit(line)`."""
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def test_a_first_line_that_is_not_the_image_count_is_refused_by_name(celeba):
    """Line 1 of list_attr_celeba.txt is the number of images: a file without it (the
    names first) is a DataError quoting the line, not a ValueError from int()."""
    path = celeba / "celeba" / "list_attr_celeba.txt"
    rewrite_line(path, 1, lambda line: "images: " + line)
    with pytest.raises(DataError, match=r"line 1 of .*list_attr_celeba.txt must be the number "
                                        r"of images, got 'images: 67'"):
        load(celeba)
    path.write_text("67\n")
    with pytest.raises(DataError, match="must start with a count line and an attribute-name line"):
        load(celeba)


def test_41_attribute_names_are_refused_as_surely_as_39(celeba):
    """Guards the exact count of 40 names: an extra name would shift no column, but it
    says the file is another list; refused, with the count found."""
    rewrite_line(celeba / "celeba" / "list_attr_celeba.txt", 2, lambda line: line + " Extra")
    with pytest.raises(DataError, match="line 2 of .* must name 40 attributes, got 41"):
        load(celeba)


def test_more_image_rows_than_line_1_announces_are_refused(celeba):
    """Guards the count check in both directions: a row appended after the announced 67
    (two files run together) is refused as surely as a truncated file."""
    path = celeba / "celeba" / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    extra = "999999.jpg" + lines[-1][len("000067.jpg"):]
    path.write_text("\n".join(lines + [extra]) + "\n")
    with pytest.raises(DataError, match="announces 67 images on line 1 but lists 68"):
        load(celeba)


def test_a_row_with_an_extra_value_is_refused_naming_its_line(celeba):
    """41 values on one row: the message names the line and the field count, not a
    "non-integer attribute value" from the values' total not dividing into rows."""
    rewrite_line(celeba / "celeba" / "list_attr_celeba.txt", 4, lambda line: line + "  1")
    with pytest.raises(DataError, match="line 4 of .*list_attr_celeba.txt must hold a file name "
                                        "and 40 values, got 42 fields"):
        load(celeba)


def test_partition_3_is_refused(celeba):
    """Only 0/1/2 (train/val/test) exist: an image of partition 3 would sit in no split."""
    rewrite_line(celeba / "celeba" / "list_eval_partition.txt", 2,
                 lambda line: line.split()[0] + " 3")
    with pytest.raises(DataError, match=r"line 2 of .*list_eval_partition.txt must be "
                                        r"'<file> <0\|1\|2>', got '\d+\.jpg 3'"):
        load(celeba)


def test_a_partition_file_without_test_images_is_refused(tmp_path):
    """No image in partition 2: the source data has no test split and the target task
    no test set; both are DataErrors, not an empty split scored as accuracy 0/0."""
    counts = {k: n for k, n in writers.CELEBA_COUNTS.items() if k[0] != 2}
    root = writers.write_celeba(tmp_path, counts=counts)
    with pytest.raises(DataError, match="list_eval_partition.txt has no image in partition 0 or 2"):
        get_benchmark("celeba").load_source(root, resize=32, crop=32)
    with pytest.raises(DataError, match="the test split is empty"):
        load(root)


def test_an_unknown_spurious_attribute_is_refused_by_name(celeba):
    """Guards the spurious attribute's name check (the target's has its own test): the
    error lists the known attributes, not names.index's bare ValueError."""
    with pytest.raises(ValueError, match="unknown CelebA attribute 'Mael'; known: 5_o_Clock_Shadow"):
        load(celeba, spurious_attribute="Mael")


def test_drawn_val_and_test_splits_have_the_sizes_asked_for(celeba):
    """val_per_class 6 = 3 images of each class's two groups from partition 1;
    test_per_class 4 = 2 of each group from partition 2 (not the whole partition)."""
    facts = truth(celeba)
    task = get_benchmark("celeba").load_task(celeba, "group-balanced", n_target=4,
                                             val_per_class=6, test_per_class=4, seed=0,
                                             resize=32, crop=32)
    assert Counter(task.train.groups.tolist()) == {g: 1 for g in range(4)}
    assert Counter(task.val.groups.tolist()) == {g: 3 for g in range(4)}
    assert Counter(task.test.groups.tolist()) == {g: 2 for g in range(4)}
    for split, partition in ((task.val, 1), (task.test, 2)):
        assert {facts[p.rsplit("/", 1)[1]][0] for p in split.paths} == {partition}


def test_images_are_resized_and_cropped_to_224_px_by_default(celeba):
    """The module's default: shorter side resized to 224, then a 224 centre crop, for the
    target task and the source data alike. The first test image is noise here, so a
    default of another resize (e.g. 256, cropped back to 224) shows in the pixels."""
    import numpy as np
    from PIL import Image
    bench = get_benchmark("celeba")
    first = sorted(f for f, (p, _, _) in truth(celeba).items() if p == 2)[0]
    noise = np.random.default_rng(0).integers(0, 256, (44, 36, 3), dtype=np.uint8)
    Image.fromarray(noise).save(celeba / "celeba" / "img_align_celeba" / first, "JPEG")

    def first_image(**size):
        task = bench.load_task(celeba, "group-balanced", n_target=4, val_per_class=2,
                               test_per_class=0, seed=0, **size)
        source = bench.load_source(celeba, **size)
        out = []
        for split in (task.test, source.test):
            i = next(i for i, path in enumerate(split.paths) if path.endswith("/" + first))
            out.append(next(split.subset([i]).batches(1))[0])
        return out

    default = first_image()
    assert all(x.shape == (1, 3, 224, 224) for x in default)
    for x, explicit in zip(default, first_image(resize=224, crop=224)):
        assert torch.equal(x, explicit)
    for x, other in zip(default, first_image(resize=256, crop=224)):
        assert not torch.allclose(x, other, atol=0.1)
