"""Usage: python scripts/compare_results.py OLD.csv NEW.csv

Are two results CSVs of the same cells the same numbers? For every cell (row key) in
both files: whether status, best epoch, validation, test and worst-group accuracies are
equal bit for bit. Prints the counts, per benchmark, and the first differing cells.
Used to check that a rerun of the converged Fashion-MNIST suite with the final engine
reproduces the committed rows (docs/fmnist.md)."""
import sys
from collections import Counter

from deep.results import read_results, row_key

METRICS = ("status", "best_epoch", "val_acc", "val_worst_group_acc", "test_acc", "worst_group_acc")

if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
old = {row_key(r): r for r in read_results(sys.argv[1])}
new = {row_key(r): r for r in read_results(sys.argv[2])}
shared = sorted(set(old) & set(new), key=str)
same, total, differ = Counter(), Counter(), []
for key in shared:
    total[key[0]] += 1
    if all(old[key][m] == new[key][m] for m in METRICS):
        same[key[0]] += 1
    else:
        differ.append(key)
print(f"cells: {len(old)} old, {len(new)} new, {len(shared)} in both; "
      f"only old {len(set(old) - set(new))}, only new {len(set(new) - set(old))}")
for benchmark in sorted(total):
    print(f"  {benchmark}: {same[benchmark]} of {total[benchmark]} identical")
print(f"identical: {sum(same.values())} of {len(shared)}")
for key in differ[:10]:
    print("  differs:", key, {m: (old[key][m], new[key][m]) for m in METRICS
                             if old[key][m] != new[key][m]})
