"""The frozen-prefix cache and batch norm folded into convolutions: the engine's fast path.

- `PrefixCache`: on a staged model (`deep.models.staged`) with batch norm frozen and
  no augmentation, the frozen prefix runs once per split. The cache keeps the input
  of each stage (train, val and test) and is shared across epochs, learning rates
  and methods that start at the same or a later stage; what does not fit in its
  memory budget is recomputed under no_grad.
- `FoldedConvBN` / `folded_view`: with batch norm frozen, each BN is folded into the
  conv before it, conv(x, w * s) + (beta - mu * s) with s = gamma / sqrt(var + eps):
  the same function with the same parameters and gradients, minus two
  activation-sized passes per BN, forward and backward.

Both change speed, never numbers; `deep.train.fit` uses them when it can.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .data.base import Split, TensorSplit
from .errors import check_choice
from .models.staged import (StagedModel, Stages, channels_last_unsafe, guard_channels_last,
                            plain_strides, stages_of)


DEFAULT_CACHE_MB = 2048  # memory budget of the stored activations, per process
# True: every stage channels-last; "first": the first stage only; None: True on the CPU
CHANNELS_LAST_CHOICES = (True, False, "first", None)

# Where `amp` (bf16 autocast) acts; on other devices an amp run is the float32 run, bit
# for bit. (A test adds "cpu" here to check the amp path without a GPU.)
AMP_DEVICE_TYPES = ("cuda",)


def amp_active(device: torch.device | str, amp: bool) -> bool:
    return amp and torch.device(device).type in AMP_DEVICE_TYPES


def autocast(device: torch.device | str, amp: bool):
    """bf16 autocast where `amp_active`; nothing elsewhere."""
    if amp_active(device, amp):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- batch norm folded into convolutions ------------------------------------------

class FoldedConvBN(nn.Module):
    """conv followed by eval-mode BN, computed as one conv with folded weights.

    conv(x, w * s) + (beta - mu * s) with s = gamma / sqrt(var + eps) equals
    bn(conv(x, w)) in eval mode; gradients reach w, gamma and beta through the
    folding, so training through it tunes the original parameters.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the folded conv, differentiable in conv and BN parameters."""
        conv, bn = self.conv, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return conv.weight * scale.reshape(-1, 1, 1, 1), bias

    def fix_if_frozen(self) -> None:
        """Precompute the folded tensors if no parameter of the pair requires grad, else
        forget them. The loop calls this whenever what is tuned (or the weights) change."""
        params = [self.conv.weight, self.bn.weight, self.bn.bias]
        if self.conv.bias is not None:
            params.append(self.conv.bias)
        self.fixed = None
        if not any(p.requires_grad for p in params):
            with torch.no_grad():
                self.fixed = self.folded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fixed if self.fixed is not None else self.folded()
        conv = self.conv
        if channels_last_unsafe(conv):  # see deep.models.staged: a oneDNN AVX2 bug
            x, weight = plain_strides(x), plain_strides(weight)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def refresh_folds(runner: nn.Module, fix: bool = True) -> None:
    """Re-derive (fix=True) or drop (fix=False) the precomputed tensors of every fold."""
    for module in runner.modules():
        if isinstance(module, FoldedConvBN):
            if fix:
                module.fix_if_frozen()
            else:
                module.fixed = None


def batch_statistics(model: nn.Module) -> bool:
    """Whether a batch norm of `model` has no running statistics, so normalises by its
    batch's even in eval mode: a stage's output then depends on which examples share its
    batch, and activations cached in evaluation batches differ from the training batches'."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, norms) and m.running_mean is None for m in model.modules())


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether `FoldedConvBN` computes exactly bn(conv(x)) for this pair: torch's own
    Conv2d forward with zero padding (a subclass's forward, e.g. weight standardisation,
    or a reflect/circular padding would be silently replaced by a plain zero-padded conv)
    and an affine BatchNorm2d with running statistics (without them it normalises by the
    batch's, which no fold can)."""
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and conv.padding_mode == "zeros"
            and isinstance(bn, nn.BatchNorm2d) and type(bn).forward is nn.BatchNorm2d.forward
            and bn.affine and bn.running_mean is not None and bn.running_var is not None)


def folded_view(model: nn.Module) -> nn.Module | None:
    """An eval-mode copy of `model` that shares its parameters and buffers, with every
    `foldable` pair from `model.conv_bn_pairs()` folded (the others run as they are);
    None when the model lists no such pair.

    Valid only while batch norm stays in eval mode (frozen statistics)."""
    pairs = model.conv_bn_pairs() if isinstance(model, StagedModel) else []
    pairs = [(c, b) for c, b in pairs if foldable(model.get_submodule(c), model.get_submodule(b))]
    if not pairs:
        return None
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    view = copy.deepcopy(model, memo=shared)
    for conv_name, bn_name in pairs:
        conv, bn = view.get_submodule(conv_name), view.get_submodule(bn_name)
        _set_submodule(view, conv_name, FoldedConvBN(conv, bn))
        _set_submodule(view, bn_name, nn.Identity())
    return view.eval()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# --- the prefix cache -------------------------------------------------------------

class PrefixCache:
    """Inputs of every stage of a frozen, eval-mode staged model, per split.

    Built for one model state (the pretrained weights of a task); `fit` checks
    that the model still holds those weights. Activations are stored (on the
    model's device) under `budget_mb`; a stage that does not fit is not stored,
    and its input is recomputed (under no_grad) from the nearest stored earlier stage.

    Args:
        model: a staged model (`StagedModel` or `nn.Sequential`), BN in eval mode.
        splits: name -> split, e.g. {"train": ..., "val": ..., "test": ...}.
        budget_mb: memory budget of the stored activations.
        batch_size: minibatch size of the prefix forward passes (None: see
            `default_eval_batch_size`).
        fold_bn: run the stages with BN folded into the convs (`folded_view`).
        channels_last: True, False, "first" (first stage only) or None (see TrainConfig).
        amp: fill under bf16 autocast (`autocast`), as the runs that read it compute
            their forward passes; must equal their `TrainConfig.amp`.
    """

    def __init__(self, model: nn.Module, splits: Mapping[str, Split],
                 budget_mb: float = DEFAULT_CACHE_MB,
                 batch_size: int | None = None, fold_bn: bool = True,
                 channels_last: bool | str | None = None, amp: bool = False):
        if stages_of(model) is None:
            raise TypeError(f"{type(model).__name__} is not staged; it cannot use a prefix cache")
        self.model, self.splits, self.amp = model, dict(splits), amp
        self.runner = (folded_view(model) if fold_bn else None) or model
        self.stages: Stages = stages_of(model, self.runner)
        self.device = next(model.parameters()).device
        check_choice("channels_last", channels_last, CHANNELS_LAST_CHOICES)
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        cl_stages = range(len(self.stages)) if channels_last is True else [0] if channels_last else []
        self.stages.formats = {s: (torch.channels_last if s in cl_stages else torch.contiguous_format)
                               for s in range(len(self.stages))} if channels_last else {}
        # Always, not only with channels_last: the runner is a copy of the model's modules
        # (made before `fit` guards the model), and a caller's channels-last images reach
        # its unfolded convolutions with the engine's layout off (deep.models.staged).
        guard_channels_last(self.runner)
        self.budget = int(budget_mb * 2**20)
        self.batch_size = batch_size or default_eval_batch_size(self.device)
        self.used = 0
        self._acts: dict[tuple[str, int], torch.Tensor] = {}
        self._too_big: set[tuple[str, int]] = set()
        self._weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.seconds = 0.0

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the model's device (`Stages.run` sets each stage's memory format)."""
        return to_device(x, self.device)

    def matches_model(self) -> bool:
        """Whether the model still holds the weights the cache was built with."""
        state = self.model.state_dict()
        return all(torch.equal(state[k], v) for k, v in self._weights.items())

    def stored_stages(self, name: str) -> list[int]:
        """The stages whose inputs are kept for split `name` (0: the images), in order."""
        return sorted(s for n, s in self._acts if n == name)

    def inputs(self, name: str, stage: int) -> tuple[torch.Tensor | None, int]:
        """(activations, s): the stored input of stage s <= `stage` for every example of
        split `name`, s as late as the budget allows. s == 0 means the images; None
        for them means they do not fit either: stream them with `split.batches`."""
        stored = [s for (n, s) in self._acts if n == name and s <= stage]
        if stage not in stored and (name, stage) not in self._too_big and stage > 0:
            self._fill(name, stage)
            stored = [s for (n, s) in self._acts if n == name and s <= stage]
        if stored:
            return self._acts[(name, max(stored))], max(stored)
        return self._images(name), 0

    def _images(self, name: str) -> torch.Tensor | None:
        split = self.splits[name]
        if isinstance(split, TensorSplit) and self.device.type == "cpu":
            return split.images  # no copy: batches are prepared one by one
        if (name, 0) in self._too_big:
            return None
        if (name, 0) not in self._acts:
            first, _, _ = next(split.batches(1))
            size = first.numel() * first.element_size() * len(split)
            if self.used + size > self.budget:
                self._too_big.add((name, 0))
                return None
            images = torch.cat([x for x, _, _ in split.batches(self.batch_size)])
            self._acts[(name, 0)] = self.prepare(images)
            self.used += size
        return self._acts[(name, 0)]

    def _batches(self, name: str, stage: int):
        """The stored input of `stage` (or the images, stage 0) in eval-size batches."""
        if stage > 0:
            acts = self._acts[(name, stage)]
            return (acts[i:i + self.batch_size] for i in range(0, len(acts), self.batch_size))
        images = self._images(name)
        if images is None:
            return (x for x, _, _ in self.splits[name].batches(self.batch_size))
        return (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))

    @torch.no_grad()
    def _fill(self, name: str, stage: int) -> None:
        """Compute and store the inputs of stages (s0, stage], s0 the latest stored stage.

        Which stages are kept is decided on the first batch, earlier stages first (a
        stage's size is its per-example size times the split's length); each kept one
        is written batch by batch into one tensor allocated at its final size, so
        filling never holds more than the budget plus one batch's activations."""
        t0 = time.perf_counter()
        s0 = max((s for (n, s) in self._acts if n == name and 0 < s < stage), default=0)
        with eval_mode(self.model), autocast(self.device, self.amp):
            batches = iter(self._batches(name, s0))
            first = self.prepare(next(batches))
            kept = self._reserve(name, first, s0, stage, len(self.splits[name]))
            done = len(first)
            for h in batches if kept else ():  # nothing fits: the caller recomputes from s0
                h = self.prepare(h)
                for s in range(s0, max(kept)):
                    h = self.stages.run(h, s, s + 1)
                    if s + 1 in kept:
                        kept[s + 1][done:done + len(h)].copy_(h)
                done += len(h)
        for s, acts in kept.items():
            self._acts[(name, s)] = acts
        self.seconds += time.perf_counter() - t0

    def _reserve(self, name: str, batch: torch.Tensor, s0: int, stage: int,
                 n: int) -> dict[int, torch.Tensor]:
        """Run the first batch through stages [s0, stage) and allocate, within the budget,
        the inputs of stages (s0, stage] for all `n` examples of split `name` (each in its
        stage's memory format), holding that batch's part; the stages that do not fit
        are marked too big."""
        kept = {}
        h = batch
        for s in range(s0, stage):
            h = self.stages.run(h, s, s + 1)
            size = h[:1].numel() * h.element_size() * n
            if self.used + size > self.budget:
                self._too_big.add((name, s + 1))
                continue
            fmt = self.stages.formats.get(s + 1)
            layout = {"memory_format": fmt} if fmt is not None and h.ndim == 4 else {}
            kept[s + 1] = torch.empty((n, *h.shape[1:]), dtype=h.dtype, device=h.device, **layout)
            kept[s + 1][:len(h)].copy_(h)
            self.used += size
        return kept


class eval_mode:
    """Context manager: the model in eval mode inside, its previous mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`x` on `device`. A CPU batch bound for a GPU is pinned first, so that its copy
    is asynchronous and overlaps the GPU's work on the batch before (a copy from
    pageable memory waits for the GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def default_eval_batch_size(device: torch.device | str) -> int:
    """64 on CPU, 256 elsewhere. On CPU a batch of 256 full-resolution activations
    no longer fits the processor caches (`python -m deep.speed` measures the loop that
    uses it; docs/performance.md has the numbers)."""
    return 64 if torch.device(device).type == "cpu" else 256
