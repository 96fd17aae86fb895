"""The one registry of tune options: architecture -> option -> module-name prefixes.

An option names a block of the network by the module-name prefixes of its
parameters ("layer2" covers "layer2.0.conv1.weight", ...). `"all"` means every
parameter. The options of an architecture are listed in forward order, which
gradual unfreezing and the report's plots rely on.

Any `nn.Module` can be tuned surgically by passing its own mapping:

    blocks = {"stem": ("features.0",), "head": ("classifier",)}
    names = tuned_parameter_names(my_model, "head", blocks)
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from torch import nn

_CIFAR_RESNET = {
    "first": ("conv1", "bn1", "layer1"),
    "second": ("layer2",),
    "third": ("layer3",),
    "last": ("fc",),
}
_RESNET50 = {
    "first": ("conv1", "bn1", "layer1"),
    "second": ("layer2",),
    "third": ("layer3",),
    "fourth": ("layer4",),
    "last": ("fc",),
}

BLOCKS: dict[str, dict[str, tuple[str, ...]]] = {
    "resnet26": _CIFAR_RESNET,
    "resnet26-w8": _CIFAR_RESNET,
    "resnet26-w4": _CIFAR_RESNET,
    "resnet50": _RESNET50,
}

ALL = "all"
BlockMap = Mapping[str, Sequence[str]]


def blocks_for(arch: str) -> dict[str, tuple[str, ...]]:
    """The mapping option -> prefixes of a registered architecture, in forward order."""
    if arch not in BLOCKS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(BLOCKS)}")
    return BLOCKS[arch]


def block_options(arch: str) -> tuple[str, ...]:
    """Single-block options of `arch` in forward order, e.g. ("first", ..., "last")."""
    return tuple(blocks_for(arch))


def block_prefixes(arch: str, option: str) -> tuple[str, ...]:
    """Module-name prefixes of one option of a registered architecture."""
    blocks = blocks_for(arch)
    if option not in blocks:
        raise ValueError(f"unknown block {option!r} for {arch}; "
                         f"known: {', '.join([*blocks, ALL])}")
    return blocks[option]


def matches(name: str, prefix: str) -> bool:
    """Whether parameter `name` lies under module `prefix` ("layer1" does not match "layer10")."""
    return name == prefix or name.startswith(prefix + ".")


def tuned_parameter_names(model: nn.Module, options: str | Iterable[str],
                          blocks: BlockMap) -> list[str]:
    """Names of the parameters that `options` tune, in the model's parameter order.

    Args:
        model: any module.
        options: one option or several (their union); "all" means every parameter.
        blocks: option -> module-name prefixes (e.g. `blocks_for(arch)` or the user's own).

    Raises ValueError for an unknown option or a prefix that matches no parameter.
    """
    options = [options] if isinstance(options, str) else list(options)
    names = [name for name, _ in model.named_parameters()]
    if ALL in options:
        return names
    prefixes = []
    for option in options:
        if option not in blocks:
            raise ValueError(f"unknown block {option!r}; known: {', '.join([*blocks, ALL])}")
        prefixes += list(blocks[option])
    for prefix in prefixes:
        if not any(matches(n, prefix) for n in names):
            sample = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"block prefix {prefix!r} matches no parameter of "
                             f"{type(model).__name__}; top-level modules with parameters: "
                             f"{', '.join(sample)}")
    return [n for n in names if any(matches(n, p) for p in prefixes)]


def set_trainable(model: nn.Module, names: Iterable[str]) -> int:
    """requires_grad=True exactly for `names`, False elsewhere; returns the tuned count."""
    names = set(names)
    unknown = names - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no such parameter(s): {sorted(unknown)[:5]}")
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        count += p.numel() if name in names else 0
    return count
