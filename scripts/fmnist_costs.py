"""The Fashion-MNIST suite's costs that docs/fmnist.md quotes, from the committed rows.

    python scripts/fmnist_costs.py [--wall-minutes 124.6]

1. Seconds per epoch per method in the 4-epoch table (figures/fmnist/results.csv, the
   `seconds` column over `epochs`): what the converged protocol's budget was estimated from.
2. Worker-seconds per benchmark of the converged suite (figures/fmnist-v2/results.csv and
   n_target.csv), and what all 15 fmnist-c corruptions would cost instead of its 6: its
   rows' seconds scaled by 15/6, and the measured wall time scaled by the same ratio.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
ALL_CORRUPTIONS = 15


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def seconds_per_epoch(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """method -> (mean, min, max) of seconds / epochs over its rows, in first-seen order."""
    per = defaultdict(list)
    for row in rows:
        per[row["method"]].append(float(row["seconds"]) / int(row["epochs"]))
    return {m: (sum(v) / len(v), min(v), max(v)) for m, v in per.items()}


def worker_seconds(rows: list[dict]) -> dict[str, float]:
    total = defaultdict(float)
    for row in rows:
        total[row["benchmark"]] += float(row["seconds"])
    return dict(total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wall-minutes", type=float, default=124.6,
                   help="the suite's measured wall time (docs/fmnist.md: 85.5 min after the "
                        "fmnist-flip rerun, plus 39.1 for LP-FT's and Auto-RGN's seeds 1-4)")
    args = p.parse_args(argv)

    print("seconds per epoch, figures/fmnist/results.csv (mean, min-max over rows):")
    for method, (mean, low, high) in seconds_per_epoch(read(FIGURES / "fmnist/results.csv")).items():
        print(f"  {method:<20} {mean:.2f}  ({low:.2f}-{high:.2f})")

    v2 = FIGURES / "fmnist-v2"
    main_table = worker_seconds(read(v2 / "results.csv"))
    n_target = sum(float(r["seconds"]) for r in read(v2 / "n_target.csv"))
    total = sum(main_table.values()) + n_target
    print("worker-seconds, figures/fmnist-v2 (the rows' `seconds`):")
    for benchmark, seconds in main_table.items():
        print(f"  {benchmark:<20} {seconds:,.0f}")
    print(f"  {'n_target sweep':<20} {n_target:,.0f}")
    print(f"  {'total':<20} {total:,.0f}")
    corruptions = len({r["shift"] for r in read(v2 / "results.csv") if r["benchmark"] == "fmnist-c"})
    scaled = total - main_table["fmnist-c"] + main_table["fmnist-c"] * ALL_CORRUPTIONS / corruptions
    print(f"with all {ALL_CORRUPTIONS} fmnist-c corruptions instead of {corruptions}: {scaled:,.0f} "
          f"worker-seconds, {scaled / total:.2f} times; wall time {args.wall_minutes:g} min x "
          f"{scaled / total:.2f} = {args.wall_minutes * scaled / total / 60:.1f} hours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
