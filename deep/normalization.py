"""Input normalisation travels with the architecture, not with the dataset loader.

A network's weights expect the inputs they were trained on: RobustBench's `wrn28-10`
pixels in [0, 1], TTT/MEMO's `resnet26-gn` (x - 0.5) / 0.5, our own models the
dataset's statistics. The architecture registry records this (`Architecture.
normalization`; None means "the dataset's own"), and whoever calls a benchmark loader
for a model passes it on with `loader_options`, so the loader normalises with it:

    task = bench.load_task(data_dir, shift, ..., **loader_options(bench.load_task,
                                                                  bench.name, arch, data))

The same call gives a loader that takes an `arch` parameter (fmnist-blocknoise, whose shift
is noise on one block of the model) the architecture being run, so that the block's
modules are this network's and not its default's.
"""

from __future__ import annotations

import inspect
import types
import typing
import warnings
from typing import Callable, Mapping

from .errors import ConfigError
from .data import get_benchmark
from .models import get_architecture

OPTION = "normalization"
ARCH_OPTION = "arch"
# What a loader takes as arguments of its own, never as a data option.
TASK_ARGUMENTS = ("data_dir", "shift", "n_target", "val_per_class", "test_per_class", "seed")


# Loader options that change how fast data loads, never what it is (decoding processes):
# a run resumed with more of them is the same run (deep.sweep, deep.adapt compare the rest).
SPEED_ONLY_DATA_OPTIONS = ("num_workers",)


def numbers_part(options: Mapping) -> dict:
    """Loader options without the speed-only ones: what can change the numbers."""
    return {k: v for k, v in options.items() if k not in SPEED_ONLY_DATA_OPTIONS}


def check_data_options(loader: Callable, benchmark: str, options: Mapping) -> None:
    """Every data option (`--data KEY=VALUE`, a protocol's [data] table) is one `loader`
    takes; else a ConfigError naming the unknown keys and the known ones."""
    params = inspect.signature(loader).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name in params if name not in TASK_ARGUMENTS]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown data option(s) {unknown} for the {benchmark} loader; "
                          f"known: {', '.join(known) or 'none'} (--data KEY=VALUE, or the "
                          f"protocol's [data] table)")
    hints = inspect.signature(loader, eval_str=True).parameters
    for name, value in options.items():
        expected = _simple_types(hints[name].annotation)
        if expected and not _fits(value, expected):
            # None has no spelling in TOML (--data, [data] tables): only its default gives it
            names = " or ".join(t.__name__ for t in expected if t is not type(None))
            default = hints[name].default
            unset = (f"; leave it out for its default, {default!r}"
                     if default is not inspect.Parameter.empty else "")
            raise ConfigError(f"data option {name}={value!r}: the {benchmark} loader expects "
                              f"{names} (--data {name}=VALUE, or the protocol's [data] "
                              f"table){unset}")


def _simple_types(annotation) -> tuple:
    """The types an annotation such as `int`, `float | None`, `str` allows; () for any other
    annotation (a tuple of sequences, none at all), which the loader checks itself."""
    simple = (int, float, str, bool, type(None))
    if annotation in simple:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = typing.get_args(annotation)
        return parts if all(part in simple for part in parts) else ()
    return ()


def _fits(value, expected: tuple) -> bool:
    if isinstance(value, bool):                  # True is an int to Python, not to a user
        return bool in expected
    if isinstance(value, int) and float in expected:
        return True
    return isinstance(value, tuple(expected))


def loader_options(loader: Callable, benchmark: str, arch: str, options: Mapping) -> dict:
    """`options` (a protocol's [data] table) plus `normalization=(mean, std)` when `arch`
    declares its own input normalisation, and `arch` for a loader that takes it. Unknown options: see `check_data_options`.

    A loader without a `normalization` parameter keeps its own statistics: silently when
    they are the architecture's (`Benchmark.normalization`), else with a warning. Raises
    ConfigError when the options already set a normalisation other than the
    architecture's.
    """
    check_data_options(loader, benchmark, options)
    options = _with_arch(loader, benchmark, arch, options)
    own = get_architecture(arch).normalization
    if own is None:
        return dict(options)
    if OPTION not in inspect.signature(loader).parameters:
        if _same(get_benchmark(benchmark).normalization, own):
            return dict(options)  # the loader's own statistics are the architecture's
        warnings.warn(f"{arch} expects inputs normalised with mean={own[0]}, std={own[1]}, but "
                      f"the {benchmark} loader takes no '{OPTION}' option: it normalises with "
                      f"its own statistics", stacklevel=2)
        return dict(options)
    given = options.get(OPTION)
    if given is not None and not _same(given, own):
        raise ConfigError(f"data option {OPTION}={given!r} contradicts {arch}'s own input "
                          f"normalisation {own!r} (the weights expect the latter)")
    return {**options, OPTION: own}


def _with_arch(loader: Callable, benchmark: str, arch: str, options: Mapping) -> Mapping:
    """`options` plus arch=`arch` for a loader that takes the model's architecture."""
    if ARCH_OPTION not in inspect.signature(loader).parameters:
        return options
    given = options.get(ARCH_OPTION)
    if given is not None and given != arch:
        raise ConfigError(f"data option {ARCH_OPTION}={given!r} contradicts the architecture "
                          f"being run, {arch!r} (the {benchmark} loader takes it from --arch; "
                          f"leave the data option out)")
    return {**options, ARCH_OPTION: arch}


def _same(a, b) -> bool:
    def as_tuples(normalization) -> tuple | None:
        return None if normalization is None else tuple(tuple(float(v) for v in part)
                                                        for part in normalization)
    return as_tuples(a) == as_tuples(b)
