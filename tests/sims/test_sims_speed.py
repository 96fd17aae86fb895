"""`python -m sims.speed` end to end on a tiny workload (eager only: compiling takes longer
than the whole test suite should)."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest
import torch

from sims import speed
from tests.doc_text import doc_text


def test_speed_benchmark_matches_the_numpy_loop_and_ends_with_the_ratio():
    out = io.StringIO()
    with redirect_stdout(out):
        speed.main(["--runs", "8", "--d", "6", "--k", "4", "--n", "5", "--steps", "50",
                    "--loop-runs", "2", "--no-compile"])
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"speedup: \d+\.\d", lines[-1])
    # The first simulator row (float64, eager) is checked against the numpy loop.
    gap = float(re.search(r"v vs numpy loop ([\d.e+-]+)", out.getvalue()).group(1))
    assert gap < 1e-10
    float32 = [line for line in lines if line.startswith("float32")]
    assert float32 and all("compiled" not in line for line in lines if line.startswith("float"))
    # float32 against float64: 2e-7 measured on this workload (docs/performance.md: 1e-6 (v), 5e-6 (B)
    # on the benchmark's).
    for line in float32:
        gaps = re.search(r"v ([\d.e+-]+), B ([\d.e+-]+)", line)
        assert gaps and max(float(gaps.group(1)), float(gaps.group(2))) < 1e-5, line


@pytest.mark.parametrize("flags, message", [
    (["--runs", "4", "--loop-runs", "5"], "--loop-runs must be in 1..4"),
    (["--steps", "0"], "expected a positive integer, got '0'"),
    (["--n", "-1"], "expected a positive integer, got '-1'"),
    (["--threads", "0"], "--threads must be comma-separated positive integers"),
    (["--device", "tpu"], "device must be 'auto', 'cpu' or 'cuda"),
])
def test_bad_flags_are_usage_errors_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        speed.main(flags + ["--no-compile"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "workload" not in captured.out


def test_threads_on_a_gpu_is_a_usage_error_not_silently_dropped(monkeypatch, capsys):
    """On a GPU the thread counts were replaced by torch's own, without a word: a run asked
    for 1,2,4 threads timed one configuration. The device is faked: no GPU is needed."""
    monkeypatch.setattr(speed, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(SystemExit) as exit_:
        speed.parse_args(["--device", "cuda", "--threads", "1,2"])
    assert exit_.value.code == 2
    assert "--threads times torch CPU thread counts, and this run is on cuda" in capsys.readouterr().err
    assert speed.parse_args(["--device", "cuda"])[2] == [torch.get_num_threads()]
    monkeypatch.setattr(speed, "resolve_device", lambda device: torch.device("cpu"))
    assert speed.parse_args([])[2] == [1] and speed.parse_args(["--threads", "1,2"])[2] == [1, 2]


def test_the_multiply_adds_docs_performance_quotes_are_the_benchmarks_counts():
    """docs/performance.md quotes the default workload's counts per run and step (2,336 for
    the simulator, 71,168 for the textbook step): the counts `python -m sims.speed` prints."""
    args = speed.parse_args([])[0]
    sim = speed.simulator_multiply_adds(args.n, args.k)
    loop = speed.loop_multiply_adds(args.n, args.k, args.d)
    doc = doc_text("docs/performance.md")
    assert f"multiply-adds a step ({sim:,} in the benchmark" in doc
    assert f"textbook's about 2ndk ({loop:,})" in doc
    assert f"own multiply-adds ({sim:,} per run and step)" in doc
    assert f"for the same result ({loop:,})" in doc


def test_ratios_are_the_extrapolated_best_loop_time_over_each_best_simulator_time(monkeypatch):
    """On a fake clock: a numpy-loop run takes 0.01 s (0.02 s in the first of its three
    repeats), so the loop's best time on 2 runs extrapolated to 8 is 0.08 s; a simulation
    takes 4, 2, 1, 0.5 ms (float64, float32, each eager then compiled; twice that on the
    first of its two repeats). Each row's ratio is 0.08 s over its own best time (20, 40,
    80, 160) and the headline is float32 compiled's. No timing is real: the compiled runs
    run eagerly, at no cost."""
    clock = [0.0]
    monkeypatch.setattr(speed, "time", type("FakeTime", (), {
        "perf_counter": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(speed, "measure_limits", lambda threads, device: {
        (dtype, t): (1.0, 1.0, 1.0) for dtype in (torch.float64, torch.float32) for t in threads})
    loop_calls = []
    numpy_loop = speed.numpy_loop

    def timed_loop(*args):
        loop_calls.append(1)
        clock[0] += 0.02 if len(loop_calls) <= 2 else 0.01
        return numpy_loop(*args)
    cost = {(torch.float64, False): 4e-3, (torch.float32, False): 2e-3,
            (torch.float64, True): 1e-3, (torch.float32, True): 0.5e-3}
    seen = set()
    simulate = speed.simulate

    def timed_simulate(batch, steps, compile=False):
        if steps != 2 * 16:                       # not the warm-up
            key = (batch.dtype, compile)
            clock[0] += cost[key] * (1 if key in seen else 2)
            seen.add(key)
        return simulate(batch, steps)
    monkeypatch.setattr(speed, "numpy_loop", timed_loop)
    monkeypatch.setattr(speed, "simulate", timed_simulate)
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            speed.main(["--runs", "8", "--d", "6", "--k", "4", "--n", "5", "--steps", "50",
                        "--loop-runs", "2", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    lines = out.getvalue().splitlines()
    assert "extrapolated to 8: 0.08 s" in out.getvalue()
    ratios = {}
    for line in lines:
        found = re.match(r"(float\d\d), 1 thread\(s\)(, compiled)?\s+([\d.]+)\s+([\d.]+)", line)
        if found:
            ratios[found.group(1), bool(found.group(2))] = (float(found.group(3)),
                                                            float(found.group(4)))
    assert ratios == {("float64", False): (0.004, 20.0), ("float32", False): (0.002, 40.0),
                      ("float64", True): (0.001, 80.0), ("float32", True): (0.001, 160.0)}
    assert lines[-1] == "speedup: 160.0"
