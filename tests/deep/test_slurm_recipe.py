"""docs/distributed.md's SLURM recipe (scripts/slurm_ray_sweep.sh) on a real SLURM cluster.

Runs where `sinfo` answers with at least two idle nodes: CI starts a two-node cluster on
its one machine (scripts/slurm_local_cluster.sh); elsewhere the test is skipped. The job
starts a Ray head and a Ray worker on the two nodes and runs a sweep: its rows must equal
the local backend's bit for bit, and submitting the same job again must run nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deep.sweep import read_results, row_key
from tests.deep.test_ray_backend import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_ray_sweep.sh"
SWEEP = ["--benchmark", "synthetic", "--quick", "--seeds", "0,1"]


def _idle_nodes() -> int:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], capture_output=True,
                             text=True, timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(int(n) for n in out if n.isdigit())


def _submit(tmp_path: Path, out: Path, name: str) -> str:
    """sbatch the recipe on two nodes and wait for its end; returns the job's output."""
    bin_dir = str(Path(sys.executable).parent)   # python and ray of this environment
    env = {**os.environ, "PROJECT": str(ROOT), "VENV": str(Path(sys.prefix)),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "RAY_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    log = tmp_path / f"{name}.out"
    run = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1",
                          "--time=10", f"--output={log}", str(SCRIPT), *SWEEP, "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    state, exit_code = _wait_for_job(run.stdout.strip().split(";")[0])
    text = log.read_text() if log.exists() else ""
    assert (state, exit_code) == ("COMPLETED", "0:0"), text[-4000:]
    return text


def _wait_for_job(job: str, timeout_s: float = 600) -> tuple[str, str]:
    """(JobState, ExitCode) once the job has ended. (`sbatch --wait` polls after 2, 10, 42,
    74... s: a 25-second job returned after 42, one of 43 s after 74.)"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = dict(f.split("=", 1) for f in subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
            timeout=30).stdout.split() if "=" in f)
        if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING",
                                          "COMPLETING"):
            return fields["JobState"], fields.get("ExitCode", "")
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=30)
    raise AssertionError(f"SLURM job {job} still running after {timeout_s:g} s")


@pytest.mark.slow
@pytest.mark.skipif(_idle_nodes() < 2, reason="no SLURM cluster with 2 idle nodes "
                    "(scripts/slurm_local_cluster.sh starts one)")
def test_slurm_recipe_runs_a_ray_sweep_on_two_nodes_and_resumes(tmp_path, synthetic_cache):
    out = tmp_path / "slurm.csv"
    first = _submit(tmp_path, out, "first")
    # the sweep's driver saw both nodes (deep.ray_backend.cluster_line)
    assert "ray: cluster at " in first and ": 2 nodes, 2 CPUs, 0 GPUs" in first, first[-3000:]
    slurm = read_results(out)
    # the same sweep on the local backend: the same rows, bit for bit
    local = tmp_path / "local.csv"
    subprocess.run([sys.executable, "-m", "deep", "sweep", *SWEEP, "--out", str(local),
                    "--no-progress"], cwd=ROOT, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    expected = {row_key(r): r["test_acc"] for r in read_results(local)}
    assert len(slurm) == len(expected) == 2 * 11
    assert {row_key(r): r["test_acc"] for r in slurm} == expected
    # submitting the same job again resumes: nothing left to run, no row written twice
    again = _submit(tmp_path, out, "again")
    assert "ran 0 cells" in again and f"skipped {len(expected)} already finished" in again
    assert len(read_results(out)) == len(expected)
