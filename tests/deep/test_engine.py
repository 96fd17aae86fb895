"""The training engine: block registry, freezing, prefix cache, folding, methods."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deep.blocks import (ALL, block_options, block_prefixes, blocks_by_arch, blocks_for, set_trainable,
                         tuned_parameter_names)
from deep.checkpoints import load_model
from deep.data import get_benchmark
from deep.data.base import TensorSplit
from deep.errors import ConfigError
from deep.methods import (AutoRGN, AutoSNR, EpochPlan, Method, get_method, gradient_snr, method_names,
                          L1SP, per_example_gradient_moments, relative_gradient_norms,
                          rgn_multipliers, unfreeze_epochs)
from deep.models import StagedModel, build_model
from deep.train import PrefixCache, TrainConfig, evaluate, fit, folded_view

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "resnet26-w4"
BLOCKS4 = blocks_for(ARCH)
BUILT_IN = ("resnet26", "resnet26-w8", "resnet26-w4", "resnet50")


@pytest.fixture(scope="module")
def task():
    return get_benchmark("synthetic").load_task(None, "noise", n_target=96, val_per_class=10,
                                                test_per_class=20, seed=0)


@pytest.fixture
def model(synthetic_checkpoint):
    return load_model(synthetic_checkpoint, ARCH, 4, 3)


# --- blocks -----------------------------------------------------------------------

def test_registry_options_and_prefixes():
    assert block_options("resnet26") == ("first", "second", "third", "last")
    assert block_options("resnet50") == ("first", "second", "third", "fourth", "last")
    assert block_prefixes("resnet50", "first") == ("conv1", "bn1", "layer1")
    assert block_prefixes("resnet26-w8", "last") == ("fc",)
    with pytest.raises(ValueError, match="unknown block 'fourth' for resnet26.*first, second"):
        block_prefixes("resnet26", "fourth")
    # every option of every arch matches parameters, and the options partition them
    # (the built-in ResNets; the reference architectures' blocks leave some parameters out)
    for arch, blocks in blocks_by_arch().items():
        if arch not in BUILT_IN:
            continue
        m = build_model(arch, 3)
        owned = [n for o in blocks for n in tuned_parameter_names(m, o, blocks)]
        assert sorted(owned) == sorted(n for n, _ in m.named_parameters())


def test_set_trainable_returns_the_number_of_entries_it_tunes():
    """Exactly the named parameters require grad, and the count is their entries, not
    the model's (here the head: 4 classes x its input width, plus 4 biases)."""
    model = build_model(ARCH, 4, 3)
    head = tuned_parameter_names(model, "last", BLOCKS4)
    count = set_trainable(model, head)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == set(head)
    weight = next(p for n, p in params.items() if n in head and p.ndim == 2)
    assert count == 4 * weight.shape[1] + 4 < sum(p.numel() for p in params.values())


def test_several_options_name_their_union_in_the_models_parameter_order():
    """["last", "first"] names the head and the first block in the order the model lists
    its parameters (the docstring's promise), not head first; "all" among the options
    names every parameter."""
    model = build_model(ARCH, 4, 3)
    names = [n for n, _ in model.named_parameters()]
    top = {"conv1", "bn1", "layer1", "fc"}  # resnet26's `first` (conv1, bn1, layer1), `last`
    by_hand = [n for n in names if n.split(".")[0] in top]
    assert by_hand[0] == "conv1.weight" and by_hand[-1] == "fc.bias"
    assert tuned_parameter_names(model, ["last", "first"], BLOCKS4) == by_hand
    assert tuned_parameter_names(model, ["last", ALL], BLOCKS4) == names


class TinyNet(nn.Module):
    """A user's own model: not staged, its own names."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.features(x))


def test_user_mapping_on_any_module(task):
    net = TinyNet()
    blocks = {"stem": ("features.0",), "head": ("head",)}
    assert tuned_parameter_names(net, "head", blocks) == ["head.weight", "head.bias"]
    assert len(tuned_parameter_names(net, "all", blocks)) == 4
    with pytest.raises(ValueError, match="unknown block 'middle'; known: stem, head, all"):
        tuned_parameter_names(net, "middle", blocks)
    with pytest.raises(ValueError, match="prefix 'classifier' matches no parameter.*features, head"):
        tuned_parameter_names(net, "head", {"head": ("classifier",)})
    # a bare string would be read as its letters: "head" -> prefixes h, e, a, d
    with pytest.raises(ValueError, match=r"block 'head' needs a tuple of module-name prefixes, "
                                         r"got 'head' \(one prefix is a tuple of one: \('head',\)\)"):
        tuned_parameter_names(net, "head", {"head": "head"})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = fit(net, task.train, task.val, task.test, "stem", TrainConfig(lr=1e-2, epochs=2), blocks)
    after = net.state_dict()
    assert result.status == "ok" and result.tuned_params == 4 * 3 * 9 + 4
    assert torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(after["features.0.weight"], before["features.0.weight"])


# --- freezing, caching, folding ---------------------------------------------------

@pytest.mark.parametrize("method", ["first", "second", "third", "last", "lp-ft",
                                    "gradual-last-first", "auto-snr"])
def test_frozen_parameters_bitwise_unchanged(model, task, method):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, task.train, task.val, task.test, method,
                 TrainConfig(lr=1e-2, epochs=2), BLOCKS4)
    tuned = {n for n in before if any(n == p or n.startswith(p + ".")
                                      for o in ([method] if method in BLOCKS4 else BLOCKS4)
                                      for p in BLOCKS4[o])}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert result.status == "ok"
    # buffers (BN running statistics) never change with BN frozen
    assert all(".running_" not in k and "num_batches" not in k for k in changed)
    if method in BLOCKS4:
        assert changed and changed <= tuned
        assert result.tuned_params == sum(after[k].numel() for k in tuned if k in dict(model.named_parameters()))
    if method == "lp-ft":  # 2 epochs: epoch 1 probes, epoch 2 tunes everything
        total = sum(p.numel() for p in model.parameters())
        assert [h["tuned"] for h in result.history] == [4 * 16 + 4, total]
        assert result.tuned_params == total


@pytest.mark.parametrize("use_cache", [True, False])
def test_none_evaluates_the_source_model_once_and_changes_nothing(synthetic_checkpoint, task,
                                                                  use_cache):
    """`none` (the "no tuning" row): no training step, one evaluation, every weight
    bitwise unchanged, and the accuracies of a hand evaluation of the source model."""
    model = load_model(synthetic_checkpoint, ARCH, 4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, task.train, task.val, task.test, "none",
                 TrainConfig(lr=1e-2, epochs=3, use_cache=use_cache), BLOCKS4)
    assert (result.status, result.best_epoch, len(result.history)) == ("ok", 1, 1)
    assert result.losses == [] and result.tuned_params == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    model.eval()
    with torch.no_grad():
        for split, metrics in ((task.val, result.val), (task.test, result.test)):
            preds = torch.cat([model(x).argmax(1) for x, _, _ in split.batches(50)])
            assert metrics.acc == pytest.approx((preds == split.labels).float().mean().item())
    assert 0.3 < result.test.acc < 0.95  # a shifted target: neither chance nor solved


@pytest.mark.parametrize("method", ["second", "third", "last", "gradual-last-first", "lp-ft"])
def test_cached_prefix_matches_recomputing(synthetic_checkpoint, task, method):
    """Same losses with and without the cache (folding and channels-last off on both sides,
    so the cache is the only difference)."""
    losses, params = [], []
    for use_cache in (True, False):
        m = load_model(synthetic_checkpoint, ARCH, 4, 3)
        config = TrainConfig(lr=1e-2, epochs=3, use_cache=use_cache, fold_bn=False,
                             channels_last=False)
        result = fit(m, task.train, task.val, task.test, method, config, BLOCKS4)
        losses.append(torch.tensor(result.losses))
        params.append(torch.cat([p.flatten() for p in m.parameters()]))
        if use_cache:  # the first epoch of each starts after stage 0
            assert result.history[0]["start_stage"] > 0
    assert len(losses[0]) == len(losses[1]) == 3 * 2
    assert torch.allclose(losses[0], losses[1], atol=1e-5, rtol=0)
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_folded_view_same_function_and_gradients(model, task):
    """BN folded into the convs: same outputs and the same gradients for every parameter."""
    x, y, _ = next(task.train.batches(32))
    model.eval()
    view = folded_view(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in view.modules()) == 27  # held by the folds
    grads = []
    for net in (model, view):
        model.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-5 * g.abs().max()), name
    with torch.no_grad():
        assert torch.allclose(model(x), view(x), atol=1e-5)


def _conv_and_frozen_bn(conv_bias: bool):
    """A 3x3 conv and an eval-mode BN with non-trivial affine parameters and statistics."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def test_a_fold_is_its_conv_then_batch_norm_also_for_a_conv_with_a_bias():
    """The fold is bn(conv(x)) for any conv: a conv bias b passes through BN as b * s."""
    from deep.prefix_cache import FoldedConvBN
    conv, bn = _conv_and_frozen_bn(conv_bias=True)
    x = torch.randn(2, 3, 8, 8)
    shape = (1, -1, 1, 1)
    with torch.no_grad():
        h = F.conv2d(x, conv.weight, conv.bias, padding=1)
        normalised = (h - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape)
                                                                    + bn.eps)
        expected = normalised * bn.weight.view(shape) + bn.bias.view(shape)
        assert torch.allclose(FoldedConvBN(conv, bn)(x), expected, atol=1e-5)


def test_a_fold_whose_batch_norm_bias_alone_is_tuned_passes_that_bias_its_gradient():
    """Only beta requires grad: the fold must not precompute itself as frozen. The output is
    linear in beta with slope 1 at every position, so d(sum)/d(beta_c) = n * h * w."""
    from deep.prefix_cache import FoldedConvBN
    conv, bn = _conv_and_frozen_bn(conv_bias=False)
    conv.weight.requires_grad_(False)
    bn.weight.requires_grad_(False)
    fold = FoldedConvBN(conv, bn)
    fold.fix_if_frozen()
    fold(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.allclose(bn.bias.grad, torch.full((5,), 2 * 8 * 8.0))


def test_a_fold_whose_conv_bias_alone_is_tuned_passes_that_bias_its_gradient():
    """Only the conv's bias b requires grad (a user's conv with a bias before its BN): the
    fold must not precompute itself as frozen. bn(conv(x) + b) is linear in b_c with slope
    s_c = gamma_c / sqrt(var_c + eps) at every position: d(sum)/d(b_c) = n * h * w * s_c."""
    from deep.prefix_cache import FoldedConvBN
    conv, bn = _conv_and_frozen_bn(conv_bias=True)
    for p in (conv.weight, bn.weight, bn.bias):
        p.requires_grad_(False)
    fold = FoldedConvBN(conv, bn)
    fold.fix_if_frozen()
    fold(torch.randn(2, 3, 8, 8)).sum().backward()
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert conv.bias.grad is not None
    assert torch.allclose(conv.bias.grad, 2 * 8 * 8 * s)


@pytest.mark.parametrize("method", ["second", "gradual-first-last"])
def test_fast_path_reaches_same_accuracy(synthetic_checkpoint, task, method):
    """Cache + folding + channels-last against the plain loop, epoch by epoch; and the
    reported test accuracy is the plain model's at the end (no stale folded weights)."""
    results, models = [], []
    for fast in (True, False):
        m = load_model(synthetic_checkpoint, ARCH, 4, 3)
        results.append(fit(m, task.train, task.val, task.test, method,
                           TrainConfig(lr=1e-3, epochs=4, use_cache=fast), BLOCKS4))
        models.append(m)
    fast, plain = results
    assert [h["val_acc"] for h in fast.history] == [h["val_acc"] for h in plain.history]
    assert len({h["val_acc"] for h in plain.history}) > 1  # validation moved: a real check
    assert fast.best_epoch == plain.best_epoch
    assert fast.test.acc == pytest.approx(plain.test.acc, abs=1.5 / len(task.test))
    assert np.allclose(fast.losses, plain.losses, atol=1e-4)
    assert evaluate(models[0], task.test).acc == pytest.approx(fast.test.acc, abs=1.5 / len(task.test))


def test_cache_shared_across_runs_and_checked(model, task):
    splits = {"train": task.train, "val": task.val, "test": task.test}
    cache = PrefixCache(model, splits)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    r1 = fit(model, task.train, task.val, task.test, "last", TrainConfig(lr=1e-2, epochs=2), BLOCKS4, cache)
    filled = cache.seconds
    model.load_state_dict(base)
    r2 = fit(model, task.train, task.val, task.test, "third", TrainConfig(lr=1e-2, epochs=2), BLOCKS4, cache)
    assert cache.seconds == filled  # stage inputs were all stored by the first run
    assert (r1.start_stage, r2.start_stage) == (3, 2)
    # without reloading the pretrained weights the cache no longer describes the model
    with pytest.raises(ValueError, match="other weights"):
        fit(model, task.train, task.val, task.test, "last", TrainConfig(lr=1e-2, epochs=1), BLOCKS4, cache)


def test_a_shared_cache_refuses_another_split_and_another_model_object():
    """A PrefixCache holds stage inputs of the splits and the model it was built on: a run
    with another validation split (or another model) would read the wrong activations."""
    torch.manual_seed(0)
    model = build_model(ARCH, 4, 3)
    train, val = random_splits()
    other = TensorSplit(val.images.flip(0), val.labels)
    cache = PrefixCache(model, {"train": train, "val": val})
    config = TrainConfig(lr=1e-2, epochs=1)
    with pytest.raises(ConfigError, match="the prefix cache was built for another val split"):
        fit(model, train, other, None, "last", config, BLOCKS4, cache)
    with pytest.raises(ConfigError, match="the prefix cache was built for another model object"):
        fit(build_model(ARCH, 4, 3), train, val, None, "last", config, BLOCKS4, cache)


def test_a_cache_refuses_a_model_whose_batch_norm_statistics_alone_changed(model, task):
    """The frozen prefix's output depends on its batch norms' running statistics (a run
    with freeze_bn=False moves them): a change of those alone makes the cache stale."""
    cache = PrefixCache(model, {"train": task.train, "val": task.val, "test": task.test})
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, task.train, task.val, task.test, "last", TrainConfig(lr=1e-2, epochs=1), BLOCKS4, cache)
    model.load_state_dict(base)
    fit(model, task.train, task.val, task.test, "last", TrainConfig(lr=1e-2, epochs=1), BLOCKS4, cache)
    model.load_state_dict(base)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    with torch.no_grad():
        norms[0].running_mean.add_(0.5)  # weights and biases untouched
    with pytest.raises(ValueError, match="other weights"):
        fit(model, task.train, task.val, task.test, "last", TrainConfig(lr=1e-2, epochs=1), BLOCKS4, cache)


@pytest.mark.parametrize("channels_last", [True, False])
def test_cache_stores_what_a_plain_pass_computes(model, task, channels_last):
    """Each stored stage input equals the stage outputs concatenated and laid out in the
    stage's memory format (values and strides), batch boundaries included."""
    cache = PrefixCache(model, {"train": task.train}, batch_size=7, channels_last=channels_last)
    cache.inputs("train", 3)
    x = torch.cat([xb for xb, _, _ in task.train.batches(7)])
    with torch.no_grad():
        for s in (1, 2, 3):
            x = cache.stages.run(x, s - 1, s)
            expected = cache.stages.format_input(x, s)
            stored = cache._acts[("train", s)]
            assert stored.stride() == expected.stride() and torch.equal(stored, expected), s


@pytest.mark.parametrize("channels_last, expected", [
    (None, [True] * 4),               # None: every stage channels-last on the CPU
    ("first", [True, False, False, False]),
    (False, [False] * 4)])
def test_cache_lays_out_the_stages_its_channels_last_setting_names(channels_last, expected):
    """Which stage inputs the cache keeps channels-last (PrefixCache's docstring, TrainConfig):
    stage 0 is the images, 1-3 the ResNet's later stages."""
    model = build_model(ARCH, 4, 3).eval()
    cache = PrefixCache(model, {"train": _labelled(8, 4)}, channels_last=channels_last)
    assert len(cache.stages) == 4
    assert [cache.stages.formats.get(s) == torch.channels_last for s in range(4)] == expected


def test_no_tuned_parameter_means_no_stage_runs_with_gradients():
    """Stages.first_stage: the earliest stage owning a tuned parameter, len(stages) when
    nothing is tuned (`none`): then every stage is a frozen prefix, none runs with grad.
    resnet26's stages: (conv1, bn1, layer1), layer2, layer3, fc."""
    from deep.models.staged import stages_of
    stages = stages_of(build_model(ARCH, 4, 3))
    assert stages.first_stage([]) == len(stages) == 4
    assert stages.first_stage(["fc.bias", "layer2.0.conv1.weight"]) == 1
    assert stages.first_stage(["conv1.weight", "fc.weight"]) == 0


def test_cache_stores_every_image_of_a_split_that_is_not_held_in_memory():
    """A split that only streams its batches (images from files: not a TensorSplit) has its
    images stored by the cache itself, all n of them, charged n * C * H * W * 4 bytes."""
    from deep.data.base import Split
    images = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    class Streamed(Split):
        labels, groups = torch.arange(10) % 4, None

        def batches(self, batch_size, shuffle=False, generator=None):
            for i in range(0, 10, batch_size):
                yield images[i:i + batch_size], self.labels[i:i + batch_size], None

    model = build_model(ARCH, 4, 3).eval()
    cache = PrefixCache(model, {"train": Streamed()}, batch_size=4, channels_last=False)
    stored, stage = cache.inputs("train", 0)
    assert stage == 0 and torch.equal(stored, images)
    assert cache.used == 10 * 3 * 8 * 8 * 4


def test_cache_fill_keeps_nothing_it_cannot_store(model, task):
    """With no room at all, filling stops after the first batch (it used to run every
    batch through every stage and hold all of it before checking the budget)."""
    cache = PrefixCache(model, {"train": task.train}, budget_mb=0, batch_size=8)
    runs = []
    run = cache.stages.run
    cache.stages.run = lambda x, start, stop=None: runs.append(len(x)) or run(x, start, stop)
    stored, stage = cache.inputs("train", 3)
    assert stage == 0 and cache.used == 0 and sum(runs) == 3 * 8  # one batch, 3 stages
    assert {("train", s) for s in (1, 2, 3)} <= cache._too_big


def test_cache_budget_falls_back_to_recomputing(model, task):
    splits = {"train": task.train, "val": task.val, "test": task.test}
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tiny = PrefixCache(model, splits, budget_mb=0.05)   # only the small late stages fit
    r_tiny = fit(model, task.train, task.val, task.test, "second",
                 TrainConfig(lr=1e-2, epochs=2), BLOCKS4, tiny)
    assert ("train", 1) not in tiny._acts and tiny.used <= tiny.budget
    model.load_state_dict(base)
    big = PrefixCache(model, splits)
    r_big = fit(model, task.train, task.val, task.test, "second",
                TrainConfig(lr=1e-2, epochs=2), BLOCKS4, big)
    assert ("train", 1) in big._acts
    assert np.allclose(r_tiny.losses, r_big.losses, atol=1e-5)


def test_cache_budget_is_in_mib_and_charges_every_stage_it_stores(model, task):
    # Guards a budget read as MB (10**6 bytes) and a store not added to `used`.
    probe = PrefixCache(model, {"train": task.train}, fold_bn=False, channels_last=False)
    with torch.no_grad():
        h1 = probe.stages.run(task.train.images[:1], 0, 1)
    stage1 = h1.numel() * h1.element_size() * len(task.train)   # bytes of stage 1's inputs
    cache = PrefixCache(model, {"train": task.train}, budget_mb=1.01 * stage1 / 2**20,
                        fold_bn=False, channels_last=False)
    cache.inputs("train", 3)
    assert cache.budget == int(1.01 * stage1) and ("train", 1) in cache._acts
    stored = [t for (_, s), t in cache._acts.items() if s > 0]
    assert cache.used == sum(t.numel() * t.element_size() for t in stored) <= cache.budget


def test_a_later_fill_starts_from_the_latest_stored_stage_and_charges_only_new_ones(model, task):
    """Asking for stage 3 after stages 1 and 2 are stored computes from stage 2: stage 2
    is not stored (and charged to the budget) a second time."""
    cache = PrefixCache(model, {"train": task.train}, fold_bn=False, channels_last=False)
    cache.inputs("train", 2)
    kept = cache._acts[("train", 2)]
    cache.inputs("train", 3)
    assert cache.stored_stages("train") == [1, 2, 3] and cache._acts[("train", 2)] is kept
    stored = [t for (_, s), t in cache._acts.items() if s > 0]
    assert cache.used == sum(t.numel() * t.element_size() for t in stored)


def test_a_later_stage_is_filled_though_an_earlier_one_is_stored(model, task):
    """`inputs` gives the latest stage the budget allows: stage 1 stored first does not
    stop stage 3 from being filled and returned."""
    cache = PrefixCache(model, {"train": task.train}, fold_bn=False, channels_last=False)
    assert cache.inputs("train", 1)[1] == 1
    acts, stage = cache.inputs("train", 3)
    assert stage == 3 and acts is cache._acts[("train", 3)]


def test_cache_fills_in_eval_mode_and_leaves_a_training_model_in_training(model, task):
    # Guards a fill in the model's own (train) mode: batch statistics, running stats updated.
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = PrefixCache(model, {"train": task.train}, fold_bn=False, channels_last=False)
    acts, stage = cache.inputs("train", 1)
    assert stage == 1 and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        expected = cache.stages.run(task.train.images, 0, 1)
    assert torch.allclose(acts, expected, atol=1e-5, rtol=0)


class LastThenFirstThenLast(Method):
    """Epoch 1 caches the head's input from the pretrained body, epoch 2 moves the first
    block, epoch 3 tunes the head again on the moved body."""
    name = "last-first-last"

    def candidates(self):
        return self._names(ALL)

    def plan(self, epoch, ctx):
        return EpochPlan(self._names("first" if epoch == 2 else "last"))


def test_cache_is_not_read_past_a_block_tuned_in_an_earlier_epoch(model, task):
    # Guards a start stage taken from this epoch's plan: epoch 3 would read epoch 1's stale input.
    losses = []
    for use_cache in (True, False):
        config = TrainConfig(lr=1e-2, epochs=3, use_cache=use_cache, fold_bn=False,
                             channels_last=False)
        result = fit(copy.deepcopy(model), task.train, task.val, task.test,
                     LastThenFirstThenLast(BLOCKS4), config, BLOCKS4)
        losses.append(result.losses)
    assert np.allclose(losses[0], losses[1], atol=1e-5, rtol=0)


def test_test_accuracy_is_the_one_at_the_best_validation_epoch(synthetic_checkpoint, task):
    config = TrainConfig(lr=1e-2, epochs=4)
    full = fit(load_model(synthetic_checkpoint, ARCH, 4, 3), task.train, task.val, task.test,
               "first", config, BLOCKS4)
    vals = [h["val_acc"] for h in full.history]
    assert full.best_epoch == 1 + vals.index(max(vals))
    # training only up to the best epoch ends at the same model, hence the same test accuracy
    short = fit(load_model(synthetic_checkpoint, ARCH, 4, 3), task.train, task.val, task.test,
                "first", TrainConfig(lr=1e-2, epochs=full.best_epoch), BLOCKS4)
    assert short.best_epoch == full.best_epoch
    assert short.test.acc == full.test.acc


def scripted_validation(monkeypatch, scores):
    """Make `fit`'s validation return `scores` in turn (the test split is still measured),
    so that which epoch is best is chosen by the test, not by the data."""
    import deep.train as engine
    real, scores = engine.evaluate, iter(scores)

    def evaluate_scripted(model, split, *args, **kw):
        name = kw.get("name", args[3] if len(args) > 3 else None)
        return engine.Metrics(next(scores)) if name == "val" else real(model, split, *args, **kw)
    monkeypatch.setattr(engine, "evaluate", evaluate_scripted)


def random_splits(n_train=32, n_val=16):
    g = torch.Generator().manual_seed(0)
    def split(n):
        return TensorSplit(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 4)
    return split(n_train), split(n_val)


@pytest.mark.parametrize("epochs", [2, 4])
def test_lp_ft_best_at_the_probe_epoch_restores_the_body_tuned_only_later(monkeypatch, epochs):
    """Guards `_restore`: lp-ft probes the head for floor(E/2) epochs, then tunes the body.
    With epoch 1 best, the body goes back to its values before the fit, neither kept as the
    last epoch left it nor (E = 4: tuned in epochs 3 and 4) as epoch 3 left it, its values
    before the last epoch that tuned it."""
    scripted_validation(monkeypatch, [0.9] + [0.1] * (epochs - 1))   # epoch 1 is best
    torch.manual_seed(0)
    model = build_model(ARCH, 4, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, val = random_splits()
    result = fit(model, train, val, None, "lp-ft", TrainConfig(lr=1e-2, epochs=epochs, seed=0),
                 BLOCKS4)
    tuned = [h["tuned"] for h in result.history]
    probe = epochs // 2
    assert result.best_epoch == 1 and tuned[probe - 1] < tuned[probe] == tuned[-1]
    body = [n for n in before if not n.startswith("fc.")]
    moved = [n for n in body if not torch.equal(model.get_parameter(n), before[n])]
    assert len(body) > 2 and moved == []


def test_unfrozen_bn_statistics_are_restored_to_the_best_epochs(monkeypatch):
    """Guards `_snapshot` with freeze_bn=False: BN running statistics move while training,
    so the best epoch's are saved and restored. Best epoch 1 of 2 ends with exactly the
    buffers of a 1-epoch run from the same start and seed."""
    torch.manual_seed(0)
    source = build_model(ARCH, 4, 3)
    train, val = random_splits()
    config = dict(lr=1e-2, seed=0, freeze_bn=False)
    one = copy.deepcopy(source)
    fit(one, train, val, None, "all", TrainConfig(epochs=1, **config), BLOCKS4)
    scripted_validation(monkeypatch, [0.9, 0.1])
    two = copy.deepcopy(source)
    result = fit(two, train, val, None, "all", TrainConfig(epochs=2, **config), BLOCKS4)
    assert result.best_epoch == 1
    want = dict(one.named_buffers())   # epoch 1 moved them (else the check would be vacuous)
    assert any(not torch.equal(b, dict(source.named_buffers())[n]) for n, b in want.items())
    assert [n for n, b in two.named_buffers() if not torch.equal(b, want[n])] == []


def _linear_problem(n_train=8, seed=0):
    """A linear classifier on 12 inputs (3 x 2 x 2 images) and its train / val splits."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    def split(n):
        return TensorSplit(torch.randn(n, 3, 2, 2, generator=g), torch.arange(n) % 3)
    return net, split(n_train), split(6)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_is_added_to_the_gradient_of_the_first_step(optimizer):
    """One step on one batch, weight decay 0.5 (torch's L2 style: g + wd * theta), against
    the first step by hand: Adam's is lr * g / (|g| + 1e-8) (bias-corrected moments of one
    step), SGD's with Nesterov momentum 0.9 is lr * 1.9 g."""
    net, train, val = _linear_problem()
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = train.images, train.labels
    loss = F.cross_entropy(net(x), y)
    names = list(start)
    grads = torch.autograd.grad(loss, [net.get_parameter(n) for n in names])
    lr, wd = 0.1, 0.5
    want = {}
    for n, grad in zip(names, grads):
        g = grad + wd * start[n]
        step = g / (g.abs() + 1e-8) if optimizer == "adam" else 1.9 * g
        want[n] = start[n] - lr * step
    result = fit(net, train, val, None, "all", TrainConfig(lr=lr, epochs=1, batch_size=len(train),
                 weight_decay=wd, optimizer=optimizer))
    assert result.best_epoch == 1 and len(result.losses) == 1
    for n in names:
        torch.testing.assert_close(net.get_parameter(n).detach(), want[n], rtol=1e-5, atol=1e-6)


def test_a_plan_that_resets_the_optimizer_makes_its_first_step_a_fresh_adams():
    """Two epochs of one full-batch step each, no weight decay, no validation; epoch 2's
    plan resets the optimizer. By hand: Adam's first step from fresh moments is
    lr * g / (|g| + 1e-8), at epoch 1 from the start and again at epoch 2 from where
    epoch 1 ended (carried moments would make the second step a different size)."""
    class ResetSecond(Method):
        name = "reset-second"

        def candidates(self):
            return [n for n, _ in self.model.named_parameters()]

        def plan(self, epoch, ctx):
            return EpochPlan(self.candidates(), reset_optimizer=epoch == 2)

    net, train, _ = _linear_problem()
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone() for p in net.parameters()]
    lr = 0.1
    for _ in range(2):
        weight, bias = (p.clone().requires_grad_(True) for p in params)
        loss = F.cross_entropy(train.images.flatten(1) @ weight.T + bias, train.labels)
        grads = torch.autograd.grad(loss, [weight, bias])
        params = [p - lr * g / (g.abs() + 1e-8) for p, g in zip(params, grads)]
    result = fit(net, train, None, None, ResetSecond(),
                 TrainConfig(lr=lr, epochs=2, batch_size=len(train), weight_decay=0.0))
    assert len(result.losses) == 2
    for n, want in zip(names, params):
        torch.testing.assert_close(net.get_parameter(n).detach(), want, rtol=1e-5, atol=1e-6)


def test_a_methods_penalty_is_added_to_each_steps_loss():
    """A method whose penalty is 0.1 * sum(w^2) over the linear layer's weight: the
    recorded loss of the first step is the cross-entropy at the start plus that penalty,
    both by hand."""
    class Decayed(Method):
        name = "decayed"

        def candidates(self):
            return [n for n, _ in self.model.named_parameters()]

        def plan(self, epoch, ctx):
            return EpochPlan(self.candidates())

        def penalty(self, model):
            return 0.1 * (model[1].weight ** 2).sum()

    net, train, val = _linear_problem()
    w, b = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    ce = F.cross_entropy(train.images.flatten(1) @ w.T + b, train.labels).item()
    result = fit(net, train, val, None, Decayed(),
                 TrainConfig(lr=0.1, epochs=1, batch_size=len(train)))
    assert result.losses == [pytest.approx(ce + 0.1 * (w ** 2).sum().item(), rel=1e-5)]


def test_an_epochs_train_loss_is_the_mean_of_its_step_losses():
    """10 images in batches of 4: 3 steps an epoch (4, 4, 2); each epoch's record holds the
    mean of its own 3 step losses, not the last one."""
    net, train, val = _linear_problem(n_train=10)
    result = fit(net, train, val, None, "all", TrainConfig(lr=0.5, epochs=2, batch_size=4))
    assert len(result.losses) == 6 and len(result.history) == 2
    for epoch, record in enumerate(result.history):
        steps = result.losses[3 * epoch:3 * epoch + 3]
        assert record["epoch"] == epoch + 1
        assert record["train_loss"] == pytest.approx(sum(steps) / 3, rel=1e-12)
    assert result.history[0]["train_loss"] != pytest.approx(result.losses[2])


def test_an_epoch_that_tunes_nothing_still_draws_its_minibatch_order():
    """A method may tune nothing in an epoch (an automatic method above its threshold); the
    next epoch's minibatches are then the ones it would have had anyway: the second
    permutation drawn from the run's seed, by hand here."""
    class NothingFirst(Method):
        name = "nothing-first"

        def candidates(self):
            return [n for n, _ in self.model.named_parameters()]

        def plan(self, epoch, ctx):
            return EpochPlan([] if epoch == 1 else self.candidates())

    net, train, val = _linear_problem(n_train=10)
    seen = []
    net[1].register_forward_pre_hook(   # the head: also reached from cached inputs
        lambda module, args: None if torch.is_inference_mode_enabled() else seen.append(args[0]))
    fit(net, train, val, None, NothingFirst(), TrainConfig(lr=0.1, epochs=2, batch_size=4, seed=7))
    g = torch.Generator().manual_seed(7)
    torch.randperm(10, generator=g)                      # epoch 1's order, not trained on
    second = torch.randperm(10, generator=g)
    want = [train.images[idx].flatten(1) for idx in second.split(4)]
    assert len(seen) == len(want) and all(torch.equal(a, b) for a, b in zip(seen, want))


def test_nan_loss_marks_the_run_diverged(model, task):
    bad = task.train.subset(range(len(task.train)))
    bad.images[5] = float("nan")
    result = fit(model, bad, task.val, task.test, "all", TrainConfig(lr=1e-3, epochs=3), BLOCKS4)
    assert result.status == "diverged"
    assert result.best_epoch == 0 and result.test is None
    assert math.isnan(result.losses[-1])


def test_a_nan_loss_stops_the_epoch_before_its_step_and_leaves_the_weights():
    """Every training image NaN: the first step's loss is NaN, the run stops there (one
    loss recorded of the epoch's 2 steps), and no step is taken with its NaN gradient:
    the weights are the ones the fit started from."""
    net, train, val = _linear_problem(n_train=8)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    bad = TensorSplit(torch.full_like(train.images, float("nan")), train.labels)
    result = fit(net, bad, val, None, "all", TrainConfig(lr=0.1, epochs=2, batch_size=4))
    assert result.status == "diverged" and len(result.losses) == 1
    assert math.isnan(result.losses[0])
    assert [n for n, p in net.named_parameters() if not torch.equal(p.detach(), start[n])] == []


def test_a_run_without_validation_that_diverges_at_its_first_step_reports_no_test():
    """Pretraining (no validation) keeps its last finished epoch; when the first epoch
    diverges none finished: best epoch 0 and no test evaluation of its weights."""
    net, train, test = _linear_problem()
    bad = TensorSplit(torch.full_like(train.images, float("nan")), train.labels)
    result = fit(net, bad, None, test, "all", TrainConfig(lr=0.1, epochs=2, batch_size=4))
    assert result.status == "diverged" and result.best_epoch == 0 and result.test is None


def test_without_validation_the_last_epoch_is_the_one_kept():
    """Pretraining (no validation split): every epoch trains and the last one counts, so a
    3-epoch run reports best epoch 3 and the test accuracy of the weights it ends with
    (a linear model's, by hand)."""
    net, train, test = _linear_problem()
    result = fit(net, train, None, test, "all", TrainConfig(lr=0.1, epochs=3, batch_size=4))
    assert result.status == "ok" and result.best_epoch == 3 and len(result.history) == 3
    with torch.no_grad():
        logits = test.images.flatten(1) @ net[1].weight.T + net[1].bias
    assert result.test.acc == (logits.argmax(1) == test.labels).float().mean().item()


def test_fit_leaves_every_parameter_frozen_and_the_model_in_eval_mode():
    """After the run the model is the best epoch's, for evaluation: no parameter requires a
    gradient (the last epoch's tuned ones included) and no module is left in training mode
    (freeze_bn=False trains in train mode)."""
    net, train, val = _linear_problem()
    fit(net, train, val, None, "all", TrainConfig(lr=0.1, epochs=1, freeze_bn=False))
    assert [n for n, p in net.named_parameters() if p.requires_grad] == []
    assert [n for n, m in net.named_modules() if m.training] == []


def test_worst_group_selection_and_metrics(model):
    task = get_benchmark("synthetic").load_task(None, "spurious", 96, 16, 16, seed=0)
    config = TrainConfig(lr=1e-2, epochs=2, select="worst_group_val_acc")
    result = fit(model, task.train, task.val, task.test, "last", config, BLOCKS4)
    assert result.val.worst_group_acc is not None and len(result.test.group_acc) == 8
    assert result.test.worst_group_acc == min(result.test.group_acc.values())
    plain = get_benchmark("synthetic").load_task(None, "noise", 40, 5, 5, seed=0)
    with pytest.raises(ValueError, match="needs groups"):
        fit(model, plain.train, plain.val, plain.test, "last", config, BLOCKS4)
    # groups, but every validation example in none (FMoW's "Other" alone): no metric to
    # select by, refused before training instead of a TypeError comparing None at epoch 1
    outside = TensorSplit(task.val.images, task.val.labels, torch.full_like(task.val.labels, -1))
    with pytest.raises(ConfigError, match=r"every one of the \d+ is in none \(group id < 0\)"):
        fit(model, task.train, outside, task.test, "last", config, BLOCKS4)


def test_worst_group_selection_takes_a_validation_split_all_in_group_0():
    """Group id 0 is a group (only negative ids are in none): a validation split whose
    examples are all in group 0 selects by that group, whose accuracy is the split's."""
    g = torch.Generator().manual_seed(0)
    train = TensorSplit(torch.randn(8, 3, 8, 8, generator=g), torch.arange(8) % 4)
    val = TensorSplit(torch.randn(8, 3, 8, 8, generator=g), torch.arange(8) % 4,
                      torch.zeros(8, dtype=torch.long))
    result = fit(TinyNet(), train, val, None, "all",
                 TrainConfig(lr=1e-2, epochs=1, select="worst_group_val_acc"))
    assert result.best_epoch == 1
    assert result.val.group_acc == {0: result.val.acc} == {0: result.val.worst_group_acc}


def test_evaluate_counts_groups():
    from deep.train import accuracy
    m = accuracy(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 1]))
    assert m.acc == 0.75 and m.group_acc == {0: 1.0, 1: 0.5} and m.worst_group_acc == 0.5


# --- methods ----------------------------------------------------------------------

def test_method_names_and_unknown_method():
    assert method_names(BLOCKS4)[:5] == ["first", "second", "third", "last", "all"]
    with pytest.raises(ValueError, match="unknown method 'fourth'.*first, second, third, last, all"):
        get_method("fourth", BLOCKS4)


def test_a_block_name_without_blocks_says_the_mapping_is_missing(task):
    """fit(model, ..., "head", config) with no blocks= said only "unknown method 'head'"
    and listed the generic methods, as if the block did not exist."""
    with pytest.raises(ConfigError, match=r"unknown method 'head'; known: all, .*; a block's "
                                          r"name needs its mapping: blocks=blocks_for\(arch\)"):
        fit(TinyNet(), task.train, task.val, task.test, "head", TrainConfig(lr=1e-2, epochs=1))
    with pytest.raises(ConfigError, match=r"unknown method 'fourth'; known: first, .*, auto-snr$"):
        get_method("fourth", BLOCKS4)  # with blocks given, the list says it all


def test_unfreezing_schedule():
    assert unfreeze_epochs(4, 15) == [1, 4, 8, 12]
    assert unfreeze_epochs(4, 2) == [1, 1, 2, 2]
    assert unfreeze_epochs(5, 10) == [1, 3, 5, 7, 9]


def test_gradual_and_lpft_plans(model, task):
    def plans(name, epochs):
        method = get_method(name, BLOCKS4)
        method.prepare(model, TrainConfig(lr=1e-3, epochs=epochs))
        return [set(method.plan(e, None).tuned) for e in range(1, epochs + 1)]

    def names(*options):
        return set(tuned_parameter_names(model, list(options), BLOCKS4))

    assert plans("gradual-last-first", 4) == [names("last"), names("last", "third"),
                                              names("last", "third", "second"), names("all")]
    assert plans("gradual-first-last", 8)[2] == names("first", "second")
    assert plans("lp-ft", 5) == [names("last")] * 2 + [names("all")] * 3


def test_l1sp_penalty_is_l1_distance_to_pretrained(model):
    method = get_method("l1sp", BLOCKS4)
    method.prepare(model, TrainConfig(lr=1e-3, epochs=1))
    for p in model.parameters():
        p.requires_grad_(True)
    assert method.penalty(model).item() == 0
    with torch.no_grad():
        model.fc.weight.add_(0.5)
    expected = 1e-4 * 0.5 * model.fc.weight.numel()
    assert method.penalty(model).item() == pytest.approx(expected, rel=1e-5)


def test_l1sp_penalty_counts_a_moved_first_block_parameter(model):
    # Guards anchoring only the head: the distance of a moved body weight would count 0.
    method = get_method("l1sp", BLOCKS4)
    method.prepare(model, TrainConfig(lr=1e-3, epochs=1))
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        model.conv1.weight.add_(0.5)
    expected = 1e-4 * 0.5 * model.conv1.weight.numel()
    assert method.penalty(model).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), -1e-4])
def test_l1sp_refuses_a_lambda_that_is_nan_or_negative(bad):
    # NaN passes `lambda < 0`; it would make every loss NaN and stop training at epoch 1.
    with pytest.raises(ConfigError, match="l1_lambda must be >= 0"):
        L1SP(BLOCKS4, l1_lambda=bad)


class _Ctx:
    def __init__(self, batches):
        self.batches = batches

    def minibatches(self, count, seed_offset):
        return self.batches[:count]


def _tiny_problem():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        net[1].running_mean.copy_(torch.randn(4, generator=g))
        net[1].running_var.uniform_(0.5, 2.0, generator=g)
    batches = [(torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g))
               for _ in range(3)]
    return net, batches


def _hand_gradients(net, x, y):
    """Mean cross-entropy gradients of Linear -> BN(eval) -> tanh -> Linear, by hand in float64."""
    net = net.requires_grad_(False)
    W1, b1 = net[0].weight.double().numpy(), net[0].bias.double().numpy()
    bn = net[1]
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double().numpy()
    t = (bn.bias.double() - bn.running_mean.double() * torch.tensor(s)).numpy()
    W2, b2 = net[3].weight.double().numpy(), net[3].bias.double().numpy()
    x, n = x.double().numpy(), len(y)
    z = x @ W1.T + b1
    h = np.tanh(z * s + t)
    logits = h @ W2.T + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = p.copy()
    d[np.arange(n), y.numpy()] -= 1
    d /= n
    gW2, gb2 = d.T @ h, d.sum(0)
    dz = (d @ W2) * (1 - h ** 2) * s
    return {"0.weight": dz.T @ x, "0.bias": dz.sum(0), "3.weight": gW2, "3.bias": gb2}


def test_auto_rgn_multipliers_match_hand_computation():
    net, batches = _tiny_problem()
    named = dict(net.named_parameters())
    hand = {n: 0.0 for n in ("0.weight", "0.bias", "3.weight", "3.bias")}
    for x, y in batches:
        net.requires_grad_(False)
        for n, g in _hand_gradients(net, x, y).items():
            hand[n] += np.linalg.norm(g) / named[n].double().norm().item() / len(batches)
    top = max(hand.values())
    expected = {n: v / top for n, v in hand.items()}

    net.requires_grad_(True)
    method = AutoRGN(minibatches=3)
    method.prepare(net, TrainConfig(lr=1e-3, epochs=1))
    assert method.candidates() == list(expected)  # batch-norm tensors are excluded
    plan = method.plan(1, _Ctx(batches))
    for n, v in expected.items():
        assert plan.lr_scale[n] == pytest.approx(v, rel=1e-5)
    assert max(plan.lr_scale.values()) == 1.0
    assert rgn_multipliers({"a": 2.0, "b": 1.0, "c": math.inf}) == {"a": 1.0, "b": 0.5, "c": 1.0}
    raw = relative_gradient_norms(net, list(expected), batches)
    assert raw["3.bias"] == pytest.approx(hand["3.bias"], rel=1e-5)


def test_an_all_zero_tensor_gets_rgn_multiplier_1_and_stays_tuned():
    """A zero tensor has no scale for its gradient to be relative to: RGN = inf, multiplier
    1 (tuned at the full rate), not 0 (frozen). Here the bias starts at zero; the weight,
    the only finite RGN, is its own maximum: multiplier 1 too."""
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.bias.zero_()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1]))]
    raw = relative_gradient_norms(net, ["weight", "bias"], batches)
    assert raw["bias"] == math.inf and 0 < raw["weight"] < math.inf
    method = AutoRGN(minibatches=1)
    method.prepare(net, TrainConfig(lr=1e-3, epochs=1))
    plan = method.plan(1, _Ctx(batches))
    assert plan.lr_scale == {"weight": 1.0, "bias": 1.0}
    assert plan.tuned == ["weight", "bias"]



def test_a_parameter_the_forward_never_uses_has_gradient_zero_for_the_probes():
    """A user's model with a spare layer (in a block, unused by forward): Auto-RGN stopped
    at autograd's "appears to not have been used in the graph". Its gradient is zero:
    RGN 0, multiplier 0, the layer left as it was; the used tensors are tuned."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.spare = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x.flatten(1))

    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1]))]
    raw = relative_gradient_norms(net, ["head.weight", "spare.weight"], batches)
    assert raw["spare.weight"] == 0.0 and raw["head.weight"] > 0
    spare = net.spare.weight.detach().clone()
    split = TensorSplit(torch.randn(16, 3, 1, 1), torch.arange(16) % 2)
    result = fit(net, split, split, None, "auto-rgn", TrainConfig(lr=1e-2, epochs=1),
                 {"all": ("head", "spare")})
    assert result.status == "ok" and torch.equal(net.spare.weight, spare)
    assert result.tuned_params == 3 * 2 + 2  # the head's weight and bias only

def test_a_tensor_with_a_tiny_rgn_is_tuned_at_its_tiny_rate_not_frozen():
    """Auto-RGN tunes every candidate with a positive RGN at lr x RGN / max RGN, however
    small. Inputs of size 1e-4 make the weight's gradient (d^T x) about 1e-4 of the bias's
    (sum of d): multiplier ~1e-4, computed here by hand, and the weight still tuned."""
    net = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(0)
    x, y = 1e-4 * torch.randn(4, 3, generator=g), torch.tensor([0, 1, 1, 1])
    with torch.no_grad():
        p = torch.softmax(x.double() @ net.weight.double().T + net.bias.double(), 1)
    d = (p - F.one_hot(y, 2).double()) / len(y)
    rgn_w = (d.T @ x.double()).norm().item() / net.weight.double().norm().item()
    rgn_b = d.sum(0).norm().item() / net.bias.double().norm().item()
    assert rgn_w < 1e-3 * rgn_b
    method = AutoRGN(minibatches=1)
    method.prepare(net, TrainConfig(lr=1e-3, epochs=1))
    plan = method.plan(1, _Ctx([(x, y)]))
    assert plan.lr_scale["weight"] == pytest.approx(rgn_w / rgn_b, rel=1e-4)
    assert plan.lr_scale["bias"] == 1.0 and plan.tuned == ["weight", "bias"]


def test_a_zero_initialised_head_is_tuned_at_the_full_rate():
    """Every candidate all zero (a zero-initialised head): every RGN is inf, no finite
    maximum to divide by, and each tensor gets multiplier 1 as documented for inf."""
    assert rgn_multipliers({"w": math.inf, "b": math.inf}) == {"w": 1.0, "b": 1.0}
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.zero_(), net.bias.zero_()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1]))]
    method = AutoRGN(minibatches=1)
    method.prepare(net, TrainConfig(lr=1e-3, epochs=1))
    plan = method.plan(1, _Ctx(batches))
    assert plan.lr_scale == {"weight": 1.0, "bias": 1.0} and plan.tuned == ["weight", "bias"]


def test_gradient_probes_give_each_tensor_back_its_requires_grad():
    """The probes switch requires_grad on for the tensors they measure and must switch it
    back: a frozen tensor left trainable would be tuned by a caller that trusts its flags."""
    from deep.methods import eb_criterion
    net, batches = _tiny_problem()
    flags = {"0.weight": False, "0.bias": True, "3.weight": False, "3.bias": True}
    for probe in (relative_gradient_norms, eb_criterion):
        for n, p in net.named_parameters():
            p.requires_grad_(flags.get(n, False))
        probe(net, list(flags), batches)
        assert {n: p.requires_grad for n, p in net.named_parameters() if n in flags} == flags


def test_per_example_moments_refuse_a_model_in_train_mode():
    """In train mode batch norm mixes the examples of a batch: a per-example gradient
    through it is not defined (AutoSNR.plan switches to eval mode itself)."""
    net, batches = _tiny_problem()
    net.train()
    with pytest.raises(ConfigError, match="per-example gradients need the model in eval mode"):
        per_example_gradient_moments(net, ["3.bias"], batches)


def test_gradient_probes_leave_batch_norm_statistics_alone(model, task):
    """Auto-RGN's probes in train mode: batch statistics in the forward, but the running
    statistics are the model's own afterwards (a measurement must not change the model)."""
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x, y, _ = next(task.train.batches(16))
    relative_gradient_norms(model, ["conv1.weight", "fc.weight"], [(x, y)])
    assert model.training
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


@pytest.mark.parametrize("method", ["auto-rgn", "auto-snr", "all"])
def test_a_run_does_not_depend_on_the_mode_it_is_given_the_model_in(model, task, method):
    """fit sets the mode from TrainConfig.freeze_bn before a method probes the model: a model
    handed over in train mode (fresh from build_model) and one left in eval mode (by a
    previous run of the task group) tune to the same weights."""
    results = []
    for mode in (True, False):
        net = copy.deepcopy(model).train(mode)
        result = fit(net, task.train, task.val, task.test, method,
                     TrainConfig(lr=1e-2, epochs=2, seed=0), blocks_for(ARCH))
        results.append((result.best_epoch, result.val.acc, result.test.acc,
                        {n: p.detach().clone() for n, p in net.state_dict().items()}))
    (e1, v1, t1, s1), (e2, v2, t2, s2) = results
    assert (e1, v1, t1) == (e2, v2, t2)
    assert all(torch.equal(s1[n], s2[n]) for n in s1)


def test_auto_snr_per_example_statistics_match_a_loop(model, task):
    model.eval()
    x, y, _ = next(task.train.batches(10))
    names = ["conv1.weight", "layer2.1.conv2.weight", "fc.weight", "fc.bias"]
    mean, var, n = per_example_gradient_moments(model, names, [(x[:6], y[:6]), (x[6:], y[6:])],
                                                chunk_size=4)
    assert n == 10
    named = dict(model.named_parameters())
    singles = []
    for i in range(10):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    [named[k].requires_grad_(True) for k in names])
        singles.append([g.double() for g in grads])
    for j, name in enumerate(names):
        stack = torch.stack([s[j] for s in singles])
        assert torch.allclose(mean[name], stack.mean(0), atol=1e-7, rtol=1e-4)
        assert torch.allclose(var[name], stack.var(0), atol=1e-9, rtol=1e-3)
    snr = gradient_snr(mean, var)
    expected = (stack.mean(0) ** 2 / (stack.var(0) + 1e-8)).mean().item()
    assert snr["fc.bias"] == pytest.approx(expected, rel=1e-3)


def test_auto_snr_selects_by_threshold(model, task):
    x, y, _ = next(task.train.batches(16))
    for threshold, expect_all in ((0.0, True), (1e9, False)):
        method = AutoSNR(minibatches=1, threshold=threshold)
        method.prepare(model, TrainConfig(lr=1e-3, epochs=1))
        plan = method.plan(1, _Ctx([(x, y)]))
        assert (set(plan.tuned) == set(method.candidates())) == expect_all
        assert bool(plan.tuned) == expect_all
    with pytest.raises(ValueError, match="freeze_bn"):
        AutoSNR().prepare(model, TrainConfig(lr=1e-3, epochs=1, freeze_bn=False))


@pytest.mark.parametrize("mode", [False, True])
def test_auto_snr_plan_leaves_the_model_in_the_mode_it_found(mode):
    """The plan measures in eval mode and must hand the model back as it was: fit puts it
    in eval mode (freeze_bn) before planning, and a plan that left it training would let
    the epoch's forward passes move batch-norm statistics on the uncached path."""
    net, batches = _tiny_problem()
    method = AutoSNR(minibatches=3, threshold=0.0)
    method.prepare(net, TrainConfig(lr=1e-3, epochs=1))
    net.train(mode)
    method.plan(1, _Ctx(batches))
    assert net.training is mode


def test_auto_snr_default_threshold_is_one_over_the_batch_size_and_tunes_a_tie(model,
                                                                                monkeypatch):
    # Guards another default threshold and a strict `>` at the tie (SNR exactly 1/32).
    import deep.methods as methods
    method = AutoSNR(BLOCKS4)
    method.prepare(model, TrainConfig(lr=1e-3, epochs=1, batch_size=32))
    names = method.candidates()
    snr = {n: [0.99 / 32, 1 / 32, 1.01 / 32][i % 3] for i, n in enumerate(names)}
    monkeypatch.setattr(methods, "per_example_gradient_moments", lambda *a, **k: (None, None, 0))
    monkeypatch.setattr(methods, "gradient_snr", lambda mean, var: snr)
    plan = method.plan(1, _Ctx([]))
    assert set(plan.tuned) == {n for i, n in enumerate(names) if i % 3 != 0}   # at or above


def test_every_method_runs(model, task):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for name in method_names(BLOCKS4):
        model.load_state_dict(base)
        result = fit(model, task.train, task.val, task.test, name,
                     TrainConfig(lr=1e-3, epochs=2), BLOCKS4)
        assert result.status == "ok" and 0 <= result.test.acc <= 1, name
        assert (result.tuned_params == 0) == (name == "none"), name


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(lr=1e-2, epochs=1, device="gpu"),
     "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (lambda: TrainConfig(lr=1e-2, epochs=1, channels_last="yes"),
     "channels_last must be one of True, False, first, None; got 'yes'"),
    # Adam has no momentum: 0.5 was silently unused; SGD's a torch ValueError at fit
    (lambda: TrainConfig(lr=1e-2, epochs=1, momentum=0.5),
     "momentum=0.5, nesterov=True are SGD's and need optimizer 'sgd', got 'adam'"),
    (lambda: TrainConfig(lr=1e-2, epochs=1, nesterov=False),
     "momentum=0.9, nesterov=False are SGD's and need optimizer 'sgd', got 'adam'"),
    (lambda: TrainConfig(lr=1e-2, epochs=1, optimizer="sgd", momentum=-1.0),
     "momentum must be a number in [0, 1), got -1.0"),
    (lambda: TrainConfig(lr=1e-2, epochs=1, optimizer="sgd", momentum=float("nan")),
     "momentum must be a number in [0, 1), got nan"),
    (lambda: TrainConfig(lr=1e-2, epochs=1, optimizer="sgd", momentum=1.0),
     "momentum must be a number in [0, 1), got 1.0"),
    (lambda: TrainConfig(lr=1e-2, epochs=4, schedule="step", milestones=[2, 2]),
     "schedule 'step' needs increasing positive integer milestones (epochs), got [2, 2]"),
    (lambda: TrainConfig(lr=1e-2, epochs=4, schedule="step", milestones=[0, 2]),
     "schedule 'step' needs increasing positive integer milestones (epochs), got [0, 2]"),
    # a TOML `true` is no epoch (it was taken as milestone 1, as bools are ints to Python)
    (lambda: TrainConfig(lr=1e-2, epochs=4, schedule="step", milestones=[True, 2]),
     "schedule 'step' needs increasing positive integer milestones (epochs), got [True, 2]"),
    (lambda: TrainConfig(lr=1e-2, epochs=1, weight_decay=-1e-4),
     "weight_decay must be a number >= 0, got -0.0001"),
    (lambda: TrainConfig(lr=1e-2, epochs=True), "epochs must be an integer, got True"),
])
def test_train_config_refuses_a_setting_it_cannot_run_with(make, message):
    """Refused where the config is made, not at fit as torch's RuntimeError ("Expected one
    of cpu, cuda, ... device type at start of device string: gpu")."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_train_config_names_cuda_without_a_gpu_and_fit_says_there_is_none(task, monkeypatch):
    """A config is data: a CPU head node builds the configs its GPU workers run. Only fit,
    where the model must move, needs the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = TrainConfig(lr=1e-2, epochs=1, device="cuda:1")
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        fit(TinyNet(), task.train, task.val, task.test, "head", config, {"head": ("head",)})


def test_fit_takes_device_auto_as_train_config_documents(task):
    net = TinyNet()
    result = fit(net, task.train, task.val, task.test, "head",
                 TrainConfig(lr=1e-2, epochs=1, device="auto"), {"head": ("head",)})
    assert result.status == "ok"


def test_evaluate_refuses_a_batch_size_that_is_not_a_count_and_fit_a_config_that_is_not_one(task):
    """batch_size=0 used to mean the default (`or`), -1 to end in torch.cat's "expected a
    non-empty list of Tensors"; a dict config an AttributeError."""
    net = TinyNet()
    for bad, message in ((0, "batch_size must be at least 1, got 0"),
                         (-1, "batch_size must be at least 1, got -1"),
                         (8.0, "batch_size must be an integer, got 8.0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate(net, task.test, batch_size=bad)
    with pytest.raises(ValueError, match=r"config must be a TrainConfig, e.g. TrainConfig\(lr="):
        fit(net, task.train, task.val, task.test, "all", {"lr": 1e-2, "epochs": 1})


def _labelled(n, classes):
    return TensorSplit(torch.randn(n, 3, 8, 8), torch.arange(n) % classes)


@pytest.mark.parametrize("method", ["all", "auto-rgn", "auto-snr", "none"])
@pytest.mark.parametrize("bad", ["training", "validation", "test"])
def test_fit_refuses_labels_the_model_has_no_output_for(method, bad):
    """A 4-class model on 10-class data: training stopped at cross_entropy's IndexError
    ("Target 9 is out of bounds", or an index error in a method's gradient probes), and 10
    classes in val or test alone were silently scored, every such example counted wrong."""
    splits = {name: _labelled(16, 10 if name == bad else 4)
              for name in ("training", "validation", "test")}
    with pytest.raises(ConfigError, match=rf"the {bad} split has labels 0..9, but the model "
                                          r"gives 4 logits \(classes 0..3\)"):
        fit(TinyNet(), *splits.values(), method, TrainConfig(lr=1e-2, epochs=1),
            {"head": ("head",)})


def test_evaluate_refuses_negative_labels_and_an_empty_split():
    labels = torch.tensor([0, -1, 2, 3])
    with pytest.raises(ConfigError, match=r"the 'split' split has labels -1..3, but the model "
                                          r"gives 4 logits"):
        evaluate(TinyNet(), TensorSplit(torch.randn(4, 3, 8, 8), labels))
    with pytest.raises(ConfigError, match="the 'split' split is empty: nothing to evaluate"):
        evaluate(TinyNet(), _labelled(0, 4))


def test_a_label_equal_to_the_number_of_logits_is_refused():
    """TinyNet gives 4 logits (classes 0..3): label 4 is one past the last class."""
    labels = torch.tensor([0, 1, 2, 4])
    with pytest.raises(ConfigError, match=r"the 'split' split has labels 0..4, but the model "
                                          r"gives 4 logits \(classes 0..3\)"):
        evaluate(TinyNet(), TensorSplit(torch.randn(4, 3, 8, 8), labels))


def test_fit_refuses_a_test_split_with_a_label_past_the_logits_before_training():
    """The test split is evaluated only at the end; its labels are checked with the others
    before the first epoch, so a bad one costs no training: no epoch reported, the weights
    left as they were."""
    net = TinyNet()
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    train, val, test = _labelled(8, 4), _labelled(8, 4), _labelled(8, 5)
    epochs = []
    with pytest.raises(ConfigError, match=r"the test split has labels 0..4, but the model "
                                          r"gives 4 logits"):
        fit(net, train, val, test, "all", TrainConfig(lr=0.1, epochs=2), on_epoch=epochs.append)
    assert epochs == []
    assert [n for n, p in net.named_parameters() if not torch.equal(p.detach(), start[n])] == []


def test_fit_refuses_an_empty_training_split_before_anything_runs():
    with pytest.raises(ConfigError, match=r"the training split is empty: a fine-tuning run "
                                          r"trains on n_target images"):
        fit(TinyNet(), _labelled(0, 4), _labelled(8, 4), _labelled(8, 4), "all",
            TrainConfig(lr=1e-2, epochs=1))


@pytest.mark.parametrize("empty", ["validation", "test"])
def test_fit_refuses_an_empty_validation_or_test_split_before_training(empty):
    """It trained an epoch, then stopped at torch.cat's "expected a non-empty list of
    Tensors"; None is how to leave one out."""
    splits = {name: _labelled(0 if name == empty else 16, 4)
              for name in ("training", "validation", "test")}
    with pytest.raises(ConfigError, match=rf"the {empty} split is empty: give it examples, "
                                          "or pass None for it"):
        fit(TinyNet(), *splits.values(), "all", TrainConfig(lr=1e-2, epochs=1))


class _StdConv(nn.Conv2d):
    """A conv with its own forward (weight standardisation, BiT's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("conv, bn", [
    (lambda: nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d),
    (lambda: nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular", bias=False), nn.BatchNorm2d),
    (lambda: _StdConv(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d),
    (lambda: nn.Conv2d(3, 8, 3, padding=1), lambda c: nn.BatchNorm2d(c, track_running_stats=False)),
    (lambda: nn.Conv2d(3, 8, 3, padding=1), lambda c: nn.BatchNorm2d(c, affine=False)),
    (lambda: nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d),  # the one that folds
])
def test_a_users_conv_bn_pair_is_folded_only_where_the_fold_is_the_same_function(conv, bn):
    """A user's StagedModel lists (conv, bn) pairs: a reflect or circular padded conv, or one
    with its own forward, was folded into a plain zero-padded conv (outputs off by 0.7 to
    5.7, silently, under fit's defaults); a BN without running statistics or affine
    parameters stopped fit at a TypeError."""
    class Net(StagedModel):
        stage_prefixes = (("conv1", "bn1"), ("fc",))

        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.fc = conv(), bn(8), nn.Linear(8, 4)

        def conv_bn_pairs(self):
            return [("conv1", "bn1")]

        def stage(self, index, x):
            return torch.relu(self.bn1(self.conv1(x))) if index == 0 else self.fc(x.amax((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    if model.bn1.running_mean is not None:
        with torch.no_grad():
            model.bn1.running_mean.uniform_(-1, 1), model.bn1.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 8, 8) + 3
    torch.testing.assert_close((folded_view(model) or model)(x), model(x), rtol=1e-5, atol=1e-5)
    split = TensorSplit(x, torch.arange(4))
    runs = [fit(copy.deepcopy(model), split, split, split, "fc",
                TrainConfig(lr=1e-2, epochs=2, fold_bn=fold), {"fc": ("fc",)}) for fold in (True, False)]
    np.testing.assert_allclose(runs[0].losses, runs[1].losses, rtol=1e-5)


def test_a_batch_norm_without_running_statistics_turns_the_prefix_cache_off():
    """Such a norm normalises by its batch's statistics even with batch norm "frozen": the
    cache computed the prefix in ordered evaluation batches, the plain loop in the shuffled
    training batches, and the two runs' losses differed (by 1e-4 here)."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                             nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(128, 3, 8, 8, generator=g), torch.arange(128) % 4)
    runs = [fit(net(), split, split, None, "head", TrainConfig(lr=1e-2, epochs=2, use_cache=cache),
                {"head": ("5",)}) for cache in (True, False)]
    assert runs[0].losses == runs[1].losses and runs[0].start_stage == 0


def test_refresh_folds_without_fix_drops_the_precomputed_fold():
    """Guards refresh_folds(fix=False): a frozen fold's precomputed weights are dropped, so
    after its batch norm statistics change it computes bn(conv(x)) with the new ones (as
    torch's own modules give it), not with the statistics it was fixed at."""
    from deep.prefix_cache import FoldedConvBN, refresh_folds
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4).eval()
    for p in (*conv.parameters(), *bn.parameters()):
        p.requires_grad_(False)
    runner = torch.nn.Sequential(FoldedConvBN(conv, bn))
    refresh_folds(runner)
    assert runner[0].fixed is not None
    with torch.no_grad():
        bn.running_mean.add_(1.0)
        bn.running_var.mul_(4.0)
    refresh_folds(runner, fix=False)
    assert runner[0].fixed is None
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(runner(x), bn(conv(x)), atol=1e-5)
