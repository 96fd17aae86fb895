"""Did a sweep's runs converge? Per-epoch validation curves and the summaries built on them.

- `CurvesFile`: `curves.csv` beside a results CSV, one row per (cell, epoch) with the
  validation accuracy and training loss of that epoch. Written like the results (one
  writer, the whole file rewritten to a temp file and renamed), so a killed sweep never
  leaves a broken file; a cell that is run again replaces its old rows.
- `inside_grid`: per (benchmark, method), the fraction of cells whose validation-chosen
  epoch is not the last allowed one and whose chosen learning rate is not the smallest
  or largest of the grid the cell's method was searched over (issue #15's criteria).
- `learning_curves`: validation accuracy per epoch of each method at its chosen
  learning rate, mean over seeds and shifts, per panel, optionally only at the epochs
  most runs reached (`deep.bench` plots them).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from .errors import ResultsError
from .files import atomic_write_text
from .results import KEY, row_key

CURVE_COLUMNS = (*KEY, "epoch", "val_acc", "val_worst_group_acc", "train_loss")
_INTS = {"seed", "n_target", "epoch"}
_FLOATS = {"lr", "val_acc", "val_worst_group_acc", "train_loss"}


# --- the curves file --------------------------------------------------------------

def curve_rows(row: dict) -> list[dict]:
    """The curves rows of one finished sweep row that carries its `history`."""
    if "history" not in row:
        raise ResultsError(f"row of cell {row_key(row)} carries no 'history' (per-epoch "
                           "records); run it through a sweep that keeps them")
    cell = {k: row[k] for k in KEY}
    return [{**cell, "epoch": int(h["epoch"]), "val_acc": h.get("val_acc"),
             "val_worst_group_acc": h.get("val_worst_group_acc"),
             "train_loss": float(h["train_loss"])} for h in row["history"]]


def read_curves(path: str | Path) -> list[dict]:
    """The rows of a curves CSV (values parsed; empty -> None); [] if there is none.
    A wrong header or a value that does not parse raises ResultsError with the line."""
    path = Path(path)
    if not path.exists() or not path.read_text().strip():
        return []
    reader = csv.reader(io.StringIO(path.read_text()))
    header = tuple(next(reader))
    if header != CURVE_COLUMNS:
        raise ResultsError(f"{path}: columns {list(header)} are not a curves file's "
                           f"{list(CURVE_COLUMNS)}")
    return [_parse_curve(values, f"{path}, line {reader.line_num}") for values in reader]


def _parse_curve(values: list[str], where: str) -> dict:
    if len(values) != len(CURVE_COLUMNS):
        raise ResultsError(f"{where}: {len(values)} fields, expected {len(CURVE_COLUMNS)} "
                           f"({', '.join(CURVE_COLUMNS)})")
    out = {}
    for name, text in zip(CURVE_COLUMNS, values):
        kind = int if name in _INTS else float if name in _FLOATS else str
        if text == "" and name in ("val_acc", "val_worst_group_acc"):
            out[name] = None
            continue
        try:
            out[name] = kind(text)
        except ValueError:
            raise ResultsError(f"{where}: column {name!r} holds {text!r}, which is not "
                               f"a {kind.__name__}") from None
    return out


def curves_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for r in rows:
        writer.writerow(["" if r[c] is None else repr(r[c]) if isinstance(r[c], float)
                         else r[c] for c in CURVE_COLUMNS])
    return buffer.getvalue()


class CurvesFile:
    """A curves CSV owned by one writer; `record(row)` adds (or replaces) one cell's
    epochs and rewrites the file atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.by_cell: dict[tuple, list[dict]] = defaultdict(list)
        for r in read_curves(self.path):
            self.by_cell[row_key(r)].append(r)

    def record(self, row: dict) -> None:
        # Written before the results row: a kill between the two reruns the cell, whose
        # new epochs then replace these (the same seed gives the same numbers on CPU).
        self.by_cell[row_key(row)] = curve_rows(row)
        atomic_write_text(self.path, curves_text([r for rows in self.by_cell.values()
                                                  for r in rows]))


# --- summaries ----------------------------------------------------------------------

def inside_grid(rows: list[dict], selected: list[dict]) -> dict[tuple, dict]:
    """(benchmark, method) -> {"cells", "epoch_inside", "lr_inside"} over `selected`
    (one row per cell, its validation-chosen lr): the fractions of cells whose chosen
    epoch is before the row's last allowed epoch, and whose chosen lr is strictly
    between the smallest and largest lr that `rows` hold for its (benchmark, shift,
    method, n_target), over all seeds (a learning rate chosen on one seed and reused
    on the others counts as chosen from that seed's grid)."""
    grids = defaultdict(set)
    for r in rows:
        grids[(r["benchmark"], r["shift"], r["method"], r["n_target"])].add(float(r["lr"]))
    counts = defaultdict(lambda: [0, 0, 0])
    for r in selected:
        grid = grids[(r["benchmark"], r["shift"], r["method"], r["n_target"])]
        c = counts[(r["benchmark"], r["method"])]
        c[0] += 1
        c[1] += r["best_epoch"] < r["epochs"]
        c[2] += min(grid) < float(r["lr"]) < max(grid)
    return {k: {"cells": n, "epoch_inside": e / n, "lr_inside": lr / n}
            for k, (n, e, lr) in counts.items()}


def learning_curves(curves: list[dict], selected: list[dict], panel_of,
                    min_share: float = 0.0) -> dict[str, dict[str, list[tuple[int, float, int]]]]:
    """panel -> method -> [(epoch, mean val_acc, runs)]: the curves of the selected
    cells (each at its chosen lr), averaged at each epoch over the (shift, seed) runs
    that reached it (early-stopped runs leave the mean after their last epoch).
    An epoch is kept only where at least `min_share` of the method's runs in that panel
    reached it: past that the mean rests on a few late stoppers and jumps (issue #15:
    one fmnist-c run pulled `all` to 80 % at epoch 22); no value is invented for the
    runs that stopped. `panel_of(row)` names a selected row's panel, or None to leave it out."""
    by_cell = defaultdict(dict)
    for c in curves:
        if c["val_acc"] is not None:
            by_cell[row_key(c)][c["epoch"]] = c["val_acc"]
    sums = defaultdict(lambda: defaultdict(list))
    runs = defaultdict(int)
    for r in selected:
        panel = panel_of(r)
        if panel is None or not by_cell.get(row_key(r)):
            continue
        runs[(panel, r["method"])] += 1
        for epoch, acc in by_cell[row_key(r)].items():
            sums[(panel, r["method"])][epoch].append(acc)
    out = defaultdict(dict)
    for (panel, method), per_epoch in sums.items():
        out[panel][method] = [(e, sum(v) / len(v), len(v)) for e, v in sorted(per_epoch.items())
                              # a share, not min_share * runs: 0.28 * 25 is 7.000000000000001
                              if len(v) / runs[(panel, method)] >= min_share]
    return dict(out)
