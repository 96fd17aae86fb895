"""scripts/gpu_check.py (`make gpu-check`): one table, a row per step, whatever fails.

Without a GPU it runs on the CPU with tiny workloads (--quick): this checks the
script, not the numbers. Failures, time-outs, the time budget and a missing Ray are
checked in-process with stand-in steps (a second or two each).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run_script(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module (its dataclasses need it in sys.modules)."""
    return load_script("gpu_check", monkeypatch)


def rows_of(table: str) -> list[list[str]]:
    """The table's rows, as lists of cells (check, status, wall s, MiB, measured, command)."""
    return [[c.strip() for c in line.strip("|").split(" | ")]
            for line in table.splitlines()[4:]]


def python_step(gpu_check, name, code, read=None, cap_s=60):
    read = read or (lambda text: (text.strip().splitlines()[-1], True))
    return gpu_check.Step(name, ["-c", code], f"python -c {name}", cap_s, read)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_without_a_gpu_it_says_so(tmp_path):
    done = run_script("--out", str(tmp_path / "t.md"))
    assert done.returncode == 2
    assert "error: no CUDA GPU visible to torch" in done.stderr
    assert rows_of(done.stdout) == [["cuda", "FAILED", "", "", "no CUDA GPU visible to torch", ""]]
    assert (tmp_path / "t.md").read_text() == done.stdout


@pytest.mark.slow
def test_quick_run_prints_one_table(gpu_check, tmp_path, synthetic_checkpoint):
    out = tmp_path / "table.md"
    done = run_script("--device", "cpu", "--quick", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    table = out.read_text()
    assert done.stdout == table
    lines = table.splitlines()
    assert lines[0].startswith("gpu-check, ") and "device: CPU" in lines[0]
    assert "torch " in lines[0] and "Ray " in lines[0]
    assert lines[2] == "| check | status | wall s | peak GPU MiB | measured | command |"
    rows = rows_of(table)
    ray_name = ("Ray sweep, 0 GPU per task group" if importlib.util.find_spec("ray")
                else "Ray sweep")
    assert [r[0] for r in rows] == ["source model", "sweep, every method",
                                    "sweep, every method, --amp", "ViT-B/16 cost",
                                    "ViT-B/16 cost, --amp", "deep.speed", "sims.speed", ray_name]
    by_name = {r[0]: r for r in rows}
    assert by_name["sweep, every method, --amp"][1:] == ["skipped", "", "", "--amp needs CUDA",
                                                         by_name["sweep, every method, --amp"][5]]
    ran = [r for r in rows if r[1] != "skipped"]
    assert all(r[1] == "ok" and float(r[2]) > 0 for r in ran), rows
    methods = by_name["sweep, every method"]
    for method in ("none", "lp-ft", "gradual-first-last", "l1sp", "auto-rgn", "auto-snr"):
        assert method in methods[5]
    assert "--device cpu" in methods[5] and "--out OUT.csv" in methods[5]
    assert methods[4].startswith(f"{len(gpu_check.METHODS.split(','))} cells (0 diverged) in ")
    assert by_name["ViT-B/16 cost, --amp"][1] == "skipped"
    assert re.fullmatch(r"forward [\d.]+ images/s, forward\+backward \(all parameters\) "
                        r"[\d.]+ images/s", by_name["ViT-B/16 cost"][4])
    assert "python -m deep.vit_cost --device cpu --arch clip-vit-tiny" in by_name["ViT-B/16 cost"][5]
    assert "python -m deep.speed --device cpu" in by_name["deep.speed"][5]
    assert by_name["deep.speed"][4].startswith("total speedup ")
    assert "python -m sims.speed --device cpu" in by_name["sims.speed"][5]
    assert by_name["sims.speed"][4].startswith("speedup ")
    if ray_name != "Ray sweep":
        ray = by_name[ray_name]
        assert "--backend ray" in ray[5] and "--gpus-per-task 0" in ray[5]
        assert ray[4].startswith("4 cells (0 diverged) in ") and "Ray start, " in ray[4]
    assert "===== sims.speed (exit 0" in out.with_suffix(".log").read_text()


def test_a_failing_step_costs_only_its_row(gpu_check, tmp_path, monkeypatch, capsys):
    """A failed step (deep.speed's accuracy check), a timed-out one and the steps after
    them: each is a row, printed and written as it finishes; the exit code says so."""
    out = tmp_path / "t.md"
    accuracy_failed = ("print('accuracy check: largest test-accuracy gap 0.70 points "
                       "(FAILED, tolerance 0.5)'); print('total speedup: 2.50x'); "
                       "import sys; print('boom', file=sys.stderr); sys.exit(1)")
    steps = [
        python_step(gpu_check, "first", "print('gpu-check: peak GPU memory 3145728 bytes'); "
                    "print('fine')"),
        python_step(gpu_check, "speed", accuracy_failed, read=gpu_check.read_deep_speed),
        python_step(gpu_check, "hangs", "import time; print('partial output'); time.sleep(60)",
                    cap_s=1.5),
        python_step(gpu_check, "reads the table", f"print(open({str(out)!r}).read())"),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda args, folder: steps)
    code = gpu_check.main(["--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert printed == out.read_text()
    rows = rows_of(printed)
    assert [r[:2] for r in rows] == [["first", "ok"], ["speed", "FAILED (exit 1)"],
                                     ["hangs", "TIMED OUT (after 2 s)"], ["reads the table", "ok"]]
    assert rows[0][3:5] == ["3", "fine"]  # MiB of the peak GPU memory its process reported
    assert rows[1][4].startswith("total speedup 2.50x over the reference loop; accuracy check: "
                                 "largest test-accuracy gap 0.70 points (FAILED, tolerance 0.5)")
    assert "boom" in rows[1][4]
    assert "partial output" in rows[2][4] and 1.4 < float(rows[2][2]) < 30
    # the last step saw the rows before it already written
    log = out.with_suffix(".log").read_text()
    assert "| hangs | TIMED OUT" in log.split("===== reads the table")[1]


def test_the_time_budget_leaves_rows_not_run(gpu_check, tmp_path, monkeypatch, capsys):
    steps = [python_step(gpu_check, "late", "print('never')")]
    monkeypatch.setattr(gpu_check, "plan", lambda args, folder: steps)
    assert gpu_check.main(["--device", "cpu", "--budget-s", "1"]) == 1
    [row] = rows_of(capsys.readouterr().out)
    assert row[:2] == ["late", "NOT RUN"] and "time budget (--budget-s)" in row[4]


@pytest.mark.parametrize("flag", [[], ["--no-ray"]])
def test_without_ray_its_row_says_skipped(gpu_check, monkeypatch, capsys, flag):
    monkeypatch.setitem(sys.modules, "ray", None)  # find_spec("ray") is None: not installed
    monkeypatch.setattr(gpu_check, "plan", gpu_check.ray_steps)
    assert gpu_check.main(["--device", "cpu", *flag]) == 0
    printed = capsys.readouterr().out
    [row] = rows_of(printed)
    assert row[:2] == ["Ray sweep", "skipped"]
    assert row[4] == ("--no-ray" if flag else "ray: not installed, skipped")
    if not flag:
        assert "Ray not installed" in printed.splitlines()[0]


@pytest.mark.parametrize("share, expected", [(0.25, [1, 0.25]), (1.0, [1])])
def test_ray_sweeps_write_one_csv_each_on_cuda(gpu_check, monkeypatch, tmp_path, share, expected):
    monkeypatch.setattr(gpu_check, "ray_version", lambda: "2.60.0")
    args = argparse.Namespace(device="cuda:0", gpus_per_task=share, quick=True, no_ray=False)
    steps = gpu_check.ray_steps(args, tmp_path)
    assert [s.name for s in steps] == [f"Ray sweep, {s:g} GPU per task group" for s in expected]
    assert len({s.csv for s in steps}) == len(steps)
    for step in steps:
        assert step.argv[step.argv.index("--device") + 1] == "cuda"  # not cuda:0
        assert "--ray-first" in step.argv


def test_the_sweep_covers_every_method_class(gpu_check, tmp_path):
    from deep.methods import GENERIC_METHODS
    args = argparse.Namespace(device="cuda:1", gpus_per_task=0.25, quick=False, no_ray=True)
    steps = {s.name: s for s in gpu_check.plan(args, tmp_path)}
    for name in ("sweep, every method", "sweep, every method, --amp"):
        argv = steps[name].argv
        methods = argv[argv.index("--methods") + 1].split(",")
        assert set(GENERIC_METHODS) <= set(methods) and "first" in methods
        assert argv[argv.index("--epochs") + 1] == "1"
        assert argv[argv.index("--device") + 1] == "cuda:1"
        assert not steps[name].skip
    assert "--amp" in steps["sweep, every method, --amp"].argv


def test_the_amp_row_reports_its_accuracy_change_cell_by_cell(gpu_check, tmp_path):
    """bf16's accuracy effect is measured where it runs: the amp sweep's test accuracy
    against the float32 sweep's, matched by cell (an unmatched cell is left out)."""
    header = "benchmark,shift,method,lr,seed,test_acc\n"
    (tmp_path / "f.csv").write_text(header + "s,noise,first,0.01,0,0.50\n"
                                    "s,noise,last,0.01,0,0.70\ns,flip,all,0.01,0,0.90\n")
    (tmp_path / "a.csv").write_text(header + "s,noise,last,0.01,0,0.72\n"
                                    "s,noise,first,0.01,0,0.47\ns,flip,last,0.01,0,0.10\n")
    read = gpu_check.amp_reader(tmp_path / "f.csv", tmp_path / "a.csv")
    measured, ok = read("ran 3 cells (0 diverged) in 2.0 s\n")
    assert ok and measured.startswith("3 cells (0 diverged) in 2.0 s")
    assert measured.endswith("test accuracy, amp - float32: mean -0.50, largest -3.00 points "
                             "over 2 cells")
    assert gpu_check.accuracy_change(tmp_path / "f.csv", tmp_path / "missing.csv") == ""


@pytest.mark.parametrize("flags, message", [
    (["--device", "bogus"], "argument --device: expected cpu, cuda or cuda:N, got 'bogus'"),
    (["--budget-s", "0"], "argument --budget-s: expected a number of seconds above 0, got '0'"),
    (["--gpus-per-task", "1.5"], "argument --gpus-per-task: expected a share of one GPU in (0, 1]"),
])
def test_bad_flags_stop_it_before_any_step(gpu_check, capsys, flags, message):
    """Rather than a row per step, each failing on the same bad value."""
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(flags)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and message in captured.err and captured.out == ""


def test_a_python_without_torch_is_told_which_python_to_use(tmp_path):
    """`python3 scripts/gpu_check.py` where python3 lacks torch (it lives in a venv)."""
    blocker = tmp_path / "torch.py"   # shadows the real torch: importing it fails
    blocker.write_text("raise ImportError('no torch here')\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"],
                          env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "has no torch" in done.stderr
    assert "Traceback" not in done.stderr
