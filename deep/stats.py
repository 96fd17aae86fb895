"""Statistics over seeds, shared by every table of the toolkit (sweeps, benchmarks, online
adaptation): one definition of a mean with its standard error, of a 95 % t interval, and
of how an interval is printed.

A stat is a tuple (mean, se, n) over n seeds; an interval is (mean, half-width, n). With
one seed there is no spread: se and the half-width are nan, and a table prints the mean
alone, so a single-seed number never looks like a measured interval.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _scipy_stats


def mean_se(values) -> tuple[float, float, int]:
    """Mean, standard error (nan for one value), count; (nan, nan, 0) for none."""
    a = np.asarray(list(values), dtype=float)
    if len(a) == 0:
        return math.nan, math.nan, 0
    se = a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else math.nan
    return float(a.mean()), float(se), len(a)


def t_interval(stat: tuple[float, float, int], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, se, n) -> (mean, half-width of the `level` t interval over n seeds, n);
    the half-width is nan for fewer than 2 seeds."""
    mean, se, n = stat
    if n < 2 or math.isnan(se):
        return mean, math.nan, n
    return mean, float(_scipy_stats.t.ppf(0.5 + level / 2, n - 1) * se), n


def lower_bound(interval: tuple[float, float, int]) -> float:
    """The interval's lower end; -inf where there is no interval (fewer than 2 seeds), so
    "the interval lies above 0" is never claimed from one seed."""
    mean, half, _ = interval
    return mean - half if not math.isnan(half) else -math.inf


def above_zero(stat: tuple[float, float, int], level: float = 0.95) -> bool:
    """Whether the `level` t interval of `stat` (mean, se, n) lies above 0: the one rule
    behind every "beats" and "best" in the tables (never true for fewer than 2 seeds)."""
    return lower_bound(t_interval(stat, level)) > 0


def format_interval(interval: tuple[float, float, int], scale: float = 100.0) -> str:
    """(mean, half-width, n) as "+1.2 [-0.3, +2.7]" in points; "-" when n = 0;
    the mean alone when there is no interval (one seed)."""
    mean, half, n = interval
    if n == 0:
        return "-"
    if math.isnan(half):
        return f"{scale * mean:+.1f}"
    return f"{scale * mean:+.1f} [{scale * (mean - half):+.1f}, {scale * (mean + half):+.1f}]"


def format_stat(stat: tuple[float, float, int], scale: float = 100.0, signed: bool = False) -> str:
    """(mean, se, n) as "12.3 ± 0.4" (points; signed: "+1.2 ± 0.4"); "-" when n = 0;
    the mean alone when there is no standard error (one seed)."""
    mean, se, n = stat
    if n == 0:
        return "-"
    text = f"{scale * mean:+.1f}" if signed else f"{scale * mean:.1f}"
    return text + (f" ± {scale * se:.1f}" if not math.isnan(se) else "")


NO_STAT = (math.nan, math.nan, 0)  # a cell without values


def interval_table(title: str, rows: list[str], columns: list[str], stat, label=str) -> list[str]:
    """`title`, then a markdown table of 95 % t intervals with one line per entry of
    `rows` (shown as `label(row)`) and one column per entry of `columns`; `stat(row,
    column)` gives each cell's (mean, se, n). [] when no cell has two seeds (there is no
    interval to show)."""
    cells = {(r, c): stat(r, c) for r in rows for c in columns}
    if all(s[2] < 2 for s in cells.values()):
        return []
    lines = [title, "", "| shift | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {label(r)} | " + " | ".join(format_interval(t_interval(cells[(r, c)]))
                                                   for c in columns) + " |")
    return lines + [""]
