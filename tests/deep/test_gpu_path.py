"""The GPU path of the engine: --device auto, --amp (bf16 autocast), pinned copies.

On a CPU-only machine these tests check that the GPU options change nothing there;
the CUDA tests run where a GPU is present (`make gpu-check` measures speed).
"""

from __future__ import annotations

import pytest
import torch

import deep.prefix_cache
from deep.blocks import blocks_for
from deep.checkpoints import load_model
from deep.data import get_benchmark
from deep.data.base import TensorSplit
from deep.errors import ConfigError
from deep.models import build_model
from deep.prefix_cache import PrefixCache, to_device
from deep.train import TrainConfig, autocast, fit, resolve_device

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "resnet26-w4"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def task():
    return get_benchmark("synthetic").load_task(None, "noise", n_target=96, val_per_class=10,
                                                test_per_class=20, seed=0)


def tuned(checkpoint, task, method, device="cpu", **config):
    model = load_model(checkpoint, ARCH, 4, 3).to(device)
    result = fit(model, task.train, task.val, task.test, method,
                 TrainConfig(lr=1e-2, epochs=2, seed=0, device=device, **config), blocks_for(ARCH))
    return result, model


@pytest.mark.parametrize("method", ["first", "last", "all"])
def test_amp_changes_nothing_on_cpu(synthetic_checkpoint, task, method):
    plain, plain_model = tuned(synthetic_checkpoint, task, method)
    amp, amp_model = tuned(synthetic_checkpoint, task, method, amp=True)
    assert amp.losses == plain.losses and amp.best_epoch == plain.best_epoch
    assert (amp.val.acc, amp.test.acc) == (plain.val.acc, plain.test.acc)
    for (name, a), b in zip(amp_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_autocast_only_on_cuda():
    with autocast("cpu", True):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast("cuda", False):
        assert not torch.is_autocast_enabled("cuda")


@pytest.fixture
def amp_on_cpu(monkeypatch):
    """bf16 autocast on the CPU too: the amp code path, checked without a GPU."""
    monkeypatch.setattr(deep.prefix_cache, "AMP_DEVICE_TYPES", ("cuda", "cpu"))


@pytest.mark.parametrize("arch, method", [("resnet26-w4", "second"), ("clip-vit-tiny", "last3")])
def test_amp_prefix_cache_gives_the_numbers_of_a_full_forward(amp_on_cpu, arch, method):
    """Under amp the cached prefix is what an autocast forward computes, for every split:
    the same losses and accuracies with the cache as without it (the train split was once
    cached in float32 and val/test in bf16: losses 0.016 apart)."""
    g = torch.Generator().manual_seed(0)
    train, val, test = (TensorSplit(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3)
                        for n in (24, 12, 12))
    results, caches = [], []
    for use_cache in (True, False):
        torch.manual_seed(0)
        model = build_model(arch, 3)
        cache = PrefixCache(model, {"train": train, "val": val, "test": test}, fold_bn=False,
                            channels_last=False, amp=True) if use_cache else None
        config = TrainConfig(lr=1e-3, epochs=2, batch_size=8, seed=0, amp=True,
                             use_cache=use_cache, fold_bn=False, channels_last=False)
        results.append(fit(model, train, val, test, method, config, blocks_for(arch), cache))
        caches.append(cache)
    cached, plain = results
    assert cached.start_stage > 0 and plain.start_stage == 0
    assert cached.losses == plain.losses
    assert (cached.val.acc, cached.test.acc) == (plain.val.acc, plain.test.acc)
    stored = {name: acts.dtype for (name, s), acts in caches[0]._acts.items() if s > 0}
    assert set(stored) == {"train", "val", "test"}
    assert set(stored.values()) == {torch.bfloat16}


def test_a_cache_built_without_amp_is_refused_by_an_amp_run(amp_on_cpu, synthetic_checkpoint,
                                                            task):
    model = load_model(synthetic_checkpoint, ARCH, 4, 3)
    cache = PrefixCache(model, {"train": task.train, "val": task.val, "test": task.test})
    with pytest.raises(ConfigError, match="built with amp=False.*amp=True"):
        fit(model, task.train, task.val, task.test, "last", TrainConfig(lr=1e-2, epochs=1,
            amp=True), blocks_for(ARCH), cache)


def test_on_the_cpu_amp_changes_nothing_so_any_cache_serves(synthetic_checkpoint, task):
    """Where amp is inactive (the CPU) a cache built without it serves an amp run."""
    model = load_model(synthetic_checkpoint, ARCH, 4, 3)
    cache = PrefixCache(model, {"train": task.train, "val": task.val, "test": task.test})
    result = fit(model, task.train, task.val, task.test, "last",
                 TrainConfig(lr=1e-2, epochs=1, amp=True), blocks_for(ARCH), cache)
    assert result.status == "ok" and result.start_stage > 0


def test_device_auto():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("cuda:1") == "cuda:1"
    else:   # asked for, not there: said before any work, not a torch assertion later
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            resolve_device("cuda:1")
    for bad in ("gpu", "cpu:3"):   # a CPU index would be accepted by torch and mean nothing
        with pytest.raises(ConfigError, match=f"device must be auto, cpu, cuda or cuda:N, got '{bad}'"):
            resolve_device(bad)


def test_to_device_leaves_cpu_batches_alone():
    x = torch.randn(4, 3)
    assert to_device(x, "cpu") is x  # no pinned copy when nothing goes to a GPU


def spy_on_copies(monkeypatch, pin=None, copy=None):
    """Lists of the tensors pinned, (tensor pinned, its pinned copy), and of the copies
    made, (tensor copied, was it pinned then, args, kwargs). `pin` and `copy` stand in
    for `Tensor.pin_memory` and `Tensor.to` (default: the real ones)."""
    pinned, copies = [], []
    real_pin, real_to = torch.Tensor.pin_memory, torch.Tensor.to

    def pin_memory(self, *args, **kwargs):
        out = (pin or real_pin)(self, *args, **kwargs)
        pinned.append((self, out))
        return out

    def to(self, *args, **kwargs):
        copies.append((self, self.is_pinned(), args, kwargs))
        return (copy or real_to)(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return pinned, copies


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_a_cpu_batch_bound_for_a_gpu_is_pinned_before_its_copy(monkeypatch, device):
    """The decision, on any machine: pinning and the copy are stand-ins here (the CPU
    copy of the batch, the batch itself), so no GPU is needed."""
    pinned, copies = spy_on_copies(monkeypatch, pin=lambda self: self.clone(),
                                   copy=lambda self, *args, **kwargs: self)
    x = torch.randn(4, 3)
    moved = to_device(x, device)
    assert len(pinned) == 1 and pinned[0][0] is x, "the batch was not pinned"
    assert len(copies) == 1 and copies[0][0] is pinned[0][1] and moved is pinned[0][1], \
        "the copy to the GPU must leave from the pinned tensor"
    assert copies[0][2:] == ((torch.device(device),), {"non_blocking": True})
    pinned.clear()
    assert to_device(x, torch.device("cpu")) is x and pinned == []  # nothing for the CPU


@CUDA
def test_cuda_batches_are_copied_from_pinned_memory(monkeypatch):
    pinned, copies = spy_on_copies(monkeypatch)
    x = torch.randn(64, 3, 16, 16)
    y = to_device(x, "cuda")
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x) and not x.is_pinned()
    assert len(pinned) == 1 and pinned[0][0] is x and pinned[0][1].is_pinned(), \
        "the batch was not pinned"
    copied, was_pinned, _, kwargs = copies[0]  # (y.cpu() may copy back too)
    assert copied is pinned[0][1] and was_pinned, "the copy left from pageable memory"
    assert kwargs == {"non_blocking": True}
    # a batch already pinned is copied as it is, not pinned again
    pinned.clear()
    copies.clear()
    z = torch.randn(8, 3).pin_memory()
    pinned.clear()
    assert torch.equal(to_device(z, "cuda").cpu(), z) and pinned == [], "pinned twice"
    copied, was_pinned, _, kwargs = copies[0]
    assert copied is z and was_pinned and kwargs == {"non_blocking": True}


@CUDA
def test_amp_on_cuda_runs_in_bf16_and_keeps_float32_weights(synthetic_checkpoint, task):
    with autocast("cuda", True):
        assert torch.is_autocast_enabled("cuda")
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16
    plain, _ = tuned(synthetic_checkpoint, task, "all", device="cuda")
    amp, model = tuned(synthetic_checkpoint, task, "all", device="cuda", amp=True)
    assert amp.status == "ok" and all(p.dtype == torch.float32 for p in model.parameters())
    # bf16 keeps 8 bits of mantissa: the losses differ, but not by much on this task
    assert amp.losses != plain.losses
    assert abs(amp.losses[0] - plain.losses[0]) < 0.05 * abs(plain.losses[0])
