"""End to end on the fixtures: each paper benchmark through the engine's sweep, two methods,
one epoch, random-init source model (`--checkpoint none`), and bad data -> a clear error
and no results row.

Every benchmark runs through the real CLI. The 224-px ones get `--data` options that
shrink images to 32 px (and, for ImageNet-C, accept 3 of the 1000 classes): a ResNet-50
at 224 px would take minutes on a CPU.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from deep.protocol import load_protocol
from deep.sweep import read_results
from tests.deep.fixtures import writers

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SMALL = {"resize": 36, "crop": 32}
FAILED = 2  # exit status of the CLI on bad input


def cli_sweep(*args):
    return subprocess.run([sys.executable, "-m", "deep", "sweep", *args, "--checkpoint", "none",
                           "--methods", "first,last", "--lrs", "0.01", "--seeds", "0",
                           "--epochs", "1", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def check_rows(rows, benchmark, shift, methods=("first", "last")):
    assert [(r["benchmark"], r["shift"], r["method"]) for r in rows] == \
        [(benchmark, shift, m) for m in methods]
    for r in rows:
        assert r["status"] == "ok" and 0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1
        assert r["best_epoch"] == 1 and r["tuned_params"] > 0


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    writers.write_cifar10c(root)
    writers.write_cifar10_batches(root)
    return root


@pytest.mark.parametrize("benchmark, shift", [("cifar10c", "fog"), ("cifar-flip", "flip")])
def test_cifar_sweeps_through_the_cli(cifar, tmp_path, benchmark, shift):
    out = tmp_path / "results.csv"
    done = cli_sweep("--benchmark", benchmark, "--data-dir", str(cifar), "--shifts", shift,
                     "--n-target", "10", "--val-per-class", "1", "--test-per-class", "2",
                     "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    check_rows(read_results(out), benchmark, shift)


def test_bad_cifar10c_file_fails_without_a_row(tmp_path):
    writers.write_cifar10c(tmp_path)
    writers.truncate(tmp_path / "CIFAR-10-C" / "fog.npy", keep=0.6)
    out = tmp_path / "results.csv"
    done = cli_sweep("--benchmark", "cifar10c", "--data-dir", str(tmp_path), "--shifts", "fog",
                     "--n-target", "10", "--val-per-class", "1", "--test-per-class", "2",
                     "--out", str(out))
    assert done.returncode != 0
    assert "fog.npy" in done.stderr and "truncated" in done.stderr
    assert read_results(out) == []


def small_sweep(benchmark, data_dir, out, n_target, val_per_class, test_per_class, **data):
    """The protocol's first shift through the CLI, with `--data KEY=VALUE` options."""
    shift = load_protocol(benchmark).shifts[0]
    options = [arg for key, value in data.items()
               for arg in ("--data", f"{key}={str(value).lower() if isinstance(value, bool) else value}")]
    return cli_sweep("--benchmark", benchmark, "--data-dir", str(data_dir), "--shifts", shift,
                     "--n-target", str(n_target), "--val-per-class", str(val_per_class),
                     "--test-per-class", str(test_per_class), "--out", str(out), *options)


def sweep_rows(benchmark, data_dir, out, n_target, val_per_class, test_per_class, **data):
    done = small_sweep(benchmark, data_dir, out, n_target, val_per_class, test_per_class, **data)
    assert done.returncode == 0, done.stderr[-2000:]
    return read_results(out)


def test_imagenet_c_sweep(tmp_path):
    writers.write_imagenet_c(tmp_path, corruptions=("gaussian_noise",))
    rows = sweep_rows("imagenet-c", tmp_path, tmp_path / "r.csv", 3, 1, 2,
                         allow_subset=True, crop=32)
    check_rows(rows, "imagenet-c", "gaussian_noise")


@pytest.mark.parametrize("benchmark, n_target, test_per_class", [("living17", 17, 2),
                                                                 ("entity30", 30, 1)])
def test_breeds_sweeps(tmp_path, benchmark, n_target, test_per_class):
    writers.write_breeds_full(tmp_path)
    rows = sweep_rows(benchmark, tmp_path, tmp_path / "r.csv", n_target, 1, test_per_class,
                         **SMALL)
    check_rows(rows, benchmark, "subpopulation")


@pytest.mark.parametrize("benchmark, write", [("waterbirds", writers.write_waterbirds),
                                              ("celeba", writers.write_celeba)])
def test_spurious_sweeps_report_worst_group(tmp_path, benchmark, write):
    write(tmp_path)
    rows = sweep_rows(benchmark, tmp_path, tmp_path / "r.csv", 8, 4, 0, **SMALL)
    check_rows(rows, benchmark, "group-balanced")
    for r in rows:
        assert r["select"] == "worst_group_val_acc"
        assert r["worst_group_acc"] is not None and r["worst_group_acc"] <= r["test_acc"]


def test_corrupt_jpeg_fails_the_sweep_without_a_row(tmp_path):
    writers.write_waterbirds(tmp_path)
    metadata = (tmp_path / "waterbird_complete95_forest2water2" / "metadata.csv").read_text()
    test_image = next(line.split(",")[1] for line in metadata.splitlines()[1:]
                      if line.split(",")[3] == "2")
    writers.corrupt_jpeg(tmp_path / "waterbird_complete95_forest2water2" / test_image)
    out = tmp_path / "r.csv"
    done = small_sweep("waterbirds", tmp_path, out, 8, 4, 0, **SMALL)
    assert done.returncode == FAILED and "cannot decode image" in done.stderr
    assert test_image in done.stderr
    assert read_results(out) == []


@pytest.mark.parametrize("benchmark, write, name", [
    ("cifar10c", writers.write_cifar10c, "{}.npy"),
    ("imagenet-c", lambda root: writers.write_imagenet_c(root, ("fog", "gaussian_noise")), "{}")])
def test_a_partial_download_stops_the_sweep_before_it_starts(tmp_path, benchmark, write, name):
    """A corruption's file or folder missing (a partial download, a tar not extracted) used
    to stop the sweep only when its turn came: hours into the full protocol, after every
    shift before it. Now the sweep names every missing one before any model is made."""
    write(tmp_path)
    out = tmp_path / "results.csv"
    done = cli_sweep("--benchmark", benchmark, "--data-dir", str(tmp_path),
                     "--shifts", "fog,snow,gaussian_noise,contrast", "--n-target", "10",
                     "--val-per-class", "1", "--test-per-class", "2", "--out", str(out))
    assert done.returncode == FAILED, done.stderr[-2000:]
    missing = ", ".join(name.format(s) for s in ("snow", "contrast"))
    assert "2 of the 4 corruptions to run have no" in done.stderr and missing in done.stderr
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_a_partial_download_stops_online_adaptation_before_it_starts(tmp_path):
    from deep.adapt import AdaptProtocol, run_adaptation
    from deep.data import DataError
    writers.write_cifar10c(tmp_path)
    protocol = AdaptProtocol.from_dict(dict(
        benchmark="cifar10c", arch="resnet26-w4", shifts=["fog", "snow"], methods=["tent"],
        blocks=["first"], seeds=[0], images=6, test_per_class=3, checkpoint="none"))
    with pytest.raises(DataError, match="1 of the 2 corruptions to run have no file .*: snow.npy"):
        run_adaptation(protocol, tmp_path / "adapt.csv", data_dir=tmp_path, progress=False)
    assert not (tmp_path / "adapt.csv").exists()
