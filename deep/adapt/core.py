"""Online unsupervised adaptation restricted to blocks: MEMO and TENT.

Both methods see the target test stream once, in order, without labels, and
predict each image as it comes:

- MEMO (Zhang et al. 2022, `zhangmarvin/memo`): for each image, B augmented copies
  (`deep.augment_memo`), loss = entropy of the marginal prediction (the mean of the
  softmax over the copies), `steps` SGD steps, then the image itself is predicted.
- TENT (Wang et al. 2021, `DequanWang/tent`): for each batch, the mean entropy of the
  predictions is minimised over the affine parameters of the normalisation layers,
  with batch statistics in the forward pass; the batch's predictions are those of
  the forward that computes the loss (before the step), as in TENT's code. Batch
  statistics are a BatchNorm notion: GroupNorm (resnet26-gn) and LayerNorm normalise
  each image with its own statistics anyway, so there TENT minimises the entropy over
  their affine parameters only, and `batch_stats` changes nothing.

Surgical restriction: only the parameters of the named blocks (`deep.blocks`) are
updated; for TENT, only the normalisation affine parameters inside them, and only
their BatchNorm layers use batch statistics (the other layers keep the source
running statistics; `tent_batch_stats="all"` gives TENT's own choice, batch
statistics everywhere). No buffer is ever written: BatchNorm running statistics
stay bitwise those of the source model.

Online: updates carry over from one image (batch) to the next. Episodic: the
adapted parameters and the optimizer state are restored after each image (MEMO's
own code) or batch.

`METHODS` is the one table of methods: name -> `AdaptMethod` (config dataclass, what it
adapts, adapter maker, ...). The protocol's tables, the command line's flags and the
runner all read it; a method is added by adding a row.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import ALL, matches, tuned_parameter_names
from ..errors import (ConfigError, check_between, check_choice, check_int, check_nonnegative,
                      check_positive)
from ..models.staged import guard_channels_last, plain_strided_calls

NONE = "none"               # the block option "no adaptation": the source model as is
BN_EVAL = -1                # MEMO's prior strength meaning "running statistics only"
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.modules.instancenorm._InstanceNorm)
BATCH_STATS = ("blocks", "all")   # TentConfig.batch_stats


# --- losses ------------------------------------------------------------------------

def marginal_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMO's loss for the logits (B, classes) of B copies of one image.

    Returns (entropy of the marginal p̄ = mean_b softmax(logits_b), log p̄). log p̄ is
    computed in log space, logsumexp_b log_softmax(logits_b) - log B, and clamped at
    the smallest float so that a zero probability contributes 0 * log 0 = 0, not NaN.
    """
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ConfigError(f"expected logits of shape (copies, classes), got {tuple(logits.shape)}")
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    avg_log_probs = log_probs.logsumexp(dim=0) - math.log(logits.shape[0])
    avg_log_probs = avg_log_probs.clamp(min=torch.finfo(avg_log_probs.dtype).min)
    return -(avg_log_probs * avg_log_probs.exp()).sum(dim=-1), avg_log_probs


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax (TENT's loss before the batch mean)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


# --- which parameters ----------------------------------------------------------------

def parse_blocks(option: str) -> list[str]:
    """"first+second" -> ["first", "second"]; "none" -> []."""
    parts = [p.strip() for p in option.split("+")]
    if not option.strip() or any(not p for p in parts):
        raise ConfigError(f"expected a block option like 'first' or 'first+second', got {option!r}")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise ConfigError(f"block(s) {repeated} repeated in {option!r}: name each block once")
    if NONE in parts:
        if len(parts) > 1:
            raise ConfigError(f"'none' cannot be combined with other blocks: {option!r}")
        return []
    if ALL in parts and len(parts) > 1:
        raise ConfigError(f"'all' already holds every block: give it alone, not {option!r}")
    return parts


def canonical_blocks(option: str, order: Sequence[str]) -> str:
    """The one spelling of a block option, its parts in the architecture's block order
    (`order`, e.g. first, second, third, last): "second + first" -> "first+second", so
    that one stream is one row and one column of the table whatever the spelling."""
    rank = {block: i for i, block in enumerate(order)}
    parts = parse_blocks(option)
    return "+".join(sorted(parts, key=lambda p: rank.get(p, len(rank)))) or NONE


def norm_modules(model: nn.Module, prefixes: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """Normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) whose name
    lies under one of `prefixes` (None: all of them)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORM_TYPES)
            and (prefixes is None or any(matches(name, p) for p in prefixes))]


def block_prefixes_of(options: list[str], blocks: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Module-name prefixes of the options (None: every module, for 'all')."""
    if ALL in options:
        return None
    return [p for o in options for p in blocks[o]]


def adapted_parameter_names(model: nn.Module, method: str, option: str,
                            blocks: Mapping[str, Sequence[str]]) -> list[str]:
    """The parameters `method` updates for block option `option` (e.g. "first+second").

    MEMO: every parameter of the blocks. TENT: the affine weight and bias of the
    normalisation layers inside them. "none": nothing. Raises ConfigError for an
    unknown method or block, or a TENT block without normalisation parameters.
    """
    spec = method_spec(method)
    options = parse_blocks(option)
    if not options:
        return []
    names = tuned_parameter_names(model, options, blocks)  # checks the options
    if len(options) > 1:  # each part adapts something (TENT: `last` holds no norm layer)
        for part in options:
            try:
                spec.parameters(model, part, tuned_parameter_names(model, [part], blocks),
                                block_prefixes_of([part], blocks))
            except ConfigError as err:
                raise ConfigError(f"in {option!r}: {err}") from None
    return spec.parameters(model, option, names, block_prefixes_of(options, blocks))


def _every_parameter(model: nn.Module, option: str, names: list[str],
                     prefixes: Sequence[str] | None) -> list[str]:
    """MEMO's choice: every parameter of the blocks."""
    return names


def _norm_affine_parameters(model: nn.Module, option: str, names: list[str],
                            prefixes: Sequence[str] | None) -> list[str]:
    """TENT's choice: the affine parameters of the normalisation layers in the blocks."""
    norms = {f"{name}.{p}" for name, m in norm_modules(model, prefixes)
             for p, _ in m.named_parameters(recurse=False)}
    chosen = [n for n in names if n in norms]
    if not chosen:
        raise ConfigError(f"block option {option!r} holds no normalisation layer with affine "
                         f"parameters; TENT adapts only those (try another block or MEMO)")
    return chosen


# --- BatchNorm forward variants (no buffer is written) ------------------------------

def _batch_stat_forward(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Normalise with the batch's own statistics; running statistics untouched."""
    return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)


def _prior_forward(module: nn.modules.batchnorm._BatchNorm, prior: float,
                   x: torch.Tensor) -> torch.Tensor:
    """MEMO's BN adaptation for BatchNorm networks: statistics = prior * running +
    (1 - prior) * the input batch's (unbiased variance, as BatchNorm's running update),
    treated as constants in the backward pass, as in MEMO's ImageNet code."""
    dims = [0, *range(2, x.ndim)]
    with torch.no_grad():
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=x.numel() // x.shape[1] > 1)
        mean = prior * module.running_mean + (1 - prior) * mean
        var = prior * module.running_var + (1 - prior) * var
    return F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)


@contextlib.contextmanager
def patched_batchnorm(modules: Iterable[nn.Module], forward) -> Iterator[None]:
    """Temporarily give each BatchNorm in `modules` the forward `forward(module, x)`."""
    patched = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in patched:
        m.forward = lambda x, m=m: forward(m, x)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# --- the adapters --------------------------------------------------------------------

@dataclass(frozen=True)
class MemoConfig:
    """MEMO's CIFAR-10 settings (script_c10.sh / test_adapt.py): 32 copies, one SGD
    step of lr 0.005 per image, no momentum or weight decay. `prior_strength` N >= 0
    turns on MEMO's BN adaptation (statistics N/(N+1) running + 1/(N+1) batch, in
    every BatchNorm layer, while adapting and predicting); -1: running statistics."""

    copies: int = field(default=32, metadata={"help": "MEMO: augmented copies per image"})
    lr: float = 0.005
    steps: int = 1
    prior_strength: float = field(default=BN_EVAL, metadata={
        "help": "MEMO: BN prior adaptation strength N (MEMO's ImageNet code: 16); -1 = off"})
    severity: float = 1.0

    def __post_init__(self):
        check_int("MEMO copies", self.copies)
        check_int("MEMO steps", self.steps)
        check_positive("MEMO lr", self.lr)      # finite: an lr of inf or nan is no lr
        if self.prior_strength != BN_EVAL:      # N/(N+1) of nan or inf: not a mixture
            check_nonnegative("MEMO prior_strength (or -1: off)", self.prior_strength)


@dataclass(frozen=True)
class TentConfig:
    """TENT's CIFAR-10-C settings (cifar10c.yaml / cfgs/tent.yaml): Adam, lr 1e-3,
    betas (0.9, 0.999), no weight decay, one step per batch of 200.
    batch_stats: "blocks" (BatchNorm layers inside the adapted blocks use batch
    statistics, the rest running ones) or "all" (every BatchNorm, as TENT)."""

    batch_size: int = field(default=200, metadata={"help": "TENT: images per batch"})
    lr: float = 1e-3
    beta: float = 0.9
    steps: int = 1
    batch_stats: str = field(default="blocks", metadata={
        "help": "TENT: BatchNorm layers that use batch statistics", "choices": BATCH_STATS})

    def __post_init__(self):
        check_int("TENT batch_size", self.batch_size)  # 200.0 from a TOML file, too
        if self.batch_size < 2:
            raise ConfigError(f"TENT needs batches of at least 2 images (batch statistics of one "
                             f"image are degenerate), got batch_size={self.batch_size}")
        check_int("TENT steps", self.steps)
        check_positive("TENT lr", self.lr)
        # Adam's first-moment decay (the second is TENT's 0.999): outside [0, 1) Adam refuses it
        check_between("TENT beta", self.beta, 0, 1, high_open=True)
        check_choice("batch_stats", self.batch_stats, BATCH_STATS)


class Adapter:
    """Adapts `model` in place to a stream; `predict(x)` returns the logits of a batch.

    Subclasses define `_predict`. The model stays in eval mode throughout (dropout
    off, BatchNorm on its running statistics except where a method patches it).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], episodic: bool):
        self.model, self.names, self.episodic = model.eval(), list(names), episodic
        params = dict(model.named_parameters())
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise ConfigError(f"no such parameter(s) in the model: {unknown[:5]}")
        chosen = set(self.names)
        for name, p in params.items():
            p.requires_grad_(name in chosen)
        self.params = [params[n] for n in self.names]
        self.optimizer = self._optimizer() if self.params else None
        self._initial = self._state()

    def _optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def _state(self):
        opt = self.optimizer.state_dict() if self.optimizer else None
        return [p.detach().clone() for p in self.params], _clone(opt)

    def reset(self) -> None:
        """Back to the source parameters and a fresh optimizer state."""
        params, opt = self._initial
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
        if self.optimizer:
            self.optimizer.load_state_dict(_clone(opt))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._predict(x)
        if self.episodic and self.params:
            self.reset()
        return logits

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _clone(state):
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


def check_bn_prior(model: nn.Module, config: MemoConfig) -> None:
    """MEMO's BN prior mixes BatchNorm running statistics with the input's: on a model
    without BatchNorm (resnet26-gn) it would silently change nothing, so it is an error."""
    if config.prior_strength != BN_EVAL and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(f"prior_strength {config.prior_strength:g} adapts BatchNorm statistics, "
                          f"but the model has no BatchNorm layer (GroupNorm already normalises each "
                          f"image with its own statistics): use prior_strength -1 (off)")


class MemoAdapter(Adapter):
    """MEMO on one image at a time: `predict` takes a batch of exactly one image."""

    def __init__(self, model: nn.Module, names: Sequence[str], config: MemoConfig, augment,
                 generator: torch.Generator, episodic: bool = False):
        self.config, self.augment, self.generator = config, augment, generator
        super().__init__(model, names, episodic)

    def _optimizer(self):
        return torch.optim.SGD(self.params, lr=self.config.lr)

    def _bn(self):
        if self.config.prior_strength == BN_EVAL:
            return contextlib.nullcontext()
        prior = self.config.prior_strength / (self.config.prior_strength + 1)
        return patched_batchnorm(self.model.modules(),
                                 lambda m, x: _prior_forward(m, prior, x))

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[0] != 1:
            raise ConfigError(f"MEMO adapts to one image at a time: expected a batch of shape "
                             f"(1, C, H, W), got {tuple(x.shape)}")
        if not self.params:  # "none": the source model, running statistics
            with torch.no_grad():
                return self.model(x)
        with self._bn():
            for _ in range(self.config.steps):
                copies = self.augment(x[0], self.config.copies, self.generator)
                with torch.enable_grad():
                    with plain_strided_calls(self.model):  # F.conv2d too (deep.models.staged)
                        logits = self.model(copies)
                    loss, _ = marginal_entropy(logits)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                self.optimizer.step()
            with torch.no_grad():
                return self.model(x)


class TentAdapter(Adapter):
    """TENT on batches of at least two images."""

    def __init__(self, model: nn.Module, names: Sequence[str], config: TentConfig,
                 prefixes: Sequence[str] | None, episodic: bool = False):
        self.config = config
        super().__init__(model, names, episodic)
        scope = None if config.batch_stats == "all" else prefixes
        self.batch_stat_layers = [] if not names else [m for _, m in norm_modules(model, scope)]

    def _optimizer(self):
        return torch.optim.Adam(self.params, lr=self.config.lr, betas=(self.config.beta, 0.999))

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[0] < 2:
            raise ConfigError(f"TENT needs a batch of at least 2 images (batch statistics), got "
                             f"shape {tuple(x.shape)}")
        if not self.params:
            with torch.no_grad():
                return self.model(x)
        with patched_batchnorm(self.batch_stat_layers, _batch_stat_forward):
            for _ in range(self.config.steps):
                with torch.enable_grad():
                    with plain_strided_calls(self.model):  # F.conv2d too (deep.models.staged)
                        logits = self.model(x)
                    loss = softmax_entropy(logits).mean(0)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                self.optimizer.step()
        # TENT's prediction: the last forward's, computed before its own step.
        return logits.detach()


def _make_memo(model, names, config, prefixes, episodic, augment, generator) -> MemoAdapter:
    if names and (augment is None or generator is None):
        raise ConfigError("MEMO needs an augment function and a torch.Generator")
    check_bn_prior(model, config)
    return MemoAdapter(model, names, config, augment, generator, episodic)


def _make_tent(model, names, config, prefixes, episodic, augment, generator) -> TentAdapter:
    return TentAdapter(model, names, config, prefixes, episodic)


# --- the method table ----------------------------------------------------------------

def _no_check(model: nn.Module, config) -> None:
    return None


@dataclass(frozen=True)
class AdaptMethod:
    """One row of the method table (as `deep.methods.MethodSpec` for fine-tuning).

    Attributes:
        name: the short name everywhere: `--method`, the protocol's [name] table, the
            CSV's `method` column.
        label: how help and messages write it ("MEMO").
        config: its settings, a frozen dataclass with a default for every field and at
            least `lr` (the CSV's `lr` column; `lr` may be a list in the protocol): the
            protocol's [name] table holds its fields.
        flags: the config fields that get a command-line flag, generated by
            `deep.flags.add_flags` from the field (name, type, help and choices in its
            metadata, default): `copies` -> `--copies`. Two methods may not flag the same
            field name.
        parameters: (model, option, names of the block option's parameters, module
            prefixes of its blocks or None for all) -> the names it adapts.
        make: (model, names, config, prefixes, episodic, augment, generator) -> Adapter.
        batch_size: config -> images per prediction (1: one image at a time; more: a
            batch, which a stream of one image cannot give).
        augments: it takes MEMO's augmented copies (`deep.augment_memo`) at its config's
            `severity`, drawn from a generator seeded by (seed, shift).
        check_source: (source model, config) -> None, raising ConfigError before any
            stream runs when the settings do not suit the model.
        quick_images, quick_blocks: what `python -m deep adapt --quick` runs.
    """

    name: str
    label: str
    config: type
    parameters: Callable[[nn.Module, str, list[str], Sequence[str] | None], list[str]]
    make: Callable[..., Adapter]
    batch_size: Callable[[Any], int]
    flags: tuple[str, ...] = ()
    augments: bool = False
    check_source: Callable[[nn.Module, Any], None] = _no_check
    quick_images: int = 200
    quick_blocks: tuple[str, ...] = ("none", "first", "all")


# The one method table: every list of adaptation methods (the protocol's tables, the
# CLI's flags and help, the runner's batches) derives from it.
METHODS: dict[str, AdaptMethod] = {spec.name: spec for spec in (
    AdaptMethod("memo", "MEMO", MemoConfig, _every_parameter, _make_memo,
                batch_size=lambda config: 1, flags=("copies", "prior_strength"), augments=True,
                check_source=check_bn_prior, quick_images=100,   # ~0.1 s an image: --quick ~1 min
                quick_blocks=("none", "first", "last")),
    # TENT's quick stream: three batches of 200, so updates show.
    AdaptMethod("tent", "TENT", TentConfig, _norm_affine_parameters, _make_tent,
                batch_size=lambda config: config.batch_size, flags=("batch_size", "batch_stats"),
                quick_images=600, quick_blocks=("none", "first", "all")),
)}


def method_spec(method: str) -> AdaptMethod:
    """The table's row for `method`; ConfigError naming the known ones otherwise."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method]


def make_adapter(model: nn.Module, method: str, option: str, blocks: Mapping[str, Sequence[str]],
                 config, episodic: bool = False, augment=None,
                 generator: torch.Generator | None = None) -> Adapter:
    """An adapter of `method` restricted to block option `option` ("none" adapts nothing)."""
    spec = method_spec(method)
    names = adapted_parameter_names(model, method, option, blocks)
    if not isinstance(config, spec.config):
        raise ConfigError(f"{spec.label} needs a {spec.config.__name__}, "
                         f"got {type(config).__name__}")
    options = parse_blocks(option)
    prefixes = block_prefixes_of(options, blocks) if options else []
    guard_channels_last(model)  # a oneDNN AVX2 bug (deep.models.staged): any layout given
    return spec.make(model, names, config, prefixes, episodic, augment, generator)


def stream_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive index batches of `order`; a trailing batch of one image joins the
    batch before it (TENT cannot normalise one image with its own statistics) unless
    batches are single images by design (MEMO)."""
    chunks = list(order.split(batch_size))
    if batch_size > 1 and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def run_stream(adapter: Adapter, images: torch.Tensor, labels: torch.Tensor,
               order: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Feed images[order] to the adapter in batches; return the correctness (bool)
    of each prediction, in stream order."""
    correct = []
    with torch.no_grad():
        for idx in stream_batches(order, batch_size):
            logits = adapter.predict(images[idx])
            correct.append(logits.argmax(1) == labels[idx])
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
