"""scripts/fmnist_reproduce.py reruns committed cells with the settings their rows record
and says, cell by cell, whether the numbers are the same bit for bit."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from deep.protocol import load_protocol
from deep.results import read_results, results_text, row_key
from deep.sweep import run_sweep
from tests.scripts import load_script

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def committed(tmp_path, synthetic_checkpoint):
    """A results file made with settings other than the synthetic protocol's defaults (so a
    rerun that took today's protocol instead of the row's settings would differ)."""
    protocol = load_protocol("synthetic").replace(
        shifts=["noise"], methods=["first", "all"], lrs=[1e-2], seeds=[0], epochs=2,
        n_target=64, val_per_class=10, test_per_class=20, patience=1)
    assert protocol.resolved() != load_protocol("synthetic").resolved()
    out = tmp_path / "committed.csv"
    run_sweep(protocol, out, workers=1, progress=False, device="cpu")
    return out


def test_a_rerun_of_committed_cells_is_identical(committed, tmp_path, capsys):
    rc = load_script("fmnist_reproduce").main(["--results", str(committed), "--cells", "2",
                                               "--threads", "1", "--out", str(tmp_path / "rerun.csv")])
    out = capsys.readouterr().out
    assert rc == 0 and "identical: 2 of 2" in out and "DIFFERS" not in out


# Every measured column the script compares: a rerun whose best epoch (say) moved must
# not be called identical.
COMPARED = ("status", "best_epoch", "val_acc", "val_worst_group_acc", "test_acc", "worst_group_acc")
OFF = {"status": lambda v: "diverged", "best_epoch": lambda v: str(int(v) + 1)}


@pytest.mark.parametrize("metric", COMPARED)
def test_a_cell_that_differs_is_named_with_its_metric_and_fails(committed, tmp_path, capsys,
                                                                metric):
    rows = list(csv.DictReader(committed.open()))
    value = rows[1][metric]  # one value off in the last digits (an empty one: set)
    rows[1][metric] = OFF.get(metric, lambda v: str(float(v) + 1e-6) if v else "0.5")(value)
    with committed.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rc = load_script("fmnist_reproduce").main(["--results", str(committed), "--cells", "2",
                                               "--threads", "1", "--out", str(tmp_path / "rerun.csv")])
    out = capsys.readouterr().out
    assert rc == 1 and "identical: 1 of 2" in out
    line, = [l for l in out.splitlines() if "DIFFERS" in l]
    assert f"'{rows[1]['method']}'" in line and f"'{metric}'" in line


def test_the_rerun_takes_every_setting_its_row_records():
    """A committed row made with other settings than today's protocol file is rerun with
    the row's: epochs, patience, batch size, weight decay, selection and split sizes (the
    list is written out here, not taken from the script, so a setting it drops is seen)."""
    base = load_protocol("synthetic")
    recorded = dict(epochs=base.epochs + 5, patience=(base.patience or 0) + 2,
                    batch_size=base.batch_size * 2, weight_decay=base.weight_decay + 1e-3,
                    select="worst_group_val_acc", val_per_class=base.val_per_class + 1,
                    test_per_class=base.test_per_class + 1)
    assert all(getattr(base, k) != v for k, v in recorded.items())
    row = dict(benchmark="synthetic", arch=base.arch, method="all", shift=base.shifts[0],
               seed=3, lr=0.01, n_target=64, **recorded)
    p = load_script("fmnist_reproduce").protocol_for(row)
    assert {k: getattr(p, k) for k in recorded} == recorded


# --- scripts/compare_results.py: two results files of the same cells ---------------------

def _committed_rows(n: int) -> list[dict]:
    """The first `n` rows of each benchmark of the committed converged table."""
    rows = read_results(ROOT / "figures/fmnist-v2/results.csv")
    return [r for b in sorted({r["benchmark"] for r in rows})
            for r in [r for r in rows if r["benchmark"] == b][:n]]


@pytest.mark.parametrize("column", COMPARED)
def test_compare_results_names_a_cell_whose_outcome_differs_in_the_last_bit(column):
    old = _committed_rows(2)
    new = [dict(r) for r in old]
    value = new[1][column]
    new[1][column] = ("diverged" if column == "status" else value + 1 if column == "best_epoch"
                      else math.nextafter(value, 1.0) if value is not None else 0.5)
    # (the order of the rows is not a cell's)
    lines = load_script("compare_results").compare(old, new[::-1])
    assert lines[0] == f"cells: {len(old)} old, {len(old)} new, {len(old)} in both; only old 0, only new 0"
    assert f"identical: {len(old) - 1} of {len(old)}" in lines
    assert f"  {old[1]['benchmark']}: 1 of 2 identical" in lines
    differs, = [l for l in lines if l.startswith("  differs:")]
    assert str(row_key(old[1])) in differs and repr(column) in differs


def test_compare_results_counts_cells_in_one_file_only_and_ignores_what_is_not_an_outcome(tmp_path, capsys):
    old = _committed_rows(2)
    new = [dict(r, seconds=r["seconds"] * 2, commit="other", machine="another CPU") for r in old[1:]]
    (tmp_path / "old.csv").write_text(results_text(old))
    (tmp_path / "new.csv").write_text(results_text(new))
    assert load_script("compare_results").main([str(tmp_path / "old.csv"), str(tmp_path / "new.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    n = len(old)
    assert out[0] == f"cells: {n} old, {n - 1} new, {n - 1} in both; only old 1, only new 0"
    assert out[-1] == f"identical: {n - 1} of {n - 1}"
    assert load_script("compare_results").main([str(tmp_path / "old.csv")]) == 2  # usage
