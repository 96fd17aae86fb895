"""deep.convergence: the curves file, the inside-the-grid fractions and the learning-curve
means (issue #15); deep.stats' t intervals."""

import math

import pytest

from deep.convergence import CURVE_COLUMNS, CurvesFile, inside_grid, learning_curves, read_curves
from deep.stats import t_interval
from deep.errors import ResultsError


def row(method="first", lr=1e-3, seed=0, best_epoch=5, epochs=15, shift="s", bench="b",
        val_acc=0.5, history=None):
    r = dict(benchmark=bench, shift=shift, method=method, seed=seed, n_target=100, lr=lr,
             best_epoch=best_epoch, epochs=epochs, val_acc=val_acc)
    if history is not None:
        r["history"] = [dict(epoch=i + 1, val_acc=v, val_worst_group_acc=None, train_loss=1.0 / (i + 1))
                        for i, v in enumerate(history)]
    return r


def test_inside_grid_counts_epoch_before_the_cap_and_lr_strictly_inside():
    grid = [1e-2, 1e-3, 1e-4]
    rows = [row(lr=lr, seed=0) for lr in grid] + [row(lr=1e-3, seed=s) for s in (1, 2, 3)]
    # Chosen cells: seed 0 at 1e-3 (inside), seed 1 at 1e-3 but at the last epoch,
    # seed 2 at 1e-3 at epoch 14 (inside), seed 3 reused 1e-2 (grid edge, from seed 0's grid).
    selected = [row(lr=1e-3, seed=0, best_epoch=3), row(lr=1e-3, seed=1, best_epoch=15),
                row(lr=1e-3, seed=2, best_epoch=14), row(lr=1e-2, seed=3, best_epoch=2)]
    out = inside_grid(rows + [row(lr=1e-2, seed=3)], selected)
    assert out == {("b", "first"): {"cells": 4, "epoch_inside": 3 / 4, "lr_inside": 3 / 4}}


def test_inside_grid_is_per_benchmark_and_method():
    rows = [row(lr=lr, method=m) for lr in (1e-2, 1e-3, 1e-4) for m in ("first", "all")]
    selected = [row(lr=1e-4, method="all", best_epoch=15), row(lr=1e-3, method="first")]
    out = inside_grid(rows, selected)
    assert out[("b", "all")] == {"cells": 1, "epoch_inside": 0.0, "lr_inside": 0.0}
    assert out[("b", "first")] == {"cells": 1, "epoch_inside": 1.0, "lr_inside": 1.0}


def test_inside_grid_takes_each_shifts_own_lr_grid():
    """Guards the grid being per (benchmark, shift, method, n_target), not pooled over
    shifts: shift a searched {0.1, 0.01} and b {0.01, 0.001}; 0.01 is at the edge of each
    shift's grid although it lies inside the pooled {0.1, 0.01, 0.001}."""
    rows = [row(lr=lr, shift="a") for lr in (0.1, 0.01)] + [row(lr=lr, shift="b") for lr in (0.01, 0.001)]
    selected = [row(lr=0.01, shift="a"), row(lr=0.01, shift="b")]
    out = inside_grid(rows, selected)
    assert out == {("b", "first"): {"cells": 2, "epoch_inside": 1.0, "lr_inside": 0.0}}

def test_t_interval_uses_the_t_quantile_with_n_minus_one_degrees_of_freedom():
    # Student t, 4 degrees of freedom, two-sided 95 %: 2.7764 (any t table).
    mean, half, n = t_interval((0.02, 0.01, 5))
    assert (mean, n) == (0.02, 5)
    assert half == pytest.approx(0.027764, abs=1e-6)
    assert math.isnan(t_interval((0.02, math.nan, 1))[1])


def test_curves_file_round_trips_and_a_rerun_cell_replaces_its_epochs(tmp_path):
    path = tmp_path / "curves.csv"
    f = CurvesFile(path)
    f.record(row(seed=0, history=[0.5, 0.6, 0.55]))
    f.record(row(seed=1, history=[0.4]))
    back = read_curves(path)
    assert [(r["seed"], r["epoch"], r["val_acc"]) for r in back] == \
        [(0, 1, 0.5), (0, 2, 0.6), (0, 3, 0.55), (1, 1, 0.4)]
    assert back[0]["lr"] == 1e-3 and back[0]["val_worst_group_acc"] is None
    again = CurvesFile(path)  # a resumed sweep reruns seed 0 (killed before its result row)
    again.record(row(seed=0, history=[0.7, 0.8]))
    assert [(r["seed"], r["epoch"], r["val_acc"]) for r in read_curves(path)] == \
        [(0, 1, 0.7), (0, 2, 0.8), (1, 1, 0.4)]


def test_curves_file_errors_name_the_line_and_column(tmp_path):
    path = tmp_path / "curves.csv"
    CurvesFile(path).record(row(history=[0.5, 0.6]))
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",2,", ",two,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError, match=r"line 3: column 'epoch' holds 'two'"):
        read_curves(path)
    path.write_text("a,b\n")
    with pytest.raises(ResultsError, match="not a curves file"):
        read_curves(path)
    with pytest.raises(ResultsError, match="no 'history'"):
        CurvesFile(tmp_path / "other.csv").record(row())
    assert CURVE_COLUMNS[-1] == "train_loss"


def test_learning_curves_average_the_chosen_lr_over_runs_that_reached_each_epoch():
    curves = []
    for seed, hist in ((0, [0.2, 0.4, 0.6]), (1, [0.4, 0.6])):
        curves += CurvesFileRows(row(seed=seed, lr=1e-3, history=hist))
    curves += CurvesFileRows(row(seed=0, lr=1e-2, history=[0.9, 0.9, 0.9]))  # not chosen
    selected = [row(seed=0, lr=1e-3), row(seed=1, lr=1e-3)]
    out = learning_curves(curves, selected, panel_of=lambda r: "panel")
    got = out["panel"]["first"]
    assert [e for e, _, _ in got] == [1, 2, 3]
    assert [n for _, _, n in got] == [2, 2, 1]
    assert [m for _, m, _ in got] == pytest.approx([0.3, 0.5, 0.6])
    assert learning_curves(curves, selected, panel_of=lambda r: None) == {}


def CurvesFileRows(r):
    from deep.convergence import curve_rows
    return curve_rows(r)


def test_above_zero_is_the_interval_rule_and_never_true_for_one_seed():
    from deep.stats import above_zero
    assert above_zero((0.05, 0.01, 5))            # half-width 2.776 * 0.01 = 0.028 < 0.05
    assert not above_zero((0.02, 0.01, 3))        # half-width 4.303 * 0.01 = 0.043 > 0.02
    assert not above_zero((0.5, math.nan, 1))     # one seed: no interval, no claim


def curve_of_runs(lengths: dict, min_share: float) -> list:
    """`first`'s learning curve over runs (one per seed) of `lengths[seed]` epochs each."""
    curves = []
    for seed, n in lengths.items():
        curves += CurvesFileRows(row(seed=seed, history=[0.5] * n))
    selected = [row(seed=seed) for seed in lengths]
    return learning_curves(curves, selected, panel_of=lambda r: "panel",
                           min_share=min_share)["panel"]["first"]


def test_learning_curves_keep_an_epoch_reached_by_exactly_min_share_of_the_runs():
    """Guards `>=` on min_share: with min_share 0.5 (deep.bench.CURVE_SHARE) and 4 runs,
    the last epoch, reached by exactly 2 of them, is kept; the one reached by 1 is not."""
    got = curve_of_runs({0: 2, 1: 2, 2: 3, 3: 4}, min_share=0.5)
    assert [(e, n) for e, _, n in got] == [(1, 4), (2, 4), (3, 2)]


def test_a_decimal_min_share_is_not_lost_to_rounding():
    """0.28 of 25 runs is 7 runs, though 0.28 * 25 is 7.000000000000001 in floats."""
    got = curve_of_runs({seed: (3 if seed < 7 else 2) for seed in range(25)}, min_share=0.28)
    assert [(e, n) for e, _, n in got] == [(1, 25), (2, 25), (3, 7)]


def test_above_zero_needs_the_lower_end_strictly_above_zero():
    """Guards `>` in above_zero: identical differences on every seed (se 0) of 0 give the
    interval [0, 0], which does not lie above 0 (two equal methods must not "beat")."""
    from deep.stats import above_zero
    assert not above_zero((0.0, 0.0, 3))
    assert above_zero((0.01, 0.0, 3))


def test_interval_table_shows_each_cell_with_two_seeds_as_an_interval():
    """Guards interval_table's "no cell has two seeds" rule: one single-seed cell does not
    drop the table (the cell shows its mean alone); only all of them do."""
    from deep.stats import interval_table
    cells = {("a", "x"): (0.02, 0.01, 5), ("b", "x"): (0.03, math.nan, 1)}
    lines = interval_table("T", ["a", "b"], ["x"], lambda r, c: cells[(r, c)])
    # half-width t(0.975, 4) * 0.01 = 2.776 points (any t table): [-0.8, +4.8]
    assert lines == ["T", "", "| shift | x |", "|---|---|", "| a | +2.0 [-0.8, +4.8] |",
                     "| b | +3.0 |", ""]
    assert interval_table("T", ["b"], ["x"], lambda r, c: cells[(r, c)]) == []


def test_curves_file_keeps_every_float_exactly(tmp_path):
    """Guards the floats' repr in the curves file: a rounded lr (10^-3.5 = 0.000316227766...)
    would no longer match its results row's key, and the cell's curve would drop out of
    `learning_curves` without a word."""
    path = tmp_path / "curves.csv"
    r = row(lr=10 ** -3.5, history=[1 / 3, 2 / 3])
    r["history"][0]["train_loss"] = 1 / 7
    CurvesFile(path).record(r)
    back = read_curves(path)
    assert [(c["lr"], c["val_acc"]) for c in back] == [(10 ** -3.5, 1 / 3), (10 ** -3.5, 2 / 3)]
    assert back[0]["train_loss"] == 1 / 7
    got = learning_curves(back, [row(lr=10 ** -3.5)], panel_of=lambda r: "panel")
    assert [(e, n) for e, _, n in got["panel"]["first"]] == [(1, 1), (2, 1)]


def test_inside_grid_takes_each_target_sizes_own_lr_grid():
    """Guards the grid being per n_target too: at n_target 100 the shift searched
    {0.1, 0.01, 0.001}, at n_target 3000 {0.01, 0.001}. A cell at 3000 that chose 0.01
    sits at its own grid's top edge (0 % inside), though 0.01 is inside the pooled grid."""
    rows = [row(lr=lr) for lr in (0.1, 0.01, 0.001)]
    rows += [row(lr=lr) | {"n_target": 3000} for lr in (0.01, 0.001)]
    selected = [row(lr=0.01) | {"n_target": 3000}]
    out = inside_grid(rows, selected)
    assert out == {("b", "first"): {"cells": 1, "epoch_inside": 1.0, "lr_inside": 0.0}}


def test_learning_curves_count_only_the_runs_that_have_a_curve():
    """Guards the share's denominator: a selected cell without curve rows (a results row
    whose curves.csv is missing, e.g. a legacy run) is no run of the curve. One run of 3
    epochs with a curve and two without: every epoch is reached by 1 of 1 runs (kept at
    min_share 0.6), not by 1 of 3 (which would drop the whole curve)."""
    curves = CurvesFileRows(row(seed=0, history=[0.2, 0.4, 0.6]))
    selected = [row(seed=0), row(seed=1), row(seed=2)]
    got = learning_curves(curves, selected, panel_of=lambda r: "panel", min_share=0.6)
    assert got["panel"]["first"] == [(1, 0.2, 1), (2, 0.4, 1), (3, 0.6, 1)]


def test_a_reader_never_sees_the_curves_file_partly_written(tmp_path):
    """Guards the curves file being replaced whole (temp file, then rename), as the results
    are: `bench --summarize-only` may read curves.csv while a sweep records a cell, and a
    rewrite in place (truncate, then write) shows a reader that opened it before an empty
    or half-written file."""
    path = tmp_path / "curves.csv"
    curves = CurvesFile(path)
    curves.record(row(seed=0, history=[0.5]))
    before = path.read_bytes()
    with open(path, "rb") as opened_before:
        curves.record(row(seed=1, history=[0.25, 0.75]))
        assert opened_before.read() == before, "the file changed under a reader that had it open"
    assert [(c["seed"], c["epoch"], c["val_acc"]) for c in read_curves(path)] == \
        [(0, 1, 0.5), (1, 1, 0.25), (1, 2, 0.75)]


def test_mean_se_by_hand_and_with_one_value_or_none():
    """Values 0.1, 0.2, 0.6: mean 0.3, deviations -0.2, -0.1, +0.3, sample variance
    0.14 / 2 = 0.07, s.e. sqrt(0.07 / 3) = 0.152753. One value: no spread (nan). None:
    no mean either (nan, not 0, which would read as a measured 0 % wherever n is not
    looked at)."""
    from deep.stats import mean_se
    mean, se, n = mean_se([0.1, 0.2, 0.6])
    assert (mean, se, n) == (pytest.approx(0.3), pytest.approx(0.152753, abs=1e-6), 3)
    mean, se, n = mean_se([0.4])
    assert (mean, n) == (0.4, 1) and math.isnan(se)
    mean, se, n = mean_se(iter([]))
    assert n == 0 and math.isnan(mean) and math.isnan(se)


def test_t_interval_takes_the_level_it_is_given():
    """Guards `level` reaching the quantile: a 90 % interval over 5 seeds uses t(0.95, 4)
    = 2.1318 and a 99 % one t(0.995, 4) = 4.6041 (any t table), not 95 %'s 2.7764."""
    _, half90, _ = t_interval((0.02, 0.01, 5), level=0.90)
    _, half99, _ = t_interval((0.02, 0.01, 5), level=0.99)
    assert (half90, half99) == (pytest.approx(0.021318, abs=1e-6),
                                pytest.approx(0.046041, abs=1e-6))


def test_a_cell_without_values_prints_a_dash_and_one_seed_its_mean_alone():
    """Guards the n = 0 and one-seed branches of the two formats: no values print "-"
    (not "+nan"), one seed its mean alone (no "± nan" nor "[nan, nan]")."""
    from deep.stats import NO_STAT, format_interval, format_stat
    assert format_interval(NO_STAT) == "-" and format_stat(NO_STAT) == "-"
    assert format_interval((0.123, math.nan, 1)) == "+12.3"
    assert format_stat((0.123, math.nan, 1)) == "12.3"
    assert format_stat((0.123, math.nan, 1), signed=True) == "+12.3"
    assert format_stat((0.123, 0.004, 3)) == "12.3 ± 0.4"


def test_above_zero_takes_the_level_it_is_given():
    """Guards `level` reaching above_zero's interval: mean 0.02, se 0.01 over 5 seeds lies
    above 0 at 80 % (t(0.90, 4) = 1.5332, lower end 0.0047) but not at 95 % (t(0.975, 4)
    = 2.7764, lower end -0.0078; any t table)."""
    from deep.stats import above_zero
    assert above_zero((0.02, 0.01, 5), level=0.80)
    assert not above_zero((0.02, 0.01, 5), level=0.95)


def test_lower_bound_is_minus_infinity_without_an_interval():
    """Guards lower_bound's no-interval value: with one seed (half-width nan) the lower end
    is -inf, below every number, so no ranking by it puts a single-seed cell above a
    measured one (0 would rank it above every negative lower end)."""
    from deep.stats import lower_bound
    assert lower_bound((0.5, math.nan, 1)) == -math.inf
    assert lower_bound((0.5, 0.25, 3)) == 0.25


def test_learning_curves_leave_out_an_epoch_without_a_validation_accuracy():
    """Guards the skip of val_acc None (an epoch that recorded no validation accuracy): two
    runs, the second without a value at epoch 2, give epoch 2 the first run's 0.4 over 1
    run, and epochs 1 and 3 the means (0.2 + 0.4) / 2 and (0.6 + 0.8) / 2 over 2."""
    curves = (CurvesFileRows(row(seed=0, history=[0.2, 0.4, 0.6]))
              + CurvesFileRows(row(seed=1, history=[0.4, None, 0.8])))
    selected = [row(seed=0), row(seed=1)]
    got = learning_curves(curves, selected, panel_of=lambda r: "panel")["panel"]["first"]
    assert [(e, n) for e, _, n in got] == [(1, 2), (2, 1), (3, 2)]
    assert [m for _, m, _ in got] == pytest.approx([0.3, 0.4, 0.7])


def test_a_curves_line_with_a_field_too_few_or_too_many_is_an_error_naming_it(tmp_path):
    """Guards the field count check: zip would silently drop a missing train_loss or an
    extra field; each is a ResultsError naming the line and the count expected."""
    path = tmp_path / "curves.csv"
    CurvesFile(path).record(row(history=[0.5, 0.6]))
    lines = path.read_text().splitlines()
    for broken, count in ((lines[2].rsplit(",", 1)[0], len(CURVE_COLUMNS) - 1),
                          (lines[2] + ",1.0", len(CURVE_COLUMNS) + 1)):
        path.write_text("\n".join([*lines[:2], broken]) + "\n")
        with pytest.raises(ResultsError, match=rf"line 3: {count} fields, expected "
                                               rf"{len(CURVE_COLUMNS)}"):
            read_curves(path)


def test_inside_grid_pools_the_lr_grid_over_every_seed():
    """Guards "over all seeds": seed 0 searched {0.01, 0.001}, seed 1 also 0.1 (an
    extension it ran); 0.01 chosen on seed 1 lies strictly inside the pooled grid
    {0.1, 0.01, 0.001}, though it is the top of seed 0's own."""
    rows = [row(lr=lr, seed=0) for lr in (0.01, 0.001)] + [row(lr=lr, seed=1) for lr in (0.1, 0.01, 0.001)]
    out = inside_grid(rows, [row(lr=0.01, seed=1)])
    assert out == {("b", "first"): {"cells": 1, "epoch_inside": 1.0, "lr_inside": 1.0}}


def test_an_empty_curves_file_reads_as_no_rows(tmp_path):
    """Guards the empty-file case of read_curves: a curves file with no text (or only a
    blank line, e.g. created before its first record) has no rows, and a CurvesFile
    opened on it records as on a new one; it is no header error."""
    path = tmp_path / "curves.csv"
    for text in ("", "\n"):
        path.write_text(text)
        assert read_curves(path) == []
    CurvesFile(path).record(row(history=[0.5]))
    assert [(c["epoch"], c["val_acc"]) for c in read_curves(path)] == [(1, 0.5)]
