"""Usage: python scripts/fmnist_v1_rerun.py METHODS OUT.csv

Rerun cells of the older 4-epoch Fashion-MNIST table (figures/fmnist/results.csv, made
2026-11-27) with the current engine, for the comma-separated METHODS, each method alone
in its task groups; then compare with `python scripts/compare_results.py
figures/fmnist/results.csv OUT.csv`. That table's settings: 4 epochs, lrs 1e-2 and 1e-3,
no early stopping, n_target 1000, 10 / 90 validation / test images per class, seeds 0-2
(docs/fmnist.md, "Same seed, same numbers"). Resumes like any sweep."""
import csv
import dataclasses
import sys
from collections import defaultdict

from deep.protocol import load_protocol
from deep.sweep import run_sweep

if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
methods, out = sys.argv[1].split(","), sys.argv[2]
cells = defaultdict(set)
for row in csv.DictReader(open("figures/fmnist/results.csv")):
    if row["method"] in methods:
        cells[(row["benchmark"], row["shift"])].add((row["method"], int(row["seed"]), float(row["lr"])))
for (benchmark, shift), todo in sorted(cells.items()):
    for method in sorted({m for m, _, _ in todo}):
        mine = {(s, lr) for m, s, lr in todo if m == method}
        protocol = load_protocol(benchmark).replace(
            methods=[method], epochs=4, shifts=[shift], n_target=1000, val_per_class=10,
            test_per_class=90, seeds=sorted({s for s, _ in mine}),
            lrs=sorted({lr for _, lr in mine}, reverse=True))
        # the old engine had no early stopping (replace() skips None values)
        protocol = dataclasses.replace(protocol, tuning=dataclasses.replace(protocol.tuning,
                                                                            patience=None))
        print(benchmark, shift, method, flush=True)
        run_sweep(protocol, out, workers=1, progress=False)
