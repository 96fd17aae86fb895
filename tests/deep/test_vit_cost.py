"""deep.vit_cost: the closed-form FLOPs of a CLIP ViT against torch's flop counter, and the
command's output (what make gpu-check reads)."""

from __future__ import annotations

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


def test_attention_flops_by_hand():
    # clip-vit-tiny: 6 blocks x 2 heads x 2 matmuls of 17 x 17 tokens x 16 (head width),
    # 2 FLOPs per multiply-add.
    assert attention_flops("clip-vit-tiny") == 6 * 2 * 2 * (2 * 17 * 17 * 16)
    # ViT-B/16: 197 tokens, 12 blocks x 12 heads of width 64: 1.43 GFLOPs.
    assert attention_flops("clip-vit-b16") == 12 * 12 * 2 * 2 * 197 * 197 * 64


def test_the_command_prints_what_gpu_check_reads(capsys):
    assert main(["--arch", "clip-vit-tiny", "--device", "cpu", "--batch", "2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "forward FLOPs per image: 0.002926 G (closed form" in out
    forward = re.search(r"^forward \(inference\): (\S+) s/image", out, re.MULTILINE)
    train = re.search(r"^forward\+backward, all parameters: (\S+) s/image$", out, re.MULTILINE)
    assert float(forward.group(1)) > 0 and float(train.group(1)) > 0
