"""Networks that run as a chain of stages, so a frozen prefix can be cached.

The training loop caches the input of the first stage that holds a tuned
parameter and runs only the stages from there on. A model opts in either by
subclassing `StagedModel` (our ResNets) or by being an `nn.Sequential` (each
child is a stage). Any other `nn.Module` still trains, just without the cache.
"""

from __future__ import annotations

import torch
from torch import nn


class StagedModel(nn.Module):
    """Base class: `forward(x)` runs stage 0, 1, ..., in order.

    Subclasses set `stage_prefixes` (for each stage, the module-name prefixes of
    the parameters it owns) and implement `stage(index, x)`. The stages must
    together own every parameter. They may list in `conv_bn_pairs()` the
    (conv, batch norm) module names where the BN is applied directly to the
    conv's output, which lets the loop fold frozen-statistics BN into the conv.
    """

    stage_prefixes: tuple[tuple[str, ...], ...] = ()

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return []

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run stages [start, stop) on `x`, the input of stage `start`."""
        stop = len(self.stage_prefixes) if stop is None else stop
        for index in range(start, stop):
            x = self.stage(index, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_stages(x)


class Stages:
    """A uniform view of a staged model (a `StagedModel` or an `nn.Sequential`).

    `runner`, if given, is a module of the same structure that computes the stages
    (e.g. a copy with batch norm folded into the convolutions, sharing the weights).
    """

    def __init__(self, model: nn.Module, runner: nn.Module | None = None):
        runner = model if runner is None else runner
        if isinstance(model, StagedModel):
            self.prefixes = tuple(model.stage_prefixes)
            self._run = runner.run_stages
        elif isinstance(model, nn.Sequential):
            names = [name for name, _ in model.named_children()]
            self.prefixes = tuple((name,) for name in names)
            children = list(runner.children())
            self._run = lambda x, start, stop: _run_children(children, x, start, stop)
        else:
            raise TypeError(f"{type(model).__name__} is neither a StagedModel nor an nn.Sequential")
        self.param_stage = _param_stage(model, self.prefixes)
        self.formats: dict[int, torch.memory_format] = {}  # stage -> memory format of its input

    def __len__(self) -> int:
        return len(self.prefixes)

    def format_input(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """`x` in the memory format chosen for stage `stage`'s input (if any)."""
        fmt = self.formats.get(stage)
        return to_memory_format(x, fmt) if fmt is not None else x

    def run(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Run stages [start, stop) on `x`, the input of stage `start`."""
        stop = len(self) if stop is None else stop
        if not self.formats:
            return self._run(x, start, stop)
        for stage in range(start, stop):
            x = self._run(self.format_input(x, stage), stage, stage + 1)
        return x

    def first_stage(self, param_names) -> int:
        """Index of the earliest stage owning one of `param_names` (len(self) if none)."""
        return min((self.param_stage[n] for n in param_names), default=len(self))


def to_memory_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """`x` (any shape; only 4-d tensors change) laid out in `fmt`.

    With a single channel, `x.contiguous(memory_format=torch.channels_last)` returns x
    unchanged (both layouts are "contiguous"), its strides stay NCHW and oneDNN then
    runs the whole stage in NCHW, reordering every activation to its blocked layout
    and back; an explicit channels-last copy makes every later activation channels-last.
    """
    if x.ndim != 4:
        return x
    if fmt == torch.channels_last and x.shape[1] == 1 and x.stride(1) != 1:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt).copy_(x)
    return x.contiguous(memory_format=fmt)


def stages_of(model: nn.Module, runner: nn.Module | None = None) -> Stages | None:
    """The model's stages, or None when it cannot be run stage by stage."""
    if isinstance(model, (StagedModel, nn.Sequential)):
        return Stages(model, runner)
    return None


def torchvision_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(convK, bnK) siblings and `downsample` = Sequential(conv, bn), the torchvision
    ResNet convention, where each BN directly follows its conv in forward()."""
    pairs = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for k in ("1", "2", "3"):
            conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                pairs.append((f"{prefix}conv{k}", f"{prefix}bn{k}"))
        down = getattr(module, "downsample", None)
        if (isinstance(down, nn.Sequential) and len(down) == 2
                and isinstance(down[0], nn.Conv2d) and isinstance(down[1], nn.BatchNorm2d)):
            pairs.append((f"{prefix}downsample.0", f"{prefix}downsample.1"))
    return pairs


def _run_children(children, x, start, stop):
    for child in children[start:stop]:
        x = child(x)
    return x


def _param_stage(model: nn.Module, prefixes) -> dict[str, int]:
    owner = {}
    for name, _ in model.named_parameters():
        for index, stage_prefixes in enumerate(prefixes):
            if any(name == p or name.startswith(p + ".") for p in stage_prefixes):
                owner[name] = index
                break
        else:
            raise ValueError(f"parameter {name!r} belongs to no stage of {type(model).__name__}; "
                             f"stage prefixes: {prefixes}")
    return owner
