"""`python -m deep bench fmnist`: the summaries on hand-made rows, and the --quick smoke run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deep.bench import SUITES, main_protocols, markdown_table, n_sweep_protocols, n_target_rows, ranks
from deep.data.fmnist import source_checkpoint
from deep.sweep import read_results

ROOT = Path(__file__).resolve().parents[2]


def _row(benchmark, shift, method, seed, test, val=None, n=1000, worst=None):
    return {"benchmark": benchmark, "shift": shift, "method": method, "seed": seed,
            "n_target": n, "lr": 1e-3, "test_acc": test, "val_acc": test if val is None else val,
            "worst_group_acc": worst, "select": "val_acc"}


def test_n_target_rows_pair_by_seed_and_pick_the_block_by_validation():
    rows = []
    for seed, (first, second, all_) in enumerate([(0.80, 0.75, 0.70), (0.84, 0.70, 0.76)]):
        rows += [_row("fmnist-c", "fog", "first", seed, first, val=0.5, n=100),
                 _row("fmnist-c", "fog", "second", seed, second, val=0.9, n=100),
                 _row("fmnist-c", "fog", "all", seed, all_, n=100)]
    curves = n_target_rows(rows)
    mean, se, count = curves["first"][100]
    assert count == 2 and mean == pytest.approx(0.09) and se == pytest.approx(0.01)
    # validation prefers `second` in both seeds, whatever its test accuracy
    assert curves["best block (val)"][100][0] == pytest.approx(((0.75 - 0.70) + (0.70 - 0.76)) / 2)


def test_the_val_chosen_block_is_chosen_on_validation_averaged_over_every_shift():
    """Per seed, the block with the best validation accuracy over all the shifts of the
    sweep: `first` wins fog's validation, `second` the mean of fog's and snow's."""
    rows = []
    for shift, (v_first, v_second) in [("fog", (0.9, 0.8)), ("snow", (0.1, 0.5))]:
        rows += [_row("fmnist-c", shift, "first", 0, 0.60, val=v_first, n=100),
                 _row("fmnist-c", shift, "second", 0, 0.70, val=v_second, n=100),
                 _row("fmnist-c", shift, "all", 0, 0.50, n=100)]
    curves = n_target_rows(rows)
    assert curves["best block (val)"][100][0] == pytest.approx(0.70 - 0.50)


def test_ranks_average_over_rows():
    stats = lambda a, b: {"all": {"abs": (a, 0, 3)}, "auto-rgn": {"abs": (b, 0, 3)}}
    assert ranks([stats(0.9, 0.8), stats(0.7, 0.8)], ("all", "auto-rgn")) == {"all": 1.5, "auto-rgn": 1.5}


def test_tied_methods_share_their_ranks_whatever_the_listing_order():
    """Two methods with equal accuracy in a row are tied, not ranked by list order: on
    fmnist-v2 `all` and `lp-ft` score exactly the same on two rows, and breaking the tie by
    order moved both by 0.14."""
    three = lambda a, b, c: {"all": {"abs": (a, 0, 1)}, "lp-ft": {"abs": (b, 0, 1)},
                             "first": {"abs": (c, 0, 1)}}
    rows = [three(0.9, 0.9, 0.8), three(0.7, 0.9, 0.8)]
    for order in (("all", "lp-ft", "first"), ("lp-ft", "all", "first")):
        assert ranks(rows, order) == {"all": (1.5 + 3) / 2, "lp-ft": (1.5 + 1) / 2, "first": 2.5}


def test_markdown_table_names_the_best_block_and_compares_with_the_pattern():
    rows = []
    for seed in (0, 1):
        for method, acc in [("first", 0.6), ("second", 0.7), ("third", 0.5), ("last", 0.4),
                            ("all", 0.65), ("auto-rgn", 0.66)]:
            rows.append(_row("fmnist-breeds", "subpopulation", method, seed, acc + 0.01 * seed))
    text, verdicts = markdown_table(rows, 1000)
    assert "| fmnist-breeds (feature) |" in text and "| second |" in text
    (label, kind, expected, best, beats_all, rel, runner_up, margin), = verdicts
    assert (kind, expected, best, beats_all, runner_up) == ("feature", "second", "second", True,
                                                            "first")
    assert rel[0] == pytest.approx(0.05) and margin[0] == pytest.approx(0.1)


def test_the_best_block_has_the_highest_mean_accuracy_also_when_blocks_ran_other_seeds():
    """A block still missing a seed (a suite being run) is ranked by its mean accuracy, not
    by its mean difference to `all` on its own seeds: `first` 0.70 over seeds 0 and 1
    against `second` 0.65 on seed 0 alone, though second's difference (+0.15) is larger."""
    rows = [_row("fmnist-c", "fog", "all", 0, 0.5), _row("fmnist-c", "fog", "all", 1, 0.9),
            _row("fmnist-c", "fog", "first", 0, 0.6), _row("fmnist-c", "fog", "first", 1, 0.8),
            _row("fmnist-c", "fog", "second", 0, 0.65)]
    _, verdicts = markdown_table(rows, 1000)
    (_, _, _, best, _, rel, runner_up, _), = verdicts
    assert (best, runner_up) == ("first", "second") and rel[0] == pytest.approx(0.0)


def test_a_block_is_called_best_only_when_it_is_ahead_of_the_next_one():
    """Highest mean but the 95 % interval against the runner-up includes 0: 'highest
    mean', not 'best block' nor 'as the paper's pattern predicts'."""
    from deep.bench import verdict_lines
    rows = []
    for seed, (first, second) in enumerate([(0.71, 0.70), (0.70, 0.71), (0.72, 0.70)]):
        for method, acc in [("first", first), ("second", second), ("third", 0.5),
                            ("last", 0.4), ("all", 0.69)]:
            rows.append(_row("fmnist-c", "fog", method, seed, acc))
    _, verdicts = markdown_table(rows, 1000)
    line, = verdict_lines(verdicts)
    assert "highest mean **first**" in line and "vs second" in line
    assert "not separated from second" in line and "as the paper's pattern predicts" not in line
    # clearly ahead in every seed: called best, as predicted
    rows = [r if r["method"] != "second" else {**r, "test_acc": r["test_acc"] - 0.05} for r in rows]
    line, = verdict_lines(markdown_table(rows, 1000)[1])
    assert "best block **first**" in line and "as the paper's pattern predicts" in line


def test_average_ranks_use_seed_0_for_every_method():
    """A 5-seed mean against single runs compares unequal things: ranks use seed 0."""
    rows = []
    for seed in range(3):
        for method, acc in [("first", 0.6), ("all", 0.9 if seed else 0.5), ("lp-ft", 0.7),
                            ("second", 0.5), ("third", 0.5), ("last", 0.5)]:
            if method == "lp-ft" and seed:
                continue
            rows.append(_row("fmnist-flip", "flip", method, seed, acc))
    text, _ = markdown_table(rows, 1000)
    ranks_line = text.split("on seed 0")[1].split("\n")
    header = next(l for l in ranks_line if l.startswith("| ") and "lp-ft" in l)
    assert header.split("|")[1].strip() == "lp-ft"  # 0.7 beats all's seed-0 0.5 (mean 0.77)


def test_the_full_suite_reuses_the_main_tables_cells_for_its_n_target():
    suite = SUITES["fmnist"]
    sizes = [p.n_target for p in n_sweep_protocols(suite)]
    assert suite.n_target in suite.n_sweep_sizes and suite.n_target not in sizes
    protocols = main_protocols(suite)
    assert {p.benchmark for p in protocols} == set(suite.shifts)
    assert all(p.methods == suite.methods and p.seeds == suite.seeds for p in protocols)  # issue #15


def test_the_n_target_sweep_runs_the_main_tables_size_when_the_main_table_lacks_its_shifts():
    """The main table's cells stand in for the sweep's at its n_target only when the main
    table ran the sweep's shifts; otherwise that size is run like any other."""
    from deep.bench import Suite
    suite = Suite(shifts={"fmnist-c": ["fog"]}, seeds=[0], n_target=1000,
                  n_sweep_shifts=["gaussian_noise"], n_sweep_sizes=[100, 1000])
    assert [p.n_target for p in n_sweep_protocols(suite)] == [100, 1000]
    suite.shifts["fmnist-c"].append("gaussian_noise")
    assert [p.n_target for p in n_sweep_protocols(suite)] == [100]


def test_the_quick_n_target_sweep_takes_the_suites_test_split_size():
    """--quick's 20 test images per class reach the n_target sweep as well as the main
    table (the fmnist-c protocol's own is larger)."""
    suite = SUITES["fmnist-quick"]
    assert suite.test_per_class == 20
    assert [p.test_per_class for p in n_sweep_protocols(suite)] == [20, 20]
    assert all(p.test_per_class == 20 for p in main_protocols(suite))


@pytest.mark.parametrize("flags, expected", [
    ([], {"device": "auto", "amp": False, "workers": 1}),  # the quick suite's one worker
    (["--device", "cpu", "--amp", "--cache-mb", "64", "--workers", "1"],
     {"device": "cpu", "amp": True, "cache_mb": 64.0, "workers": 1}),
])
def test_bench_passes_device_amp_and_cache_to_every_sweep(tmp_path, monkeypatch, flags,
                                                          expected):
    """`make deep` pins --device cpu (the committed rows ran there); the flags reach
    every sweep of the suite."""
    import deep.bench
    from deep.__main__ import main
    calls = []
    monkeypatch.setattr(deep.bench, "run_benchmark",
                        lambda protocol, suite, results, curves, **options: calls.append(options))
    monkeypatch.setattr(deep.bench, "summarize", lambda out_dir, suite: [])
    assert main(["bench", "fmnist", "--quick", "--out", str(tmp_path), *flags]) == 0
    assert calls and all(options.items() >= expected.items() for options in calls)


def test_bench_refuses_workers_0_instead_of_taking_the_suites_default(tmp_path, monkeypatch, capsys):
    import deep.bench
    from deep.__main__ import main
    calls = []
    monkeypatch.setattr(deep.bench, "run_benchmark", lambda *args, **options: calls.append(options))
    monkeypatch.setattr(deep.bench, "summarize", lambda out_dir, suite: [])
    assert main(["bench", "fmnist", "--quick", "--out", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err and not calls


@pytest.mark.parametrize("name", ["results.csv", "n_target.csv"])
@pytest.mark.parametrize("summarize_only", [[], ["--summarize-only"]])
def test_bench_refuses_a_folder_holding_another_benchmarks_rows(tmp_path, monkeypatch, capsys,
                                                               name, summarize_only):
    """A plain sweep's results.csv in --out: --summarize-only drew an empty table (exit 0,
    after a hint to add --quick), and a run would have added the suite's rows beside it
    for hours before the summary."""
    import deep.bench
    from deep.__main__ import main
    from deep.results import COLUMNS
    calls = []
    monkeypatch.setattr(deep.bench, "run_benchmark", lambda *args, **options: calls.append(1))
    line = ("synthetic,noise,last,0,200,0.01,ok,1,0.5,,0.5,,10,100,1.0,resnet26-w4,1,64,0.0001,"
            "val_acc,10,20,none,0,4,float32,cpu,abc,")
    (tmp_path / name).write_text(",".join(COLUMNS) + "\n" + line + "\n")
    assert main(["bench", "fmnist", "--quick", "--out", str(tmp_path), *summarize_only]) == 2
    err = capsys.readouterr().err
    assert f"{name} holds rows of synthetic, which this suite does not write there" in err, err
    assert "`python -m deep report" in err and not calls
    assert not (tmp_path / "table.md").exists()


@pytest.mark.parametrize("make, problem", [(lambda p: p / "nowhere", "does not exist"),
                                            (lambda p: p / "file", "is a file, not a folder")])
def test_bench_refuses_a_data_dir_that_is_not_a_folder_before_making_out(tmp_path, monkeypatch,
                                                                          capsys, make, problem):
    """The first sweep used to find it, after an empty --out folder had been made."""
    import deep.bench
    from deep.__main__ import main
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(deep.bench, "run_benchmark", lambda *args, **options: None)
    out = tmp_path / "out"
    assert main(["bench", "fmnist", "--quick", "--out", str(out), "--data-dir",
                 str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert f"{problem}; give the folder that holds the Fashion-MNIST" in err
    assert "(docs/fmnist.md)" in err and (ROOT / "docs" / "fmnist.md").is_file()
    assert not out.exists()


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_summarize_only_without_results_names_the_command_that_makes_them(tmp_path, capsys,
                                                                           quick):
    """A missing folder was named by its lock file; the hint for the quick suite dropped
    --quick (the full suite runs for hours)."""
    from deep.__main__ import main
    command = f"`python -m deep bench fmnist{' --quick' if quick else ''} --out "
    for out, problem in ((tmp_path / "missing", "does not exist"), (tmp_path, "no results in")):
        assert main(["bench", "fmnist", "--summarize-only", *quick, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert problem in err and command + str(out) + "`" in err and "lock" not in err, err
    assert not (tmp_path / "missing").exists()


@pytest.mark.slow
def test_quick_bench_runs_end_to_end(tmp_path, real_fmnist):
    assert source_checkpoint("fmnist-c").exists(), "the committed source model is missing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "deep", "bench", "fmnist", "--quick", "--out",
               str(tmp_path), "--no-progress"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    quick = SUITES["fmnist-quick"]
    rows = read_results(tmp_path / "results.csv")
    assert len(rows) == sum(len(s) for s in quick.shifts.values()) * 11
    assert all(r["status"] == "ok" and 0 <= r["test_acc"] <= 1 for r in rows)
    assert all(r["worst_group_acc"] is not None for r in rows if r["benchmark"] == "fmnist-spurious")
    n_rows = read_results(tmp_path / "n_target.csv")
    assert sorted({r["n_target"] for r in n_rows}) == quick.n_sweep_sizes
    table = (tmp_path / "table.md").read_text()
    for name in quick.shifts:
        assert name in table
    assert "worst group" in table and "Average rank" in table and "best block (val)" in table
    for stem in ("relative_accuracy", "n_target"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    # a rerun resumes: nothing left to run
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "fmnist-c n_target=" in again.stdout
    assert "ran 0 cells" in again.stdout
    assert f"{sum(r['benchmark'] == 'fmnist-c' for r in rows)} rows in" in again.stdout
    assert read_results(tmp_path / "results.csv") == rows


def test_committed_table_is_what_the_committed_results_give(tmp_path):
    """docs/fmnist.md quotes figures/fmnist/table.md: rebuilding it from the committed CSVs
    must give the same text, so the table cannot drift from the data it claims to summarize."""
    committed = ROOT / "figures" / "fmnist"
    if not (committed / "results.csv").exists():
        pytest.skip("no committed Fashion-MNIST results")
    for name in ("results.csv", "n_target.csv"):
        (tmp_path / name).write_bytes((committed / name).read_bytes())
    run = subprocess.run([sys.executable, "-m", "deep", "bench", "fmnist", "--summarize-only",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "table.md").read_text() == (committed / "table.md").read_text()
    # docs/fmnist.md copies the relative-accuracy rows (its own labels, best block in bold).
    readme_rows = [[c.strip().strip("*") for c in line.split("|")[2:-1]]
                   for line in (ROOT / "docs" / "fmnist.md").read_text().splitlines()
                   if line.startswith("| ")]
    table = (committed / "table.md").read_text().split("Absolute test accuracy")[0]
    measured = [[c.strip() for c in line.split("|")[2:-2]] for line in table.splitlines()
                if line.startswith("| fmnist")]
    assert len(measured) == 11
    for cells in measured:
        assert cells in readme_rows, f"docs/fmnist.md lacks the row {cells}"


def test_committed_converged_table_is_what_its_results_give(tmp_path):
    """figures/fmnist-v2/table.md (issue #15's protocol; README and figures/README.md quote
    it) is rebuilt from the committed CSVs: the table cannot drift from its data."""
    committed = ROOT / "figures" / "fmnist-v2"
    if not (committed / "n_target.csv").exists():
        pytest.skip("the converged suite is not complete")
    for name in ("results.csv", "curves.csv", "n_target.csv", "n_target_curves.csv"):
        (tmp_path / name).write_bytes((committed / name).read_bytes())
    run = subprocess.run([sys.executable, "-m", "deep", "bench", "fmnist", "--summarize-only",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "table.md").read_text() == (committed / "table.md").read_text()


def test_a_superseded_row_of_the_n_target_sweep_is_left_out_of_its_table(tmp_path):
    """A later seed's row at an lr the first stage did not choose (left by a choice that
    an extension moved) is dropped from the n_target table as from the main one: with a
    validation accuracy of 0.99 and a test accuracy of 0 it would otherwise be selected."""
    committed = ROOT / "figures" / "fmnist-v2"
    if not (committed / "n_target.csv").exists():
        pytest.skip("the converged suite is not complete")
    for name in ("results.csv", "curves.csv", "n_target.csv", "n_target_curves.csv"):
        (tmp_path / name).write_bytes((committed / name).read_bytes())
    lines = (committed / "n_target.csv").read_text().splitlines()
    chosen = next(line for line in lines if line.startswith("fmnist-c,gaussian_noise,first,1,100,0.001,"))
    cells = chosen.split(",")
    assert cells[5:9] == ["0.001", "ok", "5", "0.8799999952316284"]  # lr, status, epoch, val
    cells[5], cells[8], cells[10] = "0.01", "0.99", "0.0"  # an lr seed 0 searched, not chose
    with open(tmp_path / "n_target.csv", "a") as f:
        f.write(",".join(cells) + "\n")
    run = subprocess.run([sys.executable, "-m", "deep", "bench", "fmnist", "--summarize-only",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "table.md").read_text() == (committed / "table.md").read_text()


def test_summarize_only_refuses_another_suites_results_and_run_options(tmp_path, capsys):
    """The full suite's CSVs summarised with --quick drew an empty table at n_target 200
    over the committed one; run options given with --summarize-only were silently unused."""
    from deep.__main__ import main
    for name in ("results.csv", "curves.csv", "n_target.csv", "n_target_curves.csv"):
        (tmp_path / name).write_bytes((ROOT / "figures" / "fmnist-v2" / name).read_bytes())
    (tmp_path / "table.md").write_text("kept")
    assert main(["bench", "fmnist", "--summarize-only", "--quick", "--out", str(tmp_path)]) == 2
    assert re.search(r"holds rows at n_target \[1000\], and this suite's table is at n_target "
                     r"200; they fit the 'fmnist' suite: leave out --quick", capsys.readouterr().err)
    assert (tmp_path / "table.md").read_text() == "kept"
    for flags, named in ((["--workers", "3"], "--workers"), (["--device", "cuda", "--amp"], "--device, --amp"),
                         (["--cache-mb", "nan"], "--cache-mb"),
                         (["--backend", "ray", "--gpus-per-task", "-1"], "--backend, --gpus-per-task")):
        assert main(["bench", "fmnist", "--summarize-only", "--out", str(tmp_path), *flags]) == 2
        assert f"--summarize-only runs nothing, so {named} would have no effect" in capsys.readouterr().err
    assert (tmp_path / "table.md").read_text() == "kept"


def test_summarize_only_refuses_a_results_file_that_mixes_two_protocols(tmp_path, capsys):
    """A fmnist-breeds row of the 4-epoch protocol merged into the converged results (or an
    n_target row into its sweep) would compete for its cell's learning rate with rows of
    other epochs and splits: refused, naming both cells, and the committed table kept."""
    from deep.__main__ import main
    committed = ROOT / "figures" / "fmnist-v2"
    for name in ("results.csv", "curves.csv", "n_target.csv", "n_target_curves.csv"):
        (tmp_path / name).write_bytes((committed / name).read_bytes())
    (tmp_path / "table.md").write_text("kept")
    old = next(line for line in (ROOT / "figures" / "fmnist" / "results.csv").read_text().splitlines()
               if line.startswith("fmnist-breeds,subpopulation,first,0,1000,0.001,"))
    with open(tmp_path / "results.csv", "a") as f:
        f.write(old + ",,,,," + "\n")  # the legacy row, its provenance columns empty
    assert main(["bench", "fmnist", "--summarize-only", "--out", str(tmp_path)]) == 2
    assert re.search(r"results.csv mixes fmnist-breeds rows of two protocols: .* differ in "
                     r"epochs: first 25 vs second 4, val_per_class: first 50 vs second 10",
                     capsys.readouterr().err)
    (tmp_path / "results.csv").write_bytes((committed / "results.csv").read_bytes())
    lines = (tmp_path / "n_target.csv").read_text().splitlines(keepends=True)
    cells = lines[1].split(",")
    cells[16] = "50"  # epochs (the n = 1000 cells come from results.csv, at 25)
    (tmp_path / "n_target.csv").write_text("".join([lines[0], ",".join(cells), *lines[2:]]))
    assert main(["bench", "fmnist", "--summarize-only", "--out", str(tmp_path)]) == 2
    assert "n_target.csv (with the main table's cells) mixes fmnist-c rows" in capsys.readouterr().err
    assert (tmp_path / "table.md").read_text() == "kept"
    assert not (tmp_path / "relative_accuracy.png").exists()  # refused before any plot


def test_the_worst_group_line_weighs_the_best_block_by_worst_group_accuracy():
    """fmnist-spurious's ", worst group" line ranks the blocks by worst-group accuracy, so
    its margin to the runner-up must be the worst-group one too. Here every block ties on
    test accuracy (a test-accuracy margin is 0: `last ≈ third`), while `last` leads `third`
    on worst-group accuracy in every seed, by 0.10, 0.11, 0.11: a 95 % t interval of
    0.1067 ± 4.303 * 0.0033 = [0.092, 0.121], above 0, so `last` is named alone."""
    from scipy import stats
    worst = {"first": (0.30, 0.30, 0.30), "second": (0.40, 0.40, 0.41), "third": (0.50, 0.51, 0.50),
             "last": (0.60, 0.62, 0.61), "all": (0.45, 0.45, 0.45)}
    rows = [_row("fmnist-spurious", "balanced", m, seed, 0.7, worst=w[seed])
            for m, w in worst.items() for seed in range(3)]
    diffs = np.subtract(worst["last"], worst["third"])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert (diffs.mean() - half, diffs.mean() + half) == (pytest.approx(0.0923, abs=1e-4),
                                                          pytest.approx(0.1210, abs=1e-4))
    text, _ = markdown_table(rows, 1000)
    line, = [l for l in text.splitlines() if l.startswith("| fmnist-spurious, worst group")]
    assert line.split("|")[-2].strip() == "last"          # the best-block column


def test_a_plot_with_nothing_to_show_is_removed_not_left_from_before(tmp_path):
    """Summarised without curves.csv (e.g. results.csv alone, copied to another folder), the
    suite draws no learning curves: an older learning_curves.png left beside the new table
    showed other data. (n_target.png is drawn from the main table's cells alone.)"""
    from deep.__main__ import main
    (tmp_path / "results.csv").write_bytes((ROOT / "figures" / "fmnist-v2" / "results.csv").read_bytes())
    stale = [tmp_path / f"{stem}.{suffix}" for stem in ("learning_curves", "n_target")
             for suffix in ("png", "pdf")]
    for path in stale:
        path.write_bytes(b"an older summary's plot")
    assert main(["bench", "fmnist", "--summarize-only", "--out", str(tmp_path)]) == 0
    kept = [path.name for path in stale if path.exists() and path.read_bytes() == b"an older summary's plot"]
    assert kept == []
    assert not (tmp_path / "learning_curves.png").exists()
    assert (tmp_path / "relative_accuracy.png").stat().st_size > 1000    # the one drawn


def test_n_target_rows_average_all_over_the_same_shifts_as_the_method():
    """Guards the baseline of the n_target curve: per seed, the mean over the sweep's
    shifts of method minus the mean over the same shifts of `all`. first (0.6, 0.9) and
    all (0.5, 0.7) on fog and snow: 0.75 - 0.6 = 0.15 points of accuracy (as fractions),
    not 0.75 - 0.5 against fog's `all` alone."""
    rows = []
    for shift, (first, all_) in [("fog", (0.6, 0.5)), ("snow", (0.9, 0.7))]:
        rows += [_row("fmnist-c", shift, "first", 0, first, n=100),
                 _row("fmnist-c", shift, "all", 0, all_, n=100)]
    curves = n_target_rows(rows)
    mean, _, count = curves["first"][100]
    assert count == 1 and mean == pytest.approx(0.15)
    assert curves["best block (val)"][100][0] == pytest.approx(0.15)


def test_n_target_plot_bars_are_95_percent_t_intervals(tmp_path, monkeypatch):
    """Guards the n_target figure's error bars, which its title calls 95 % t intervals of
    the paired difference: t(0.975, n - 1) * s.e. in points (4.303 * 1 = 4.303 for 3
    seeds of s.e. 1 point; any t table), none (0) for one seed, not the bare s.e."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    from deep.bench import plot_n_target
    drawn = {}
    real = Axes.errorbar

    def record(self, x, y, yerr=None, **kwargs):
        drawn[kwargs.get("label")] = (list(x), list(y), list(yerr))
        return real(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", record)
    plot_n_target({"first": {100: (0.05, 0.01, 3), 300: (0.02, float("nan"), 1)}},
                  tmp_path / "n_target")
    x, y, yerr = drawn["first"]
    assert x == [100, 300] and y == pytest.approx([5.0, 2.0])
    assert yerr == pytest.approx([4.302653, 0.0], abs=1e-5)


def test_a_superseded_row_of_the_main_table_is_left_out(tmp_path):
    """Guards drop_superseded before the main table's selection: seed 0 searched 1e-1,
    1e-2, 1e-3 and chose 1e-2; a seed-1 row of `first` at 1e-3 (left by a choice that an
    extension moved; validation 0.99, test 0.0) must not win seed 1's cell. Kept, first's
    mean would be (0.8 + 0.0) / 2 = 40.0 ± 40.0 instead of (0.8 + 0.7) / 2 = 75.0 ± 5.0."""
    from deep.bench import summarize
    from deep.results import ResultRow, results_text

    def result(method, seed, lr, val, test):
        return ResultRow(benchmark="fmnist-breeds", shift="subpopulation", method=method,
                         seed=seed, n_target=1000, lr=lr, status="ok", best_epoch=3,
                         val_acc=val, val_worst_group_acc=None, test_acc=test,
                         worst_group_acc=None, tuned_params=10, total_params=100, seconds=1.0,
                         arch="resnet26", epochs=25, batch_size=64, weight_decay=1e-4,
                         select="val_acc", val_per_class=50, test_per_class=300,
                         checkpoint="none", patience=4, precision="float32").to_dict()

    rows = [result(m, 0, lr, val, test) for m, test in (("first", 0.8), ("all", 0.75))
            for lr, val in ((1e-1, 0.5), (1e-2, 0.8), (1e-3, 0.6))]
    rows += [result("first", 1, 1e-2, 0.7, 0.7), result("all", 1, 1e-2, 0.65, 0.65),
             result("first", 1, 1e-3, 0.99, 0.0)]          # superseded: 1e-3 was not chosen
    (tmp_path / "results.csv").write_text(results_text(rows))
    summarize(tmp_path, SUITES["fmnist"])
    table = (tmp_path / "table.md").read_text()
    absolute = table[table.index("Absolute test accuracy"):]
    line = next(l for l in absolute.splitlines() if l.startswith("| fmnist-breeds |"))
    assert line == "| fmnist-breeds | 75.0 ± 5.0 | 70.0 ± 5.0 |"


def test_a_row_with_one_block_calls_it_the_best_block():
    """Guards the verdict's wording where no runner-up exists (a row where one block ran):
    with nothing to be separated from, the block is the row's best block, not its
    "highest mean"."""
    from deep.bench import verdict_lines
    rows = [_row("fmnist-flip", "flip", m, seed, acc + 0.01 * seed)
            for seed in range(3) for m, acc in (("last", 0.7), ("all", 0.6))]
    line, = verdict_lines(markdown_table(rows, 1000)[1])
    assert line.startswith("- fmnist-flip (output): best block **last** (+10.0 [+10.0, +10.0] vs all")
    # it read "the predicted block, but not separated from None at 95 %"
    assert "None" not in line
    assert "the predicted block, with no other block to compare it with yet" in line


def test_the_rank_table_lists_methods_best_first_with_two_decimals():
    """Seed 0 on two rows: breeds ranks auto-rgn, all, lp-ft; flip ranks all, lp-ft,
    auto-rgn. Means: all 1.5, auto-rgn 2.0, lp-ft 2.5 (seed 1 is not ranked)."""
    rows = [_row("fmnist-breeds", "subpopulation", m, 0, acc)
            for m, acc in (("all", 0.6), ("auto-rgn", 0.7), ("lp-ft", 0.5))]
    rows += [_row("fmnist-flip", "flip", m, 0, acc)
             for m, acc in (("all", 0.8), ("auto-rgn", 0.6), ("lp-ft", 0.7))]
    rows += [_row("fmnist-flip", "flip", m, 1, acc)
             for m, acc in (("all", 0.1), ("auto-rgn", 0.9), ("lp-ft", 0.5))]
    text, _ = markdown_table(rows, 1000)
    ranked = text[text.index("Average rank"):].splitlines()
    assert ranked[2:5] == ["| all | auto-rgn | lp-ft |", "|---|---|---|", "| 1.50 | 2.00 | 2.50 |"]


def test_the_relative_tables_all_column_shows_alls_own_accuracy():
    """`all` at 65 and 66 % is 65.5 ± 0.5 in its own column, not +0.0 against itself."""
    rows = [_row("fmnist-breeds", "subpopulation", m, s, acc + 0.01 * s)
            for s in (0, 1) for m, acc in (("all", 0.65), ("first", 0.6))]
    text, _ = markdown_table(rows, 1000)
    header = next(line for line in text.splitlines() if line.startswith("| benchmark (shift kind)"))
    line = next(line for line in text.splitlines() if line.startswith("| fmnist-breeds (feature) |"))
    cells = dict(zip(header.split(" | ")[1:], line.split(" | ")[1:]))
    assert cells["all"] == "65.5 ± 0.5" and cells["first"] == "-5.0 ± 0.0"


def test_the_interval_table_has_a_worst_group_row_for_the_spurious_benchmark_only():
    """last - all in worst-group accuracy: +10 and +20 points, mean 15, s.e. 5, so
    15 ± 12.706 * 5 = [-48.5, +78.5] (t with 1 degree of freedom)."""
    from deep.bench import interval_table
    rows = [_row("fmnist-spurious", "spurious", m, s, 0.8, worst=w)
            for s, (w_all, w_last) in enumerate([(0.3, 0.4), (0.3, 0.5)])
            for m, w in (("all", w_all), ("last", w_last))]
    rows += [_row("fmnist-c", "fog", m, s, 0.7, worst=0.2) for s in (0, 1) for m in ("all", "last")]
    worst = [line for line in interval_table(rows, 1000) if "worst group" in line]
    assert worst == ["| fmnist-spurious, worst group | +15.0 [-48.5, +78.5] |"]


def test_n_target_rows_leave_out_a_seed_whose_all_lacks_a_shift():
    """Seed 1's `all` has no snow: `first` counts seed 0 alone, 0.8 - 0.7 = +0.1."""
    rows = [_row("fmnist-c", sh, m, 0, acc, n=100) for sh in ("fog", "snow")
            for m, acc in (("all", 0.7), ("first", 0.8))]
    rows += [_row("fmnist-c", sh, "first", 1, 0.2, n=100) for sh in ("fog", "snow")]
    rows += [_row("fmnist-c", "fog", "all", 1, 0.9, n=100)]
    mean, se, count = n_target_rows(rows)["first"][100]
    assert count == 1 and mean == pytest.approx(0.1)


def test_a_blocknoise_row_expects_the_block_its_noise_perturbed():
    rows = [_row("fmnist-blocknoise", "third", m, s, acc)
            for s in (0, 1) for m, acc in (("all", 0.5), ("first", 0.7), ("third", 0.6))]
    _, verdicts = markdown_table(rows, 1000)
    assert [(v[0], v[2], v[3]) for v in verdicts] == [("fmnist-blocknoise (third perturbed)",
                                                       "third", "first")]


def test_a_verdicts_gain_over_all_is_the_95_percent_t_interval():
    """+2.0 points, s.e. 0.5 over 3 seeds: t(2) = 4.303, half-width 2.15 -> [-0.2, +4.2]."""
    from deep.bench import verdict_lines
    (line,) = verdict_lines([("fmnist-c", "input", "first", "first", False, (0.02, 0.005, 3),
                              None, None)])
    assert "(+2.0 [-0.2, +4.2] vs all, 95 % t intervals)" in line
    assert line.endswith("it does not beat full fine-tuning at 95 %.")


def _full_rows(cells, n=1000):
    """Results-file rows for (benchmark, shift, method, seed, test) cells."""
    from tests.deep.fixtures.rows import result_row
    return [result_row(benchmark=b, shift=sh, method=m, seed=s, n_target=n, val_acc=t,
                       val_worst_group_acc=t, test_acc=t, worst_group_acc=t, arch="resnet26")
            for b, sh, m, s, t in cells]


def test_the_n_target_sweep_takes_from_the_main_table_only_its_shifts_and_methods(tmp_path):
    from deep.bench import Suite, n_sweep_rows
    from deep.results import results_text
    suite = Suite(shifts={"fmnist-c": ["fog", "snow"], "fmnist-breeds": ["fog"]}, seeds=[0],
                  n_sweep_shifts=["fog"], n_sweep_sizes=[100, 1000], n_sweep_methods=["first", "all"])
    cells = [("fmnist-c", "fog", "first", 0, 0.5), ("fmnist-c", "fog", "all", 0, 0.5),
             ("fmnist-c", "snow", "first", 0, 0.5), ("fmnist-c", "fog", "auto-rgn", 0, 0.5),
             ("fmnist-breeds", "fog", "first", 0, 0.5)]
    (tmp_path / "results.csv").write_text(results_text(_full_rows(cells)))
    (tmp_path / "n_target.csv").write_text(results_text(_full_rows([cells[0]], n=100)))
    taken = {(r["benchmark"], r["shift"], r["method"], r["n_target"])
             for r in n_sweep_rows(tmp_path, suite)}
    assert taken == {("fmnist-c", "fog", "first", 100), ("fmnist-c", "fog", "first", 1000),
                     ("fmnist-c", "fog", "all", 1000)}


def test_a_benchmarks_closing_line_counts_its_own_rows_at_its_own_n_target(tmp_path, monkeypatch,
                                                                         capsys):
    """Two fmnist-c rows at 1000; one at 100 and one of fmnist-breeds are not its own."""
    from types import SimpleNamespace
    import deep.bench as bench
    from deep.results import results_text
    csv = tmp_path / "results.csv"
    cells = [("fmnist-c", "fog", "first", 0, 0.5), ("fmnist-c", "fog", "all", 0, 0.5),
             ("fmnist-breeds", "fog", "first", 0, 0.5)]
    csv.write_text(results_text(_full_rows(cells) + _full_rows([cells[0]], n=100)))
    monkeypatch.setattr(bench, "run_sweep", lambda *a, **k: SimpleNamespace(ran=3, seconds=4.2))
    bench.run_benchmark(SimpleNamespace(benchmark="fmnist-c", n_target=1000),
                        bench.Suite(shifts={"fmnist-c": ["fog"]}, seeds=[0]), csv,
                        SimpleNamespace(record=None))
    assert capsys.readouterr().out == (f"fmnist-c n_target=1000: ran 3 cells in 4 s; complete: "
                                       f"2 rows in {csv}\n")


def test_an_older_n_target_plot_is_removed_when_the_results_have_no_n_target_cells(tmp_path):
    from deep.bench import Suite, summarize
    from deep.results import results_text
    suite = Suite(shifts={"fmnist-breeds": ["subpopulation"]}, seeds=[0, 1],
                  n_sweep_shifts=["fog"], n_sweep_sizes=[1000])
    cells = [("fmnist-breeds", "subpopulation", m, s, acc + 0.01 * s)
             for s in (0, 1) for m, acc in (("all", 0.6), ("first", 0.5))]
    (tmp_path / "results.csv").write_text(results_text(_full_rows(cells)))
    for suffix in ("png", "pdf"):
        (tmp_path / f"n_target.{suffix}").write_bytes(b"an older summary's plot")
    paths = summarize(tmp_path, suite)
    assert (tmp_path / "table.md") in paths and (tmp_path / "relative_accuracy.png") in paths
    assert not (tmp_path / "n_target.png").exists() and not (tmp_path / "n_target.pdf").exists()


def test_summarizing_into_a_file_says_out_is_the_suites_folder(tmp_path):
    from deep.bench import SUITES, summarize
    from deep.errors import ConfigError
    (tmp_path / "results.csv").write_text("")
    with pytest.raises(ConfigError, match="is a file; bench's --out is the suite's folder"):
        summarize(tmp_path / "results.csv", SUITES["fmnist-quick"])
