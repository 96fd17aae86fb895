"""A sweep in two stages (issue #15): the whole learning-rate grid on a few seeds, then
the remaining seeds of each (shift, method) at the learning rate those seeds chose.

This is how the Fashion-MNIST suite affords the paper's wide grid with 5 seeds on a
2-core machine (docs/fmnist.md, "Protocol and why"). The choice is made per (shift,
method) by the mean validation metric over the first-stage seeds, so every method
gets the same search; test accuracy plays no part. Both stages write into one results
CSV and resume like any sweep: the second stage is re-derived from the first stage's
rows, so an interrupted run continues with the same choices.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

from .errors import ConfigError
from .protocol import Protocol
from .sweep import SweepSummary, read_results, run_sweep


def validation_metric(row: dict) -> float:
    """The metric that picks a row's lr (its `select`); -inf when it has none."""
    value = row["val_worst_group_acc"] if row["select"] == "worst_group_val_acc" else row["val_acc"]
    return -math.inf if value is None or math.isnan(value) else value


def chosen_lrs(rows: list[dict], protocol: Protocol, lr_seeds: list[int]) -> dict[tuple, float]:
    """(shift, method) -> the lr of the protocol's grid with the best mean validation
    metric over `lr_seeds` (ties: the larger lr, as `report.select_learning_rates`).
    Only (shift, method) pairs with every first-stage cell finished are chosen."""
    values = defaultdict(dict)
    for r in rows:
        if (r["benchmark"] == protocol.benchmark and r["n_target"] == protocol.n_target
                and r["seed"] in lr_seeds and r["method"] in protocol.methods
                and r["shift"] in protocol.shifts and float(r["lr"]) in protocol.lrs):
            values[(r["shift"], r["method"])][(float(r["lr"]), r["seed"])] = validation_metric(r)
    choices = {}
    for key, cells in values.items():
        if len(cells) < len(protocol.lrs) * len(lr_seeds):
            continue
        mean = {lr: sum(cells[(lr, s)] for s in lr_seeds) / len(lr_seeds) for lr in protocol.lrs}
        choices[key] = max(protocol.lrs, key=lambda lr: (mean[lr], lr))
    return choices


def second_stage(protocol: Protocol, choices: dict[tuple, float],
                 seeds_for: Callable[[str], list[int]]) -> list[Protocol]:
    """One protocol per (shift, chosen lr, seeds): the methods that chose that lr, run
    on their remaining seeds (`seeds_for(method)`, first-stage seeds left out)."""
    groups = defaultdict(list)
    for (shift, method), lr in sorted(choices.items()):
        seeds = tuple(seeds_for(method))
        if seeds:
            groups[(shift, lr, seeds)].append(method)
    return [protocol.replace(shifts=[shift], methods=methods, lrs=[lr], seeds=list(seeds))
            for (shift, lr, seeds), methods in groups.items()]


def run_two_stage(protocol: Protocol, out: str | Path, lr_seeds: list[int],
                  seeds_for: Callable[[str], list[int]], on_row=None,
                  **sweep_options) -> list[SweepSummary]:
    """Stage 1: `protocol` on `lr_seeds` over its whole lr grid. Stage 2: every other
    seed of each (shift, method) (`seeds_for(method)`) at its chosen lr. Returns the
    sweeps' summaries; `sweep_options` go to `run_sweep`."""
    if not lr_seeds:
        raise ConfigError("lr_seeds is empty: the first stage needs at least one seed")
    overlap = {m: sorted(set(seeds_for(m)) & set(lr_seeds)) for m in protocol.methods}
    if any(overlap.values()):
        raise ConfigError(f"second-stage seeds must leave out the first stage's {lr_seeds}; "
                          f"got {({m: s for m, s in overlap.items() if s})}")
    summaries = [run_sweep(protocol.replace(seeds=lr_seeds), out, on_row=on_row, **sweep_options)]
    choices = chosen_lrs(read_results(out), protocol, lr_seeds)
    for stage2 in second_stage(protocol, choices, seeds_for):
        summaries.append(run_sweep(stage2, out, on_row=on_row, **sweep_options))
    return summaries
