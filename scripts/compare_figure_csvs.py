"""Usage: python scripts/compare_figure_csvs.py OLD_DIR NEW_DIR [--tolerance 1e-6]

Are two runs of `python -m sims figures` the same numbers? The same seed on the same
machine writes byte-identical CSVs; another CPU (or BLAS build) rounds differently, which
shows most in exact fits (losses at ~1e-30 of E[y^2], all digits rounding noise). For each
F1-F6 CSV in both folders: the rows and columns that differ, and the largest difference
relative to its column's scale (the largest magnitude in that column of OLD), so a loss of
1e-30 against 3e-30 counts as the rounding it is; log10 columns in decades instead, and
only in rows whose geometric mean is above rounding level and made of no draw at it
(log10_mean above log10(sims.experiments.ZERO) = -8 and fraction_zero 0 in both files: a
geometric mean over draws of which some are exact fits carries their rounding digits,
weighted by how many they are; the arithmetic mean and fraction_zero are still compared).
Exit status 1 when a folder or CSV is missing, a CSV changed shape or labels, or differs by
more than --tolerance of a column's scale (--log-tolerance decades).
"""

from __future__ import annotations

import argparse
import csv
import sys
import math
from pathlib import Path

from sims.experiments import ZERO

ROUNDING_LOG10 = math.log10(ZERO)  # a geometric mean below it: exact fits, rounding digits


def compare(old: Path, new: Path) -> dict:
    """{"rows", "differing_rows", "columns", "worst": (difference / column scale, column,
    old, new) or None, "worst_log10": (decades, column, old, new) or None}, or
    {"error": why} when header, row count or a label differs."""
    a = list(csv.reader(old.open()))
    b = list(csv.reader(new.open()))
    if len(a) != len(b) or a[:1] != b[:1]:
        return {"error": f"{len(a) - 1} rows vs {len(b) - 1}, or other columns"}
    scale = {}
    for row in a[1:]:
        for name, value in zip(a[0], row):
            try:
                scale[name] = max(scale.get(name, 0.0), abs(float(value)))
            except ValueError:
                pass
    columns, differing, worst = set(), 0, {False: None, True: None}
    header = a[0]
    for x, y in zip(a[1:], b[1:]):
        differing += x != y
        rounding = "log10_mean" in header and any(
            float(row[header.index("log10_mean")]) < ROUNDING_LOG10
            or ("fraction_zero" in header and float(row[header.index("fraction_zero")]) > 0)
            for row in (x, y))
        for name, u, v in zip(header, x, y):
            if u == v:
                continue
            columns.add(name)
            log = name.startswith("log10")
            if log and rounding:
                continue
            try:
                gap = abs(float(u) - float(v)) / (1.0 if log else scale.get(name) or 1.0)
            except ValueError:  # a label differs
                return {"error": f"column {name}: {u!r} vs {v!r}"}
            if worst[log] is None or gap > worst[log][0]:
                worst[log] = (gap, name, u, v)
    return {"rows": len(a) - 1, "differing_rows": differing, "columns": sorted(columns),
            "worst": worst[False], "worst_log10": worst[True]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--tolerance", type=float, default=1e-6,
                   help="largest difference that passes, relative to the column's scale (1e-6)")
    p.add_argument("--log-tolerance", type=float, default=0.01,
                   help="largest difference of a log10 column that passes, in decades (0.01)")
    args = p.parse_args(argv)
    for folder in (args.old, args.new):
        if not folder.is_dir():
            print(f"{folder} is not a folder of figure CSVs (python -m sims figures --out "
                  f"FOLDER writes one)")
            return 1
    bad = False
    for old in sorted(args.old.glob("f[1-6]_*.csv")):
        new = args.new / old.name
        if not new.exists():
            print(f"{old.name}: missing in {args.new}")
            bad = True
            continue
        r = compare(old, new)
        if "error" in r:
            print(f"{old.name}: {r['error']}")
            bad = True
        elif not r["differing_rows"]:
            print(f"{old.name}: identical")
        else:
            parts = []
            if r["worst"] is not None:
                gap, name, u, v = r["worst"]
                parts.append(f"largest difference {gap:.2g} of its column's scale ({name}: "
                             f"{u} vs {v})")
                bad |= gap > args.tolerance
            if r["worst_log10"] is not None:
                gap, name, u, v = r["worst_log10"]
                parts.append(f"largest log10 difference {gap:.2g} decades ({name}: {u} vs {v})")
                bad |= gap > args.log_tolerance
            print(f"{old.name}: {r['differing_rows']} of {r['rows']} rows differ, in "
                  f"{', '.join(r['columns'])}; "
                  f"{'; '.join(parts) or 'only in rows at rounding level'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
