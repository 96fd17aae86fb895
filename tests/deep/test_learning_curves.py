"""The converged suite's learning-curve figure (issue #15 audit): every method of the
table gets a line, a mean is drawn only while at least half its runs go on, and the
table's header says the epoch (not its cap) is chosen by validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from deep.bench import SUITES, curve_lines, learning_curve_panels, protocol_lines
from deep.convergence import read_curves
from deep.report import select_learning_rates
from deep.sweep import read_results
from deep.two_stage import drop_superseded

ROOT = Path(__file__).resolve().parents[2]


def _cell(method, seed, shift="gaussian_noise", benchmark="fmnist-c", epochs=25):
    return {"benchmark": benchmark, "shift": shift, "method": method, "seed": seed,
            "n_target": 1000, "lr": 1e-3, "best_epoch": 1, "epochs": epochs}


def _curve(cell, accs):
    return [{**cell, "epoch": e, "val_acc": a, "val_worst_group_acc": None, "train_loss": 1.0}
            for e, a in enumerate(accs, start=1)]


def test_every_method_gets_a_line_drawn_while_half_its_runs_go_on():
    # `all` on 4 seeds stopping at epochs 2, 3, 3, 5; `lp-ft` and `auto-rgn` on seed 0 only
    lengths = {0: 2, 1: 3, 2: 3, 3: 5}
    selected = [_cell("all", s) for s in lengths] + [_cell("first", 0), _cell("lp-ft", 0),
                                                     _cell("auto-rgn", 0)]
    curves = [c for s, n in lengths.items() for c in _curve(selected[s], [0.5] * (n - 1) + [0.1])]
    for cell in selected[4:]:
        curves += _curve(cell, [0.6, 0.7])
    lines = {line["method"]: line for line in curve_lines(learning_curve_panels(curves, selected, 1000))
             ["fmnist-c (input)"]}
    assert list(lines) == ["first", "all", "lp-ft", "auto-rgn"]  # the table's order, none left out
    # epochs 1-3 keep at least 2 of 4 runs; epochs 4-5 rest on one run: not drawn
    assert lines["all"]["x"] == [1, 2, 3]
    # epoch 2: seeds 0-3 at (0.1, 0.5, 0.5, 0.5); epoch 3: seeds 1-3 at (0.1, 0.1, 0.5)
    assert lines["all"]["y"] == pytest.approx([50, 40, 70 / 3])
    assert lines["all"]["style"]["label"] == "all (4 runs)"
    assert lines["lp-ft"]["style"]["label"] == "lp-ft (1 run)"
    assert lines["lp-ft"]["style"]["ls"] == "--" and lines["first"]["style"]["ls"] == "-"
    colours = [line["style"]["color"] for line in lines.values()]
    assert len(set(colours)) == len(colours)


def test_the_committed_figure_has_every_method_of_the_table():
    out = ROOT / SUITES["fmnist"].out
    if not (out / "curves.csv").exists():
        pytest.skip("the converged suite is not committed")
    main = select_learning_rates(drop_superseded(read_results(out / "results.csv"),
                                                 SUITES["fmnist"].lr_seeds))
    panels = learning_curve_panels(read_curves(out / "curves.csv"), main, 1000)
    methods = {r["method"] for r in main if r["n_target"] == 1000}
    assert {"lp-ft", "auto-rgn"} <= methods
    for panel, lines in panels.items():
        assert set(lines) == methods, panel
        for method, points in lines.items():  # the first epoch holds every run
            assert all(2 * n >= points[0][2] for _, _, n in points), (panel, method)
    # the tail the audit saw: fmnist-c `all` at 80 % on one run at epoch 22
    assert max(e for e, _, _ in panels["fmnist-c (input)"]["all"]) < 22


def test_the_header_says_the_epoch_is_chosen_within_a_fixed_cap():
    rows = [_cell("all", 0, benchmark=b, epochs=e)
            for b, e in (("fmnist-c", 25), ("fmnist-breeds", 25), ("fmnist-flip", 50))]
    assert ("the epoch picked by validation within a cap of 25 epochs (50 on fmnist-flip)"
            in protocol_lines(rows, [], 1000)[0])
    # one cap (the older 4-epoch table): its committed wording stays
    assert "25 epochs (picked by validation)" in protocol_lines(rows[:2], [], 1000)[0]


def test_the_curves_are_those_of_the_tables_n_target_only():
    """Guards learning_curve_panels' n_target filter: the selected rows of the n_target
    sweep (fmnist-c at 100 targets, say) are other runs than the table's; averaged in, a
    curve at 1000 targets of 0.8 would read (0.8 + 0.2) / 2 = 0.5 over 2 runs."""
    table = _cell("first", 0)
    small = {**_cell("first", 0), "n_target": 100}
    curves = _curve(table, [0.8, 0.8]) + _curve(small, [0.2, 0.2])
    panels = learning_curve_panels(curves, [table, small], 1000)
    assert panels == {"fmnist-c (input)": {"first": [(1, 0.8, 1), (2, 0.8, 1)]}}
    assert learning_curve_panels(curves, [table, small], 100) == \
        {"fmnist-c (input)": {"first": [(1, 0.2, 1), (2, 0.2, 1)]}}


def test_the_header_breaks_a_tie_between_caps_towards_the_smaller():
    """Guards the tie rule of the header's common cap: with as many rows at 25 epochs as at
    50, the sentence names 25 as the cap and 50 as the exception, whichever comes first."""
    for benchmarks in ((("fmnist-c", 25), ("fmnist-flip", 50)),
                       (("fmnist-flip", 50), ("fmnist-c", 25))):
        rows = [_cell("all", 0, benchmark=b, epochs=e) for b, e in benchmarks]
        assert ("the epoch picked by validation within a cap of 25 epochs (50 on fmnist-flip)"
                in protocol_lines(rows, [], 1000)[0])
