"""Architectures by name.

    build_model("resnet26", num_classes=10)                 CIFAR ResNet-26, width 16
    build_model("resnet26-w8", 10, in_channels=1)           narrower, for fast CPU work
    build_model("resnet50", 1000)                           torchvision layout and names
"""

from __future__ import annotations

from torch import nn

from .cifar_resnet import CifarResNet
from .resnet import ResNet50
from .staged import StagedModel, Stages, stages_of

_BUILDERS = {
    "resnet26": lambda c, k: CifarResNet(c, k, width=16),
    "resnet26-w8": lambda c, k: CifarResNet(c, k, width=8),
    "resnet26-w4": lambda c, k: CifarResNet(c, k, width=4),
    "resnet50": lambda c, k: ResNet50(c, k),
}
ARCHS = tuple(_BUILDERS)


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised network (random weights; load a checkpoint for real work)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    return _BUILDERS[arch](num_classes, in_channels)


__all__ = ["ARCHS", "CifarResNet", "ResNet50", "StagedModel", "Stages", "build_model", "stages_of"]
