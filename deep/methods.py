"""Fine-tuning methods, each by the short name used everywhere (CLI, CSV, plots).

A method decides, epoch by epoch, which parameters are tuned and at what
learning-rate multiple; the loop in `deep.train` does the rest. With E epochs,
base learning rate lr, and the architecture's blocks B_1..B_K in forward order
(ResNet-26: first, second, third, last; ResNet-50 adds fourth):

| name | what is tuned |
|---|---|
| `first`, `second`, ... `last` | that block only, every epoch (surgical fine-tuning; `last` is the linear probe) |
| `all` | every parameter, every epoch (full fine-tuning) |
| `none` | nothing: the source model on the target's splits, evaluated once (the "no tuning" baseline) |
| `lp-ft` | epochs 1..floor(E/2): `last` only (linear probe); the remaining epochs: everything. One lr for both phases |
| `gradual-first-last` | B_1 from epoch 1; block k (k = 0..K-1 in that order) joins at epoch 1 + floor(k E / K) and stays; the last block's stage tunes everything, parameters in no block included (as `all`) |
| `gradual-last-first` | the same schedule in reverse order: B_K first, B_1 last (ULMFiT-style unfreezing) |
| `l1sp` | everything, with loss + lambda * sum_i abs(theta_i - theta0_i) over all parameters; lambda = 1e-4 |
| `auto-rgn` | every non-batch-norm tensor; at the start of each epoch, on 5 random training minibatches, RGN = norm(grad) / norm(theta) per tensor (mean over the minibatches), divided by its maximum, is that tensor's lr multiplier for the epoch. Batch-norm tensors are frozen |
| `auto-snr` | at the start of each epoch, per non-batch-norm tensor, the signal-to-noise ratio of per-example gradients over 5 random training minibatches, mean over entries of mean_i(g_i)^2 / var_i(g_i); tensors with SNR >= threshold (default 1/batch_size, see AutoSNR) are tuned that epoch, the others frozen. Batch-norm tensors are frozen |

Parameters that a method does not tune in an epoch get requires_grad=False and are
left bitwise unchanged. Adam keeps its state across epochs (the public code
rebuilds Adam every epoch for both automatic methods, resetting its moments:
`reset_optimizer=True` of `AutoRGN` and `AutoSNR`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .blocks import ALL, BlockMap, tuned_parameter_names
from .data.base import Split
from .errors import ConfigError, check_choice

if TYPE_CHECKING:  # the engine imports this module, never the other way round
    from .train import TrainConfig


@dataclass
class EpochContext:
    """What a method may look at when planning an epoch (`Method.plan`)."""

    model: nn.Module
    train: Split
    config: "TrainConfig"

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


@dataclass
class EpochPlan:
    """Parameters tuned in one epoch, lr multipliers (default 1) for some of them, and
    whether the optimizer starts afresh this epoch (its moments forgotten)."""

    tuned: list[str]
    lr_scale: dict[str, float] = field(default_factory=dict)
    reset_optimizer: bool = False


class Method:
    """Base class. Subclasses set `name` and implement `candidates` and `plan`."""

    name = ""
    per_tensor_lr = False  # True: the optimizer gets one parameter group per tensor

    def __init__(self, blocks: BlockMap | None = None):
        self.blocks = blocks

    def prepare(self, model: nn.Module, config: "TrainConfig") -> None:
        """Called once by `fit` before training."""
        self.model, self.config = model, config

    def candidates(self) -> list[str]:
        """Every parameter name the method may tune in some epoch."""
        raise NotImplementedError

    def plan(self, epoch: int, ctx: EpochContext) -> EpochPlan:
        """What to tune in `epoch` (1-based). `ctx` gives the model and training data."""
        raise NotImplementedError

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added at every step, or None."""
        return None

    def last_phase_start(self) -> int:
        """The first epoch of the method's last scheduled phase: early stopping
        (`TrainConfig.patience`) counts from there at the earliest, so a plateau of an
        earlier phase (lp-ft's linear probe) cannot end a run before its last phase."""
        return 1

    def _require_blocks(self) -> BlockMap:
        if not self.blocks:
            raise ConfigError(f"method {self.name!r} needs a block mapping (blocks=...)")
        return self.blocks

    def _names(self, options) -> list[str]:
        if options != ALL:
            self._require_blocks()
        return tuned_parameter_names(self.model, options, self.blocks or {})


class Surgical(Method):
    """Tune one block (or "all") every epoch."""

    def __init__(self, option: str, blocks: BlockMap | None = None):
        super().__init__(blocks)
        self.name = self.option = option

    def candidates(self):
        return self._names(self.option)

    def plan(self, epoch, ctx):
        return EpochPlan(self.candidates())


class NoTuning(Method):
    """Nothing tuned: the source model evaluated on the target's splits (the paper's
    "no tuning" row). `fit` evaluates it once; the learning rate and epochs change nothing."""

    name = "none"

    def candidates(self):
        return []

    def plan(self, epoch, ctx):
        return EpochPlan([])


class LinearProbeThenFinetune(Method):
    """`last` for the first floor(E/2) epochs, then everything."""

    name = "lp-ft"

    def candidates(self):
        return self._names(ALL)

    def last_phase_start(self):
        return self.config.epochs // 2 + 1

    def plan(self, epoch, ctx):
        probe_epochs = self.config.epochs // 2
        if epoch <= probe_epochs:
            return EpochPlan(self._names(list(self.blocks)[-1]))
        return EpochPlan(self.candidates())


def unfreeze_epochs(num_blocks: int, epochs: int) -> list[int]:
    """Epoch (1-based) at which the k-th block to unfreeze joins: 1 + floor(k E / K)."""
    return [1 + (k * epochs) // num_blocks for k in range(num_blocks)]


class GradualUnfreezing(Method):
    """Blocks join one by one in `order` ("first-last" or "last-first") and stay tuned;
    the last stage is full fine-tuning (what `all` tunes).

    The blocks need not cover the network: the final norm of `resnet26-gn` / `wrn28-10`
    and `resnet50-public`'s `bn1` lie in no block (the public code's blocks), nor do a
    CLIP ViT's middle transformer blocks, `ln_post` and `proj` (the paper's options).
    Such parameters join with the last block, when everything is tuned, so that the
    method ends where full fine-tuning does instead of never tuning them."""

    ORDERS = ("first-last", "last-first")

    def __init__(self, order: str, blocks: BlockMap | None = None):
        super().__init__(blocks)
        check_choice("order", order, self.ORDERS)
        self.order, self.name = order, f"gradual-{order}"

    def candidates(self):
        return self._names(ALL)

    def last_phase_start(self):
        return max(self._joins().values())

    def _joins(self) -> dict[str, int]:
        """Block -> the epoch it joins, in the order they join."""
        options = list(self._require_blocks())
        if self.order == "last-first":
            options.reverse()
        return dict(zip(options, unfreeze_epochs(len(options), self.config.epochs)))

    def plan(self, epoch, ctx):
        if epoch >= self.last_phase_start():
            return EpochPlan(self.candidates())
        return EpochPlan(self._names([o for o, e in self._joins().items() if e <= epoch]))


class L1SP(Method):
    """Everything, with an L1 penalty lambda * sum |theta - theta0| toward the pretrained weights."""

    name = "l1sp"

    def __init__(self, blocks: BlockMap | None = None, l1_lambda: float = 1e-4):
        super().__init__(blocks)
        if not l1_lambda >= 0:
            raise ConfigError(f"l1_lambda must be >= 0, got {l1_lambda}")
        self.l1_lambda = l1_lambda

    def prepare(self, model, config):
        super().prepare(model, config)
        named = dict(model.named_parameters())
        self._anchor = [(named[n], named[n].detach().clone()) for n in self.candidates()]

    def candidates(self):
        return self._names(ALL)

    def plan(self, epoch, ctx):
        return EpochPlan(self.candidates())

    def penalty(self, model):
        total = sum((p - p0).abs().sum() for p, p0 in self._anchor if p.requires_grad)
        return self.l1_lambda * total


def batchnorm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the affine parameters of every batch-norm layer."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
    return names


EXCLUSION_RULES = ("batchnorm", "bn-name")


def excluded_parameter_names(model: nn.Module, rule: str) -> set[str]:
    """What the automatic methods never tune: the parameters of batch-norm modules
    ("batchnorm"), or, as the public code does, every parameter whose name contains
    "bn" ("bn-name": also GroupNorms named bn*, but not a BN named downsample.1)."""
    if rule == "batchnorm":
        return batchnorm_parameter_names(model)
    if rule == "bn-name":
        return {n for n, _ in model.named_parameters() if "bn" in n}
    check_choice("exclude", rule, EXCLUSION_RULES)
    raise AssertionError(f"exclusion rule {rule!r} is listed but not implemented")


def relative_gradient_norms(model: nn.Module, names: Sequence[str],
                            minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """RGN of each tensor: norm(grad of the mean cross-entropy) / norm(theta), computed per
    minibatch and averaged over the minibatches. The model's mode is left as it is."""
    norms = [p.detach().norm().item() for p in _parameters(model, names)]
    # An all-zero tensor has no scale to be relative to: it gets multiplier 1.
    return _mean_over_minibatches(model, names, minibatches, lambda i, g: (
        g.norm().item() / norms[i] if norms[i] > 0 else math.inf))


def _parameters(model: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    named = dict(model.named_parameters())
    return [named[n] for n in names]


def _mean_over_minibatches(model: nn.Module, names: Sequence[str],
                           minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                           statistic) -> dict[str, float]:
    """Per tensor, `statistic(index, gradient)` of the mean cross-entropy's gradient on
    each minibatch, averaged over the minibatches. The tensors get requires_grad for
    the duration (restored after); the model's mode is left as it is, and so are its
    buffers: in train mode the probes' forward passes would move batch-norm running
    statistics, and a measurement must not change the model."""
    params = _parameters(model, names)
    flags = [p.requires_grad for p in params]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    for p in params:
        p.requires_grad_(True)
    try:
        totals = [0.0] * len(params)
        for x, y in minibatches:
            # A parameter the forward never uses (a user's spare layer) has gradient zero,
            # not a RuntimeError that stopped Auto-RGN.
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params,
                                        allow_unused=True, materialize_grads=True)
            for i, g in enumerate(grads):
                totals[i] += statistic(i, g)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    return {n: t / len(minibatches) for n, t in zip(names, totals)}


def rgn_multipliers(rgn: Mapping[str, float]) -> dict[str, float]:
    """RGN divided by its maximum over tensors (tensors with infinite RGN get 1; when no
    finite RGN is positive, every tensor gets 1)."""
    finite = [v for v in rgn.values() if math.isfinite(v)]
    top = max(finite, default=0.0)
    if top <= 0:
        return {n: 1.0 for n in rgn}
    return {n: (v / top if math.isfinite(v) else 1.0) for n, v in rgn.items()}


class AutomaticMethod(Method):
    """What Auto-RGN and Auto-SNR share: the candidates (every tensor but those the
    `exclude` rule names, see `excluded_parameter_names`), measured on `minibatches`
    random training minibatches each epoch, and the optimizer switch.

    `reset_optimizer=True` starts the optimizer afresh every epoch (moments and step
    counts forgotten), as the public code does for both methods by rebuilding Adam;
    the default keeps one optimizer for the run."""

    def __init__(self, blocks: BlockMap | None = None, minibatches: int = 5,
                 exclude: str = "batchnorm", reset_optimizer: bool = False):
        super().__init__(blocks)
        check_choice("exclude", exclude, EXCLUSION_RULES)
        self.minibatches, self.exclude, self.reset_optimizer = minibatches, exclude, reset_optimizer

    def candidates(self):
        excluded = excluded_parameter_names(self.model, self.exclude)
        return [n for n in self._names(ALL) if n not in excluded]

    def epoch_plan(self, tuned: list[str], lr_scale: dict[str, float] | None = None) -> EpochPlan:
        """The plan of one epoch, with this method's optimizer switch."""
        return EpochPlan(tuned, lr_scale or {}, self.reset_optimizer)


class AutoRGN(AutomaticMethod):
    """Every non-batch-norm tensor, lr scaled per tensor by its normalised RGN each epoch.

    `exclude="bn-name", reset_optimizer=True` is the public code's variant: it leaves out
    every parameter named *bn* and rebuilds Adam each epoch (moments forgotten)."""

    name = "auto-rgn"
    per_tensor_lr = True

    def plan(self, epoch, ctx):
        names = self.candidates()
        rgn = relative_gradient_norms(self.model, names, ctx.minibatches(self.minibatches, epoch))
        scale = rgn_multipliers(rgn)
        self.last_multipliers = scale
        return self.epoch_plan([n for n in names if scale[n] > 0], scale)


def per_example_gradient_moments(model: nn.Module, names: Sequence[str],
                                 minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                                 chunk_size: int = 32) -> tuple[dict[str, torch.Tensor],
                                                                 dict[str, torch.Tensor], int]:
    """Mean and unbiased variance over examples of per-example cross-entropy gradients.

    Uses torch.func (vmap of grad over single examples), `chunk_size` examples at a
    time so that memory is chunk_size x parameters; sums are kept in float64.
    The model must be in eval mode (batch norm then treats examples independently).

    Returns (mean, var, n): name -> float64 tensor of the parameter's shape, and the
    number of examples.
    """
    if model.training:
        raise ConfigError("per-example gradients need the model in eval mode (freeze_bn=True)")
    named = dict(model.named_parameters())
    tuned = {n: named[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in named.items() if n not in tuned}
    fixed.update(dict(model.named_buffers()))

    def loss_one(params, x, y):
        logits = functional_call(model, (params, fixed), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    # on the parameters' device: the per-example gradients are summed into these in place
    s1 = {n: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for n, t in tuned.items()}
    s2 = {n: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for n, t in tuned.items()}
    count = 0
    for x, y in minibatches:
        for i in range(0, len(x), chunk_size):
            grads = per_example(tuned, x[i:i + chunk_size], y[i:i + chunk_size])
            for n, g in grads.items():
                g = g.double()
                s1[n] += g.sum(0)
                s2[n] += (g * g).sum(0)
            count += len(x[i:i + chunk_size])
    if count < 2:
        raise ConfigError("per-example gradient statistics need at least 2 examples")
    mean = {n: s1[n] / count for n in s1}
    var = {n: ((s2[n] - count * mean[n] ** 2) / (count - 1)).clamp_min(0) for n in s1}
    return mean, var, count


def gradient_snr(mean: Mapping[str, torch.Tensor], var: Mapping[str, torch.Tensor],
                 eps: float = 1e-8) -> dict[str, float]:
    """Per tensor: mean over entries of mean^2 / (var + eps)."""
    return {n: (mean[n] ** 2 / (var[n] + eps)).mean().item() for n in mean}


def eb_criterion(model: nn.Module, names: Sequence[str],
                 minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 eps: float = 1e-8) -> dict[str, float]:
    """The public code's Auto-SNR statistic ("eb-criterion"): per minibatch, g = the
    gradient of the mean cross-entropy; mean over entries of g^2 / (var of g along the
    tensor's first axis, unbiased, + eps); averaged over the minibatches."""
    return _mean_over_minibatches(model, names, minibatches, lambda i, g: (
        (g * g / (torch.var(g, dim=0, keepdim=True) + eps)).mean().item()))


class AutoSNR(AutomaticMethod):
    """Tune, each epoch, the non-batch-norm tensors whose per-example gradient SNR passes
    a threshold.

    Difference from the public code: it divides the squared minibatch gradient by
    its variance over the tensor's first axis (output units) of one minibatch
    gradient, which is a spread across units, not noise across examples. Here
    the variance is over examples (per-example gradients, torch.func), pooled over
    the 5 minibatches. Per entry, mean^2 / var of single-example gradients is the
    SNR of one example's gradient; the minibatch-mean gradient has B times that
    SNR. The default threshold 1 / batch_size therefore tunes a tensor when its
    minibatch gradient's signal exceeds its sampling noise on average over entries.
    (The public code's threshold 0.95 refers to its different statistic; its
    per-column ratio is near 1 for most tensors.) Measured on the synthetic
    benchmark at the start of tuning: per-tensor SNRs 0.03-0.3 against the
    threshold 1/64, so nearly every tensor is tuned in every epoch and auto-snr
    behaves like `all` without batch-norm parameters; pass `threshold` to be stricter.

    `statistic="eb-criterion", exclude="bn-name", reset_optimizer=True` is the public
    code's variant (`eb_criterion`, default threshold 0.95, Adam rebuilt each epoch).
    """

    name = "auto-snr"
    STATISTICS = ("per-example", "eb-criterion")

    def __init__(self, blocks: BlockMap | None = None, minibatches: int = 5,
                 threshold: float | None = None, chunk_size: int = 32,
                 statistic: str = "per-example", exclude: str = "batchnorm",
                 reset_optimizer: bool = False):
        super().__init__(blocks, minibatches, exclude, reset_optimizer)
        check_choice("statistic", statistic, self.STATISTICS)
        self.threshold, self.chunk_size, self.statistic = threshold, chunk_size, statistic

    def prepare(self, model, config):
        super().prepare(model, config)
        if not config.freeze_bn:
            raise ConfigError("auto-snr needs freeze_bn=True (per-example gradients through "
                             "batch norm in train mode are not defined)")

    def plan(self, epoch, ctx):
        names = self.candidates()
        batches = ctx.minibatches(self.minibatches, epoch)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.statistic == "eb-criterion":
                snr = eb_criterion(self.model, names, batches)
            else:
                mean, var, _ = per_example_gradient_moments(self.model, names, batches,
                                                            self.chunk_size)
                snr = gradient_snr(mean, var)
        finally:
            self.model.train(was_training)
        default = 0.95 if self.statistic == "eb-criterion" else 1 / self.config.batch_size
        threshold = self.threshold if self.threshold is not None else default
        self.last_snr = snr
        return self.epoch_plan([n for n in names if snr[n] >= threshold])


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table.

    Attributes:
        name: the short name used everywhere (CLI, CSV, plots).
        make: blocks -> a fresh `Method` (blocks may be None for methods that need none).
        needs_blocks: whether the method is undefined without a block mapping.
    """

    name: str
    make: Callable[[BlockMap | None], Method]
    needs_blocks: bool = False


# The one method table. Every list of method names (the CLI's, the report's column
# order, the bench's single-run methods) derives from it and from the architectures'
# blocks; the single-block methods (`first`, ...) come from the blocks themselves.
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("all", lambda blocks: Surgical(ALL, blocks)),
    MethodSpec("none", NoTuning),
    MethodSpec("lp-ft", LinearProbeThenFinetune, needs_blocks=True),
    MethodSpec("gradual-first-last", lambda blocks: GradualUnfreezing("first-last", blocks),
               needs_blocks=True),
    MethodSpec("gradual-last-first", lambda blocks: GradualUnfreezing("last-first", blocks),
               needs_blocks=True),
    MethodSpec("l1sp", L1SP),
    MethodSpec("auto-rgn", AutoRGN),
    MethodSpec("auto-snr", AutoSNR),
)}
GENERIC_METHODS = tuple(METHODS)  # one run per (lr, seed), whatever the architecture


def method_names(blocks: BlockMap) -> list[str]:
    """Every method for an architecture: its single blocks, then the generic methods."""
    return [*blocks, *GENERIC_METHODS]


def method_order(block_names: Sequence[str]) -> tuple[str, ...]:
    """Display order of method names: the given blocks (forward order), then the table's."""
    return (*block_names, *GENERIC_METHODS)


def get_method(name: str, blocks: BlockMap | None = None) -> Method:
    """A fresh method object by short name (see the module docstring)."""
    if blocks is not None and name in blocks:
        return Surgical(name, blocks)
    if name not in METHODS:
        known = method_names(blocks) if blocks is not None else list(GENERIC_METHODS)
        # fit(model, ..., "first", config) without blocks: the block names are not known here
        hint = ("; a block's name needs its mapping: blocks=blocks_for(arch), or your own "
                "{option: module-name prefixes}" if blocks is None else "")
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(known)}{hint}")
    spec = METHODS[name]
    if spec.needs_blocks and not blocks:
        raise ConfigError(f"method {name!r} needs a block mapping (blocks=...)")
    return spec.make(blocks)
