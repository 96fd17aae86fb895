"""Pretraining resumes: the run's state is saved after every epoch (`<out>.state`), and a run
stopped or killed mid-way continues after its last finished epoch with the numbers of a run
never stopped (CPU, bit for bit: weights, BN statistics, optimizer moments, minibatch order
and augmentation draws all carried). A state file of other settings is refused."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deep.data import SourceData, TensorSplit, get_benchmark
from deep.errors import ConfigError
from deep.files import verify_checkpoint
from deep.pretrain import PretrainConfig, pretrain, state_path
from deep.train import TrainingRun

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
# augmentation on: its generator is part of what a continued run must carry
CONFIG = PretrainConfig(epochs=3, lr=0.05, batch_size=64, augment="crop-flip", seed=3)


@pytest.fixture(scope="module")
def source():
    return get_benchmark("synthetic").load_source(None)


class Stop(Exception):
    pass


def stopped_during_epoch(epoch: int, monkeypatch):
    """Make TrainingRun.train_epoch raise when it starts `epoch` (a run killed there)."""
    original, calls = TrainingRun.train_epoch, []

    def train_epoch(self, plan):
        calls.append(1)
        if len(calls) == epoch:
            raise Stop
        return original(self, plan)
    monkeypatch.setattr(TrainingRun, "train_epoch", train_epoch)


def stopped_run(source, state, monkeypatch, config=CONFIG):
    """Leave in `state` the run state of a pretraining killed as its epoch 2 started."""
    with monkeypatch.context() as patch:
        stopped_during_epoch(2, patch)
        with pytest.raises(Stop):
            pretrain(source, "resnet26-w4", config, progress=False, state_file=state)
    return state


def test_a_stopped_run_continues_to_the_weights_of_one_never_stopped(source, tmp_path, monkeypatch):
    whole = pretrain(source, "resnet26-w4", CONFIG, progress=False)
    state = tmp_path / "m.pt.state"
    with monkeypatch.context() as patch:
        stopped_during_epoch(3, patch)
        with pytest.raises(Stop):
            pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 2 and len(saved["history"]) == 2
    epochs = []
    monkeypatch.setattr(TrainingRun, "train_epoch",
                        lambda self, plan, f=TrainingRun.train_epoch: epochs.append(1) or f(self, plan))
    continued = pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state)
    assert len(epochs) == 1, "only epoch 3 runs again"
    for (name, a), (_, b) in zip(whole.state_dict().items(), continued.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name   # weights and BN running statistics
    final = torch.load(state, weights_only=True)
    # the continued run carries its first epochs' records on (a FitResult of all 3 epochs)
    assert final["epoch"] == 3 and [r["epoch"] for r in final["history"]] == [1, 2, 3]


class Bar:
    """Stands in for tqdm: keeps the count the bar starts at and reaches."""
    made = []

    def __init__(self, total, initial=0, **kwargs):
        self.start = self.n = initial
        Bar.made.append(self)

    def update(self, k):
        self.n += k

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def test_a_continued_runs_progress_bar_starts_at_its_saved_epoch(source, tmp_path, monkeypatch):
    """`pretrain` rerun after a stop showed 0/N during its first epoch, then jumped,
    which threw off the bar's rate and time left. Two small images keep it fast."""
    tiny = SourceData("synthetic", source.num_classes, source.in_channels,
                      TensorSplit(source.train.images[:2], source.train.labels[:2]),
                      source.test)
    config = dataclasses.replace(CONFIG, batch_size=2, augment="none")
    state = stopped_run(tiny, tmp_path / "m.pt.state", monkeypatch, config)  # saved epoch 1
    monkeypatch.setattr("tqdm.tqdm", Bar)
    Bar.made.clear()
    pretrain(tiny, "resnet26-w4", config, progress=True, state_file=state)
    [bar] = Bar.made
    assert (bar.start, bar.n) == (1, config.epochs)


def test_a_state_file_of_other_settings_is_refused(source, tmp_path, monkeypatch):
    state = stopped_run(source, tmp_path / "m.pt.state", monkeypatch)
    with pytest.raises(ConfigError, match=r"m.pt.state holds a stopped run with other settings "
                                          r"\(pretrain.lr: file 0.05 vs now 0.1\); rerun with the "
                                          r"settings it started with, or delete it"):
        pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state, lr=0.1)
    with pytest.raises(ConfigError, match=r"other settings \(arch: file 'resnet26-w4' vs now "
                                          r"'resnet26-w8'; pretrain.epochs: file 3 vs now 4\)"):
        pretrain(source, "resnet26-w8", CONFIG, progress=False, state_file=state, epochs=4)
    with pytest.raises(ConfigError, match=r"other settings \(data: file '[0-9a-f]{16}' vs now"):
        other = get_benchmark("synthetic").load_source(None)   # same size, other labels
        other.train.labels = other.train.labels.flip(0)
        pretrain(other, "resnet26-w4", CONFIG, progress=False, state_file=state)
    state.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="m.pt.state is not a readable run state .*delete it"):
        pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state)


def test_a_state_file_of_another_seed_is_refused(source, tmp_path, monkeypatch):
    # guards: the state's settings leaving out the seed (seed 3's run continued as seed 4's)
    state = stopped_run(source, tmp_path / "m.pt.state", monkeypatch)
    with pytest.raises(ConfigError, match=r"other settings \(pretrain.seed: file 3 vs now 4\)"):
        pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state, seed=4)


def test_a_state_file_of_another_init_is_refused(source, tmp_path, monkeypatch):
    # guards: the state's settings leaving out `init` (a run from random weights continued
    # as one from a file, whose weights a continued run never reads)
    state = stopped_run(source, tmp_path / "m.pt.state", monkeypatch)
    with pytest.raises(ConfigError, match=r"other settings \(pretrain.init: file None vs now "
                                          r"'[^']*init.pt'\)"):
        pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state,
                 init=str(tmp_path / "init.pt"))


def test_a_state_file_is_for_pretraining_only(source):
    from deep.blocks import blocks_for
    from deep.models import build_model
    from deep.train import RunStateFile, TrainConfig, fit
    task = get_benchmark("synthetic").load_task(None, "noise", 16, 2, 2, 0)
    with pytest.raises(ConfigError, match="a run state file is for pretraining .*'first' with a "
                                          "validation split"):
        fit(build_model("resnet26-w4", 4), task.train, task.val, None, "first",
            TrainConfig(lr=0.01, epochs=1), blocks_for("resnet26-w4"),
            state_file=RunStateFile(Path("unused"), {}))


def _linear_run(tmp_path, method="all", seed=0):
    """A linear model on 3 x 2 x 2 images, a train / test split, and a state file."""
    from deep.train import RunStateFile
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(0)
    train, test = (TensorSplit(torch.randn(n, 3, 2, 2, generator=g), torch.arange(n) % 3)
                   for n in (8, 6))
    return net, train, test, RunStateFile(tmp_path / "run.state", {"run": 1})


def test_a_state_file_is_refused_for_a_method_other_than_all_without_validation(tmp_path):
    """No validation split is not enough: the file holds one optimizer over every
    parameter and no method state, so a run of another method (a block) is refused."""
    from deep.train import TrainConfig, fit
    net, train, _, state = _linear_run(tmp_path)
    with pytest.raises(ConfigError, match=r"a run state file is for pretraining \(no validation "
                                          r"split, method 'all'\); got method 'head'$"):
        fit(net, train, None, None, "head", TrainConfig(lr=1e-2, epochs=1),
            {"head": ("1",)}, state_file=state)
    assert not state.path.exists()


def test_a_run_continued_after_its_last_epoch_keeps_that_epoch_and_tests_there(tmp_path):
    """A stopped run whose state file already holds its last epoch continues with nothing
    left to train: its result is that epoch's (best epoch 2 of 2, the file's weights, their
    test accuracy by hand), not "no epoch completed"."""
    from deep.train import TrainConfig, fit
    config = TrainConfig(lr=0.1, epochs=2, batch_size=4)
    net, train, test, state = _linear_run(tmp_path)
    fit(net, train, None, test, "all", config, state_file=state)
    again, _, _, state = _linear_run(tmp_path, seed=1)
    result = fit(again, train, None, test, "all", config, state_file=state)
    assert result.best_epoch == 2 and len(result.history) == 2
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), net.parameters()))
    with torch.no_grad():
        logits = test.images.flatten(1) @ net[1].weight.T + net[1].bias
    assert result.test.acc == (logits.argmax(1) == test.labels).float().mean().item()


def test_the_command_killed_mid_run_resumes_and_leaves_no_state_behind(tmp_path):
    """`python -m deep pretrain` killed with SIGKILL after an epoch: rerun, it continues
    (saying so) and, done, removes the state file; the checkpoint is the uninterrupted one's."""
    out, reference = tmp_path / "m.pt", tmp_path / "ref.pt"
    flags = ["--benchmark", "synthetic", "--epochs", "3", "--lr", "0.05", "--augment", "crop-flip"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "deep", "pretrain", *flags, "--device", "cpu"]
    done = subprocess.run([*command, "--out", str(reference)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = subprocess.Popen([*command, "--out", str(out)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not state_path(out).exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    assert run.poll() is None, "the run ended before it could be killed"
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists() and state_path(out).exists()
    done = subprocess.run([*command, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"continuing the stopped run saved in {state_path(out)}" in done.stderr
    assert not state_path(out).exists()
    from deep.checkpoints import load_checkpoint
    a, b = load_checkpoint(out).state_dict, load_checkpoint(reference).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_pretraining_rerun_repeats_no_work(tmp_path, monkeypatch, capsys):
    """A job requeued after its end (or `make pretrain` run twice) returns the finished
    model when its manifest records the same settings; other settings are refused."""
    from deep import pretrain as module
    out = tmp_path / "m.pt"
    config = PretrainConfig(epochs=1, lr=0.05, batch_size=64, augment="none")
    first = module.pretrain_to_file("synthetic", out, "resnet26-w4", config)
    from deep.files import machine
    assert first["machine"] == machine("cpu")  # CPU, instruction set, threads: bitwise provenance
    trained, original = [], module.pretrain
    monkeypatch.setattr(module, "pretrain", lambda *a, **k: trained.append(1) or original(*a, **k))
    again = module.pretrain_to_file("synthetic", out, "resnet26-w4", config)
    assert not trained and again["sha256"] == first["sha256"]
    assert f"{out} is already trained with these settings" in capsys.readouterr().err
    # other settings: refused, naming what differs; the finished model is kept
    with pytest.raises(ConfigError, match=r"holds a finished model trained with other settings "
                                          r"\(config\.pretrain\.lr: file 0\.05 vs now 0\.02\); delete it"):
        module.pretrain_to_file("synthetic", out, "resnet26-w4",
                                PretrainConfig(epochs=1, lr=0.02, batch_size=64, augment="none"))
    assert not trained and verify_checkpoint(out)["sha256"] == first["sha256"]
    stale = tmp_path / ".m.pt.state.x1y2z3w4.tmp"   # a killed state write's temp file
    stale.write_bytes(b"0" * 100)
    out.with_suffix(".pt.json").unlink()      # no manifest: not a finished run
    module.pretrain_to_file("synthetic", out, "resnet26-w4", config)
    assert trained == [1] and not stale.exists()


def test_the_state_outlives_a_run_stopped_before_its_manifest_is_written(tmp_path, monkeypatch):
    """A model file without its manifest is not a finished run: the state that lets a
    rerun continue is removed only once the manifest is written."""
    from deep import pretrain as module
    out = tmp_path / "m.pt"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        module.pretrain_to_file("synthetic", out, "resnet26-w4",
                                PretrainConfig(epochs=1, lr=0.05, batch_size=64, augment="none"))
    assert out.is_file() and not out.with_suffix(".pt.json").exists()
    assert state_path(out).is_file()


def test_the_data_fingerprint_reads_more_than_the_first_image():
    """A stopped run is continued only on the same data: two training splits of one size
    and one labelling that differ in their second image have other fingerprints."""
    from types import SimpleNamespace
    from deep.data.base import TensorSplit
    from deep.pretrain import source_fingerprint
    images, labels = torch.zeros(20, 1, 4, 4), torch.arange(20) % 2
    other = images.clone()
    other[1, 0, 2, 2] = 1.0
    prints = [source_fingerprint(SimpleNamespace(train=TensorSplit(x, labels)))
              for x in (images, images.clone(), other)]
    assert prints[0] == prints[1] != prints[2]


def test_a_finished_model_of_another_arch_is_not_taken_for_this_one(tmp_path, capsys):
    from deep.pretrain import pretrain_to_file
    config = PretrainConfig(epochs=1, lr=0.05, batch_size=64, augment="none")
    pretrain_to_file("synthetic", tmp_path / "m.pt", "resnet26-w4", config)
    with pytest.raises(ConfigError, match=r"other settings \(arch: file 'resnet26-w4' vs now "
                                          r"'resnet26-w8'.*\)"):
        pretrain_to_file("synthetic", tmp_path / "m.pt", "resnet26-w8", config)
    assert "already trained" not in capsys.readouterr().err


def test_a_finished_model_on_other_data_options_is_not_taken_for_this_one(tmp_path, capsys):
    # guards: `_finished` not comparing the data options the finished model was trained on
    from deep.pretrain import pretrain_to_file
    config = PretrainConfig(epochs=1, lr=0.05, batch_size=64, augment="none")
    pretrain_to_file("synthetic", tmp_path / "m.pt", "resnet26-w4", config)
    with pytest.raises(ConfigError, match=r"other settings \(data\.n_train: .*\)"):
        pretrain_to_file("synthetic", tmp_path / "m.pt", "resnet26-w4", config,
                         source_options={"n_train": 32})
    assert "already trained" not in capsys.readouterr().err

def test_a_diverged_run_leaves_no_state_to_refuse_the_smaller_lr(source, tmp_path):
    state = tmp_path / "m.pt.state"
    with pytest.raises(ConfigError, match="diverged .* try a smaller --lr"):
        pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state, lr=1e6)
    assert not state.exists()


def test_a_run_diverging_after_a_saved_epoch_removes_its_state(source, tmp_path, monkeypatch):
    # guards: a diverged run keeping the state of its earlier epochs (a smaller lr then refused)
    state, original, calls = tmp_path / "m.pt.state", TrainingRun.train_epoch, []

    def train_epoch(self, plan):           # epoch 2's loss is NaN, after epoch 1 was saved
        calls.append(state.exists())
        losses = original(self, plan)
        return [float("nan")] * len(losses) if len(calls) == 2 else losses
    monkeypatch.setattr(TrainingRun, "train_epoch", train_epoch)
    with pytest.raises(ConfigError, match="diverged .* try a smaller --lr"):
        pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state)
    assert calls == [False, True] and not state.exists()


def test_a_continued_run_takes_its_weights_from_the_state_not_the_init_file(source, tmp_path,
                                                                            monkeypatch):
    # guards: a continued run reading `init` again (it fails once the init file is gone)
    from deep.models import build_model
    torch.manual_seed(0)
    init = tmp_path / "init.pth"
    torch.save(build_model("resnet26-w4", source.num_classes).state_dict(), init)
    config = PretrainConfig(epochs=2, lr=0.05, batch_size=64, augment="none", init=str(init))
    whole = pretrain(source, "resnet26-w4", config, progress=False)
    state = stopped_run(source, tmp_path / "m.pt.state", monkeypatch, config)
    init.unlink()
    continued = pretrain(source, "resnet26-w4", config, progress=False, state_file=state)
    for (name, a), (_, b) in zip(whole.state_dict().items(), continued.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_a_state_file_of_other_data_options_is_refused(source, tmp_path):
    # guards: the state's key leaving out `data_key` (the loader options of the command):
    # a run stopped on one --data setting continued on another of the same fingerprint
    from deep.pretrain import _run_state
    state = tmp_path / "m.pt.state"
    saved, _ = _run_state(state, source, "resnet26-w4", CONFIG, {"options": {"n_train": 32}})
    saved.save({name: 0 for name in saved.FIELDS})   # any state: only its key is read here
    with pytest.raises(ConfigError,
                       match=r"other settings \(options\.n_train: file 32 vs now 64\)"):
        pretrain(source, "resnet26-w4", CONFIG, progress=False, state_file=state,
                 data_key={"options": {"n_train": 64}})


def test_compile_alone_does_not_refuse_a_stopped_runs_state(source, tmp_path):
    # guards: `compile` kept in the state's key: it changes speed, not the run, so a run
    # stopped without it continues with it (the documented exception to "same settings")
    from deep.pretrain import _run_state
    state = tmp_path / "m.pt.state"
    saved, _ = _run_state(state, source, "resnet26-w4", CONFIG, None)
    saved.save({name: 0 for name in saved.FIELDS})
    _, loaded = _run_state(state, source, "resnet26-w4",
                           dataclasses.replace(CONFIG, compile=True), None)
    assert loaded is not None and loaded["epoch"] == 0


def test_the_data_fingerprint_reads_the_file_paths_of_a_split_of_files():
    """Guards `paths` in the fingerprint: two file splits (ImageNet-C, Waterbirds, ...)
    of one labelling and size whose images are other files are other data."""
    from types import SimpleNamespace
    from deep.data.base import FileSplit
    from deep.data.images import ImageTransform
    from deep.pretrain import source_fingerprint
    labels = torch.tensor([0, 1])
    prints = [source_fingerprint(SimpleNamespace(train=FileSplit(paths, labels, None,
                                                                 ImageTransform())))
              for paths in (["a.png", "b.png"], ["a.png", "b.png"], ["a.png", "c.png"])]
    assert prints[0] == prints[1] != prints[2]
