"""Benchmark registry.

Each benchmark lives in a data module that lists it in `BENCHMARKS`
(a dict name -> `Benchmark`), and in `_MODULES` below (name -> that module). Modules are
imported only when asked for, so a benchmark's optional dependencies never slow down or
break the others. Its protocol (grid, split sizes, data options) is
`deep/configs/NAME.toml`.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import (Benchmark, DataError, FileSplit, ShiftTask, SourceData, Split,
                   TensorSplit, class_balanced_indices, draw_splits, seeded, split_counts)

# name -> module under deep.data that defines it
_MODULES = {
    "synthetic": "synthetic",
    # the paper's seven benchmarks (users bring the data)
    "cifar10c": "cifar10",
    "cifar-flip": "cifar10",
    "cifar10c-official": "cifar10",  # CIFAR-10-C as the public code runs it
    "imagenet-c": "imagenet_c",
    "living17": "breeds",
    "entity30": "breeds",
    "waterbirds": "waterbirds",
    "celeba": "celeba",
    # CLIP ViT-B/16 on WILDS (users bring the data)
    "camelyon17": "wilds",
    "fmow": "wilds",
    # the Fashion-MNIST suite that runs on this machine
    "fmnist-c": "fmnist",
    "fmnist-breeds": "fmnist",
    "fmnist-flip": "fmnist",
    "fmnist-spurious": "fmnist",
    "fmnist-blocknoise": "fmnist",
}


def benchmark_names() -> list[str]:
    return sorted(_MODULES)


def get_benchmark(name: str) -> Benchmark:
    if name not in _MODULES:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    listed = getattr(module, "BENCHMARKS", {})
    if name not in listed:  # half of a new benchmark's registration (was a KeyError)
        raise ConfigError(f"_MODULES of deep/data/__init__.py maps benchmark {name!r} to "
                          f"{module.__name__}, whose BENCHMARKS lists "
                          f"{', '.join(listed) or 'none'}: add {name!r} to that dict, or point "
                          "its line of _MODULES at the module that defines it")
    return listed[name]


__all__ = ["Benchmark", "DataError", "FileSplit", "ShiftTask", "SourceData", "Split",
           "TensorSplit", "benchmark_names", "class_balanced_indices", "draw_splits", "get_benchmark",
           "seeded", "split_counts"]
