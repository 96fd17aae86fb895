"""One check of a shift name, `Benchmark.check_shifts`: the sweep, the adaptation runner,
the command line and every registered loader called directly refuse an unknown shift
with the same ConfigError, naming it and every shift the benchmark offers."""

from __future__ import annotations

import pytest

from deep.__main__ import main
from deep.adapt.protocol import AdaptProtocol
from deep.adapt.runner import run_adaptation
from deep.data import benchmark_names, get_benchmark
from deep.errors import ConfigError
from deep.protocol import load_protocol
from deep.sweep import run_sweep


@pytest.fixture
def nothing_runs(monkeypatch, synthetic_cache):
    """Past the shift check the sweep and the runner resolve a source model (pretraining
    one if needed): fail there at once instead (and pretrain, if at all, into a temporary
    cache)."""
    def refuse(*args, **kwargs):
        raise AssertionError("went past the shift check")
    monkeypatch.setattr("deep.sweep.resolve_checkpoint", refuse)
    monkeypatch.setattr("deep.adapt.runner.resolve_checkpoint", refuse)


def message(benchmark: str, bad: list[str]) -> str:
    known = ", ".join(get_benchmark(benchmark).shifts)
    return f"unknown shift(s) {bad} of {benchmark}; known: {known}"


def test_check_shifts_names_every_unknown_shift_and_every_known_one():
    bench = get_benchmark("synthetic")
    bench.check_shifts(["noise", "flip"])
    bench.check_shifts("spurious")
    bench.check_shifts([])  # nothing to refuse (the protocols refuse empty lists themselves)
    with pytest.raises(ConfigError) as err:
        bench.check_shifts(["noise", "rain", "fogg"])
    assert str(err.value) == ("unknown shift(s) ['rain', 'fogg'] of synthetic; "
                              "known: noise, feature, flip, spurious")
    with pytest.raises(ConfigError) as err:  # one name, not its letters
        bench.check_shifts("nois")
    assert str(err.value) == message("synthetic", ["nois"])


def test_sweep_and_adaptation_refuse_a_shift_with_the_same_error_before_running(
        tmp_path, nothing_runs):
    with pytest.raises(ConfigError) as swept:
        run_sweep(load_protocol("synthetic").replace(shifts=["noise", "rain"]),
                  tmp_path / "sweep.csv")
    with pytest.raises(ConfigError) as adapted:
        run_adaptation(AdaptProtocol(benchmark="synthetic", arch="resnet26-w4",
                                     shifts=["noise", "rain"], methods=["tent"],
                                     blocks=["none"], seeds=[0], images=6, test_per_class=3,
                                     checkpoint="none"),
                       tmp_path / "adapt.csv", progress=False)
    assert str(swept.value) == str(adapted.value) == message("synthetic", ["rain"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["sweep", "adapt"])
def test_the_command_line_prints_one_line_naming_the_valid_shifts(tmp_path, capsys, command,
                                                                  nothing_runs):
    out = tmp_path / "r.csv"
    assert main([command, "--benchmark", "fmnist-c", "--shifts", "fog,rain",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message('fmnist-c', ['rain'])}\n"
    assert not out.exists()


@pytest.mark.parametrize("benchmark", benchmark_names())
def test_every_loader_called_directly_refuses_an_unknown_shift_before_reading_data(
        tmp_path, benchmark):
    """`Benchmark.load_task` is a library entry point too (deep/examples/own_model.py):
    the same error, before the (here empty) data folder is looked at."""
    with pytest.raises(ConfigError) as err:
        get_benchmark(benchmark).load_task(tmp_path, "rain", 4, 1, 1, 0)
    assert str(err.value) == message(benchmark, ["rain"])
