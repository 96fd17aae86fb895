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


# --- fast checks of the pieces the quick run goes through only once ----------------

def test_each_reader_takes_its_own_numbers_from_the_last_result_lines(gpu_check):
    """A step may print a result line more than once (a resumed sweep): the last counts;
    each number lands under its own name."""
    sweep = "ran 2 cells (0 diverged) in 9.0 s\nran 8 cells (1 diverged) on cpu in 4.0 s\n"
    assert gpu_check.read_sweep(sweep) == ("8 cells (1 diverged) in 4.0 s: 2.00 cells/s", True)
    assert gpu_check.read_sweep("no result here\n") == ("", False)
    vit = "forward (inference): 0.5 s/image\nforward+backward, all parameters: 0.25 s/image\n"
    assert gpu_check.read_vit_cost(vit) == (
        "forward 2.0 images/s, forward+backward (all parameters) 4.0 images/s", True)
    ratio_only = "total speedup: 3.10x\n"
    assert gpu_check.read_deep_speed(ratio_only) == (
        "total speedup 3.10x over the reference loop", False)   # no accuracy check: no result
    ray = sweep + "gpu-check: ray started in 2.5 s\ngpu-check: ray cluster: 16 CPUs, 1 GPUs\n"
    measured, ok = gpu_check.read_ray_sweep(ray)
    assert ok and measured == ("8 cells (1 diverged) in 4.0 s: 2.00 cells/s (sweep time: Ray "
                               "start, 2.5 s, not included; 16 CPUs, 1 GPUs)")


def test_a_step_that_exits_0_without_its_result_line_failed(gpu_check, tmp_path):
    step = python_step(gpu_check, "silent", "print('\\n'.join(map(str, range(20))))",
                       read=gpu_check.read_sims_speed)
    row = gpu_check.run_step(step, 60, None)
    assert row.failed and row.status == "FAILED (no result line)"
    # the row shows the last TAIL_LINES lines of the output, not the first
    assert row.measured == "output: " + " <br> ".join(str(i) for i in range(12, 20))


def test_a_step_gets_no_more_than_the_budget_left(gpu_check):
    step = python_step(gpu_check, "slow", "import time; time.sleep(60)", cap_s=60,
                       read=gpu_check.read_sims_speed)
    row = gpu_check.run_step(step, 6, None)
    assert row.status == "TIMED OUT (after 6 s)" and row.seconds < 30


def test_a_failed_sweep_row_counts_its_written_rows_by_method(gpu_check, tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("shift,method,test_acc\nnoise,first,0.5\nflip,first,0.4\nnoise,all,0.6\n")
    assert gpu_check.csv_summary(path) == "rows written before it stopped: 3 (first 2, all 1)"
    assert gpu_check.csv_summary(tmp_path / "missing.csv") == ""


def test_a_bar_or_newline_in_a_cell_keeps_the_table_one_row(gpu_check):
    row = gpu_check.Row("a|b", "python -c 'x|y'", "FAILED (exit 1)", 1.0,
                        measured="line one\nline | two")
    line = gpu_check.table_line(row)
    assert "\n" not in line
    assert line == ("| a\\|b | FAILED (exit 1) | 1.0 |  | line one line \\| two | "
                    "`python -c 'x\\|y'` |")


def test_amp_accuracy_is_matched_seed_by_seed(gpu_check, tmp_path):
    header = "benchmark,shift,method,lr,seed,test_acc\n"
    (tmp_path / "f.csv").write_text(header + "s,noise,first,0.01,0,0.50\ns,noise,first,0.01,1,0.60\n")
    (tmp_path / "a.csv").write_text(header + "s,noise,first,0.01,1,0.60\ns,noise,first,0.01,0,0.50\n")
    assert gpu_check.accuracy_change(tmp_path / "f.csv", tmp_path / "a.csv") == (
        "test accuracy, amp - float32: mean +0.00, largest +0.00 points over 2 cells")


@pytest.mark.parametrize("text", ["cuda0", "cpu:0", "cuda:", "cuda:1x", "gpu"])
def test_a_device_that_is_not_cpu_cuda_or_cuda_n_is_refused(gpu_check, text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda or cuda:N"):
        gpu_check.device_name(text)
    assert gpu_check.device_name("cuda:3") == "cuda:3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_cuda_n_without_a_gpu_stops_before_any_step(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "plan", lambda args, folder: pytest.fail("a step ran"))
    assert gpu_check.main(["--device", "cuda:1"]) == 2
    assert "no CUDA GPU visible to torch" in capsys.readouterr().err


def test_a_rerun_starts_a_fresh_log(gpu_check, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t.md"
    out.with_suffix(".log").write_text("===== an old run's step\n")
    monkeypatch.setattr(gpu_check, "plan", lambda args, folder: [
        python_step(gpu_check, "new", "print('fresh')")])
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 0
    log = out.with_suffix(".log").read_text()
    assert "an old run" not in log and log.startswith("===== new (exit 0")


def test_the_plan_of_a_quick_cpu_run_skips_amp_shrinks_every_step_and_hides_temp_paths(
        gpu_check, tmp_path, monkeypatch, capsys):
    args = argparse.Namespace(device="cpu", gpus_per_task=0.25, quick=True, no_ray=True)
    steps = {s.name: s for s in gpu_check.plan(args, tmp_path)}
    assert steps["sweep, every method, --amp"].skip == "--amp needs CUDA"
    assert steps["ViT-B/16 cost, --amp"].skip == "--amp needs CUDA"
    assert not steps["sweep, every method"].skip
    for name, quick in [("deep.speed", gpu_check.QUICK_DEEP), ("sims.speed", gpu_check.QUICK_SIMS),
                        ("ViT-B/16 cost", gpu_check.QUICK_VIT),
                        ("sweep, every method", gpu_check.QUICK_METHOD_SWEEP)]:
        argv = steps[name].argv
        assert any(argv[i:i + len(quick)] == quick for i in range(len(argv))), name
    shown = steps["sweep, every method"].shown
    assert "--out OUT.csv" in shown and str(tmp_path) not in shown
    assert steps["Ray sweep"].skip == "--no-ray"
    # and the table says its numbers are a smoke test's
    monkeypatch.setattr(gpu_check, "plan", lambda args, folder: [])
    gpu_check.main(["--device", "cpu", "--quick"])
    assert capsys.readouterr().out.splitlines()[0].endswith(" (--quick: numbers meaningless)")


def test_no_ray_skips_the_ray_sweeps_where_ray_is_installed(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "ray_version", lambda: "2.60.0")
    args = argparse.Namespace(device="cuda", gpus_per_task=0.25, quick=True, no_ray=True)
    [step] = gpu_check.ray_steps(args, tmp_path)
    assert step.skip == "--no-ray" and step.name == "Ray sweep"
