"""Early stopping on a validation plateau (TrainConfig.patience, issue #15): a stopped
run is the unstopped run cut after `patience` epochs without a better validation
metric, and it keeps the same chosen epoch whenever the best came before the cut."""

from __future__ import annotations

import pytest

from deep.blocks import blocks_for
from deep.checkpoints import load_model
from deep.data import get_benchmark
from deep.errors import ConfigError
from deep.protocol import load_protocol
from deep.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "resnet26-w4"


@pytest.fixture(scope="module")
def task():
    return get_benchmark("synthetic").load_task(None, "noise", n_target=96, val_per_class=10,
                                                test_per_class=20, seed=0)


def expected_stop(val_curve: list[float], patience: int) -> int:
    best, best_epoch = -1.0, 0
    for epoch, value in enumerate(val_curve, start=1):
        if value > best:
            best, best_epoch = value, epoch
        if epoch - best_epoch >= patience:
            return epoch
    return len(val_curve)


def run(task, checkpoint, patience, epochs=12):
    model = load_model(checkpoint, ARCH, 4, 3)
    config = TrainConfig(lr=3e-2, epochs=epochs, seed=0, patience=patience)
    return fit(model, task.train, task.val, task.test, "all", config, blocks_for(ARCH))


def test_a_stopped_run_is_the_full_run_cut_at_the_plateau(task, synthetic_checkpoint):
    full = run(task, synthetic_checkpoint, None)
    curve = [h["val_acc"] for h in full.history]
    assert len(curve) == 12
    stop = expected_stop(curve, 2)
    assert stop < 12, f"no plateau of 2 epochs in {curve}: the test would not test stopping"
    stopped = run(task, synthetic_checkpoint, 2)
    assert [h["val_acc"] for h in stopped.history] == curve[:stop]
    assert [h["train_loss"] for h in stopped.history] == [h["train_loss"] for h in full.history[:stop]]
    prefix_best = max(range(stop), key=lambda i: (curve[i], -i)) + 1  # first epoch of the max
    assert stopped.best_epoch == prefix_best
    if full.best_epoch <= stop:  # the best came before the cut: same choice, same test
        assert stopped.test.acc == full.test.acc


def test_patience_must_be_a_positive_integer_and_protocols_pass_it_on():
    with pytest.raises(ConfigError, match="patience must be at least 1"):
        TrainConfig(lr=1e-3, epochs=3, patience=0)
    with pytest.raises(ConfigError, match="patience must be an integer"):
        TrainConfig(lr=1e-3, epochs=3, patience=2.5)
    protocol = load_protocol("synthetic").replace(patience=4)
    assert protocol.tuning.run_config(1e-3, 0).patience == 4
    assert load_protocol("synthetic").tuning.run_config(1e-3, 0).patience is None


@pytest.mark.parametrize("method", ["lp-ft", "gradual-first-last"])
def test_a_plateau_before_the_last_phase_does_not_stop_the_run(task, synthetic_checkpoint, method):
    model = load_model(synthetic_checkpoint, ARCH, 4, 3)
    config = TrainConfig(lr=3e-2, epochs=8, seed=0, patience=1)
    result = fit(model, task.train, task.val, task.test, method, config, blocks_for(ARCH))
    tuned = [h["tuned"] for h in result.history]
    # lp-ft: epochs 1-4 probe the head, 5-8 tune everything; gradual: the last block joins at 7
    last_start = {"lp-ft": 5, "gradual-first-last": 7}[method]
    assert len(tuned) >= last_start and tuned[last_start - 1] == max(tuned) > tuned[0]
