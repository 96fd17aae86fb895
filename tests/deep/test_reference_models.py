"""`resnet26-gn` (TTT/MEMO) and `wrn28-10` (RobustBench): names, shapes, the function of a
block computed by hand, tune blocks, BN folding, the prefix cache, input normalisation.

The expected key lists below are written from the public descriptions of the two
networks (layer widths, strides, module names), not from our model code.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deep.blocks import blocks_for, tuned_parameter_names
from deep.data.base import TensorSplit
from deep.errors import ConfigError
from deep.pretrain import PretrainConfig
from deep.models import build_model, get_architecture
from deep.models.gn_resnet import PreActBlock
from deep.models.wide_resnet import BasicBlock, WideResNet
from deep.prefix_cache import PrefixCache, folded_view
from deep.train import TrainConfig, fit
from tests.deep.fixtures.by_hand import (assert_fan_out_init, batch_norm_by_hand, group_norm_by_hand,
                                         randomise_norms, shortcut_by_hand)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ expected layouts

def _bn(shapes: dict, prefix: str, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{name}"] = (channels,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def wrn28_10_layout(num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """RobustBench WideResNet(depth=28, widen_factor=10): 3 groups of 4 blocks, widths
    160/320/640; the first block of each group has a 1x1 convShortcut."""
    shapes = {"conv1.weight": (16, 3, 3, 3)}
    for group, (cin, cout) in enumerate([(16, 160), (160, 320), (320, 640)], start=1):
        for i in range(4):
            prefix, width_in = f"block{group}.layer.{i}", cin if i == 0 else cout
            _bn(shapes, f"{prefix}.bn1", width_in)
            shapes[f"{prefix}.conv1.weight"] = (cout, width_in, 3, 3)
            _bn(shapes, f"{prefix}.bn2", cout)
            shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
            if i == 0:
                shapes[f"{prefix}.convShortcut.weight"] = (cout, cin, 1, 1)
    _bn(shapes, "bn1", 640)
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 640), (num_classes,)
    return shapes


def resnet26_gn_layout(num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """TTT/MEMO ResNetCifar(26, width 1) with GroupNorm: 3 layers of 4 pre-activation
    blocks, widths 16/32/64, parameter-free downsampling, final norm `bn`."""
    shapes = {"conv1.weight": (16, 3, 3, 3)}
    for layer, (cin, cout) in enumerate([(16, 16), (16, 32), (32, 64)], start=1):
        for i in range(4):
            prefix, width_in = f"layer{layer}.{i}", cin if i == 0 else cout
            shapes[f"{prefix}.bn1.weight"] = shapes[f"{prefix}.bn1.bias"] = (width_in,)
            shapes[f"{prefix}.conv1.weight"] = (cout, width_in, 3, 3)
            shapes[f"{prefix}.bn2.weight"] = shapes[f"{prefix}.bn2.bias"] = (cout,)
            shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
    shapes["bn.weight"] = shapes["bn.bias"] = (64,)
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 64), (num_classes,)
    return shapes


@pytest.mark.parametrize("arch, layout, params, entries", [
    ("wrn28-10", wrn28_10_layout, 36_479_194, 155),
    ("resnet26-gn", resnet26_gn_layout, 366_938, 77),
])
def test_keys_shapes_and_parameter_count(arch, layout, params, entries):
    model = build_model(arch, 10, 3)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = layout()
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert len(got) == entries
    assert sum(p.numel() for p in model.parameters()) == params
    counted = sum(math.prod(s) for k, s in expected.items()
                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert counted == params  # the written layout itself agrees with the published count


def test_group_norm_resnet_has_only_group_norms_of_8_groups():
    """25 norms (2 per block, 3 x 4 blocks, and the final `bn`), each a GroupNorm(8) with
    affine parameters and torch's eps, and each the crash-guarded subclass of
    deep.models.gn_resnet (a plain nn.GroupNorm(8) computes the same numbers but brings
    back torch's channels-last backward segfault)."""
    from deep.models.gn_resnet import GroupNorm
    model = build_model("resnet26-gn", 10)
    norms = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm))}
    assert len(norms) == 3 * 4 * 2 + 1 and "bn" in norms
    for name, m in norms.items():
        assert type(m) is GroupNorm and (m.num_groups, m.eps, m.affine) == (8, 1e-5, True), name
    assert not list(model.buffers())  # nothing but weights: no running statistics


def test_group_norm_resnet_convs_start_from_the_originals_fan_out_initialisation():
    """The TTT code draws conv weights from N(0, 2 / (k * k * out_channels)): fan-out. It
    differs from fan-in where the width changes (the 3 -> 16 stem, the 16 -> 32 and
    32 -> 64 first convs), by a factor of 2.3 or 1.4 in the standard deviation."""
    torch.manual_seed(0)
    assert len(assert_fan_out_init(build_model("resnet26-gn", 10))) == 25


# ------------------------------------------------------------------ one block by hand

@pytest.mark.parametrize("cin, cout, stride", [(160, 160, 1), (160, 320, 2), (16, 160, 1)])
def test_wide_resnet_block_by_hand(cin, cout, stride):
    torch.manual_seed(0)
    block = BasicBlock(cin, cout, stride).eval()
    randomise_norms(block)
    x = torch.randn(2, cin, 8, 8)
    active = torch.relu(batch_norm_by_hand(x, block.bn1))
    h = F.conv2d(active, block.conv1.weight, stride=stride, padding=1)
    h = F.conv2d(torch.relu(batch_norm_by_hand(h, block.bn2)), block.conv2.weight, padding=1)
    # equal widths add the raw input; otherwise the 1x1 shortcut of the activated input
    shortcut = x if cin == cout else F.conv2d(active, block.convShortcut.weight, stride=stride)
    with torch.no_grad():
        assert torch.allclose(block(x), h + shortcut, atol=1e-5)
    assert (block.convShortcut is None) == (cin == cout)


@pytest.mark.parametrize("cin, cout, stride", [(16, 16, 1), (16, 32, 2)])
def test_group_norm_block_by_hand(cin, cout, stride):
    torch.manual_seed(0)
    block = PreActBlock(cin, cout, stride)
    randomise_norms(block)
    x = torch.randn(2, cin, 8, 8)
    h = F.conv2d(torch.relu(group_norm_by_hand(x, block.bn1)), block.conv1.weight,
                 stride=stride, padding=1)
    h = F.conv2d(torch.relu(group_norm_by_hand(h, block.bn2)), block.conv2.weight, padding=1)
    if stride == 1:
        shortcut = x
    else:  # mean of each 2x2 window, then zero channels up to the new width
        pooled = x.reshape(2, cin, 4, 2, 4, 2).mean(dim=(3, 5))
        shortcut = torch.cat([pooled, torch.zeros(2, cout - cin, 4, 4)], 1)
    with torch.no_grad():
        assert torch.allclose(block(x), h + shortcut, atol=1e-5)


@pytest.mark.parametrize("arch", ["wrn28-10", "resnet26-gn"])
def test_head_by_hand(arch):
    """The end of the network: final norm, relu, mean over the 8x8 map, fc."""
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    randomise_norms(model)
    last_stage, norm = (model.block3, model.bn1) if arch == "wrn28-10" else (model.layer3, model.bn)
    features = {}
    last_stage.register_forward_hook(lambda m, i, out: features.update(out=out.clone()))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        by_hand = batch_norm_by_hand if arch == "wrn28-10" else group_norm_by_hand
        pooled = torch.relu(by_hand(features["out"], norm)).mean(dim=(2, 3))
        assert features["out"].shape[-2:] == (8, 8)
        assert torch.allclose(logits, pooled @ model.fc.weight.T + model.fc.bias, atol=1e-5)


# ------------------------------------------------------------------ blocks and normalisation

def test_public_code_blocks_and_normalisation():
    wrn = get_architecture("wrn28-10")
    assert wrn.blocks == {"first": ("conv1", "block1"), "second": ("block2",),
                          "third": ("block3",), "last": ("fc",)}
    assert wrn.normalization == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    gn = get_architecture("resnet26-gn")
    assert gn.blocks == {"first": ("conv1", "layer1"), "second": ("layer2",),
                         "third": ("layer3",), "last": ("fc",)}
    assert gn.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert get_architecture("resnet26").normalization is None  # the dataset's own


@pytest.mark.parametrize("arch, final_norm", [("wrn28-10", "bn1"), ("resnet26-gn", "bn")])
def test_final_norm_is_tuned_only_by_all(arch, final_norm):
    model = build_model(arch, 10)
    blocks = blocks_for(arch)
    in_blocks = {n for option in blocks for n in tuned_parameter_names(model, option, blocks)}
    everything = set(tuned_parameter_names(model, "all", blocks))
    assert everything - in_blocks == {f"{final_norm}.weight", f"{final_norm}.bias"}
    first = tuned_parameter_names(model, "first", blocks)
    assert "conv1.weight" in first and not any(n.startswith(final_norm + ".") for n in first)


def test_wide_resnet_folding_is_the_same_function():
    """Folded pairs: each block's conv1 -> bn2, and the stem conv -> block1's first bn1."""
    torch.manual_seed(0)
    model = WideResNet(10, depth=10, widen_factor=2).eval()  # same code, small
    randomise_norms(model)
    pairs = model.conv_bn_pairs()
    assert ("conv1", "block1.layer.0.bn1") in pairs and ("block2.layer.0.conv1",
                                                         "block2.layer.0.bn2") in pairs
    assert len(pairs) == 3 + 1
    view = folded_view(model)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(view(x), model(x), atol=1e-4)


def test_group_norm_is_never_folded():
    model = build_model("resnet26-gn", 10)
    assert model.conv_bn_pairs() == [] and folded_view(model) is None


def _random_task(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    labels = torch.arange(n) % 10
    return TensorSplit(images, labels, name="random")


@pytest.mark.parametrize("method", ["second", "third", "last"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_group_norm_prefix_is_cached(method, channels_last):
    """A frozen GN prefix is computed once and reused: the same run with the cache as
    without, and the run really started after the cached stages. With channels-last
    activations (the CPU default) convolutions round differently: losses only, looser."""
    train, val = _random_task(40), _random_task(20, seed=1)
    blocks = blocks_for("resnet26-gn")
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        model = build_model("resnet26-gn", 10)
        config = TrainConfig(lr=1e-3, epochs=2, batch_size=20, use_cache=use_cache,
                             channels_last=channels_last and use_cache)
        result = fit(model, train, val, None, method, config, blocks)
        runs.append((torch.tensor(result.losses), torch.cat([p.flatten() for p in model.parameters()])))
        if use_cache:
            assert result.history[0]["start_stage"] == {"second": 1, "third": 2, "last": 3}[method]
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-3 if channels_last else 1e-5, rtol=0)
    if not channels_last:  # Adam turns rounding-sized gradient differences into lr-sized steps
        assert torch.allclose(runs[0][1], runs[1][1], atol=1e-5)


GN_BACKWARD = """
import torch
from deep.models.gn_resnet import GroupNorm
x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
norm = {cls}(8, 16)
norm(x).square().sum().backward()
reference = torch.nn.GroupNorm(8, 16)
reference(x.contiguous()).square().sum().backward()
assert torch.allclose(norm.weight.grad, reference.weight.grad, atol=1e-4)
"""


@pytest.mark.parametrize("cls, crashes", [("torch.nn.GroupNorm", True), ("GroupNorm", False)])
def test_group_norm_channels_last_backward_crash_is_avoided(cls, crashes):
    """torch 2.13's CPU GroupNorm backward segfaults on a channels-last input that needs no
    gradient (the input of a tuned stage read from the prefix cache); ours does not."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", GN_BACKWARD.format(cls=cls)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=120)
    if crashes and done.returncode == 0:
        pytest.skip(f"torch {torch.__version__} no longer crashes here: the guard in "
                    "deep.models.gn_resnet.GroupNorm could go")
    assert (done.returncode != 0) == crashes, done.stderr[-2000:]


def test_prefix_cache_holds_group_norm_stage_inputs():
    model = build_model("resnet26-gn", 10).eval()
    split = _random_task(8)
    cache = PrefixCache(model, {"train": split}, fold_bn=True, channels_last=False)
    acts, stage = cache.inputs("train", 3)
    assert stage == 3 and acts.shape == (8, 64)
    with torch.no_grad():
        assert torch.allclose(model.fc(acts), model(split.images), atol=1e-5)


# ------------------------------------------------------------------ normalisation and protocols

def test_loader_options_carry_the_architecture_normalisation():
    from deep.data.cifar10 import load_cifar10c
    from deep.normalization import loader_options

    assert loader_options(load_cifar10c, "cifar10c", "resnet26", {"severity": 5}) == {"severity": 5}
    assert loader_options(load_cifar10c, "cifar10c", "wrn28-10", {"severity": 5}) == {
        "severity": 5, "normalization": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
    with pytest.raises(ValueError, match="contradicts resnet26-gn's own"):
        loader_options(load_cifar10c, "cifar10c", "resnet26-gn",
                       {"normalization": [[0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]]})

    def no_option_loader(data_dir, shift, n_target, val_per_class, test_per_class, seed):
        raise AssertionError("not called")

    with pytest.warns(UserWarning, match="takes no 'normalization' option"):
        assert loader_options(no_option_loader, "imagenet-c", "wrn28-10", {}) == {}
    # silent when the benchmark's own statistics are the architecture's
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader_options(no_option_loader, "fmow", "clip-vit-tiny", {}) == {}


def test_cifar_loaders_normalise_as_asked(tmp_path):
    from tests.deep.fixtures import writers
    from deep.data import get_benchmark

    writers.write_cifar10c(tmp_path)
    writers.write_cifar10_batches(tmp_path)
    load = get_benchmark("cifar10c").load_task
    raw = load(tmp_path, "fog", 10, 1, 1, seed=0, normalization=((0, 0, 0), (1, 1, 1)))
    memo = load(tmp_path, "fog", 10, 1, 1, seed=0, normalization=((0.5,) * 3, (0.5,) * 3))
    red = raw.train.images[:, 0]
    assert torch.equal(red, torch.full_like(red, 200 / 255))  # severity 5: red = 200
    assert torch.allclose(memo.train.images, (raw.train.images - 0.5) / 0.5)
    source = get_benchmark("cifar10c").load_source(tmp_path, normalization=((0, 0, 0), (1, 1, 1)))
    assert 0 <= source.train.images.min() and source.train.images.max() <= 1
    with pytest.raises(ValueError, match="3 numbers each"):
        load(tmp_path, "fog", 10, 1, 1, seed=0, normalization=((0.5,), (0.5,)))


def test_official_protocol_is_the_public_codes():
    from deep.data import get_benchmark
    from deep.data.cifar10 import CORRUPTIONS
    from deep.protocol import load_protocol

    official = load_protocol("cifar10c-official")
    assert official.arch == "wrn28-10" and official.benchmark == "cifar10c-official"
    assert len(official.shifts) == 15 and set(official.shifts) == set(
        get_benchmark("cifar10c-official").shifts)
    assert set(CORRUPTIONS) - set(official.shifts) == {"brightness", "contrast",
                                                       "elastic_transform", "fog"}
    assert set(official.shifts) - set(CORRUPTIONS) == {"gaussian_blur", "saturate", "spatter",
                                                       "speckle_noise"}
    assert (official.n_target, official.val_per_class, official.test_per_class,
            official.epochs, official.batch_size) == (1000, 10, 90, 15, 64)
    assert official.methods[:5] == ["first", "second", "third", "last", "all"]
    assert load_protocol("cifar10c").arch == "resnet26-gn"


@pytest.mark.parametrize("benchmark, shift, arch, methods, wrap, pixel_stats", [
    ("cifar10c", "fog", "resnet26-gn", ("first", "last"),
     lambda sd: {"err_cls": __import__("numpy").float64(0.0917), "err_ssh": 0, "net": sd},
     ((0.5,) * 3, (0.5,) * 3)),
    ("cifar10c-official", "gaussian_noise", "wrn28-10", ("last",),
     lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
     ((0.0,) * 3, (1.0,) * 3)),
])
def test_cli_sweep_on_the_cifar10c_fixture(tmp_path, monkeypatch, benchmark, shift, arch,
                                           methods, wrap, pixel_stats):
    """The protocol's architecture, from a file in its origin's layout, through the CLI
    sweep; the loader normalised with the architecture's statistics."""
    import deep.data.cifar10 as cifar10
    from deep.__main__ import main
    from deep.sweep import read_results
    from tests.deep.fixtures import writers

    writers.write_cifar10c(tmp_path, corruptions=(shift,))
    torch.manual_seed(0)
    checkpoint = tmp_path / "source.pt"
    torch.save(wrap(build_model(arch, 10).state_dict()), checkpoint)
    seen = []
    real = cifar10.to_float_images
    monkeypatch.setattr(cifar10, "to_float_images",
                        lambda a, mean, std: seen.append((tuple(mean), tuple(std))) or real(a, mean, std))
    out = tmp_path / "results.csv"
    code = main(["sweep", "--benchmark", benchmark, "--data-dir", str(tmp_path), "--shifts", shift,
                 "--methods", ",".join(methods), "--lrs", "0.01", "--seeds", "0", "--epochs", "1",
                 "--n-target", "10", "--val-per-class", "1", "--test-per-class", "1",
                 "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"])
    assert code == 0
    rows = read_results(out)
    assert [(r["benchmark"], r["shift"], r["method"], r["status"]) for r in rows] == [
        (benchmark, shift, m, "ok") for m in methods]
    assert rows[-1]["tuned_params"] == 10 * (640 if arch == "wrn28-10" else 64) + 10
    assert seen and set(seen) == {pixel_stats}


def test_resnet50_public_first_block_leaves_out_bn1():
    """The public code's ResNet-50 blocks, same network and keys as resnet50."""
    model = build_model("resnet50-public", 10)
    assert model.state_dict().keys() == build_model("resnet50", 10).state_dict().keys()
    blocks = blocks_for("resnet50-public")
    first = tuned_parameter_names(model, "first", blocks)
    assert "conv1.weight" in first and not {"bn1.weight", "bn1.bias"} & set(first)
    assert all(n == "conv1.weight" or n.startswith("layer1.") for n in first)
    in_blocks = {n for option in blocks for n in tuned_parameter_names(model, option, blocks)}
    assert set(tuned_parameter_names(model, "all", blocks)) - in_blocks == {"bn1.weight", "bn1.bias"}
    ours = tuned_parameter_names(model, "first", blocks_for("resnet50"))
    assert set(ours) - set(first) == {"bn1.weight", "bn1.bias"}


def test_resnet50_checkpoints_load_under_either_block_layout(tmp_path):
    """One network under two names: our checkpoint of either loads as the other (same
    weights, the requested name's blocks); another network is still refused."""
    from deep.checkpoints import CheckpointError, load_model, save_checkpoint
    from deep.models import same_network
    assert same_network("resnet50", "resnet50-public") and same_network("resnet50-public", "resnet50")
    assert not same_network("resnet50", "resnet26") and not same_network("resnet26-gn", "resnet26")
    torch.manual_seed(0)
    model = build_model("resnet50", 4)
    save_checkpoint(tmp_path / "r50.pt", model, "resnet50", 4, 3)
    loaded = load_model(tmp_path / "r50.pt", "resnet50-public", 4, 3)
    assert torch.equal(loaded.layer3[0].conv2.weight, model.layer3[0].conv2.weight)
    save_checkpoint(tmp_path / "pub.pt", loaded, "resnet50-public", 4, 3)
    assert torch.equal(load_model(tmp_path / "pub.pt", "resnet50", 4, 3).fc.weight, model.fc.weight)
    # `pretrain --init` (load_backbone) takes it too: one network, not "another arch"
    from deep.checkpoints import load_backbone
    public = build_model("resnet50-public", 2)
    assert load_backbone(public, tmp_path / "r50.pt", arch="resnet50-public") == [
        "fc.bias", "fc.weight"]
    assert torch.equal(public.layer3[0].conv2.weight, model.layer3[0].conv2.weight)
    save_checkpoint(tmp_path / "r26.pt", build_model("resnet26", 4), "resnet26", 4, 3)
    with pytest.raises(CheckpointError, match="holds arch=resnet26"):
        load_model(tmp_path / "r26.pt", "resnet26-gn", 4, 3)


# The origins' recipes: TTT/MEMO (main.py, script_baseline.sh) and the WideResNet paper's.
RECIPES = {
    "cifar10c": dict(epochs=150, lr=0.1, batch_size=128, weight_decay=5e-4, augment="crop-flip",
                     schedule="step", milestones=[75, 125], gamma=0.1, momentum="plain"),
    "cifar10c-official": dict(epochs=200, lr=0.1, batch_size=128, weight_decay=5e-4,
                              augment="crop-flip", schedule="step", milestones=[60, 120, 160],
                              gamma=0.2, momentum="nesterov"),
}


def test_step_schedule_and_plain_momentum():
    """MultiStepLR's lr by epoch, and SGD without Nesterov when the recipe says plain."""
    from deep.pretrain import PretrainConfig
    from deep.train import _optimizer, _scheduled_lr

    config = PretrainConfig(**RECIPES["cifar10c"]).train_config()
    lrs = [_scheduled_lr(config, epoch) for epoch in range(1, 151)]
    assert lrs[:75] == [0.1] * 75 and lrs[75:125] == pytest.approx([0.01] * 50)
    assert lrs[125:] == pytest.approx([0.001] * 25)
    wrn = PretrainConfig(**RECIPES["cifar10c-official"]).train_config()
    assert [_scheduled_lr(wrn, e) for e in (60, 61, 121, 161)] == pytest.approx(
        [0.1, 0.02, 0.004, 0.0008])
    named = dict(nn.Linear(2, 2).named_parameters())
    plain = _optimizer(named, list(named), config, per_tensor=False)
    nesterov = _optimizer(named, list(named), wrn, per_tensor=False)
    assert plain.param_groups[0]["nesterov"] is False and nesterov.param_groups[0]["nesterov"]
    for bad in (dict(schedule="step"), dict(milestones=[3]),
                dict(schedule="step", milestones=[5, 3]), dict(momentum="heavy")):
        with pytest.raises(ValueError):
            PretrainConfig(**bad)


@pytest.mark.parametrize("settings, message", [
    (dict(gamma=float("nan")), "gamma must be a positive number, got nan"),
    (dict(schedule="step", milestones=[2], gamma=float("inf")), "gamma must be a positive number"),
    (dict(schedule="step", milestones=[2], gamma=-1.0), "gamma must be a positive number"),
    # the cosine schedule has no factor: a gamma given to it would be silently unused
    (dict(gamma=0.5), "gamma 0.5 is the step schedule's factor and needs schedule 'step', got 'cosine'"),
])
def test_a_gamma_that_cannot_act_is_refused(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        PretrainConfig(epochs=5, **settings)


def test_a_milestone_the_run_never_reaches_is_warned_about():
    with pytest.warns(UserWarning, match=r"milestone\(s\) \[5, 9\] not below epochs \(5\) never lower"):
        PretrainConfig(epochs=5, schedule="step", milestones=[2, 5, 9])


@pytest.mark.parametrize("benchmark, arch, pixel_stats", [
    ("cifar10c", "resnet26-gn", ((0.5,) * 3, (0.5,) * 3)),
    ("cifar10c-official", "wrn28-10", ((0.0,) * 3, (1.0,) * 3)),
])
def test_pretrain_produces_each_reference_model(tmp_path, monkeypatch, benchmark, arch,
                                                pixel_stats):
    """`pretrain` from the CIFAR-10 batches: the protocol's arch and recipe (epochs cut
    to 1 here, 10 training images), inputs normalised as the arch expects; the file
    loads back as that arch."""
    import deep.data.cifar10 as cifar10
    from deep.__main__ import main
    from deep.checkpoints import load_model, verify_checkpoint
    from deep.protocol import load_protocol
    from tests.deep.fixtures import writers

    recipe = load_protocol(benchmark).pretrain
    assert {k: getattr(recipe, k) for k in RECIPES[benchmark]} == RECIPES[benchmark]
    writers.write_cifar10_batches(tmp_path, per_batch=2)
    seen = []
    real = cifar10.to_float_images
    monkeypatch.setattr(cifar10, "to_float_images",
                        lambda a, mean, std: seen.append((tuple(mean), tuple(std))) or real(a, mean, std))
    out = tmp_path / "source.pt"
    assert main(["pretrain", "--benchmark", benchmark, "--data-dir", str(tmp_path),
                 "--epochs", "1", "--batch-size", "5", "--out", str(out)]) == 0
    manifest = verify_checkpoint(out)
    assert manifest["arch"] == arch and manifest["epochs"] == 1
    assert set(seen) == {pixel_stats}
    assert isinstance(load_model(out, arch, 10, 3), type(build_model(arch, 10)))


@pytest.mark.parametrize("cin, width, stride", [(32, 8, 1), (16, 8, 2)])
def test_resnet50_bottleneck_by_hand(cin, width, stride):
    """torchvision's Bottleneck: 1x1, 3x3 (the stride), 1x1 with BN and ReLU, plus the
    input (or its 1x1 strided projection when the shape changes), then ReLU."""
    from deep.models.resnet import Bottleneck
    torch.manual_seed(0)
    block = Bottleneck(cin, width, stride).eval()
    randomise_norms(block)
    x = torch.randn(2, cin, 6, 6)
    h = torch.relu(batch_norm_by_hand(F.conv2d(x, block.conv1.weight), block.bn1))
    h = torch.relu(batch_norm_by_hand(F.conv2d(h, block.conv2.weight, stride=stride, padding=1),
                                      block.bn2))
    h = batch_norm_by_hand(F.conv2d(h, block.conv3.weight), block.bn3)
    assert (block.downsample is None) == (cin == 4 * width and stride == 1)
    shortcut = shortcut_by_hand(x, block.downsample, stride)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(h + shortcut), atol=1e-5)


def test_a_given_normalisation_contradicts_the_architectures_in_its_std_alone():
    """resnet26-gn's own normalisation is mean = std = 0.5: a data option with that mean but
    another std is a contradiction too (the weights expect both), while the same numbers
    written as lists or ints are not."""
    from deep.data.cifar10 import load_cifar10c
    from deep.normalization import loader_options
    with pytest.raises(ValueError, match="contradicts resnet26-gn's own"):
        loader_options(load_cifar10c, "cifar10c", "resnet26-gn",
                       {"normalization": [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]})
    assert loader_options(load_cifar10c, "cifar10c", "wrn28-10",
                          {"normalization": [[0, 0, 0], [1, 1, 1]]})["normalization"] == \
        ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_loader_options_refuse_an_unknown_data_option():
    """loader_options checks the options it passes on: a misspelt one (`sevrity`) is named
    before a loader sees it, for an architecture with its own normalisation or without."""
    from deep.data.cifar10 import load_cifar10c
    from deep.normalization import loader_options
    for arch in ("resnet26", "wrn28-10"):
        with pytest.raises(ValueError, match=r"unknown data option\(s\) \['sevrity'\]"):
            loader_options(load_cifar10c, "cifar10c", arch, {"sevrity": 5})


# ------------------------------------------------------------------ construction checks and init

@pytest.mark.parametrize("depth", [27, 26, 29])
def test_wide_resnet_refuses_a_depth_that_is_not_6n_plus_4(depth):
    """RobustBench asserts (depth - 4) % 6 == 0; without the check depth 27 would silently
    build the 22-layer network ((27 - 4) // 6 = 3 blocks per group)."""
    with pytest.raises(ValueError, match=re.escape(f"WideResNet depth must be 6n + 4, got {depth}")):
        WideResNet(10, depth=depth, widen_factor=1)


@pytest.mark.parametrize("depth, per_group", [(10, 1), (16, 2), (28, 4)])
def test_wide_resnet_of_depth_6n_plus_4_has_n_blocks_per_group(depth, per_group):
    with torch.device("meta"):
        model = WideResNet(10, depth=depth, widen_factor=1)
    assert [len(g.layer) for g in (model.block1, model.block2, model.block3)] == [per_group] * 3


@pytest.mark.parametrize("cin, cout", [(16, 24), (32, 16), (16, 40)])
def test_zero_padding_shortcut_refuses_a_width_that_is_no_multiple_of_its_input(cin, cout):
    """The original's Downsample asserts nOut % nIn == 0 (it appends whole zero copies)."""
    from deep.models.gn_resnet import ZeroPadDownsample
    with pytest.raises(ValueError, match=re.escape(
            f"output channels {cout} must be a multiple of input channels {cin}")):
        ZeroPadDownsample(cin, cout, 2)
    with pytest.raises(ValueError, match="must be a multiple of input channels"):
        PreActBlock(cin, cout, 2)


def test_wide_resnet_convs_start_from_robustbenchs_fan_out_initialisation():
    """RobustBench's WideResNet draws conv weights from N(0, 2 / (k * k * out_channels))
    (fan-out). Each conv's empirical std is held to that within 5 %; fan-in, sqrt(2 / (k *
    k * in_channels)), is sqrt(out / in) times it and misses that bound by far wherever the
    width changes, which happens at 4 or more convs (stem, block1-3's first conv1 and
    shortcuts)."""
    torch.manual_seed(0)
    model = WideResNet(10, depth=10, widen_factor=4)  # the same code, 1 block per group
    convs = assert_fan_out_init(model, tolerance=0.05)
    changing_width = [c for c in convs if abs((c.out_channels / c.in_channels) ** 0.5 - 1) > 0.1]
    assert len(changing_width) >= 4
