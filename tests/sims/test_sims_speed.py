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
