"""scripts/gpu_check.py (`make gpu-check`): runs its three measurements, prints one table.

Without a GPU it runs on the CPU with tiny workloads (--quick): this checks the
script, not the numbers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run_script(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_without_a_gpu_it_says_so():
    done = run_script()
    assert done.returncode == 2
    assert "error: no CUDA GPU visible to torch" in done.stderr


@pytest.mark.slow
def test_quick_run_prints_one_table(tmp_path, synthetic_checkpoint):
    out = tmp_path / "table.md"
    done = run_script("--device", "cpu", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr
    table = out.read_text()
    assert done.stdout == table
    lines = table.splitlines()
    assert lines[0].startswith("gpu-check, ") and "device: CPU" in lines[0]
    assert lines[2] == "| check | command | wall s | measured |"
    rows = [line.split(" | ") for line in lines[4:]]
    assert [r[0] for r in rows] == ["| sims.speed", "| deep.speed", "| Ray sweep, 0 GPU per task group"]
    assert "python -m sims.speed --device cpu" in rows[0][1]
    assert "python -m deep.speed --device cpu" in rows[1][1]
    assert "--backend ray" in rows[2][1] and "--out OUT.csv" in rows[2][1]
    assert all(float(r[2]) > 0 for r in rows)
    assert rows[0][3].startswith("speedup ") and rows[1][3].startswith("total speedup ")
    assert rows[2][3].startswith("4 cells, ")
