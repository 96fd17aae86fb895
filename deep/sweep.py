"""The sweep runner: cells, one atomic CSV row per finished cell, resume, workers.

A cell is (benchmark, shift, method, lr, seed, n_target). Cells that share a task
(benchmark, shift, seed, n_target) form a group: a group loads the target data
and the pretrained weights once, builds one `PrefixCache`, and runs its cells
one after the other from the same pretrained state.

Results: one CSV row per finished cell (`deep.results.ResultRow`). After each cell
the whole file is rewritten to a temp file and renamed over the old one
(`os.replace`), by a single writer (the main process), so a kill -9 loses at most
the cells in flight and never leaves a broken or duplicated row. Re-running the
same command skips the cells already in the file. A NaN/inf loss gives a row
with status `diverged` and the sweep goes on. The resolved configuration of every
protocol that wrote rows is kept beside the CSV, in `<out>.config.json`.

Dispatch: `execute_groups(groups, spec, record, workers)` runs the task groups (in
this process or in worker processes); `run_group(cells, **spec)` is the picklable
entry a worker (local or remote) calls, yielding one row (dict) per cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import queue
import signal
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .allocator import keep_freed_memory
from .blocks import blocks_for
from .checkpoints import RANDOM_INIT, load_model
from .data import Benchmark, ShiftTask, get_benchmark
from .errors import (ConfigError, ResultsError, check_each_once, check_int, check_nonnegative,
                     clash_text, differences)
from .files import (atomic_write_text, check_output, code_commit, machine, manifest_path,
                    sha256_file, sole_writer)
from .methods import method_names
from .models import build_model, get_architecture
from .models.staged import stages_of
from .normalization import check_data_options, loader_options, numbers_part
from .pretrain import cached_source_model
from .protocol import Protocol
from .results import (COLUMNS, KEY, SETTINGS, ResultRow, ResultsFile, read_results,  # noqa: F401
                      recorded_checkpoint, row_key, same_checkpoint, settings_clash)
from .train import DEFAULT_CACHE_MB, FitResult, PrefixCache, amp_active, fit, resolve_device

DEFAULT_WORKERS = 1  # local processes (--workers); Ray places task groups itself


@dataclass(frozen=True)
class Cell:
    benchmark: str
    shift: str
    method: str
    lr: float
    seed: int
    n_target: int

    @property
    def key(self) -> tuple:
        return (self.benchmark, self.shift, self.method, self.seed, self.n_target, float(self.lr))


# --- planning ---------------------------------------------------------------------

def plan_cells(protocol: Protocol) -> list[Cell]:
    """Every cell of the protocol, grouped by task (shift, seed), methods x lrs inside."""
    return [Cell(protocol.benchmark, shift, method, float(lr), int(seed), protocol.n_target)
            for shift in protocol.shifts for seed in protocol.seeds
            for method in protocol.methods for lr in protocol.lrs]


def check_protocol(protocol: Protocol, bench: Benchmark) -> None:
    """Unknown methods, shifts, or bad numbers -> ConfigError naming them."""
    known_methods = method_names(blocks_for(protocol.arch))
    bad = [m for m in protocol.methods if m not in known_methods]
    if bad:
        raise ConfigError(f"unknown method(s) {bad} for {protocol.arch}; known: {', '.join(known_methods)}")
    bench.check_shifts(protocol.shifts)
    check_data_options(bench.load_task, bench.name, protocol.target_options)
    for name in ("shifts", "methods", "lrs", "seeds"):
        values = getattr(protocol, name)
        if not values:
            raise ConfigError(f"{name} is empty: nothing to run")
        check_each_once(name, values, float if name == "lrs" else None)


def quick(protocol: Protocol) -> Protocol:
    """A smoke test of the pipeline, not a result: the first shift and seed, the grid's
    middle learning rate, at most 2 epochs. Every method still runs."""
    lrs = sorted(protocol.lrs)
    return protocol.replace(shifts=protocol.shifts[:1], seeds=protocol.seeds[:1],
                            lrs=[lrs[len(lrs) // 2]], epochs=min(protocol.epochs, 2))


def resolve_checkpoint(bench: Benchmark, arch: str, checkpoint: str | None,
                       data_dir: str | None) -> str:
    """--checkpoint if given, else the benchmark's own source model, else an error."""
    if checkpoint:
        if checkpoint == RANDOM_INIT:
            return checkpoint
        path = Path(checkpoint).expanduser()  # `--checkpoint=~/w.pt` keeps its ~ (as --data-dir does)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "file not found"
            raise ConfigError(f"checkpoint {what}: {path} (omit --checkpoint for "
                              "the benchmark's own source model, if it has one, or pass "
                              f"--checkpoint {RANDOM_INIT} to start from random weights)")
        return str(path)
    if bench.pretrained is not None:
        return str(bench.pretrained(arch, Path(data_dir) if data_dir else None))
    if bench.source_recipe is not None:
        return str(cached_source_model(bench, arch))
    if get_architecture(arch).needs_init:  # CLIP: pretrain itself starts from a prepared file
        source = (f"a {arch} checkpoint from CLIP's weights: `python -m deep.clip prepare --weights "
                  f"FILE --num-classes N --out PATH`, docs/vit-wilds.md")
    else:
        source = (f"a source model, e.g. from `python -m deep pretrain --benchmark {bench.name} "
                  "--out PATH`")
    raise ConfigError(f"benchmark {bench.name!r} needs --checkpoint PATH ({source}), or "
                      "--checkpoint none for a random-init smoke test")


def check_pretrain_table(protocol: Protocol, checkpoint: str) -> None:
    """The benchmark's own source model must be the one its [pretrain] table describes:
    that table is saved beside the results as how the model was made. The model's
    manifest records the settings that trained it (`config.pretrain`); a table that says
    otherwise (edited after the model was made, or a benchmark that shares another's
    model without its table) is refused, not recorded. A model whose manifest has no
    such record is not compared; nor are settings the manifest predates."""
    path = manifest_path(checkpoint)
    try:
        made = json.loads(path.read_text())["config"]["pretrain"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    table = dataclasses.asdict(protocol.pretrain)
    clash = differences(made, {k: v for k, v in table.items() if k in made})
    if clash:
        text = ", ".join(f"{k}: model {a!r}, table {b!r}" for k, (a, b) in clash.items())
        raise ConfigError(
            f"the [pretrain] table of deep/configs/{protocol.benchmark}.toml does not describe "
            f"{protocol.benchmark}'s source model {checkpoint} ({text}; {path.name}), and the "
            "sweep would record the table as how that model was made: make the table match "
            "the model, or train one with the table (python -m deep pretrain --benchmark "
            f"{protocol.benchmark} --out PATH) and pass --checkpoint PATH")


# --- running ----------------------------------------------------------------------

@dataclass
class SweepSummary:
    ran: int
    skipped: int
    diverged: int
    seconds: float
    out: Path


def run_sweep(protocol: Protocol, out: str | Path, checkpoint: str | None = None,
              data_dir: str | None = None, workers: int = DEFAULT_WORKERS,
              cache_mb: float = DEFAULT_CACHE_MB,
              progress: bool = True, device: str | None = None,
              trust_checkpoint: bool = False, executor=None, amp: bool = False,
              on_row=None) -> SweepSummary:
    """Run every unfinished cell of `protocol`, appending one row per cell to `out`.

    Args:
        protocol: what to run (see `deep.protocol`); every (shift, seed) x methods x lrs.
        out: results CSV, created or resumed.
        checkpoint: source model file, or "none" (random init); None: the benchmark's own.
        data_dir: the benchmark's data folder (None: its default location).
        workers: parallel processes (torch threads are split between them).
        cache_mb: prefix-cache memory budget per process.
        device: "auto" (default: CUDA when present, else CPU), "cpu", "cuda", ...
        trust_checkpoint: read the checkpoint with full unpickling (it may run code);
            only for a trusted file that safe loading refuses (see deep.checkpoints).
        executor: another backend's dispatch, called as executor(cells, spec, record)
            with the unfinished cells (e.g. `deep.ray_backend.RayExecutor`); None: local
            processes (`workers`).
        amp: bf16 autocast on CUDA (`TrainConfig.amp`; no effect on CPU).
        on_row: called with each finished row before it is written; the row also
            carries "history", the run's per-epoch records (`FitResult.history`),
            which the results CSV leaves out (`deep.convergence.CurvesFile` keeps them).
    """
    t0 = time.perf_counter()
    bench = get_benchmark(protocol.benchmark)
    check_protocol(protocol, bench)
    if bench.check_data_dir is not None:  # before a Ray cluster starts or a model trains
        bench.check_data_dir(data_dir)
    if executor is None:    # a missing folder or a partial download: stop now, not hours later
        bench.check_local_data(data_dir, protocol.shifts)
    check_int("workers", workers)
    check_nonnegative("cache_mb", cache_mb)
    if executor is None:
        resolve_device(device)      # before any data loads; another backend's nodes may differ
    out = check_output(out)  # "~" expanded: the CSV, its lock and its configuration agree
    # one writer per results file: a second sweep into it is refused (deep.files.sole_writer)
    with sole_writer(out):
        results = ResultsFile(out)
        # other settings are refused before the source model is resolved (it may be trained)
        check_same_configuration(out, protocol.resolved(), bool(results.rows), source_model=False)
        own_model = checkpoint is None  # the benchmark's: its [pretrain] table describes it
        checkpoint = resolve_checkpoint(bench, protocol.arch, checkpoint, data_dir)
        if own_model:
            check_pretrain_table(protocol, checkpoint)
        entry = _check_resumable(results, protocol, checkpoint,
                                 expected_precision(device, amp, executor is None), own_model)
        cells = plan_cells(protocol)
        todo = [cell for cell in cells if cell.key not in results.done]
        spec = dict(protocol=protocol, checkpoint=checkpoint, data_dir=data_dir, cache_mb=cache_mb,
                    device=device, trust_checkpoint=trust_checkpoint, amp=amp, commit=code_commit())
        writer = _RowWriter(results, entry, on_row)
        if todo:  # nothing to run: no workers, no Ray
            with _session(executor, device):
                # after Ray has connected (or failed to): the bar counts cells, not set-up
                with writer.progress(len(todo), progress, protocol.benchmark, len(cells) - len(todo)):
                    if executor is not None:
                        executor(todo, spec, writer.record)  # it groups cells for its resources
                    else:
                        execute_groups(group_cells(todo, workers), spec, writer.record, workers)
        return SweepSummary(len(todo), len(cells) - len(todo), writer.diverged,
                            time.perf_counter() - t0, out)


def _check_resumable(results: ResultsFile, protocol: Protocol, checkpoint: str,
                     precision: str | None, own_model: bool = True) -> dict:
    """Refuse to add this sweep's cells to a file of another protocol; returns the resolved
    configuration entry to record beside it.

    Every row of this benchmark counts, not only the cells skipped: new cells beside rows
    that ran otherwise would make the report pick learning rates across two protocols. The
    configurations recorded beside the file say more than the rows (data options, the
    checkpoint's contents), so they are compared first."""
    entry = resolved_entry(protocol, checkpoint, own_model)
    check_same_configuration(results.path, entry, rows_exist=bool(results.rows))
    settings = _settings(protocol, checkpoint, precision)  # what a finished row must agree on
    for row in results.rows:
        if row["benchmark"] == protocol.benchmark:
            _check_same_settings(row, settings, results.path)
    return entry


class _RowWriter:
    """Writes each finished cell's row (this process alone writes the results file), with
    the resolved configuration beside the file and a progress bar."""

    def __init__(self, results: ResultsFile, entry: dict, on_row=None):
        self.results, self.entry, self.on_row = results, entry, on_row
        self.rows_exist = bool(results.rows)
        self.configuration_saved, self.diverged, self.bar = False, 0, None

    @contextlib.contextmanager
    def progress(self, total: int, enabled: bool, name: str, done: int = 0):
        self.bar = _progress(total, enabled, name, done)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.close()

    def record(self, row: dict) -> None:
        if not self.configuration_saved:
            # with the first new row: a sweep stopped before any cell ran (a bad option
            # found on a node, a missing data folder) leaves no file behind
            save_resolved_config(self.results.path, self.entry, rows_exist=self.rows_exist)
            self.configuration_saved = True
        if self.on_row is not None:
            self.on_row(row)
        self.results.append(row)
        self.diverged += row["status"] == "diverged"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{row['shift']} {row['method']} lr={row['lr']:g} "
                                     f"val={_pct(row['val_acc'])} test={_pct(row['test_acc'])}")
            self.bar.update()


def execute_groups(groups: list[list[Cell]], spec: dict, record, workers: int = 1) -> None:
    """Run every group with `run_group(group, **spec)` and pass each row to `record`
    (in this process, which alone writes the results file). workers > 1: that many
    worker processes, torch threads split between them."""
    if workers == 1:
        for group in groups:
            for row in run_group(group, **spec):
                record(row)
    else:
        _run_parallel(groups, spec, workers, record)


def _check_same_settings(row: dict, settings: dict, out) -> None:
    """A row of this sweep's benchmark must have run with this sweep's settings."""
    # None on either side is unknown (a legacy row; precision on another backend): not
    # compared; the same model file may sit at another path on another machine
    clash = settings_clash(row, settings)
    if clash:
        raise ResultsError(f"{out} already holds cell {row_key(row)} with other settings "
                           f"({clash_text(clash)}); write this sweep to another --out")


def config_path(out: str | Path) -> Path:
    """Where the resolved configurations of a results CSV are kept."""
    out = Path(out)
    return out.with_name(out.name + ".config.json")


# What two sweeps into one results file may change: the grid. The rest must agree for a
# benchmark (training settings, data options, the source model), or one table would mix
# protocols. The source model is compared by its file (name, or contents where both sweeps
# recorded a checksum), not by the [pretrain] table that may or may not have made it.
GRID = ("methods", "lrs", "seeds", "shifts", "n_target")
SOURCE_MODEL = ("pretrain", "source_data", "checkpoint", "checkpoint_sha256")


def resolved_entry(protocol: Protocol, checkpoint: str, own_model: bool = True) -> dict:
    """This sweep's resolved configuration, as saved in `<out>.config.json`. The
    protocol's [pretrain] table and source data describe the benchmark's own source
    model only (`own_model`): beside a --checkpoint of the user's they are left out,
    since they did not make it (its file and sha256 say what it is)."""
    entry = {**protocol.resolved(), "checkpoint": recorded_checkpoint(checkpoint)}
    if not own_model:
        entry = {k: v for k, v in entry.items() if k not in ("pretrain", "source_data")}
    if checkpoint != RANDOM_INIT:
        entry["checkpoint_sha256"] = sha256_file(checkpoint)
    return entry


def read_configurations(out: str | Path) -> list[dict]:
    """The configurations recorded beside a results file (none if there is no such file)."""
    path = config_path(out)
    if not path.is_file():
        return []
    try:
        known = json.loads(path.read_text())["configurations"]
        if not isinstance(known, list) or not all(isinstance(c, dict) for c in known):
            raise TypeError("'configurations' is not a list of tables")
    except (ValueError, KeyError, TypeError) as err:
        raise ResultsError(f"{path} is not a sweep's configuration record ({err}); fix it, or "
                           f"remove it to describe the rows of {out} afresh") from None
    return known


def check_same_configuration(out: str | Path, entry: dict, rows_exist: bool,
                             source_model: bool = True) -> None:
    """ResultsError unless every configuration recorded beside `out` for this benchmark
    differs from `entry` in its grid only (see GRID). `source_model=False` leaves the
    checkpoint out (a check before it is resolved, which may train one)."""
    if not rows_exist:
        return
    for known in read_configurations(out):
        if known.get("benchmark") != entry["benchmark"]:
            continue
        shared = (entry.keys() & known.keys()) - set(GRID) - set(SOURCE_MODEL)
        clash = {k: (known[k], entry[k]) for k in sorted(shared)
                 if _numbers_part(k, known[k]) != _numbers_part(k, entry[k])}
        if source_model:
            clash.update(_source_model_clash(known, entry))
        if clash:
            raise ResultsError(f"{out} holds {entry['benchmark']} rows of a sweep with other "
                               f"settings ({clash_text(clash)}; recorded in {config_path(out)}); write "
                               "this sweep to another --out")


def _numbers_part(key: str, value):
    """What of a recorded setting can change the numbers: a data table without its
    speed-only options."""
    if key in ("source_data", "target_data") and isinstance(value, dict):
        return numbers_part(value)
    return value


def _source_model_clash(known: dict, entry: dict) -> dict:
    was, now = known.get("checkpoint_sha256"), entry.get("checkpoint_sha256")
    if was is None or now is None:     # an older record, or random init: names only
        if not same_checkpoint(known.get("checkpoint"), entry["checkpoint"]):
            return {"checkpoint": (known.get("checkpoint"), entry["checkpoint"])}
    elif was != now:
        return {"checkpoint": (f"{known['checkpoint']} (sha256 {was[:12]})",
                               f"{entry['checkpoint']} (sha256 {now[:12]})")}
    return {}


def save_resolved_config(out: str | Path, entry: dict, rows_exist: bool) -> Path:
    """Add this sweep's resolved configuration (`resolved_entry`) to `<out>.config.json`
    (once per distinct configuration; several sweeps may write into one results file).
    Without rows in the results file (gone, or empty) the list starts afresh: it
    describes the rows that exist."""
    path = config_path(out)
    known = read_configurations(out) if rows_exist else []
    if entry not in known:
        known.append(entry)
        atomic_write_text(path, json.dumps({"configurations": known}, indent=2) + "\n")
    return path


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _session(executor, device):
    """The executor's connection for the sweep, where it has one (Ray's: checks the options,
    then connects or starts a local instance); nothing for local processes."""
    session = getattr(executor, "session", None)
    return contextlib.nullcontext() if session is None else session(device)


def _progress(total, enabled, name, done=0):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm
    # a resumed sweep says so from its first line, not only in its closing summary
    resumed = f" (resumed: {done} done before)" if done else ""
    return tqdm(total=total, desc=f"sweep {name}{resumed}", unit="cell")


def _settings(protocol: Protocol, checkpoint: str, precision: str | None) -> dict:
    """The row's SETTINGS columns: what a resumed sweep must agree on."""
    values = {name: getattr(protocol, name) for name in SETTINGS
              if name not in ("checkpoint", "precision")}
    return {**values, "weight_decay": float(protocol.weight_decay),
            "checkpoint": recorded_checkpoint(checkpoint), "precision": precision}


def precision(device: str, amp: bool) -> str:
    """What the forward passes compute in: `--amp` is bf16 autocast on CUDA only."""
    return "bf16-autocast" if amp_active(device, amp) else "float32"


def expected_precision(device: str | None, amp: bool, on_this_host: bool) -> str | None:
    """The precision the cells will run in, or None where this process cannot know it:
    `--amp` with device "auto" on another backend's workers, which may or may not have
    a GPU (then a resumed row's precision is not compared)."""
    if not amp:
        return "float32"
    if on_this_host:
        return precision(resolve_device(device), amp)
    return None if device in (None, "auto") else precision(device, amp)


def group_cells(cells: list[Cell], workers: int) -> list[list[Cell]]:
    """Cells grouped by task; with more workers than tasks, tasks are split (each part
    then builds its own prefix cache) so that every worker has work."""
    by_task: dict[tuple, list[Cell]] = {}
    for cell in cells:
        by_task.setdefault((cell.shift, cell.seed, cell.n_target), []).append(cell)
    groups = list(by_task.values())
    if groups and len(groups) < workers:
        parts = math.ceil(workers / len(groups))
        groups = [g[i::parts] for g in groups for i in range(parts) if g[i::parts]]
    return groups


@lru_cache(maxsize=4)
def pretrained_state(checkpoint: str, arch: str, num_classes: int, in_channels: int,
                     trust_checkpoint: bool = False):
    """The pretrained weights, read from disk once per process."""
    with warnings.catch_warnings():
        if checkpoint == RANDOM_INIT:
            warnings.simplefilter("always")
        model = load_model(checkpoint, arch, num_classes, in_channels,
                           trust_checkpoint=trust_checkpoint)
    return {k: v.clone() for k, v in model.state_dict().items()}


@dataclass
class PreparedTask:
    """One task ready for its cells: the data, the source model (perturbed where the
    benchmark says so) on its device, a copy of those weights to reset each cell to, and
    the prefix cache of its frozen stages (None for a model that is not staged)."""
    task: ShiftTask
    model: nn.Module
    base_state: dict
    cache: PrefixCache | None


def prepare_task(protocol: Protocol, benchmark: str, shift: str, n_target: int, seed: int,
                 data_dir: str | None, checkpoint: str, cache_mb: float, device: str,
                 trust_checkpoint: bool = False, pretrained: dict | None = None,
                 amp: bool = False) -> PreparedTask:
    """What every cell of one (benchmark, shift, n_target, seed) shares: see PreparedTask."""
    bench = get_benchmark(benchmark)
    task = bench.load_task(Path(data_dir) if data_dir else None, shift, n_target,
                           protocol.val_per_class, protocol.test_per_class, seed,
                           **loader_options(bench.load_task, bench.name, protocol.arch,
                                            protocol.target_options))
    if task.num_classes != bench.num_classes:
        raise ConfigError(f"{bench.name}/{shift}: task has {task.num_classes} classes, "
                         f"the benchmark says {bench.num_classes}")
    model = build_model(protocol.arch, bench.num_classes, bench.in_channels)
    if pretrained is None:
        pretrained = pretrained_state(checkpoint, protocol.arch, bench.num_classes,
                                      bench.in_channels, trust_checkpoint)
    model.load_state_dict(pretrained)
    if task.perturb is not None:
        task.perturb(model)
    model.to(device)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    splits = {"train": task.train, "val": task.val, "test": task.test}
    # A model that is not staged trains without a cache; fit decides per run.
    cache = PrefixCache(model, splits, cache_mb, amp=amp) if stages_of(model) is not None else None
    return PreparedTask(task, model, base_state, cache)


def run_group(cells: list[Cell], protocol: Protocol, checkpoint: str, data_dir: str | None,
              cache_mb: float, device: str | None = None,
              trust_checkpoint: bool = False, pretrained: dict | None = None,
              amp: bool = False, commit: str | None = None) -> Iterator[dict]:
    """Run cells that share one task; yield one row per cell.

    Picklable arguments only (cells, protocol, paths, numbers), so a worker process
    or a remote worker can call it with the `spec` that `run_sweep` builds.
    `pretrained`: the source weights (state dict) when the caller already holds them
    (the Ray backend ships them through its object store); None: read `checkpoint`.
    `commit`: the driver's code version (`files.code_commit`), written into every row."""
    first = cells[0]
    device = resolve_device(device)
    prepared = prepare_task(protocol, first.benchmark, first.shift, first.n_target, first.seed,
                            data_dir, checkpoint, cache_mb, device, trust_checkpoint, pretrained,
                            amp)
    task, model, base_state, cache = (prepared.task, prepared.model, prepared.base_state,
                                      prepared.cache)
    blocks = blocks_for(protocol.arch)
    total_params = sum(p.numel() for p in model.parameters())
    settings = {**_settings(protocol, checkpoint, precision(device, amp)),
                "device": torch.device(device).type, "commit": commit, "machine": machine(device)}
    for cell in cells:
        model.load_state_dict(base_state)
        config = protocol.tuning.run_config(cell.lr, cell.seed, cache_mb=cache_mb, device=device,
                                            amp=amp)
        result = fit(model, task.train, task.val, task.test, cell.method, config, blocks, cache)
        # The per-epoch records travel with the row (the CSV keeps only its columns).
        yield {**result_row(cell, result, total_params, settings), "history": result.history}


def result_row(cell: Cell, result: FitResult, total_params: int, settings: dict) -> dict:
    """The results row (dict) of one finished cell."""
    val, test = result.val, result.test
    return ResultRow(
        cell.benchmark, cell.shift, cell.method, cell.seed, cell.n_target, float(cell.lr),
        status=result.status, best_epoch=result.best_epoch,
        val_acc=val.acc if val else None, val_worst_group_acc=val.worst_group_acc if val else None,
        test_acc=test.acc if test else None,
        worst_group_acc=test.worst_group_acc if test else None,
        tuned_params=result.tuned_params, total_params=total_params,
        seconds=round(result.seconds, 3), start_stage=result.start_stage, **settings).to_dict()


# --- parallel workers -------------------------------------------------------------

_ROWS = None
_PARENT = None


def _init_worker(rows, threads: int, parent: int) -> None:
    global _ROWS, _PARENT
    _ROWS, _PARENT = rows, parent
    _die_with_parent()
    torch.set_num_threads(threads)
    keep_freed_memory()  # spawned workers start with the default allocator settings


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the sweep's process dies (a killed
    sweep's workers would otherwise run on, competing with its rerun, until their cell
    ends and `_worker` notices); elsewhere `_worker`'s check after each cell remains."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != _PARENT:  # the parent died before the call: nobody will signal
        os._exit(1)


def _worker(group: list[Cell], spec: dict) -> int:
    for row in run_group(group, **spec):
        if os.getppid() != _PARENT:  # the sweep was killed: stop instead of running on
            os._exit(1)
        _ROWS.put(row)
    return len(group)


ROW_WAIT_S = 300  # how long the driver waits for rows its finished workers sent


def _collect(pending: set, rows, record, wait_s: float = ROW_WAIT_S) -> None:
    """Record the rows that the futures in `pending` put on `rows`; each future returns how
    many it put. Re-raises a worker's error."""
    received, sent = 0, 0
    while pending:
        try:
            record(rows.get(timeout=0.2))
            received += 1
            continue
        except queue.Empty:
            pass
        for f in [f for f in pending if f.done()]:
            pending.discard(f)
            sent += f.result()  # re-raises a worker's error here
    # A worker's rows travel through the queue's feeder thread, apart from its future's
    # result: wait for every row the finished groups sent, not for a quiet moment.
    while received < sent:
        try:
            record(rows.get(timeout=wait_s))
        except queue.Empty:
            raise RuntimeError(f"{sent - received} of the sweep's rows never arrived from its "
                               f"workers within {wait_s} s; rerun the command to run those "
                               "cells again") from None
        received += 1


def _run_parallel(groups, spec, workers, record) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    rows = ctx.Queue()
    threads = max(1, torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(rows, threads, os.getpid()))
    try:
        _collect({pool.submit(_worker, g, spec) for g in groups}, rows, record)
    except BaseException:
        # Stop the workers this sweep started instead of waiting for their groups.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
