"""Architectures by name (the registry lives in `deep.models.registry`).

    build_model("resnet26", num_classes=10)                 CIFAR ResNet-26, width 16
    build_model("resnet26-w8", 10, in_channels=1)           narrower, for fast CPU work
    build_model("resnet50", 1000)                           torchvision layout and names
    get_architecture("resnet26").blocks                     its tune blocks, forward order

Each model module registers its own architectures when imported; importing them
all here fills the registry. A new architecture adds one import line below.
"""

from __future__ import annotations

from torch import nn

from ..errors import check_int
from . import cifar_resnet, resnet  # noqa: F401  (each registers its architectures)
from . import vit  # noqa: F401  (CLIP ViTs: clip-vit-b16, clip-vit-b16-gelu, clip-vit-tiny)
from . import gn_resnet, wide_resnet  # noqa: F401  (reference CIFAR models: resnet26-gn, wrn28-10)
from .cifar_resnet import CifarResNet
from .registry import (Architecture, architecture_names, block_order, get_architecture, matches,
                       matches_any, register_architecture, same_network)
from .resnet import ResNet50
from .staged import StagedModel, Stages, stages_of

ARCHS = architecture_names()  # the built-in ones; architecture_names() also sees later additions


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised network (random weights; load a checkpoint for real work)."""
    spec = get_architecture(arch)
    return spec.build(check_int("num_classes", num_classes), check_int("in_channels", in_channels))


__all__ = ["ARCHS", "Architecture", "CifarResNet", "ResNet50", "StagedModel", "Stages",
           "architecture_names", "block_order", "build_model", "get_architecture", "matches",
           "matches_any", "register_architecture", "same_network", "stages_of"]
