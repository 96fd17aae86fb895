"""The GPU path of the engine: --device auto, --amp (bf16 autocast), pinned copies.

On a CPU-only machine these tests check that the GPU options change nothing there;
the CUDA tests run where a GPU is present (`make gpu-check` measures speed).
"""

from __future__ import annotations

import pytest
import torch

from deep.blocks import blocks_for
from deep.checkpoints import load_model
from deep.data import get_benchmark
from deep.prefix_cache import to_device
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


def test_device_auto():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"


def test_to_device_leaves_cpu_batches_alone():
    x = torch.randn(4, 3)
    assert to_device(x, "cpu") is x  # no pinned copy when nothing goes to a GPU


@CUDA
def test_cuda_batches_are_copied_from_pinned_memory():
    x = torch.randn(64, 3, 16, 16)
    y = to_device(x, "cuda")
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x) and not x.is_pinned()


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
