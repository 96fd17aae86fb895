"""Usage: python scripts/fmnist_cap_check.py [--results CSV] [--out-dir DIR] [--factor F]
                                           [--baseline METHOD] [--workers W]

Did the epoch cap cut off a row of the committed Fashion-MNIST table? Finds every
(benchmark, shift, method, n_target) of the committed results where a seed's chosen run
ended at the cap (validation still improving there), and reruns that row here, each seed at
its chosen learning rate, three ways: at the cap, at `factor` times the cap (same patience),
and the baseline method (`all`) at its own chosen rates and cap. All three run on this
machine, since another CPU picks other kernels (docs/fmnist.md, "Same seed, same numbers").
Prints each seed's best epoch and test metric, and paired differences over seeds (95 % t
intervals): longer cap minus cap, and each minus the baseline; last, each rerun at its
committed run's own settings beside that run, bit for bit ("identical to the committed rows:
k of N"; on another kind of CPU some differ by design). Runs go to
DIR/epochs-<E>.csv, resumed like any sweep; the committed ones (figures/fmnist-v2/cap-check/)
print without running anything.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script below
from fmnist_reproduce import protocol_for  # noqa: E402  (shared with the rerun check)

from deep.report import select_learning_rates, test_metric_name  # noqa: E402
from deep.results import outcome_differences, read_results, row_key  # noqa: E402
from deep.stats import format_interval, mean_se, t_interval  # noqa: E402
from deep.sweep import machine, run_sweep  # noqa: E402

COMMITTED = "figures/fmnist-v2/results.csv"


def table_row(r: dict) -> tuple:
    """The table row a run belongs to: (benchmark, shift, method, n_target)."""
    return r["benchmark"], r["shift"], r["method"], r["n_target"]


def rows_at_cap(selected: list[dict]) -> list[tuple]:
    """`table_row` of every row where a seed's chosen run ended at its cap (best epoch =
    last allowed epoch), sorted."""
    return sorted({table_row(r) for r in selected if r["best_epoch"] >= r["epochs"]}, key=str)


def of_method(rows: list[dict], key: tuple, method: str) -> dict[int, dict]:
    """seed -> the run of `method` among `rows` in the table row `key`, whatever its method."""
    wanted = (*key[:2], method, key[3])
    return {r["seed"]: r for r in rows if table_row(r) == wanted}


def rerun(by_seed: dict[int, dict], epochs: int, out_dir: Path, workers: int) -> Path:
    """Run every seed of one row at its chosen lr with `epochs` as the cap; seeds that share
    a learning rate run as one sweep (in parallel over `workers`)."""
    out = out_dir / f"epochs-{epochs}.csv"
    by_lr = defaultdict(list)
    for seed, row in sorted(by_seed.items()):
        by_lr[row["lr"]].append(row)
    for lr, rows in sorted(by_lr.items()):
        protocol = protocol_for(rows[0]).replace(seeds=[r["seed"] for r in rows], epochs=epochs)
        print(f"  {protocol.benchmark} {protocol.shifts[0]} {protocol.methods[0]} lr {lr:g} "
              f"seeds {protocol.seeds} at most {epochs} epochs -> {out}", flush=True)
        run_sweep(protocol, out, checkpoint=rows[0]["checkpoint"], workers=workers,
                  progress=False, device="cpu")
    return out


def measured(out: Path, key: tuple, method: str, epochs: int) -> dict[int, dict]:
    """seed -> the rerun row of `method` in row `key` with cap `epochs`, from `out`."""
    return of_method([r for r in read_results(out) if r["epochs"] == epochs], key, method)


def paired(a: dict[int, dict], b: dict[int, dict], metric: str) -> str:
    """a - b over the seeds both have, as a 95 % t interval in points."""
    seeds = sorted(a.keys() & b.keys())
    return format_interval(t_interval(mean_se(a[s][metric] - b[s][metric] for s in seeds)))


def report(key: tuple, runs: dict[str, dict[int, dict]], metric: str) -> list[str]:
    """Lines for one row: per seed best epoch and metric under each run, then the paired
    differences. `runs`: label -> seed -> row, in order: the method at its cap, at the
    longer cap, and the baseline at its cap (absent when the row is the baseline's own)."""
    labels = list(runs)
    lines = [f"{' '.join(map(str, key))}: {metric} (%), best epoch / cap in brackets",
             "| seed | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for seed in sorted(set().union(*runs.values())):
        cells = [f"{100 * runs[l][seed][metric]:.1f} ({runs[l][seed]['best_epoch']}/"
                 f"{runs[l][seed]['epochs']})" if seed in runs[l] else "-" for l in labels]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    pairs = [(labels[1], labels[0])] + [(l, labels[2]) for l in labels[:2] if len(labels) > 2]
    lines += [f"{a} - {b}: {paired(runs[a], runs[b], metric)}" for a, b in pairs]
    return lines + [""]


def against_committed(reruns: list[dict], committed: list[dict]) -> list[str]:
    """The reruns at a committed run's own settings beside that run: "same" (bit for bit in
    every column of `ResultRow.OUTCOME`) or what differs, then "identical to the
    committed rows: k of N". On another kind of CPU some differ by design (docs/fmnist.md,
    "Same seed, same numbers")."""
    known = {row_key(r): r for r in committed}
    lines, same = [], 0
    unique = {(row_key(r), r["epochs"]): r for r in reruns}  # a baseline serves two rows
    pairs = [(known[key], r) for (key, epochs), r in unique.items()
             if key in known and known[key]["epochs"] == epochs]
    for old, new in pairs:
        differ = outcome_differences(old, new)
        same += not differ
        lines.append(("same    " if not differ else "differs ") + " ".join(map(str, row_key(new)))
                     + (f": {differ}" if differ else ""))
    return lines + [f"identical to the committed rows: {same} of {len(pairs)}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=COMMITTED, help="committed results (default %(default)s)")
    p.add_argument("--out-dir", default="figures/fmnist-v2/cap-check",
                   help="where the reruns go, one CSV per cap (default %(default)s)")
    p.add_argument("--factor", type=int, default=2, help="longer cap = factor x cap (default 2)")
    p.add_argument("--baseline", default="all", help="method to compare with (default all)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one thread each")
    args = p.parse_args(argv)
    if args.factor < 2 or args.workers < 1:
        raise SystemExit(f"--factor must be at least 2 and --workers at least 1, "
                         f"got {args.factor} and {args.workers}")
    torch.set_num_threads(1)  # as each worker of the committed table
    rows = read_results(args.results)
    selected = select_learning_rates(rows)
    keys = rows_at_cap(selected)
    if not keys:
        print(f"{args.results}: no row's chosen run ended at its cap")
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"this machine: {machine('cpu')}")
    lines, reruns = [], []
    for key in keys:
        method, metric = key[2], test_metric_name([r for r in selected if r["benchmark"] == key[0]])
        ours, theirs = of_method(selected, key, method), of_method(selected, key, args.baseline)
        if not theirs:
            raise SystemExit(f"{args.results}: row {key} has no {args.baseline!r} runs to "
                             "compare with (--baseline names another method)")
        cap = max(r["epochs"] for r in ours.values())
        their_cap = max(r["epochs"] for r in theirs.values())
        ended = [s for s, r in sorted(ours.items()) if r["best_epoch"] >= r["epochs"]]
        print(f"{' '.join(map(str, key))}: chosen at the cap ({cap}) on seeds {ended}", flush=True)
        plan = {f"{method}, cap {cap}": (ours, cap),
                f"{method}, cap {args.factor * cap}": (ours, args.factor * cap)}
        if method != args.baseline:
            plan[f"{args.baseline}, cap {their_cap}"] = (theirs, their_cap)
        runs = {}
        for label, (by_seed, epochs) in plan.items():
            out = rerun(by_seed, epochs, out_dir, args.workers)
            runs[label] = measured(out, key, next(iter(by_seed.values()))["method"], epochs)
            reruns += runs[label].values()
        lines += report(key, runs, metric)
    print("\n" + "\n".join(lines + against_committed(reruns, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
