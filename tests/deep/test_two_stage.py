"""deep.two_stage (issue #15): the lr grid on the first-stage seeds, the other seeds at
the chosen lr; curves of every run kept beside the results."""

from __future__ import annotations

import pytest

from deep.convergence import CurvesFile, read_curves
from deep.errors import ConfigError
from deep.protocol import load_protocol
from deep.sweep import read_results
from deep.two_stage import (chosen_lrs, drop_superseded, edge_steps, lr_ladder, run_two_stage,
                             second_stage)

pytestmark = pytest.mark.usefixtures("one_thread")


def protocol(**changes):
    base = dict(shifts=["noise"], methods=["last", "all"], lrs=[1e-2, 1e-3], epochs=2,
                n_target=32, val_per_class=5, test_per_class=5)
    return load_protocol("synthetic").replace(**{**base, **changes})


def row(method, lr, seed, val, shift="noise", select="val_acc", wg=None):
    return dict(benchmark="synthetic", shift=shift, method=method, seed=seed, n_target=32,
                lr=lr, val_acc=val, val_worst_group_acc=wg, select=select)


def test_chosen_lr_is_the_best_mean_over_first_stage_seeds_ties_to_the_larger():
    p = protocol()
    rows = [row("last", 1e-2, 0, 0.9), row("last", 1e-3, 0, 0.5),
            row("last", 1e-2, 1, 0.1), row("last", 1e-3, 1, 0.6),   # mean 0.5 vs 0.55
            row("all", 1e-2, 0, 0.7), row("all", 1e-3, 0, 0.7),     # tie
            row("all", 1e-2, 1, 0.7), row("all", 1e-3, 1, 0.7),
            row("all", 1e-2, 2, 0.0)]                                # not a first-stage seed
    assert chosen_lrs(rows, p, [0, 1]) == {("noise", "last"): 1e-3, ("noise", "all"): 1e-2}
    # an unfinished grid is not chosen from
    assert chosen_lrs(rows[:3], p, [0, 1]) == {}
    worst = [row("last", 1e-2, 0, 0.9, select="worst_group_val_acc", wg=0.1),
             row("last", 1e-3, 0, 0.5, select="worst_group_val_acc", wg=0.4)]
    assert chosen_lrs(worst, p, [0]) == {("noise", "last"): 1e-3}


def test_only_the_protocols_shifts_methods_benchmark_and_size_are_chosen_for():
    """A results file shared with other runs holds rows of other shifts, methods, target
    sizes and benchmarks: none of them gets a choice (and so no second stage)."""
    p = protocol(shifts=["noise"], methods=["last"])
    mine = [row("last", 1e-2, 0, 0.9), row("last", 1e-3, 0, 0.5)]
    others = ([row("last", lr, 0, 0.5, shift="flip") for lr in (1e-2, 1e-3)]
              + [row("all", lr, 0, 0.5) for lr in (1e-2, 1e-3)]
              + [row("last", lr, 0, 0.5) | {"n_target": 64} for lr in (1e-2, 1e-3)]
              + [row("last", lr, 0, 0.5) | {"benchmark": "fmnist-c"} for lr in (1e-2, 1e-3)])
    assert chosen_lrs(mine + others, p, [0]) == {("noise", "last"): 1e-2}
    assert edge_steps(mine + others, p, [0], extend=1) == {("noise", "last"): 1e-1}


def test_a_one_lr_grid_is_not_extended():
    """A grid of one lr is a fixed lr, not a search: its choice is not at an edge."""
    p = protocol(lrs=[1e-2])
    rows = [row("last", 1e-2, 0, 0.9)]
    assert edge_steps(rows, p, [0], extend=2) == {}
    assert chosen_lrs(rows, p, [0], extend=2) == {("noise", "last"): 1e-2}


def test_second_stage_groups_methods_by_shift_lr_and_seeds():
    p = protocol(methods=["first", "last", "all"])
    choices = {("noise", "first"): 1e-3, ("noise", "all"): 1e-3, ("noise", "last"): 1e-2}
    stages = second_stage(p, choices, lambda m: [1, 2] if m != "first" else [1])
    got = sorted((s.shifts[0], tuple(s.methods), tuple(s.lrs), tuple(s.seeds)) for s in stages)
    assert got == [("noise", ("all",), (1e-3,), (1, 2)), ("noise", ("first",), (1e-3,), (1,)),
                   ("noise", ("last",), (1e-2,), (1, 2))]


def test_run_two_stage_writes_grid_on_seed_0_then_seed_1_at_the_choice(tmp_path, synthetic_checkpoint):
    out, curves_path = tmp_path / "results.csv", tmp_path / "curves.csv"
    p = protocol()
    curves = CurvesFile(curves_path)
    run_two_stage(p, out, [0], lambda m: [1], on_row=curves.record, progress=False)
    rows = read_results(out)
    first = [r for r in rows if r["seed"] == 0]
    assert sorted((r["method"], r["lr"]) for r in first) == \
        sorted((m, lr) for m in p.methods for lr in p.lrs)
    choices = chosen_lrs(rows, p, [0])
    second = {(r["method"], r["lr"]) for r in rows if r["seed"] == 1}
    assert second == {(m, choices[("noise", m)]) for m in p.methods}
    # every run's epochs are in curves.csv, and the chosen epoch's val_acc is the row's
    back = read_curves(curves_path)
    assert len(back) == sum(r["epochs"] for r in rows)  # no patience: every epoch ran
    for r in rows:
        mine = {c["epoch"]: c["val_acc"] for c in back
                if (c["method"], c["seed"], c["lr"]) == (r["method"], r["seed"], r["lr"])}
        assert mine[r["best_epoch"]] == r["val_acc"]
    # resuming runs nothing new
    again = run_two_stage(p, out, [0], lambda m: [1], progress=False)
    assert sum(s.ran for s in again) == 0


def test_second_stage_seeds_must_leave_out_the_first_stage():
    with pytest.raises(ConfigError, match="leave out the first stage"):
        run_two_stage(protocol(), "unused.csv", [0], lambda m: [0, 1])
    # one method's overlap is enough (its first-stage seed would run twice), named alone
    with pytest.raises(ConfigError, match=r"leave out the first stage's \[0\]; got \{'all': \[0\]\}"):
        run_two_stage(protocol(), "unused.csv", [0], lambda m: [0, 1] if m == "all" else [1])


def test_lr_ladder_steps_at_the_grids_ratio_and_rounds_to_the_decade():
    assert lr_ladder([1e-1, 1e-2, 1e-3, 1e-4, 1e-5], 2) == ([1.0, 10.0], [1e-6, 1e-7])
    assert lr_ladder([3e-3, 1e-3], 1) == ([9e-3], [float(f"{1e-3 / 3:.12g}")])
    assert lr_ladder([1e-3], 1) == ([1e-2], [1e-4])
    assert lr_ladder([1e-2, 1e-3], 0) == ([], [])


def test_edge_steps_extend_a_choice_at_either_edge_until_it_is_inside():
    p = protocol(lrs=[1e-2, 1e-3])
    grid = [row("last", 1e-2, 0, 0.9), row("last", 1e-3, 0, 0.5),     # top edge
            row("all", 1e-2, 0, 0.1), row("all", 1e-3, 0, 0.6)]       # bottom edge
    assert edge_steps(grid, p, [0], extend=2) == {("noise", "last"): 1e-1,
                                                  ("noise", "all"): 1e-4}
    assert edge_steps(grid, p, [0], extend=0) == {}
    # `last` worse one step up: 1e-2 is now inside; `all` better one step down: go on
    more = grid + [row("last", 1e-1, 0, 0.8), row("all", 1e-4, 0, 0.7)]
    assert edge_steps(more, p, [0], extend=2) == {("noise", "all"): 1e-5}
    assert chosen_lrs(more, p, [0], extend=2) == {("noise", "last"): 1e-2,
                                                   ("noise", "all"): 1e-4}
    # the extension stops after `extend` steps even when the edge still wins
    most = more + [row("all", 1e-5, 0, 0.8)]
    assert edge_steps(most, p, [0], extend=2) == {}
    assert chosen_lrs(most, p, [0], extend=2)[("noise", "all")] == 1e-5
    # a step beyond `extend` already in the CSV is not searched (1e-6 is 3 steps down)
    assert chosen_lrs(most + [row("all", 1e-6, 0, 0.99)], p, [0], extend=2)[("noise", "all")] == 1e-5
    # a step that not every first-stage seed finished is not searched
    two = [r | {"seed": s} for r in grid for s in (0, 1)] + [row("last", 1e-1, 0, 1.0)]
    assert chosen_lrs(two, p, [0, 1], extend=2)[("noise", "last")] == 1e-2
    assert edge_steps(two, p, [0, 1], extend=2)[("noise", "last")] == 1e-1


def test_drop_superseded_keeps_later_seeds_at_the_first_stages_current_choice():
    first = [row("last", 1e-2, 0, 0.6), row("last", 1e-1, 0, 0.7), row("last", 1.0, 0, 0.9),
             row("all", 1e-3, 0, 0.8), row("all", 1e-4, 0, 0.8),      # tie: the larger
             row("all", 1e-5, 0, 0.1)]
    later = [row("last", 1e-1, 1, 0.95), row("last", 1.0, 1, 0.2),     # 1e-1 was chosen before
             row("all", 1e-3, 1, 0.5), row("all", 1e-4, 1, 0.9),
             row("first", 1e-3, 1, 0.5), row("first", 1e-2, 1, 0.6)]   # no first stage: kept
    kept = drop_superseded(first + later, [0])
    assert [r for r in kept if r["seed"] == 0] == first
    assert {(r["method"], r["lr"]) for r in kept if r["seed"] == 1} == \
        {("last", 1.0), ("all", 1e-3), ("first", 1e-3), ("first", 1e-2)}
    # a one-stage sweep (every seed ran the whole grid) keeps every row
    one_stage = first + [r | {"seed": 1} for r in first]
    assert drop_superseded(one_stage, [0]) == one_stage


def test_run_two_stage_extends_the_grid_before_the_second_stage(tmp_path, synthetic_checkpoint):
    # 1e-6 and 1e-7 barely move a 2-epoch run: the choice sits at (or ties to) the top edge
    out = tmp_path / "results.csv"
    p = protocol(lrs=[1e-6, 1e-7], methods=["last"])
    run_two_stage(p, out, [0], lambda m: [1], extend=2, progress=False)
    rows = read_results(out)
    seed0 = sorted(r["lr"] for r in rows if r["seed"] == 0)
    assert len(seed0) > 2 and set(seed0) <= {1e-7, 1e-6, 1e-5, 1e-4, 1e-8, 1e-9}
    assert edge_steps(rows, p, [0], extend=2) == {}
    choice = chosen_lrs(rows, p, [0], extend=2)[("noise", "last")]
    assert [r["lr"] for r in rows if r["seed"] == 1] == [choice]
    again = run_two_stage(p, out, [0], lambda m: [1], extend=2, progress=False)
    assert sum(s.ran for s in again) == 0


def test_chosen_lr_ignores_a_finished_step_beyond_a_gap_in_the_extension():
    """Guards that the choice is made over the contiguous searched grid, not over every lr
    done: a row two steps up (1.0) with the step between (1e-1) missing is not chosen."""
    p = protocol()
    rows = [row("last", 1e-3, 0, 0.5), row("last", 1e-2, 0, 0.6),
            row("last", 1.0, 0, 0.9)]                    # two steps up, 1e-1 missing
    assert chosen_lrs(rows, p, [0], extend=2) == {("noise", "last"): 1e-2}


def test_drop_superseded_ignores_an_lr_not_every_first_stage_seed_finished():
    """The table's later rows must sit at the lr chosen_lrs picks, which compares only lrs
    that every first-stage seed finished: 1.0 ran on seed 0 alone (0.9) and must not beat
    0.1 (0.4 on seeds 0 and 1), else seed 3's row at 0.1 is dropped and seed 2's kept."""
    first = [row("last", 1.0, 0, 0.9), row("last", 0.1, 0, 0.4), row("last", 0.1, 1, 0.4)]
    later = [row("last", 1.0, 2, 0.1), row("last", 0.1, 3, 0.2)]
    p = protocol(lrs=[0.1], methods=["last"])
    assert chosen_lrs(first, p, [0, 1]) == {("noise", "last"): 0.1}
    kept = drop_superseded(first + later, [0, 1])
    assert {(r["seed"], r["lr"]) for r in kept if r["seed"] >= 2} == {(3, 0.1)}


def test_bench_closing_line_counts_the_files_rows_not_this_plans(tmp_path, synthetic_checkpoint,
                                                                capsys):
    """A rerun of a finished two-stage benchmark plans no lr step it added before, so its
    plans skip fewer cells than the file holds: the line names the file's rows."""
    from deep.bench import Suite, run_benchmark
    out = tmp_path / "results.csv"
    p = protocol(lrs=[1e-6, 1e-7], methods=["last"])
    suite = Suite(shifts={"synthetic": ["noise"]}, seeds=[0, 1], lr_seeds=[0], extend_lr_grid=2)
    for _ in range(2):
        run_benchmark(p, suite, out, CurvesFile(tmp_path / "curves.csv"), progress=False)
    rows = read_results(out)
    assert len(rows) > 3  # the grid grew beyond its 2 rates
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("synthetic n_target=32: ran 0 cells in ")
    assert last.endswith(f"complete: {len(rows)} rows in {out}")


def test_a_method_without_seeds_left_gets_no_second_stage_sweep():
    """Guards `if seeds` in second_stage: a method whose seeds all ran in the first stage
    (baseline_seeds equal to lr_seeds) has nothing left to run; it gets no sweep, rather
    than one of zero seeds (an empty sweep still records a configuration and a summary)."""
    p = protocol(methods=["first", "all"])
    choices = {("noise", "first"): 1e-3, ("noise", "all"): 1e-3}
    stages = second_stage(p, choices, lambda m: [] if m == "first" else [1, 2])
    assert [(s.shifts, s.methods, s.lrs, s.seeds) for s in stages] == \
        [(["noise"], ["all"], [1e-3], [1, 2])]
    assert second_stage(p, choices, lambda m: []) == []


def test_a_first_stage_cell_without_a_validation_metric_loses_its_lr_outright():
    """Guards -inf for a cell with no metric (no finished epoch): 1e-2 has 0.9 on seed 0
    and none on seed 1, 1e-3 has 0.4 on both. Scored as 0 the missing cell would leave
    1e-2 a mean of 0.45 > 0.4 and win; it must lose, so 1e-3 is chosen."""
    p = protocol(methods=["last"])
    rows = [row("last", 1e-2, 0, 0.9), row("last", 1e-2, 1, None),
            row("last", 1e-3, 0, 0.4), row("last", 1e-3, 1, 0.4)]
    assert chosen_lrs(rows, p, [0, 1]) == {("noise", "last"): 1e-3}


def test_drop_superseded_chooses_per_target_size():
    """Guards n_target in drop_superseded's pairs: at 32 target images the first stage
    chose 1e-2, at 64 it chose 1e-3; seed 1 ran each size at its own choice, and both
    rows are kept (one choice for both sizes would drop one of them)."""
    vals = {32: {1e-1: 0.1, 1e-2: 0.9, 1e-3: 0.5}, 64: {1e-1: 0.1, 1e-2: 0.5, 1e-3: 0.9}}
    first = [row("last", lr, 0, v) | {"n_target": n} for n in (32, 64) for lr, v in vals[n].items()]
    later = [row("last", 1e-2, 1, 0.7) | {"n_target": 32}, row("last", 1e-3, 1, 0.7) | {"n_target": 64}]
    kept = drop_superseded(first + later, [0])
    assert {(r["n_target"], r["lr"]) for r in kept if r["seed"] == 1} == {(32, 1e-2), (64, 1e-3)}
