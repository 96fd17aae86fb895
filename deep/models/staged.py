"""Networks that run as a chain of stages, so a frozen prefix can be cached.

The training loop caches the input of the first stage that holds a tuned
parameter and runs only the stages from there on. A model opts in either by
subclassing `StagedModel` (our ResNets) or by being an `nn.Sequential` (each
child is a stage). Any other `nn.Module` still trains, just without the cache.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from .registry import matches_any


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


# --- a oneDNN bug that channels-last activations must avoid ----------------------------
#
# oneDNN's AVX2 weight-gradient kernel for 1x1 convolutions (`jit_1x1:avx2`,
# backward_weights) writes past its scratch buffer when the input is channels-last
# (`acdb`), the stride is not 1 and the input channels are not a multiple of its SIMD
# width (8 floats): glibc then aborts ("double free or corruption") or, worse, the run
# goes on with a corrupted heap. torch 2.13.0 CPU; the AVX-512 kernels are not affected,
# but ONEDNN_MAX_CPU_ISA=AVX2 selects the AVX2 ones on any machine. Reproducer and the
# measured shape grid: `python -m deep.onednn_check` and docs/troubleshooting.md.
# Such convolutions run on NCHW inputs instead (then oneDNN uses its blocked `aBcd8b`
# kernels); for a 1x1 kernel the weight's two layouts are the same strides, so the
# input alone decides.

ONEDNN_SIMD_CHANNELS = 8


def channels_last_unsafe(module: nn.Module) -> bool:
    """Whether `module` is a convolution that must not see channels-last inputs: 1x1
    kernel, a stride other than 1, input channels (in all or per group) not a multiple
    of 8. Deliberately wider than the shapes seen to crash (only stride 2 and fewer
    than 8 channels did): any shape the faulty kernel may take is excluded."""
    return isinstance(module, nn.Conv2d) and _unsafe_shape(
        module.in_channels, module.in_channels // module.groups, module.kernel_size,
        module.stride)


def _unsafe_shape(in_channels: int, per_group: int, kernel_size, stride) -> bool:
    """`channels_last_unsafe`'s rule, for a module or for one `conv2d` call."""
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    return (all(k == 1 for k in kernel_size) and any(s != 1 for s in stride)
            and (in_channels % ONEDNN_SIMD_CHANNELS != 0
                 or per_group % ONEDNN_SIMD_CHANNELS != 0))


def nchw_if_unsafe(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` with plain NCHW strides when `module` is `channels_last_unsafe`, else `x`.

    Strides, not `is_contiguous()`: a tensor with size-1 dims can be "contiguous" in both
    formats while holding channels-last strides, and oneDNN follows the strides."""
    if x.ndim == 4 and x.device.type == "cpu" and channels_last_unsafe(module):
        return plain_strides(x)
    return x


def has_plain_strides(x: torch.Tensor) -> bool:
    """Whether `x` has row-major (NCHW) strides."""
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= max(size, 1)
    return tuple(x.stride()) == tuple(reversed(expected))


def plain_strides(x: torch.Tensor) -> torch.Tensor:
    """`x`, or a (differentiable) copy of it, with row-major (NCHW) strides."""
    return x if has_plain_strides(x) else x.clone(memory_format=torch.contiguous_format)


def _nchw_input_hook(module: nn.Module, args: tuple) -> tuple:
    if args[0].device.type == "cpu" and not has_plain_strides(module.weight):
        _plain_weight(module)  # the layout changed after guarding (model.to(channels_last))
    return (nchw_if_unsafe(module, args[0]), *args[1:])


def _plain_weight(module: nn.Module) -> None:
    """Give a guarded convolution's weight plain strides (again, from its hook)."""
    if not isinstance(module.weight, nn.Parameter):  # a torch.func call's tensor: not ours
        raise ConfigError(f"a {tuple(module.weight.shape)} convolution weight with "
                          "channels-last strides reaches oneDNN's faulty AVX2 kernel "
                          "(docs/troubleshooting.md): pass it with plain (NCHW) strides")
    with torch.no_grad():
        module.weight.data = plain_strides(module.weight.data)


# torch's CPU GroupNorm backward (not oneDNN; every ISA, torch 2.13.0) segfaults when its
# input is channels-last and needs no gradient while its affine parameters do: the first
# norm of a tuned stage whose input comes from the prefix cache.

def group_norm_unsafe(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether `norm(x)` would hit torch's channels-last GroupNorm backward crash."""
    return isinstance(norm, nn.GroupNorm) and _group_norm_call_unsafe(x, norm.parameters())


def _group_norm_call_unsafe(x: torch.Tensor, affine) -> bool:
    """`group_norm_unsafe`'s rule for one call, `affine` its weight and bias (or None)."""
    return (x.device.type == "cpu" and x.ndim == 4 and torch.is_grad_enabled()
            and not x.requires_grad and any(p is not None and p.requires_grad for p in affine)
            and not has_plain_strides(x))


def _group_norm_hook(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (plain_strides(x) if group_norm_unsafe(module, x) else x, *args[1:])


def guard_channels_last(model: nn.Module) -> int:
    """Make every `channels_last_unsafe` convolution of `model` run on NCHW inputs and
    weights on the CPU, and every GroupNorm on NCHW inputs where `group_norm_unsafe`
    (forward pre-hooks; the same numbers, only the layout changes). Idempotent; returns
    how many modules are guarded. The engine calls this on every model it trains or
    adapts, whatever layout it picks itself: a caller's channels-last images or weights
    reach the same kernels. Under `torch.compile`, see `compile_options`."""
    count = 0
    for module in model.modules():
        if channels_last_unsafe(module) and not has_plain_strides(module.weight):
            # PyTorch runs oneDNN channels-last when the input *or the weight* is; after
            # `model.to(memory_format=torch.channels_last)` a 1x1 weight has such strides.
            # Done here first (functorch transforms forbid `.data` writes inside them); the
            # hook redoes it if the layout changes after guarding.
            _plain_weight(module)
        hook = (_nchw_input_hook if channels_last_unsafe(module)
                else _group_norm_hook if isinstance(module, nn.GroupNorm) else None)
        if hook is not None:
            if not getattr(module, "_nchw_guard", False):
                module.register_forward_pre_hook(hook)
                module._nchw_guard = True
            count += 1
    return count


_CONV2D_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_GROUP_NORM_ARGUMENTS = ("input", "num_groups", "weight", "bias", "eps")


def _bound(func, args: tuple, kwargs: dict) -> dict | None:
    """A `conv2d` or `group_norm` call's arguments by name; None for any other function."""
    names = (_CONV2D_ARGUMENTS if func is torch.conv2d  # F.conv2d is the same function
             else _GROUP_NORM_ARGUMENTS if func is F.group_norm else None)
    return None if names is None else {**dict(zip(names, args)), **kwargs}


def _faulty_conv2d_shape(bound: dict) -> bool:
    """Whether a bound `conv2d` call has `channels_last_unsafe`'s shape."""
    x, weight = bound["input"], bound["weight"]
    return x.ndim == 4 and weight.ndim == 4 and _unsafe_shape(
        x.shape[1], weight.shape[1], weight.shape[2:], bound.get("stride", 1))


class _PlainStridedCalls(TorchFunctionMode):
    """Every `conv2d` and `group_norm` call made while active, with the NCHW strides
    `guard_channels_last` gives modules, where the same rules say so: also the calls it
    cannot see, a convolution a module computes with `F.conv2d` on a weight of its own
    (an `nn.Conv2d` is seen; this is not: issue #12, "every shape a user's model may
    have"). The same numbers; only the layout changes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        bound = _bound(func, args, kwargs)
        if bound is None:
            return func(*args, **kwargs)
        x = bound["input"]
        if func is torch.conv2d:
            if x.device.type == "cpu" and _faulty_conv2d_shape(bound):
                bound["input"], bound["weight"] = plain_strides(x), plain_strides(bound["weight"])
        elif _group_norm_call_unsafe(x, (bound.get("weight"), bound.get("bias"))):
            bound["input"] = plain_strides(x)
        return func(**bound)


class UnhookedCalls(TorchFunctionMode):
    """While active, records in `found` the calls that `_PlainStridedCalls` exists for: a
    `conv2d` of the faulty shape, or a `group_norm` with an affine weight, whose weight is
    not that of a module of `model` that `guard_channels_last` hooks (layout and gradients
    aside: one forward decides for every layout a run may use). None found: the engine need
    not wrap its forward passes in `plain_strided_calls`, and saves its cost
    (`scripts/guard_cost.py`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hooked = {id(m.weight) for m in model.modules()
                       if channels_last_unsafe(m) or isinstance(m, nn.GroupNorm)}
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        bound = _bound(func, args, kwargs)
        weight = None if bound is None else bound.get("weight")
        if (weight is not None and id(weight) not in self.hooked and bound["input"].ndim == 4
                and (func is F.group_norm or _faulty_conv2d_shape(bound))):
            self.found.append(f"{func.__name__} with a {tuple(weight.shape)} weight")
        return func(*args, **kwargs)


def plain_strided_calls(model: nn.Module):
    """A context for the forward passes the engine differentiates (training steps, gradient
    probes, adaptation steps): on the CPU, every convolution and GroupNorm call of the
    faulty shapes runs on NCHW strides, modules or not (`_PlainStridedCalls`); the backward
    follows the layouts the forward saved. Elsewhere (CUDA has no oneDNN) nothing. The
    engine still guards modules with hooks (`guard_channels_last`), which a caller's own
    loop uses too; this adds the calls no hook sees, at microseconds per torch call
    (forward passes only: an optimizer step makes hundreds of calls,
    `scripts/guard_cost.py`). `fit` enters it only where `UnhookedCalls` finds a call."""
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    return _PlainStridedCalls() if on_cpu else contextlib.nullcontext()


def compile_options(model: nn.Module) -> dict | None:
    """`torch.compile` options for `model`: on the CPU, Inductor's layout optimisation off.
    Inductor lays every convolution out channels-last on its own, past the hooks of
    `guard_channels_last` (the compiled weight gradient of `Conv2d(4, 8, 1, stride=2)`
    aborted on AVX2 kernels with it on, completed with it off:
    tests/deep/test_onednn_guard.py). Off for every model on the CPU, not only those with a
    guarded module: a convolution computed with `F.conv2d` has the same shape unseen."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return {"layout_optimization": False} if on_cpu else None


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
            if matches_any(name, stage_prefixes):
                owner[name] = index
                break
        else:
            raise ValueError(f"parameter {name!r} belongs to no stage of {type(model).__name__}; "
                             f"stage prefixes: {prefixes}")
    return owner
