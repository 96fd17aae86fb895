"""Memory layout and allocator settings of the fast path (they change speed, never numbers)."""

from __future__ import annotations

import platform

import pytest
import torch

from deep.allocator import keep_freed_memory
from deep.data.base import TensorSplit
from deep.models import build_model
from deep.models.staged import to_memory_format
from deep.train import PrefixCache, default_eval_batch_size, predict

pytestmark = pytest.mark.usefixtures("one_thread")
CL = torch.channels_last


def test_single_channel_tensor_gets_channels_last_strides():
    x = torch.randn(4, 1, 5, 5)
    assert x.contiguous(memory_format=CL).stride() == x.stride()  # why the helper exists
    y = to_memory_format(x, CL)
    assert y.stride() == (25, 1, 5, 1) and torch.equal(x, y)
    assert to_memory_format(y, CL) is y  # already laid out: no copy
    rgb = torch.randn(4, 3, 5, 5)
    assert to_memory_format(rgb, CL).stride() == (75, 1, 15, 3)
    flat = torch.randn(4, 7)
    assert to_memory_format(flat, CL) is flat


def test_grayscale_model_runs_channels_last_through_the_cache():
    """A 1-channel input used to leave the whole first stage in NCHW (oneDNN then reorders
    every activation); through the cache every stage output is channels-last, and the
    function is the plain model's."""
    torch.manual_seed(0)
    model = build_model("resnet26-w4", 10, 1).eval()
    images = torch.randn(20, 1, 12, 12)
    split = TensorSplit(images, torch.arange(20) % 10, name="test")
    cache = PrefixCache(model, {"test": split}, channels_last=True)
    h = cache.stages.run(images, 0, 1)
    assert h.stride(1) == 1 and h.is_contiguous(memory_format=CL)
    with torch.no_grad():
        plain = model(images)
        assert torch.allclose(cache.stages.run(images, 0), plain, atol=1e-5)
    assert torch.equal(predict(model, split, cache=cache, name="test"), plain.argmax(1))


def test_evaluation_batch_size_does_not_change_predictions():
    torch.manual_seed(1)
    model = build_model("resnet26-w4", 10, 3).eval()
    split = TensorSplit(torch.randn(150, 3, 12, 12), torch.arange(150) % 10, name="val")
    assert default_eval_batch_size("cpu") == 64 and default_eval_batch_size("cuda") == 256
    assert torch.equal(predict(model, split), predict(model, split, batch_size=150))


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are a glibc setting")
def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


def test_keep_freed_memory_sets_glibcs_three_thresholds_and_retries_after_a_refusal(monkeypatch):
    """mallopt(M_MMAP_THRESHOLD = -3, 32 MiB), (M_TRIM_THRESHOLD = -1, 1 GiB), (M_TOP_PAD =
    -2, 64 MiB), by <malloc.h>'s numbers; a libc that refuses (mallopt returns 0) leaves the
    setting not applied, so the next call tries again rather than claiming success."""
    import ctypes
    from types import SimpleNamespace

    from deep import allocator
    calls, libc_accepts = [], {"now": False}

    def mallopt(param, value):
        calls.append((param, value))
        return int(libc_accepts["now"])
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    assert keep_freed_memory() is False
    libc_accepts["now"] = True
    calls.clear()
    assert keep_freed_memory() is True
    assert calls == [(-3, 32 * 2**20), (-1, 2**30), (-2, 64 * 2**20)]
    assert keep_freed_memory() is True and len(calls) == 3   # applied: not set again


def test_keep_freed_memory_changes_nothing_off_linux_or_without_mallopt(monkeypatch):
    """macOS and Windows: nothing to set, no libc looked up, False. A Linux libc without
    mallopt (musl): False, not an AttributeError out of every command-line entry point."""
    import ctypes
    from types import SimpleNamespace

    from deep import allocator
    looked_up = []
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: looked_up.append(name) or SimpleNamespace())
    for platform_name in ("darwin", "win32"):
        monkeypatch.setattr(allocator.sys, "platform", platform_name)
        assert keep_freed_memory() is False
    assert looked_up == []
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    assert keep_freed_memory() is False and len(looked_up) == 1
    assert allocator._applied is False
