"""The Fashion-MNIST suite end to end: `python -m deep bench fmnist [--quick]`.

Two sweeps (resumable: rerun the same command after an interruption), then the
summaries, all written to --out (default: the suite's `out`):

    results.csv                 main table: every method on every benchmark
    n_target.csv                fmnist-c: single blocks and `all` at n_target 100..3000
    curves.csv, n_target_curves.csv   validation accuracy per epoch of every run
    table.md                    the measured "best block per shift" table (markdown), with
                                paired differences to `all` (95 % t intervals) and the
                                fraction of cells whose chosen epoch / lr is inside the grid
    relative_accuracy.png/.pdf  accuracy relative to full fine-tuning, per benchmark
    n_target.png/.pdf           accuracy relative to `all` against n_target
    learning_curves.png/.pdf    validation accuracy per epoch at each method's chosen lr

A suite with `lr_seeds` runs in two stages per benchmark (`deep.two_stage`): the whole lr
grid on those seeds, then the other seeds at each (shift, method)'s chosen lr.

The suite (`SUITES`) is sized for a 2-core CPU machine (docs/fmnist.md has its
measured time); `--quick` is a pipeline smoke test whose numbers mean nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from .blocks import blocks_for
from .files import (atomic_write_bytes, check_output, remove_figure, remove_stale_temps, save_figure,
                    sole_writer)
from .methods import GENERIC_METHODS
from .protocol import Protocol, engine_default, load_protocol
from .ray_backend import add_backend_arguments, executor_from_args, session_for
from .report import (METHOD_ORDER, bar_panel, metric_values, paired_difference,
                     select_learning_rates)
from .report import summarize as summarize_tables
from .flags import add_run_options
from .results import check_one_protocol
from .sweep import read_results, run_sweep
from .train import TrainConfig, resolve_device
from .convergence import CurvesFile, inside_grid, learning_curves, read_curves
from .data.base import folder_problem
from .errors import ConfigError, ResultsError, check_int
from .stats import above_zero, format_interval, format_stat, mean_se, t_interval
from .two_stage import drop_superseded, run_two_stage

HELP = "run a whole benchmark suite (the Fashion-MNIST shifts) and write its table and plots"

TABLE_BLOCKS = tuple(blocks_for("resnet26"))  # the suite tunes resnet26: its single blocks
SINGLE_RUN = GENERIC_METHODS  # the methods that are one run each, not one block
WORKERS = 2  # local processes: the suite is sized for a 2-core machine
KIND = {"fmnist-c": "input", "fmnist-breeds": "feature", "fmnist-flip": "output",
        "fmnist-spurious": "output", "fmnist-blocknoise": "one block"}
# The block the paper's pattern predicts for each row of the table.
EXPECTED = {"fmnist-c": "first", "fmnist-breeds": "second", "fmnist-flip": "last",
            "fmnist-spurious": "last"}


@dataclass
class Suite:
    """What `bench` runs. `shifts`: benchmark -> shifts of the main table."""

    shifts: dict[str, list[str]]
    seeds: list[int]
    # None (lrs, epochs, test_per_class, patience, methods): each protocol's own
    # (deep/configs/<benchmark>.toml)
    lrs: list[float] | None = None
    epochs: int | None = None
    n_target: int = 1000
    test_per_class: int | None = None
    n_sweep_shifts: list[str] = field(default_factory=list)
    n_sweep_sizes: list[int] = field(default_factory=list)
    n_sweep_methods: list[str] = field(default_factory=lambda: [*TABLE_BLOCKS, "all"])
    # issue #15: the lr grid on `lr_seeds` only (None: on every seed); methods other
    # than the single blocks and `all` on `baseline_seeds` (None: `seeds`).
    patience: int | None = None
    methods: list[str] | None = None
    lr_seeds: list[int] | None = None
    # steps (at the grid's ratio) the lr grid may grow beyond each end for a (shift,
    # method) whose first-stage choice is at an edge (`two_stage.edge_steps`)
    extend_lr_grid: int = 0
    baseline_seeds: list[int] | None = None
    out: str = "figures/fmnist"
    workers: int = WORKERS  # without --workers

    def seeds_for(self, method: str) -> list[int]:
        """The seeds `method` runs on in the second stage (the first stage's left out)."""
        core = method in TABLE_BLOCKS or method == "all"
        seeds = self.seeds if core or self.baseline_seeds is None else self.baseline_seeds
        return [s for s in seeds if s not in (self.lr_seeds or [])]


SUITES = {
    # Issue #15's protocol, sized for a 2-core machine with --workers 2 (docs/fmnist.md,
    # "Protocol and why", has each choice with its measured cost). The protocols' own
    # settings (the paper's lr grid, at most 25 epochs, early stopping after 4 without a
    # better validation accuracy; fmnist-flip 50 and 8, its runs are slower), run in two
    # stages: each (shift, method)'s lr chosen on seed 0 (the grid extended by up to two
    # decades where that choice is at its edge); blocks, `all`, LP-FT and Auto-RGN on 5
    # seeds (the other baselines left out); 6 corruptions (2 noise,
    # 1 blur, 1 weather, 2 digital).
    # Benchmarks in order of cost, so the cheap ones are complete (and committed) first.
    "fmnist": Suite(
        shifts={"fmnist-flip": ["flip"], "fmnist-breeds": ["subpopulation"],
                "fmnist-spurious": ["balanced"],
                "fmnist-blocknoise": ["first", "second", "third"],
                "fmnist-c": ["gaussian_noise", "impulse_noise", "defocus_blur", "fog",
                             "contrast", "pixelate"]},
        seeds=[0, 1, 2, 3, 4], methods=[*TABLE_BLOCKS, "all", "lp-ft", "auto-rgn"],
        lr_seeds=[0], extend_lr_grid=2, out="figures/fmnist-v2",
        n_sweep_shifts=["gaussian_noise"], n_sweep_sizes=[100, 300, 1000, 3000],
        n_sweep_methods=["first", "last", "all"]),
    "fmnist-quick": Suite(
        shifts={"fmnist-c": ["gaussian_noise"], "fmnist-breeds": ["subpopulation"],
                "fmnist-flip": ["flip"], "fmnist-spurious": ["balanced"],
                "fmnist-blocknoise": ["first"]},
        seeds=[0], lrs=[1e-3], epochs=1, n_target=200, test_per_class=20,
        n_sweep_shifts=["gaussian_noise"], n_sweep_sizes=[100, 300],
        n_sweep_methods=["first", "all"],
        # Its sweeps are a few seconds each: a second process, which starts and loads the
        # data for each of them, costs more than it saves (`time python -m deep bench fmnist
        # --quick --no-progress [--workers 2]`, 2-core Xeon: 74-78 s, 103-111 s with two).
        workers=1),
}


def main_protocols(suite: Suite) -> list[Protocol]:
    """One protocol per benchmark of the main table: its config, the suite's settings."""
    out = []
    for benchmark, shifts in suite.shifts.items():
        base = load_protocol(benchmark)
        out.append(base.replace(shifts=shifts, seeds=suite.seeds, lrs=suite.lrs,
                                epochs=suite.epochs, n_target=suite.n_target,
                                test_per_class=suite.test_per_class, patience=suite.patience,
                                methods=suite.methods))
    return out


def n_sweep_protocols(suite: Suite) -> list[Protocol]:
    """fmnist-c at each n_target of the sweep, except the main table's own n_target,
    whose cells the main table already has (`n_sweep_rows` takes them from there)."""
    base = load_protocol("fmnist-c")
    return [base.replace(shifts=suite.n_sweep_shifts, seeds=suite.seeds, lrs=suite.lrs,
                         epochs=suite.epochs, n_target=n, methods=suite.n_sweep_methods,
                         test_per_class=suite.test_per_class, patience=suite.patience)
            for n in suite.n_sweep_sizes if not _in_main_table(suite, n)]


def _in_main_table(suite: Suite, n: int) -> bool:
    return n == suite.n_target and set(suite.n_sweep_shifts) <= set(suite.shifts.get("fmnist-c", []))


def n_sweep_rows(out_dir: Path, suite: Suite) -> list[dict]:
    """The n_target sweep's rows, with the main table's cells at its own n_target."""
    rows = read_results(out_dir / "n_target.csv")
    if any(_in_main_table(suite, n) for n in suite.n_sweep_sizes):
        rows += [r for r in read_results(out_dir / "results.csv")
                 if r["benchmark"] == "fmnist-c" and r["shift"] in suite.n_sweep_shifts
                 and r["method"] in suite.n_sweep_methods]
    return rows


# --- summaries --------------------------------------------------------------------

def table_rows(selected: list[dict]) -> list[tuple[str, str, list[str]]]:
    """(row label, benchmark, shifts averaged in that row): fmnist-c averages its
    corruptions (as the paper averages CIFAR-10-C's); every perturbed block of
    fmnist-blocknoise is its own row."""
    shifts = defaultdict(set)
    for r in selected:
        shifts[r["benchmark"]].add(r["shift"])
    rows = []
    for benchmark in KIND:
        if benchmark not in shifts:
            continue
        if benchmark == "fmnist-blocknoise":
            for block in TABLE_BLOCKS:
                if block in shifts[benchmark]:
                    rows.append((f"{benchmark} ({block} perturbed)", benchmark, [block]))
        else:
            label = benchmark + (f" (mean of {len(shifts[benchmark])})"
                                 if len(shifts[benchmark]) > 1 else "")
            rows.append((label, benchmark, sorted(shifts[benchmark])))
    return rows


def row_stats(selected: list[dict], benchmark: str, shifts: list[str], metric: str,
              n_target: int) -> dict[str, dict]:
    """Per method: {"abs": (mean, se, n), "rel": ...} over seeds of the metric averaged
    over `shifts`, and of its paired difference to `all` (`report.summarize`'s numbers)."""
    rows = [r for r in selected if r["benchmark"] == benchmark and r["n_target"] == n_target
            and r["shift"] in shifts]
    table = summarize_tables(rows, metric).get((benchmark, n_target))
    if table is None:
        return {}
    key = shifts[0] if len(shifts) == 1 else "mean"
    return {m: {"abs": table["abs"][(key, m)], "rel": table["rel"][(key, m)]}
            for m in table["methods"]}


def blocks_by_mean(stats: dict[str, dict]) -> list[str]:
    """The single blocks of a row that ran, highest mean accuracy first."""
    blocks = [m for m in TABLE_BLOCKS if m in stats and stats[m]["abs"][2] > 0]
    return sorted(blocks, key=lambda m: -stats[m]["abs"][0])


def ranks(per_row: list[dict[str, dict]], methods: tuple[str, ...]) -> dict[str, float]:
    """Average rank (1 = best mean accuracy) of `methods` over the table's rows; methods
    with equal accuracy in a row share the mean of their ranks (two tied for first both
    get 1.5), so a tie is never broken by the order the methods are listed in."""
    total = defaultdict(list)
    for stats in per_row:
        present = [m for m in methods if m in stats and stats[m]["abs"][2] > 0]
        row_ranks = rankdata([-stats[m]["abs"][0] for m in present], method="average")
        for m, rank in zip(present, row_ranks):
            total[m].append(float(rank))
    return {m: float(np.mean(v)) for m, v in total.items()}


def markdown_table(selected: list[dict], n_target: int) -> tuple[str, list]:
    """The main table (accuracy relative to `all`, and absolute) and a verdict per row."""
    rows = table_rows([r for r in selected if r["n_target"] == n_target])
    if not rows:
        return "", []
    per_row = [row_stats(selected, benchmark, shifts, "test_acc", n_target)
               for _, benchmark, shifts in rows]
    # every row's methods, in the first row's order (a benchmark still running may lack some)
    methods = list(dict.fromkeys(m for stats in per_row for m in stats))
    relative, verdicts = _relative_table(selected, n_target, rows, per_row, methods)
    lines = [*relative, *_absolute_table(rows, per_row, methods),
             *_rank_table(selected, rows, n_target)]
    return "\n".join(lines) + "\n", verdicts


def _relative_table(selected, n_target, rows, per_row, methods) -> tuple[list[str], list]:
    """The table relative to `all`: a line per benchmark (with its verdict), the spurious
    benchmark's worst group, and each shift of a benchmark with several."""
    def line(label, benchmark, shifts, metric, stats):
        lead = _leader(selected, n_target, stats, benchmark, shifts, metric)
        return _block_line(methods, stats, label, benchmark, lead), lead

    lines = ["Test accuracy relative to full fine-tuning (`all`, whose own accuracy is shown), "
             "in points: mean ± standard error over seeds. best block: the highest mean, "
             "named alone when the 95 % t interval of its paired difference to the next "
             "block lies above 0, else `first ≈ second`.", "",
             "| benchmark (shift kind) | " + " | ".join(methods) + " | best block |",
             "|---|" + "---|" * (len(methods) + 1)]
    verdicts = []
    for (label, benchmark, shifts), stats in zip(rows, per_row):
        text, (best, runner_up, margin) = line(label, benchmark, shifts, "test_acc", stats)
        lines.append(text)
        expected = EXPECTED.get(benchmark) or shifts[0]
        # "beats": the 95 % t interval of the paired difference lies above 0
        beats_all = best != "-" and above_zero(stats[best]["rel"])
        verdicts.append((label, KIND[benchmark], expected, best, beats_all,
                         stats[best]["rel"] if best != "-" else None, runner_up, margin))
    for label, benchmark, shifts in rows:
        if benchmark == "fmnist-spurious":
            stats = row_stats(selected, benchmark, shifts, "worst_group_acc", n_target)
            lines.append(line(label + ", worst group", benchmark, shifts, "worst_group_acc",
                              stats)[0])
    # A mean over corruptions can hide which block wins each one, so show each.
    for label, benchmark, shifts in rows:
        for shift in shifts if len(shifts) > 1 else []:
            stats = row_stats(selected, benchmark, [shift], "test_acc", n_target)
            lines.append(line(f"{benchmark}: {shift}", benchmark, [shift], "test_acc", stats)[0])
    return lines, verdicts


def _leader(selected, n_target, stats, benchmark, shifts, metric):
    """(best block by mean, runner-up, paired margin best - runner-up over seeds)."""
    ranked = blocks_by_mean(stats)
    if len(ranked) < 2:
        return (ranked or ["-"])[0], None, None
    values = metric_values([r for r in selected if r["benchmark"] == benchmark
                            and r["n_target"] == n_target], metric)
    seeds = sorted({d for _, _, d in values})
    return ranked[0], ranked[1], paired_difference(values, shifts, seeds, *ranked[:2])


def _block_line(methods, stats, label, benchmark, lead) -> str:
    best, runner_up, margin = lead
    # named alone only when the 95 % interval against the next block lies above 0
    shown = best if margin is None or above_zero(margin) else f"{best} ≈ {runner_up}"
    cells = ["-" if m not in stats else format_stat(stats[m]["rel"], signed=True)
             if m != "all" else format_stat(stats[m]["abs"]) for m in methods]
    return f"| {label} ({KIND[benchmark]}) | " + " | ".join(cells) + f" | {shown} |"


def _absolute_table(rows, per_row, methods) -> list[str]:
    lines = ["", "Absolute test accuracy (%):", "",
             "| benchmark | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for (label, _, _), stats in zip(rows, per_row):
        lines.append(f"| {label} | " + " | ".join(format_stat(stats[m]["abs"]) if m in stats
                                                 else "-" for m in methods) + " |")
    return lines


def _rank_table(selected, rows, n_target) -> list[str]:
    # Ranked on seed 0, the one seed every method ran: a 5-seed mean against one run
    # would compare unequal things.
    seed0 = [row_stats([r for r in selected if r["seed"] == 0], benchmark, shifts, "test_acc",
                       n_target) for _, benchmark, shifts in rows]
    avg = dict(sorted(ranks(seed0, SINGLE_RUN).items(), key=lambda kv: kv[1]))
    return ["", "Average rank of the single-run methods over the rows above, on seed 0 (the "
            "seed every method ran; 1 = best; the paper reports Auto-RGN 1.29, full "
            "fine-tuning 2.71):", "",
            "| " + " | ".join(avg) + " |", "|" + "---|" * len(avg),
            "| " + " | ".join(f"{v:.2f}" for v in avg.values()) + " |"]


def verdict_lines(verdicts) -> list[str]:
    out = []
    for label, kind, expected, best, beats_all, rel, runner_up, margin in verdicts:
        gain = format_interval(t_interval(rel)) if rel else "-"
        # "best" only when the 95 % interval against the next block lies above 0
        ahead = margin is not None and above_zero(margin)
        versus = (f"{format_interval(t_interval(margin))} points vs {runner_up}, "
                  if margin is not None else "")
        if best == expected and margin is None:  # one block ran in this row so far
            same = "the predicted block, with no other block to compare it with yet"
        elif best == expected:
            same = "as the paper's pattern predicts" if ahead else \
                f"the predicted block, but not separated from {runner_up} at 95 %"
        else:
            same = f"the pattern predicts {expected}"
        lead = "best block" if ahead or margin is None else "highest mean"
        out.append(f"- {label} ({kind}): {lead} **{best}** ({versus}{gain} vs all, 95 % "
                   f"t intervals), {same}; {'it beats' if beats_all else 'it does not beat'} "
                   "full fine-tuning" + ("" if beats_all else " at 95 %") + ".")
    return out


def interval_table(selected: list[dict], n_target: int) -> list[str]:
    """Paired differences to `all` per row and method, with 95 % t intervals."""
    rows = table_rows([r for r in selected if r["n_target"] == n_target])
    lines, methods = [], None
    for label, benchmark, shifts in rows:
        for metric, suffix in (("test_acc", ""), ("worst_group_acc", ", worst group")):
            if metric == "worst_group_acc" and benchmark != "fmnist-spurious":
                continue
            stats = row_stats(selected, benchmark, shifts, metric, n_target)
            if methods is None:
                methods = [m for m in stats if m != "all"]
                lines += ["| benchmark | " + " | ".join(methods) + " |",
                          "|---|" + "---|" * len(methods)]
            lines.append(f"| {label}{suffix} | " + " | ".join(
                format_interval(t_interval(stats[m]["rel"])) if m in stats else "-"
                for m in methods) + " |")
    if not lines:
        return []
    return ["Test accuracy minus `all`, in points: mean over seeds [95 % t interval of the "
            "paired difference, n - 1 degrees of freedom]:", "", *lines, ""]


def grid_table(rows: list[dict], selected: list[dict], n_target: int) -> list[str]:
    """Per benchmark and method: the fractions of cells whose chosen epoch is before the
    last allowed epoch and whose chosen lr is strictly inside its grid (issue #15)."""
    rows = [r for r in rows if r["n_target"] == n_target]
    fractions = inside_grid(rows, [r for r in selected if r["n_target"] == n_target])
    by_row = {b: {m: f for (b2, m), f in fractions.items() if b2 == b}
              for b in KIND if any(k[0] == b for k in fractions)}
    return _fractions_table(by_row, "benchmark", "Convergence: per benchmark and method")


def n_target_grid_table(rows: list[dict], selected: list[dict]) -> list[str]:
    """`grid_table` for the n_target sweep: one row per n_target."""
    by_row = {}
    for n in sorted({r["n_target"] for r in rows}):
        fractions = inside_grid([r for r in rows if r["n_target"] == n],
                                [r for r in selected if r["n_target"] == n])
        by_row[f"n_target = {n}"] = {m: f for (_, m), f in fractions.items()}
    return _fractions_table(by_row, "fmnist-c", "Convergence of the n_target sweep: per "
                            "n_target and method")


def _table_order(methods) -> list[str]:
    """`methods` in the order the tables list them (unknown names last, by name)."""
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER
                                          else len(METHOD_ORDER), m))


def _fractions_table(by_row: dict[str, dict], first_column: str, title: str) -> list[str]:
    """The two fractions of `inside_grid` as a markdown table, below 80 % in bold."""
    if not by_row:
        return []
    methods = _table_order({m for row in by_row.values() for m in row})
    lines = [f"{title}, the % of cells whose validation-chosen "
             "epoch is before the last allowed epoch / whose chosen learning rate is neither "
             "the grid's smallest nor its largest (issue #15 asks for 80 % of each; below "
             "that in bold):", "",
             f"| {first_column} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for label, row in by_row.items():
        cells = []
        for m in methods:
            f = row.get(m)
            if f is None:
                cells.append("-")
                continue
            parts = [f"{100 * v:.0f}" for v in (f["epoch_inside"], f["lr_inside"])]
            parts = [f"**{p}**" if v < 0.8 else p for p, v in zip(parts, (f["epoch_inside"],
                                                                       f["lr_inside"]))]
            cells.append(" / ".join(parts))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _epochs_text(rows: list[dict]) -> str:
    """The epoch caps, worded so that the cap reads as fixed and only the epoch as chosen:
    the most common cap, then the benchmarks whose rows have another one."""
    caps = defaultdict(set)
    for r in rows:
        caps[r["epochs"]].add(r["benchmark"])
    if len(caps) == 1:  # the older 4-epoch table's wording (its committed table.md says so)
        return f"{next(iter(caps))} epochs (picked by validation)"
    common = max(caps, key=lambda c: (sum(r["epochs"] == c for r in rows), -c))
    others = "; ".join(f"{c} on {', '.join(sorted(caps[c]))}" for c in sorted(caps) if c != common)
    return f"the epoch picked by validation within a cap of {common} epochs ({others})"


def protocol_lines(rows: list[dict], curves: list[dict], n_target: int) -> list[str]:
    """What the CSV holds, read from its rows: seeds, lr grid, epochs; the two stages
    and early stopping when the data show them."""
    seeds = sorted({r["seed"] for r in rows})
    grids = defaultdict(set)
    for r in rows:
        grids[(r["benchmark"], r["shift"], r["method"])].add(float(r["lr"]))
    # the grid: the lrs that most searched (shift, method) pairs ran; the rest are extensions
    searched = [g for g in grids.values() if len(g) > 1] or list(grids.values())
    counts = defaultdict(int)
    for g in searched:
        for lr in g:
            counts[lr] += 1
    grid = sorted((lr for lr, n in counts.items() if 2 * n > len(searched)), reverse=True)
    epochs = sorted({r["epochs"] for r in rows})
    lines = [f"Seeds {seeds}, learning rates {grid} (picked per cell by validation), "
             f"{_epochs_text(rows)}, "
             f"n_target = {n_target}."]
    extended = {k: sorted(g - set(grid), reverse=True) for k, g in sorted(grids.items())
                if len(g) > 1 and g - set(grid)}
    if extended:
        lines.append("The grid was extended where the first stage's choice sat at its edge: "
                     + "; ".join(f"{b} {s} `{m}` +{lrs}" for (b, s, m), lrs in extended.items())
                     + ".")
    lrs_per_cell = defaultdict(set)
    for r in rows:
        lrs_per_cell[(r["benchmark"], r["shift"], r["method"], r["seed"], r["n_target"])].add(r["lr"])
    grid_seeds = sorted({k[3] for k, v in lrs_per_cell.items() if len(v) > 1})
    if grid_seeds and any(len(v) == 1 for v in lrs_per_cell.values()):
        lines.append(f"Two stages: the whole grid on seed(s) {grid_seeds}; the other seeds of each "
                     "(shift, method) at the learning rate those seeds chose by validation.")
    if curves:
        def run(r):
            return r["benchmark"], r["shift"], r["method"], r["seed"], r["n_target"], r["lr"]
        ran = defaultdict(int)
        for c in curves:
            ran[run(c)] += 1
        cap = {run(r): r["epochs"] for r in rows}  # each run's own cap (protocols differ)
        stopped = sum(n < cap.get(k, max(epochs)) for k, n in ran.items())
        lines.append(f"Early stopping on a validation plateau: {stopped} of {len(ran)} runs "
                     "stopped before their epoch cap (curves.csv has every epoch run).")
    return lines


def n_target_rows(selected: list[dict]) -> dict[str, dict[int, tuple]]:
    """method -> n_target -> (mean, se, seeds) of test accuracy minus `all`, paired by
    seed and averaged over shifts; plus "best block (val)": per seed and n, the single
    block with the best validation accuracy (the cross-validated choice)."""
    by = defaultdict(dict)
    for r in selected:
        by[(r["n_target"], r["seed"])][(r["shift"], r["method"])] = r
    out = defaultdict(dict)
    sizes = sorted({n for n, _ in by})
    for n in sizes:
        diffs = defaultdict(list)
        for (n2, seed), cells in by.items():
            if n2 != n:
                continue
            shifts = sorted({s for s, _ in cells})
            if not all((s, "all") in cells for s in shifts):
                continue
            base = np.mean([cells[(s, "all")]["test_acc"] for s in shifts])
            methods = {m for _, m in cells if m != "all"}
            for m in methods:
                if all((s, m) in cells for s in shifts):
                    diffs[m].append(np.mean([cells[(s, m)]["test_acc"] for s in shifts]) - base)
            blocks = [m for m in TABLE_BLOCKS if all((s, m) in cells for s in shifts)]
            if blocks:
                best = max(blocks, key=lambda m: np.mean([cells[(s, m)]["val_acc"] for s in shifts]))
                diffs["best block (val)"].append(
                    np.mean([cells[(s, best)]["test_acc"] for s in shifts]) - base)
        for m, v in diffs.items():
            out[m][n] = mean_se(v)
    # `methods` above is a set, whose order changes with the hash seed: fix one order.
    order = ["best block (val)", *METHOD_ORDER]
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                       else len(order)))


def plot_n_target(curves: dict, path_stem: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4))
    for method, points in sorted(curves.items(), key=lambda kv: kv[0] == "best block (val)"):
        ns = sorted(points)
        mean = [100 * points[n][0] for n in ns]
        half = [t_interval(points[n])[1] for n in ns]  # 95 % t interval over seeds
        se = [0 if math.isnan(h) else 100 * h for h in half]
        # Drawn last and dashed: it often coincides with one block's curve.
        style = (dict(lw=2, color="black", ls="--", zorder=3) if method == "best block (val)"
                 else dict(lw=1.3))
        ax.errorbar(ns, mean, yerr=se, marker="o", capsize=3, label=method, **style)
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("labelled target images n_target (log scale)")
    ax.set_ylabel("test accuracy minus full fine-tuning (points)")
    ax.set_title("fmnist-c: surgical tuning vs full fine-tuning as the target set grows\n"
                 "(mean over seeds; bars: 95 % t interval of the paired difference)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_relative(selected: list[dict], n_target: int, path_stem: Path) -> list[Path]:
    """Figure-2-style bars: accuracy relative to `all` per method, one panel per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows([r for r in selected if r["n_target"] == n_target])
    panels = []
    for label, benchmark, shifts in rows:
        panels.append((label, row_stats(selected, benchmark, shifts, "test_acc", n_target)))
        if benchmark == "fmnist-spurious":
            panels.append((label + ", worst group",
                           row_stats(selected, benchmark, shifts, "worst_group_acc", n_target)))
    if not panels:
        return []
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.9 * cols, 3.1 * nrows), squeeze=False)
    for ax, (label, stats) in zip(axes.flat, panels):
        bar_panel(ax, {m: t_interval(stats[m]["rel"]) for m in stats if m != "all"}, label)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Fashion-MNIST suite: test accuracy relative to full fine-tuning\n"
                 "(blue: one block tuned; grey: baselines; bars: 95 % t interval over seeds, "
                 "none where one seed ran)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path_stem)


CURVE_SHARE = 0.5  # a mean curve is drawn only where at least this share of its runs still go


def learning_curve_panels(epoch_curves: list[dict], selected: list[dict], n_target: int) -> dict:
    """`learning_curves` of every method in the selected rows at `n_target`, one panel per
    benchmark, each method's mean only at the epochs that at least half its runs reached."""
    return learning_curves(epoch_curves, selected, lambda r: f"{r['benchmark']} ({KIND[r['benchmark']]})"
                           if r["n_target"] == n_target and r["benchmark"] in KIND else None,
                           min_share=CURVE_SHARE)


def curve_lines(panels: dict) -> dict[str, list[dict]]:
    """panel -> one line per method it holds (all of them, in the table's order): the
    method, its points in %, and a style whose label gives the number of runs averaged
    (they differ: lp-ft and auto-rgn may run on fewer seeds). Colours are fixed per
    method across panels; `all` is thick black, single blocks solid, the others dashed."""
    methods = _table_order({m for lines in panels.values() for m in lines})
    colour = {m: f"C{i}" for i, m in enumerate(m for m in methods if m != "all")}
    out = {}
    for panel, lines in panels.items():
        out[panel] = [dict(method=m, x=[p[0] for p in lines[m]], y=[100 * p[1] for p in lines[m]],
                           style=dict(label=_curve_label(m, max(p[2] for p in lines[m])),
                                      **_curve_style(m, colour)))
                      for m in methods if m in lines]
    return out


def _curve_label(method: str, runs: int) -> str:
    return f"{method} ({runs} run{'' if runs == 1 else 's'})"


def _curve_style(method: str, colour: dict) -> dict:
    if method == "all":
        return dict(color="black", lw=2, ls="-", marker="o")
    dashed = method not in TABLE_BLOCKS
    return dict(color=colour[method], lw=1.3, ls="--" if dashed else "-",
                marker="s" if dashed else "o")


def plot_learning_curves(panels: dict, path_stem: Path) -> list[Path]:
    """One panel per row of `learning_curves`, the lines of `curve_lines`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(len(panels), 1))
    nrows = math.ceil(max(len(panels), 1) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, curve_lines(panels).items()):
        for line in lines:
            # markers: a one-epoch curve (the quick suite) is a point, not a line
            ax.plot(line["x"], line["y"], ms=2.5, **line["style"])
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("validation accuracy (%)", fontsize=8)
        # per panel: the run counts differ; see-through, as it may sit on a curve
        ax.legend(fontsize=6, framealpha=0.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("validation accuracy per epoch at each method's chosen learning rate: mean over "
                 "its (shift, seed) runs (legend: how many),\ndrawn only at the epochs that at "
                 f"least {100 * CURVE_SHARE:.0f} % of those runs reached (early stopping ends the others; "
                 "nothing is filled in for them)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def check_suite_folder(out_dir: Path, suite: Suite) -> None:
    """Rows of a benchmark the suite does not run (a plain sweep's results.csv in --out)
    would give an empty table, or one whose header counts their seeds and lrs; refused
    before a run (which would find it only at the summary, hours later) and a summary."""
    for name, benchmarks in (("results.csv", list(suite.shifts)), ("n_target.csv", ["fmnist-c"])):
        path = out_dir / name
        foreign = sorted({r["benchmark"] for r in read_results(path)} - set(benchmarks))
        if foreign:
            raise ResultsError(f"{path} holds rows of {', '.join(foreign)}, which this suite "
                               f"does not write there ({', '.join(benchmarks)}): not a folder "
                               f"of `python -m deep bench`; give another --out (`python -m deep "
                               f"report {path}` tabulates any sweep's results)")


def _check_made_by(rows: list[dict], suite: Suite, path: Path) -> None:
    """The table is drawn at the suite's n_target: rows of another suite (a --quick run's,
    or the full suite's summarised with --quick) would give an empty or wrong table."""
    made = sorted({r["n_target"] for r in rows})
    if suite.n_target in made:
        return
    fits = [name for name, other in SUITES.items() if other.n_target in made]
    hint = (f"; they fit the {fits[0]!r} suite: " + ("add --quick" if fits[0].endswith("-quick")
                                                      else "leave out --quick")) if fits else ""
    raise ResultsError(f"{path} holds rows at n_target {made}, and this suite's table is at "
                       f"n_target {suite.n_target}{hint}")


def summarize(out_dir: Path, suite: Suite) -> list[Path]:
    """table.md and the plots from the CSVs in `out_dir`."""
    if out_dir.is_file():
        raise ConfigError(f"--out {out_dir} is a file; bench's --out is the suite's folder "
                          "(it holds results.csv, table.md and the plots)")
    if not out_dir.is_dir():
        raise ResultsError(f"no results to summarise: {out_dir} does not exist; run "
                           f"`{_run_command(suite, out_dir)}` (without --summarize-only) first")
    with sole_writer(out_dir / "table.md"):  # one summary at a time; a killed one's temps go
        return _summarize(out_dir, suite)


def _run_command(suite: Suite, out_dir: Path) -> str:
    """The command that runs `suite` into `out_dir` (--quick for the quick suite)."""
    name = next(k for k, v in SUITES.items() if v is suite)
    quick = " --quick" if name.endswith("-quick") else ""
    return f"python -m deep bench {name.removesuffix('-quick')}{quick} --out {out_dir}"


def _summarize(out_dir: Path, suite: Suite) -> list[Path]:
    check_suite_folder(out_dir, suite)
    rows = read_results(out_dir / "results.csv")
    if not rows:
        raise ResultsError(f"no results in {out_dir / 'results.csv'} to summarise: run "
                           f"`{_run_command(suite, out_dir)}` (without --summarize-only) first")
    _check_made_by(rows, suite, out_dir / "results.csv")
    sweep_rows = n_sweep_rows(out_dir, suite)
    # before anything is drawn: a table of two protocols would pick lrs across them
    check_one_protocol(rows, out_dir / "results.csv")
    check_one_protocol(sweep_rows, f"{out_dir / 'n_target.csv'} (with the main table's cells)")
    main = select_learning_rates(drop_superseded(rows, suite.lr_seeds or []))
    epoch_curves = read_curves(out_dir / "curves.csv")
    text, verdicts = markdown_table(main, suite.n_target)
    paths = plot_relative(main, suite.n_target, out_dir / "relative_accuracy")
    if not paths:   # a plot with nothing to show this time goes: an older one shows other data
        remove_figure(out_dir / "relative_accuracy")
    sweep_selected = select_learning_rates(drop_superseded(sweep_rows, suite.lr_seeds or []))
    curves = n_target_rows(sweep_selected)
    if curves:
        paths += plot_n_target(curves, out_dir / "n_target")
    else:
        remove_figure(out_dir / "n_target")
    if epoch_curves:
        panels = learning_curve_panels(epoch_curves, main, suite.n_target)
        paths += plot_learning_curves(panels, out_dir / "learning_curves")
    else:
        remove_figure(out_dir / "learning_curves")
    lines = ["# Fashion-MNIST suite: measured", "",
             " ".join(protocol_lines(rows, epoch_curves, suite.n_target)), "",
             text, *interval_table(main, suite.n_target), *grid_table(rows, main, suite.n_target),
             "Per row:", "", *verdict_lines(verdicts), ""]
    if curves:
        sizes = sorted({n for pts in curves.values() for n in pts})
        lines += ["fmnist-c, test accuracy minus `all` (points) against n_target "
                  f"({', '.join(suite.n_sweep_shifts)}): mean over seeds [95 % t interval of "
                  "the paired difference]:", "",
                  "| method | " + " | ".join(str(n) for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for method, pts in curves.items():
            lines.append(f"| {method} | " + " | ".join(format_interval(t_interval(pts[n]))
                                                      if n in pts else "-" for n in sizes) + " |")
        lines += ["", *n_target_grid_table(sweep_rows, sweep_selected)]
    table = out_dir / "table.md"
    atomic_write_bytes(table, lambda f: f.write("\n".join(lines).encode()))
    return [table, *paths]


# --- command line -----------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("suite", choices=["fmnist"], help="which suite (fmnist: the Fashion-MNIST shifts)")
    p.add_argument("--out", help=f"output folder (default {SUITES['fmnist'].out}, or "
                   "runs/fmnist-quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="pipeline smoke test: 1 seed, 1 epoch, 200 target images")
    p.add_argument("--workers", type=int, help="parallel processes on this machine (default "
                   f"{SUITES['fmnist'].workers}, {SUITES['fmnist-quick'].workers} with --quick; "
                   "not with --backend ray)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $FASHION_MNIST_DIR, "
                   "then /usr/share/datasets/fashion-mnist)")
    p.add_argument("--summarize-only", action="store_true",
                   help="only rebuild table.md and the plots from the CSVs")
    p.add_argument("--no-progress", action="store_true")
    # --device cpu: the device of the committed tables (make deep pins it)
    add_run_options(p, engine_default(TrainConfig, "cache_mb"))
    add_backend_arguments(p)  # --backend ray: the suite's sweeps as Ray tasks
    # what --summarize-only refuses when changed from these (it runs nothing)
    p.set_defaults(run_option_defaults={dest: p.get_default(dest) for dest in RUN_OPTIONS})


RUN_OPTIONS = {"workers": "--workers", "data_dir": "--data-dir", "device": "--device",
               "amp": "--amp", "cache_mb": "--cache-mb", "backend": "--backend",
               "ray_address": "--ray-address", "gpus_per_task": "--gpus-per-task",
               "cpus_per_task": "--cpus-per-task"}


def run_benchmark(protocol: Protocol, suite: Suite, results: Path, curves: CurvesFile,
                  **sweep_options) -> None:
    """One benchmark of the suite into `results` (and its epochs into `curves`): in two
    stages when the suite has lr_seeds, else one sweep. Prints one line when done."""
    if suite.lr_seeds:
        summaries = run_two_stage(protocol, results, suite.lr_seeds, suite.seeds_for,
                                  on_row=curves.record, extend=suite.extend_lr_grid,
                                  **sweep_options)
    else:
        summaries = [run_sweep(protocol, results, on_row=curves.record, **sweep_options)]
    # the file's rows, not the plans' skipped cells: a two-stage rerun does not plan the lr
    # steps it added before again, so "skipped" would undercount a finished file
    rows = sum(r["benchmark"] == protocol.benchmark and r["n_target"] == protocol.n_target
               for r in read_results(results))
    print(f"{protocol.benchmark} n_target={protocol.n_target}: ran {sum(s.ran for s in summaries)} "
          f"cells in {sum(s.seconds for s in summaries):.0f} s; complete: {rows} rows in {results}",
          flush=True)


def check_data_folder(data_dir: str | None) -> None:
    """A --data-dir that is not a folder is refused before --out is made (the first sweep
    would find it, after an empty results folder was left behind)."""
    problem = data_dir and folder_problem(Path(data_dir).expanduser())
    if problem:
        raise ConfigError(f"--data-dir {data_dir} {problem}; give the folder that holds the "
                          "Fashion-MNIST files (docs/fmnist.md)")


def run(args) -> int:
    name = args.suite + ("-quick" if args.quick else "")
    suite = SUITES[name]
    out_dir = Path(args.out or ("runs/fmnist-quick" if args.quick else suite.out))
    if args.summarize_only:
        given = [flag for dest, flag in RUN_OPTIONS.items()
                 if getattr(args, dest) != args.run_option_defaults[dest]]
        if given:
            raise ConfigError(f"--summarize-only runs nothing, so {', '.join(given)} would have "
                              f"no effect: leave {'it' if len(given) == 1 else 'them'} out, or "
                              "drop --summarize-only")
    else:
        jobs = [(p, "results.csv", "curves.csv") for p in main_protocols(suite)]
        jobs += [(p, "n_target.csv", "n_target_curves.csv") for p in n_sweep_protocols(suite)]
        # every flag checked before the folder is made or Ray starts
        executor = executor_from_args(args)
        workers = check_int("--workers", suite.workers if args.workers is None else args.workers)
        if executor is None:
            resolve_device(args.device)
            check_data_folder(args.data_dir)
        else:  # the folder is the nodes' to see (checked on each when Ray connects)
            executor.check_options(args.device)
        out_dir = check_output(out_dir, "--out", folder=True)  # "~" expanded once
        check_suite_folder(out_dir, suite)
        with session_for(executor):  # one Ray connection for all the suite's sweeps
            for protocol, results, curves in jobs:
                # held across the two stages, and before the curves file is read
                with sole_writer(out_dir / results):
                    remove_stale_temps(out_dir / curves)  # a killed run's (the lock is held)
                    run_benchmark(protocol, suite, out_dir / results, CurvesFile(out_dir / curves),
                                  data_dir=args.data_dir, workers=workers,
                                  device=args.device, amp=args.amp, cache_mb=args.cache_mb,
                                  progress=not args.no_progress, executor=executor)
    for path in summarize(out_dir, suite):
        print(path)
    return 0
