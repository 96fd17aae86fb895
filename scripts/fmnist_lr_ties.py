"""Usage: python scripts/fmnist_lr_ties.py [CSV ...]

Seed-0 cells of the converged Fashion-MNIST suite whose validation metric (accuracy, or
worst-group accuracy where a row's `select` says so) ties between the chosen learning rate
and the grid's smallest or largest one. Ties go to the larger rate (`deep.results.best_row`,
which the report picks by); with the other rule these cells would sit at the grid's edge
(docs/fmnist.md, "Protocol and why")."""
import sys
from collections import defaultdict

from deep.results import best_row, read_results, selection_metric

for path in sys.argv[1:] or ["figures/fmnist-v2/results.csv", "figures/fmnist-v2/n_target.csv"]:
    cells = defaultdict(list)
    for row in read_results(path):
        if row["seed"] == 0:
            cells[(row["benchmark"], row["shift"], row["method"], row["n_target"])].append(row)
    for key, rows in sorted(cells.items(), key=str):
        chosen = best_row(rows)
        if chosen is None:
            continue
        grid = sorted(r["lr"] for r in rows)
        ties = sorted(r["lr"] for r in rows if selection_metric(r) == selection_metric(chosen))
        if len(ties) > 1 and {grid[0], grid[-1]} & set(ties):
            print(f"{path}: {key}: chosen {chosen['lr']:g}, tied {[f'{t:g}' for t in ties]}, "
                  f"grid {grid[0]:g}..{grid[-1]:g}")
