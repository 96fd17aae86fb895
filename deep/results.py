"""The results-row schema of a sweep: one dataclass knows its columns, key and parsing.

A results CSV has the header `ResultRow.columns()` and one row per finished cell.
`read_results` parses it strictly: a row that is cut short, has the wrong number of
fields, or holds a value that does not parse as its column's type stops the reading
with the file, the line number and what is wrong (a sweep killed mid-write can never
leave such a row, see `ResultsFile`; a hand-edited or truncated copy can).
Rows travel as plain dicts (`ResultRow.to_dict`), which the report and bench read.

The learning-rate selection rule is written here once (`selection_metric`, `best_row`,
`best_lr`): the report, the two-stage sweep and the scripts all pick by it.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import types
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import ResultsError, clash_text
from .files import CHECKOUT, atomic_write_text


@dataclass(frozen=True)
class ResultRow:
    """One finished cell: what identifies it, what it measured, the settings it ran with."""

    benchmark: str
    shift: str
    method: str
    seed: int
    n_target: int
    lr: float
    status: str
    best_epoch: int
    val_acc: float | None
    val_worst_group_acc: float | None
    test_acc: float | None
    worst_group_acc: float | None
    tuned_params: int
    total_params: int
    seconds: float
    arch: str
    epochs: int
    batch_size: int
    weight_decay: float
    select: str
    val_per_class: int
    test_per_class: int
    checkpoint: str
    start_stage: int | None = None
    # Provenance and the settings added after the first committed tables; empty in rows
    # read from a file with the older header (LEGACY_COLUMNS): unknown there.
    patience: int | None = None
    precision: str | None = None  # "float32", or "bf16-autocast" (--amp on CUDA)
    device: str | None = None     # "cpu", "cuda", ... (the torch device type)
    commit: str | None = None     # the code's git commit; "+dirty" if deep/ had edits
    # Where the cell ran (the CPU model and the ISA torch dispatches to, or the GPU, and the
    # torch build): the same seed gives the same numbers on the same kind of machine only;
    # another CPU picks other kernels (docs/fmnist.md#same-seed-same-numbers).
    machine: str | None = None

    KEY = ("benchmark", "shift", "method", "seed", "n_target", "lr")
    # Settings that must agree between a finished row and the sweep that would skip it
    # (a legacy row's empty patience / precision is not compared: it is unknown).
    SETTINGS = ("arch", "epochs", "batch_size", "weight_decay", "select", "val_per_class",
                "test_per_class", "checkpoint", "patience", "precision")
    PROVENANCE = ("patience", "precision", "device", "commit", "machine")
    # What a cell measured: a rerun with the same seed on the same kind of machine must
    # give each of these bit for bit (scripts/fmnist_reproduce.py, compare_results.py).
    OUTCOME = ("status", "best_epoch", "val_acc", "val_worst_group_acc", "test_acc",
               "worst_group_acc")
    STATUSES = ("ok", "diverged")

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, values: list[str], where: str) -> "ResultRow":
        """A row from its CSV fields; `where` ("file, line N") prefixes every error."""
        names = cls.columns()
        if len(values) != len(names):
            raise ResultsError(f"{where}: {len(values)} fields, expected {len(names)} "
                               f"({', '.join(names)}); the row is truncated or malformed")
        kinds = _column_types(cls)
        parsed = {name: _parse_value(text, kinds[name], name, where)
                  for name, text in zip(names, values)}
        row = cls(**parsed)
        if row.status not in cls.STATUSES:
            raise ResultsError(f"{where}: status {row.status!r} is not one of {cls.STATUSES}")
        return row

    @classmethod
    def from_dict(cls, row: dict) -> "ResultRow":
        return cls(**{name: row.get(name) for name in cls.columns()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fields(self) -> list[str]:
        """The CSV fields: floats as repr (exact round trip), None as empty."""
        return [_format(getattr(self, name)) for name in self.columns()]

    @property
    def key(self) -> tuple:
        return row_key(self.to_dict())


COLUMNS = ResultRow.columns()
# Older headers, still read (their missing columns empty): before the provenance columns
# (the committed 4-epoch table), and before `machine` (the committed converged tables).
LEGACY_COLUMNS = COLUMNS[:COLUMNS.index("patience")]
OLDER_HEADERS = (LEGACY_COLUMNS, COLUMNS[:COLUMNS.index("machine")])
KEY = ResultRow.KEY
SETTINGS = ResultRow.SETTINGS


def same_checkpoint(recorded, now) -> bool:
    """Whether a results row's source model is the one of this run. The same file may
    sit at another path on another checkout or machine (committed results resumed
    elsewhere), so only the file names are compared."""
    return Path(str(recorded)).name == Path(str(now)).name


def recorded_checkpoint(path: str) -> str:
    """How a results row names its source model: a file inside this checkout (the
    committed models in deep/weights/) relative to it, so that committed results name
    no machine's folders; any other path as given."""
    try:
        return Path(path).resolve().relative_to(CHECKOUT).as_posix()
    except ValueError:
        return str(path)


def settings_clash(row: dict, settings: dict) -> dict:
    """{column: (row's, settings')} of the SETTINGS in which a row differs from `settings`
    (another row, or a sweep's). An empty provenance value (a legacy row) is unknown and
    not compared; source models by file name (`same_checkpoint`)."""
    clash = {k: (row[k], settings[k]) for k in SETTINGS if k != "checkpoint" and row[k] != settings[k]
             and not (k in ResultRow.PROVENANCE and None in (row[k], settings[k]))}
    if not same_checkpoint(row["checkpoint"], settings["checkpoint"]):
        clash["checkpoint"] = (row["checkpoint"], settings["checkpoint"])
    return clash


def check_one_protocol(rows: list[dict], path) -> None:
    """ResultsError unless the rows of each benchmark ran with one set of SETTINGS. A
    table picks each cell's learning rate among its rows by validation accuracy: rows
    of two protocols (other epochs, split sizes, source model) would compete on unlike
    numbers and give a table of neither. A sweep refuses to write such a file; a merged
    or hand-edited one is refused here, before any table is drawn."""
    known: dict[str, dict] = {}
    for row in rows:
        first = known.setdefault(row["benchmark"], dict(row))
        clash = settings_clash(first, row)
        if clash:
            raise ResultsError(
                f"{path} mixes {row['benchmark']} rows of two protocols: cell {row_key(first)} "
                f"(first) and cell {row_key(row)} (second) differ in "
                f"{clash_text(clash, sides=('first', 'second'))}; "
                "learning rates chosen across them would compare unlike validation numbers. "
                "Report each protocol's rows from its own file (a sweep's --out)")
        for k in ResultRow.PROVENANCE:  # a legacy row's unknown value, now known
            if first.get(k) is None:
                first[k] = row[k]


def outcome_differences(old: dict, new: dict) -> dict:
    """{column: (old, new)} for each of `ResultRow.OUTCOME` where two rows of one cell
    differ. Floats as `read_results` gives them: equal means the same bits."""
    return {c: (old.get(c), new.get(c)) for c in ResultRow.OUTCOME if old.get(c) != new.get(c)}


def row_key(row: dict) -> tuple:
    """The cell a row (dict) belongs to; equal to `Cell.key` of the cell that made it."""
    return tuple(row[k] if k != "lr" else float(row[k]) for k in KEY)


# --- selection: what picks a cell's epoch (train.fit) and its learning rate (here) ---

SELECT_VAL_ACC = "val_acc"
SELECT_WORST_GROUP = "worst_group_val_acc"
SELECTION_RULES = (SELECT_VAL_ACC, SELECT_WORST_GROUP)  # a row's `select`, TrainConfig.select


def selection_metric(row: dict) -> float | None:
    """The validation metric that picks a row's learning rate: `val_worst_group_acc`
    when its `select` is worst-group, else `val_acc`. None when the row has none (a cell
    with no finished epoch) or it is NaN: such a row never wins."""
    value = row.get("val_worst_group_acc" if row.get("select") == SELECT_WORST_GROUP
                    else "val_acc")
    return None if value is None or math.isnan(value) else value


def _rank(metric: float, lr: float) -> tuple[float, float]:
    """The order learning rates compete in: the better metric; on a tie, the larger lr."""
    return (metric, float(lr))


def best_lr(metrics: dict[float, float]) -> float:
    """The lr of `metrics` ({lr: metric}, e.g. a mean over seeds) that wins: the best
    metric, ties to the larger lr."""
    return max(metrics, key=lambda lr: _rank(metrics[lr], lr))


def best_row(rows: list[dict]) -> dict | None:
    """The winner among rows that compete for one lr choice (e.g. one benchmark, shift,
    method, seed, n_target): the best `selection_metric`, ties to the larger lr (the first
    such row if two share an lr). None if no row has a metric."""
    scored = [row for row in rows if selection_metric(row) is not None]
    return max(scored, key=lambda r: _rank(selection_metric(r), r["lr"]), default=None)


@functools.cache
def _column_types(cls) -> dict[str, tuple[type, bool]]:
    """Column -> (base type, whether empty is allowed), from the annotations; once per
    class (evaluating the annotations took 10 ms a row: 7 s to read a 668-row file)."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            kinds[name] = next(a for a in args if a is not type(None)), True
        else:
            kinds[name] = hint, False
    return kinds


def _parse_value(text: str, kind: tuple[type, bool], name: str, where: str):
    base, optional = kind
    if text == "":
        if optional:
            return None
        raise ResultsError(f"{where}: column {name!r} is empty; it needs a {base.__name__}")
    try:
        return base(text)
    except ValueError:
        raise ResultsError(f"{where}: column {name!r} holds {text!r}, "
                           f"which is not a {base.__name__}") from None


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def check_not_a_directory(path: Path) -> None:
    """A results file given as a folder (`--out runs/`) is an error that says what to give."""
    if path.is_dir():
        raise ResultsError(f"{path} is a folder; a results file is expected "
                           f"(e.g. {path / 'results.csv'})")


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results CSV as dicts, values parsed (ints, floats; empty -> None).

    A missing or empty file has no rows. Raises ResultsError for another header and
    for the first malformed row (with its line number)."""
    path = Path(path)
    if not path.exists():
        return []
    check_not_a_directory(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not a text file, so not a results CSV (a sweep's --out "
                           "is one)") from None
    if not text.strip():
        return []
    if not text.endswith("\n"):
        # Every row a sweep writes ends with a newline: a missing one means a cut-off copy.
        last = len(text.splitlines())
        raise ResultsError(f"{path}, line {last}: the file ends in the middle of a row "
                           "(no final newline); it was truncated")
    reader = csv.reader(io.StringIO(text))
    header = tuple(next(reader))
    if header != COLUMNS and header not in OLDER_HEADERS:
        raise ResultsError(f"{path}: columns {list(header)} are not a results CSV's of "
                           f"`deep sweep` or `bench` ({', '.join(COLUMNS[:4])}, ... "
                           f"{len(COLUMNS)} columns) nor of `deep adapt`: not a file to report "
                           "on, nor one a sweep may write into (give another --out)")
    missing = [""] * (len(COLUMNS) - len(header))  # a legacy file: provenance unknown
    return [ResultRow.parse(values + missing if len(values) == len(header) else values,
                            f"{path}, line {reader.line_num}").to_dict()
            for values in reader]


def results_text(rows: list[dict]) -> str:
    """The CSV text of `rows` (dicts with every column), header first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(ResultRow.from_dict(row).fields())
    return buffer.getvalue()


class ResultsFile:
    """A results CSV owned by one writer; every append rewrites it atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows = read_results(self.path)
        self.done = {row_key(r): r for r in self.rows}
        if len(self.done) != len(self.rows):
            twice = next(k for k, n in Counter(map(row_key, self.rows)).items() if n > 1)
            raise ResultsError(f"{self.path} holds duplicated cells, e.g. {twice}, so a sweep "
                               f"did not write it: keep one row per ({', '.join(KEY)}), "
                               "or pass another --out")

    def append(self, row: dict) -> None:
        key = row_key(row)
        if key in self.done:
            raise ResultsError(f"cell {key} is already in {self.path}")
        self.rows.append(row)
        self.done[key] = row
        atomic_write_text(self.path, results_text(self.rows))
