"""A sweep in two stages (issue #15): the whole learning-rate grid on a few seeds, then
the remaining seeds of each (shift, method) at the learning rate those seeds chose.

This is how the Fashion-MNIST suite affords the paper's wide grid with 5 seeds on a
2-core machine (docs/fmnist.md, "Protocol and why"). The choice is made per (shift,
method) by the mean validation metric over the first-stage seeds, so every method
gets the same search; test accuracy plays no part. Both stages write into one results
CSV and resume like any sweep: the second stage is re-derived from the first stage's
rows, so an interrupted run continues with the same choices.

Where the first stage's choice sits at an edge of the grid, the grid is extended for that
(shift, method) alone, one step (the grid's own ratio) at a time, up to `extend` steps
beyond each end, until the choice is inside: issue #15 asks that a chosen learning rate
is not the grid's largest or smallest. `drop_superseded` keeps, on the seeds after the first
stage, only the rows at the first stage's current choice: rows at a choice that a later
extension moved stay in the CSV and are left out of the table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

from .errors import ConfigError
from .files import check_output, sole_writer
from .protocol import Protocol
from .results import best_lr, selection_metric
from .sweep import SweepSummary, read_results, run_sweep


def lr_ladder(lrs: list[float], extend: int) -> tuple[list[float], list[float]]:
    """(the `extend` learning rates above the grid, nearest first; those below it), at
    the grid's ratio (10 for a one-value grid). Rounded to 12 significant digits, so
    that 1e-1 * 10 is 1.0 and the rows' lrs compare equal across runs."""
    grid = sorted(set(lrs))
    ratio = grid[1] / grid[0] if len(grid) > 1 else 10.0
    step = lambda lr, k: float(f"{lr * ratio ** k:.12g}")
    return ([step(grid[-1], k) for k in range(1, extend + 1)],
            [step(grid[0], -k) for k in range(1, extend + 1)])


def _first_stage_values(rows: list[dict], protocol: Protocol, lr_seeds: list[int],
                        extend: int) -> dict[tuple, dict[float, float]]:
    """(shift, method) -> {lr: mean validation metric over `lr_seeds`} for every lr of
    the grid or its extension that all of `lr_seeds` have finished."""
    up, down = lr_ladder(protocol.lrs, extend)
    allowed = set(protocol.lrs) | set(up) | set(down)
    values = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if (r["benchmark"] == protocol.benchmark and r["n_target"] == protocol.n_target
                and r["seed"] in lr_seeds and r["method"] in protocol.methods
                and r["shift"] in protocol.shifts and float(r["lr"]) in allowed):
            metric = selection_metric(r)  # a cell with none counts, and loses
            values[(r["shift"], r["method"])][float(r["lr"])][r["seed"]] = \
                -math.inf if metric is None else metric
    return {key: {lr: sum(per_seed.values()) / len(lr_seeds)
                  for lr, per_seed in cells.items() if len(per_seed) == len(lr_seeds)}
            for key, cells in values.items()}


def _searched(done: dict[float, float], protocol: Protocol, extend: int) -> list[float]:
    """The grid plus the extension steps finished without a gap, in ascending order."""
    up, down = lr_ladder(protocol.lrs, extend)
    grid = sorted(protocol.lrs)
    for lr in up:
        if lr not in done:
            break
        grid.append(lr)
    for lr in down:
        if lr not in done:
            break
        grid.insert(0, lr)
    return grid


def _first_stage_choices(rows: list[dict], protocol: Protocol, lr_seeds: list[int],
                         extend: int) -> dict[tuple, tuple[dict, list[float], float]]:
    """(shift, method) -> (mean metric per lr finished, lrs searched, chosen lr), for the
    pairs whose whole grid is finished."""
    out = {}
    for key, done in _first_stage_values(rows, protocol, lr_seeds, extend).items():
        if all(lr in done for lr in protocol.lrs):
            searched = _searched(done, protocol, extend)
            out[key] = (done, searched, best_lr({lr: done[lr] for lr in searched}))
    return out


def chosen_lrs(rows: list[dict], protocol: Protocol, lr_seeds: list[int],
               extend: int = 0) -> dict[tuple, float]:
    """(shift, method) -> the lr with the best mean validation metric over `lr_seeds`
    (ties: the larger lr), among the protocol's grid and the extension steps finished.
    Only (shift, method) pairs whose whole grid is finished are chosen."""
    return {key: choice for key, (_, _, choice)
            in _first_stage_choices(rows, protocol, lr_seeds, extend).items()}


def edge_steps(rows: list[dict], protocol: Protocol, lr_seeds: list[int],
               extend: int) -> dict[tuple, float]:
    """(shift, method) -> the next lr to run on `lr_seeds`, for the pairs whose choice is
    the largest or smallest lr searched and whose extension has a step left."""
    up, down = lr_ladder(protocol.lrs, extend)
    steps = {}
    for key, (done, searched, choice) in _first_stage_choices(rows, protocol, lr_seeds,
                                                               extend).items():
        ladder = up if choice == searched[-1] else down if choice == searched[0] else []
        beyond = [lr for lr in ladder if lr not in done]
        if len(searched) > 1 and beyond:
            steps[key] = beyond[0]
    return steps


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
                  seeds_for: Callable[[str], list[int]], on_row=None, extend: int = 0,
                  **sweep_options) -> list[SweepSummary]:
    """Stage 1: `protocol` on `lr_seeds` over its whole lr grid, extended (up to `extend`
    steps beyond each end) for each (shift, method) whose choice is at an edge. Stage 2:
    every other seed of each (shift, method) (`seeds_for(method)`) at its chosen lr.
    Returns the sweeps' summaries; `sweep_options` go to `run_sweep`."""
    if not lr_seeds:
        raise ConfigError("lr_seeds is empty: the first stage needs at least one seed")
    overlap = {m: sorted(set(seeds_for(m)) & set(lr_seeds)) for m in protocol.methods}
    if any(overlap.values()):
        raise ConfigError(f"second-stage seeds must leave out the first stage's {lr_seeds}; "
                          f"got {({m: s for m, s in overlap.items() if s})}")
    out = check_output(out)  # "~" expanded: read_results below reads the file run_sweep writes
    with sole_writer(out):   # one writer from stage 1 to stage 2 (run_sweep's is the same)
        return _two_stages(protocol, out, lr_seeds, seeds_for, on_row, extend, sweep_options)


def _two_stages(protocol, out, lr_seeds, seeds_for, on_row, extend, sweep_options):
    summaries = [run_sweep(protocol.replace(seeds=lr_seeds), out, on_row=on_row, **sweep_options)]
    for _ in range(2 * extend):  # each round adds one step to every pair at an edge
        steps = edge_steps(read_results(out), protocol, lr_seeds, extend)
        if not steps:
            break
        # the steps, grouped as a second stage is, on the first-stage seeds
        for step in second_stage(protocol, steps, lambda method: lr_seeds):
            summaries.append(run_sweep(step, out, on_row=on_row, **sweep_options))
    choices = chosen_lrs(read_results(out), protocol, lr_seeds, extend)
    for stage2 in second_stage(protocol, choices, seeds_for):
        summaries.append(run_sweep(stage2, out, on_row=on_row, **sweep_options))
    return summaries


def drop_superseded(rows: list[dict], lr_seeds: list[int]) -> list[dict]:
    """`rows` without the later-stage rows that the first stage did not choose: on the
    seeds outside `lr_seeds`, only the rows at the lr whose mean validation metric over
    `lr_seeds` is best for their (benchmark, shift, method, n_target) (ties: the larger
    lr) are kept; a superseded choice's rows (an extension moved it) are dropped. Pairs
    without finished first-stage rows, and later seeds that ran the first stage's whole
    grid themselves (a one-stage sweep), keep every row. The first-stage seeds keep all
    their rows: `report.select_learning_rates` picks among them per seed."""
    first = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["seed"] in lr_seeds:
            metric = selection_metric(r)
            if metric is not None:
                first[lr_group(r)][float(r["lr"])][r["seed"]] = metric
    choice, first_grid = {}, {}
    for key, cells in first.items():
        complete = {lr: sum(v.values()) for lr, v in cells.items() if len(v) == len(lr_seeds)}
        if complete:
            choice[key] = best_lr(complete)
            first_grid[key] = set(complete)
    later = defaultdict(set)  # a later seed that ran the whole first-stage grid chose itself
    for r in rows:
        later[(lr_group(r), r["seed"])].add(float(r["lr"]))
    own_grid = {k for k, lrs in later.items() if k[0] in choice and first_grid[k[0]] <= lrs}
    return [r for r in rows if r["seed"] in lr_seeds or lr_group(r) not in choice
            or (lr_group(r), r["seed"]) in own_grid or float(r["lr"]) == choice[lr_group(r)]]


def lr_group(row: dict) -> tuple:
    """(benchmark, shift, method, n_target): the cells among whose rows one lr is chosen."""
    return (row["benchmark"], row["shift"], row["method"], row["n_target"])
