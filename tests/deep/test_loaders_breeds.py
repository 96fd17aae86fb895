"""Living-17 / Entity-30 construction on a hand-made hierarchy, and the loaders on an
ImageNet-style fixture. Expected superclasses and splits are worked out by hand from the
rules of `robustness.tools.breeds_helpers` (see tests/deep/fixtures/writers.py)."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deep.data import DataError, get_benchmark
from deep.data.breeds import Hierarchy, breeds_split
from tests.deep.fixtures import writers
from tests.doc_text import doc_text

A_LEAVES = ["n01000011", "n01000012", "n01000013", "n01000014"]
B_LEAVES = ["n01000031", "n01000032", "n01000033", "n01000034", "n01000035"]
GAMMA_LEAVES = ["n01000041", "n01000042"]
ARTIFACT_LEAVES = ["n02000011", "n02000012", "n02000013", "n02000014",
                   "n02000021", "n02000022", "n02000023", "n02000024"]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return writers.write_breeds(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def info_dir(imagenet):
    return imagenet / "imagenet_class_hierarchy" / "modified"


def test_hierarchy_levels_are_longest_paths_and_irrelevant_nodes_pruned(info_dir):
    h = Hierarchy(info_dir)
    assert h.level["n00004258"] == 4  # also reachable at depth 2
    assert h.level["n01000001"] == 5 and h.level["n01000031"] == 8
    assert "n01999999" not in h.level, "a node with no class below it is pruned"
    assert "n05000001" not in h.level, "a class outside the hierarchy has no level"
    assert h.leaves_below("n01000002") == B_LEAVES
    assert h.nodes_at_level(5, "n00004258") == ["n01000001", "n01000002", "n01000003"]


def test_living17_rand_split(info_dir):
    superclasses, names, source, target = breeds_split(info_dir, "living17", "rand")
    # level 5 below "living thing" with >= 4 classes: alpha (4), beta (5); gamma has 2
    assert superclasses == ["n01000001", "n01000002"] and names == ["alpha", "beta"]
    # one RandomState(2) shared by the superclasses in wnid order; each draws 4 of its
    # sorted classes without replacement, first half source, second half target
    rng = np.random.RandomState(2)
    for pool, s, t in zip((A_LEAVES, B_LEAVES), source, target):
        drawn = list(rng.choice(pool, 4, replace=False))
        assert s == drawn[:2] and t == drawn[2:]
    assert set(source[1] + target[1]) <= set(B_LEAVES), "beta's classes via its single child"


def test_entity30_rand_split(info_dir):
    superclasses, _, source, target = breeds_split(info_dir, "entity30", "rand")
    # level 4 with >= 8 classes: living thing (alpha 4 + beta 5 + gamma 2), artifact (8)
    assert superclasses == ["n00004258", "n00021939"]
    pools = (sorted(A_LEAVES + B_LEAVES + GAMMA_LEAVES), ARTIFACT_LEAVES)
    rng = np.random.RandomState(2)
    for pool, s, t in zip(pools, source, target):
        drawn = list(rng.choice(pool, 8, replace=False))
        assert s == drawn[:4] and t == drawn[4:]


def test_good_and_bad_splits_by_hand(info_dir):
    _, _, source, target = breeds_split(info_dir, "living17", "good")
    # alpha: four one-class children -> 2 and 2 in order; beta: children beta-2 (3 classes)
    # then beta-1 (2): beta-2 gives 1 to source and 2 to target, beta-1 tops up the source
    assert source == [A_LEAVES[:2], ["n01000033", "n01000031"]]
    assert target == [A_LEAVES[2:], ["n01000034", "n01000035"]]
    _, _, source, target = breeds_split(info_dir, "living17", "bad")
    # similar classes stay together: beta-2's first two to source, beta-1's to target
    assert source[1] == ["n01000033", "n01000034"] and target[1] == ["n01000031", "n01000032"]


def load_task(imagenet, seed=0, **options):
    options = {"expected_superclasses": 2, "resize": 36, "crop": 32, **options}
    return get_benchmark("living17").load_task(imagenet, "subpopulation", n_target=4,
                                               val_per_class=2, test_per_class=3, seed=seed,
                                               **options)


def test_target_task_uses_target_subclasses_with_superclass_labels(imagenet, info_dir):
    _, _, source, target = breeds_split(info_dir, "living17", "rand")
    task = load_task(imagenet)
    assert task.num_classes == 2 and task.shift == "subpopulation"
    seen = []
    for split, folder, per_class in ((task.train, "train", 2), (task.val, "train", 2),
                                     (task.test, "val", 3)):
        assert Counter(split.labels.tolist()) == {0: per_class, 1: per_class}
        for path, label in zip(split.paths, split.labels.tolist()):
            parts = Path(path).parts
            assert parts[-3] == folder and parts[-2] in target[label]
        seen += split.paths
    assert len(set(seen)) == len(seen)
    x, y, g = next(task.train.batches(4))
    assert x.shape == (4, 3, 32, 32) and g is None


def test_seed_determinism(imagenet):
    assert load_task(imagenet, seed=5).train.paths == load_task(imagenet, seed=5).train.paths
    assert load_task(imagenet, seed=5).val.paths != load_task(imagenet, seed=6).val.paths


def test_source_data_are_the_source_subclasses(imagenet, info_dir):
    _, _, source, _ = breeds_split(info_dir, "entity30", "rand")
    data = get_benchmark("entity30").load_source(imagenet, expected_superclasses=2)
    assert data.num_classes == 2 and data.in_channels == 3
    assert len(data.train) == 2 * 4 * 6 and len(data.test) == 2 * 4 * 3
    for split, folder in ((data.train, "train"), (data.test, "val")):
        for path, label in zip(split.paths, split.labels.tolist()):
            assert Path(path).parts[-3] == folder and Path(path).parts[-2] in source[label]


def test_split_file_overrides_the_construction(imagenet, tmp_path):
    split = {"names": ["first", "second"], "source": [["n01000011"], ["n02000011"]],
             "target": [["n01000012", "n01000013"], ["n02000024"]]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    task = load_task(imagenet, split_file=str(path))
    assert {Path(p).parts[-2] for p in task.test.paths} == {"n01000012", "n01000013", "n02000024"}
    split["target"][0].append("n01000011")
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match="both source and target.*n01000011"):
        load_task(imagenet, split_file=str(path))
    # One wnid under two target superclasses: its images would appear twice, once per label.
    split["target"][0].pop()
    split["target"][1].append("n01000013")
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match="more than once in 'target'.*n01000013"):
        load_task(imagenet, split_file=str(path))


def test_superclass_count_is_checked(imagenet):
    with pytest.raises(DataError, match="gives 2 superclasses, expected 17"):
        get_benchmark("living17").load_task(imagenet, "subpopulation", 4, 2, 3, seed=0)


def test_missing_or_malformed_hierarchy(imagenet, tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_task(None)
    with pytest.raises(DataError, match="hierarchy files .* not found"):
        load_task(imagenet, info_dir=str(tmp_path))
    bad = tmp_path / "info"
    bad.mkdir()
    for name in ("dataset_class_info.json", "node_names.txt"):
        (bad / name).write_text((imagenet / "imagenet_class_hierarchy/modified" / name).read_text())
    with pytest.raises(DataError, match="missing file .*class_hierarchy.txt"):
        load_task(imagenet, info_dir=str(bad))
    (bad / "class_hierarchy.txt").write_text("n00001740 n00001930\nn00001930\n")
    with pytest.raises(DataError, match="line 2 of .*class_hierarchy.txt"):
        load_task(imagenet, info_dir=str(bad))
    (bad / "dataset_class_info.json").write_text('[[0, "n01000011"')
    with pytest.raises(DataError, match="dataset_class_info.json is not valid JSON"):
        load_task(imagenet, info_dir=str(bad))


def test_missing_class_folder(tmp_path):
    root = writers.write_breeds(tmp_path)
    _, _, _, target = breeds_split(root / "imagenet_class_hierarchy/modified", "living17")
    for f in (root / "val" / target[1][0]).iterdir():
        f.unlink()
    (root / "val" / target[1][0]).rmdir()
    with pytest.raises(DataError, match=f"missing folder .*val/{target[1][0]}"):
        load_task(root)


def test_published_shape_loads_with_the_default_checks(tmp_path):
    """17 and 30 superclasses: no fixture-only option needed."""
    root = writers.write_breeds_full(tmp_path)
    for name, classes in (("living17", 17), ("entity30", 30)):
        task = get_benchmark(name).load_task(root, "subpopulation", classes, 1, 1, seed=0)
        assert task.num_classes == classes == get_benchmark(name).num_classes
        assert sorted(task.train.labels.tolist()) == list(range(classes))


def test_train_and_val_are_disjoint_when_the_pool_is_used_up(imagenet, info_dir):
    """Guards drawing the training images with `exclude=used`: with 11 of each superclass's
    12 target train images in train and 1 in val, train must be exactly the images val left
    (drawn from the whole pool, it would mostly repeat the validation image)."""
    _, _, _, target = breeds_split(info_dir, "living17", "rand")
    pool = {str(p) for wnids in target for wnid in wnids for p in (imagenet / "train" / wnid).iterdir()}
    assert len(pool) == 2 * 2 * 6
    for seed in range(5):
        task = get_benchmark("living17").load_task(imagenet, "subpopulation", n_target=22,
                                                   val_per_class=1, test_per_class=1, seed=seed,
                                                   expected_superclasses=2, resize=36, crop=32)
        train, val = set(map(str, task.train.paths)), set(map(str, task.val.paths))
        assert (len(train), len(val)) == (22, 2)
        assert not train & val, seed
        assert train | val == pool, seed


def test_a_seeds_test_and_validation_images_do_not_depend_on_n_target(imagenet):
    """Drawn test, val, then train (as `draw_splits` and the other loaders): an n_target
    sweep scores every size on one test set, and its training sets are nested."""
    task = lambda n: get_benchmark("living17").load_task(
        imagenet, "subpopulation", n_target=n, val_per_class=2, test_per_class=3, seed=1,
        expected_superclasses=2, resize=36, crop=32)
    small, large = task(4), task(16)
    assert small.test.paths == large.test.paths and small.val.paths == large.val.paths
    assert set(small.train.paths) < set(large.train.paths)


def test_the_seed_draws_the_test_images_too(imagenet):
    """Guards a test draw from a generator of its own: each seed is a replicate, with its
    own test images (3 of each superclass's 6 ImageNet-val images here)."""
    tests = {tuple(load_task(imagenet, seed=seed).test.paths) for seed in range(4)}
    assert len(tests) > 1


def test_data_dir_is_the_imagenet_folder_itself_as_the_docs_say(tmp_path):
    """Unlike the other benchmarks, BREEDS does not look inside --data-dir for its dataset
    folder (ImageNet's folder has no standard name): docs/benchmarks.md must say so."""
    writers.write_breeds(tmp_path / "imagenet")
    with pytest.raises(DataError, match="hierarchy files .* not found"):
        load_task(tmp_path)
    assert len(load_task(tmp_path / "imagenet").test) > 0
    docs = doc_text("docs/benchmarks.md")
    assert "(Living-17 and Entity-30: at the ImageNet folder itself" in docs


def test_a_relative_info_dir_or_split_file_is_read_inside_the_data_dir(tmp_path, monkeypatch):
    """As docs/benchmarks.md and the layout say: inside --data-dir, not the current folder."""
    root = writers.write_breeds(tmp_path / "imagenet")
    (root / "imagenet_class_hierarchy").rename(root / "hier")
    monkeypatch.chdir(tmp_path)
    assert len(load_task(root, info_dir="hier/modified").test) > 0
    _, _, source, target = breeds_split(root / "hier/modified", "living17")
    (root / "split.json").write_text(json.dumps({"source": source, "target": target}))
    assert len(load_task(root, split_file="split.json").test) > 0
    docs = doc_text("docs/benchmarks.md")
    assert "are absolute paths or paths inside `--data-dir`, not the current folder" in docs


def write_chain_hierarchy(info: Path) -> tuple[str, ...]:
    """A Living-17 superclass S (level 5 below "living thing") whose subclasses sit behind a
    chain of two single-child nodes, S -> C1 -> C2 -> {D1, D2}, with interleaved wnids:
    D1 holds a, c, e and D2 holds b, d (a < b < c < d < e). Returns (a, b, c, d, e)."""
    leaves = tuple(f"n0100010{i}" for i in range(1, 6))
    a, b, c, d, e = leaves
    edges = [("n00001740", "n00001930"), ("n00001930", "n00002684"),
             ("n00002684", "n00003553"), ("n00003553", "n00004258"),
             ("n00004258", "n01000050"), ("n01000050", "n01000060"), ("n01000060", "n01000070"),
             ("n01000070", "n01000090"), ("n01000070", "n01000091"),
             ("n01000090", a), ("n01000090", c), ("n01000090", e),
             ("n01000091", b), ("n01000091", d)]
    info.mkdir(parents=True)
    (info / "dataset_class_info.json").write_text(
        json.dumps([[i, w, f"class {w}"] for i, w in enumerate(leaves)]))
    (info / "class_hierarchy.txt").write_text("".join(f"{p} {q}\n" for p, q in edges))
    (info / "node_names.txt").write_text("n01000050\tS\n")
    return leaves


def test_rand_split_draws_from_the_sorted_subclasses_behind_a_single_child_chain(tmp_path):
    """Guards sorting the pool: the library draws from the sorted ImageNet descendants,
    not from the children's lists one after another (a, c, e, b, d here)."""
    a, b, c, d, e = write_chain_hierarchy(tmp_path / "info")
    superclasses, names, source, target = breeds_split(tmp_path / "info", "living17", "rand")
    assert superclasses == ["n01000050"] and names == ["S"]
    drawn = list(np.random.RandomState(2).choice([a, b, c, d, e], 4, replace=False))
    assert source == [drawn[:2]] and target == [drawn[2:]]


def test_good_split_descends_the_whole_single_child_chain(tmp_path):
    """Guards descending while a node has one child (two links here): the split then sees
    D1 (a, c, e) and D2 (b, d). By hand, half = 2: D1 (biggest first) gives a to the
    source and c, e to the target; D2 tops up the source with b. Stopping one link early
    would see one group a..e and split it a, b | c, d."""
    a, b, c, d, e = write_chain_hierarchy(tmp_path / "info")
    _, _, source, target = breeds_split(tmp_path / "info", "living17", "good")
    assert source == [[a, b]] and target == [[c, e]]


def test_more_superclasses_than_expected_are_refused(imagenet):
    """Guards the superclass count check in both directions: the fixture gives 2."""
    with pytest.raises(DataError, match="gives 2 superclasses, expected 1"):
        load_task(imagenet, expected_superclasses=1)


def test_labels_follow_the_superclass_order_not_the_subclass_wnids(imagenet, tmp_path):
    """Guards labels numbered by superclass position (the names' order), whatever wnids the
    subclasses have: here superclass 0's target subclass n02000024 sorts after superclass
    1's n01000012, and its images must still be labelled 0."""
    split = {"names": ["first", "second"], "source": [["n02000011"], ["n01000011"]],
             "target": [["n02000024"], ["n01000012"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    task = load_task(imagenet, split_file=str(tmp_path / "split.json"))
    for split_ in (task.train, task.val, task.test):
        for path, label in zip(split_.paths, split_.labels.tolist()):
            assert Path(path).parts[-2] == ("n02000024", "n01000012")[label]
