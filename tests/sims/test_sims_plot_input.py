"""`python -m sims plot` and `figures` on bad input: a clear error (exit 2) naming the file
and what is wrong, never a figure drawn from a broken table, never a traceback; and, from well-formed tables, what each figure draws.

The tables are small hand-made ones in the format the experiments write (their columns,
written by `write_csv`), so nothing is simulated."""
import itertools

import numpy as np
import pandas as pd
import pytest

from sims import experiments
from sims.__main__ import main
from sims.figures import TABLES, read_table, write_csv
from sims.plots import FIGURES

STEPS = (0, 1, 2, 4)


def f1_table():
    """F1's table as `t1_curves` writes it, on a 4-step grid."""
    rows = [dict(activation=a, method=m, lr_halved=0, step=s, mean=0.5 / (s + 1), se=0.01,
                 log10_mean=-0.3 - s, log10_se=0.02, fraction_zero=0.0, draws=2)
            for a, m, s in itertools.product(experiments.ACTIVATIONS, experiments.METHODS,
                                             STEPS)]
    return pd.DataFrame(rows)


def f2_table():
    """F2's table as `shifts` writes it."""
    rows = [dict(activation=a, kind=k, method=m, n=n, mean=1.0 / n, se=0.1 / n, draws=2,
                 train_mean=1e-30, lr_halved=0)
            for a, k, m, n in itertools.product(experiments.ACTIVATIONS, experiments.SHIFTS,
                                                experiments.METHODS, experiments.N_GRID)]
    return pd.DataFrame(rows)


def f4_table():
    """F4's table as `t1_event` writes it."""
    n = list(experiments.N_EVENT)
    return pd.DataFrame(dict(n=n, exact=[0.5] * len(n), event_frequency=0.5, frequency=0.5,
                             se=0.35, draws=2, first_zero=0.5, full_positive=1.0,
                             full_unconverged=0.0, lr_halved=0))


def lines_of(table, tmp_path):
    """The CSV lines `write_csv` writes for `table` (header first)."""
    write_csv(table, tmp_path / "made.csv")
    return (tmp_path / "made.csv").read_text().splitlines(keepends=True)


def plot(tmp_path, name, lines, capsys):
    """Write `lines` as the CSV of figure `name`, run `sims plot --only name`; return the
    exit status and stderr."""
    (tmp_path / f"{name}.csv").write_text("".join(lines))
    status = main(["plot", "--only", name.split("_")[0], "--out", str(tmp_path)])
    return status, capsys.readouterr().err


def test_every_figure_table_has_a_check():
    assert set(TABLES) == {table for tables in FIGURES.values() for table in tables}


def test_well_formed_tables_are_read_back_as_numbers(tmp_path, capsys):
    for name, table in (("f1_t1_curves", f1_table()), ("f2_loss_vs_n", f2_table())):
        write_csv(table, tmp_path / f"{name}.csv")
        back = read_table(tmp_path / f"{name}.csv", name)
        assert len(back) == len(table) and back["mean"].dtype == "float64", name
    # A blank line holds no data: accepted, and it does not shift the lines named below.
    lines = lines_of(f4_table(), tmp_path)
    status, err = plot(tmp_path, "f4_t1_event", lines[:3] + ["\n"] + lines[3:], capsys)
    assert status == 0 and "error" not in err, err
    assert (tmp_path / "f4_t1_event.png").exists()


def _replace(line, column, value, header):
    cells = line.rstrip("\n").split(",")
    cells[header.rstrip("\n").split(",").index(column)] = value
    return ",".join(cells) + "\n"


F2_BROKEN = {
    # what is done to F2's CSV lines -> what the error must say
    "a garbage row": (lambda lines: lines[:4] + ["garbage,row\n"] + lines[4:],
                      ["line 5, column 'n': an empty cell is not a finite number"]),
    "abc in mean": (lambda lines: lines[:6] + [_replace(lines[6], "mean", "abc", lines[0])]
                    + lines[7:], ["line 7, column 'mean': 'abc' is not a finite number"]),
    "inf in se": (lambda lines: lines[:-1] + [_replace(lines[-1], "se", "inf", lines[0])],
                  [f"line {len(f2_table()) + 1}, column 'se': 'inf' is not a finite number"]),
    "a deleted group": (lambda lines: [line for line in lines
                                       if not line.startswith("relu,label,first,")],
                        ["no rows for activation = 'relu', kind = 'label', "
                         "method = 'first', n = 2 (and 4 more groups)"]),
    "a deleted row": (lambda lines: lines[:9] + lines[10:],
                      ["no rows for activation = 'linear', kind = 'input', "
                       "method = 'last', n = 16"]),
    "a repeated row": (lambda lines: lines[:3] + lines[2:],
                       ["line 4 repeats the activation, kind, method, n of an earlier line"]),
    "an unknown method": (lambda lines: lines[:2] + [lines[2].replace(",first,", ",best,")]
                          + lines[3:], ["line 3, column 'method': 'best' is not one of "
                                        "['first', 'last', 'all', 'lp-ft']"]),
    "a foreign CSV": (lambda lines: ["a,b\n", "1,2\n"],
                      ["missing column(s) ['activation', 'kind', 'method', 'n', 'mean', 'se', "
                       "'draws']", "this one has ['a', 'b']"]),
    "an empty file": (lambda lines: [], ["not readable as a CSV table (No columns to parse"]),
    "only the header": (lambda lines: lines[:1], ["no data rows below the header"]),
    "a row with extra cells": (lambda lines: lines[:4] + ["a,b,c,d,e,f,g,h,i,j\n"] + lines[4:],
                               ["Expected 9 fields in line 5, saw 10"]),
}


@pytest.mark.parametrize("broken", list(F2_BROKEN))
def test_plot_refuses_a_broken_table_naming_file_line_and_column(broken, tmp_path, capsys):
    change, expected = F2_BROKEN[broken]
    status, err = plot(tmp_path, "f2_loss_vs_n", change(lines_of(f2_table(), tmp_path)),
                       capsys)
    assert status == 2, broken
    assert f"error: {tmp_path / 'f2_loss_vs_n.csv'}: " in err, err
    for phrase in expected:
        assert phrase in err, (broken, err)
    assert f"python -m sims figures --only f2 --out {tmp_path}" in err
    assert not (tmp_path / "f2_loss_vs_n.png").exists()


def test_plot_refuses_a_curve_with_a_missing_step(tmp_path, capsys):
    lines = lines_of(f1_table(), tmp_path)
    status, err = plot(tmp_path, "f1_t1_curves", lines[:3] + lines[4:], capsys)
    assert status == 2
    assert ("no row for activation = 'linear', method = 'first' at step = 2 (other groups "
            "have rows there)") in err
    foreign = ["a,b\n", "1,2\n"]
    status, err = plot(tmp_path, "f1_t1_curves", foreign, capsys)
    assert status == 2 and "missing column(s) ['activation', 'method', 'step'" in err


def test_out_must_be_a_folder(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a folder")
    fast = ["--draws", "2", "--steps", "2", "--device", "cpu", "--only", "f4"]
    for argv in (["plot", "--out", str(file)], ["figures", *fast, "--out", str(file)]):
        assert main(argv) == 2, argv
        assert (f"error: --out {file} is a file, not a folder; expected a folder (created if "
                "missing)") in capsys.readouterr().err
    assert main(["figures", *fast, "--out", str(file / "sub")]) == 2
    assert f"--out {file / 'sub'}: cannot create that folder (Not a directory)" in \
        capsys.readouterr().err
    assert file.read_text() == "not a folder"


def test_plot_into_a_missing_folder_makes_none_and_names_the_command_for_it(tmp_path, capsys):
    """It made an empty folder, then said to run `python -m sims figures` without --out."""
    missing = tmp_path / "missing"
    assert main(["plot", "--out", str(missing)]) == 2
    assert (f"--out {missing} does not exist, so it holds no CSVs to redraw; run `python -m "
            f"sims figures --out {missing}` first") in capsys.readouterr().err
    assert not missing.exists()


def test_plot_of_a_partial_folder_draws_nothing_and_names_the_only_that_would(tmp_path, capsys):
    write_csv(f4_table(), tmp_path / "f4_t1_event.csv")
    assert main(["plot", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CSV for ['f1_t1_curves', 'f2_loss_vs_n'" in err and "--only f4" in err
    assert not list(tmp_path.glob("*.png"))   # checked before any figure is drawn
    assert main(["plot", "--out", str(tmp_path), "--only", "f4"]) == 0


def _f6_table(agree=True):
    """An F6 table of every column the experiment writes: Auto-RGN points to the first
    layer (rgn 2 against 1) and is right (loss 0.1 against 1)."""
    return pd.DataFrame([dict(activation=a, kind=k, draw=d, n=experiments.N_BEST,
                              rgn_first=2.0, rgn_last=1.0, loss_first=0.1, loss_last=1.0,
                              loss_all=1.0, loss_lp_ft=1.0, rgn_points_to="first",
                              best_layer="first", agree=agree)
                         for a in experiments.ACTIVATIONS for k in experiments.SHIFTS
                         for d in range(2)])


@pytest.mark.parametrize("flag", ["yes", "", "1"])
def test_plot_refuses_an_f6_agree_cell_that_is_not_true_or_false(flag, tmp_path, capsys):
    # guards: the flag check dropped, or an unknown value read as False (a count of
    # agreements that silently drops draws)
    lines = lines_of(_f6_table(), tmp_path)
    lines[2] = _replace(lines[2], "agree", flag, lines[0])
    status, err = plot(tmp_path, "f6_auto_rgn", lines, capsys)
    assert status == 2, err
    shown = "an empty cell" if flag == "" else repr(flag)
    assert f"line 3, column 'agree': {shown} is not True or False" in err, err
    assert not (tmp_path / "f6_auto_rgn.png").exists()


def test_plot_refuses_an_f3_table_without_a_finite_relative_se(tmp_path, capsys):
    # guards: relative_se left out of F3's numbers (a NaN drawn as "±nan" in a cell)
    rows = [dict(activation=a, kind=k, method=m, n=experiments.N_BEST, mean=0.5, se=0.1,
                 relative_to_all=1.0, relative_se=0.01, draws=2)
            for a in experiments.ACTIVATIONS for k in experiments.SHIFTS
            for m in experiments.METHODS]
    lines = lines_of(pd.DataFrame(rows), tmp_path)
    lines[2] = _replace(lines[2], "relative_se", "", lines[0])
    status, err = plot(tmp_path, "f3_best_layer", lines, capsys)
    assert status == 2
    assert "line 3, column 'relative_se': an empty cell is not a finite number" in err, err


def test_one_bad_cell_is_named_without_a_count_of_more(tmp_path, capsys):
    # guards: "(and 0 more lines)" after a single bad cell; two bad cells: "(and 1 more
    # lines)"; one absent group: no "(and ... more groups)"
    lines = lines_of(f2_table(), tmp_path)
    one = lines[:6] + [_replace(lines[6], "mean", "abc", lines[0])] + lines[7:]
    status, err = plot(tmp_path, "f2_loss_vs_n", one, capsys)
    assert status == 2 and "'abc' is not a finite number; to rewrite it" in err, err
    two = one[:7] + [_replace(one[7], "mean", "abc", one[0])] + one[8:]
    status, err = plot(tmp_path, "f2_loss_vs_n", two, capsys)
    assert "'abc' is not a finite number (and 1 more lines); to rewrite" in err, err
    status, err = plot(tmp_path, "f2_loss_vs_n", lines[:9] + lines[10:], capsys)
    assert "method = 'last', n = 16; to rewrite" in err, err
    status, err = plot(tmp_path, "f2_loss_vs_n", [line for line in lines
                                                  if not line.startswith("relu,label,first,")],
                       capsys)
    assert "n = 2 (and 4 more groups); to rewrite" in err, err


def test_a_curve_lacking_many_steps_names_five_then_dots(tmp_path, capsys):
    # guards: the " ..." after the first five missing steps off by one
    steps = tuple(range(8))
    rows = [dict(activation=a, method=m, step=s, log10_mean=-0.3, log10_se=0.02, draws=2)
            for a, m, s in itertools.product(experiments.ACTIVATIONS, experiments.METHODS,
                                             steps)]
    table = pd.DataFrame(rows)
    first = (table.activation == "linear") & (table.method == "first")
    for lacking, expected in ((5, "at step = 1, 2, 3, 4, 5 (other"),
                              (6, "at step = 1, 2, 3, 4, 5 ... (other")):
        keep = ~(first & table.step.between(1, lacking))
        status, err = plot(tmp_path, "f1_t1_curves", lines_of(table[keep], tmp_path), capsys)
        assert status == 2 and expected in err, (lacking, err)


def test_plot_of_a_folder_without_any_csv_suggests_no_only(tmp_path, capsys):
    # guards: the "--only" hint given with nothing to list (", or draw only those there
    # with --only " and no names)
    assert main(["plot", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"run `python -m sims figures --out {tmp_path}`\n" in err, err
    assert "--only" not in err, err


# ---- what the figures show: drawn from hand-made tables, read back from the artists ------

def drawn(name, table):
    """The figure `name` drawn from `table` as `sims plot` draws it (read back from CSV)."""
    import matplotlib.pyplot as plt
    from sims import plots
    figure = plots.draw(name, {name: table})
    axes = figure.axes
    plt.close(figure)
    return axes


def test_f1_marks_lp_fts_switch_half_way_through_its_steps():
    # guards: the switch line at lp-ft's last step. lp-ft takes `steps` probing steps, then
    # `steps` of full fine-tuning: on a 0..40 grid it switches at step 20.
    steps = (0, 1, 10, 20, 30, 40)
    table = pd.DataFrame([dict(activation=a, method=m, step=s, log10_mean=-s / 10,
                               log10_se=0.1, draws=2)
                          for a, m, s in itertools.product(experiments.ACTIVATIONS,
                                                           experiments.METHODS, steps)])
    for ax in drawn("f1_t1_curves", table)[:2]:
        vertical = [line.get_xdata()[0] for line in ax.get_lines()
                    if len(set(line.get_xdata())) == 1]
        assert vertical == [20]


def test_f2_plots_each_panels_mean_final_loss_against_n():
    # guards: another column (train_mean) drawn as the loss
    table = f2_table()
    table["mean"] = [0.5 + 0.01 * i for i in range(len(table))]
    from sims.plots import LABELS
    axes = drawn("f2_loss_vs_n", table)
    panels = {ax.get_title(): ax for ax in axes}
    for (activation, kind, method), rows in table.groupby(["activation", "kind", "method"]):
        ax = panels[f"{kind} · {activation}"]
        bars = [c for c in ax.containers if c.get_label() == LABELS[method]]
        assert len(bars) == 1
        np.testing.assert_array_equal(bars[0].lines[0].get_xdata(), rows.n)
        np.testing.assert_array_equal(bars[0].lines[0].get_ydata(), rows["mean"])


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")
def test_f3_cells_sit_under_their_methods_labels():
    # guards: tick labels in another order than the heatmap's columns. Each cell's colour
    # value is log10(relative_to_all) of the method its column's label names.
    from sims.plots import SHORT_LABELS
    rows = [dict(activation=a, kind=k, method=m, n=experiments.N_BEST,
                 relative_to_all=10.0 ** (i + 0.1 * j), relative_se=0.01)
            for a in experiments.ACTIVATIONS for j, k in enumerate(experiments.SHIFTS)
            for i, m in enumerate(experiments.METHODS)]
    table = pd.DataFrame(rows)
    method_of = {label: m for m, label in SHORT_LABELS.items()}
    for ax, activation in zip(drawn("f3_best_layer", table), experiments.ACTIVATIONS):
        methods = [method_of[t.get_text()] for t in ax.get_xticklabels()]
        kinds = [t.get_text() for t in ax.get_yticklabels()]
        assert sorted(methods) == sorted(experiments.METHODS)
        cells = np.asarray(ax.collections[0].get_array()).reshape(len(kinds), len(methods))
        for r, kind in enumerate(kinds):
            for c, method in enumerate(methods):
                i, j = experiments.METHODS.index(method), list(experiments.SHIFTS).index(kind)
                assert cells[r, c] == pytest.approx(i + 0.1 * j, abs=1e-12), (kind, method)


def test_f4_plots_each_column_under_its_own_label():
    # guards: a column plotted under another's label (the gray event frequency, the blue
    # simulated outcome, the exact black curve)
    n = np.array(experiments.N_EVENT)
    table = f4_table().assign(exact=n / 40, event_frequency=n / 50, frequency=n / 60,
                              first_zero=n / 70)
    ax = drawn("f4_t1_event", table)[0]
    series = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers
              if hasattr(c, "lines")}
    np.testing.assert_array_equal(series["event frequency in the draws"], n / 50)
    np.testing.assert_array_equal(
        series["simulated: first layer ~0 and full fine-tuning > 0"], n / 60)
    exact = [line for line in ax.get_lines() if line.get_label().startswith("P(T1 event)")]
    np.testing.assert_array_equal(exact[0].get_ydata(), n / 40)


def test_f6_scatter_puts_rgn_ratio_on_x_and_loss_gain_on_y():
    # guards: the gain's ratio inverted (y > 0 must mean the first layer is better)
    rng = np.random.default_rng(0)
    rows = [dict(activation=a, kind=k, draw=d, n=experiments.N_BEST,
                 rgn_first=10.0 ** rng.uniform(-2, 2), rgn_last=1.0,
                 loss_first=10.0 ** rng.uniform(-3, 0), loss_last=0.1, agree=True)
            for a in experiments.ACTIVATIONS for k in experiments.SHIFTS for d in range(3)]
    table = pd.DataFrame(rows)
    axes = drawn("f6_auto_rgn", table)
    for ax, activation in zip(axes, experiments.ACTIVATIONS):
        part = table[table.activation == activation]
        points = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections
                                 if len(c.get_offsets()) == len(part)])
        expected = np.c_[np.log10(part.rgn_first), -1 - np.log10(part.loss_first)]
        np.testing.assert_allclose(np.sort(points, axis=0), np.sort(expected, axis=0),
                                   rtol=1e-12)


def _band_of(ax, label):
    """(x, y) of the line labelled `label`, and the low and high edges of the band
    (fill_between) drawn in its colour right after it."""
    import matplotlib.colors as mcolors
    line = next(line for line in ax.get_lines() if line.get_label() == label)
    colour = mcolors.to_rgb(line.get_color())
    fill = next(c for c in ax.collections
                if np.allclose(c.get_facecolor()[0][:3], colour))
    vertices = fill.get_paths()[0].vertices
    n = len(line.get_xdata())
    # fill_between's path: (x0, low0) .. (xn, lown), then the high edge backwards.
    low, high = vertices[1:n + 1, 1], vertices[n + 2:2 * n + 2, 1][::-1]
    return line.get_xdata(), line.get_ydata(), low, high


def test_f1_curves_are_geometric_means_with_a_band_of_one_se_of_log10():
    # guards: the arithmetic `mean` column drawn, or the band's width off. Steps > 0 only
    # (a log axis); every curve 10^log10_mean, its band 10^(log10_mean -+ log10_se).
    from sims.plots import LABELS
    steps = np.array([0, 1, 10, 20])
    table = pd.DataFrame([dict(activation=a, method=m, step=s, mean=7.0, log10_mean=-s / 10 - i,
                               log10_se=0.1 + 0.05 * i, draws=2)
                          for a in experiments.ACTIVATIONS
                          for i, m in enumerate(experiments.METHODS) for s in steps])
    for ax in drawn("f1_t1_curves", table)[:2]:
        for i, method in enumerate(experiments.METHODS):
            x, y, low, high = _band_of(ax, LABELS[method])
            center = -steps[1:] / 10 - i
            np.testing.assert_array_equal(x, steps[1:])
            np.testing.assert_allclose(y, 10 ** center, rtol=1e-12)
            np.testing.assert_allclose(low, 10 ** (center - 0.1 - 0.05 * i), rtol=1e-12)
            np.testing.assert_allclose(high, 10 ** (center + 0.1 + 0.05 * i), rtol=1e-12)


def f5_table(steps) -> pd.DataFrame:
    """An F5 table: every method and quantity at `steps`, mean 0.3 + step, se 0.05,
    log10_mean -step, log10_se 0.2."""
    return pd.DataFrame([dict(method=m, quantity=q, step=s, mean=0.3 + s, se=0.05,
                              log10_mean=-float(s), log10_se=0.2, draws=2)
                         for m in experiments.FORGETTING_METHODS
                         for q in experiments.FORGETTING_QUANTITIES for s in steps])


def test_f5_head_drift_is_drawn_as_mean_and_se_the_errors_as_geometric_means():
    # guards: the head drift drawn on log10 (its fraction of zero draws is 1 for "first")
    # or the errors as arithmetic means. Values: mean 0.3 + step, se 0.05; log10_mean -step.
    from sims.plots import LABELS
    steps = np.array([0, 1, 2, 4])
    axes = {ax.get_title(): ax for ax in drawn("f5_forgetting", f5_table(steps))}
    for quantity in experiments.FORGETTING_QUANTITIES:
        x, y, low, high = _band_of(axes[quantity], LABELS["all"])
        np.testing.assert_array_equal(x, steps[1:])
        if quantity.startswith("head drift"):
            expected = (0.3 + steps[1:], 0.25 + steps[1:], 0.35 + steps[1:])
        else:
            expected = (10.0 ** -steps[1:], 10.0 ** (-steps[1:] - 0.2),
                        10.0 ** (-steps[1:] + 0.2))
        for got, want in zip((y, low, high), expected):
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=quantity)


def _error_bars(container):
    """The (low, high) ends of an errorbar container's vertical bars."""
    segments = container.lines[2][0].get_segments()
    return np.array([s[0][1] for s in segments]), np.array([s[1][1] for s in segments])


def test_f4_event_frequency_bars_are_one_binomial_se_over_the_draws():
    # guards: sqrt(f (1 - f)) without / draws. f = n / 50 with 8 draws.
    n = np.array(experiments.N_EVENT)
    table = f4_table().assign(event_frequency=n / 50, draws=8)
    ax = drawn("f4_t1_event", table)[0]
    bars = next(c for c in ax.containers if c.get_label() == "event frequency in the draws")
    low, high = _error_bars(bars)
    se = np.sqrt(n / 50 * (1 - n / 50) / 8)
    np.testing.assert_allclose(low, n / 50 - se, rtol=1e-12)
    np.testing.assert_allclose(high, n / 50 + se, rtol=1e-12)


def test_f2_lower_error_bars_stop_at_a_thousandth_of_the_mean():
    # guards: mean - se drawn as it is (<= 0 on a log axis when se >= mean). Means 1/n,
    # se 2/n for "first" (clipped to mean / 1000), 0.1/n for the others (not clipped).
    # One panel (label shift, relu) is enough, and draws in a quarter of the time.
    from sims.plots import LABELS
    table = f2_table()
    table = table[(table.kind == "label") & (table.activation == "relu")]
    table["se"] = np.where(table.method == "first", 2.0, 0.1) / table.n
    axes = {ax.get_title(): ax for ax in drawn("f2_loss_vs_n", table)}
    n = np.array(experiments.N_GRID)
    for method in experiments.METHODS:
        bars = next(c for c in axes["label · relu"].containers
                    if c.get_label() == LABELS[method])
        low, high = _error_bars(bars)
        se = (2.0 if method == "first" else 0.1) / n
        np.testing.assert_allclose(low, np.maximum(1 / n - se, 1e-3 / n), rtol=1e-12)
        np.testing.assert_allclose(high, 1 / n + se, rtol=1e-12)


def test_f6_agreement_bars_are_each_groups_fraction_with_its_binomial_se():
    # guards: the se without / count. Per (activation, kind): 4 draws, j + 1 of them agree
    # for the j-th kind in linear, j for relu.
    kinds = list(experiments.SHIFTS)
    rows = [dict(activation=a, kind=k, draw=d, n=experiments.N_BEST, rgn_first=2.0,
                 rgn_last=1.0, loss_first=0.1, loss_last=1.0,
                 agree=d < (j + 1 if a == "linear" else j))
            for a in experiments.ACTIVATIONS for j, k in enumerate(kinds) for d in range(4)]
    ax = drawn("f6_auto_rgn", pd.DataFrame(rows))[-1]
    for activation, shift in (("linear", 1), ("relu", 0)):
        bars = next(c for c in ax.containers if c.get_label() == activation)
        p = (np.arange(len(kinds)) + shift) / 4
        np.testing.assert_allclose([b.get_height() for b in bars], p, rtol=1e-12)
        low, high = _error_bars(bars.errorbar)
        np.testing.assert_allclose(high - p, np.sqrt(p * (1 - p) / 4), rtol=1e-12, atol=1e-15)


def test_f2_y_axis_starts_at_its_data_and_never_below_1e_33():
    # guards: min for max in the floor (every panel then starts at 1e-33, the data squeezed
    # into its top few decades). Means 1/n >= 1/32: the axis starts within a decade of them.
    table = f2_table()
    table = table[table.kind == "label"]
    for ax in drawn("f2_loss_vs_n", table):
        bottom = ax.get_ylim()[0]
        assert 1e-3 < bottom < 1 / 32, (ax.get_title(), bottom)


def test_f2_n_label_sits_under_the_bottom_row_only():
    # guards: the x label put under the top row (the panels share x; rows above have none)
    table = f2_table()
    table = table[table.kind == "label"]
    axes = {ax.get_title(): ax for ax in drawn("f2_loss_vs_n", table)}
    assert axes["label · relu"].get_xlabel() == "target samples n"      # bottom row
    assert axes["label · linear"].get_xlabel() == ""                    # top row


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")
def test_f3_cells_read_ratio_and_se_and_full_fine_tuning_reads_1():
    # guards: ratio and se swapped in the cell text, or another column than "all" shown as
    # the bare 1. relative_to_all = 10^(i + 0.1 j), relative_se = 0.01 (i + 1) for the
    # i-th method and j-th kind.
    from sims.plots import SHORT_LABELS
    rows = [dict(activation=a, kind=k, method=m, n=experiments.N_BEST,
                 relative_to_all=10.0 ** (i + 0.1 * j), relative_se=0.01 * (i + 1))
            for a in experiments.ACTIVATIONS for j, k in enumerate(experiments.SHIFTS)
            for i, m in enumerate(experiments.METHODS)]
    method_of = {label: m for m, label in SHORT_LABELS.items()}
    for ax in drawn("f3_best_layer", pd.DataFrame(rows)):
        if not ax.texts:
            continue        # a colour bar
        methods = [method_of[t.get_text()] for t in ax.get_xticklabels()]
        kinds = [t.get_text() for t in ax.get_yticklabels()]
        for text in ax.texts:
            x, y = text.get_position()
            method, kind = methods[int(x)], kinds[int(y)]
            i, j = experiments.METHODS.index(method), list(experiments.SHIFTS).index(kind)
            expected = ("1" if method == "all" else
                        f"{10.0 ** (i + 0.1 * j):.2g}\n±{0.01 * (i + 1):.1g}")
            assert text.get_text() == expected, (kind, method)


def test_f4_outcome_bars_are_its_se_and_the_bars_full_unconverged():
    # guards: the blue outcome's error bars not its `se` column, or the green bars drawn
    # from another column (full_positive) than full_unconverged
    n = np.array(experiments.N_EVENT)
    table = f4_table().assign(frequency=n / 60, se=n / 600, full_positive=n / 30,
                              full_unconverged=n / 80)
    ax = drawn("f4_t1_event", table)[0]
    outcome = next(c for c in ax.containers
                   if c.get_label() == "simulated: first layer ~0 and full fine-tuning > 0")
    low, high = _error_bars(outcome)
    np.testing.assert_allclose(low, n / 60 - n / 600, rtol=1e-12)
    np.testing.assert_allclose(high, n / 60 + n / 600, rtol=1e-12)
    bars = next(c for c in ax.containers if c.get_label().startswith("full fine-tuning not"))
    np.testing.assert_allclose([b.get_height() for b in bars], n / 80, rtol=1e-12)
    np.testing.assert_array_equal([b.get_x() + b.get_width() / 2 for b in bars], n)


def test_f6_an_exact_fit_is_clipped_to_the_axes_edge_not_dropped():
    # guards: the gain left unclipped: loss_first = 0 (an exact fit) gives log10 = +inf, a
    # point matplotlib never shows; clipped, it sits at +6. Likewise rgn_first = 0: -6.
    rows = [dict(activation=a, kind=k, draw=d, n=experiments.N_BEST,
                 rgn_first=0.0 if d == 0 else 10.0, rgn_last=1.0,
                 loss_first=0.0 if d == 1 else 1e-9, loss_last=1.0, agree=True)
            for a in experiments.ACTIVATIONS for k in experiments.SHIFTS for d in range(2)]
    axes = drawn("f6_auto_rgn", pd.DataFrame(rows))
    for ax in axes[:len(experiments.ACTIVATIONS)]:
        points = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections
                                 if len(c.get_offsets()) == 2 * len(experiments.SHIFTS)])
        # draw 0: (log10 0 -> -6, log10 1e9 -> 6); draw 1: (log10 10, log10 inf -> 6)
        expected = np.array([[-6.0, 6.0], [1.0, 6.0]] * len(experiments.SHIFTS))
        np.testing.assert_array_equal(np.sort(points, axis=0), np.sort(expected, axis=0))


def test_f5_errors_are_on_a_log_axis_and_the_head_drift_on_a_linear_one():
    # guards: the errors' panels left linear (their geometric means span 1e-31..1; on a
    # linear axis every curve but the largest lies flat on 0)
    axes = {ax.get_title(): ax for ax in drawn("f5_forgetting", f5_table(STEPS))}
    for quantity in experiments.FORGETTING_QUANTITIES:
        drift = quantity.startswith("head drift")
        assert axes[quantity].get_yscale() == ("linear" if drift else "log"), quantity
        assert axes[quantity].get_xscale() == "log", quantity


def test_f6_green_marks_the_quadrants_where_auto_rgn_is_right():
    # guards: the green shading on the wrong quadrants. Auto-RGN is right where the sign
    # of log10(rgn_first / rgn_last) (x) equals that of the loss gain (y): x, y > 0 and
    # x, y < 0, up to the clip at 6.
    import matplotlib.colors as mcolors
    axes = drawn("f6_auto_rgn", _f6_table())
    green = mcolors.to_rgb("green")
    for ax in axes[:len(experiments.ACTIVATIONS)]:
        boxes = set()
        for c in ax.collections:
            if len(c.get_facecolor()) and np.allclose(c.get_facecolor()[0][:3], green):
                v = c.get_paths()[0].vertices
                boxes.add((v[:, 0].min(), v[:, 0].max(), v[:, 1].min(), v[:, 1].max()))
        assert boxes == {(0.0, 6.0, 0.0, 6.0), (-6.0, 0.0, -6.0, 0.0)}


def test_f6_agreement_bars_of_the_activations_sit_either_side_of_their_kinds_tick():
    # guards: the bars offset by i * width (linear's bar on the tick, relu's beside it,
    # both right of the label). Two activations, width 0.4: centres at k -+ 0.2.
    ax = drawn("f6_auto_rgn", _f6_table())[-1]
    ticks = ax.get_xticks()
    np.testing.assert_array_equal(ticks, np.arange(len(experiments.SHIFTS)))
    for activation, offset in zip(experiments.ACTIVATIONS, (-0.2, 0.2)):
        bars = next(c for c in ax.containers if c.get_label() == activation)
        np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in bars],
                                   ticks + offset, rtol=0, atol=1e-12)


def test_draw_refuses_an_unknown_figure_by_name():
    # guards: the check dropped (a KeyError from the lookup, or another figure drawn)
    from sims import plots
    with pytest.raises(ValueError, match=r"unknown figure 'f7_other'; expected one of"):
        plots.draw("f7_other", {})


def test_f1_and_f5_panels_follow_the_tables_order_left_to_right_then_down():
    # guards: the panels filled in another order (relu's F1 curves on the left under the
    # linear panel's place; F5's quantities column by column), which puts the one legend
    # and y label beside another panel than the tables' first
    f1 = drawn("f1_t1_curves", f1_table())[:2]
    assert [ax.get_title().split(" (")[0] for ax in f1] == ["linear network", "ReLU network"]
    assert f1[0].get_legend() is not None and f1[0].get_ylabel().startswith("target loss")
    f5 = drawn("f5_forgetting", f5_table(STEPS))
    assert [ax.get_title() for ax in f5] == list(experiments.FORGETTING_QUANTITIES)
    assert f5[0].get_legend() is not None
