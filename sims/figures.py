"""The figure pipeline: run the experiments, write their CSVs, draw PNG + PDF from the CSVs.

    make_figures(settings, out="figures", only=None, resume=False)

Every file is written atomically (a temporary file in the same folder, then a rename), so
an interrupted run never leaves a half-written CSV or image. `resume=True` skips the
experiments whose CSVs exist and were made with the same settings (recorded in
`<out>/sims_settings.json`), so a long `--draws` run that was interrupted picks up where it
stopped; an experiment recorded with other settings is run again, and `log` gets a line
naming what changed.

One run at a time writes an output folder: `make_figures` holds `hold_folder(out)` (a
`flock` on `<out>/.sims.lock`, released when the process ends, even by SIGKILL) for the
whole run, so a second `figures` or `plot` into the same folder is refused (`FolderBusy`)
instead of both rewriting `sims_settings.json` and the CSVs. Under the lock, the temporary
files a killed run left beside the outputs are removed.
"""
import contextlib
import dataclasses
import fcntl
import glob
import itertools
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import experiments, plots
from .simulator import resolve_device

# Figure -> the experiment that makes its table.
SOURCES = {"f1_t1_curves": "t1_curves", "f2_loss_vs_n": "shifts", "f3_best_layer": "shifts",
           "f4_t1_event": "t1_event", "f5_forgetting": "forgetting", "f6_auto_rgn": "shifts"}
SETTINGS_FILE = "sims_settings.json"
LOCK_FILE = ".sims.lock"


@dataclass(frozen=True)
class Table:
    """What a figure reads from one CSV table, so that `read_table` can refuse a table it
    would draw wrong. groups: the columns that name a curve, bar or cell, each with the
    values it must take (every combination must be there); grid: the column along a curve
    (every group must have the same values of it; None: one row per group); numbers: the
    columns that must be finite numbers; flags: the columns that must be True or False."""
    groups: dict
    grid: str = None
    numbers: tuple = ()
    flags: tuple = ()

    def columns(self):
        return list(dict.fromkeys([*self.groups, *[self.grid] * bool(self.grid),
                                   *self.numbers, *self.flags]))


_E = experiments
_SHIFT_GROUPS = {"activation": _E.ACTIVATIONS, "kind": tuple(_E.SHIFTS), "method": _E.METHODS}
TABLES = {
    "f1_t1_curves": Table({"activation": _E.ACTIVATIONS, "method": _E.METHODS}, "step",
                          ("step", "log10_mean", "log10_se", "draws")),
    "f2_loss_vs_n": Table({**_SHIFT_GROUPS, "n": _E.N_GRID}, None,
                          ("n", "mean", "se", "draws")),
    "f3_best_layer": Table({**_SHIFT_GROUPS, "n": (_E.N_BEST,)}, None,
                           ("n", "relative_to_all", "relative_se")),
    "f4_t1_event": Table({"n": _E.N_EVENT}, None,
                         ("n", "exact", "event_frequency", "frequency", "se", "draws",
                          "full_unconverged")),
    "f5_forgetting": Table({"method": _E.FORGETTING_METHODS,
                            "quantity": _E.FORGETTING_QUANTITIES}, "step",
                           ("step", "mean", "se", "log10_mean", "log10_se", "draws")),
    "f6_auto_rgn": Table({"activation": _E.ACTIVATIONS, "kind": tuple(_E.SHIFTS),
                          "n": (_E.N_BEST,)}, "draw",
                         ("n", "draw", "rgn_first", "rgn_last", "loss_first", "loss_last"),
                         ("agree",)),
}


def _atomic(path, write):
    """Call write(temporary path), then rename it onto `path`. The temporary file is
    `.<stem>.<8 random characters><suffix>` (`_stale_temps` finds those a kill left)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                         suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)     # mkstemp makes 0600; use the usual mode
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _stale_temps(path):
    """The temporary files `_atomic` made for `path` and did not rename or remove: those
    of a killed run. Only mkstemp's names (8 characters of [a-z0-9_]) for this path."""
    path = Path(path)
    pattern = f".{glob.escape(path.stem)}.{'[a-z0-9_]' * 8}{glob.escape(path.suffix)}"
    return sorted(path.parent.glob(pattern))


def outputs(out):
    """Every file `make_figures` may write in `out`: each figure's CSV, PNG and PDF, and
    the settings record."""
    out = Path(out)
    return [out / f"{figure}{suffix}" for figure in SOURCES
            for suffix in (".csv", ".png", ".pdf")] + [out / SETTINGS_FILE]


class FolderBusy(ValueError):
    """Another process holds the output folder (see `hold_folder`)."""


@contextlib.contextmanager
def hold_folder(out):
    """Hold the output folder `out` (which must exist) for this process while it writes
    it; a second holder, in this process or another, gets `FolderBusy` at once.

    The lock is `flock` on `<out>/.sims.lock`, which goes with the process even when it is
    killed (a lock file left by a killed run is taken over); the file records the holder's
    pid for the refusal and is removed on exit. On entry, the temporary files a killed run
    left beside the outputs are removed (no writer can be using them: we hold the lock)."""
    out = Path(out)
    lock = out / LOCK_FILE
    while True:
        try:        # O_NOFOLLOW: a symlink planted at the lock's name is not written through
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise ValueError(f"--out {out}: cannot create the lock file {lock} "
                             f"({error.strerror or error})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderBusy(f"--out {out} is being written by {holder} (lock {lock}); "
                             "wait for it to finish, or pass another --out") from None
        except OSError as error:     # a file system without locks (some network mounts)
            os.close(fd)
            raise ValueError(f"--out {out}: cannot lock {lock} ({error.strerror or error}); "
                             "pass an --out on a local file system") from None
        try:
            if os.fstat(fd).st_ino == os.lstat(lock).st_ino:
                break                # the lock file still at its path: ours
        except FileNotFoundError:
            pass
        os.close(fd)                 # removed by its last holder while we opened it: again
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        for path in outputs(out):
            for stale in _stale_temps(path):
                stale.unlink(missing_ok=True)
        yield out
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def write_csv(table, path):
    """A DataFrame as CSV (12 significant digits), atomically."""
    _atomic(path, lambda p: table.to_csv(p, index=False, float_format="%.12g"))


def save_figure(figure, paths):
    """A matplotlib figure to each path (PNG or PDF, by suffix), atomically; then closes it."""
    import matplotlib.pyplot as plt
    try:
        for path in paths:
            # No dates or versions in the metadata: the same data gives the same bytes.
            metadata = ({"CreationDate": None, "Producer": None} if str(path).endswith(".pdf")
                        else {"Software": None})
            _atomic(path, lambda p: figure.savefig(p, format=Path(path).suffix[1:],
                                                   bbox_inches="tight", metadata=metadata))
    finally:
        plt.close(figure)


def short_name(figure):
    """A figure's name as --only takes it: "f4" for "f4_t1_event"."""
    return figure.split("_")[0]


def resolve_only(only):
    """Figure names from e.g. "f1,f4" or ["f2_loss_vs_n"]; None means all."""
    if only is None:
        return list(SOURCES)
    names = only.split(",") if isinstance(only, str) else list(only)
    chosen = []
    for name in names:
        matches = [f for f in SOURCES if name.strip() in (f, short_name(f))]
        if not matches:
            raise ValueError(f"unknown figure {name!r}; expected f1..f6 or one of "
                             f"{list(SOURCES)}")
        chosen += matches
    return list(dict.fromkeys(chosen))


def output_folder(out):
    """`out` as a Path to a writable folder, created if missing; else a ValueError that
    names --out."""
    out = Path(out)
    expected = "expected a folder (created if missing) for the CSVs and figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"--out {out} is a file, not a folder; {expected}: pass another "
                         "path") from None
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create that folder ({error.strerror}); "
                         f"{expected}: pass a path you can write to") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write into that folder; {expected}: pass a "
                         "path you can write to")
    return out


def read_table(path, name):
    """The CSV table `name` (a key of TABLES) from `path`, checked against what its figure
    reads; a ValueError naming the file, and the line and column where it can, otherwise.
    Numeric columns come back as numbers and flag columns as bool."""
    spec = TABLES[name]
    try:
        table = _read_csv(path)
        _check_columns(table, spec)
        table = _parse(table, spec)
        _check_groups(table, spec)
    except ValueError as error:
        raise ValueError(f"{path}: {error}; to rewrite it, run `python -m sims figures "
                         f"--only {short_name(name)} --out {Path(path).parent}`") from None
    return table


def _read_csv(path):
    """The CSV as written; rows keep their index, so a row's line in the file is index + 2
    (blank lines hold no data and are dropped, after counting)."""
    try:
        table = pd.read_csv(path, skip_blank_lines=False)
    except (OSError, ValueError) as error:    # pandas' parse errors are ValueErrors
        raise ValueError(f"not readable as a CSV table ({str(error).strip()})") from None
    return table.dropna(how="all")


def _check_columns(table, spec):
    missing = [c for c in spec.columns() if c not in table.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; expected a table with the columns "
                         f"{spec.columns()} (this one has {list(table.columns)})")
    if table.empty:
        raise ValueError("no data rows below the header")


def _parse(table, spec):
    """Numbers and flags converted, or a ValueError naming the first bad cell."""
    table = table.copy()
    for column in spec.numbers:
        values = pd.to_numeric(table[column], errors="coerce")
        _refuse_cells(table, column, ~np.isfinite(values.astype(np.float64)), "a finite number")
        table[column] = values
    for column in spec.flags:
        flags = table[column].map(lambda v: {"True": True, "False": False}.get(str(v)))
        _refuse_cells(table, column, flags.isna(), "True or False")
        table[column] = flags.astype(bool)
    return table


def _refuse_cells(table, column, bad, expected):
    if bad.any():
        rows = table.index[bad]
        more = f" (and {len(rows) - 1} more lines)" if len(rows) > 1 else ""
        raise ValueError(f"line {rows[0] + 2}, column {column!r}: "
                         f"{_cell(table[column][rows[0]])} is not {expected}{more}")


def _cell(value):
    return "an empty cell" if pd.isna(value) else repr(str(value))


def _check_groups(table, spec):
    """Every group value allowed, no group (and grid point) twice, none missing."""
    for column, allowed in spec.groups.items():
        _refuse_cells(table, column, ~table[column].isin(allowed),
                      f"one of {list(allowed)}")
    keys = list(spec.groups) + [spec.grid] * bool(spec.grid)
    repeated = table.index[table.duplicated(keys)]
    if len(repeated):
        raise ValueError(f"line {repeated[0] + 2} repeats the {', '.join(keys)} of an "
                         "earlier line")
    present = set(table[list(spec.groups)].itertuples(index=False, name=None))
    absent = [g for g in itertools.product(*spec.groups.values()) if g not in present]
    if absent:
        more = f" (and {len(absent) - 1} more groups)" if len(absent) > 1 else ""
        raise ValueError(f"no rows for {_group(spec.groups, absent[0])}{more}")
    if spec.grid:
        _check_grid(table, spec)


def _check_grid(table, spec):
    everywhere = set(table[spec.grid])
    for group, part in table.groupby(list(spec.groups), sort=False):
        lacking = sorted(everywhere - set(part[spec.grid]))
        if lacking:
            raise ValueError(f"no row for {_group(spec.groups, group)} at {spec.grid} = "
                             f"{', '.join(str(v) for v in lacking[:5])}"
                             f"{' ...' * (len(lacking) > 5)} (other groups have rows there)")


def _group(columns, values):
    return ", ".join(f"{c} = {repr(str(v)) if isinstance(v, str) else v}"
                     for c, v in zip(columns, values))


def _recomputing(name, recorded, now):
    """The line `--resume` prints for experiment `name`, whose CSVs were made with the
    settings `recorded` and are remade with `now`, e.g.
    "f4 (t1_event): recorded draws 8, now 16: recomputing"."""
    figures = ", ".join(short_name(f) for f in SOURCES if SOURCES[f] == name)
    changed = [key for key in dict.fromkeys([*recorded, *now]) if recorded.get(key) != now.get(key)]
    if not changed:     # the CSVs are missing, not the settings changed
        return f"{figures} ({name}): a CSV is missing: recomputing"
    before = ", ".join(f"{key} {recorded.get(key)}" for key in changed)
    after = ", ".join(f"{now.get(key)}" if len(changed) == 1 else f"{key} {now.get(key)}"
                      for key in changed)
    return f"{figures} ({name}): recorded {before}, now {after}: recomputing"


def make_figures(settings, out="figures", only=None, resume=False, log=print, simulate=True):
    """Run the experiments behind the chosen figures and write CSV, PNG and PDF to `out`.

    Args:
        settings: `experiments.Settings`.
        out: output folder (created if missing).
        only: figures to make (see `resolve_only`); default all six.
        resume: reuse the CSVs of experiments already run with the same settings; an
            experiment recorded with other settings is run again, and `log` gets a line
            naming what changed.
        log: where to print the summary line (and --resume's lines).
        simulate: False only redraws from the CSVs already in `out`.
    Returns: the list of paths written.
    Raises: `FolderBusy` while another run writes `out`.
    """
    if not simulate and not Path(out).exists():  # nothing to redraw: leave no empty folder
        raise FileNotFoundError(f"--out {out} does not exist, so it holds no CSVs to redraw; "
                                f"run `python -m sims figures --out {out}` first")
    out = output_folder(out)
    figures = resolve_only(only)
    if settings.device == "auto":  # recorded as where it ran: --resume on a GPU redoes CPU CSVs
        settings = dataclasses.replace(settings, device=resolve_device("auto").type)
    with hold_folder(out):
        return _make_figures(settings, out, figures, resume, log, simulate)


def _make_figures(settings, out, figures, resume, log, simulate):
    needed = list(dict.fromkeys(SOURCES[f] for f in figures))
    recorded_path = out / SETTINGS_FILE
    recorded = json.loads(recorded_path.read_text()) if recorded_path.exists() else {}
    todo = [name for name in needed if simulate
            and not (resume and recorded.get(name) == settings.as_dict()
                     and all((out / f"{f}.csv").exists() for f in SOURCES if SOURCES[f] == name))]
    if resume:
        for name in todo:
            if recorded.get(name) is not None:
                log(_recomputing(name, recorded[name], settings.as_dict()))
    missing = [f for f in figures if not simulate and not (out / f"{f}.csv").exists()]
    if missing:
        present = [short_name(f) for f in figures if f not in missing]
        hint = f", or draw only those there with --only {','.join(present)}" if present else ""
        raise FileNotFoundError(f"no CSV for {missing} in {out}/; run `python -m sims figures "
                                f"--out {out}`{hint}")
    start, written = time.perf_counter(), []
    total = sum(experiments.units(name) for name in todo)
    with tqdm(total=total, desc="simulating", unit="batch", disable=total == 0) as progress:
        for name in todo:
            progress.set_description(f"simulating {name}")
            tables = experiments.EXPERIMENTS[name](settings, progress)
            # Forget the old settings before replacing any CSV: an interruption between two
            # of this experiment's CSVs must not let --resume keep a mix of old and new.
            if recorded.pop(name, None) is not None:
                _atomic(recorded_path,
                        lambda p: Path(p).write_text(json.dumps(recorded, indent=1, sort_keys=True)))
            for table_name, table in tables.items():
                write_csv(table, out / f"{table_name}.csv")
                written.append(out / f"{table_name}.csv")
            recorded[name] = settings.as_dict()
            _atomic(recorded_path, lambda p: Path(p).write_text(json.dumps(recorded, indent=1, sort_keys=True)))
    # An experiment makes the tables of several figures (F2, F3, F6 share one): redraw every
    # figure whose CSV was just rewritten, so no PNG is left beside a CSV it was not drawn from.
    figures += [f for f in SOURCES if SOURCES[f] in todo and f not in figures]
    for figure_name in tqdm(figures, desc="drawing", unit="figure"):
        tables = {t: read_table(out / f"{t}.csv", t) for t in plots.FIGURES[figure_name]}
        paths = [out / f"{figure_name}.png", out / f"{figure_name}.pdf"]
        save_figure(plots.draw(figure_name, tables), paths)
        written += paths
    what = (f"{settings.draws} draws, {settings.steps} steps, {settings.dtype}, {settings.device}"
            if todo else "drawn from existing CSVs")
    log(f"wrote {len(written)} files to {out}/ in {time.perf_counter() - start:.0f} s ({what})")
    return written
