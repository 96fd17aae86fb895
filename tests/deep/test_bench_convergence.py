"""The Fashion-MNIST suite's issue-#15 summaries: intervals, inside-the-grid fractions,
the protocol line read from the data, and the two-stage seeds of each method."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from deep.bench import (SUITES, Suite, grid_table, interval_table, markdown_table,
                        n_target_grid_table, protocol_lines)
from deep.stats import format_interval


def _row(method, seed, test, lr=1e-3, best_epoch=5, epochs=15, shift="subpopulation",
         benchmark="fmnist-breeds"):
    return {"benchmark": benchmark, "shift": shift, "method": method, "seed": seed,
            "n_target": 1000, "lr": lr, "test_acc": test, "val_acc": test, "worst_group_acc": None,
            "select": "val_acc", "best_epoch": best_epoch, "epochs": epochs}


def test_interval_table_shows_the_paired_t_interval():
    # differences second - all over 3 seeds: 0.02, 0.04, 0.06 -> mean 4, sd 2 points;
    # half-width t(0.975, 2) * 2 / sqrt(3) = 4.303 * 1.1547 = 4.97 points (any t table)
    rows = []
    for seed, diff in enumerate([0.02, 0.04, 0.06]):
        rows += [_row("all", seed, 0.80), _row("second", seed, 0.80 + diff)]
    text = "\n".join(interval_table(rows, 1000))
    assert "| fmnist-breeds | +4.0 [-1.0, +9.0] |" in text


def test_a_verdict_needs_the_interval_above_zero():
    rows = []
    for seed, diff in enumerate([0.02, 0.04, 0.06]):  # interval [-1.0, +9.0]: not a win
        rows += [_row("all", seed, 0.80), _row("second", seed, 0.80 + diff)]
    (_, _, _, best, beats_all, *_), = markdown_table(rows, 1000)[1]
    assert (best, beats_all) == ("second", False)
    rows = []
    for seed, diff in enumerate([0.04, 0.05, 0.06]):  # [+1.5, +8.5]
        rows += [_row("all", seed, 0.80), _row("second", seed, 0.80 + diff)]
    (_, _, _, best, beats_all, *_), = markdown_table(rows, 1000)[1]
    assert (best, beats_all) == ("second", True)


def test_the_best_block_column_names_a_block_alone_only_when_it_is_separated():
    """`second` ahead of `first` by 1, 2, 3 points over three seeds: interval [-0.5, +4.5],
    so the column reads `second ≈ first`; by 3, 4, 5 points ([+1.5, +6.5]) it reads
    `second`. Before, the column named the highest mean whatever the seeds said."""
    def table(gaps):
        rows = []
        for seed, gap in enumerate(gaps):
            rows += [_row("all", seed, 0.80), _row("first", seed, 0.80 + 0.01 * seed),
                     _row("second", seed, 0.80 + 0.01 * seed + gap)]
        return markdown_table(rows, 1000)[0]
    assert "| second ≈ first |" in table([0.01, 0.02, 0.03])
    assert "| second |" in table([0.03, 0.04, 0.05])


def test_format_interval():
    assert format_interval((0.012, 0.02, 5)) == "+1.2 [-0.8, +3.2]"
    assert format_interval((0.012, float("nan"), 1)) == "+1.2"
    assert format_interval((float("nan"), float("nan"), 0)) == "-"


def test_grid_table_marks_fractions_below_80_percent():
    grid = [1e-2, 1e-3, 1e-4]
    rows = [_row("all", 0, 0.8, lr=lr) for lr in grid] + [_row("all", s, 0.8) for s in (1, 2, 3, 4)]
    selected = [_row("all", s, 0.8, best_epoch=15 if s == 0 else 3) for s in range(5)]
    text = "\n".join(grid_table(rows, selected, 1000))
    assert "| fmnist-breeds | 80 / 100 |" in text
    selected[1]["best_epoch"] = 15
    assert "| fmnist-breeds | **60** / 100 |" in "\n".join(grid_table(rows, selected, 1000))


def test_n_target_grid_table_has_one_row_per_size():
    rows, selected = [], []
    for n, chosen in ((100, 1e-2), (3000, 1e-4)):  # grid 1e-2..1e-4: 1e-4 is its edge
        rows += [_row("all", 0, 0.8, lr=lr) | {"n_target": n} for lr in (1e-2, 1e-3, 1e-4)]
        selected.append(_row("all", 0, 0.8, lr=chosen, best_epoch=15) | {"n_target": n})
    text = "\n".join(n_target_grid_table(rows, selected))
    assert "| n_target = 100 | **0** / **0** |" in text
    assert "| n_target = 3000 | **0** / **0** |" in text
    selected[0].update(lr=1e-3, best_epoch=3)
    assert "| n_target = 100 | 100 / 100 |" in "\n".join(n_target_grid_table(rows, selected))


def test_protocol_lines_read_the_stages_and_early_stopping_from_the_data():
    rows = [_row("all", 0, 0.8, lr=lr) for lr in (1e-2, 1e-3)] + [_row("all", 1, 0.8)]
    curves = [{"benchmark": "fmnist-breeds", "shift": "subpopulation", "method": "all", "seed": s,
               "n_target": 1000, "lr": lr, "epoch": e}
              for s, lr, n in ((0, 1e-2, 15), (0, 1e-3, 7), (1, 1e-3, 9)) for e in range(1, n + 1)]
    lines = protocol_lines(rows, curves, 1000)
    assert lines[0].startswith("Seeds [0, 1], learning rates [0.01, 0.001]")
    assert "Two stages: the whole grid on seed(s) [0]" in lines[1]
    assert "2 of 3 runs stopped before their epoch cap" in lines[2]
    rows[0]["epochs"] = 20  # a run with a larger cap that ran 15 epochs stopped early too
    assert "3 of 3 runs stopped" in protocol_lines(rows, curves, 1000)[2]
    assert len(protocol_lines(rows[:2], [], 1000)) == 1  # one stage, no curves


def test_protocol_lines_name_the_pairs_whose_grid_was_extended():
    rows = [_row(m, 0, 0.8, lr=lr) for m in ("all", "second") for lr in (1e-2, 1e-3)]
    rows += [_row("last", 0, 0.8, lr=lr) for lr in (1e-1, 1e-2, 1e-3)]
    lines = protocol_lines(rows, [], 1000)
    assert lines[0].startswith("Seeds [0], learning rates [0.01, 0.001]")
    assert lines[1] == ("The grid was extended where the first stage's choice sat at its edge: "
                        "fmnist-breeds subpopulation `last` +[0.1].")


def test_an_lr_that_exactly_half_the_searched_pairs_ran_is_an_extension_not_the_grid():
    """The grid is the lrs that more than half of the searched pairs ran: with two pairs,
    one extended to 0.1, 0.1 is that pair's extension (1 of 2 is not a majority)."""
    rows = [_row("all", 0, 0.8, lr=lr) for lr in (1e-2, 1e-3)]
    rows += [_row("last", 0, 0.8, lr=lr) for lr in (1e-1, 1e-2, 1e-3)]
    lines = protocol_lines(rows, [], 1000)
    assert lines[0].startswith("Seeds [0], learning rates [0.01, 0.001] ")
    assert lines[1] == ("The grid was extended where the first stage's choice sat at its edge: "
                        "fmnist-breeds subpopulation `last` +[0.1].")


def test_second_stage_seeds_per_method():
    suite = SUITES["fmnist"]
    assert suite.seeds_for("all") == [1, 2, 3, 4] and suite.seeds_for("first") == [1, 2, 3, 4]
    assert suite.seeds_for("auto-rgn") == suite.seeds_for("lp-ft") == [1, 2, 3, 4]
    plain = Suite(shifts={}, seeds=[0, 1], lrs=[1e-3], epochs=1)
    assert plain.seeds_for("auto-rgn") == [0, 1]
    # baselines on fewer seeds than the blocks: their first stage's seed is left out
    fewer = Suite(shifts={}, seeds=[0, 1, 2], lrs=[1e-3], epochs=1, lr_seeds=[0],
                  baseline_seeds=[0, 1])
    assert fewer.seeds_for("auto-rgn") == [1] and fewer.seeds_for("second") == [1, 2]


def test_breeds_split_sizes_reach_only_breeds():
    from deep.bench import main_protocols
    suite = SUITES["fmnist"]
    by_name = {p.benchmark: p for p in main_protocols(suite)}
    assert (by_name["fmnist-breeds"].val_per_class, by_name["fmnist-breeds"].test_per_class) == (50, 300)
    assert (by_name["fmnist-flip"].val_per_class, by_name["fmnist-flip"].test_per_class) == (10, 90)


SETTINGS = ("epochs", "patience", "batch_size", "weight_decay", "select", "val_per_class",
            "test_per_class", "arch")


@pytest.mark.parametrize("results", ["results.csv", "n_target.csv"])
def test_the_suites_protocols_are_the_ones_that_made_the_committed_table(results):
    """The protocol files (which a plain `sweep` runs too) and the suite give every cell of
    figures/fmnist-v2 the settings its row records, and the first-stage lr grid is the
    one the table searched (its rows hold it plus edge extensions only)."""
    from pathlib import Path
    from deep.bench import main_protocols, n_sweep_protocols
    from deep.sweep import read_results
    suite = SUITES["fmnist"]
    rows = read_results(Path(__file__).resolve().parents[2] / suite.out / results)
    protocols = {p.benchmark: p for p in main_protocols(suite)} if results == "results.csv" \
        else {("fmnist-c", p.n_target): p for p in n_sweep_protocols(suite)}
    checked = 0
    for row in rows:
        key = row["benchmark"] if results == "results.csv" else (row["benchmark"], row["n_target"])
        if key not in protocols:  # n_target.csv: the main table's own n_target
            continue
        p = protocols[key]
        assert {k: getattr(p, k) for k in SETTINGS} == {k: row[k] for k in SETTINGS}, row
        assert row["n_target"] == p.n_target and row["shift"] in p.shifts
        assert row["method"] in p.methods
        checked += 1
    assert checked > 80
    # the first stage (lr_seeds) ran the whole grid for every (shift, method), and more
    # only where the grid was extended at an edge (then the grid plus the extension)
    grid = {lr for p in protocols.values() for lr in p.lrs}
    assert all(set(p.lrs) == grid for p in protocols.values())
    searched = defaultdict(set)
    for r in rows:
        if r["seed"] in suite.lr_seeds:
            searched[(r["benchmark"], r["shift"], r["method"], r["n_target"])].add(r["lr"])
    assert all(lrs >= grid for lrs in searched.values())
    assert Counter(frozenset(lrs) for lrs in searched.values()).most_common(1)[0][0] == grid


def test_docs_name_every_commit_and_machine_the_committed_rows_record():
    """docs/fmnist.md says which code and machine made the committed rows; it said every
    row but the flip rerun came from 6d963c1 and that no row names its machine, while 96
    rows added later record commit 946e7324f5ae and an AMD EPYC."""
    from pathlib import Path
    from deep.sweep import read_results
    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "fmnist.md").read_text()
    docs = " ".join(docs.split())  # a quoted value may wrap
    rows = [r for name in ("results.csv", "n_target.csv")
            for r in read_results(root / SUITES["fmnist"].out / name)]
    commits = Counter(r["commit"] for r in rows)
    machines = Counter(r["machine"] for r in rows if r["machine"])
    for value, n in [*commits.most_common()[1:], *machines.items()]:  # each exception, counted
        assert f"{n} rows" in docs or f"{n} fmnist-flip rows" in docs, (value, n)
    assert all(c[:7] in docs for c in commits), commits
    assert all(f"`{m}`" in docs for m in machines)


def test_all_runs_on_every_seed_like_the_blocks_not_on_the_baselines_fewer():
    """Guards `all` among the core methods of seeds_for: every block's difference to `all`
    is paired by seed, so `all` must run on each seed a block runs on, not on the
    baselines' fewer seeds (else the table's relative column pairs blocks on seed 1 only)."""
    fewer = Suite(shifts={}, seeds=[0, 1, 2], lrs=[1e-3], epochs=1, lr_seeds=[0],
                  baseline_seeds=[0, 1])
    assert fewer.seeds_for("all") == fewer.seeds_for("first") == [1, 2]
    assert fewer.seeds_for("lp-ft") == [1]
