"""The one architecture registry: name -> how to build it and which blocks it has.

Each model module registers its own architectures when it is imported
(`deep.models` imports them all), so an architecture's tune blocks are written
once, next to the network they name:

    register_architecture(Architecture(
        "resnet26", build=lambda num_classes, in_channels: CifarResNet(num_classes, in_channels),
        blocks={"first": ("conv1", "bn1", "layer1"), "second": ("layer2",), ...}))

A block (a tune option) is a tuple of module-name prefixes; `matches` says whether
a parameter name lies under one. Blocks are listed in forward order, which gradual
unfreezing and the report's plots rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from torch import nn

from ..errors import ConfigError

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Architecture:
    """A registered network.

    Attributes:
        name: registry name used by protocols, checkpoints and the CLI.
        build: (num_classes, in_channels) -> a freshly initialised network.
        blocks: tune option -> module-name prefixes of its parameters, in forward order.
        normalization: (mean, std) per input channel that the model's weights expect;
            None: the dataset's own normalisation.
        notes: one line shown to users (what the architecture is for).
        network: the network whose weights this architecture takes, when it is another
            registered architecture's under other blocks (`resnet50-public` is
            `resnet50`); empty: its own. Checkpoints of either load into both.
        needs_init: the network means something only from weights this toolkit cannot
            train (CLIP's): `pretrain` refuses to start it from random weights unless
            told to (`init="none"`).
    """

    name: str
    build: Callable[[int, int], nn.Module]
    blocks: Mapping[str, tuple[str, ...]]
    normalization: Normalization | None = None
    notes: str = ""
    network: str = ""
    needs_init: bool = False

    def __post_init__(self):
        if not self.name or not self.blocks:
            raise ConfigError(f"an architecture needs a name and at least one block, got "
                              f"name={self.name!r}, blocks={dict(self.blocks)!r}")
        # A frozen copy: nobody can change the registered blocks through this object.
        object.__setattr__(self, "blocks", {k: check_prefixes(k, v, f"{self.name}: ")
                                            for k, v in self.blocks.items()})

    def prefixes(self, option: str) -> tuple[str, ...]:
        """Module-name prefixes of block `option`; an unknown one lists the known blocks."""
        if option not in self.blocks:
            raise ConfigError(f"unknown block {option!r} for {self.name}; "
                              f"known: {', '.join(self.blocks)}")
        return self.blocks[option]


_REGISTRY: dict[str, Architecture] = {}


def check_prefixes(option: str, prefixes, owner: str = "") -> tuple[str, ...]:
    """The module-name prefixes of block `option` as a tuple, if they are a non-empty
    sequence of non-empty strings; else a ConfigError. A bare string is refused: read
    as a sequence it would be its letters ("fc" -> "f", "c")."""
    if isinstance(prefixes, str) or not prefixes or not all(isinstance(p, str) and p
                                                            for p in prefixes):
        hint = (f" (one prefix is a tuple of one: ({prefixes!r},))"
                if isinstance(prefixes, str) and prefixes else "")
        raise ConfigError(f"{owner}block {option!r} needs a tuple of module-name prefixes, "
                          f"got {prefixes!r}{hint}")
    return tuple(prefixes)


def register_architecture(arch: Architecture) -> Architecture:
    """Add `arch` to the registry; a second architecture with the same name is an error."""
    if arch.name in _REGISTRY:
        raise ConfigError(f"architecture {arch.name!r} is already registered")
    _REGISTRY[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    """The registered architecture `name`; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown arch {name!r}; known: {', '.join(architecture_names())}")
    return _REGISTRY[name]


def architecture_names() -> tuple[str, ...]:
    """Registered names, in registration order."""
    return tuple(_REGISTRY)


def block_order(archs: Iterable[Architecture] | None = None) -> tuple[str, ...]:
    """Every block name of `archs` (default: all registered) in one forward order.

    Each architecture's own order is kept; a block that a later architecture adds goes
    right after its predecessor there (ResNet-50's "fourth" after "third")."""
    order: list[str] = []
    for arch in _REGISTRY.values() if archs is None else archs:
        previous = None
        for option in arch.blocks:
            if option not in order:
                order.insert(order.index(previous) + 1 if previous is not None else 0, option)
            previous = option
    return tuple(order)


def same_network(a: str, b: str) -> bool:
    """Whether architectures `a` and `b` are one network (same modules and weights),
    perhaps under other blocks."""
    def network(name: str) -> str:
        return get_architecture(name).network or name
    return network(a) == network(b)


def matches(name: str, prefix: str) -> bool:
    """Whether parameter `name` lies under module `prefix` ("layer1" does not match "layer10")."""
    return name == prefix or name.startswith(prefix + ".")


def matches_any(name: str, prefixes: Sequence[str]) -> bool:
    """Whether `name` lies under one of `prefixes`."""
    return any(matches(name, p) for p in prefixes)
