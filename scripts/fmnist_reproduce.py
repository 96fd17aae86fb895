"""Usage: python scripts/fmnist_reproduce.py [--cells N] [--seed S] [--threads T]
                                           [--out CSV] [--results CSV ...]

Does this checkout, on this machine, reproduce the committed Fashion-MNIST table? Reruns
N cells drawn at random (seeded; the benchmarks in turn) from the committed results
(figures/fmnist-v2/results.csv and n_target.csv), each alone, with the settings its row
records (epochs, patience, batch size, weight decay, split sizes, source model), and compares status, best epoch and every
accuracy bit for bit. Prints one line per cell and "identical: k of N"; exits 1 when a cell
differs. The same seed gives the same numbers on the same kind of CPU only (another CPU
picks other oneDNN kernels: docs/fmnist.md, "Same seed, same numbers"), so a difference on
another machine is expected; on the machine that made the table it means the engine
changed. --out (default runs/fmnist-reproduce.csv) resumes like any sweep.
"""
import argparse
import random
import sys
from pathlib import Path

import torch

from deep.protocol import load_protocol
from deep.results import outcome_differences, read_results, row_key
from deep.sweep import machine, run_sweep

COMMITTED = ["figures/fmnist-v2/results.csv", "figures/fmnist-v2/n_target.csv"]
# What a row records and the rerun takes from it, rather than from today's protocol file.
ROW_SETTINGS = ("epochs", "batch_size", "weight_decay", "select", "val_per_class",
                "test_per_class", "patience")


def draw_cells(rows: list[dict], n: int, seed: int) -> list[dict]:
    """n distinct cells, the same for the same seed and files, taken from the benchmarks in
    turn (fmnist-c has most of the rows; a plain sample would seldom reach the others)."""
    if n < 1:
        raise SystemExit(f"--cells must be at least 1, got {n}")
    rng = random.Random(seed)
    by_benchmark = {}
    for key, row in sorted({row_key(r): r for r in rows}.items(), key=lambda kv: str(kv[0])):
        by_benchmark.setdefault(row["benchmark"], []).append(row)
    queues = [rng.sample(cells, len(cells)) for _, cells in sorted(by_benchmark.items())]
    drawn = []
    while len(drawn) < n and any(queues):
        drawn += [q.pop() for q in queues if q][:n - len(drawn)]
    return drawn


def protocol_for(row: dict):
    """The protocol that runs exactly this row's cell with the settings it records."""
    base = load_protocol(row["benchmark"])
    if base.arch != row["arch"]:
        raise SystemExit(f"{row['benchmark']}: the protocol's arch is {base.arch}, the row's "
                         f"{row['arch']}; this row was made under another protocol")
    return base.replace(methods=[row["method"]], shifts=[row["shift"]], seeds=[row["seed"]],
                        lrs=[row["lr"]], n_target=row["n_target"],
                        **{k: row[k] for k in ROW_SETTINGS})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=12, help="how many cells to rerun (default 12)")
    p.add_argument("--seed", type=int, default=0, help="which cells (default 0)")
    p.add_argument("--results", nargs="+", default=COMMITTED,
                   help="committed results CSVs to draw from (default: %(default)s)")
    p.add_argument("--out", default="runs/fmnist-reproduce.csv", help="rerun results (resumed)")
    # `make deep` ran two workers on two cores, one torch thread each; the thread count
    # changes the kernels' summation order, so a rerun uses as many as the table did.
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as each worker of the committed table)")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    rows = [r for path in args.results for r in read_results(path)]
    cells = draw_cells(rows, args.cells, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"this machine: {machine('cpu')}")
    for i, row in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {row['benchmark']} {row['shift']} {row['method']} "
              f"seed {row['seed']} n {row['n_target']} lr {row['lr']:g}", flush=True)
        run_sweep(protocol_for(row), args.out, checkpoint=row["checkpoint"], workers=1,
                  progress=False, device="cpu")
    rerun = {row_key(r): r for r in read_results(args.out)}
    same = 0
    for row in cells:
        new = rerun[row_key(row)]
        differ = outcome_differences(row, new)
        same += not differ
        print(("  same   " if not differ else "  DIFFERS") + f" {row_key(row)} "
              f"(committed at {row.get('commit') or 'unknown commit'})"
              + (f": {differ}" if differ else ""))
    print(f"identical: {same} of {len(cells)}")
    return 0 if same == len(cells) else 1


if __name__ == "__main__":
    sys.exit(main())
