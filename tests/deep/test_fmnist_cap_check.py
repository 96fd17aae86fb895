"""scripts/fmnist_cap_check.py finds the rows whose chosen run ended at the epoch cap and
reruns them at the cap, at a longer cap and beside the baseline, on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from deep.protocol import load_protocol
from deep.results import read_results
from deep.sweep import run_sweep
from tests.doc_text import doc_text
from tests.scripts import load_script

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def script():
    return load_script("fmnist_cap_check")


def row(method, seed, best_epoch, epochs=25, lr=1e-3, val=0.5):
    return dict(benchmark="b", shift="s", method=method, seed=seed, n_target=100, lr=lr,
                best_epoch=best_epoch, epochs=epochs, val_acc=val, select="val_acc")


def test_a_row_is_picked_when_one_seed_ends_at_its_cap_and_only_then():
    s = script()
    selected = [row("all", 0, 24), row("all", 1, 10), row("lp-ft", 0, 25), row("lp-ft", 1, 3),
                row("last", 0, 49, epochs=50), row("first", 0, 50, epochs=50)]
    assert s.rows_at_cap(selected) == [("b", "s", "first", 100), ("b", "s", "lp-ft", 100)]


@pytest.fixture
def committed(tmp_path, synthetic_checkpoint):
    """A results file whose `first` runs end at their 2-epoch cap (no early stopping, and
    the synthetic task still learns at epoch 2) beside `all`."""
    protocol = load_protocol("synthetic").replace(
        shifts=["noise"], methods=["first", "all"], lrs=[1e-2], seeds=[0, 1], epochs=2,
        n_target=64, val_per_class=10, test_per_class=20, patience=None)
    out = tmp_path / "committed.csv"
    run_sweep(protocol, out, workers=1, progress=False, device="cpu")
    return out


def test_the_capped_row_reruns_at_both_caps_and_beside_the_baseline(committed, tmp_path, capsys):
    rows = read_results(committed)
    capped = {(r["method"], r["seed"]) for r in rows if r["best_epoch"] == r["epochs"]}
    assert ("first", 0) in capped or ("first", 1) in capped  # else the fixture tests nothing
    out_dir = tmp_path / "check"
    rc = script().main(["--results", str(committed), "--out-dir", str(out_dir), "--factor", "2",
                        "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    at_cap, longer = read_results(out_dir / "epochs-2.csv"), read_results(out_dir / "epochs-4.csv")
    ran = {(r["method"], r["seed"], r["epochs"]) for r in at_cap + longer}
    capped_methods = {m for m, _ in capped}
    expected = {(m, s, e) for m in capped_methods for s in (0, 1) for e in (2, 4)}
    assert ran == expected | {("all", s, 2) for s in (0, 1)}
    # the rerun at the cap is the committed run again (same machine, same seed)
    again = {(r["method"], r["seed"]): r["test_acc"] for r in at_cap}
    assert all(again[(r["method"], r["seed"])] == r["test_acc"] for r in rows)
    assert "first, cap 4 - first, cap 2:" in out and "first, cap 2 - all, cap 2:" in out
    # the reruns at the committed cap are the committed runs (same machine): all identical
    assert f"identical to the committed rows: {len(at_cap)} of {len(at_cap)}" in out
    # a second call finds every run done and only prints
    rc = script().main(["--results", str(committed), "--out-dir", str(out_dir), "--workers", "1"])
    assert rc == 0 and len(read_results(out_dir / "epochs-4.csv")) == len(longer)


def test_a_rerun_that_differs_from_its_committed_run_is_named_with_what_differs():
    def full(**changes):
        return {**row("all", 0, 5), "status": "ok", "test_acc": 0.5, **changes}
    committed = [full(), full(seed=1), full(seed=2)]
    reruns = [full(), full(seed=1, best_epoch=6, test_acc=0.25),
              full(seed=2, epochs=50)]  # another cap: not a rerun of the committed run
    lines = script().against_committed(reruns, committed)
    assert lines[0].startswith("same ") and lines[1].startswith("differs ")
    assert "'best_epoch': (5, 6)" in lines[1] and "'test_acc': (0.5, 0.25)" in lines[1]
    assert lines[-1] == "identical to the committed rows: 1 of 2"


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit, match="--factor must be at least 2"):
        script().main(["--factor", "1"])


def test_the_docs_quote_the_committed_cap_check():
    """docs/fmnist.md's intervals are what the committed reruns give (recomputed here with
    the script's own functions, from figures/fmnist-v2/cap-check/, no training)."""
    s = script()
    doc = doc_text("docs/fmnist.md")
    folder = ROOT / "figures" / "fmnist-v2" / "cap-check"
    quoted = {("fmnist-breeds", "subpopulation"): ("-0.7 [-2.0, +0.6]", "+0.0 [-1.0, +1.0]",
                                                   "-0.7 [-2.3, +0.9]"),
              ("fmnist-c", "fog"): ("+1.3 [-0.9, +3.5]", "-0.5 [-3.7, +2.6]",
                                    "+0.8 [-0.9, +2.5]")}
    for (benchmark, shift), (longer_vs_cap, cap_vs_all, longer_vs_all) in quoted.items():
        key = (benchmark, shift, "lp-ft", 1000)
        cap = s.measured(folder / "epochs-25.csv", key, "lp-ft", 25)
        longer = s.measured(folder / "epochs-50.csv", key, "lp-ft", 50)
        base = s.measured(folder / "epochs-25.csv", key, "all", 25)
        assert len(cap) == len(longer) == len(base) == 5
        assert all(r["best_epoch"] < 50 for r in longer.values())
        assert s.paired(longer, cap, "test_acc") == longer_vs_cap
        assert s.paired(cap, base, "test_acc") == cap_vs_all
        assert s.paired(longer, base, "test_acc") == longer_vs_all
        for value in (longer_vs_cap, cap_vs_all, longer_vs_all):
            assert value in doc, value
