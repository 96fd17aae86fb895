"""Usage: python scripts/compare_results.py OLD.csv NEW.csv

Are two results CSVs of the same cells the same numbers? For every cell (row key) in
both files: whether status, best epoch, validation, test and worst-group accuracies are
equal bit for bit. Prints the counts, per benchmark, and the first differing cells.
Used to check that a rerun of the converged Fashion-MNIST suite with the final engine
reproduces the committed rows (docs/fmnist.md)."""
from __future__ import annotations

import sys
from collections import Counter

from deep.results import outcome_differences, read_results, row_key


def compare(old_rows: list[dict], new_rows: list[dict], shown: int = 10) -> list[str]:
    """The report's lines: cell counts, identical cells per benchmark and in all, and the
    first `shown` cells whose outcome differs (`deep.results.outcome_differences`)."""
    old = {row_key(r): r for r in old_rows}
    new = {row_key(r): r for r in new_rows}
    shared = sorted(set(old) & set(new), key=str)
    same, total, differ = Counter(), Counter(), {}
    for key in shared:
        total[key[0]] += 1
        if pairs := outcome_differences(old[key], new[key]):
            differ[key] = pairs
        else:
            same[key[0]] += 1
    lines = [f"cells: {len(old)} old, {len(new)} new, {len(shared)} in both; "
             f"only old {len(set(old) - set(new))}, only new {len(set(new) - set(old))}"]
    lines += [f"  {b}: {same[b]} of {total[b]} identical" for b in sorted(total)]
    lines.append(f"identical: {sum(same.values())} of {len(shared)}")
    lines += [f"  differs: {key} {pairs}" for key, pairs in list(differ.items())[:shown]]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    print("\n".join(compare(read_results(argv[0]), read_results(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
