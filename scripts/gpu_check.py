"""`make gpu-check`: measure the GPU path once, print one table, whatever fails.

    python3 scripts/gpu_check.py [--device cuda] [--budget-s 540] [--out FILE.md]
                                 [--gpus-per-task 0.25] [--no-ray] [--quick]

Meant to run once, unattended, on a machine with CUDA torch in its python: no venv,
no network and no Ray needed. Each step runs in its own process, within its own time
limit and the whole run's budget (--budget-s), and becomes one row of the table as it
finishes: the row is printed and the --out file rewritten at once, so a step that
fails, times out or is skipped costs only its own row (status, exit code, the last
lines of its output). The exit code is 1 if any step failed, timed out or was not
run for lack of time, 2 if torch sees no GPU, else 0.

Steps, most telling first:

1. the synthetic benchmark's source model (pretrained on the CPU, cached), so that
   no later timing includes it;
2. a sweep of the synthetic benchmark over every method (single blocks, all, lp-ft,
   gradual unfreezing, l1sp, auto-rgn, auto-snr), 1 epoch, few images: cells per second;
3. the same sweep under --amp (bf16 autocast; CUDA only);
4. `python -m deep.vit_cost`: CLIP ViT-B/16 forward and backward cost, then under
   --amp (CUDA only);
5. `python -m deep.speed`: our engine against a reference-style loop, both on the
   device (`total speedup` and its accuracy check);
6. `python -m sims.speed`: the batched simulator against the numpy loop (`speedup`);
7. where Ray is installed (and not --no-ray): the Ray sweep at 1 GPU per task group,
   then at --gpus-per-task; Ray's start-up is timed apart and left out of cells/s.

Each step runs as `python -u scripts/gpu_check.py --child MODULE ARGS...`: MODULE's
main(ARGS) in a process that then prints its peak GPU memory
(torch.cuda.max_memory_allocated); the table shows the command as `python -m MODULE`.
`--log` (default: the --out file with suffix .log) keeps every step's full output.
`--quick` shrinks every workload (a smoke test of the script; its numbers mean
nothing); `--device cpu` runs it without a GPU (the tests do).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    import torch
except ImportError:  # e.g. the system python3 of a machine whose torch lives in a venv
    print(f"error: {sys.executable} has no torch: run this script with the python that has "
          "CUDA torch installed (e.g. `.venv/bin/python scripts/gpu_check.py`, or `make "
          "gpu-check GPU_PYTHON=...`)", file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))  # the project, also where it is not installed in this python

from deep.blocks import blocks_for  # noqa: E402
from deep.files import atomic_write_text, code_commit  # noqa: E402
from deep.methods import method_names  # noqa: E402

# every method the synthetic benchmark's network (resnet26-w4) has: a new one is in the check
METHODS = ",".join(method_names(blocks_for("resnet26-w4")))
METHOD_SWEEP = ["--benchmark", "synthetic", "--shifts", "noise,spurious", "--seeds", "0",
                "--methods", METHODS, "--lrs", "0.01", "--epochs", "1", "--n-target", "64",
                "--val-per-class", "10", "--test-per-class", "25", "--no-progress"]
QUICK_METHOD_SWEEP = ["--benchmark", "synthetic", "--shifts", "noise", "--seeds", "0",
                      "--methods", METHODS, "--lrs", "0.01", "--epochs", "1", "--n-target", "32",
                      "--val-per-class", "5", "--test-per-class", "10", "--no-progress"]
RAY_SWEEP = ["--benchmark", "synthetic", "--shifts", "noise,feature,flip,spurious",
             "--seeds", "0,1", "--methods", "first,second,third,last,all", "--lrs", "0.01,0.001",
             "--epochs", "5", "--n-target", "400", "--no-progress"]
QUICK_RAY_SWEEP = ["--benchmark", "synthetic", "--shifts", "noise,flip", "--seeds", "0",
                   "--methods", "first,last", "--lrs", "0.01", "--epochs", "1", "--n-target", "64",
                   "--val-per-class", "10", "--test-per-class", "20", "--no-progress"]
QUICK_SIMS = ["--runs", "8", "--steps", "50", "--loop-runs", "2", "--no-compile"]
QUICK_DEEP = ["--n-train", "64", "--n-val", "20", "--n-test", "40", "--epochs", "1",
              "--lrs", "1e-3", "--size", "16", "--tolerance", "100"]
QUICK_VIT = ["--arch", "clip-vit-tiny", "--batch", "2", "--repeats", "1"]
DEPENDENCIES = ("numpy", "scipy", "matplotlib", "seaborn", "sympy", "tqdm", "PIL")
MIN_STEP_S = 5       # a step is not started with less of the budget left
TAIL_LINES = 8       # output lines a failed row shows
MEMORY = re.compile(r"^gpu-check: peak GPU memory (\d+) bytes$", re.MULTILINE)
RAN = re.compile(r"^ran (\d+) cells \((\d+) diverged\).* in ([\d.]+) s", re.MULTILINE)


# --- the steps --------------------------------------------------------------------

@dataclass
class Step:
    """One measured command. `read` turns its output into (what it measured, whether
    every expected result line was there)."""

    name: str
    argv: list[str]                       # after the python executable
    shown: str                            # the command as the table shows it
    cap_s: float                          # its own time limit (the budget may cut it)
    read: Callable[[str], tuple[str, bool]]
    skip: str = ""                        # why it does not run (its row says so)
    csv: Path | None = None               # a sweep's results file (a failed row sums it up)


def child_step(name: str, module: str, args: list[str], cap_s: float, read,
               ray_first: bool = False, skip: str = "") -> Step:
    argv = ["-u", str(SCRIPT), "--child", *(["--ray-first"] if ray_first else []), module, *args]
    shown_args = ["OUT.csv" if a.endswith(".csv") else a for a in args]
    shown = shlex.join(["python", "-m", module.removesuffix(".__main__"), *shown_args])
    results = next((Path(a) for a in args if a.endswith(".csv")), None)
    return Step(name, argv, shown, cap_s, read, skip, results)


def plan(args, folder: Path) -> list[Step]:
    """The steps of this run, in order (folder: their results CSVs, one each)."""
    q = args.quick
    amp_skip = "" if args.device.startswith("cuda") else "--amp needs CUDA"
    sweep = ["sweep", *(QUICK_METHOD_SWEEP if q else METHOD_SWEEP), "--device", args.device]
    vit = ["--device", args.device, *(QUICK_VIT if q else [])]
    source = child_step("source model", "source-model", [], 120, read_source)
    source.shown = "python -c 'deep.pretrain.cached_source_model(synthetic, resnet26-w4)'"
    steps = [
        source,
        child_step("sweep, every method", "deep.__main__",
                   [*sweep, "--out", str(folder / "methods.csv")], 150, read_sweep),
        child_step("sweep, every method, --amp", "deep.__main__",
                   [*sweep, "--amp", "--out", str(folder / "methods-amp.csv")], 90,
                   amp_reader(folder / "methods.csv", folder / "methods-amp.csv"),
                   skip=amp_skip),
        child_step("ViT-B/16 cost", "deep.vit_cost", vit, 60, read_vit_cost),
        child_step("ViT-B/16 cost, --amp", "deep.vit_cost", [*vit, "--amp"], 60, read_vit_cost,
                   skip=amp_skip),
        child_step("deep.speed", "deep.speed",
                   ["--device", args.device, *(QUICK_DEEP if q else [])], 200, read_deep_speed),
        child_step("sims.speed", "sims.speed",
                   ["--device", args.device, *(QUICK_SIMS if q else [])], 150, read_sims_speed),
    ]
    return steps + ray_steps(args, folder)


def ray_steps(args, folder: Path) -> list[Step]:
    """The Ray sweeps at each GPU share, each into its own CSV; one skipped row without Ray."""
    version = ray_version()
    if args.no_ray or version is None:
        why = "--no-ray" if args.no_ray else "ray: not installed, skipped"
        return [Step("Ray sweep", [], "", 0, read_sweep, skip=why)]
    on_gpu = args.device.startswith("cuda")
    shares = sorted({1.0, args.gpus_per_task}, reverse=True) if on_gpu else [0.0]
    # Ray shows a task only the GPUs it reserved: its device is "cuda", never "cuda:1".
    device = "cuda" if on_gpu else "cpu"
    return [child_step(f"Ray sweep, {share:g} GPU per task group", "deep.__main__",
                       ["sweep", *(QUICK_RAY_SWEEP if args.quick else RAY_SWEEP),
                        "--backend", "ray", "--device", device, "--gpus-per-task", f"{share:g}",
                        "--out", str(folder / f"ray-{i}.csv")], 120, read_ray_sweep,
                       ray_first=True)
            for i, share in enumerate(shares)]


def ray_version() -> str | None:
    """Ray's version, None where it is not installed (nothing imported)."""
    if importlib.util.find_spec("ray") is None:
        return None
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


# --- reading a step's output ------------------------------------------------------

def last(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text, flags=re.MULTILINE)
    return found[-1] if found else None


def read_source(text: str) -> tuple[str, bool]:
    path = last(r"^source model: (.*)$", text)
    return (f"cached at {path}" if path else "", path is not None)


def read_sweep(text: str) -> tuple[str, bool]:
    found = RAN.findall(text)
    if not found:
        return "", False
    cells, diverged, seconds = int(found[-1][0]), found[-1][1], float(found[-1][2])
    rate = cells / seconds if seconds > 0 else float("nan")
    return f"{cells} cells ({diverged} diverged) in {seconds:.1f} s: {rate:.2f} cells/s", True


def amp_reader(float32_csv: Path, amp_csv: Path):
    """read_sweep, plus what bf16 autocast did to accuracy: the amp run's test accuracy
    against the float32 run's, cell by cell (same cells, same seed)."""
    def read(text: str) -> tuple[str, bool]:
        measured, ok = read_sweep(text)
        return "; ".join(p for p in (measured, accuracy_change(float32_csv, amp_csv)) if p), ok
    return read


def accuracy_change(float32_csv: Path, amp_csv: Path) -> str:
    """"test accuracy, amp - float32: mean ..., largest ... points over N cells"."""
    def accuracies(path):
        if not path.is_file():
            return {}
        with path.open(newline="") as f:
            return {(r["shift"], r["method"], r["lr"], r["seed"]): float(r["test_acc"])
                    for r in csv.DictReader(f) if r.get("test_acc")}
    base, amp = accuracies(float32_csv), accuracies(amp_csv)
    diffs = [100 * (amp[k] - base[k]) for k in base.keys() & amp.keys()]
    if not diffs:
        return ""
    largest = max(diffs, key=abs)
    return (f"test accuracy, amp - float32: mean {sum(diffs) / len(diffs):+.2f}, largest "
            f"{largest:+.2f} points over {len(diffs)} cells")


def read_ray_sweep(text: str) -> tuple[str, bool]:
    measured, ok = read_sweep(text)
    start = last(r"^gpu-check: ray started in ([\d.]+) s", text)
    cluster = last(r"^gpu-check: ray cluster: (.*)$", text)
    extra = f" (sweep time: Ray start, {start} s, not included; {cluster})" if start else ""
    return measured + extra, ok


def read_vit_cost(text: str) -> tuple[str, bool]:
    forward = last(r"^forward \(inference\): (\S+) s/image", text)
    train = last(r"^forward\+backward, all parameters: (\S+) s/image$", text)
    if forward is None or train is None:
        return "", False
    return (f"forward {1 / float(forward):.1f} images/s, forward+backward (all parameters) "
            f"{1 / float(train):.1f} images/s"), True


def read_deep_speed(text: str) -> tuple[str, bool]:
    ratio = last(r"^total speedup: (\S+)x$", text)
    check = last(r"^accuracy check: (.*)$", text)
    parts = [f"total speedup {ratio}x over the reference loop" if ratio else "",
             f"accuracy check: {check}" if check else ""]
    return "; ".join(p for p in parts if p), ratio is not None and check is not None


def read_sims_speed(text: str) -> tuple[str, bool]:
    ratio = last(r"^speedup: (\S+)$", text)
    return (f"speedup {ratio}x over the numpy loop" if ratio else "", ratio is not None)


# --- running a step ---------------------------------------------------------------

@dataclass
class Row:
    name: str
    command: str
    status: str                  # ok, FAILED (exit N), TIMED OUT (after N s), skipped...
    seconds: float | None = None
    memory: str = ""
    measured: str = ""
    failed: bool = False


def child_env() -> dict:
    """The project importable from the repository root (no install needed), output
    unbuffered (a killed step still leaves what it printed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def execute(argv: list[str], timeout: float) -> tuple[int | None, str, float]:
    """(exit code or None if it timed out, its output, wall seconds). Output goes to a
    file, not a pipe: a killed step's leftover children cannot block the read."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the step and its children
            proc.wait()
            code = None
        seconds = time.perf_counter() - t0
        out.seek(0)
        return code, out.read(), seconds


def run_step(step: Step, budget_left: float, log: Path | None) -> Row:
    if step.skip:
        return Row(step.name, step.shown, "skipped", measured=step.skip)
    if budget_left < MIN_STEP_S:
        return Row(step.name, step.shown, "NOT RUN", failed=True,
                   measured=f"the time budget (--budget-s) was used up ({budget_left:.0f} s left)")
    timeout = min(step.cap_s, budget_left)
    code, text, seconds = execute(step.argv, timeout)
    if log is not None:
        with log.open("a") as f:
            f.write(f"===== {step.name} (exit {code}, {seconds:.1f} s): {step.shown}\n{text}\n")
    measured, complete = step.read(text)
    status = ("ok" if code == 0 and complete else
              f"TIMED OUT (after {timeout:.0f} s)" if code is None else
              f"FAILED (exit {code})" if code != 0 else "FAILED (no result line)")
    if status != "ok":
        parts = (measured, csv_summary(step.csv), "output: " + tail(text))
        measured = "; ".join(p for p in parts if p)
    return Row(step.name, step.shown, status, seconds, peak_memory(text), measured,
               failed=status != "ok")


def tail(text: str) -> str:
    lines = [line[:240] for line in text.strip().splitlines()[-TAIL_LINES:]]
    return " <br> ".join(lines) if lines else "(none)"


def csv_summary(path: Path | None) -> str:
    """What a failed sweep finished: its rows per method."""
    if path is None or not path.is_file():
        return ""
    with path.open(newline="") as f:
        methods = Counter(row.get("method") for row in csv.DictReader(f))
    done = ", ".join(f"{m} {n}" for m, n in methods.items())
    return f"rows written before it stopped: {sum(methods.values())} ({done or 'none'})"


def peak_memory(text: str) -> str:
    found = MEMORY.findall(text)
    return f"{int(found[-1]) / 2**20:.0f}" if found else ""


# --- the table --------------------------------------------------------------------

def environment(device: str) -> str:
    """One line: date, device, versions, missing dependencies, commit."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        count = torch.cuda.device_count()
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {count} visible)"
    else:
        name = f"CPU ({os.cpu_count()} cores)"
    missing = [m for m in DEPENDENCIES if importlib.util.find_spec(m) is None]
    return (f"{now}, device: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}), Ray {ray_version() or 'not installed'}, "
            f"Python {platform.python_version()}, commit {code_commit() or 'unknown'}"
            + (f", missing packages: {', '.join(missing)}" if missing else ""))


def header(env_line: str, quick: bool) -> list[str]:
    note = " (--quick: numbers meaningless)" if quick else ""
    return [f"gpu-check, {env_line}{note}", "",
            "| check | status | wall s | peak GPU MiB | measured | command |",
            "|---|---|---:|---:|---|---|"]


def table_line(row: Row) -> str:
    cells = [row.name, row.status, "" if row.seconds is None else f"{row.seconds:.1f}",
             row.memory, row.measured, f"`{row.command}`" if row.command else ""]
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


# --- the child: one step's process ------------------------------------------------

def child(argv: list[str]) -> int:
    """`--child [--ray-first] MODULE ARGS...`: MODULE's main(ARGS), then its peak GPU memory."""
    if argv[:1] == ["--ray-first"]:
        argv = argv[1:]
        start_ray()
    module, args = argv[0], argv[1:]
    main_of = source_model if module == "source-model" else importlib.import_module(module).main
    try:
        return main_of(args) or 0
    finally:
        print_peak_memory()


def print_peak_memory() -> None:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    except RuntimeError as err:  # a broken CUDA context: the step's own error tells more
        print(f"gpu-check: peak GPU memory not read ({err})", flush=True)
        return
    print(f"gpu-check: peak GPU memory {peak} bytes", flush=True)


def start_ray() -> None:
    """A local Ray started before the sweep (which then uses it): its start-up is timed apart."""
    import ray
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False)
    print(f"gpu-check: ray started in {time.perf_counter() - t0:.1f} s", flush=True)
    resources = ray.cluster_resources()
    print(f"gpu-check: ray cluster: {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs", flush=True)


def source_model(args: list[str]) -> int:
    """The synthetic benchmark's source model, pretrained (CPU) unless cached."""
    from deep.data import get_benchmark
    from deep.pretrain import cached_source_model
    from deep.protocol import load_protocol
    path = cached_source_model(get_benchmark("synthetic"), load_protocol("synthetic").arch)
    print(f"source model: {path}")
    return 0


# --- main -------------------------------------------------------------------------

def device_name(text: str) -> str:
    """An argparse type: cpu, cuda or cuda:N (checked here, not in every step's row)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def number_in(low: float, high: float, expected: str):
    """An argparse type: a number in (low, high], else "expected <expected>"."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low < value <= high:  # (NaN fails both)
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python3 scripts/gpu_check.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--device", type=device_name, default="cuda",
                   help="cuda (default), cuda:N, or cpu for a smoke test")
    p.add_argument("--budget-s", type=number_in(0, math.inf, "a number of seconds above 0"),
                   default=540,
                   help="wall seconds for the whole run (default 540, for a 600 s command "
                        "limit); a step gets at most what is left")
    p.add_argument("--gpus-per-task", type=number_in(0, 1, "a share of one GPU in (0, 1]"),
                   default=0.25,
                   help="the fractional share of the second Ray sweep (default 0.25)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray sweeps")
    p.add_argument("--quick", action="store_true", help="tiny workloads: tests the script only")
    p.add_argument("--out", help="also write the table (markdown) here, rewritten after each row")
    p.add_argument("--log", help="every step's full output (default: --out with suffix .log)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out) if args.out else None
    log = Path(args.log) if args.log else out.with_suffix(".log") if out else None
    for path in (out, log):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if log is not None:
        log.write_text("")
    try:
        env_line = environment(args.device)
    except Exception as err:  # a table without its header line beats none
        env_line = f"environment not read ({type(err).__name__}: {err})"
    lines = header(env_line, args.quick)
    emit(lines, out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch; gpu-check measures a GPU "
              "(--device cpu runs it on the CPU)", file=sys.stderr)
        emit(lines, out, Row("cuda", "", "FAILED", measured="no CUDA GPU visible to torch",
                             failed=True))
        return 2
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for step in plan(args, Path(tmp)):
            print(f"gpu-check: {step.name} ...", file=sys.stderr, flush=True)
            try:
                row = run_step(step, deadline - time.monotonic(), log)
            except Exception as err:  # a bug of this script's: still a row, then the next step
                row = Row(step.name, step.shown, "FAILED (in gpu_check)", failed=True,
                          measured=f"{type(err).__name__}: {err}")
            failed |= row.failed
            emit(lines, out, row)
    return 1 if failed else 0


def emit(lines: list[str], out: Path | None, row: Row | None = None) -> None:
    """Print the new lines (the header, or one row) and rewrite --out with all of them."""
    new = lines if row is None else [table_line(row)]
    if row is not None:
        lines.append(new[0])
    print("\n".join(new), flush=True)
    if out is not None:
        atomic_write_text(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
