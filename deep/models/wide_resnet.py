"""`wrn28-10`: RobustBench's pre-activation WideResNet-28-10 (the public code's CIFAR model).

The network of RobustBench's `robustbench/model_zoo/architectures/wide_resnet.py`
(`WideResNet(depth=28, widen_factor=10)`, the CIFAR-10 `Standard` model that
github.com/anniesch/surgical-finetuning tunes). Written here in plain torch from its
published structure, with its module names, so its weight files load unchanged
through `deep.checkpoints.load_model` (raw, `{"state_dict": ...}`, "module." keys).

    conv1: 3x3, in_channels -> 16, no bias
    block1, block2, block3: `NetworkBlock`s of 4 `BasicBlock`s each (in `.layer`),
        widths 160, 320, 640; the first block of block2 and block3 has stride 2
    bn1 (BatchNorm, 640) -> relu -> average pool over the 8x8 map -> fc (640 -> classes)

A BasicBlock is pre-activation: relu(bn1(x)) -> conv1 (3x3, stride) -> relu(bn2) ->
conv2 (3x3). When its input and output widths are equal it adds x; otherwise the
activated input goes through `convShortcut` (1x1, stride) and that is added.
36,479,194 parameters for 10 classes; no dropout (RobustBench's dropRate = 0).

Inputs: RGB in [0, 1], no normalisation (RobustBench's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Architecture, register_architecture
from .staged import StagedModel

DEPTH, WIDEN = 28, 10
UNIT_INTERVAL = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean 0, std 1: images stay in [0, 1]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Pre-activation block; `convShortcut` exists only where the width changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.equalInOut = cin == cout  # noqa: N815 (RobustBench's name)
        self.convShortcut = (None if self.equalInOut  # noqa: N815
                             else nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # equal widths add the raw input, otherwise the shortcut of the activated input
        out += x if self.equalInOut else self.convShortcut(activated)  # conv2's own output
        return out


class NetworkBlock(nn.Module):
    """`count` BasicBlocks in `.layer`; the first one changes width and stride."""

    def __init__(self, count: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(StagedModel):
    """(b, in_channels, H, W) -> logits (b, num_classes); 32x32 RGB in [0, 1] for the weights."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = DEPTH,
                 widen_factor: int = WIDEN):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        per_block = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = conv3x3(in_channels, widths[0])
        self.block1 = NetworkBlock(per_block, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(per_block, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(per_block, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    # Stage 2 ends with the final bn1 and the pooling (the input cached for `last` is a
    # 640-vector); bn1 belongs to no tune block, as in the public code (see BLOCKS).
    stage_prefixes = (("conv1", "block1"), ("block2",), ("block3", "bn1"), ("fc",))

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.block1(self.conv1(x))
        if index == 1:
            return self.block2(x)
        if index == 2:
            x = self.relu(self.bn1(self.block3(x)))
            # RobustBench's avg_pool2d(8) on the 8x8 map of a 32x32 input, for any size
            return torch.flatten(F.avg_pool2d(x, x.shape[-2:]), 1)
        if index == 3:
            return self.fc(x)
        raise IndexError(f"stage index must be in [0, 4), got {index}")

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """Where a BN reads a conv's output and nothing else does: each block's conv1 ->
        bn2, and the stem conv1 -> block1's first bn1 (that block changes width, so it
        keeps only the activated input). Every other bn1 reads a residual sum."""
        pairs = [(f"{name}.conv1", f"{name}.bn2") for name, module in self.named_modules()
                 if isinstance(module, BasicBlock)]
        first = self.block1.layer[0]
        if not first.equalInOut:
            pairs.append(("conv1", "block1.layer.0.bn1"))
        return pairs


def _init_weights(model: nn.Module) -> None:
    """RobustBench's: convs N(0, 2 / (k * k * out_channels)), BN 1 and 0, fc bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# The public code's blocks (main.py, tune_params_dict for cifar10): first_two_block =
# conv1 + block1, second_block = block2, third_block = block3, last = fc. The final
# bn1 is in none of them: only `all` tunes it.
BLOCKS = {"first": ("conv1", "block1"), "second": ("block2",), "third": ("block3",),
          "last": ("fc",)}

register_architecture(Architecture(
    "wrn28-10", build=lambda num_classes, in_channels: WideResNet(num_classes, in_channels),
    blocks=BLOCKS, normalization=UNIT_INTERVAL,
    notes="RobustBench's pre-activation WideResNet-28-10 (the public code's CIFAR model), "
          "inputs in [0, 1]"))
