"""deep.vit_cost: the closed-form FLOPs of a CLIP ViT against torch's flop counter, and the
command's output (what make gpu-check reads)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deep.models import build_model
from deep.models.vit import CONFIGS
from deep.vit_cost import attention_flops, forward_flops, main


@pytest.mark.parametrize("arch", ["clip-vit-tiny", "clip-vit-b16"])
def test_closed_form_is_torchs_count_plus_the_attention_it_misses(arch):
    size = CONFIGS[arch].image_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build_model(arch, 2).eval()(torch.randn(1, 3, size, size))
    assert forward_flops(arch) == counter.get_total_flops() + attention_flops(arch)


def explicit_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with plain matmuls, which torch's counter sees."""
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    return weights @ v


@pytest.mark.parametrize("arch", ["clip-vit-tiny", "clip-vit-b16"])
def test_closed_form_equals_the_count_with_attention_as_plain_matmuls(arch, monkeypatch):
    """Every term, attention included, against an independent count: the network with
    scaled_dot_product_attention replaced by explicit matmuls (same outputs)."""
    import deep.models.vit as vit
    size = CONFIGS[arch].image_size
    model = build_model(arch, 2).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        fused = model(x)
        monkeypatch.setattr(vit.F, "scaled_dot_product_attention", explicit_attention)
        with FlopCounterMode(display=False) as counter:
            plain = model(x)
    assert torch.allclose(fused, plain, atol=1e-4)
    assert forward_flops(arch) == counter.get_total_flops()


@pytest.fixture
def keep_threads():
    """main sets torch's thread count (--threads, default 1): restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_command_prints_what_gpu_check_reads(capsys, keep_threads):
    assert main(["--arch", "clip-vit-tiny", "--device", "cpu", "--batch", "2",
                 "--repeats", "1", "--amp"]) == 0
    out = capsys.readouterr().out
    assert "device cpu, amp off (--amp acts on CUDA only), batch 2" in out
    assert "1 CPU threads" in out
    assert "forward FLOPs per image: 0.002926 G (closed form" in out
    forward = re.search(r"^forward \(inference\): (\S+) s/image", out, re.MULTILINE)
    train = re.search(r"^forward\+backward, all parameters: (\S+) s/image$", out, re.MULTILINE)
    assert float(forward.group(1)) > 0 and float(train.group(1)) > 0


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["--threads", "-1"], "argument --threads: expected an integer >= 1, got '-1'"),
])
def test_bad_counts_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_device_is_one_line(capsys, keep_threads):
    assert main(["--device", "bogus"]) == 2
    assert capsys.readouterr().err == "error: device must be auto, cpu, cuda or cuda:N, got 'bogus'\n"


def test_measure_reports_the_best_timed_batch_per_image(monkeypatch):
    """A fake clock: forward batches take 3, 1, 2 s, training batches 5, 4, 6 s, batch 2:
    the best batch per image is 0.5 s and 2 s (not the worst, not per batch)."""
    import types

    import deep.vit_cost as vit_cost
    ticks = iter([0, 3, 10, 11, 20, 22,  30, 35, 40, 44, 50, 56])
    monkeypatch.setattr(vit_cost, "time",
                        types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    r = vit_cost.measure("clip-vit-tiny", "cpu", False, batch=2, repeats=3)
    assert (r["forward_s"], r["train_s"]) == (0.5, 2.0)
    assert next(ticks, None) is None  # every tick read: 2 per timed batch


def test_measure_warms_up_once_and_trains_in_training_mode(monkeypatch):
    """Guards the untimed warm-up batch and `model.train()` before the training steps: with
    repeats=3, a stand-in model sees one flop-counted single image, then 1 + 3 forward
    batches in eval mode, then 1 + 3 training batches in training mode (a model with
    dropout or batch norm would otherwise time its inference path as training)."""
    import deep.vit_cost as vit_cost

    calls = []

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            calls.append((len(x), self.training))
            return x.flatten(1)[:, :2] * self.w

    monkeypatch.setattr(vit_cost, "build_model", lambda arch, num_classes: StandIn())
    vit_cost.measure("clip-vit-tiny", "cpu", False, batch=2, repeats=3)
    assert calls == [(1, False)] + [(2, False)] * 4 + [(2, True)] * 4
