"""`resnet26-gn`: the CIFAR-10 ResNet-26 of the TTT and MEMO code, with GroupNorm(8).

The network of `yueatsprograms/ttt_cifar_release` (models/ResNet.py, `ResNetCifar`),
which MEMO (`zhangmarvin/memo`, cifar-10-exps) uses with depth 26, width 1 and
`norm_layer = GroupNorm(8, channels)`. Written here in plain torch from its published
structure; the module names are the original's, so its checkpoint
(`{"net": state_dict, ...}`) loads unchanged through `deep.checkpoints.load_model`.

    conv1: 3x3, in_channels -> 16, stride 1, no bias
    layer1, layer2, layer3: 4 pre-activation blocks each, widths 16, 32, 64;
        the first block of layer2 and layer3 has stride 2
    bn: GroupNorm(8, 64) -> relu -> average pool over the whole 8x8 map -> fc (64 -> classes)

A block computes x' + conv2(relu(bn2(conv1(relu(bn1(x)))))), where x' is x or, where
the shape changes, `downsample(x)`: a 2x2 average pool with stride 2 followed by as
many all-zero channels as needed (no parameters). The "bn" modules are GroupNorms
(the original kept the BatchNorm names). 26 weighted layers = conv1 + 3 x 4 x 2 + fc.

Inputs: RGB in [0, 1] normalised with mean = std = 0.5 per channel (the TTT/MEMO
transforms), which the registered architecture declares as its `normalization`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Architecture, register_architecture
from .staged import StagedModel

GROUPS = 8
WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 4  # depth 26 = 6 * 4 + 2
MEMO_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that steers clear of a crash in torch's CPU kernel (torch 2.13).

    Its backward segfaults when the input is channels-last and needs no gradient while
    the affine parameters do: exactly the first norm of a tuned stage whose input comes
    from the prefix cache. Such an input is made NCHW first (same numbers, other layout;
    tests/deep/test_reference_models.py reproduces the crash in a child process)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _crashing_backward(self, x):
            x = x.contiguous()
        return super().forward(x)


def _crashing_backward(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and torch.is_grad_enabled()
            and not x.requires_grad and any(p.requires_grad for p in norm.parameters())
            and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))


def group_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm(GROUPS, channels)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ZeroPadDownsample(nn.Module):
    """Parameter-free shortcut: average-pool by `stride`, then append zero channels up
    to `cout` (the original's `Downsample`; `cout` must be a multiple of `cin`)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout % cin:
            raise ValueError(f"output channels {cout} must be a multiple of input channels {cin}")
        self.avg = nn.AvgPool2d(stride)
        self.extra_channels = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg(x)
        zeros = x.new_zeros(x.shape[0], self.extra_channels, *x.shape[2:])
        return torch.cat([x, zeros], 1)


class PreActBlock(nn.Module):
    """norm -> relu -> conv -> norm -> relu -> conv, plus the (downsampled) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.downsample = ZeroPadDownsample(cin, cout, stride) if stride != 1 or cin != cout else None
        self.bn1 = group_norm(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = group_norm(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(self.relu1(self.bn1(x)))
        residual = self.conv2(self.relu2(self.bn2(residual)))
        residual += x if self.downsample is None else self.downsample(x)  # conv2's own output
        return residual


class GroupNormResNet26(StagedModel):
    """(b, in_channels, H, W) -> logits (b, num_classes); 32x32 RGB for the MEMO weights."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = conv3x3(in_channels, WIDTHS[0])
        cin = WIDTHS[0]
        for i, (cout, stride) in enumerate(zip(WIDTHS, (1, 2, 2)), start=1):
            blocks = [PreActBlock(cin, cout, stride)]
            blocks += [PreActBlock(cout, cout) for _ in range(BLOCKS_PER_STAGE - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.bn = group_norm(cin)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the original's N(0, 2 / (k * k * out_channels))
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # Stage 2 ends with the final norm and the pooling, so the input cached for `last`
    # is a 64-vector. The final norm belongs to no tune block (see BLOCKS).
    stage_prefixes = (("conv1", "layer1"), ("layer2",), ("layer3", "bn"), ("fc",))

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.layer1(self.conv1(x))
        if index == 1:
            return self.layer2(x)
        if index == 2:
            x = self.relu(self.bn(self.layer3(x)))
            # the original's AvgPool2d(8) on the 8x8 map of a 32x32 input, for any size
            return torch.flatten(F.avg_pool2d(x, x.shape[-2:]), 1)
        if index == 3:
            return self.fc(x)
        raise IndexError(f"stage index must be in [0, 4), got {index}")

    # GroupNorm normalises with statistics of each example: nothing to fold into a conv.
    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return []


# Tune blocks by analogy with the public code's WideResNet blocks: the stem joins the
# first stage; the final norm `bn` is in no single block (only `all` tunes it).
BLOCKS = {"first": ("conv1", "layer1"), "second": ("layer2",), "third": ("layer3",),
          "last": ("fc",)}

register_architecture(Architecture(
    "resnet26-gn", build=lambda num_classes, in_channels: GroupNormResNet26(num_classes, in_channels),
    blocks=BLOCKS, normalization=MEMO_NORMALIZATION,
    notes="CIFAR ResNet-26 with GroupNorm(8), pre-activation: the TTT/MEMO network and names"))
