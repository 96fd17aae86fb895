"""The one training loop: tune, select (epoch) by validation, report test there.

`fit` runs every method (and pretraining) with the same loop:

    result = fit(model, task.train, task.val, task.test, "first",
                 TrainConfig(lr=1e-3, epochs=15), blocks=blocks_for("resnet26"))

What makes it fast, by construction:

- parameters that are not tuned this epoch have requires_grad=False, so their
  weight gradients are never computed;
- on a staged model with batch norm frozen and no augmentation, the frozen prefix
  runs once per split (`deep.prefix_cache.PrefixCache`, shared across epochs,
  learning rates and methods), and each BN is folded into the conv before it
  (`deep.prefix_cache.FoldedConvBN`);
- channels-last activations on CPU (oneDNN reorders NCHW activations to its blocked
  layout and back around every convolution), evaluation in batches of 64 there;
- evaluation under `torch.inference_mode`; the test split is evaluated once, at
  the end, after restoring the parameters of the best validation epoch (the same
  number as evaluating test every epoch and reading it at that epoch).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import set_trainable
from .data.base import Split
from .errors import (ConfigError, check_between, check_choice, check_int, check_nonnegative,
                     check_positive, check_seed, clash_text, differences)
from .files import atomic_write_bytes
from .methods import EpochContext, EpochPlan, Method, get_method
from .models.staged import (UnhookedCalls, compile_options, guard_channels_last,
                            plain_strided_calls, stages_of, to_memory_format)
from .prefix_cache import (CHANNELS_LAST_CHOICES, DEFAULT_CACHE_MB,  # noqa: F401
                           FoldedConvBN, PrefixCache, amp_active, autocast, batch_statistics,
                           default_eval_batch_size, eval_mode, folded_view, refresh_folds,
                           to_device)
from .results import SELECT_WORST_GROUP, SELECTION_RULES  # what picks the epoch (and the lr)

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("adam", "sgd")


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
        optimizer: "adam" (tuning) or "sgd" (SGD with momentum, pretraining).
        momentum: SGD momentum.
        nesterov: SGD's momentum is Nesterov's (True) or plain (False).
        schedule: "constant", "cosine" (per epoch, from lr down to 0) or "step" (lr times
            `gamma` after each epoch listed in `milestones`, as torch's MultiStepLR).
        milestones, gamma: the "step" schedule's epochs and factor.
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
            is used (pretraining: BN in train mode, augmentation). Worth its compilation
            time on long runs only (docs/performance.md has measurements).
        device: where to train ("cpu", "cuda", ...); None = where the model is
            (`resolve_device` turns "auto" into CUDA when present).
        amp: bf16 autocast of the forward passes (training and evaluation) on CUDA;
            weights, optimizer and loss stay float32. No effect on other devices:
            CPU runs are the same with or without it, bit for bit.
        patience: early stopping on a validation plateau: stop after this many epochs
            in a row without a better validation metric (None: run every epoch). The
            chosen epoch is the same as without it whenever the best epoch comes less
            than `patience` epochs after the previous best (issue #15).
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
    nesterov: bool = True
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: Augment | None = None
    eval_batch_size: int | None = None
    cache_mb: float = DEFAULT_CACHE_MB
    use_cache: bool = True
    fold_bn: bool = True
    channels_last: bool | str | None = None
    compile: bool = False
    device: str | None = None
    amp: bool = False
    patience: int | None = None

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_nonnegative("weight_decay", self.weight_decay)
        check_nonnegative("cache_mb", self.cache_mb)
        check_seed("seed", self.seed)
        # "gpu" here, not a RuntimeError from model.to in fit; "cuda" without a GPU at fit
        check_device_name(self.device)
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_choice("select", self.select, SELECTION_RULES)
        check_choice("channels_last", self.channels_last, CHANNELS_LAST_CHOICES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_momentum(self.optimizer, self.momentum, self.nesterov)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_milestones(self.schedule, self.milestones, self.gamma, self.epochs)


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


# --- evaluation -------------------------------------------------------------------

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
    batch_size = (default_eval_batch_size(device) if batch_size is None
                  else check_int("batch_size", batch_size))
    with eval_mode(model):
        if cache is not None and name is not None:
            source, stage = cache.inputs(name, start)
            if source is None:
                batches = (x for x, _, _ in split.batches(batch_size))
            else:
                batches = (source[i:i + batch_size] for i in range(0, len(split), batch_size))
            logits = (cache.stages.run(cache.prepare(x), stage) for x in batches)
        else:
            logits = (model(to_device(x, device)) for x, _, _ in split.batches(batch_size))
        return _classes(logits, split, name or repr(getattr(split, "name", "evaluated")))


def _classes(logits: Iterable[torch.Tensor], split: Split, name: str) -> torch.Tensor:
    """The argmax of each batch of `logits`, concatenated; the labels of `split` checked
    against the model's number of outputs at the first batch."""
    preds = []
    for batch in logits:
        if not preds:
            check_labels(split, batch.shape[-1], name)
        preds.append(batch.argmax(1))
    if not preds:
        raise ConfigError(f"the {name} split is empty: nothing to evaluate")
    return torch.cat(preds)


def check_labels(split: Split, outputs: int, name: str) -> None:
    """Every label of `split` is a class of a model with `outputs` logits. Otherwise
    training stops at an IndexError from cross_entropy, and evaluation silently counts
    such examples as wrong."""
    labels = split.labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= outputs):
        raise ConfigError(f"the {name} split has labels {int(labels.min())}..{int(labels.max())}, "
                          f"but the model gives {outputs} logits (classes 0..{outputs - 1}): "
                          "give the model one output per class of the data (e.g. "
                          "build_model(arch, num_classes)), or relabel the data")


def evaluate(model: nn.Module, split: Split, batch_size: int | None = None,
             cache: PrefixCache | None = None, start: int = 0,
             name: str | None = None) -> Metrics:
    """Accuracy (and worst-group accuracy when the split has groups) of `model` on `split`."""
    preds = predict(model, split, batch_size, cache, start, name)
    return accuracy(preds, split.labels, split.groups)


def check_device_name(device: str | None) -> str:
    """The kind of `device` ("auto", "cpu" or "cuda"), if it is one of auto, cpu, cuda or
    cuda:N (or None, auto); else a ConfigError. Whether this process has that device is
    `resolve_device`'s question: a CPU head node may describe a GPU worker's run."""
    if device in (None, "auto"):
        return "auto"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda") or (kind == "cpu" and device != "cpu"):  # "cpu:3" means nothing
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return kind


def resolve_device(device: str | None) -> str:
    """`device`, with "auto" (or None) meaning CUDA when this process sees a GPU, else the CPU."""
    kind = check_device_name(device)
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
        raise ConfigError(f"device {device!r} was asked for, but this process sees no CUDA GPU "
                          f"(torch {torch.__version__}: {build}); use --device auto or cpu")
    return device


# --- the loop ---------------------------------------------------------------------

@dataclass
class RunStateFile:
    """Where `fit` keeps a run's state after every epoch, so that a stopped run continues
    from its last finished epoch (pretraining: hours to days for the paper's recipes).

    Attributes:
        path: the file, rewritten atomically after each epoch; the caller deletes it
            once the run's result is safe.
        key: what the run must agree on to continue from the file (its settings, JSON-like
            values); a file of another run is refused, never silently continued.
    """

    path: Path
    key: dict
    _loaded: dict | None = field(default=None, init=False, repr=False)

    FIELDS = ("epoch", "model", "optimizer", "generator", "aug_generator", "losses", "history",
              "touched")

    def __post_init__(self):
        # as JSON would hold it (a Path as its text): what is saved is what is compared
        self.key = json.loads(json.dumps(self.key, default=str))

    def load(self) -> dict | None:
        """The saved state, None when there is none; refuses another run's file. Read
        once: the caller may look before `fit` continues from it."""
        if self._loaded is not None:
            return self._loaded
        if Path(self.path).is_dir():
            raise ConfigError(f"{self.path} is a folder, not a run state file: move it away")
        if not Path(self.path).is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (a truncated or foreign file: say which)
            raise ConfigError(f"{self.path} is not a readable run state ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); delete it to "
                              "start the run over") from None
        missing = [f for f in (*self.FIELDS, "key") if not isinstance(state, dict) or f not in state]
        if missing:
            raise ConfigError(f"{self.path} is not a run state of this version (no "
                              f"{', '.join(missing)}); delete it to start the run over")
        if state["key"] != self.key:
            differ = clash_text(differences(state["key"], self.key), sep="; ")
            raise ConfigError(f"{self.path} holds a stopped run with other settings ({differ}); "
                              "rerun with the settings it started with, or delete it to "
                              "start over")
        self._loaded = state
        return state

    def save(self, state: dict) -> None:
        atomic_write_bytes(self.path, lambda f: torch.save({**state, "key": self.key}, f))


def fit(model: nn.Module, train: Split, val: Split | None, test: Split | None,
        method: str | Method, config: TrainConfig,
        blocks: Mapping[str, Sequence[str]] | None = None, cache: PrefixCache | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        state_file: RunStateFile | None = None) -> FitResult:
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
        state_file: pretraining only (val None, the `all` method): the run's state is
            saved there after every epoch, and a run that finds the file continues after
            its last epoch, with the numbers of a run never stopped (on CPU, bit for bit).
    """
    t0 = time.perf_counter()
    if not isinstance(config, TrainConfig):  # a dict would fail as an AttributeError
        raise ConfigError(f"config must be a TrainConfig, e.g. TrainConfig(lr=1e-3, epochs=10), "
                          f"got {type(config).__name__}")
    method = get_method(method, blocks) if isinstance(method, str) else method
    check_splits(train, val, test, config)
    run = TrainingRun(model, train, val, test, method, config, cache)
    run.check_labels()
    first = 1
    if state_file is not None:
        if val is not None or method.name != "all":
            # a run with validation or a method of its own keeps state this file does not hold
            raise ConfigError("a run state file is for pretraining (no validation split, "
                              f"method 'all'); got method {method.name!r}"
                              + (" with a validation split" if val is not None else ""))
        first = run.load_state(state_file.load()) + 1
    for epoch in range(first, config.epochs + 1):
        plan = run.plan_epoch(epoch)
        losses = run.train_epoch(plan)
        if not all(math.isfinite(x) for x in losses):
            run.status = "diverged"  # the selection covers the epochs completed before
            break
        record = run.select(epoch, plan, losses)
        if state_file is not None:
            state_file.save(run.state(epoch))
        if on_epoch is not None:
            on_epoch(record)
        if run.plateaued(epoch) or run.optimizer is None:  # None: nothing can ever be tuned
            break
    test_metrics = run.restore_best_and_test()
    return run.result(test_metrics, time.perf_counter() - t0)


def check_splits(train: Split, val: Split | None, test: Split | None,
                 config: TrainConfig) -> None:
    """The splits can be trained on and selected by `config.select`."""
    if len(train) == 0:
        raise ConfigError("the training split is empty: a fine-tuning run trains on n_target "
                          "images; set n_target (--n-target) to at least 1")
    for name, split in (("validation", val), ("test", test)):
        if split is not None and len(split) == 0:
            raise ConfigError(f"the {name} split is empty: give it examples, or pass None "
                              "for it (no validation: every epoch trains and the last is kept; "
                              "no test: no final evaluation)")
    if config.select == SELECT_WORST_GROUP and val is not None and val.groups is None:
        raise ConfigError(f"select={SELECT_WORST_GROUP!r} (--select) needs groups in the "
                          "validation split, and this data has none: use --select val_acc")
    if config.select == SELECT_WORST_GROUP and val is not None and not (val.groups >= 0).any():
        # (a negative id is in no group: FMoW's region "Other")
        raise ConfigError(f"select={SELECT_WORST_GROUP!r} (--select) needs validation examples "
                          f"in a group, and every one of the {len(val)} is in none (group id "
                          "< 0): use --select val_acc, or a larger validation split")


class TrainingRun:
    """The state of one `fit` call, advanced by its named steps: plan an epoch, train
    it, select by validation; at the end restore the best epoch and test there."""

    def __init__(self, model: nn.Module, train: Split, val: Split | None, test: Split | None,
                 method: Method, config: TrainConfig, cache: PrefixCache | None):
        self.model, self.train, self.val, self.test = model, train, val, test
        self.method, self.config = method, config
        if config.device is not None:
            model.to(resolve_device(config.device))  # "auto" too, as TrainConfig documents
        method.prepare(model, config)
        self.named = dict(model.named_parameters())
        candidates = method.candidates()
        self.cache = _usable_cache(model, train, val, test, config, cache)
        self.memory_format = self._layout()
        # Always, not only where the engine picks channels-last: a caller's channels-last
        # images or weights reach the same oneDNN kernels (deep.models.staged).
        guard_channels_last(model)
        self.forward = (torch.compile(model, options=compile_options(model))
                        if config.compile and self.cache is None else model)
        # No candidates (`none`): no optimizer, and `fit` evaluates once.
        self.optimizer = (_optimizer(self.named, candidates, config, method.per_tensor_lr)
                          if candidates else None)
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        self.group_of = {n: i for i, g in enumerate(groups) for n in g["names"]}
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.aug_generator = torch.Generator().manual_seed(int(config.seed) + 1)
        self.touched: set[str] = set()                 # tuned in at least one epoch
        self.initial: dict[str, torch.Tensor] = {}     # their values before tuning
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metric, self.best_epoch, self.best_val = -math.inf, 0, None
        self.losses: list[float] = []
        self.history: list[dict] = []
        self.status = "ok"
        self.start = 0  # earliest stage that runs with gradients
        self.unhooked: list[str] | None = None  # found by `check_labels`; None: not yet

    def guarded_calls(self):
        """The context of a differentiated forward: `plain_strided_calls` unless the probe
        found every faulty-shape call covered by a module hook (deep.models.staged)."""
        if self.unhooked == []:
            return contextlib.nullcontext()
        return plain_strided_calls(self.model)

    def check_labels(self) -> None:
        """Every split's labels are classes of the model (its logits on one training
        example say how many), before anything runs: an out-of-range label would stop
        training at an IndexError from cross_entropy (or a method's gradient probes), and
        evaluation would silently count its examples as wrong."""
        x, _, _ = next(self.train.batches(1))
        x = to_device(x, next(self.model.parameters()).device)
        # The same forward says whether the model makes convolution or GroupNorm calls that
        # no module hook guards (F.conv2d on a weight of its own): only then do the
        # differentiated forward passes pay for `plain_strided_calls`.
        with eval_mode(self.model), torch.inference_mode(), UnhookedCalls(self.model) as probe:
            outputs = self.model(x).shape[-1]
        self.unhooked = probe.found
        for name, split in (("training", self.train), ("validation", self.val),
                            ("test", self.test)):
            if split is not None:
                check_labels(split, outputs, name)

    def _layout(self) -> torch.memory_format | None:
        """Channels-last for the whole model when asked and no cache sets it per stage."""
        if self.cache is None and self.config.channels_last is True:
            self.model.to(memory_format=torch.channels_last)
            return torch.channels_last
        return None

    def plan_epoch(self, epoch: int) -> EpochPlan:
        """Ask the method what to tune; set trainable flags, learning rates, the start stage."""
        lr = _scheduled_lr(self.config, epoch)
        # The mode first: a method's plan may run the model (Auto-RGN's gradient probes),
        # which must not depend on the mode the caller or the previous run left it in.
        self.model.train(not self.config.freeze_bn)
        with self.guarded_calls():  # Auto-RGN's and Auto-SNR's gradient probes
            plan = self.method.plan(epoch, EpochContext(self.model, self.train, self.config))
        for name in plan.tuned:
            if name not in self.touched:
                self.initial[name] = self.named[name].detach().clone()
                self.touched.add(name)
        set_trainable(self.model, plan.tuned)
        if self.cache is not None:
            refresh_folds(self.cache.runner)
            # Stages before `start` were never tuned in this run: their cached inputs hold.
            self.start = self.cache.stages.first_stage(self.touched)
        if self.optimizer is None:
            return plan
        if plan.reset_optimizer:  # a fresh optimizer: moments and step counts forgotten
            self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for name, scale in plan.lr_scale.items():
            self.optimizer.param_groups[self.group_of[name]]["lr"] = lr * scale
        return plan

    def train_epoch(self, plan: EpochPlan) -> list[float]:
        """One pass over the training split; returns each step's loss (stops at a NaN)."""
        if not plan.tuned:
            # Nothing tuned this epoch: keep the minibatch order in step with a normal epoch.
            self.train.order(True, self.generator)
            return []
        device = next(self.model.parameters()).device
        losses = []
        for x, y in self._batches():
            # Forward only; backward follows its dtypes (autocast) and the layouts the
            # forward saved: convolutions no module hook sees (F.conv2d) are guarded here.
            with autocast(device, self.config.amp), self.guarded_calls():
                logits = self._logits(x)
            loss = F.cross_entropy(logits.float(), y.to(device, non_blocking=True))
            penalty = self.method.penalty(self.model)
            if penalty is not None:
                loss = loss + penalty
            value = loss.item()
            losses.append(value)
            if not math.isfinite(value):
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.losses += losses
        return losses

    def _batches(self):
        """(inputs, labels) of the epoch: cached stage inputs, or images, in the order
        `train.batches` draws from the run's generator."""
        cache, train, size = self.cache, self.train, self.config.batch_size
        self._source_stage = 0
        if cache is not None:
            source, self._source_stage = cache.inputs("train", self.start)
            if source is not None:
                order = train.order(True, self.generator)
                return ((source[idx.to(source.device)], train.labels[idx])
                        for idx in order.split(size))
        return ((x, y) for x, y, _ in train.batches(size, shuffle=True, generator=self.generator))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache is not None:
            x = cache.prepare(x)
            if self._source_stage < self.start:
                with torch.no_grad():
                    x = cache.stages.run(x, self._source_stage, self.start)
            return cache.stages.run(x, self.start)
        x = to_device(x, next(self.model.parameters()).device)
        if self.config.augment is not None:
            x = self.config.augment(x, self.aug_generator)
        if self.memory_format is not None:
            x = to_memory_format(x, self.memory_format)
        return self.forward(x)

    def select(self, epoch: int, plan: EpochPlan, losses: list[float]) -> dict:
        """Validate; keep the parameters of the best epoch so far. Returns the epoch's record."""
        record = {"epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1),
                  "tuned": sum(self.named[n].numel() for n in plan.tuned),
                  "start_stage": self.start}
        if self.val is None:
            self.best_epoch = epoch  # no validation (pretraining): the last epoch counts
        else:
            with autocast(next(self.model.parameters()).device, self.config.amp):
                metrics = evaluate(self.model, self.val, self.config.eval_batch_size, self.cache,
                                   self.start, "val")
            metric = (metrics.worst_group_acc if self.config.select == SELECT_WORST_GROUP
                      else metrics.acc)
            record.update(val_acc=metrics.acc, val_worst_group_acc=metrics.worst_group_acc)
            if metric > self.best_metric:
                self.best_metric, self.best_epoch, self.best_val = metric, epoch, metrics
                self.best_state = _snapshot(self.model, self.named, self.touched,
                                            self.config.freeze_bn)
        self.history.append(record)
        return record

    def state(self, epoch: int) -> dict:
        """What continuing after `epoch` needs (pretraining's: see `fit`'s state_file)."""
        return {"epoch": epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "aug_generator": self.aug_generator.get_state(),
                "losses": self.losses, "history": self.history, "touched": sorted(self.touched)}

    def load_state(self, state: dict | None) -> int:
        """Continue from `state` (None: from the start); returns its last finished epoch."""
        if state is None:
            return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.aug_generator.set_state(state["aug_generator"])
        self.losses, self.history = list(state["losses"]), list(state["history"])
        self.touched = set(state["touched"])
        self.best_epoch = state["epoch"]
        return state["epoch"]

    def plateaued(self, epoch: int) -> bool:
        """Early stopping: `config.patience` epochs since the best validation epoch, or
        since the start of the method's last phase if that came later."""
        patience = self.config.patience
        if patience is None or self.val is None:
            return False
        return epoch - max(self.best_epoch, self.method.last_phase_start() - 1) >= patience

    def restore_best_and_test(self) -> Metrics | None:
        """Freeze everything, restore the best epoch's parameters, evaluate test once there."""
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.val is not None and self.best_state is not None:
            _restore(self.model, self.named, self.best_state, self.initial)
        runner = self.cache.runner if self.cache is not None else None
        if runner is not None:
            refresh_folds(runner)
        test_metrics = None
        if (self.test is not None and self.best_epoch > 0
                and (self.best_state is not None or self.val is None)):
            with autocast(next(self.model.parameters()).device, self.config.amp):
                test_metrics = evaluate(self.model, self.test, self.config.eval_batch_size,
                                        self.cache, self.start, "test")
        if runner is not None:
            refresh_folds(runner, fix=False)  # the weights may change after this run
        return test_metrics

    def result(self, test_metrics: Metrics | None, seconds: float) -> FitResult:
        return FitResult(status=self.status, best_epoch=self.best_epoch, val=self.best_val,
                         test=test_metrics,
                         tuned_params=sum(self.named[n].numel() for n in self.touched),
                         losses=self.losses, history=self.history, seconds=seconds,
                         start_stage=self.start)


def _usable_cache(model, train, val, test, config, cache):
    if (not config.use_cache or config.augment is not None or not config.freeze_bn
            or batch_statistics(model)):  # no frozen statistics to cache under
        return None
    splits = {"train": train, "val": val, "test": test}
    if cache is not None:
        if cache.model is not model:
            raise ConfigError("the prefix cache was built for another model object")
        for name, split in splits.items():
            if split is not None and cache.splits.get(name) is not split:
                raise ConfigError(f"the prefix cache was built for another {name} split")
        if amp_active(cache.device, cache.amp) != amp_active(cache.device, config.amp):
            raise ConfigError(f"the prefix cache was built with amp={cache.amp}, the run has "
                              f"amp={config.amp}: build it with PrefixCache(..., amp={config.amp})")
        if not cache.matches_model():
            raise ConfigError("the prefix cache was built on other weights than the model holds "
                             "now; reload the weights it was built on before each run, or rebuild it")
        return cache
    if stages_of(model) is None:
        return None
    return PrefixCache(model, {k: v for k, v in splits.items() if v is not None},
                       config.cache_mb, config.eval_batch_size, config.fold_bn, config.channels_last,
                       amp=config.amp)


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
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov, weight_decay=config.weight_decay)


def _scheduled_lr(config: TrainConfig, epoch: int) -> float:
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    if config.schedule == "step":  # epoch is 1-based: milestone m lowers epochs m+1, ...
        return config.lr * config.gamma ** sum(epoch > m for m in config.milestones)
    return config.lr


def check_momentum(optimizer: str, momentum: float, nesterov: bool) -> None:
    """SGD's momentum is a number in [0, 1) (torch refuses a negative one only at the first
    fit, and 1 or more diverges); Adam takes neither it nor `nesterov`, so a value other
    than the default would be silently unused (as check_milestones says of gamma)."""
    if optimizer != "sgd":
        if momentum != TrainConfig.momentum or nesterov is not TrainConfig.nesterov:
            raise ConfigError(f"momentum={momentum}, nesterov={nesterov} are SGD's and need "
                              f"optimizer 'sgd', got {optimizer!r}")
        return
    check_between("momentum", momentum, 0, 1, high_open=True)


def check_milestones(schedule: str, milestones, gamma: float, epochs: int) -> None:
    """A "step" schedule needs increasing positive milestones and a finite gamma > 0 (a
    milestone not below `epochs`, which never lowers the rate, is warned about); the others
    take neither (a gamma other than the default would be silently unused)."""
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
        raise ConfigError(f"milestones must be a list of epochs, e.g. [75, 125], got "
                          f"{milestones!r}")
    milestones = list(milestones)
    check_positive("gamma", gamma)
    if schedule != "step":
        if milestones:
            raise ConfigError(f"milestones {milestones} need schedule 'step', got {schedule!r} "
                              "(to clear a protocol's: --milestones '', or milestones = [])")
        if gamma != TrainConfig.gamma:
            raise ConfigError(f"gamma {gamma} is the step schedule's factor and needs schedule "
                              f"'step', got {schedule!r}")
        return
    if not milestones or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                             for m in milestones) \
            or milestones != sorted(set(milestones)):
        raise ConfigError(f"schedule 'step' needs increasing positive integer milestones "
                          f"(epochs), got {milestones}")
    late = [m for m in milestones if m >= epochs]
    if late:  # a warning, not an error: a short smoke run of a long protocol is legitimate
        warnings.warn(f"milestone(s) {late} not below epochs ({epochs}) never lower the rate "
                      "(it drops after each milestone epoch)", stacklevel=4)  # the config's caller


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
