"""ResNet-50 with torchvision's module names, so standard weight files load unchanged.

    conv1 (7x7, stride 2) -> bn1 -> relu -> maxpool (3x3, stride 2)
    layer1..layer4: 3, 4, 6, 3 Bottlenecks (widths 64..512, expansion 4); the
        stride sits on the 3x3 conv (torchvision's "ResNet v1.5")
    avgpool (global) -> flatten -> fc (2048 -> num_classes)

Each Bottleneck has conv1/bn1 (1x1), conv2/bn2 (3x3), conv3/bn3 (1x1) and, where
the shape changes, downsample.0 (1x1 conv) / downsample.1 (BN). Plain torch,
written from the published architecture; no torchvision import.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import Architecture, register_architecture
from .staged import StagedModel, torchvision_conv_bn_pairs


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as torchvision: one activation-sized buffer less per block
        return self.relu(out)


class ResNet50(StagedModel):
    """(b, in_channels, H, W) -> logits (b, num_classes); 224x224 RGB for ImageNet weights."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3,
                 layers: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (count, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            stride = 1 if i == 1 else 2
            blocks = [Bottleneck(cin, width, stride)]
            cin = width * Bottleneck.expansion
            blocks += [Bottleneck(cin, width) for _ in range(count - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # Stages are the tune blocks (first = stem + layer1, ..., last = fc).
    stage_prefixes = (("conv1", "bn1", "layer1"), ("layer2",), ("layer3",), ("layer4",), ("fc",))

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return torchvision_conv_bn_pairs(self)

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        if index in (1, 2):
            return getattr(self, f"layer{index + 1}")(x)
        if index == 3:
            return torch.flatten(self.avgpool(self.layer4(x)), 1)
        if index == 4:
            return self.fc(x)
        raise IndexError(f"stage index must be in [0, 5), got {index}")


# The tune blocks are the stages: first = stem + layer1, ..., last = fc. No input
# normalisation is declared: the benchmarks normalise with ImageNet statistics already.
register_architecture(Architecture(
    "resnet50", build=lambda c, k: ResNet50(c, k),
    blocks=dict(zip(("first", "second", "third", "fourth", "last"), ResNet50.stage_prefixes)),
    notes="torchvision ResNet-50 layout (ImageNet weights load unchanged)"))

# The public code's ResNet-50 blocks (github.com/anniesch/surgical-finetuning, main.py):
# its first block is conv1 + layer1 without bn1, which only `all` tunes. The same network
# and weights under a second name, because a tune option outside the forward-order
# partition of blocks would change gradual unfreezing and lp-ft.
register_architecture(Architecture(
    "resnet50-public", build=lambda c, k: ResNet50(c, k),
    blocks={"first": ("conv1", "layer1"), "second": ("layer2",), "third": ("layer3",),
            "fourth": ("layer4",), "last": ("fc",)},
    notes="ResNet-50 with the public code's blocks: first = conv1 + layer1, bn1 only in all",
    network="resnet50"))
