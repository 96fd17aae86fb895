"""`deep.report` on hand-made results files: one metric per table, tables and plots that
say what they cannot show (no `all`, only `all`, one seed, no validation metric)."""

from __future__ import annotations

import math

import matplotlib
import pytest

from deep.errors import ConfigError, ResultsError
from deep.report import bar_panel, write_report
from deep.results import results_text
from tests.deep.fixtures.rows import result_row

matplotlib.use("Agg")


def row(benchmark="synthetic", shift="noise", method="all", seed=0, lr=0.01, test=0.5,
        worst=0.25, select="val_acc", val=0.5):
    return result_row(benchmark=benchmark, shift=shift, method=method, seed=seed, lr=lr,
                      val_acc=val, val_worst_group_acc=val, test_acc=test, worst_group_acc=worst,
                      select=select)


def report_of(tmp_path, rows):
    csv = tmp_path / "r.csv"
    csv.write_text(results_text(rows))
    paths = write_report(csv, tmp_path / "rep")
    return (tmp_path / "rep" / "report.md").read_text(), paths


def test_each_table_reports_the_metric_its_rows_were_selected_by(tmp_path):
    """A worst-group sweep beside an average-accuracy one: each table its own metric."""
    rows = [row(method=m, seed=s, test=0.8 + 0.01 * s, worst=0.1 * (m == "all"))
            for m in ("all", "last") for s in (0, 1)]
    rows += [row(benchmark="waterbirds", method=m, seed=s, test=0.9, worst=0.3 + 0.1 * (m == "last"),
                 select="worst_group_val_acc") for m in ("all", "last") for s in (0, 1)]
    text, _ = report_of(tmp_path, rows)
    assert "### synthetic, n_target = 100: test accuracy (%)" in text
    assert "### waterbirds, n_target = 100: worst-group test accuracy (%)" in text
    waterbirds = text[text.index("### waterbirds, n_target = 100: worst-group test accuracy (%)"):]
    assert "| noise | 40.0 ± 0.0 | 30.0 ± 0.0 |" in waterbirds     # last, all


def test_only_all_gives_no_empty_relative_table_and_no_plot(tmp_path):
    text, paths = report_of(tmp_path, [row(seed=s) for s in (0, 1)])
    assert "relative to `all` (points)" not in text and "| shift |  |" not in text
    assert "No plot" in text and len(paths) == 1


def test_a_report_without_all_removes_an_older_plot(tmp_path):
    _, paths = report_of(tmp_path, [row(method=m, seed=s) for m in ("all", "last") for s in (0, 1)])
    assert (tmp_path / "rep" / "relative_accuracy.png") in paths
    text, paths = report_of(tmp_path, [row(method="last", seed=s) for s in (0, 1)])
    assert not (tmp_path / "rep" / "relative_accuracy.png").exists()
    assert not (tmp_path / "rep" / "relative_accuracy.pdf").exists() and "No plot" in text


def test_no_validation_metric_is_said_not_left_blank(tmp_path):
    text, _ = report_of(tmp_path, [row(val=None, seed=s) for s in (0, 1)])
    assert "No cell has a validation metric" in text


def test_one_seed_draws_no_error_bar(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer
    fig, ax = plt.subplots()
    bar_panel(ax, {"first": (0.01, math.nan, 1), "last": (0.02, math.nan, 1)}, "one seed")
    assert not any(isinstance(c, ErrorbarContainer) for c in ax.containers)
    bar_panel(ax, {"first": (0.01, 0.005, 3), "last": (0.02, math.nan, 1)}, "mixed")
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and len(bars[0].lines[2][0].get_segments()) == 1   # first only
    plt.close(fig)


def test_a_binary_file_is_not_read_as_results(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\x80\x02\xff\xfe")
    with pytest.raises(ResultsError, match="model.pt is not a text file"):
        write_report(tmp_path / "model.pt", tmp_path / "rep")


def test_a_file_with_a_cell_twice_is_refused_as_a_sweep_refuses_it(tmp_path):
    """The report took the first copy silently; `sweep` refuses the same file."""
    with pytest.raises(ResultsError, match="holds duplicated cells"):
        report_of(tmp_path, [row(), row(method="first"), row(test=0.7)])
    assert not (tmp_path / "rep").exists()


def test_an_adapt_file_with_a_stream_twice_is_refused_too(tmp_path):
    from deep.adapt.results import COLUMNS
    line = ("fmnist-c,fog,memo,none,0,false,200,0.005,0.5,0,10,1.0,resnet26,w.pt,90,{},,")
    (tmp_path / "a.csv").write_text(",".join(COLUMNS) + "\n" + line + "\n" + line + "\n")
    with pytest.raises(ResultsError, match="duplicated streams"):
        write_report(tmp_path / "a.csv", tmp_path / "rep")


def test_paired_difference_is_method_minus_all_per_seed_with_a_t_interval():
    """Guards the sign of the relative table: metric(method) - metric(all), paired by seed
    (fractions; the table prints points), its interval from the per-seed differences."""
    import numpy as np
    from scipy import stats
    from deep.report import metric_values, paired_difference
    from deep.stats import t_interval
    rows = [row(method="last", seed=0, test=0.8), row(method="last", seed=1, test=0.85),
            row(method="all", seed=0, test=0.7), row(method="all", seed=1, test=0.7)]
    stat = paired_difference(metric_values(rows, "test_acc"), ["noise"], [0, 1], "last")
    diffs = np.array([0.1, 0.15])
    se = diffs.std(ddof=1) / math.sqrt(2)
    assert stat == (pytest.approx(0.125), pytest.approx(se), 2)
    mean, half, n = t_interval(stat)
    assert (mean - half, mean + half) == (
        pytest.approx(0.125 - stats.t.ppf(0.975, 1) * se),
        pytest.approx(0.125 + stats.t.ppf(0.975, 1) * se))


def test_paired_difference_takes_the_spread_of_the_per_seed_differences():
    """Seeds that move both methods alike (0.8/0.7, 0.9/0.8, 0.6/0.5): every per-seed
    difference is 0.1, so the paired s.e. is 0. An unpaired comparison (mean of one minus
    mean of the other, their s.e. combined) would give s.e. 0.1 / sqrt(3) * sqrt(2)."""
    from deep.report import metric_values, paired_difference
    rows = [row(method=m, seed=s, test=t) for s, (a, b) in enumerate([(0.8, 0.7), (0.9, 0.8),
                                                                      (0.6, 0.5)])
            for m, t in (("last", a), ("all", b))]
    mean, se, n = paired_difference(metric_values(rows, "test_acc"), ["noise"], [0, 1, 2], "last")
    assert (mean, n) == (pytest.approx(0.1), 3)
    assert se == pytest.approx(0, abs=1e-12)


def test_the_report_prints_each_difference_to_all_with_its_interval(tmp_path):
    """last - all per seed: 10, 15, 20 points; mean 15, s.e. 5/sqrt(3), t(2, 0.975) = 4.303:
    [+2.6, +27.4]. One seed: the interval table is left out (there is no interval)."""
    rows = [row(method=m, seed=s, test=t) for s, (a, b) in enumerate([(0.8, 0.7), (0.85, 0.7), (0.9, 0.7)])
            for m, t in (("last", a), ("all", b))]
    text, _ = report_of(tmp_path, rows)
    lines = text.splitlines()
    start = lines.index("95 % t intervals of the same differences (paired by seed):")
    assert lines[start + 2:start + 5] == ["| shift | last |", "|---|---|", "| noise | +15.0 [+2.6, +27.4] |"]
    text, _ = report_of(tmp_path, [r for r in rows if r["seed"] == 0])
    assert "95 % t intervals" not in text


def test_the_mean_row_averages_only_the_seeds_that_have_every_shift():
    """The shift "mean" compares methods over the same seeds in the absolute and the
    relative table: `last` seed 1 lacks shift b, so both average seed 0 alone, where
    last's mean over shifts a (0.6) and b (0.8) is 0.7. Averaging seed 1's lone shift a
    (0.2) in as well would give 0.45 over 2 seeds in the absolute table only."""
    from deep.report import summarize
    rows = [row(method="all", shift=s, seed=d) for s in "ab" for d in (0, 1)] + \
           [row(method="last", shift="a", seed=0, test=0.6),
            row(method="last", shift="b", seed=0, test=0.8),
            row(method="last", shift="a", seed=1, test=0.2)]          # seed 1 lacks b
    table = summarize(rows)[("synthetic", 100)]
    mean, _, n = table["abs"][("mean", "last")]
    assert (mean, n) == (pytest.approx(0.7, abs=1e-12), 1)
    assert table["rel"][("mean", "last")][2] == n


def test_rows_of_two_protocols_for_one_benchmark_are_refused_not_mixed(tmp_path):
    """A merged file (4-epoch rows at 1e-3 beside 2-epoch rows at 1e-2, say) drew one table
    whose learning rates were chosen across both protocols' validation numbers; a sweep
    refuses to write such a file, so the report refuses to read one. Another benchmark's
    settings, and a legacy row's unknown patience, are no clash."""
    rows = [row(method=m, seed=s) for m in ("all", "last") for s in (0, 1)]
    other = [{**row(method="last", seed=s, lr=1e-3, val=0.9), "epochs": 4} for s in (0, 1)]
    with pytest.raises(ResultsError, match=r"r.csv mixes synthetic rows of two protocols: .* "
                                           r"differ in epochs: first 2 vs second 4; "):
        report_of(tmp_path, rows + other)
    assert not (tmp_path / "rep").exists()
    fine = [{**row(benchmark="waterbirds", seed=s), "epochs": 4} for s in (0, 1)]
    fine += [{**row(method="last", seed=s), "patience": 3} for s in (0, 1)]
    text, _ = report_of(tmp_path, rows[:2] + fine)
    assert "### waterbirds, n_target = 100" in text and "| noise | +0.0 ± 0.0 |" in text
    with pytest.raises(ResultsError, match="patience: first 3 vs second 5"):
        report_of(tmp_path, fine + [{**row(lr=1e-3), "patience": 5}])


def test_rows_of_two_protocols_on_two_shifts_of_one_benchmark_are_refused(tmp_path):
    """Guards the protocol check being per benchmark, not per (benchmark, shift): a file
    whose noise rows ran 2 epochs and blur rows 4 mixes two protocols in one table (its
    shift "mean" averages them) and is refused like a clash within one shift."""
    rows = [row(method=m, seed=s) for m in ("all", "last") for s in (0, 1)]
    blur = [{**row(shift="blur", method=m, seed=s), "epochs": 4} for m in ("all", "last")
            for s in (0, 1)]
    with pytest.raises(ResultsError, match=r"r.csv mixes synthetic rows of two protocols: .* "
                                           r"differ in epochs: first 2 vs second 4; "):
        report_of(tmp_path, rows + blur)
    assert not (tmp_path / "rep").exists()


def test_a_legacy_first_row_does_not_hide_a_clash_between_the_rows_after_it(tmp_path):
    """Guards check_one_protocol learning a provenance value the first row left unknown:
    after a legacy row (patience empty), rows with patience 3 and 5 are two protocols;
    compared with the legacy row alone, neither clashes and the mix passes."""
    legacy = row(method="all", seed=0)
    assert legacy["patience"] is None
    later = [{**row(method="last", seed=0), "patience": 3}, {**row(method="last", seed=1), "patience": 5}]
    with pytest.raises(ResultsError, match="patience: first 3 vs second 5"):
        report_of(tmp_path, [legacy, *later])


def two_stage_rows():
    """Seed 0 searched 0.1 and 0.01, chose the edge 0.01, then the extension 0.001, which it
    chose (validation 0.8). Seed 1 ran at 0.01 before the extension superseded it, where
    its validation happens to be higher, and at 0.001."""
    return [row(seed=0, lr=0.1, val=0.5, test=0.5), row(seed=0, lr=0.01, val=0.6, test=0.6),
            row(seed=0, lr=0.001, val=0.8, test=0.7),
            row(seed=1, lr=0.01, val=0.9, test=0.9), row(seed=1, lr=0.001, val=0.5, test=0.5)]


def test_lr_seeds_read_a_two_stage_file_at_the_first_stages_choice(tmp_path):
    """Seed by seed, seed 1 takes its superseded 0.01 row: tests 70, 90 -> 80.0 ± 10.0. With
    `lr_seeds=[0]` it counts only at seed 0's choice 0.001: 70, 50 -> 60.0 ± 10.0, as the
    suite's own table (`two_stage.drop_superseded`) counts it."""
    csv = tmp_path / "r.csv"
    csv.write_text(results_text(two_stage_rows()))
    own = (tmp_path / "own" / "report.md", write_report(csv, tmp_path / "own"))[0].read_text()
    assert "| noise | 80.0 ± 10.0 |" in own
    assert "- synthetic / noise / all (n=100): seed 0: 3; seed 1: 2" in own
    write_report(csv, tmp_path / "two", lr_seeds=[0])
    two = (tmp_path / "two" / "report.md").read_text()
    assert "| noise | 60.0 ± 10.0 |" in two
    assert "Learning rates chosen on seed 0 (--lr-seeds)" in two
    with pytest.raises(ConfigError, match="--lr-seeds 3: no row of .* its seeds are 0,1"):
        write_report(csv, tmp_path / "bad", lr_seeds=[0, 3])


def test_seeds_that_ran_different_lrs_are_named_with_the_flag_that_reads_them(tmp_path):
    """A later seed that ran one lr (a two-stage run), or as many lrs as seed 0 but other ones
    (s8): the report says how many lrs each seed ran, for at most three groups, and counts
    the rest."""
    rows = [row(shift=f"s{k}", seed=0, lr=lr, val=0.5 + lr) for k in range(5) for lr in (0.1, 0.01)]
    rows += [row(shift=f"s{k}", seed=s, lr=0.01) for k in range(5) for s in (1, 2)]
    rows += [row(shift="s9", seed=s, lr=lr) for s in (0, 1) for lr in (0.1, 0.01)]
    rows += [row(shift="s8", seed=s, lr=lr / 10 ** s) for s in (0, 1) for lr in (0.1, 0.01)]
    text, _ = report_of(tmp_path, rows)
    assert "In 6 of 7 (benchmark, shift, method) groups the seeds ran different" in text
    assert "- synthetic / s0 / all (n=100): seed 0: 2; seeds 1,2: 1" in text
    assert "- synthetic / s2 / all (n=100)" in text and "s3 / all" not in text
    assert "- ... and 3 more" in text and "s9 / all" not in text
    text, _ = report_of(tmp_path, [r for r in rows if r["shift"] == "s8"])
    assert "- synthetic / s8 / all (n=100): seeds 0,1: 2" in text
    text, _ = report_of(tmp_path, [r for r in rows if r["shift"] == "s9"])
    assert "different learning rates" not in text


def test_the_report_command_passes_lr_seeds_on(tmp_path, capsys):
    from deep.__main__ import main
    csv = tmp_path / "r.csv"
    csv.write_text(results_text(two_stage_rows()))
    assert main(["report", str(csv), "--out", str(tmp_path / "rep"), "--lr-seeds", "0"]) == 0
    assert "| noise | 60.0 ± 10.0 |" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("flag", ["", " ", ",", " , ,"])
def test_an_empty_lr_seeds_is_refused_not_reported_as_a_choice_on_no_seed(tmp_path, capsys, flag):
    """`--lr-seeds ""` parsed to no seed and the report said "chosen on seed  (--lr-seeds)"
    over a table where each seed chose its own lr."""
    from deep.__main__ import main
    csv = tmp_path / "r.csv"
    csv.write_text(results_text(two_stage_rows()))
    assert main(["report", str(csv), "--out", str(tmp_path / "rep"), "--lr-seeds", flag]) != 0
    assert "--lr-seeds is empty: expected" in capsys.readouterr().err
    assert not (tmp_path / "rep" / "report.md").exists()
    with pytest.raises(ConfigError, match="--lr-seeds is empty: expected .* seeds"):
        write_report(csv, tmp_path / "lib", lr_seeds=[])


def test_the_bar_panel_draws_points_with_single_blocks_blue_and_the_error_bar_at_one_se():
    """0.01 ± 0.005 is a bar of 1.0 point with a bar from 0.5 to 1.5; `first` is a single
    block (blue), `surgical` is not (grey)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.container import ErrorbarContainer
    fig, ax = plt.subplots()
    bar_panel(ax, {"first": (0.01, 0.005, 3), "all-but-first": (-0.02, 0.01, 3)}, "t")
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([1.0, -2.0])
    assert [p.get_facecolor() for p in ax.patches] == [to_rgba("tab:blue"), to_rgba("tab:gray")]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    spans = sorted((min(s[:, 1]), max(s[:, 1])) for s in bars.lines[2][0].get_segments())
    assert spans == [pytest.approx((-3.0, -1.0)), pytest.approx((0.5, 1.5))]
    plt.close(fig)


def _relative_figure(monkeypatch, tables, tmp_path):
    """The figure `plot_relative` draws for `tables`, kept instead of saved."""
    import deep.report as report
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, stem: figures.append(fig) or [])
    report.plot_relative(tables, tmp_path / "rel")
    (fig,) = figures
    return fig


def _suptitle_of(monkeypatch, tables, tmp_path):
    return _relative_figure(monkeypatch, tables, tmp_path)._suptitle.get_text()


def test_the_relative_plot_says_when_a_bar_has_no_error_bar(tmp_path, monkeypatch):
    from deep.report import summarize
    two = [row(method=m, seed=s, test=0.5 + 0.01 * s * (m == "last"))
           for m in ("all", "last") for s in (0, 1)]
    assert "(no error bar: one seed)" not in _suptitle_of(monkeypatch, summarize(two), tmp_path)
    one = [r for r in two if r["seed"] == 0]
    assert "\n(no error bar: one seed)" in _suptitle_of(monkeypatch, summarize(one), tmp_path)


def test_a_results_file_with_only_its_header_is_refused_not_reported_empty(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text(results_text([row()]).splitlines()[0] + "\n")
    with pytest.raises(ResultsError, match="holds no results yet: `python -m deep sweep"):
        write_report(csv, tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_the_cell_count_counts_every_diverged_row_not_only_the_chosen_ones(tmp_path):
    """Five cells; the diverged 0.1 rows (one per seed) lose to 0.01, a third diverged row
    has no epoch at all: 3 diverged of 5."""
    rows = [dict(row(seed=s, lr=0.1, val=0.2), status="diverged") for s in (0, 1)]
    rows += [row(seed=s, lr=0.01, val=0.6) for s in (0, 1)]
    rows += [dict(row(seed=0, lr=1.0, val=None, test=None), status="diverged", best_epoch=0)]
    text, _ = report_of(tmp_path, rows)
    assert "\n5 cells, 3 diverged.\n" in text


def test_a_fourth_group_of_unequal_searches_is_counted_as_one_more(tmp_path):
    rows = [row(shift=f"s{k}", seed=0, lr=lr) for k in range(4) for lr in (0.1, 0.01)]
    rows += [row(shift=f"s{k}", seed=1, lr=0.01) for k in range(4)]
    text, _ = report_of(tmp_path, rows)
    assert "In 4 of 4 (benchmark, shift, method) groups" in text
    assert "s2 / all" in text and "s3 / all" not in text and "\n- ... and 1 more\n" in text


def test_without_an_out_folder_the_report_goes_beside_the_csv_named_after_its_stem(tmp_path):
    csv = tmp_path / "run.v2.csv"
    csv.write_text(results_text([row(seed=s) for s in (0, 1)]))
    paths = write_report(csv)
    assert paths == [tmp_path / "run.v2_report" / "report.md"] and paths[0].is_file()


def test_each_shift_is_compared_with_all_on_that_shift_alone():
    """last - all: +10 points on fog, -20 on snow for both seeds; the mean is -5."""
    from deep.report import summarize
    rows = [row(shift=sh, method=m, seed=s, test=0.5 + d * (m == "last"))
            for sh, d in (("fog", 0.1), ("snow", -0.2)) for m in ("all", "last") for s in (0, 1)]
    rel = summarize(rows)[("synthetic", 100)]["rel"]
    assert rel[("fog", "last")][0] == pytest.approx(0.1)
    assert rel[("snow", "last")][0] == pytest.approx(-0.2)
    assert rel[("mean", "last")][0] == pytest.approx(-0.05)


def test_metric_values_keep_only_the_rows_that_have_that_metric():
    from deep.report import metric_values
    rows = [row(seed=0, worst=0.3), row(seed=1, worst=None), row(method="last", seed=0, worst=0.0)]
    assert metric_values(rows, "worst_group_acc") == {("noise", "all", 0): 0.3,
                                                      ("noise", "last", 0): 0.0}


def test_the_lr_seeds_note_names_every_first_stage_seed(tmp_path):
    csv = tmp_path / "r.csv"
    rows = two_stage_rows() + [row(seed=2, lr=lr, val=0.8 - lr, test=0.6) for lr in (0.1, 0.01, 0.001)]
    csv.write_text(results_text(rows))
    write_report(csv, tmp_path / "rep", lr_seeds=[0, 2])
    assert ("Learning rates chosen on seeds 0,2 (--lr-seeds)"
            in (tmp_path / "rep" / "report.md").read_text())


def test_panels_name_their_n_target_when_the_report_has_several(tmp_path, monkeypatch):
    from deep.report import summarize

    def titles(rows):
        fig = _relative_figure(monkeypatch, summarize(rows), tmp_path)
        return [ax.get_title() for ax in fig.axes if ax.get_title()]
    rows = [row(method=m, seed=s) for m in ("all", "last") for s in (0, 1)]
    assert titles(rows) == ["synthetic / noise"]
    assert titles(rows + [dict(r, n_target=10) for r in rows]) == [
        "synthetic / noise (n=10)", "synthetic / noise (n=100)"]
