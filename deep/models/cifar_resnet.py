"""CIFAR-style ResNet-26 (the paper's CIFAR model) and its narrower variants.

Layout (module names matter: the registered blocks below refer to them):

    conv1 (3x3, stride 1) -> bn1 -> relu                     stem
    layer1: 4 BasicBlocks, width w,   stride 1
    layer2: 4 BasicBlocks, width 2w,  first block stride 2
    layer3: 4 BasicBlocks, width 4w,  first block stride 2
    avgpool (global) -> flatten -> fc

26 weighted layers = stem conv + 3 stages x 4 blocks x 2 convs + fc. Global
average pooling makes the network accept any input size (32x32 RGB, 28x28
grayscale, ...). A block whose shape changes has a 1x1 conv + BN shortcut named
`downsample.0` / `downsample.1`, as in torchvision.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import Architecture, register_architecture
from .staged import StagedModel, torchvision_conv_bn_pairs


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision: one activation-sized buffer less per block
        return self.relu(out)


class CifarResNet(StagedModel):
    """ResNet for small images: (b, in_channels, H, W) -> logits (b, num_classes).

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: 3 for RGB, 1 for grayscale.
        width: channels of the first stage (16 for ResNet-26; 8 and 4 for the fast variants).
        blocks_per_stage: 4 gives ResNet-26.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16,
                 blocks_per_stage: int = 4):
        super().__init__()
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        widths = (width, 2 * width, 4 * width)
        cin = width
        for i, (cout, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = [BasicBlock(cin, cout, stride)]
            blocks += [BasicBlock(cout, cout) for _ in range(blocks_per_stage - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    # Stages are the tune blocks: first = stem + layer1, ..., last = fc. Pooling ends
    # the last feature stage so that the input cached for `last` is a small vector.
    stage_prefixes = (("conv1", "bn1", "layer1"), ("layer2",), ("layer3",), ("fc",))

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return torchvision_conv_bn_pairs(self)

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.layer1(self.relu(self.bn1(self.conv1(x))))
        if index == 1:
            return self.layer2(x)
        if index == 2:
            return torch.flatten(self.avgpool(self.layer3(x)), 1)
        if index == 3:
            return self.fc(x)
        raise IndexError(f"stage index must be in [0, 4), got {index}")


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# The tune blocks are the stages: first = stem + layer1, ..., last = fc.
CIFAR_BLOCKS = dict(zip(("first", "second", "third", "last"), CifarResNet.stage_prefixes))
for _name, _width, _notes in (("resnet26", 16, "the paper's CIFAR model"),
                              ("resnet26-w8", 8, "width 8, for fast CPU work"),
                              ("resnet26-w4", 4, "width 4, for tests and the synthetic benchmark")):
    register_architecture(Architecture(
        _name, build=lambda c, k, w=_width: CifarResNet(c, k, width=w), blocks=CIFAR_BLOCKS,
        notes=f"CIFAR ResNet-26, {_notes}"))
