"""Tables and figures from a results CSV of `python -m deep sweep`.

Selection: for each (benchmark, shift, method, seed, n_target) the learning rate
with the best validation metric is kept (validation accuracy, or worst-group
validation accuracy for rows whose `select` says so; ties go to the larger lr;
diverged cells compete with the epochs they completed, cells with no finished
epoch are dropped; a two-stage run's later seeds count only at the lr its first-stage
seeds chose when those are given as `lr_seeds`). Then means and standard errors over seeds
(s.e. = sample std / sqrt(seeds)). The figure shows accuracy relative to `all`
(full fine-tuning), seed by seed, like the paper's Figure 2.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import ConfigError, ResultsError
from .adapt.results import is_adapt_results, write_adapt_report
from .files import atomic_write_bytes, check_output, remove_figure, save_figure, sole_writer
from .methods import method_order
from .models import block_order
from .results import (SELECT_WORST_GROUP, ResultsFile, best_row, check_one_protocol,
                      selection_metric)
from .stats import NO_STAT, format_stat, interval_table, mean_se
from .two_stage import drop_superseded, lr_group

# Blocks of every registered architecture in forward order, then the method table's.
SINGLE_BLOCKS = block_order()
METHOD_ORDER = method_order(SINGLE_BLOCKS)


def test_metric_name(rows: list[dict]) -> str:
    """The reported metric of one table: worst-group test accuracy when its rows were
    selected by worst-group validation accuracy."""
    if rows and all(r.get("select") == SELECT_WORST_GROUP for r in rows):
        return "worst_group_acc"
    return "test_acc"


def select_learning_rates(rows: list[dict]) -> list[dict]:
    """One row per (benchmark, shift, method, seed, n_target): the best lr by validation
    (`results.best_row`); groups where no row has a metric are dropped."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if selection_metric(row) is not None:
            groups[(row["benchmark"], row["shift"], row["method"], row["seed"],
                    row["n_target"])].append(row)
    return [best_row(group) for group in groups.values()]


def _method_key(method: str):
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def metric_values(rows: list[dict], metric: str) -> dict[tuple, float]:
    """{(shift, method, seed): value} of the rows that have `metric`."""
    return {(r["shift"], r["method"], r["seed"]): r[metric] for r in rows
            if r.get(metric) is not None}


def paired_difference(values: dict[tuple, float], shifts: list[str], seeds: list[int],
                      method: str, baseline: str = "all") -> tuple[float, float, int]:
    """(mean, se, n) over seeds of metric(method) - metric(baseline), each seed's
    differences averaged over `shifts`; a seed counts only where both have every shift.
    `values` as `metric_values` gives them."""
    return mean_se([np.mean([values[(s, method, d)] - values[(s, baseline, d)] for s in shifts])
                    for d in seeds
                    if all((s, m, d) in values for s in shifts for m in (method, baseline))])


def summarize(selected: list[dict], metric: str | None = None) -> dict:
    """{(benchmark, n_target): {"metric": ..., "shifts": [...], "methods": [...],
        "abs": {(shift, method): (mean, se, n)}, "rel": {(shift, method): (mean, se, n)}}}.
    Each table reports `metric`, or by default its own (`test_metric_name`). "rel" is metric(method) -
    metric(all) paired by seed; the shift "mean" averages each seed's values over the
    shifts first."""
    tables = {}
    by_table = defaultdict(list)
    for row in selected:
        by_table[(row["benchmark"], row["n_target"])].append(row)
    for key, rows in sorted(by_table.items()):
        table_metric = metric or test_metric_name(rows)
        values = metric_values(rows, table_metric)
        shifts = sorted({s for s, _, _ in values})
        methods = sorted({m for _, m, _ in values}, key=_method_key)
        seeds = sorted({d for _, _, d in values})
        abs_, rel = {}, {}
        for method in methods:
            for shift in shifts:
                vals = [values[(shift, method, d)] for d in seeds if (shift, method, d) in values]
                abs_[(shift, method)] = mean_se(vals)
                rel[(shift, method)] = paired_difference(values, [shift], seeds, method)
            if len(shifts) > 1:  # per seed, average over shifts that have every value
                per_seed = [np.mean([values[(s, method, d)] for s in shifts]) for d in seeds
                            if all((s, method, d) in values for s in shifts)]
                abs_[("mean", method)] = mean_se(per_seed)
                rel[("mean", method)] = paired_difference(values, shifts, seeds, method)
        if len(shifts) > 1:
            shifts = shifts + ["mean"]
        tables[key] = {"metric": table_metric, "shifts": shifts, "methods": methods, "abs": abs_,
                       "rel": rel}
    return tables


def metric_label(metric: str) -> str:
    return "worst-group test accuracy" if metric == "worst_group_acc" else "test accuracy"


def has_relative(table: dict) -> bool:
    """Whether a table can be shown relative to `all`: it has `all` and another method."""
    return "all" in table["methods"] and len(table["methods"]) > 1


def markdown(tables: dict) -> str:
    lines = []
    for (benchmark, n_target), t in tables.items():
        label = metric_label(t["metric"])
        for kind, title in (("abs", f"{label} (%)"), ("rel", f"{label} relative to `all` (points)")):
            if kind == "rel" and not has_relative(t):
                continue
            methods = [m for m in t["methods"] if kind == "abs" or m != "all"]
            lines += [f"### {benchmark}, n_target = {n_target}: {title}", "",
                      "| shift | " + " | ".join(methods) + " |",
                      "|---|" + "---|" * len(methods)]
            for shift in t["shifts"]:
                cells = [format_stat(t[kind].get((shift, m), NO_STAT),
                                     signed=kind == "rel") for m in methods]
                lines.append(f"| {shift} | " + " | ".join(cells) + " |")
            lines.append("")
            if kind == "rel":  # the same differences as intervals
                lines += interval_table("95 % t intervals of the same differences (paired by seed):",
                                        t["shifts"], methods,
                                        lambda s, m: t["rel"].get((s, m), NO_STAT))
    lines.append("Mean ± standard error over seeds; each (shift, method, seed) at the learning "
                 "rate with the best validation metric, and the epoch chosen by validation.")
    return "\n".join(lines) + "\n"


def plot_relative(tables: dict, path_stem: Path) -> list[Path]:
    """Bar chart of accuracy relative to `all` per method, one panel per shift (PNG + PDF);
    none (and [] returned) when no table has `all` and another method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, shift) for key, t in tables.items()
              if has_relative(t) for shift in t["shifts"]]
    if not panels:
        return []
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, ((benchmark, n_target), shift) in zip(axes.flat, panels):
        t = tables[(benchmark, n_target)]
        methods = [m for m in t["methods"] if m != "all"]
        bar_panel(ax, {m: t["rel"].get((shift, m), NO_STAT) for m in methods},
                  f"{benchmark} / {shift}" + (f" (n={n_target})" if len(tables) > 1 else "")
                  + (" (worst group)" if t["metric"] == "worst_group_acc" else ""))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    metrics = {tables[key]["metric"] for key, _ in panels}
    one_seed = any(math.isnan(t["rel"].get((shift, m), (0, math.nan))[1])
                   for key, shift in panels for t in [tables[key]] for m in t["methods"]
                   if m != "all")
    fig.suptitle((metric_label(metrics.pop()) if len(metrics) == 1 else "test accuracy")
                 + " relative to full fine-tuning, mean ± s.e. over seeds"
                 + ("\n(no error bar: one seed)" if one_seed else ""), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def bar_panel(ax, rel: dict, title: str) -> None:
    """One panel of the Figure-2-style chart: method -> (mean, se, n) of accuracy minus
    `all` (fractions), drawn in points; single blocks blue, other methods grey."""
    methods = list(rel)
    means = [100 * rel[m][0] for m in methods]
    # A single seed has no interval: no bar at all, rather than a cap that reads as zero spread.
    errs = [100 * rel[m][1] for m in methods]
    colours = ["tab:blue" if m in SINGLE_BLOCKS else "tab:gray" for m in methods]
    ax.bar(range(len(methods)), means, color=colours)
    spread = [i for i, e in enumerate(errs) if not math.isnan(e)]
    if spread:
        ax.errorbar(spread, [means[i] for i in spread], yerr=[errs[i] for i in spread],
                    fmt="none", ecolor="black", elinewidth=1, capsize=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("points vs all", fontsize=8)


def unequal_searches(rows: list[dict]) -> list[str]:
    """One line per (benchmark, shift, method, n_target) whose seeds ran different sets of
    learning rates (a two-stage run's later seeds, or an unfinished sweep): each seed's lr
    is chosen among the rows it has, so such a table compares choices made over
    different grids. Empty when every seed ran the same lrs."""
    searched: dict[tuple, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        searched[lr_group(r)][r["seed"]].add(float(r["lr"]))
    lines = []
    for (benchmark, shift, method, n_target), per_seed in searched.items():
        if len({frozenset(lrs) for lrs in per_seed.values()}) > 1:
            by_count = defaultdict(list)
            for seed, lrs in sorted(per_seed.items()):
                by_count[len(lrs)].append(str(seed))
            counts = "; ".join(f"seed{'s' * (len(s) > 1)} {','.join(s)}: {n}"
                               for n, s in sorted(by_count.items(), reverse=True))
            lines.append(f"- {benchmark} / {shift} / {method} (n={n_target}): {counts}")
    return lines


def write_report(results_csv: str | Path, out_dir: str | Path | None = None,
                 lr_seeds: list[int] | None = None) -> list[Path]:
    """Write report.md and relative_accuracy.{png,pdf} into `out_dir`; return the paths.

    `lr_seeds`: the seeds that chose each learning rate of a two-stage run (a bench suite's
    `lr_seeds`, `deep.two_stage`); the other seeds then count only at that choice, as the
    suite's own table counts them (`two_stage.drop_superseded`). None: every seed picks
    its own lr among the rows it has."""
    results_csv = Path(results_csv)
    if not results_csv.is_file():
        what = "is a folder, not a file" if results_csv.is_dir() else "not found"
        raise ConfigError(f"results file {what}: {results_csv} (`python -m deep sweep ... "
                          "--out FILE` writes one; `python -m deep bench` writes results.csv "
                          "in its --out folder)")
    # --- issue #17: a `python -m deep adapt` CSV has its own columns and summary ---
    if is_adapt_results(results_csv):
        return write_adapt_report(results_csv, out_dir)
    # --- end of issue #17 branch ---
    rows = ResultsFile(results_csv).rows  # (a file with a cell twice is refused, as a sweep does)
    if not rows:
        raise ResultsError(f"{results_csv} holds no results yet: `python -m deep sweep ... "
                           f"--out {results_csv}` (or `python -m deep bench`) adds a row per "
                           "finished cell")
    check_one_protocol(rows, results_csv)
    if lr_seeds is not None and not list(lr_seeds):
        raise ConfigError("--lr-seeds is empty: expected a two-stage run's first-stage seeds, "
                          "comma-separated (e.g. --lr-seeds 0), or leave the flag out to let "
                          "each seed choose its own learning rate")
    if lr_seeds is not None:
        seeds = {r["seed"] for r in rows}
        missing = sorted(set(lr_seeds) - seeds)
        if missing:
            raise ConfigError(f"--lr-seeds {','.join(map(str, missing))}: no row of "
                              f"{results_csv} has that seed; its seeds are "
                              f"{','.join(map(str, sorted(seeds)))}")
        rows = drop_superseded(rows, lr_seeds)
    out_dir = Path(out_dir) if out_dir else results_csv.with_name(results_csv.stem + "_report")
    check_output(out_dir, "report folder", folder=True)
    with sole_writer(out_dir / "report.md", "report folder"):  # a killed report's temps go
        return _write_report(rows, results_csv, out_dir, lr_seeds)


def _search_note(rows: list[dict], lr_seeds: list[int] | None, shown: int = 3) -> str:
    """What the table's lr choice rests on when seeds ran different lrs ('' when not)."""
    if lr_seeds is not None:
        return (f"\nLearning rates chosen on seed{'s' * (len(lr_seeds) > 1)} "
                f"{','.join(map(str, lr_seeds))} (--lr-seeds); the other seeds count only "
                "at that choice.\n")
    unequal = unequal_searches(rows)
    if not unequal:
        return ""
    groups = len({lr_group(r) for r in rows})
    more = f"\n- ... and {len(unequal) - shown} more" if len(unequal) > shown else ""
    return (f"\nIn {len(unequal)} of {groups} (benchmark, shift, method) groups the seeds ran "
            "different learning rates (how many per seed below), and each seed's lr is "
            "chosen among its own rows. For a two-stage run (`python -m deep bench`), pass "
            "its first-stage seeds as `--lr-seeds` to read it as its suite's table does.\n\n"
            + "\n".join(unequal[:shown]) + more + "\n")


def _write_report(rows: list[dict], results_csv: Path, out_dir: Path,
                  lr_seeds: list[int] | None = None) -> list[Path]:
    selected = select_learning_rates(rows)
    tables = summarize(selected)
    text = f"# Results of {results_csv.name}\n\n" + markdown(tables)
    if not selected:
        text += ("\nNo cell has a validation metric (no run finished an epoch), so no "
                 "learning rate could be chosen and there is nothing to tabulate.\n")
    diverged = sum(r["status"] == "diverged" for r in rows)
    text += f"\n{len(rows)} cells, {diverged} diverged.\n"
    text += _search_note(rows, lr_seeds)
    plots = plot_relative(tables, out_dir / "relative_accuracy")
    if not plots:
        text += "\nNo plot: it shows each method relative to `all`, and no table has both.\n"
        remove_figure(out_dir / "relative_accuracy")   # an older report's would show other data
    report = out_dir / "report.md"
    atomic_write_bytes(report, lambda f: f.write(text.encode()))
    return [report, *plots]
