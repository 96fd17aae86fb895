"""The adaptation results CSV (one row per finished stream), and its table and plot.

Rows are appended by rewriting the whole file atomically
(`checkpoints.atomic_write_bytes`), so an interrupted run leaves whole rows only and
the same command resumes it, skipping the finished streams. A finished row whose
settings differ from the run's is an error (write to another --out), never mixed, and so is
a new stream beside rows of its method that ran with other settings (only lr may differ); the
source model counts as the same when its file name is (`deep.results.same_checkpoint`:
committed results resume from another checkout). Settings compare as values, not
text: a protocol's `prior_strength = -1` and the flag's -1.0 are one setting. The loader
options (`data`, e.g. the corruption severity) are settings too; rows written before that
column existed are read with them unknown, and not compared. The summary keeps streams
of different lengths (`images`) apart: one table per (method, mode, lr, stream length),
and one section per benchmark when a file holds several.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import ResultsError
from ..files import atomic_write_bytes, check_output, save_figure, sole_writer
from ..normalization import numbers_part
from ..results import check_not_a_directory, same_checkpoint
from ..stats import (NO_STAT, above_zero, format_interval, format_stat, interval_table, mean_se,
                     t_interval)

COLUMNS = ("benchmark", "shift", "method", "blocks", "seed", "episodic", "images", "lr", "test_acc",
           "adapted_params", "total_params", "seconds", "arch", "checkpoint", "test_per_class",
           "settings", "data", "machine")
# The headers read: files written before the `data` column (the loader options) or the
# `machine` column (where the stream ran: `deep.files.machine`) are still read, with
# them empty, and resumed.
_BEFORE_DATA = tuple(c for c in COLUMNS if c != "data")
HEADERS = (COLUMNS, _BEFORE_DATA, _BEFORE_DATA[:-1])
KEY = ("benchmark", "shift", "method", "blocks", "seed", "episodic", "images", "lr")
SETTINGS = ("arch", "checkpoint", "test_per_class", "settings", "data")
JSON_SETTINGS = ("settings", "data")  # compared as values (numbers as numbers)
_INT = {"seed", "images", "adapted_params", "total_params", "test_per_class"}
_FLOAT = {"lr", "test_acc", "seconds"}


def is_adapt_results(path: str | Path) -> bool:
    """Whether `path` is a CSV written by `python -m deep adapt` (by its header)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error):   # not a text CSV: not ours (read_results says so)
        return False
    return tuple(header or ()) in HEADERS


def _parse(row: dict) -> dict:
    out = dict(row)
    for k in _INT:
        out[k] = int(row[k])
    for k in _FLOAT:
        out[k] = float(row[k])
    if row["episodic"] not in ("true", "false"):     # a hand-edited "True" is not online
        raise ValueError(f"episodic must be true or false, got {row['episodic']!r}")
    out["episodic"] = row["episodic"] == "true"
    out["machine"] = row.get("machine") or None
    out["data"] = row.get("data") or None
    return out


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else str(value)


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def read_adapt_results(path: str | Path) -> list[dict]:
    path = Path(path)
    check_not_a_directory(path)
    try:
        text = path.read_text() if path.exists() else ""
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not a text file, so not a `deep adapt` results CSV; "
                           "write to another --out") from None
    if not text.strip():
        return []
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) not in HEADERS:
        raise ResultsError(f"{path}: columns {reader.fieldnames} are not a `deep adapt` results "
                         f"file's {list(COLUMNS)}; write to another --out")
    try:
        return [_parse(r) for r in reader]
    except (ValueError, KeyError, TypeError) as err:
        raise ResultsError(f"{path}: unreadable row ({err})") from None


class AdaptResults:
    """A results CSV owned by one writer; `append` rewrites it atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows = read_adapt_results(self.path)
        self.done = {row_key(r): r for r in self.rows}
        if len(self.done) != len(self.rows):
            raise ResultsError(f"{self.path} holds duplicated streams; it was not written by `deep adapt`")

    def finished(self, key: tuple, settings: dict) -> bool:
        """Whether stream `key` is done with these settings; an error if done with others."""
        row = self.done.get(key)
        if row is None:
            self.check_method(key[0], key[2], settings)
            return False
        self._check(key, row, settings)
        return True

    def check_method(self, benchmark: str, method: str, settings: dict) -> None:
        """An error unless every row of `method` on `benchmark` ran with `settings` but
        for its learning rate: a new stream beside rows that ran otherwise (more copies,
        another checkpoint, other data options) would share their table. Only lr may
        differ, and what the key holds (blocks, seed, stream length, episodic). Called
        for each method before any stream runs, and again for each new stream."""
        for other in self.rows:
            if (other["benchmark"], other["method"]) == (benchmark, method):
                self._check(row_key(other), other, settings, ignore_lr=True)

    def _check(self, key: tuple, row: dict, settings: dict, ignore_lr: bool = False) -> None:
        def value(k, source):
            if k == "settings" and ignore_lr:
                return json.dumps({n: v for n, v in json.loads(source[k]).items() if n != "lr"},
                                  sort_keys=True)
            # `data` left out of a caller's settings is None: against a row that records
            # data options it differs (only a row's own None, written before the column,
            # counts as unknown: `_same`)
            return source.get(k)
        differ = {k: (value(k, row), value(k, settings)) for k in SETTINGS
                  if not _same(k, value(k, row), value(k, settings))}
        if differ:
            raise ResultsError(f"{self.path} already holds {key} with other settings "
                               f"(found, now): {differ}; write this run to another --out")

    def append(self, row: dict) -> None:
        key = row_key(row)
        if key in self.done:
            raise ResultsError(f"stream {key} is already in {self.path}")
        row = {"machine": None, "data": None, **row}  # unknown unless the caller says
        self.rows.append(row)
        self.done[key] = row
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in self.rows:
            writer.writerow([_format(r[c]) for c in COLUMNS])
        data = buffer.getvalue().encode()
        atomic_write_bytes(self.path, lambda f: f.write(data))


def _same(column: str, recorded, now) -> bool:
    if column == "checkpoint":  # the same file at another path (another checkout) is the same
        return same_checkpoint(recorded, now)
    if column == "data" and recorded is None:  # written before the column: unknown
        return True
    if column in JSON_SETTINGS and recorded is not None and now is not None:
        recorded, now = json.loads(recorded), json.loads(now)
        if column == "data":  # how many processes decode the images changes no number
            recorded, now = numbers_part(recorded), numbers_part(now)
        return _values(recorded) == _values(now)
    return _format(recorded) == _format(now)


def _values(value):
    """JSON values with every number a float (TOML's -1 is the flag's -1.0), booleans kept
    apart from numbers."""
    if isinstance(value, dict):
        return {k: _values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_values(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", float(value))
    return value


def settings_json(config) -> str:
    """A method config as sorted JSON, for the `settings` column."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def data_json(options: dict) -> str:
    """The loader options (a protocol's [data] table with --data), for the `data` column."""
    return json.dumps(options, sort_keys=True)


# --- summary -------------------------------------------------------------------------

def relative_table(rows: list[dict]) -> dict:
    """{(method, episodic, lr, images): {"blocks": [...], "shifts": [..., "mean"],
    "none": {shift: stat}, "rel": {(shift, blocks): stat},
    "per_seed": {(shift, blocks): {seed: difference}}}}: accuracy minus the
    no-adaptation accuracy on the same stream (same shift, seed and length), paired by
    seed; "mean" averages each seed's differences over the shifts that have them all.
    stat = (mean, se, seeds). Streams of different lengths never share a table: a
    200-image and a 900-image stream are different measurements, not two seeds. The rows
    are of one benchmark (`by_benchmark` splits a file's)."""
    benchmarks = sorted({r["benchmark"] for r in rows})
    if len(benchmarks) > 1:
        raise ResultsError(f"rows of {len(benchmarks)} benchmarks ({', '.join(benchmarks)}) in "
                           "one table: split them with by_benchmark")
    out = {}
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["episodic"], r["lr"], r["images"])].append(r)
    for key, group in sorted(groups.items()):
        acc = {(r["shift"], r["blocks"], r["seed"]): r["test_acc"] for r in group}
        blocks = list(dict.fromkeys(r["blocks"] for r in group if r["blocks"] != "none"))
        shifts = sorted({r["shift"] for r in group})
        diffs = defaultdict(dict)  # (shift, blocks) -> {seed: diff}
        for (shift, b, seed), value in acc.items():
            base = acc.get((shift, "none", seed))
            if b != "none" and base is not None:
                diffs[(shift, b)][seed] = value - base
        none = {s: mean_se([v for (sh, b, _), v in acc.items() if sh == s and b == "none"])
                for s in shifts}
        if len(shifts) > 1:
            for b in blocks:
                seeds = set.intersection(*(set(diffs[(s, b)]) for s in shifts))
                diffs[("mean", b)] = {d: float(np.mean([diffs[(s, b)][d] for s in shifts]))
                                      for d in sorted(seeds)}
            none["mean"] = mean_se([np.mean(v) for v in _per_seed_none(acc, shifts)])
            shifts = shifts + ["mean"]
        rel = {k: mean_se(v.values()) for k, v in diffs.items()}
        out[key] = {"blocks": blocks, "shifts": shifts, "none": none, "rel": rel,
                    "per_seed": dict(diffs)}
    return out


def _per_seed_none(acc: dict, shifts: list[str]) -> list[list[float]]:
    by_seed = defaultdict(dict)
    for (shift, b, seed), v in acc.items():
        if b == "none":
            by_seed[seed][shift] = v
    return [[d[s] for s in shifts] for d in by_seed.values() if all(s in d for s in shifts)]


def block_differences(table: dict, shift: str) -> list[tuple[str, str, tuple]]:
    """(a, b, (mean, se, seeds)) for every pair of blocks with values on `shift`, `a` the
    one with the larger mean gain: a - b, paired by seed (so (a - none) - (b - none))."""
    gains = {b: table["per_seed"][(shift, b)] for b in table["blocks"]
             if table["per_seed"].get((shift, b))}
    ranked = sorted(gains, key=lambda b: -table["rel"][(shift, b)][0])
    pairs = []
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            seeds = sorted(set(gains[a]) & set(gains[b]))
            pairs.append((a, b, mean_se(gains[a][d] - gains[b][d] for d in seeds)))
    return pairs


def best_block(table: dict, shift: str) -> str:
    """The block with the largest mean gain over no adaptation on `shift`, named only as
    far as the seeds separate it (95 % t intervals of differences paired by seed):
    "first" when its gain lies above 0 and above the runner-up's; "first ≈ second" when
    it beats no adaptation but not the runner-up; "(first)" when its mean gain is positive
    but not separated from no adaptation (always so with one seed); "none" when no block's
    mean gain is above 0; "-" when no block has a value."""
    pairs = block_differences(table, shift)  # ranked by mean gain: pairs[0] is best - runner-up
    with_values = [b for b in table["blocks"] if table["per_seed"].get((shift, b))]
    if not with_values:
        return "-"
    best = pairs[0][0] if pairs else with_values[0]
    if table["rel"][(shift, best)][0] <= 0:
        return "none"
    if not above_zero(table["rel"][(shift, best)]):
        return f"({best})"
    if not pairs:
        return best
    runner_up, margin = pairs[0][1], pairs[0][2]
    return best if above_zero(margin) else f"{best} ≈ {runner_up}"


def differences_line(table: dict) -> str | None:
    """One line naming each pair of blocks' paired difference on the table's mean row (or
    its one shift) with its 95 % t interval, separated pairs first; None with one seed."""
    shift = "mean" if "mean" in table["shifts"] else table["shifts"][0]
    pairs = [(a, b, stat) for a, b, stat in block_differences(table, shift) if stat[2] >= 2]
    if not pairs:
        return None
    pairs.sort(key=lambda p: not above_zero(p[2]))  # stable: by mean gain within each part
    cells = [f"`{a}` - `{b}` {format_interval(t_interval(stat))}{' *' if above_zero(stat) else ''}"
             for a, b, stat in pairs]
    where = "the mean row" if shift == "mean" else shift
    return (f"Between blocks ({where}; 95 % t intervals of the seed-paired difference, "
            f"* where it lies above 0): " + ", ".join(cells) + ".")


def by_benchmark(rows: list[dict]) -> dict[str, list[dict]]:
    """A file's rows by benchmark (sorted): their tables never mix."""
    parts = defaultdict(list)
    for r in rows:
        parts[r["benchmark"]].append(r)
    return dict(sorted(parts.items()))


def markdown_table(rows: list[dict]) -> str:
    """The tables of `rows`; one section per benchmark when they hold several."""
    parts = by_benchmark(rows)
    lines = []
    for benchmark, part in parts.items():
        if len(parts) > 1:
            lines += [f"## {benchmark}", ""]
        lines += _benchmark_tables(part)
    lines.append("Mean ± standard error over seeds of (accuracy with adaptation restricted to "
                 "the block) - (accuracy of the unadapted source model on the same stream). "
                 "best: the block with the largest mean gain, named as far as the seeds "
                 "separate it (95 % t intervals, paired by seed): `first` beats no adaptation "
                 "and the runner-up; `first ≈ second` beats no adaptation but is not separated "
                 "from the runner-up; `(first)` has a positive mean gain not separated from no "
                 "adaptation (always so with one seed); none: no block's mean gain is above 0.")
    return "\n".join(lines) + "\n"


def _benchmark_tables(rows: list[dict]) -> list[str]:
    """The markdown lines of one benchmark's tables."""
    lines = []
    for (method, episodic, lr, images), t in relative_table(rows).items():
        mode = "episodic" if episodic else "online"
        lines += [f"### {method.upper()}, {mode}, lr {lr:g} ({images} images per stream): "
                  "test accuracy relative to no adaptation (points)", "",
                  "| shift | none (%) | " + " | ".join(t["blocks"]) + " | best |",
                  "|---|---|" + "---|" * (len(t["blocks"]) + 1)]
        for shift in t["shifts"]:
            stats = {b: t["rel"].get((shift, b), NO_STAT) for b in t["blocks"]}
            best = best_block(t, shift)
            cells = [format_stat(stats[b], signed=True) for b in t["blocks"]]
            label = f"**{shift}**" if shift == "mean" else shift
            lines.append(f"| {label} | {format_stat(t['none'].get(shift, NO_STAT))} | "
                         + " | ".join(cells) + f" | {best} |")
        lines.append("")
        if not t["blocks"]:
            lines += ["No gain to show: these are `none` streams only (no adaptation); run "
                      "the blocks to compare, e.g. `--blocks first,all`, with the same "
                      "settings.", ""]
            continue
        if not any(t["per_seed"].values()):
            lines += ["No gain to show: these streams have no `none` stream (the unadapted "
                      "model on the same shift and seed) beside them; run `--blocks none` with "
                      "the same settings.", ""]
            continue
        lines += interval_table("95 % t intervals of the same gains (seed-paired with no adaptation):",
                                t["shifts"], t["blocks"],
                                lambda s, b: t["rel"].get((s, b), NO_STAT),
                                label=lambda s: f"**{s}**" if s == "mean" else s)
        between = differences_line(t)
        if between:
            lines += [between, ""]
    return lines


def plot(rows: list[dict], path_stem: Path) -> list[Path]:
    """One panel per (benchmark, method, mode, lr, stream length): bars per block of accuracy relative to no
    adaptation, averaged over shifts (the table's mean row), with standard errors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = by_benchmark(rows)
    tables = [(benchmark, key, t) for benchmark, part in parts.items()
              for key, t in relative_table(part).items()]
    if not tables:
        return []
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.2), squeeze=False)
    for ax, (benchmark, (method, episodic, lr, images), t) in zip(axes.flat, tables):
        shift = "mean" if "mean" in t["shifts"] else t["shifts"][0]
        stats = [t["rel"].get((shift, b), NO_STAT) for b in t["blocks"]]
        means = [100 * s[0] for s in stats]
        errs = [0 if math.isnan(s[1]) else 100 * s[1] for s in stats]
        ax.bar(range(len(stats)), means, yerr=errs, color="tab:blue", capsize=2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(stats)), t["blocks"], rotation=45, ha="right", fontsize=8)
        title = f"{method.upper()} {'episodic' if episodic else 'online'}, lr {lr:g}, {images} img"
        title = f"{benchmark}: {title}" if len(parts) > 1 else title
        ax.set_title(title + ("" if shift == "mean" else f" ({shift})"), fontsize=9)
        ax.set_ylabel("points vs no adaptation", fontsize=8)
    fig.suptitle("online adaptation restricted to one block: accuracy relative to none",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def report_text(name: str, rows: list[dict]) -> str:
    """The table.md of the results file `name` holding `rows`."""
    return f"# Online adaptation results of {name}\n\n" + markdown_table(rows) + f"\n{len(rows)} streams.\n"


def write_adapt_report(results_csv: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """table.md and relative_accuracy.{png,pdf} from an adaptation results CSV."""
    results_csv = Path(results_csv)
    rows = AdaptResults(results_csv).rows  # (a stream twice is refused, as `adapt` does)
    if not rows:
        raise ResultsError(f"{results_csv} holds no results yet")
    out_dir = check_output(Path(out_dir) if out_dir else
                           results_csv.with_name(results_csv.stem + "_report"), "report folder", folder=True)
    table = out_dir / "table.md"
    text = report_text(results_csv.name, rows)
    with sole_writer(table, "report folder"):  # one report at a time; a killed one's temps go
        atomic_write_bytes(table, lambda f: f.write(text.encode()))
        return [table, *plot(rows, out_dir / "relative_accuracy")]
