"""The Fashion-MNIST suite end to end: `python -m deep bench fmnist [--quick]`.

Two sweeps (resumable: rerun the same command after an interruption), then the
summaries, all written to --out (default `figures/fmnist/`):

    results.csv                 main table: every method on every benchmark, 3 seeds
    n_target.csv                fmnist-c: single blocks and `all` at n_target 100..3000
    table.md                    the measured "best block per shift" table (markdown)
    relative_accuracy.png/.pdf  accuracy relative to full fine-tuning, per benchmark
    n_target.png/.pdf           accuracy relative to `all` against n_target

The suite (`SUITES`) is sized for a 2-core CPU machine (docs/fmnist.md has its
measured time); `--quick` is a pipeline smoke test whose numbers mean nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .blocks import blocks_for
from .files import atomic_write_bytes
from .methods import GENERIC_METHODS
from .protocol import Protocol, load_protocol
from .ray_backend import add_backend_arguments, executor_from_args, session_for
from .report import (METHOD_ORDER, bar_panel, format_stat, mean_se, save_figure,
                     select_learning_rates)
from .report import summarize as summarize_tables
from .sweep import read_results, run_sweep

HELP = "run a whole benchmark suite (the Fashion-MNIST shifts) and write its table and plots"

TABLE_BLOCKS = tuple(blocks_for("resnet26"))  # the suite tunes resnet26: its single blocks
SINGLE_RUN = GENERIC_METHODS  # the methods that are one run each, not one block
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
    lrs: list[float]
    epochs: int
    n_target: int = 1000
    test_per_class: int | None = None
    n_sweep_shifts: list[str] = field(default_factory=list)
    n_sweep_sizes: list[int] = field(default_factory=list)
    n_sweep_methods: list[str] = field(default_factory=lambda: [*TABLE_BLOCKS, "all"])


SUITES = {
    # Sized for a 2-core machine with --workers 2 (docs/fmnist.md has the measured
    # time): a noise, a blur and a weather corruption; 4 epochs; 2 lrs.
    "fmnist": Suite(
        shifts={"fmnist-c": ["gaussian_noise", "defocus_blur", "fog"],
                "fmnist-breeds": ["subpopulation"], "fmnist-flip": ["flip"],
                "fmnist-spurious": ["balanced"],
                "fmnist-blocknoise": ["first", "second", "third"]},
        seeds=[0, 1, 2], lrs=[1e-2, 1e-3], epochs=4,
        n_sweep_shifts=["gaussian_noise"], n_sweep_sizes=[100, 300, 1000, 3000],
        n_sweep_methods=["first", "last", "all"]),
    "fmnist-quick": Suite(
        shifts={"fmnist-c": ["gaussian_noise"], "fmnist-breeds": ["subpopulation"],
                "fmnist-flip": ["flip"], "fmnist-spurious": ["balanced"],
                "fmnist-blocknoise": ["first"]},
        seeds=[0], lrs=[1e-3], epochs=1, n_target=200, test_per_class=20,
        n_sweep_shifts=["gaussian_noise"], n_sweep_sizes=[100, 300],
        n_sweep_methods=["first", "all"]),
}


def main_protocols(suite: Suite) -> list[Protocol]:
    """One protocol per benchmark of the main table: its config, the suite's settings."""
    out = []
    for benchmark, shifts in suite.shifts.items():
        base = load_protocol(benchmark)
        out.append(base.replace(shifts=shifts, seeds=suite.seeds, lrs=suite.lrs,
                                epochs=suite.epochs, n_target=suite.n_target,
                                test_per_class=suite.test_per_class))
    return out


def n_sweep_protocols(suite: Suite) -> list[Protocol]:
    """fmnist-c at each n_target of the sweep, except the main table's own n_target,
    whose cells the main table already has (`n_sweep_rows` takes them from there)."""
    base = load_protocol("fmnist-c")
    return [base.replace(shifts=suite.n_sweep_shifts, seeds=suite.seeds, lrs=suite.lrs,
                         epochs=suite.epochs, n_target=n, methods=suite.n_sweep_methods,
                         test_per_class=suite.test_per_class)
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


def ranks(per_row: list[dict[str, dict]], methods: tuple[str, ...]) -> dict[str, float]:
    """Average rank (1 = best mean accuracy) of `methods` over the table's rows."""
    total = defaultdict(list)
    for stats in per_row:
        present = [m for m in methods if m in stats and stats[m]["abs"][2] > 0]
        order = sorted(present, key=lambda m: -stats[m]["abs"][0])
        for rank, m in enumerate(order, start=1):
            total[m].append(rank)
    return {m: float(np.mean(v)) for m, v in total.items()}


def markdown_table(selected: list[dict], n_target: int) -> tuple[str, list]:
    """The main table (accuracy relative to `all`, and absolute) and a verdict per row."""
    rows = table_rows([r for r in selected if r["n_target"] == n_target])
    if not rows:
        return "", []
    per_row, lines, verdicts = [], [], []
    methods = None
    for label, benchmark, shifts in rows:
        stats = row_stats(selected, benchmark, shifts, "test_acc", n_target)
        per_row.append(stats)
        methods = methods or list(stats)
    header = "| benchmark (shift kind) | " + " | ".join(methods) + " | best block |"
    rule = "|---|" + "---|" * (len(methods) + 1)

    def block_line(stats, label, kind):
        blocks = [m for m in TABLE_BLOCKS if m in stats and stats[m]["abs"][2] > 0]
        best = max(blocks, key=lambda m: stats[m]["abs"][0]) if blocks else "-"
        cells = [format_stat(stats[m]["rel"], signed=True) if m != "all" else format_stat(stats[m]["abs"])
                 for m in methods]
        return f"| {label} ({kind}) | " + " | ".join(cells) + f" | {best} |", best

    lines += ["Test accuracy relative to full fine-tuning (`all`, whose own accuracy is shown), "
              "in points: mean ± standard error over seeds.", "", header, rule]
    for (label, benchmark, shifts), stats in zip(rows, per_row):
        line, best = block_line(stats, label, KIND[benchmark])
        lines.append(line)
        expected = EXPECTED.get(benchmark) or shifts[0]
        beats_all = best != "-" and stats[best]["rel"][0] > 0
        verdicts.append((label, KIND[benchmark], expected, best, beats_all,
                         stats[best]["rel"] if best != "-" else None))
    spurious = [(label, b, s) for label, b, s in rows if b == "fmnist-spurious"]
    for label, benchmark, shifts in spurious:
        stats = row_stats(selected, benchmark, shifts, "worst_group_acc", n_target)
        line, _ = block_line(stats, label + ", worst group", KIND[benchmark])
        lines.append(line)
    # A mean over corruptions can hide which block wins each one, so show each.
    for label, benchmark, shifts in rows:
        for shift in shifts if len(shifts) > 1 else []:
            stats = row_stats(selected, benchmark, [shift], "test_acc", n_target)
            line, _ = block_line(stats, f"{benchmark}: {shift}", KIND[benchmark])
            lines.append(line)
    lines += ["", "Absolute test accuracy (%):", "",
              "| benchmark | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for (label, _, _), stats in zip(rows, per_row):
        lines.append(f"| {label} | " + " | ".join(format_stat(stats[m]["abs"]) if m in stats else "-"
                                                 for m in methods) + " |")
    avg = dict(sorted(ranks(per_row, SINGLE_RUN).items(), key=lambda kv: kv[1]))
    lines += ["", "Average rank of the single-run methods over the rows above (1 = best; the "
              "paper reports Auto-RGN 1.29, full fine-tuning 2.71):", "",
              "| " + " | ".join(avg) + " |", "|" + "---|" * len(avg),
              "| " + " | ".join(f"{v:.2f}" for v in avg.values()) + " |"]
    return "\n".join(lines) + "\n", verdicts


def verdict_lines(verdicts) -> list[str]:
    out = []
    for label, kind, expected, best, beats_all, rel in verdicts:
        same = "as the paper's pattern predicts" if best == expected else \
            f"the pattern predicts {expected}"
        gain = format_stat(rel, signed=True) if rel else "-"
        out.append(f"- {label} ({kind}): best block **{best}** ({gain} points vs all), {same}; "
                   f"{'it beats' if beats_all else 'it does not beat'} full fine-tuning.")
    return out


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
        se = [0 if math.isnan(points[n][1]) else 100 * points[n][1] for n in ns]
        # Drawn last and dashed: it often coincides with one block's curve.
        style = (dict(lw=2, color="black", ls="--", zorder=3) if method == "best block (val)"
                 else dict(lw=1.3))
        ax.errorbar(ns, mean, yerr=se, marker="o", capsize=3, label=method, **style)
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("labelled target images n_target (log scale)")
    ax.set_ylabel("test accuracy minus full fine-tuning (points)")
    ax.set_title("fmnist-c: surgical tuning vs full fine-tuning as the target set grows")
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
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.9 * cols, 3.1 * nrows), squeeze=False)
    for ax, (label, stats) in zip(axes.flat, panels):
        bar_panel(ax, {m: stats[m]["rel"] for m in stats if m != "all"}, label)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Fashion-MNIST suite: test accuracy relative to full fine-tuning "
                 "(blue: one block tuned; grey: baselines; ± s.e. over seeds)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def summarize(out_dir: Path, suite: Suite) -> list[Path]:
    """table.md and the two plots from the CSVs in `out_dir`."""
    main = select_learning_rates(read_results(out_dir / "results.csv"))
    text, verdicts = markdown_table(main, suite.n_target)
    paths = plot_relative(main, suite.n_target, out_dir / "relative_accuracy")
    curves = n_target_rows(select_learning_rates(n_sweep_rows(out_dir, suite)))
    if curves:
        paths += plot_n_target(curves, out_dir / "n_target")
    lines = ["# Fashion-MNIST suite: measured", "",
             f"Seeds {suite.seeds}, learning rates {suite.lrs} (picked per cell by validation), "
             f"{suite.epochs} epochs (picked by validation), n_target = {suite.n_target}.", "",
             text, "Per row:", "", *verdict_lines(verdicts), ""]
    if curves:
        sizes = sorted({n for pts in curves.values() for n in pts})
        lines += ["fmnist-c, test accuracy minus `all` (points) against n_target "
                  f"({', '.join(suite.n_sweep_shifts)}):", "",
                  "| method | " + " | ".join(str(n) for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for method, pts in curves.items():
            lines.append(f"| {method} | " + " | ".join(format_stat(pts[n], signed=True) if n in pts
                                                      else "-" for n in sizes) + " |")
        lines.append("")
    table = out_dir / "table.md"
    atomic_write_bytes(table, lambda f: f.write("\n".join(lines).encode()))
    return [table, *paths]


# --- command line -----------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("suite", choices=["fmnist"], help="which suite (fmnist: the Fashion-MNIST shifts)")
    p.add_argument("--out", help="output folder (default figures/fmnist, or runs/fmnist-quick "
                   "with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="pipeline smoke test: 1 seed, 1 epoch, 200 target images")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $FASHION_MNIST_DIR, "
                   "then /usr/share/datasets/fashion-mnist)")
    p.add_argument("--summarize-only", action="store_true",
                   help="only rebuild table.md and the plots from the CSVs")
    p.add_argument("--no-progress", action="store_true")
    add_backend_arguments(p)  # --backend ray: the suite's sweeps as Ray tasks (--workers unused)


def run(args) -> int:
    name = args.suite + ("-quick" if args.quick else "")
    suite = SUITES[name]
    out_dir = Path(args.out or ("runs/fmnist-quick" if args.quick else "figures/fmnist"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        jobs = [(p, out_dir / "results.csv") for p in main_protocols(suite)]
        jobs += [(p, out_dir / "n_target.csv") for p in n_sweep_protocols(suite)]
        executor = executor_from_args(args)
        with session_for(executor):  # one Ray connection for all the suite's sweeps
            for protocol, csv_path in jobs:
                summary = run_sweep(protocol, csv_path, data_dir=args.data_dir,
                                    workers=args.workers, progress=not args.no_progress,
                                    executor=executor)
                print(f"{protocol.benchmark} n_target={protocol.n_target}: ran {summary.ran}, "
                      f"skipped {summary.skipped}, {summary.seconds:.0f} s", flush=True)
    for path in summarize(out_dir, suite):
        print(path)
    return 0
