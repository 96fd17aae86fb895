"""Online unsupervised surgical adaptation (deep.adapt, deep.augment_memo): issue #17."""

from __future__ import annotations

import copy
import functools
import csv
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from deep.adapt import (MemoConfig, TentConfig, adapted_parameter_names, make_adapter,
                        marginal_entropy, parse_blocks, run_stream, stream_batches)
from deep.adapt.protocol import CONFIG_DIR as ADAPT_CONFIG_DIR, AdaptProtocol, load_adapt_protocol
from deep.adapt.results import is_adapt_results, read_adapt_results, relative_table
from deep.adapt.runner import (adapt_stream, augment_generator, load_test_split, run_adaptation,
                               stream_order)
from deep import augment_memo
from deep.augment_memo import (GREY, MemoAugmenter, autocontrast, equalize, posterize, rotate,
                               solarize, translate_x)
from deep.blocks import blocks_for
from deep.errors import ConfigError
from deep.protocol import read_protocol_file
from deep.sweep import machine
from deep.models import build_model

ARCH = "resnet26-w4"
BLOCKS = blocks_for(ARCH)


@pytest.fixture
def small_model():
    """A random ResNet-26-w4 whose BatchNorm running statistics match its inputs (a few
    train-mode forwards), so logits stay moderate and entropy gradients are not zero."""
    torch.manual_seed(0)
    model = build_model(ARCH, num_classes=5, in_channels=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for _ in range(4):
            model.train()(torch.randn(32, 1, 12, 12))
    return model.eval()


@pytest.fixture
def stream():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 12, 12, generator=g), torch.randint(5, (6,), generator=g)


def augmenter():
    return MemoAugmenter((0.5,), (0.5,))


def memo(model, option, episodic=False, copies=4, lr=0.05, seed=0):
    return make_adapter(model, "memo", option, BLOCKS, MemoConfig(copies=copies, lr=lr), episodic,
                        augmenter(), torch.Generator().manual_seed(seed))


def tent(model, option, episodic=False, batch_size=3, **kw):
    return make_adapter(model, "tent", option, BLOCKS, TentConfig(batch_size=batch_size, **kw),
                        episodic)


def changed_entries(before: dict, model: nn.Module) -> set[str]:
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


# --- marginal entropy ------------------------------------------------------------------

def test_marginal_entropy_matches_the_direct_computation():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    marginal = logits.softmax(1).mean(0)
    loss, avg_log_probs = marginal_entropy(logits)
    assert loss.item() == pytest.approx(-(marginal * marginal.log()).sum().item(), rel=1e-12)
    assert torch.allclose(avg_log_probs, marginal.log(), rtol=0, atol=1e-12)


def test_marginal_entropy_of_identical_copies_is_the_softmax_entropy():
    row = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    p = row.softmax(1)[0]
    assert marginal_entropy(row.repeat(32, 1))[0].item() == pytest.approx(-(p * p.log()).sum().item())


def test_marginal_entropy_is_finite_for_saturated_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [1e4, -1e4, 0.0]])
    loss, avg = marginal_entropy(logits)
    assert torch.isfinite(loss) and torch.isfinite(avg).all() and loss.item() == pytest.approx(0, abs=1e-6)
    logits.requires_grad_(True)
    marginal_entropy(logits)[0].backward()
    assert torch.isfinite(logits.grad).all()


def test_marginal_entropy_gradient_matches_finite_differences():
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True,
                         generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda z: marginal_entropy(z)[0], (logits,), eps=1e-6, atol=1e-7)


def test_marginal_entropy_rejects_a_single_vector():
    with pytest.raises(ValueError, match=r"\(copies, classes\)"):
        marginal_entropy(torch.randn(10))


def test_a_class_of_probability_zero_contributes_zero_not_nan():
    """A class every copy gives probability 0 (a logit of -inf) adds 0 * log 0 = 0 to the
    entropy, not NaN: copies (1, 0, -inf) and (0, 1, -inf) have the marginal (1/2, 1/2, 0),
    whose entropy is log 2; its log-probability is clamped to a finite number."""
    logits = torch.tensor([[1.0, 0.0, -math.inf], [0.0, 1.0, -math.inf]], dtype=torch.float64)
    loss, avg_log_probs = marginal_entropy(logits)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert torch.isfinite(avg_log_probs).all()
    assert avg_log_probs[:2].tolist() == pytest.approx([math.log(0.5)] * 2, rel=1e-12)


# --- exactly the named blocks change ---------------------------------------------------

def inside_blocks(name: str, option: str) -> bool:
    """Whether module or parameter `name` lies under the prefixes of `option`'s blocks
    (BLOCKS, e.g. conv1, bn1 and layer1 for "first"; "all": everything)."""
    if option == "all":
        return True
    prefixes = [p for block in option.split("+") for p in BLOCKS[block]]
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def expected_names(model: nn.Module, method: str, option: str) -> set[str]:
    """What `method` must adapt for `option`: every parameter of the blocks (MEMO), the
    weight and bias of the BatchNorm layers in them (TENT)."""
    if method == "memo":
        return {n for n, _ in model.named_parameters() if inside_blocks(n, option)}
    return {f"{name}.{p}" for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and inside_blocks(name, option)
            for p in ("weight", "bias")}


@pytest.mark.parametrize("method,option", [
    ("memo", "first"), ("memo", "last"), ("memo", "first+second"), ("memo", "second+third"),
    ("memo", "all"), ("tent", "first"), ("tent", "first+second"), ("tent", "all")])
def test_only_the_named_blocks_change_and_buffers_never(small_model, stream, method, option):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    adapter = memo(small_model, option) if method == "memo" else tent(small_model, option)
    outside = [n for n in adapter.names if not inside_blocks(n, option)]
    assert not outside, f"{method} {option} adapts tensors outside its blocks: {outside}"
    assert len(adapter.names) == len(set(adapter.names))
    expected = expected_names(small_model, method, option)
    assert set(adapter.names) == expected, (
        f"{method} {option}: missing {sorted(expected - set(adapter.names))}, "
        f"extra {sorted(set(adapter.names) - expected)}")
    run_stream(adapter, *stream, torch.arange(6), 1 if method == "memo" else 3)
    changed = changed_entries(before, small_model)
    assert changed == set(adapter.names)      # every adapted tensor moved, nothing else did
    buffers = {n for n, _ in small_model.named_buffers()}
    assert not changed & buffers              # running statistics stay the source's
    # and no gradient is computed for the rest: same numbers, but the backward pass through
    # a frozen block's weights would cost what tuning them costs
    with_grad = {n for n, p in small_model.named_parameters() if p.grad is not None}
    assert with_grad <= set(adapter.names), sorted(with_grad - set(adapter.names))[:5]


def test_tent_adapts_only_normalisation_affine_parameters(small_model):
    names = adapted_parameter_names(small_model, "tent", "first", BLOCKS)
    modules = dict(small_model.named_modules())
    assert names and all(isinstance(modules[n.rsplit(".", 1)[0]], nn.BatchNorm2d) for n in names)
    assert all(n.startswith(("bn1", "layer1")) for n in names)
    memo_names = adapted_parameter_names(small_model, "memo", "first", BLOCKS)
    assert set(names) < set(memo_names) and any("conv" in n for n in memo_names)


def test_none_changes_nothing_and_predicts_like_the_source(small_model, stream):
    source = copy.deepcopy(small_model)
    x = stream[0]
    with torch.no_grad():
        assert torch.equal(memo(small_model, "none").predict(x[:1]), source(x[:1]))
        assert torch.equal(tent(small_model, "none").predict(x[:3]), source(x[:3]))
    assert memo(small_model, "none").names == [] == tent(small_model, "none").names
    assert changed_entries(source.state_dict(), small_model) == set()


# --- online vs episodic -----------------------------------------------------------------

def test_online_memo_carries_updates_from_image_to_image(small_model, stream):
    adapter = memo(small_model, "last")
    source = [p.clone() for p in adapter.params]
    adapter.predict(stream[0][:1])
    after_one = [p.clone() for p in adapter.params]
    adapter.predict(stream[0][1:2])
    assert any(not torch.equal(a, s) for a, s in zip(after_one, source))
    assert any(not torch.equal(p, a) for p, a in zip(adapter.params, after_one))


def test_episodic_memo_resets_after_each_image(small_model, stream):
    adapter = memo(small_model, "first", episodic=True)
    source = [p.clone() for p in adapter.params]
    for i in range(3):
        adapter.predict(stream[0][i:i + 1])
        assert all(torch.equal(p, s) for p, s in zip(adapter.params, source))


def test_episodic_prediction_equals_a_fresh_adapter_on_that_image(small_model, stream):
    """In episodic mode image 2 is predicted as if it came first (same augmentations)."""
    episodic = memo(copy.deepcopy(small_model), "last", episodic=True, seed=5)
    episodic.predict(stream[0][:1])
    state = episodic.generator.get_state()
    second = episodic.predict(stream[0][1:2])
    fresh = memo(copy.deepcopy(small_model), "last", seed=5)
    fresh.generator.set_state(state)
    assert torch.equal(second, fresh.predict(stream[0][1:2]))
    online = memo(copy.deepcopy(small_model), "last", seed=5)
    online.predict(stream[0][:1])
    assert not torch.equal(second, online.predict(stream[0][1:2]))


def test_episodic_tent_resets_parameters_and_optimizer_after_each_batch(small_model, stream):
    adapter = tent(small_model, "first", episodic=True)
    source = [p.clone() for p in adapter.params]
    adapter.predict(stream[0][:3])
    assert all(torch.equal(p, s) for p, s in zip(adapter.params, source))
    assert adapter.optimizer.state_dict()["state"] == {}
    online = tent(copy.deepcopy(small_model), "first")
    online.predict(stream[0][:3])
    assert online.optimizer.state_dict()["state"] != {}
    assert any(not torch.equal(p, s) for p, s in zip(online.params, source))


def test_tent_predicts_with_the_forward_before_its_step(small_model, stream):
    """TENT's code returns the outputs of the forward that computed the loss."""
    a = tent(copy.deepcopy(small_model), "all", lr=1e-3)
    b = tent(copy.deepcopy(small_model), "all", lr=10.0)
    x = stream[0][:3]
    assert torch.equal(a.predict(x), b.predict(x))          # first batch: lr cannot matter yet
    assert not torch.equal(a.predict(x), b.predict(x))      # the second sees different steps


def jitter(img, n, g, scale=0.1):
    """`n` noisy copies of one image: a cheap stand-in for MEMO's augmentations."""
    return img.expand(n, *img.shape) + scale * torch.randn(n, *img.shape, generator=g)


def bn_net() -> nn.Sequential:
    """A small BatchNorm network; blocks "first" = conv + BN, "last" = the linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()


BN_NET_BLOCKS = {"first": ("0", "1"), "last": ("5",)}


def test_tent_takes_its_steps_per_batch_and_predicts_with_the_last_forward():
    """steps=3: three Adam steps per batch (a hand loop of the same steps gives the same
    parameters), and the prediction is the logits of the third forward, before its step."""
    from deep.adapt.core import _batch_stat_forward, patched_batchnorm, softmax_entropy
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model, reference = bn_net(), bn_net()
    adapter = make_adapter(model, "tent", "first", BN_NET_BLOCKS,
                           TentConfig(batch_size=6, lr=0.05, steps=3))
    logits = adapter.predict(x)
    params = [reference[1].weight, reference[1].bias]
    optimizer = torch.optim.Adam(params, lr=0.05, betas=(0.9, 0.999))
    with patched_batchnorm([reference[1]], _batch_stat_forward):
        for _ in range(3):
            expected = reference(x)
            optimizer.zero_grad()
            softmax_entropy(expected).mean().backward()
            optimizer.step()
    assert torch.allclose(logits, expected.detach(), atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(adapter.params, params))


def test_a_tent_step_lowers_the_entropy_of_its_batch():
    """Guards the sign of TENT's loss: one step minimises the mean softmax entropy, so on
    the batch it adapted to the entropy goes down (both measured with batch statistics in
    the adapted BatchNorm, as TENT's forward uses them)."""
    from deep.adapt.core import _batch_stat_forward, patched_batchnorm, softmax_entropy
    model = bn_net()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    adapter = make_adapter(model, "tent", "first", BN_NET_BLOCKS,
                           TentConfig(batch_size=16, lr=0.1), False)
    before = softmax_entropy(adapter.predict(x)).mean().item()   # the forward before its step
    with torch.no_grad(), patched_batchnorm([model[1]], _batch_stat_forward):
        after = softmax_entropy(model(x)).mean().item()
    # the step lowers it by about 0.01 here (1.602 -> 1.592); float32 noise is ~1e-6
    assert after < before - 1e-3, (before, after)


def test_tent_uses_the_configured_adam_beta():
    """TentConfig.beta is Adam's first-moment decay (the second stays TENT's 0.999). Adam's
    first step is the same for every beta (bias correction), the second is not."""
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    params = {}
    for beta in (0.5, 0.9):
        adapter = make_adapter(bn_net(), "tent", "first", BN_NET_BLOCKS,
                               TentConfig(batch_size=16, lr=1e-2, beta=beta), False)
        assert adapter.optimizer.param_groups[0]["betas"] == (beta, 0.999)
        adapter.predict(x)
        adapter.predict(x)
        params[beta] = torch.cat([p.detach().flatten() for p in adapter.params])
    assert not torch.allclose(params[0.5], params[0.9], rtol=0, atol=1e-6)


# --- determinism ------------------------------------------------------------------------------

def test_same_seed_same_stream_same_numbers(small_model, stream, one_thread):
    images, labels = stream
    order = stream_order(len(labels), seed=3, images=0)
    runs = []
    for _ in range(2):
        r = adapt_stream(small_model, ARCH, "memo", "first", MemoConfig(copies=4, lr=0.05), images,
                         labels, order, augmenter(), torch.Generator().manual_seed(9))
        runs.append(r.test_acc)
    assert runs[0] == runs[1]
    a = memo(copy.deepcopy(small_model), "first", seed=9)
    b = memo(copy.deepcopy(small_model), "first", seed=9)
    assert torch.equal(run_stream(a, images, labels, order), run_stream(b, images, labels, order))
    assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))
    assert torch.equal(stream_order(100, 3, 10), stream_order(100, 3, 10))
    assert not torch.equal(stream_order(100, 3, 0), stream_order(100, 4, 0))


def test_a_shorter_stream_is_the_start_of_the_full_one():
    """`images=k` streams the first k images of the seed's permutation, so runs with more
    images extend runs with fewer."""
    full = stream_order(50, 3, 0)
    assert sorted(full.tolist()) == list(range(50))
    for k in (1, 10, 49):
        assert torch.equal(stream_order(50, 3, k), full[:k])


def test_memo_augmentation_draws_are_fixed_by_seed_and_shift():
    draw = lambda seed, shift: torch.rand(8, generator=augment_generator(seed, shift))
    assert torch.equal(draw(0, "fog"), draw(0, "fog"))
    assert not torch.equal(draw(0, "fog"), draw(0, "snow"))
    assert not torch.equal(draw(0, "fog"), draw(1, "fog"))


def test_adapt_stream_leaves_the_source_model_alone(small_model, stream):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    adapt_stream(small_model, ARCH, "tent", "all", TentConfig(batch_size=3), *stream,
                 torch.arange(6))
    assert changed_entries(before, small_model) == set()


# --- adaptation helps on a toy shift ----------------------------------------------------------

class _Toy(nn.Module):
    """1x1 "images" with 4 channels: a linear feature, BatchNorm, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


DISCRIMINATIVE = torch.tensor([1.0, 0.5, 0.0, 0.0])


def _toy_data(n, generator, offset=0.0):
    """Class means at +-2 * DISCRIMINATIVE; the target adds offset * DISCRIMINATIVE."""
    y = torch.randint(2, (n,), generator=generator)
    x = torch.randn(n, 4, generator=generator) + (2.0 * (2 * y[:, None] - 1) + offset) * DISCRIMINATIVE
    return x.view(n, 4, 1, 1), y


def _train_toy(draw, steps: int = 150) -> nn.Module:
    """The toy source model: Adam on `draw(128)` batches, seeded; returned in eval mode."""
    torch.manual_seed(0)
    model = _Toy()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        x, y = draw(128)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_tent_on_the_first_block_undoes_an_input_shift_on_a_toy_problem():
    """Source: two Gaussian classes. Target: the same, moved along the class direction by
    +4 (twice the class separation): the source model calls almost everything class 1;
    TENT's batch statistics in the first block re-centre the features."""
    g = torch.Generator().manual_seed(0)
    model = _train_toy(lambda n: _toy_data(n, g))
    x, y = _toy_data(600, g, offset=4.0)
    blocks = {"first": ("conv", "bn"), "last": ("fc",)}

    def accuracy(option):
        adapter = make_adapter(copy.deepcopy(model), "tent", option, blocks,
                               TentConfig(batch_size=100), False)
        return run_stream(adapter, x, y, torch.arange(600), 100).float().mean().item()

    clean = _toy_data(600, g)
    assert (model(clean[0]).argmax(1) == clean[1]).float().mean() > 0.9   # a good source model
    none, first = accuracy("none"), accuracy("first")
    assert none < 0.75 and first - none > 0.2, (none, first)


def _spurious_data(n, generator, spurious=1.0):
    """Channel 0 carries a weak class signal, channel 2 a strong one that `spurious`
    scales (source 1; the target flips and halves it)."""
    y = torch.randint(2, (n,), generator=generator)
    sign = 2.0 * (2 * y - 1)
    x = torch.randn(n, 4, generator=generator)
    x[:, 0] += 0.6 * sign
    x[:, 2] += 1.5 * spurious * sign
    return x.view(n, 4, 1, 1), y


def _redraw_channel_2(image, copies, generator):
    """A toy MEMO augmentation: copies of the image with channel 2 redrawn (scale 3)."""
    out = image.expand(copies, *image.shape).clone()
    out[:, 2] = 3.0 * torch.randn(copies, *image.shape[1:], generator=generator)
    return out


def test_online_memo_on_the_first_block_learns_the_invariance_its_augmentations_teach():
    """Source: the model leans on channel 2, which agrees with the class. Target: channel
    2 points the other way (half as strong), so the source model is mostly wrong. MEMO's
    copies redraw channel 2: their marginal prediction is confident only if channel 2 is
    ignored, so minimising its entropy online moves the first block off channel 2."""
    g = torch.Generator().manual_seed(0)
    model = _train_toy(lambda n: _spurious_data(n, g))
    x, y = _spurious_data(400, g, spurious=-0.5)
    blocks = {"first": ("conv", "bn"), "last": ("fc",)}

    def accuracy(option):
        adapter = make_adapter(copy.deepcopy(model), "memo", option, blocks,
                               MemoConfig(copies=8, lr=0.2), False, _redraw_channel_2,
                               torch.Generator().manual_seed(1))
        return run_stream(adapter, x, y, torch.arange(400)).float().mean().item()

    clean = _spurious_data(400, g)
    assert (model(clean[0]).argmax(1) == clean[1]).float().mean() > 0.9   # a good source model
    none, first = accuracy("none"), accuracy("first")
    assert none < 0.4 and first - none > 0.3, (none, first)


# --- bad input --------------------------------------------------------------------------------

def test_unknown_block_is_a_clear_error(small_model):
    with pytest.raises(ValueError, match="unknown block 'fourth'"):
        adapted_parameter_names(small_model, "memo", "first+fourth", BLOCKS)
    with pytest.raises(ValueError, match="unknown method"):
        adapted_parameter_names(small_model, "sgd", "first", BLOCKS)
    for bad in ("", "first+", "none+first"):
        with pytest.raises(ValueError, match="block option|cannot be combined"):
            parse_blocks(bad)


def test_tent_on_a_batch_of_one_is_a_clear_error(small_model, stream):
    adapter = tent(small_model, "first")
    with pytest.raises(ValueError, match="at least 2 images"):
        adapter.predict(stream[0][:1])
    with pytest.raises(ValueError, match="at least 2 images"):
        TentConfig(batch_size=1)


def test_tent_on_a_block_without_normalisation_is_a_clear_error(small_model):
    with pytest.raises(ValueError, match="no normalisation layer"):
        adapted_parameter_names(small_model, "tent", "last", BLOCKS)


def test_memo_draws_new_copies_for_each_of_its_steps(small_model, stream):
    """MEMO's code augments afresh at every step (`for iteration in range(niter)`): with
    steps=2 the second SGD step is on new copies. Checked against a hand loop: softmax
    mean over the copies, its entropy, p - lr * grad on the last block, twice."""
    x = stream[0][:1]
    reference = copy.deepcopy(small_model).eval()
    config = MemoConfig(copies=4, lr=0.05, steps=2)
    calls = []

    def counting(image, copies, generator):
        calls.append(copies)
        return augmenter()(image, copies, generator)

    adapter = make_adapter(small_model, "memo", "last", BLOCKS, config, False, counting,
                           torch.Generator().manual_seed(3))
    got = adapter.predict(x)
    assert calls == [4, 4]                     # one draw of 4 copies per step
    g = torch.Generator().manual_seed(3)
    params = [p for n, p in reference.named_parameters() if n.startswith("fc.")]
    for _ in range(2):
        copies = augmenter()(x[0], 4, g)       # fresh copies at each step
        p_bar = reference(copies).softmax(1).mean(0)
        loss = -(p_bar * p_bar.log()).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, grad in zip(params, grads):
                p -= 0.05 * grad
    with torch.no_grad():
        torch.testing.assert_close(got, reference(x), rtol=1e-4, atol=1e-5)


def test_a_trailing_batch_of_two_or_more_images_stays_a_batch_of_its_own():
    """Only a trailing single image joins the batch before it (it has no batch
    statistics); a trailing batch of 2 or more is its own batch, as TENT's loader gives it."""
    assert [len(b) for b in stream_batches(torch.arange(8), 3)] == [3, 3, 2]
    assert [len(b) for b in stream_batches(torch.arange(450), 200)] == [200, 200, 50]
    assert [len(b) for b in stream_batches(torch.arange(401), 200)] == [200, 201]


def test_memo_takes_one_image_at_a_time(small_model, stream):
    with pytest.raises(ValueError, match="one image at a time"):
        memo(small_model, "last").predict(stream[0][:2])


def test_a_trailing_single_image_joins_the_previous_tent_batch():
    batches = stream_batches(torch.arange(7), 3)
    assert [len(b) for b in batches] == [3, 4]
    assert torch.equal(torch.cat(batches), torch.arange(7))
    assert [len(b) for b in stream_batches(torch.arange(3), 1)] == [1, 1, 1]


# --- augmentations ----------------------------------------------------------------------------

@pytest.mark.parametrize("channels,side", [(1, 28), (3, 32)])
def test_augmentations_work_on_grayscale_and_rgb_and_are_seeded(channels, side):
    aug = MemoAugmenter((0.4,) * channels, (0.3,) * channels)
    image = torch.rand(channels, side, side, generator=torch.Generator().manual_seed(0))
    image = (image - 0.4) / 0.3
    a = aug(image, 8, torch.Generator().manual_seed(1))
    b = aug(image, 8, torch.Generator().manual_seed(1))
    assert a.shape == (8, channels, side, side) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])                       # copies differ
    pixels = a * 0.3 + 0.4
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="one image of shape"):
        aug(image[None], 2, torch.Generator())


def test_augmix_chains_have_1_to_max_depth_operations(monkeypatch):
    """Each of the `width` (3) chains applies 1..max_depth (3) operations, so a copy takes
    3..9: counted over 300 copies with a counting identity as the only operation (all-1 and
    all-3 chains each come with probability 1/27 per copy)."""
    calls = []
    monkeypatch.setitem(augment_memo.OPERATIONS, "count", lambda x, g, s: calls.append(1) or x)
    aug = MemoAugmenter((0.5,), (0.25,))
    aug.names = ["count"]
    image, g = torch.rand(1, 12, 12), torch.Generator().manual_seed(0)
    per_copy = set()
    for _ in range(300):
        calls.clear()
        aug.augmix(image, g)
        per_copy.add(len(calls))
    assert per_copy == set(range(3, 10))


def test_augmix_chains_start_from_the_cropped_image(monkeypatch):
    """AugMix mixes chains applied to the crop-flipped image with that image itself: with
    identity operations (any Dirichlet weights, any keep) the copy is the crop-flipped
    image, drawn as `crop_flip` draws it from an identically seeded generator."""
    monkeypatch.setitem(augment_memo.OPERATIONS, "identity", lambda x, g, s: x)
    aug = MemoAugmenter((0.5,), (0.25,))
    aug.names = ["identity"]
    image = torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        expected = augment_memo.crop_flip(image, torch.Generator().manual_seed(seed),
                                          aug.padding, aug.flip)
        got = aug.augmix(image, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_an_operations_strength_is_uniform_between_0_1_and_the_severity_over_10():
    """AugMix's sample_level: U(0.1, severity) on the 0..10 scale, as a fraction of 10 (MEMO's
    severity 1: strengths 0.01 to 0.1, never 0). The same uniform draws, mapped by hand."""
    for severity in (1.0, 3.0):
        draws = torch.rand(200, generator=torch.Generator().manual_seed(4)).tolist()
        g = torch.Generator().manual_seed(4)
        got = [augment_memo._level(g, severity) for _ in range(200)]
        want = [(0.1 + (severity - 0.1) * u) / 10 for u in draws]
        assert got == pytest.approx(want, rel=1e-6)
        assert min(got) >= 0.01 and max(got) <= severity / 10


def test_histogram_operations():
    levels = torch.arange(256).view(1, 16, 16)
    ramp = levels.float() / 255
    assert torch.equal(posterize(ramp, 1), (levels >= 128).float() * 128 / 255)
    assert torch.equal(posterize(ramp, 4), (levels & 0xF0).float() / 255)
    assert torch.equal(solarize(ramp, 200), torch.where(levels >= 200, 255 - levels, levels).float() / 255)
    # PIL's equalize on 4 levels x 1000 pixels: step = (4000 - 1000) // 255 = 11,
    # lut = (5 + pixels below) // 11 -> 0, 91, 182, 273 (clipped to 255).
    dark = (torch.arange(4000).float().view(1, 40, 100) % 4) / 255
    assert torch.equal(torch.unique(equalize(dark) * 255).round(), torch.tensor([0.0, 91, 182, 255]))
    tiny = dark[:, :1, :8]                                          # step 0: left alone
    assert torch.equal(equalize(tiny), tiny)


def test_autocontrast_rounds_to_8_bits_as_pil():
    """PIL's table truncates level * scale + offset: with levels 44..235 the top level
    maps to int(254.99999999999997) = 254, not 255; the levels stay 8-bit."""
    ramp = torch.arange(44, 236).float().view(1, 1, -1) / 255
    levels = autocontrast(ramp) * 255
    assert torch.equal(levels, levels.round()) and levels.max().item() == 254
    assert levels.min().item() == 0
    flat = torch.full((1, 3, 3), 0.5)
    assert torch.allclose(autocontrast(flat), torch.full_like(flat, 128 / 255))
    pil = pytest.importorskip("PIL.ImageOps")
    from PIL import Image
    for lo in (0, 1, 44, 100, 254):
        for hi in range(lo, 256, 3):
            q = torch.arange(lo, hi + 1, dtype=torch.uint8).view(1, 1, -1)
            ours = (autocontrast(q.float() / 255) * 255).round().to(torch.uint8)
            theirs = torch.from_numpy(np.array(pil.autocontrast(Image.fromarray(q[0].numpy()))))
            assert torch.equal(ours[0], theirs), (lo, hi)


def test_geometric_operations_fill_with_grey_and_zero_is_identity():
    x = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rotate(x, 0), x, atol=1e-6)
    assert torch.allclose(translate_x(x, 0), x, atol=1e-6)
    moved = translate_x(x, 3)
    assert torch.allclose(moved[:, :, :7], x[:, :, 3:], atol=1e-6)
    assert torch.allclose(moved[:, :, 7:], torch.full_like(moved[:, :, 7:], GREY), atol=1e-6)


# --- protocol, results file, resume, report ---------------------------------------------------

def _tiny_protocol(**kw) -> AdaptProtocol:
    fields = dict(benchmark="synthetic", arch=ARCH, shifts=["noise"], methods=["tent", "memo"],
                  blocks=["none", "first"], seeds=[0], images=6, test_per_class=3,
                  checkpoint="none", memo={"copies": 2, "lr": [0.01, 0.001]},
                  tent={"batch_size": 3})
    return AdaptProtocol.from_dict({**fields, **kw})


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_each_stream_line_counts_the_streams_done_and_to_do(tmp_path, one_thread, capsys):
    """A whole protocol runs for an hour or more: each line says k/N, and a resumed run
    counts the streams already in the file (here the three `none` ones)."""
    out = tmp_path / "adapt.csv"
    run_adaptation(_tiny_protocol(blocks=["none"]), out)
    assert [line.split()[3] for line in capsys.readouterr().err.splitlines()] == \
        ["1/3", "2/3", "3/3"]
    run_adaptation(_tiny_protocol(), out)      # tent, memo lr 0.01, memo lr 0.001: none, first
    assert [line.split()[3] for line in capsys.readouterr().err.splitlines()] == \
        ["2/6", "4/6", "6/6"]


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_run_resumes_and_refuses_other_settings(tmp_path, one_thread):
    out = tmp_path / "adapt.csv"
    first = run_adaptation(_tiny_protocol(), out, progress=False)
    assert (first.ran, first.skipped) == (6, 0)            # tent x2 blocks + memo x2 lrs x2 blocks
    rows = read_adapt_results(out)
    assert is_adapt_results(out) and len(rows) == 6
    again = run_adaptation(_tiny_protocol(), out, progress=False)
    assert (again.ran, again.skipped) == (0, 6)
    assert read_adapt_results(out) == rows
    assert {r["machine"] for r in rows} == {machine("cpu")}   # where each stream ran
    assert {r["data"] for r in rows} == {"{}"}                # the loader options (none here)
    # a file from before the data and machine columns: read with them empty, resumed, rewritten
    older = [fields[:-2] for fields in csv.reader(io.StringIO(out.read_text()))][:-1]
    assert older[0][-1] == "settings"
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(older)  # the last stream left out
    out.write_text(buffer.getvalue())
    assert is_adapt_results(out) and {r["machine"] for r in read_adapt_results(out)} == {None}
    again = run_adaptation(_tiny_protocol(), out, progress=False)
    assert (again.ran, again.skipped) == (1, 5)
    assert [r["machine"] for r in read_adapt_results(out)] == [None] * 5 + [machine("cpu")]
    assert [r["data"] for r in read_adapt_results(out)] == [None] * 5 + ["{}"]
    with pytest.raises(ValueError, match="other settings"):
        run_adaptation(_tiny_protocol(tent={"batch_size": 2}), out, progress=False)
    # new streams (seed 1, another lr) beside rows that ran otherwise: refused too, since
    # they would share a table; another lr with the same settings is fine
    with pytest.raises(ValueError, match=r'other settings.*"copies": 4'):
        run_adaptation(_tiny_protocol(methods=["memo"], seeds=[1],
                                      memo={"copies": 4, "lr": [0.01]}), out, progress=False)
    assert run_adaptation(_tiny_protocol(methods=["memo"], blocks=["first"],
                                         memo={"copies": 2, "lr": [0.1]}), out,
                          progress=False).ran == 1
    table = relative_table(rows)
    assert set(table) == {("tent", False, 0.001, 6), ("memo", False, 0.01, 6),
                          ("memo", False, 0.001, 6)}                # (method, episodic, lr, images)


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_each_shifts_streams_run_on_that_shifts_test_split(tmp_path, monkeypatch, one_thread):
    """With two shifts, the streams of the second adapt on the second shift's images and
    labels, not on the split loaded for the first."""
    seen = []
    def recording(source, arch, method, option, config, images, labels, *rest, **kw):
        seen.append((images.clone(), labels.clone()))
        return adapt_stream(source, arch, method, option, config, images, labels, *rest, **kw)
    monkeypatch.setattr("deep.adapt.runner.adapt_stream", recording)
    protocol = _tiny_protocol(shifts=["noise", "flip"], methods=["tent"])
    assert run_adaptation(protocol, tmp_path / "a.csv", progress=False).ran == 4
    splits = {shift: load_test_split(protocol, shift, 0, None) for shift in ("noise", "flip")}
    assert not torch.equal(splits["noise"][0], splits["flip"][0])
    expected = [splits["noise"]] * 2 + [splits["flip"]] * 2   # blocks none, first per shift
    for (images, labels), (want_images, want_labels) in zip(seen, expected, strict=True):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_each_seeds_streams_run_in_that_seeds_order(tmp_path, monkeypatch, one_thread):
    """The runner streams seed s's images in the order of a permutation drawn from s
    (`stream_order`: torch.randperm with a generator seeded by s, first `images` of it),
    so two seeds see different orders, not seed 0's every time."""
    orders = []
    def recording(source, arch, method, option, config, images, labels, order, *rest, **kw):
        orders.append((len(labels), order.clone()))
        return adapt_stream(source, arch, method, option, config, images, labels, order,
                            *rest, **kw)
    monkeypatch.setattr("deep.adapt.runner.adapt_stream", recording)
    protocol = _tiny_protocol(methods=["tent"], blocks=["none"], seeds=[0, 1])
    assert run_adaptation(protocol, tmp_path / "a.csv", progress=False).ran == 2
    for seed, (n, order) in enumerate(orders):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(order, perm[:6]), seed         # protocol images = 6
    assert not torch.equal(orders[0][1], orders[1][1])


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_each_seeds_memo_streams_draw_augmentations_seeded_by_that_seed(tmp_path, monkeypatch,
                                                                         one_thread):
    """MEMO's augmentation generator of a stream is `augment_generator(seed, shift)` of
    that stream's seed: seed 1 does not reuse seed 0's augmented copies."""
    states = []
    def recording(*args, **kw):
        states.append(args[9].get_state())       # adapt_stream's generator, before any draw
        return adapt_stream(*args, **kw)
    monkeypatch.setattr("deep.adapt.runner.adapt_stream", recording)
    protocol = _tiny_protocol(methods=["memo"], blocks=["none"], seeds=[0, 1],
                              memo={"copies": 2, "lr": [0.01]})
    assert run_adaptation(protocol, tmp_path / "a.csv", progress=False).ran == 2
    assert [torch.equal(s, augment_generator(seed, "noise").get_state())
            for seed, s in zip((0, 1), states, strict=True)] == [True, True]


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_an_episodic_run_adapts_its_streams_episodically(tmp_path, monkeypatch, one_thread):
    # guards: the runner recording episodic=True while adapting the stream online
    seen = []
    def recording(*args, **kw):
        seen.append(args[-1])                    # adapt_stream's last argument: episodic
        return adapt_stream(*args, **kw)
    monkeypatch.setattr("deep.adapt.runner.adapt_stream", recording)
    out = tmp_path / "a.csv"
    protocol = _tiny_protocol(methods=["tent"], blocks=["first"])
    assert run_adaptation(protocol, out, episodic=True, progress=False).ran == 1
    assert seen == [True] and [r["episodic"] for r in read_adapt_results(out)] == [True]


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_a_row_counts_the_images_streamed_when_the_protocol_takes_all(tmp_path, one_thread):
    # guards: the row's `images` taking the protocol's 0 (= all) instead of the count streamed
    out = tmp_path / "a.csv"
    protocol = _tiny_protocol(methods=["tent"], blocks=["none"], images=0)
    assert run_adaptation(protocol, out, progress=False).ran == 1
    n = len(load_test_split(protocol, "noise", 0, None)[1])
    assert n > 6 and [r["images"] for r in read_adapt_results(out)] == [n]


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_the_stream_count_covers_every_seed_and_shift(tmp_path, one_thread, capsys):
    """2 seeds x 2 shifts x 1 method x 1 block option = 4 streams, counted by hand."""
    protocol = _tiny_protocol(methods=["tent"], blocks=["none"], seeds=[0, 1],
                              shifts=["noise", "flip"])
    run_adaptation(protocol, tmp_path / "a.csv")
    assert [line.split()[3] for line in capsys.readouterr().err.splitlines()] == \
        ["1/4", "2/4", "3/4", "4/4"]


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_a_stream_line_names_the_mode_and_the_images_streamed(tmp_path, one_thread, capsys):
    """An episodic run's line says `episodic`, and the count of images is the stream's
    (the protocol's 4), not the whole test split's it was drawn from."""
    protocol = _tiny_protocol(methods=["tent"], blocks=["none"], images=4)
    assert len(load_test_split(protocol, "noise", 0, None)[1]) > 4
    run_adaptation(protocol, tmp_path / "a.csv", episodic=True)
    (line,) = capsys.readouterr().err.splitlines()
    assert " tent episodic lr 0.001 none: " in line and " on 4 images " in line
    run_adaptation(protocol, tmp_path / "b.csv")
    assert " tent online lr 0.001 none: " in capsys.readouterr().err


def test_a_test_split_decoded_batch_by_batch_is_streamed_whole(monkeypatch):
    """A split of image files (no `images` tensor, only `batches`) is read in batches of
    256 and joined: all its images and labels, in its order."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(300, 1, 4, 4, generator=g), torch.randint(5, (300,), generator=g)

    class Batched:                                    # as deep.data.base.FileSplit
        def batches(self, batch_size):
            for start in range(0, len(labels), batch_size):
                yield images[start:start + batch_size], labels[start:start + batch_size], None
    from types import SimpleNamespace
    bench = SimpleNamespace(num_classes=5,
                            load_task=lambda *args, **kw: SimpleNamespace(test=Batched()))
    monkeypatch.setattr("deep.adapt.runner.get_benchmark", lambda name: bench)
    monkeypatch.setattr("deep.adapt.runner.stream_loader_options", lambda protocol: {})
    got_images, got_labels = load_test_split(_tiny_protocol(), "noise", 0, None)
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)


def test_a_streams_parameter_counts_are_numbers_of_weights(small_model, stream):
    """adapted_params and total_params count scalars, not tensors: TENT on `first` adapts
    the weight and bias of each BatchNorm of bn1 / layer1: 2 x its channels."""
    images, labels = stream
    r = adapt_stream(small_model, ARCH, "tent", "first", TentConfig(batch_size=3), images,
                     labels, torch.arange(6))
    norms = [m for name, m in small_model.named_modules()
             if isinstance(m, nn.BatchNorm2d) and inside_blocks(name, "first")]
    assert r.adapted_params == sum(2 * m.num_features for m in norms)
    assert r.total_params == sum(p.numel() for p in small_model.parameters())


def test_method_configs_default_to_the_published_settings():
    """MEMO's CIFAR-10 script (script_c10.sh: 32 copies, SGD lr 0.005, niter 1, severity 1,
    no BN prior) and TENT's cfgs/tent.yaml (Adam lr 1e-3, beta 0.9, batch 200, one step)."""
    memo = MemoConfig()
    assert (memo.copies, memo.lr, memo.steps, memo.prior_strength, memo.severity) == \
        (32, 0.005, 1, -1, 1.0)
    tent = TentConfig()
    assert (tent.batch_size, tent.lr, tent.beta, tent.steps, tent.batch_stats) == \
        (200, 1e-3, 0.9, 1, "blocks")


@pytest.mark.parametrize("make,field", [
    (lambda v: MemoConfig(copies=v), "MEMO copies"), (lambda v: MemoConfig(steps=v), "MEMO steps"),
    (lambda v: TentConfig(steps=v), "TENT steps")], ids=["memo-copies", "memo-steps", "tent-steps"])
def test_counts_of_copies_and_steps_are_whole_numbers_from_1(make, field):
    """0 steps would predict with the source model (MEMO) or fail on the first batch with
    no forward made (TENT); 0 or 2.5 copies would fail on the first image of a stream:
    each is refused where the config is made, by name."""
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=field):
            make(bad)


def test_tent_batch_size_must_be_a_whole_number():
    """A float batch size (200.0 in a protocol file) was accepted and failed in torch's
    split at the first TENT stream, after the streams before it had run; "200" was a bare
    TypeError from the comparison."""
    for bad in (2.5, 200.0, "200", True, None):
        with pytest.raises(ConfigError, match=r"TENT batch_size must be an integer"):
            TentConfig(batch_size=bad)
    with pytest.raises(ConfigError, match=r"at least 2 images"):
        TentConfig(batch_size=1)
    assert TentConfig(batch_size=np.int64(64)).batch_size == 64
    # the same refusal from a protocol file, before any stream runs
    raw, path = read_protocol_file(ADAPT_CONFIG_DIR, "fmnist-c", "adaptation protocol")
    raw["tent"] = {**raw.get("tent", {}), "batch_size": 200.0}
    with pytest.raises(ConfigError, match=r"TENT batch_size must be an integer, got 200\.0"):
        AdaptProtocol.from_dict(raw, str(path)).config("tent")


def test_protocol_files_load_with_the_methods_defaults():
    fm = load_adapt_protocol("fmnist-c")
    assert fm.config("memo").copies == 32 and 0.005 in [c.lr for c in fm.configs("memo")]
    assert fm.config("tent").batch_size == 200 and fm.config("tent").lr == 1e-3
    assert "last" not in fm.blocks_of("tent")
    cifar = load_adapt_protocol("cifar10c")
    assert cifar.config("memo").lr == 0.005 and cifar.config("memo").copies == 32
    assert cifar.blocks_of("memo") == ["none", "first", "first+second", "last", "all"]
    with pytest.raises(ValueError, match="no adaptation protocol"):
        load_adapt_protocol("nope")
    with pytest.raises(ValueError, match="unknown key"):
        _tiny_protocol(memo={"copiez": 2})


def test_the_listed_adaptation_protocols_are_names_that_load():
    """`python -m deep protocols` lists `adapt:<name>` for each file of configs/adapt: the
    benchmark's name (the file's stem), which `load_adapt_protocol` takes back."""
    from deep.adapt.protocol import available
    assert available() == ["cifar10c", "fmnist-c"]
    assert [load_adapt_protocol(name).benchmark for name in available()] == available()


def test_cli_end_to_end_and_report(tmp_path, one_thread, real_fmnist, capsys):
    from deep.__main__ import main
    out = tmp_path / "r.csv"
    args = ["adapt", "--benchmark", "fmnist-c", "--out", str(out), "--method", "memo,tent",
            "--blocks", "none,first", "--shifts", "fog", "--seeds", "0", "--images", "6",
            "--copies", "2", "--batch-size", "3", "--no-progress"]
    assert main(args) == 0
    rows = read_adapt_results(out)
    assert {(r["method"], r["blocks"]) for r in rows} == {(m, b) for m in ("memo", "tent")
                                                          for b in ("none", "first")}
    assert all(r["images"] == 6 and 0 <= r["test_acc"] <= 1 for r in rows)
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "MEMO, online" in table and "TENT, online" in table
    assert (tmp_path / "rep" / "relative_accuracy.png").stat().st_size > 0
    assert main(args[:-1] + ["--blocks", "last", "--method", "tent"]) == 2   # clear error, exit 2
    assert math.isfinite(rows[0]["seconds"])
    # the protocol's own value given as a flag (-1.0 against the file's -1) is no other setting
    assert main(args + ["--prior-strength", "-1"]) == 0 and read_adapt_results(out) == rows
    # another severity is another stream: refused, not skipped as finished or added beside
    capsys.readouterr()
    assert main(args + ["--data", "severity=3"]) == 2
    assert "other settings" in capsys.readouterr().err and read_adapt_results(out) == rows


# --- BatchNorm statistics: MEMO's prior, TENT's scope -----------------------------------------

def test_memo_bn_prior_weights_running_statistics_by_the_prior():
    """Guards MEMO's BN prior (N = 16, prior N/(N+1)): statistics are prior * running +
    (1 - prior) * the batch's (unbiased variance), not the weights swapped."""
    from deep.adapt.core import _prior_forward
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    p = 16 / 17
    # by hand: per-channel mean and unbiased variance over (N, H, W)
    flat = x.transpose(0, 1).reshape(3, -1)
    batch_mean = flat.sum(1) / flat.shape[1]
    batch_var = ((flat - batch_mean[:, None]) ** 2).sum(1) / (flat.shape[1] - 1)
    mean = p * torch.ones(3) + (1 - p) * batch_mean
    var = p * 4.0 * torch.ones(3) + (1 - p) * batch_var
    shape = (1, 3, 1, 1)
    expected = ((x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
                * bn.weight.detach().view(shape) + bn.bias.detach().view(shape))
    with torch.no_grad():
        got = _prior_forward(bn, p, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bn.running_mean, torch.ones(3))            # no buffer is written


def test_memo_with_a_bn_prior_predicts_under_the_prior_statistics():
    """Guards MemoAdapter's use of the prior: prior_strength N = 16 means weight N/(N+1) on
    the running statistics (not 1/(N+1)), and the final prediction of the image is made
    with those mixed statistics too (not the running ones alone), after its step."""
    from deep.adapt.core import _prior_forward, patched_batchnorm
    model = bn_net()
    with torch.no_grad():   # running statistics far from the image's, so the prior shows
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    adapter = make_adapter(model, "memo", "last", BN_NET_BLOCKS,
                           MemoConfig(copies=4, prior_strength=16), False, jitter,
                           torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    head = model[5].weight.detach().clone()
    got = adapter.predict(x)                      # online: the adapted head stays
    assert not torch.equal(model[5].weight, head)
    with torch.no_grad(), patched_batchnorm(model.modules(),
                                            lambda m, t: _prior_forward(m, 16 / 17, t)):
        expected = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_stats, expected", [("blocks", {"1": True, "3": False}),
                                                   ("all", {"1": True, "3": True})])
def test_tent_batch_stats_all_normalises_every_batchnorm_with_the_batch(batch_stats, expected):
    """Guards TentConfig.batch_stats: "blocks" gives batch statistics only to the BatchNorm
    layers of the adapted blocks (the rest keep running ones); "all" to every one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4), nn.Flatten(1)).eval()
    with torch.no_grad():
        for bn in (model[1], model[3]):   # running statistics far from any batch's
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(9.0)
    blocks = {"first": ("0", "1"), "last": ("2", "3")}
    adapter = make_adapter(model, "tent", "first", blocks,
                           TentConfig(batch_size=4, batch_stats=batch_stats), False)
    assert adapter.names == ["1.weight", "1.bias"]
    uses_batch = {}

    def record(name):
        def hook(m, inputs, out):
            x = inputs[0]
            batch = nn.functional.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
            running = nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight,
                                               m.bias, False, 0.0, m.eps)
            assert torch.allclose(out, batch) != torch.allclose(out, running)
            uses_batch[name] = torch.allclose(out, batch)
        return hook

    for name in ("1", "3"):
        getattr(model, name).register_forward_hook(record(name))
    adapter.predict(torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0)))
    assert uses_batch == expected


def test_memo_bn_prior_statistics_are_constants_in_its_gradient():
    """MEMO's ImageNet code computes the input's BatchNorm statistics with a separate
    `batch_norm(..., training=True, momentum=1.0)` into fresh tensors, so the mixed
    statistics are constants of the backward pass. One step on the first block (conv + BN,
    where a gradient through the statistics would reach the conv) checked against a hand
    loop whose statistics are computed by hand and detached."""
    torch.manual_seed(0)
    conv, bn, fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 3.0]))
        bn.weight.copy_(torch.tensor([1.5, 0.7, -1.2, 0.9]))
        bn.bias.copy_(torch.tensor([0.2, -0.1, 0.3, 0.0]))
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    reference = copy.deepcopy(model)
    jitter_half = functools.partial(jitter, scale=0.5)
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    lr, p = 0.5, 16 / 17
    adapter = make_adapter(model, "memo", "first", {"first": ("0", "1"), "last": ("5",)},
                           MemoConfig(copies=4, lr=lr, prior_strength=16), False, jitter_half,
                           torch.Generator().manual_seed(0))
    got = adapter.predict(x)

    r_conv, r_bn, r_fc = reference[0], reference[1], reference[5]

    def forward(images):
        h = r_conv(images)
        flat = h.detach().transpose(0, 1).reshape(4, -1)      # statistics: constants
        n = flat.shape[1]
        mean = flat.sum(1) / n
        var = ((flat - mean[:, None]) ** 2).sum(1) / (n - 1)
        mean = p * r_bn.running_mean + (1 - p) * mean
        var = p * r_bn.running_var + (1 - p) * var
        s = (1, 4, 1, 1)
        h = (h - mean.view(s)) / torch.sqrt(var.view(s) + r_bn.eps) * r_bn.weight.view(s) \
            + r_bn.bias.view(s)
        return r_fc(torch.relu(h).mean(dim=(2, 3)))

    params = [r_conv.weight, r_conv.bias, r_bn.weight, r_bn.bias]
    p_bar = forward(jitter_half(x[0], 4, torch.Generator().manual_seed(0))).softmax(1).mean(0)
    grads = torch.autograd.grad(-(p_bar * p_bar.log()).sum(), params)
    with torch.no_grad():
        for param, grad in zip(params, grads):
            param -= lr * grad
        expected = forward(x)
    for name, param in zip(("0.weight", "0.bias", "1.weight", "1.bias"), params):
        torch.testing.assert_close(dict(model.named_parameters())[name], param,
                                   rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["tent", "memo-prior"])
def test_batchnorm_is_back_on_its_running_statistics_after_each_prediction(method):
    """TENT's batch statistics and MEMO's prior patch BatchNorm only while the adapter
    predicts: afterwards the adapted model computes as a plain module in eval mode with the
    same weights (running statistics), as a fresh copy with its state loaded does."""
    model = bn_net()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    if method == "tent":
        adapter = make_adapter(model, "tent", "first", BN_NET_BLOCKS, TentConfig(batch_size=4))
        adapter.predict(x)
    else:
        adapter = make_adapter(model, "memo", "last", BN_NET_BLOCKS,
                               MemoConfig(copies=4, prior_strength=16), False, jitter,
                               torch.Generator().manual_seed(0))
        adapter.predict(x[:1])
    plain = bn_net()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain.eval()(x), rtol=0, atol=0)


def test_autocontrast_stretches_each_rgb_channel_on_its_own_as_pil():
    """Channels of different ranges (and one flat): each is stretched to its own
    [min, max], as PIL's ImageOps.autocontrast does on an RGB image."""
    ops = pytest.importorskip("PIL.ImageOps")
    from PIL import Image
    levels = torch.stack([torch.linspace(50, 100, 16).round(), torch.linspace(0, 255, 16).round(),
                          torch.full((16,), 128.0)]).view(3, 4, 4)
    image = Image.fromarray(levels.permute(1, 2, 0).to(torch.uint8).numpy(), "RGB")
    expected = torch.tensor(np.asarray(ops.autocontrast(image))).permute(2, 0, 1).float()
    got = autocontrast(levels / 255) * 255
    assert torch.equal(got.round(), expected)
    assert got[0].min() == 0 and got[0].max() >= 254 and torch.equal(got[2], levels[2])


# --- the third audit ---------------------------------------------------------------------------

def test_memo_without_augmentations_or_a_generator_is_a_clear_error():
    """MEMO adapting a block needs its augmented copies and their generator: refused where
    the adapter is made, not a TypeError at the first image; "none" adapts nothing and
    needs neither."""
    for augment, generator in ((None, torch.Generator()), (augmenter(), None)):
        with pytest.raises(ConfigError, match="MEMO needs an augment function and a torch.Generator"):
            make_adapter(bn_net(), "memo", "last", BN_NET_BLOCKS, MemoConfig(copies=2), False,
                         augment, generator)
    assert make_adapter(bn_net(), "memo", "none", BN_NET_BLOCKS, MemoConfig()).names == []


def test_a_config_of_another_method_is_a_clear_error():
    with pytest.raises(ConfigError, match="TENT needs a TentConfig, got MemoConfig"):
        make_adapter(bn_net(), "tent", "first", BN_NET_BLOCKS, MemoConfig())
    with pytest.raises(ConfigError, match="MEMO needs a MemoConfig, got TentConfig"):
        make_adapter(bn_net(), "memo", "first", BN_NET_BLOCKS, TentConfig(), False, augmenter(),
                     torch.Generator())


def test_tent_minimises_the_mean_entropy_of_each_batch_whatever_its_size():
    """TENT's loss is the batch mean of the entropies. A sum would scale each batch's
    gradient by its size, which Adam's second moment does not undo across batches of 3 and
    4 images (a stream of 7 in batches of 3: the single last image joins the batch before
    it). Checked against a hand loop: softmax, entropy, mean, one Adam step per batch."""
    from deep.adapt.core import _batch_stat_forward, patched_batchnorm
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model, reference = bn_net(), bn_net()
    adapter = make_adapter(model, "tent", "first", BN_NET_BLOCKS, TentConfig(batch_size=3, lr=0.05))
    run_stream(adapter, x, torch.zeros(7, dtype=torch.long), torch.arange(7), 3)
    params = [reference[1].weight, reference[1].bias]
    optimizer = torch.optim.Adam(params, lr=0.05, betas=(0.9, 0.999))
    with patched_batchnorm([reference[1]], _batch_stat_forward):
        for batch in (x[:3], x[3:]):
            p = reference(batch).softmax(1)
            optimizer.zero_grad()
            (-(p * p.log()).sum(1)).mean().backward()
            optimizer.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(adapter.params, params))


def test_a_block_named_twice_in_one_option_is_refused_where_it_is_parsed():
    """"first+first" is no union: refused by the parser (and so by a protocol built in
    Python), not only by the command line after it has loaded the protocol."""
    with pytest.raises(ConfigError, match=r"block\(s\) \['first'\] repeated in 'first\+first'"):
        parse_blocks("first+first")
    with pytest.raises(ConfigError, match=r"block\(s\) \['first'\] repeated"):
        _tiny_protocol(blocks=["none", "first+first"])
    assert parse_blocks("first+second") == ["first", "second"]
