"""Tune options: which parameters a block name selects, and freezing the rest.

The blocks of each architecture are declared with the architecture itself
(`deep.models.registry`); this module reads them. An option names a block of the
network by the module-name prefixes of its parameters ("layer2" covers
"layer2.0.conv1.weight", ...). `"all"` means every parameter. The options of an architecture are listed in forward order, which
gradual unfreezing and the report's plots rely on.

Any `nn.Module` can be tuned surgically by passing its own mapping:

    blocks = {"stem": ("features.0",), "head": ("classifier",)}
    names = tuned_parameter_names(my_model, "head", blocks)
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from torch import nn

from .errors import ConfigError
from .models import architecture_names, get_architecture, matches, matches_any
from .models.registry import check_prefixes

ALL = "all"
BlockMap = Mapping[str, Sequence[str]]


def blocks_for(arch: str) -> dict[str, tuple[str, ...]]:
    """The mapping option -> prefixes of a registered architecture, in forward order."""
    return dict(get_architecture(arch).blocks)


def blocks_by_arch() -> dict[str, dict[str, tuple[str, ...]]]:
    """arch -> its block mapping, for every registered architecture."""
    return {name: blocks_for(name) for name in architecture_names()}


def block_options(arch: str) -> tuple[str, ...]:
    """Single-block options of `arch` in forward order, e.g. ("first", ..., "last")."""
    return tuple(blocks_for(arch))


def block_prefixes(arch: str, option: str) -> tuple[str, ...]:
    """Module-name prefixes of one option of a registered architecture."""
    blocks = blocks_for(arch)
    if option not in blocks:
        raise ConfigError(f"unknown block {option!r} for {arch}; "
                          f"known: {', '.join([*blocks, ALL])}")
    return blocks[option]


def tuned_parameter_names(model: nn.Module, options: str | Iterable[str],
                          blocks: BlockMap) -> list[str]:
    """Names of the parameters that `options` tune, in the model's parameter order.

    Args:
        model: any module.
        options: one option or several (their union); "all" means every parameter.
        blocks: option -> module-name prefixes (e.g. `blocks_for(arch)` or the user's own).

    Raises ConfigError (a ValueError) for an unknown option or a prefix that matches no parameter.
    """
    options = [options] if isinstance(options, str) else list(options)
    names = [name for name, _ in model.named_parameters()]
    if ALL in options:
        return names
    prefixes = []
    for option in options:
        if option not in blocks:
            raise ConfigError(f"unknown block {option!r}; known: {', '.join([*blocks, ALL])}")
        prefixes += check_prefixes(option, blocks[option])
    for prefix in prefixes:
        if not any(matches(n, prefix) for n in names):
            sample = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"block prefix {prefix!r} matches no parameter of "
                             f"{type(model).__name__}; top-level modules with parameters: "
                             f"{', '.join(sample)}")
    return [n for n in names if matches_any(n, prefixes)]


def set_trainable(model: nn.Module, names: Iterable[str]) -> int:
    """requires_grad=True exactly for `names`, False elsewhere; returns the tuned count."""
    names = set(names)
    unknown = names - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ConfigError(f"no such parameter(s): {sorted(unknown)[:5]}")
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        count += p.numel() if name in names else 0
    return count
