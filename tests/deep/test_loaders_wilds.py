"""Camelyon17-WILDS and FMoW-WILDS on fixtures in the real layouts: splits by WILDS' rules,
images matching their rows, worst-region accuracy without "Other", the CLI sweep end to
end with the small CLIP ViT, and bad inputs."""

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from deep.data import DataError, get_benchmark
from deep.data.wilds import FMOW_CATEGORIES, draw_target, read_camelyon17, read_fmow
from deep.errors import ConfigError
from deep.models.vit import CLIP_MEAN, CLIP_STD
from deep.sweep import read_results
from deep.train import accuracy
from tests.deep.fixtures import wilds_writers as w

REPO = Path(__file__).resolve().parents[2]
SMALL = {"resize": 32, "crop": 32}


@pytest.fixture
def camelyon(tmp_path):
    w.write_camelyon17(tmp_path)
    return tmp_path


@pytest.fixture
def fmow(tmp_path):
    w.write_fmow(tmp_path)
    return tmp_path


def mean_rgb(x: torch.Tensor) -> torch.Tensor:
    """Undo CLIP's normalisation: the mean 0..255 colour of each image (b, 3)."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).mean(dim=(2, 3))


def camelyon_task(root, shift="ood-test", seed=0, n_target=6, test_per_class=0):
    return get_benchmark("camelyon17").load_task(root, shift, n_target=n_target, val_per_class=2,
                                                 test_per_class=test_per_class, seed=seed, **SMALL)


def rows_by_path(root, csv_name, key):
    return {key(r): r for r in w.read_csv(root / csv_name)}


@pytest.mark.parametrize("shift, center", [("ood-test", "2"), ("ood-val", "1")])
def test_camelyon17_target_comes_from_one_hospital(camelyon, shift, center):
    rows = rows_by_path(camelyon / w.CAMELYON_DIR, "metadata.csv",
                        lambda r: f"patch_patient_{r['patient']}_node_{r['node']}_x_"
                                  f"{r['x_coord']}_y_{r['y_coord']}.png")
    task = camelyon_task(camelyon, shift)
    assert task.num_classes == 2 and task.group_names is None
    seen = []
    for split, per_class in ((task.train, 3), (task.val, 2), (task.test, 12 - 5)):
        assert Counter(split.labels.tolist()) == {0: per_class, 1: per_class}
        for path, label in zip(split.paths, split.labels.tolist()):
            row = rows[Path(path).name]
            assert row["center"] == center and int(row["tumor"]) == label
            assert Path(path).parent.name == f"patient_{row['patient']}_node_{row['node']}"
        seen += split.paths
    assert len(set(seen)) == len(seen) == 24, "disjoint, and the test set is the rest"


def test_camelyon17_images_are_the_rows_patches(camelyon):
    task = camelyon_task(camelyon)
    x, y, g = next(task.test.batches(100))
    assert x.shape == (14, 3, 32, 32) and g is None
    rgb = mean_rgb(x)
    assert torch.allclose(rgb[:, 0], torch.full((14,), 30.0 + 40 * 2), atol=1.5)  # hospital 2
    assert torch.allclose(rgb[:, 1], 40 + 160 * y.float(), atol=1.5)


def test_camelyon17_draws_are_seeded_and_nested(camelyon):
    a, b, c = camelyon_task(camelyon, seed=3), camelyon_task(camelyon, seed=3), \
        camelyon_task(camelyon, seed=4)
    assert a.train.paths == b.train.paths and a.test.paths == b.test.paths
    assert a.train.paths != c.train.paths
    small, big = (camelyon_task(camelyon, seed=3, n_target=n, test_per_class=4) for n in (2, 6))
    assert set(small.train.paths) < set(big.train.paths)
    assert small.test.paths == big.test.paths and small.val.paths == big.val.paths


def test_camelyon17_source_is_train_and_id_val(camelyon):
    source = get_benchmark("camelyon17").load_source(camelyon, **SMALL)
    assert (len(source.train), len(source.test)) == (3 * 2 * 4, 3 * 2 * 2)
    x, _, _ = next(source.train.batches(100))
    assert set(((mean_rgb(x)[:, 0] - 30) / 40).round().int().tolist()) == {0, 3, 4}


def fmow_task(root, shift="ood-test", seed=0, n_target=10, test_per_class=0):
    return get_benchmark("fmow").load_task(root, shift, n_target=n_target, val_per_class=1,
                                           test_per_class=test_per_class, seed=seed, **SMALL)


@pytest.mark.parametrize("shift, split, years", [("ood-test", "test", {2017}),
                                                 ("ood-val", "val", {2014})])
def test_fmow_target_comes_from_the_ood_years(fmow, shift, split, years):
    """Image rgb_img_<i> is row i (seq rows counted); OOD splits by year and split column;
    regions from the mapping file (the CSV's own region column is ignored)."""
    rows = w.read_csv(fmow / w.FMOW_DIR / "rgb_metadata.csv")
    task = fmow_task(fmow, shift)
    assert task.num_classes == 62 and task.group_names == ("Asia", "Europe", "Africa",
                                                          "Americas", "Oceania")
    region_of = {"CHN": 0, "FRA": 1, "KEN": 2, "USA": 3, "AUS": 4, "ZZZ": -1}
    seen = []
    for part, size in ((task.train, 10), (task.val, 62), (task.test, 96 - 72)):
        assert len(part) == size
        for path, label, group in zip(part.paths, part.labels.tolist(), part.groups.tolist()):
            row = rows[int(Path(path).stem.split("_")[-1])]
            assert row["split"] == split and int(row["timestamp"][:4]) in years
            assert FMOW_CATEGORIES[label] == row["category"]
            assert group == region_of[row["country_code"]]
        seen += part.paths
    assert len(set(seen)) == len(seen)


def test_fmow_images_are_the_rows_images(fmow):
    """The decoded picture shows the row's category and region (as parsed from the CSV):
    catches an image numbering that skips the seq rows."""
    task = fmow_task(fmow)
    x, y, g = next(task.test.batches(100))
    rgb = mean_rgb(x)
    slots = torch.tensor([w.FMOW_CATEGORIES.index(FMOW_CATEGORIES[label]) for label in y])
    assert torch.allclose(rgb[:, 0], 20 + 30 * slots.float(), atol=1.5)
    region_slots = torch.where(g < 0, 5, g)  # "Other" is the writer's sixth country
    assert torch.allclose(rgb[:, 1], 20 + 40 * region_slots.float(), atol=1.5)


def test_fmow_seq_and_out_of_split_rows_are_dropped(fmow):
    table = read_fmow(fmow)
    sizes = {k: int(v.sum()) for k, v in table.splits.items()}
    assert sizes == {"train": 12, "id_val": 6, "id_test": 6, "val": 96, "test": 96}
    assert len(table.files) == sum(w.FMOW_ROWS.values()) - w.FMOW_ROWS[("seq", 2017)]
    in_some_split = torch.stack(list(table.splits.values())).any(0)
    assert int((~in_some_split).sum()) == 3 + 3  # train and val rows of 2016-2017


def test_worst_region_leaves_other_out():
    labels = torch.tensor([0, 0, 0, 0, 0, 0])
    preds = torch.tensor([0, 0, 1, 0, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, -1, -1])  # "Other" all wrong
    metrics = accuracy(preds, labels, groups)
    assert metrics.acc == pytest.approx(0.5)
    assert metrics.worst_group_acc == pytest.approx(0.5) and set(metrics.group_acc) == {0, 1}


def test_fmow_source_is_train_and_id_val(fmow):
    source = get_benchmark("fmow").load_source(fmow, **SMALL)
    assert (len(source.train), len(source.test)) == (12, 6)


# --- through the CLI --------------------------------------------------------------

def cli_sweep(benchmark, data_dir, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "deep", "sweep", "--benchmark", benchmark, "--data-dir",
         str(data_dir), "--arch", "clip-vit-tiny", "--checkpoint", "none", "--lrs", "0.001",
         "--seeds", "0", "--epochs", "1", "--data", "resize=32", "--data", "crop=32",
         "--no-progress", "--out", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_camelyon17_sweeps_through_the_cli(camelyon, tmp_path):
    out = tmp_path / "results.csv"
    done = cli_sweep("camelyon17", camelyon, out, "--n-target", "4", "--val-per-class", "2",
                     "--test-per-class", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "normalised with" not in done.stderr, done.stderr[-2000:]
    rows = read_results(out)
    assert [r["method"] for r in rows] == ["none", "embedding", "first3", "last3", "last", "all"]
    assert [r["start_stage"] for r in rows] == [9, 0, 1, 4, 8, 0]
    assert [r["tuned_params"] for r in rows][0] == 0  # none: the source model as it is
    for r in rows:
        assert r["status"] == "ok" and r["arch"] == "clip-vit-tiny" and r["shift"] == "ood-test"
        assert 0 <= r["test_acc"] <= 1 and r["worst_group_acc"] is None


@pytest.mark.slow
def test_fmow_sweeps_through_the_cli_selecting_by_worst_region(fmow, tmp_path):
    out = tmp_path / "results.csv"
    done = cli_sweep("fmow", fmow, out, "--methods", "none,last3,last", "--n-target", "8",
                     "--val-per-class", "1", "--test-per-class", "0", "--lrs", "0.001,0.0001")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_results(out)
    assert [r["method"] for r in rows] == ["none"] * 2 + ["last3"] * 2 + ["last"] * 2
    none = [(r["val_worst_group_acc"], r["worst_group_acc"], r["test_acc"]) for r in rows[:2]]
    assert none[0] == none[1]  # nothing trained: the same numbers at every lr
    for r in rows:
        assert r["select"] == "worst_group_val_acc" and r["status"] == "ok"
        assert r["val_worst_group_acc"] is not None and 0 <= r["worst_group_acc"] <= 1


def test_the_full_protocols_run_a_clip_vit():
    from deep.protocol import load_protocol
    for name in ("camelyon17", "fmow"):
        protocol = load_protocol(name)
        assert protocol.arch == "clip-vit-b16"
        assert protocol.methods == ["none", "embedding", "first3", "last3", "last", "all"]
        # The source fine-tuning the docs describe, so `pretrain --init FILE` needs no flags.
        assert (protocol.pretrain.epochs, protocol.pretrain.lr, protocol.pretrain.batch_size,
                protocol.pretrain.augment) == (3, 1e-3, 64, "none")
    assert load_protocol("fmow").select == "worst_group_val_acc"


# --- bad inputs -------------------------------------------------------------------

def rewrite(path: Path, old: str, new: str, count: int = -1) -> None:
    """Replace `old` (every occurrence by default: seq rows are skipped before checks)."""
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


def test_missing_release_file_says_the_download_is_incomplete(tmp_path):
    w.write_camelyon17(tmp_path, release=False)
    with pytest.raises(DataError, match=r"RELEASE_v1\.0\.txt is missing.*incomplete"):
        camelyon_task(tmp_path)
    w.write_fmow(tmp_path, release=False)
    with pytest.raises(DataError, match=r"RELEASE_v1\.1\.txt is missing"):
        fmow_task(tmp_path)


def test_no_dataset_folder_names_the_layout(tmp_path):
    with pytest.raises(DataError, match="metadata.csv not found.*camelyon17_v1.0"):
        camelyon_task(tmp_path)
    with pytest.raises(DataError, match="no data directory given"):
        camelyon_task(None)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="a_file is a file, not a folder"):
        camelyon_task(tmp_path / "a_file")


def test_metadata_saved_with_a_byte_order_mark_reads_the_same(fmow, camelyon):
    """Spreadsheet tools write a UTF-8 BOM; pandas (WILDS' reader) ignores it, so do we."""
    before = fmow_task(fmow).test.labels, camelyon_task(camelyon).test.labels
    for path in (next(fmow.rglob("rgb_metadata.csv")), next(fmow.rglob("country_code_mapping.csv")),
                 next(camelyon.rglob("metadata.csv"))):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    after = fmow_task(fmow).test.labels, camelyon_task(camelyon).test.labels
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("old, new, message", [
    ("tumor,slide", "tumour,slide", r"lacks column\(s\) \['tumor'\]"),
    (",0,0,0\n", ",0,zero,0\n", "must be integers"),
    (",0,0,0\n", ",0,0,7\n", "split 0/1"),
    # first row: index 0, patient 000, node 0, x 0, y 0, tumor 0, slide 0, center 0, split 0
    ("\n0,000,0,0,0,0,0,0,0\n", "\n0,000,0,0,0,2,0,0,0\n", r"tumor must be 0/1.*tumor=2"),
    ("\n0,000,0,0,0,0,0,0,0\n", "\n0,000,0,0,0,0,0,5,0\n", r"center 0\.\.4.*center=5"),
    ("\n0,000,0,0,0,0,0,0,0\n", "\n0,,0,0,0,0,0,0,0\n", "empty patient or node"),
])
def test_malformed_camelyon17_metadata(camelyon, old, new, message):
    rewrite(camelyon / w.CAMELYON_DIR / "metadata.csv", old, new, count=1)
    with pytest.raises(DataError, match=message):
        camelyon_task(camelyon)


def test_missing_patch_is_named(camelyon):
    task = camelyon_task(camelyon)
    victim = Path(task.train.paths[0])
    victim.unlink()
    with pytest.raises(DataError, match=f"camelyon17/train: 1 image file\\(s\\) listed in the "
                                        f"metadata are missing, e.g. .*{victim.name}; "
                                        "expected:\nCamelyon17-WILDS v1.0"):
        camelyon_task(camelyon)


@pytest.mark.parametrize("old, new, message", [
    ("timestamp", "time", r"lacks column\(s\) \['timestamp'\]"),
    (",airport,", ",spaceport,", "unknown category 'spaceport'"),
    ("T10:", "T99:", "is not ISO 8601"),
    ("\ntest,", "\nholdout,", "split must be one of"),
])
def test_malformed_fmow_metadata(fmow, old, new, message):
    rewrite(fmow / w.FMOW_DIR / "rgb_metadata.csv", old, new)
    with pytest.raises(DataError, match=message):
        fmow_task(fmow)


def test_fmow_without_country_mapping_is_an_error(fmow):
    (fmow / w.FMOW_DIR / "country_code_mapping.csv").unlink()
    with pytest.raises(DataError, match="missing file .*country_code_mapping.csv"):
        fmow_task(fmow)


def test_a_region_wilds_does_not_have_is_refused_and_a_blank_one_is_other(fmow):
    """A region name outside WILDS' five would put its countries in no region (out of the
    worst-region accuracy, and with none left, nothing to select by): refused, naming
    the line. A blank region (Antarctica's in the real file) is "Other"."""
    mapping = fmow / w.FMOW_DIR / "country_code_mapping.csv"
    text = mapping.read_text()
    rewrite(mapping, ",Europe,", ",Europa,")
    with pytest.raises(DataError, match=r"line \d+ of .*country_code_mapping.csv: region "
                                        r"'Europa' is not one of WILDS' Asia, Europe"):
        fmow_task(fmow)
    mapping.write_text(text)
    rewrite(mapping, ",Europe,", ",,")
    task = fmow_task(fmow)
    groups = torch.cat([task.train.groups, task.val.groups, task.test.groups])
    assert 1 not in groups.tolist() and -1 in groups.tolist()  # France's rows are "Other"


def test_too_small_a_split_says_how_many_are_left(fmow):
    with pytest.raises(DataError, match=r"fmow/ood-test \(train split\): 34 examples left, "
                                         r"40 requested"):
        fmow_task(fmow, n_target=40)


@pytest.mark.slow
def test_bad_data_through_the_cli_fails_without_a_row(tmp_path):
    w.write_camelyon17(tmp_path, release=False)
    out = tmp_path / "results.csv"
    done = cli_sweep("camelyon17", tmp_path, out, "--methods", "last", "--n-target", "4",
                     "--val-per-class", "2")
    assert done.returncode == 2 and "RELEASE_v1.0.txt" in done.stderr
    assert read_results(out) == []


def test_unknown_shift(camelyon, tmp_path):
    message = r"unknown shift\(s\) \['hospital9'\] of {}; known: ood-test, ood-val$"
    with pytest.raises(ConfigError, match=message.format("camelyon17")):
        camelyon_task(camelyon, shift="hospital9")
    with pytest.raises(ConfigError, match=message.format("fmow")):  # before any data is read
        fmow_task(tmp_path / "nothing", shift="hospital9")


@pytest.mark.slow
def test_clip_weights_to_source_model_to_sweep(camelyon, tmp_path):
    """The documented chain: CLIP state dict -> `deep.clip prepare` (zero-shot head) ->
    `pretrain --init` on the WILDS training split -> `sweep --checkpoint`."""
    from tests.deep.test_vit import clip_like_state

    torch.save({"state_dict": clip_like_state()}, tmp_path / "clip.pt")
    torch.save(torch.randn(2, 16), tmp_path / "text.pt")
    steps = [
        ["-m", "deep.clip", "prepare", "--weights", str(tmp_path / "clip.pt"), "--arch",
         "clip-vit-tiny", "--num-classes", "2", "--text-embeddings", str(tmp_path / "text.pt"),
         "--out", str(tmp_path / "zero-shot.pt")],
        ["-m", "deep", "pretrain", "--benchmark", "camelyon17", "--data-dir", str(camelyon),
         "--arch", "clip-vit-tiny", "--init", str(tmp_path / "zero-shot.pt"), "--epochs", "1",
         "--lr", "0.001", "--batch-size", "8", "--augment", "none", "--data", "resize=32",
         "--data", "crop=32", "--out", str(tmp_path / "source.pt")],
    ]
    for step in steps:
        done = subprocess.run([sys.executable, *step], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "results.csv"
    done = subprocess.run(
        [sys.executable, "-m", "deep", "sweep", "--benchmark", "camelyon17", "--data-dir",
         str(camelyon), "--arch", "clip-vit-tiny", "--checkpoint", str(tmp_path / "source.pt"),
         "--methods", "embedding", "--lrs", "0.001", "--seeds", "0", "--epochs", "1",
         "--n-target", "4", "--val-per-class", "2", "--data", "resize=32", "--data", "crop=32",
         "--no-progress", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [(r["method"], r["status"]) for r in read_results(out)] == [("embedding", "ok")]


@pytest.mark.slow
def test_images_of_the_wrong_size_for_the_vit_are_a_clear_cli_error(camelyon, tmp_path):
    out = tmp_path / "results.csv"
    done = cli_sweep("camelyon17", camelyon, out, "--methods", "last", "--n-target", "4",
                     "--val-per-class", "2", "--data", "resize=40", "--data", "crop=40")
    assert done.returncode == 2 and "32x32" in done.stderr and "crop=32" in done.stderr
    assert "Traceback" not in done.stderr and read_results(out) == []


def test_the_loaders_take_the_models_normalisation(camelyon):
    """The CLIP ViT's statistics reach the loader without the 'takes no normalization'
    warning, and another (mean, std) given to the loader is the one applied."""
    import warnings
    from deep.normalization import loader_options
    bench = get_benchmark("camelyon17")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        options = loader_options(bench.load_task, "camelyon17", "clip-vit-tiny", SMALL)
    assert options["normalization"] == (CLIP_MEAN, CLIP_STD)
    clip = camelyon_task(camelyon)
    half = bench.load_task(camelyon, "ood-test", n_target=6, val_per_class=2, test_per_class=0,
                           seed=0, normalization=((0.5,) * 3, (0.5,) * 3), **SMALL)
    x_clip, _, _ = next(clip.test.batches(8))
    x_half, _, _ = next(half.test.batches(8))
    assert torch.allclose(mean_rgb(x_clip), (x_half * 0.5 + 0.5).mean(dim=(2, 3)) * 255, atol=1e-3)
    with pytest.raises(Exception, match="normalization must be"):
        bench.load_task(camelyon, "ood-test", n_target=6, val_per_class=2, test_per_class=0,
                        seed=0, normalization=((0.5,) * 2, (0.5,) * 2), **SMALL)


def test_fmow_split_years_at_their_boundaries(tmp_path):
    """Guards the year rules of read_fmow at the edges: train/ID before 2013, OOD val
    2013-2015 (both ends included), OOD test from 2016 (included); masks pairwise disjoint."""
    expected = {("train", 2012): "train", ("val", 2012): "id_val", ("test", 2012): "id_test",
                ("val", 2013): "val", ("val", 2015): "val", ("test", 2016): "test",
                ("train", 2013): None, ("test", 2013): None, ("test", 2015): None,
                ("val", 2016): None}
    w.write_fmow(tmp_path, rows={kind: 1 for kind in expected}, size=(8, 8))
    rows = w.read_csv(tmp_path / w.FMOW_DIR / "rgb_metadata.csv")   # no seq rows: row i is file i
    table = read_fmow(tmp_path)
    masks = torch.stack(list(table.splits.values()))
    assert int(masks.sum(0).max()) <= 1   # no example in two splits
    names = list(table.splits)
    for i, row in enumerate(rows):
        kind = (row["split"], int(row["timestamp"][:4]))
        got = names[int(masks[:, i].nonzero())] if masks[:, i].any() else None
        assert got == expected[kind], kind


def test_a_balanced_draw_from_the_whole_pool_is_the_reference_protocols_draw():
    """draw_target keeps draw_splits' order (test, then val, then train, from one
    generator): over a pool of every example, balanced, it gives the same indices, so the
    WILDS splits follow the reference protocol and a seed's test set does not depend on
    val_per_class."""
    from deep.data.base import draw_splits
    labels = torch.arange(300) % 3
    ours = draw_target(labels, torch.ones(300, dtype=torch.bool), 3, 12, 5, 7, 4, True, "x")
    reference = draw_splits(labels, 3, 12, 5, 7, 4, "x")
    assert [len(s) for s in ours] == [12, 15, 21]
    assert [s.tolist() for s in ours] == [s.tolist() for s in reference]


# WILDS' `categories` list (wilds/datasets/fmow_dataset.py, v1.1), written out: class
# index = position, as WILDS-trained heads and class text embeddings are ordered.
WILDS_FMOW_CATEGORIES = [
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
    "tower", "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo"]


def test_fmow_class_indices_are_wilds_category_order():
    """The fixture uses 6 of the 62 categories, so a swap of two others would pass every
    loader test; the label of a row is the category's position in WILDS' list."""
    assert len(WILDS_FMOW_CATEGORIES) == 62
    assert list(FMOW_CATEGORIES) == WILDS_FMOW_CATEGORIES
    assert WILDS_FMOW_CATEGORIES == sorted(WILDS_FMOW_CATEGORIES)  # WILDS' list is sorted


def test_fmow_timestamps_with_a_zone_are_split_by_their_utc_year(tmp_path):
    """WILDS compares pd.to_datetime(timestamp) with 1 Jan 2013 / 2016 UTC: a stamp with
    an offset counts in the year of its UTC time, a stamp without a zone is UTC."""
    kinds = {("val", 2012): "2012-12-31T22:00:00-05:00",   # 2013-01-01T03:00Z: OOD val
             ("test", 2016): "2016-01-01T02:00:00+05:00",  # 2015-12-31T21:00Z: test rows of
             #                                                 2013-2015 are in no split
             ("val", 2016): "2016-01-01T04:59:59+05:00",   # 2015-12-31T23:59:59Z: OOD val
             ("test", 2015): "2015-12-31T23:59:59"}        # no zone: UTC, in no split
    expected = {("val", 2012): "val", ("test", 2016): None, ("val", 2016): "val",
                ("test", 2015): None}
    w.write_fmow(tmp_path, rows={kind: 1 for kind in kinds}, size=(8, 8))
    path = tmp_path / w.FMOW_DIR / "rgb_metadata.csv"
    rows = w.read_csv(path)
    kind_of = [(r["split"], int(r["timestamp"][:4])) for r in rows]
    for r, kind in zip(rows, kind_of):
        r["timestamp"] = kinds[kind]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = read_fmow(tmp_path)
    names, masks = list(table.splits), torch.stack(list(table.splits.values()))
    for i, kind in enumerate(kind_of):
        got = names[int(masks[:, i].nonzero())] if masks[:, i].any() else None
        assert got == expected[kind], (kind, kinds[kind])


def test_a_uniform_draw_may_take_every_example_left():
    """FMoW's uniform draws: a split that asks for exactly the examples left gets them
    all; one more is refused, naming both counts."""
    labels = torch.arange(10) % 2
    pool = torch.ones(10, dtype=torch.bool)
    # test 2 x 2, val 1 x 2, train 4: all 10 examples
    train, val, test = draw_target(labels, pool, 2, 4, 1, 2, 0, False, "x")
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(10))
    with pytest.raises(DataError, match=r"x \(train split\): 4 examples left, 5 requested"):
        draw_target(labels, pool, 2, 5, 1, 2, 0, False, "x")


def test_negative_draw_counts_are_refused_before_any_draw():
    """test_per_class 0 means "the rest of the split"; a negative count would slice the
    last examples off a uniform draw's permutation (FMoW): refused as a config error."""
    labels, pool = torch.arange(10) % 2, torch.ones(10, dtype=torch.bool)
    for balanced in (False, True):
        with pytest.raises(ConfigError, match="test_per_class must be at least 0, got -1"):
            draw_target(labels, pool, 2, 2, 1, -1, 0, balanced, "x")


def test_a_blank_region_puts_its_countries_in_group_other(fmow):
    """Antarctica's blank region in WILDS' mapping is "Other" (group -1, out of the
    worst-region accuracy), never one of the five regions."""
    mapping = fmow / w.FMOW_DIR / "country_code_mapping.csv"
    rewrite(mapping, ",Europe,", ",,")
    rows = [r for r in w.read_csv(fmow / w.FMOW_DIR / "rgb_metadata.csv") if r["split"] != "seq"]
    table = read_fmow(fmow)
    region_of = {"CHN": 0, "FRA": -1, "KEN": 2, "USA": 3, "AUS": 4, "ZZZ": -1}
    assert table.groups.tolist() == [region_of[r["country_code"]] for r in rows]


def test_metadata_without_rows_is_named(camelyon):
    """A header-only metadata.csv (a truncated download) is a DataError naming the file."""
    path = camelyon / w.CAMELYON_DIR / "metadata.csv"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"camelyon17: .*metadata.csv has no rows"):
        read_camelyon17(camelyon)


def test_a_source_without_training_rows_is_refused(tmp_path):
    """Metadata whose training centres have no split-0 rows: no source training set,
    refused by name rather than pretraining on nothing."""
    w.write_camelyon17(tmp_path, counts={"train": 0, "id_val": 2, "ood": 4})
    with pytest.raises(DataError, match="camelyon17: the metadata has no example in the "
                                        "WILDS train or ID validation split"):
        get_benchmark("camelyon17").load_source(tmp_path, **SMALL)


def test_a_draw_needs_a_training_and_a_validation_image_per_class_draw():
    """n_target and val_per_class are at least 1 (test_per_class may be 0): 0 would
    give an empty training or validation set and a run that selects on nothing."""
    labels, pool = torch.arange(10) % 2, torch.ones(10, dtype=torch.bool)
    with pytest.raises(ConfigError, match="n_target must be at least 1, got 0"):
        draw_target(labels, pool, 2, 0, 1, 2, 0, False, "x")
    with pytest.raises(ConfigError, match="val_per_class must be at least 1, got 0"):
        draw_target(labels, pool, 2, 2, 0, 2, 0, False, "x")


def test_the_rest_of_the_split_as_test_set_must_not_be_empty():
    """test_per_class 0 takes what the validation and training draws leave: when they
    take the whole pool, that is an error, not an empty test set."""
    labels, pool = torch.arange(10) % 2, torch.ones(10, dtype=torch.bool)
    train, val, test = draw_target(labels, pool, 2, 7, 1, 0, 0, False, "x")
    assert (len(train), len(val), len(test)) == (7, 2, 1)
    with pytest.raises(DataError, match=r"x \(test split\): no example left after the "
                                        "validation and training draws"):
        draw_target(labels, pool, 2, 8, 1, 0, 0, False, "x")


def test_a_country_mapping_without_its_region_column_is_named(fmow):
    mapping = fmow / w.FMOW_DIR / "country_code_mapping.csv"
    rewrite(mapping, "country-code,region,sub-region", "country-code,continent,sub-region")
    with pytest.raises(DataError, match=r"fmow: .*country_code_mapping.csv lacks column\(s\) "
                                        r"\['region'\]"):
        fmow_task(fmow)
