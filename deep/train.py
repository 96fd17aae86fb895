"""The one training loop: tune, select (epoch) by validation, report test there.

`fit` runs every method (and pretraining) with the same loop:

    result = fit(model, task.train, task.val, task.test, "first",
                 TrainConfig(lr=1e-3, epochs=15), blocks=blocks_for("resnet26"))

What makes it fast, by construction:

- parameters that are not tuned this epoch have requires_grad=False, so their
  weight gradients are never computed;
- on a staged model (`deep.models.staged`) with batch norm frozen and no
  augmentation, the frozen prefix runs once per split: `PrefixCache` keeps the
  input of each stage (train, val and test) and is shared across epochs,
  learning rates and methods that start at the same or a later stage; what does
  not fit in its memory budget is recomputed under no_grad;
- with batch norm frozen, each BN is folded into the conv before it
  (`FoldedConvBN`: conv(x, w * s) + (beta - mu * s), s = gamma / sqrt(var + eps)),
  which is the same function with the same parameters and the same gradients,
  minus two activation-sized passes per BN, forward and backward;
- channels-last activations on CPU (oneDNN reorders NCHW activations to its blocked
  layout and back around every convolution), evaluation in batches of 64 there;
- evaluation under `torch.inference_mode`; the test split is evaluated once, at
  the end, after restoring the parameters of the best validation epoch (the same
  number as evaluating test every epoch and reading it at that epoch).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import set_trainable
from .data.base import Split, TensorSplit
from .models.staged import (StagedModel, Stages, channels_last_unsafe, guard_channels_last,
                            plain_strides, stages_of, to_memory_format)

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
SELECTION_RULES = ("val_acc", "worst_group_val_acc")  # what picks the epoch (and the lr)


@dataclass
class TrainConfig:
    """Settings of one run (one method at one learning rate).

    Attributes:
        lr: base learning rate.
        epochs: passes over the training split.
        batch_size: training minibatch size.
        weight_decay: L2 coefficient, added to the gradient (torch Adam/SGD style).
        select: "val_acc" or "worst_group_val_acc": what picks the epoch.
        freeze_bn: keep every batch-norm layer in eval mode (running statistics
            frozen), as the paper's protocol does. False: train mode while training.
        seed: seeds the minibatch order (and augmentation); the same seed gives the
            same numbers on CPU.
        optimizer: "adam" (tuning) or "sgd" (SGD with Nesterov momentum, pretraining).
        momentum: SGD momentum.
        schedule: "constant" or "cosine" (per epoch, from lr down to 0).
        augment: (images, generator) -> images, applied to each training batch;
            disables the prefix cache.
        eval_batch_size: minibatch size of evaluation and caching; None: 64 on CPU,
            256 elsewhere (`default_eval_batch_size`).
        cache_mb: memory budget of a prefix cache that `fit` builds itself.
        use_cache: False runs every batch from the images (for checks).
        fold_bn: fold frozen-statistics BN into the convs (when freeze_bn).
        channels_last: memory format of activations: True channels-last everywhere,
            False never, "first" in the first stage only; None: True on CPU (oneDNN
            computes channels-last activations in place; NCHW ones are reordered to its
            blocked layout and back around every convolution, forward and backward),
            False elsewhere. Without a prefix cache (pretraining, augmentation) only
            True changes the layout.
        compile: run the training forward through `torch.compile` when no prefix cache
            is used (pretraining: BN in train mode, augmentation). Worth its ~40 s of
            compilation on long runs only: 1.6x on ResNet-26 pretraining here.
        device: where to train ("cpu", "cuda", ...); None = where the model is.
    """

    lr: float
    epochs: int
    batch_size: int = 64
    weight_decay: float = 1e-4
    select: str = "val_acc"
    freeze_bn: bool = True
    seed: int = 0
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "constant"
    augment: Augment | None = None
    eval_batch_size: int | None = None
    cache_mb: float = 2048
    use_cache: bool = True
    fold_bn: bool = True
    channels_last: bool | str | None = None
    compile: bool = False
    device: str | None = None

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.select not in SELECTION_RULES:
            raise ValueError(f"select must be one of {SELECTION_RULES}, got {self.select!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")


@dataclass
class Metrics:
    """Accuracies of one split, in [0, 1]. worst_group_acc is None without groups."""

    acc: float
    worst_group_acc: float | None = None
    group_acc: dict[int, float] | None = None


@dataclass
class FitResult:
    """What one run measured.

    Attributes:
        status: "ok", or "diverged" when a loss became NaN/inf (the run stops there;
            the selection covers the epochs completed before).
        best_epoch: epoch (1-based) with the best validation metric; 0 if none completed.
        val, test: metrics at best_epoch (test None when no epoch completed).
        tuned_params: number of parameters that were tuned in at least one epoch.
        losses: training loss of every step, in order.
        history: one dict per completed epoch (train_loss, val_acc, ...).
        seconds: wall time of the run.
        start_stage: the earliest stage that ran with gradients (0 without a cache).
    """

    status: str
    best_epoch: int
    val: Metrics | None
    test: Metrics | None
    tuned_params: int
    losses: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    start_stage: int = 0


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


def folded_view(model: nn.Module) -> nn.Module | None:
    """An eval-mode copy of `model` that shares its parameters and buffers, with every
    pair from `model.conv_bn_pairs()` folded; None when the model lists no pairs.

    Valid only while batch norm stays in eval mode (frozen statistics)."""
    pairs = model.conv_bn_pairs() if isinstance(model, StagedModel) else []
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
    """

    def __init__(self, model: nn.Module, splits: Mapping[str, Split], budget_mb: float = 2048,
                 batch_size: int | None = None, fold_bn: bool = True,
                 channels_last: bool | str | None = None):
        if stages_of(model) is None:
            raise TypeError(f"{type(model).__name__} is not staged; it cannot use a prefix cache")
        self.model, self.splits = model, dict(splits)
        self.runner = (folded_view(model) if fold_bn else None) or model
        self.stages: Stages = stages_of(model, self.runner)
        self.device = next(model.parameters()).device
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        if channels_last not in (True, False, "first"):
            raise ValueError(f"channels_last must be True, False, 'first' or None, got {channels_last!r}")
        cl_stages = range(len(self.stages)) if channels_last is True else [0] if channels_last else []
        self.stages.formats = {s: (torch.channels_last if s in cl_stages else torch.contiguous_format)
                               for s in range(len(self.stages))} if channels_last else {}
        if channels_last:
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
        return x.to(self.device, non_blocking=True)

    def matches_model(self) -> bool:
        """Whether the model still holds the weights the cache was built with."""
        state = self.model.state_dict()
        return all(torch.equal(state[k], v) for k, v in self._weights.items())

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
        """Compute and store the inputs of stages (s0, stage], s0 the latest stored stage."""
        t0 = time.perf_counter()
        s0 = max((s for (n, s) in self._acts if n == name and 0 < s < stage), default=0)
        outs: dict[int, list[torch.Tensor]] = {s: [] for s in range(s0 + 1, stage + 1)}
        with _eval_mode(self.model):
            for h in self._batches(name, s0):
                h = self.prepare(h)
                for s in range(s0, stage):
                    h = self.stages.run(h, s, s + 1)
                    outs[s + 1].append(h)
        for s, parts in outs.items():
            acts = self.stages.format_input(torch.cat(parts), s)
            size = acts.numel() * acts.element_size()
            if self.used + size <= self.budget:
                self._acts[(name, s)] = acts
                self.used += size
            else:
                self._too_big.add((name, s))
        self.seconds += time.perf_counter() - t0


class _eval_mode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# --- evaluation -------------------------------------------------------------------

def default_eval_batch_size(device: torch.device | str) -> int:
    """64 on CPU, 256 elsewhere. On CPU a batch of 256 full-resolution activations
    no longer fits the caches: ResNet-26's first stage ran 2x slower per image at 256
    than at 64 here (`python -m deep.speed` measures the loop that uses it)."""
    return 64 if torch.device(device).type == "cpu" else 256


def accuracy(preds: torch.Tensor, labels: torch.Tensor,
             groups: torch.Tensor | None = None) -> Metrics:
    """Accuracy of int64 predictions (n,) against labels (n,), and per group if given.

    A negative group id means "in no group": counted in the average accuracy, left out of
    the per-group and worst-group accuracy (FMoW's region "Other", as WILDS reports it)."""
    correct = (preds.cpu() == labels).float()
    if groups is None:
        return Metrics(correct.mean().item())
    group_acc = {int(g): correct[groups == g].mean().item() for g in torch.unique(groups)
                 if g >= 0}
    worst = min(group_acc.values()) if group_acc else None
    return Metrics(correct.mean().item(), worst, group_acc)


@torch.inference_mode()
def predict(model: nn.Module, split: Split, batch_size: int | None = None,
            cache: PrefixCache | None = None, start: int = 0,
            name: str | None = None) -> torch.Tensor:
    """Predicted classes (n,) for a split, in the split's order, model in eval mode.

    With a cache, runs the stages from the latest stored input at or before `start`
    (the input of split `name`). batch_size None: `default_eval_batch_size`.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or default_eval_batch_size(device)
    with _eval_mode(model):
        if cache is not None and name is not None:
            source, stage = cache.inputs(name, start)
            if source is None:
                batches = (x for x, _, _ in split.batches(batch_size))
            else:
                batches = (source[i:i + batch_size] for i in range(0, len(split), batch_size))
            return torch.cat([cache.stages.run(cache.prepare(x), stage).argmax(1) for x in batches])
        return torch.cat([model(x.to(device)).argmax(1) for x, _, _ in split.batches(batch_size)])


def evaluate(model: nn.Module, split: Split, batch_size: int | None = None,
             cache: PrefixCache | None = None, start: int = 0,
             name: str | None = None) -> Metrics:
    """Accuracy (and worst-group accuracy when the split has groups) of `model` on `split`."""
    preds = predict(model, split, batch_size, cache, start, name)
    return accuracy(preds, split.labels, split.groups)


# --- the loop ---------------------------------------------------------------------

def fit(model: nn.Module, train: Split, val: Split | None, test: Split | None,
        method, config: TrainConfig, blocks: Mapping[str, Sequence[str]] | None = None,
        cache: PrefixCache | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Tune `model` in place with `method`; leave it at the best validation epoch.

    Args:
        model: the pretrained network (any nn.Module; staged models run faster).
        train, val, test: splits; val None trains all epochs and keeps the last one
            (pretraining); test None skips the final evaluation.
        method: a method name (see `deep.methods`) or a `Method`.
        config: learning rate, epochs, ...
        blocks: option -> module-name prefixes; needed by block methods.
        cache: a `PrefixCache` over {"train": train, "val": val, "test": test} built
            on this model's current weights; share one across the runs of a task.
            When None, `fit` builds its own if it can.
        on_epoch: called with each epoch's record (progress bars).
    """
    from .methods import get_method  # methods import this module

    t0 = time.perf_counter()
    method = get_method(method, blocks) if isinstance(method, str) else method
    if len(train) == 0:
        raise ValueError("the training split is empty")
    if config.select == "worst_group_val_acc" and val is not None and val.groups is None:
        raise ValueError("select='worst_group_val_acc' needs groups in the validation split")
    if config.device is not None:
        model.to(config.device)
    method.prepare(model, config)

    named = dict(model.named_parameters())
    candidates = method.candidates()
    cache = _usable_cache(model, train, val, test, config, cache)
    memory_format = None
    if cache is None and config.channels_last is True:
        memory_format = torch.channels_last
        model.to(memory_format=memory_format)
        guard_channels_last(model)
    forward = torch.compile(model) if config.compile and cache is None else model
    stages = cache.stages if cache is not None else None
    optimizer = _optimizer(named, candidates, config, per_tensor=method.per_tensor_lr)
    group_of = {n: i for i, g in enumerate(optimizer.param_groups) for n in g["names"]}
    generator = torch.Generator().manual_seed(int(config.seed))
    aug_generator = torch.Generator().manual_seed(int(config.seed) + 1)

    touched: set[str] = set()
    initial: dict[str, torch.Tensor] = {}
    best_state: dict[str, torch.Tensor] | None = None
    best_metric, best_epoch, best_val = -math.inf, 0, None
    losses, history, status = [], [], "ok"
    start = 0
    for epoch in range(1, config.epochs + 1):
        lr = _scheduled_lr(config, epoch)
        plan = method.plan(epoch, _Context(model, train, config))
        for name in plan.tuned:
            if name not in touched:
                initial[name] = named[name].detach().clone()
                touched.add(name)
        set_trainable(model, plan.tuned)
        if cache is not None:
            refresh_folds(cache.runner)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, scale in plan.lr_scale.items():
            optimizer.param_groups[group_of[name]]["lr"] = lr * scale
        # Stages before `start` were never tuned in this run: their cached inputs hold.
        start = stages.first_stage(touched) if stages is not None else 0
        model.train(not config.freeze_bn)
        epoch_losses = _train_epoch(model, train, config, optimizer, method, plan.tuned,
                                    generator, aug_generator, cache, start, forward, memory_format)
        losses += epoch_losses
        if not all(math.isfinite(x) for x in epoch_losses):
            status = "diverged"
            break
        record = {"epoch": epoch, "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1),
                  "tuned": sum(named[n].numel() for n in plan.tuned), "start_stage": start}
        if val is not None:
            metrics = evaluate(model, val, config.eval_batch_size, cache, start, "val")
            metric = metrics.acc if config.select == "val_acc" else metrics.worst_group_acc
            record.update(val_acc=metrics.acc, val_worst_group_acc=metrics.worst_group_acc)
            if metric > best_metric:
                best_metric, best_epoch, best_val = metric, epoch, metrics
                best_state = _snapshot(model, named, touched, config.freeze_bn)
        else:
            best_epoch = epoch
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if val is not None and best_state is not None:
        _restore(model, named, best_state, initial)
    if cache is not None:
        refresh_folds(cache.runner)
    test_metrics = None
    if test is not None and best_epoch > 0 and (best_state is not None or val is None):
        test_metrics = evaluate(model, test, config.eval_batch_size, cache, start, "test")
    if cache is not None:
        refresh_folds(cache.runner, fix=False)  # the weights may change after this run
    return FitResult(status=status, best_epoch=best_epoch, val=best_val, test=test_metrics,
                     tuned_params=sum(named[n].numel() for n in touched), losses=losses,
                     history=history, seconds=time.perf_counter() - t0, start_stage=start)


@dataclass
class _Context:
    """What a method may look at when planning an epoch."""

    model: nn.Module
    train: Split
    config: TrainConfig

    def minibatches(self, count: int, seed_offset: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`count` random training minibatches (images, labels) on the model's device,
        drawn from their own generator so they do not change the training order."""
        g = torch.Generator().manual_seed(int(self.config.seed) * 1000 + seed_offset)
        device = next(self.model.parameters()).device
        out = []
        for x, y, _ in self.train.batches(self.config.batch_size, shuffle=True, generator=g):
            out.append((x.to(device), y.to(device)))
            if len(out) == count:
                break
        return out


def _usable_cache(model, train, val, test, config, cache):
    if not config.use_cache or config.augment is not None or not config.freeze_bn:
        return None
    splits = {"train": train, "val": val, "test": test}
    if cache is not None:
        if cache.model is not model:
            raise ValueError("the prefix cache was built for another model object")
        for name, split in splits.items():
            if split is not None and cache.splits.get(name) is not split:
                raise ValueError(f"the prefix cache was built for another {name} split")
        if not cache.matches_model():
            raise ValueError("the prefix cache was built on other weights than the model holds "
                             "now; reload the weights it was built on before each run, or rebuild it")
        return cache
    if stages_of(model) is None:
        return None
    return PrefixCache(model, {k: v for k, v in splits.items() if v is not None},
                       config.cache_mb, config.eval_batch_size, config.fold_bn, config.channels_last)


def _optimizer(named, candidates, config, per_tensor):
    """One optimizer over every parameter the method may tune; parameters that are not
    tuned in an epoch have no gradient, so the optimizer leaves them untouched."""
    if per_tensor:
        groups = [{"params": [named[n]], "names": [n]} for n in candidates]
    else:
        groups = [{"params": [named[n] for n in candidates], "names": list(candidates)}]
    if config.optimizer == "adam":
        # The fused kernel updates all tensors in one call (same update, fewer small ops).
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay,
                                fused=True)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


def _scheduled_lr(config: TrainConfig, epoch: int) -> float:
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    return config.lr


def _train_epoch(model, train, config, optimizer, method, tuned, generator, aug_generator,
                 cache, start, forward=None, memory_format=None) -> list[float]:
    """One pass over the training split; returns each step's loss (stops at a NaN).

    Without a cache, batches go through `forward` (the model, or its compiled version),
    in `memory_format` when given."""
    forward = model if forward is None else forward
    if not tuned:
        # Nothing tuned this epoch: keep the minibatch order in step with a normal epoch.
        train._order(True, generator)
        return []
    device = next(model.parameters()).device
    source, s0 = cache.inputs("train", start) if cache is not None else (None, 0)
    if source is not None:
        order = train._order(True, generator)  # the order train.batches would draw
        batches = ((source[idx.to(source.device)], train.labels[idx])
                   for idx in order.split(config.batch_size))
    else:
        batches = ((x, y) for x, y, _ in train.batches(config.batch_size, shuffle=True,
                                                      generator=generator))
    losses = []
    for x, y in batches:
        y = y.to(device, non_blocking=True)
        if cache is not None:
            x = cache.prepare(x)
            if s0 < start:
                with torch.no_grad():
                    x = cache.stages.run(x, s0, start)
            logits = cache.stages.run(x, start)
        else:
            x = x.to(device, non_blocking=True)
            if config.augment is not None:
                x = config.augment(x, aug_generator)
            if memory_format is not None:
                x = to_memory_format(x, memory_format)
            logits = forward(x)
        loss = F.cross_entropy(logits, y)
        penalty = method.penalty(model)
        if penalty is not None:
            loss = loss + penalty
        value = loss.item()
        losses.append(value)
        if not math.isfinite(value):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return losses


def _snapshot(model, named, touched, freeze_bn):
    state = {n: named[n].detach().clone() for n in touched}
    if not freeze_bn:  # running statistics changed too
        state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def _restore(model, named, state, initial):
    with torch.no_grad():
        for name, value in initial.items():
            named[name].copy_(state.get(name, value))
        buffers = dict(model.named_buffers())
        for key, value in state.items():
            if key.startswith("buffer:"):
                buffers[key[len("buffer:"):]].copy_(value)
