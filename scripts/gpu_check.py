"""`make gpu-check`: measure the GPU path once, print one table.

    python scripts/gpu_check.py [--device cuda] [--gpus-per-task 0.25] [--out FILE.md]

Runs, each as its own process, and times:

1. `python -m sims.speed --device cuda`: the batched simulator against the numpy loop
   (its last line, `speedup: X`);
2. `python -m deep.speed --device cuda`: our engine against a reference-style loop,
   both on the GPU (`total speedup: X` and its accuracy check);
3. a short sweep of the synthetic benchmark on a local Ray instance, first with
   --gpus-per-task 1 (one task group per GPU at a time), then with the fractional
   --gpus-per-task (several small groups share a GPU): cells per second of each.

The table gives the date, the device, torch and Ray versions, each command and what
it measured, so it can go into docs/distributed.md as is. `--quick` shrinks every
workload (a smoke test of the script; its numbers mean nothing), and `--device cpu`
runs it without a GPU (for the tests).
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["--benchmark", "synthetic", "--shifts", "noise,feature,flip,spurious", "--seeds", "0,1",
         "--methods", "first,second,third,last,all", "--lrs", "0.01,0.001", "--epochs", "5",
         "--n-target", "400", "--no-progress"]
QUICK_SWEEP = ["--benchmark", "synthetic", "--shifts", "noise,flip", "--seeds", "0",
               "--methods", "first,last", "--lrs", "0.01", "--epochs", "1", "--n-target", "64",
               "--val-per-class", "10", "--test-per-class", "20", "--no-progress"]
QUICK_SIMS = ["--runs", "8", "--steps", "50", "--loop-runs", "2", "--no-compile"]
QUICK_DEEP = ["--n-train", "64", "--n-val", "20", "--n-test", "40", "--epochs", "1",
              "--lrs", "1e-3", "--size", "16", "--tolerance", "100"]


@dataclass
class Measured:
    name: str
    command: list[str]
    seconds: float
    result: str


class CheckFailed(Exception):
    """A measured command failed; the message holds its output's tail."""


def run(name: str, command: list[str], timeout: float) -> tuple[str, float]:
    """(stdout, wall seconds) of a command run from the repository root."""
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise CheckFailed(f"{name} failed (exit {done.returncode}): {shlex.join(command)}\n{tail}")
    return done.stdout, seconds


def last_match(pattern: str, text: str, name: str) -> str:
    found = re.findall(pattern, text, flags=re.MULTILINE)
    if not found:
        raise CheckFailed(f"{name}: no line matching {pattern!r} in its output:\n{text[-2000:]}")
    return found[-1]


def sims_speed(device: str, quick: bool) -> Measured:
    command = [sys.executable, "-m", "sims.speed", "--device", device,
               *(QUICK_SIMS if quick else [])]
    out, seconds = run("sims.speed", command, timeout=1800)
    ratio = last_match(r"^speedup: (\S+)$", out, "sims.speed")
    return Measured("sims.speed", command, seconds, f"speedup {ratio}x over the numpy loop")


def deep_speed(device: str, quick: bool) -> Measured:
    command = [sys.executable, "-m", "deep.speed", "--device", device,
               *(QUICK_DEEP if quick else [])]
    out, seconds = run("deep.speed", command, timeout=3600)
    ratio = last_match(r"^total speedup: (\S+)x$", out, "deep.speed")
    check = last_match(r"^accuracy check: (.*)$", out, "deep.speed")
    return Measured("deep.speed", command, seconds,
                    f"total speedup {ratio}x over the reference loop; accuracy check: {check}")


def ray_sweep(device: str, gpus_per_task: float, quick: bool, folder: Path) -> Measured:
    out = folder / f"sweep-{gpus_per_task:g}.csv"
    command = [sys.executable, "-m", "deep", "sweep", *(QUICK_SWEEP if quick else SWEEP),
               "--out", str(out), "--backend", "ray", "--device", device,
               "--gpus-per-task", f"{gpus_per_task:g}"]
    text, seconds = run(f"ray sweep (--gpus-per-task {gpus_per_task:g})", command, timeout=3600)
    cells = int(last_match(r"^ran (\d+) cells", text, "sweep"))
    # Wall time includes starting Ray and the driver's imports: what a user waits for.
    return Measured(f"Ray sweep, {gpus_per_task:g} GPU per task group", command, seconds,
                    f"{cells} cells, {cells / seconds:.2f} cells/s (wall, Ray start included)")


def environment(device: str) -> str:
    """One line: date, device, torch and Ray versions."""
    try:
        import ray
        ray_version = ray.__version__
    except ModuleNotFoundError:
        ray_version = "not installed"
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    return (f"{datetime.date.today().isoformat()}, device: {name}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), Ray {ray_version}")


def table(rows: list[Measured], header: str) -> str:
    lines = [f"gpu-check, {header}", "",
             "| check | command | wall s | measured |", "|---|---|---:|---|"]
    for r in rows:
        shown = ["OUT.csv" if Path(a).suffix == ".csv" else a for a in r.command[1:]]
        command = shlex.join(["python", *shown]).replace("|", "\\|")
        lines.append(f"| {r.name} | `{command}` | {r.seconds:.1f} | {r.result} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/gpu_check.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test")
    p.add_argument("--gpus-per-task", type=float, default=0.25,
                   help="the fractional share of the second Ray sweep (default 0.25)")
    p.add_argument("--quick", action="store_true", help="tiny workloads: tests the script only")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch; gpu-check measures a GPU "
              "(--device cpu runs it on the CPU)", file=sys.stderr)
        return 2
    shares = [1.0, args.gpus_per_task] if on_gpu else [0.0]
    try:
        rows = [sims_speed(args.device, args.quick), deep_speed(args.device, args.quick)]
        with tempfile.TemporaryDirectory() as tmp:
            rows += [ray_sweep(args.device, share, args.quick, Path(tmp)) for share in shares]
    except CheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    text = table(rows, environment(args.device) + (" (--quick: numbers meaningless)"
                                                   if args.quick else ""))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
