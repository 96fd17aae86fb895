"""Architectures: torchvision's ResNet-50 layout, the CIFAR ResNet-26, stages."""

from __future__ import annotations

import re

import pytest
import torch

from deep.models import ARCHS, build_model, stages_of
from tests.deep.fixtures.by_hand import (assert_fan_out_init, batch_norm_by_hand, randomise_norms,
                                         shortcut_by_hand)


def expected_resnet50_shapes(num_classes=1000):
    """Written from the ResNet-50 description (He et al. 2016, torchvision v1.5 layout),
    independently of deep.models: name -> shape for every state-dict entry."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,),
                       f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                       f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, cin, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            bn(f"{p}.bn3", 4 * width)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * width, cin, 1, 1)
                bn(f"{p}.downsample.1", 4 * width)
            cin = 4 * width
    shapes["fc.weight"] = (num_classes, 2048)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def test_resnet50_matches_torchvision_layout():
    model = build_model("resnet50", 1000)
    state = model.state_dict()
    expected = expected_resnet50_shapes()
    assert set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(state) == 320
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
    assert state["fc.weight"].shape == (1000, 2048)
    # 25,557,032 parameters is the published count of torchvision's resnet50
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    blocks_per_stage = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
                        for i in range(1, 5)]
    assert blocks_per_stage == [3, 4, 6, 3]


def test_resnet50_forward_shape_and_stride():
    model = build_model("resnet50", 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    # v1.5: the stride sits on the 3x3 conv of each stage's first block
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)


def resnet26_param_count(width, in_channels, num_classes):
    """Counted by hand: stem conv + BN, 3 stages of 4 BasicBlocks, fc."""
    total = in_channels * width * 9 + 2 * width
    cin = width
    for w in (width, 2 * width, 4 * width):
        for b in range(4):
            c_in = cin if b == 0 else w
            total += c_in * w * 9 + 2 * w + w * w * 9 + 2 * w
            if b == 0 and c_in != w:
                total += c_in * w + 2 * w
        cin = w
    return total + 4 * width * num_classes + num_classes


@pytest.mark.parametrize("arch,width", [("resnet26", 16), ("resnet26-w8", 8), ("resnet26-w4", 4)])
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 28)])
def test_cifar_resnet26(arch, width, in_channels, size):
    model = build_model(arch, 10, in_channels).eval()
    names = {k.split(".")[0] for k in model.state_dict()}
    assert names == {"conv1", "bn1", "layer1", "layer2", "layer3", "fc"}
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [4, 4, 4]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 26  # 25 3x3 convs + fc (1x1 shortcuts not counted)
    assert sum(p.numel() for p in model.parameters()) == resnet26_param_count(width, in_channels, 10)
    with torch.no_grad():
        x = torch.randn(3, in_channels, size, size)
        out = model(x)
        stages = stages_of(model)
        mid = stages.run(x, 0, 2)
        assert torch.allclose(stages.run(mid, 2), out, atol=1e-6)
    assert out.shape == (3, 10)


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'resnet18'.*resnet26"):
        build_model("resnet18", 10)
    assert "resnet50" in ARCHS


@pytest.mark.parametrize("num_classes, in_channels, message", [
    (0, 3, "num_classes must be at least 1, got 0"),
    (2.5, 3, "num_classes must be an integer, got 2.5"),
    ("10", 3, "num_classes must be an integer, got '10'"),
    (10, 0, "in_channels must be at least 1, got 0"),
    (10, 3.0, "in_channels must be an integer, got 3.0"),
])
def test_build_model_names_a_size_that_is_not_a_count(num_classes, in_channels, message):
    """A float or a string used to reach the network's layers: a TypeError from torch.empty
    or from `<`, naming neither argument."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model("resnet26-w4", num_classes, in_channels)


def test_stage_ownership_covers_every_parameter():
    for arch in ("resnet26", "resnet26-w8", "resnet26-w4", "resnet50"):  # the ResNets with fc, conv1
        model = build_model(arch, 5)
        stages = stages_of(model)
        assert set(stages.param_stage) == {n for n, _ in model.named_parameters()}
        assert stages.param_stage["fc.weight"] == len(stages) - 1
        assert stages.param_stage["conv1.weight"] == 0


# ------------------------------------------------------------------ functions by hand

def test_resnet50_stem_by_hand():
    """conv1 7x7 stride 2 padding 3 -> bn1 -> relu -> max pool 3x3 stride 2 padding 1:
    a 64x64 image reaches layer1 as a 16x16 map."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = randomise_norms(build_model("resnet50", 3)).eval()
    seen = {}
    model.layer1.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].clone()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        h = torch.relu(batch_norm_by_hand(F.conv2d(x, model.conv1.weight, stride=2, padding=3),
                                          model.bn1))
        expected = F.max_pool2d(h, 3, stride=2, padding=1)
    assert expected.shape == (2, 64, 16, 16)
    assert seen["x"].shape == expected.shape
    assert torch.allclose(seen["x"], expected, atol=1e-5)


@pytest.mark.parametrize("cin, cout, stride", [(16, 16, 1), (16, 32, 2)])
def test_cifar_basic_block_by_hand(cin, cout, stride):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut), the shortcut a strided 1x1 conv
    + BN where the shape changes: the ReLU comes after the sum."""
    import torch.nn.functional as F
    from deep.models.cifar_resnet import BasicBlock
    torch.manual_seed(0)
    block = randomise_norms(BasicBlock(cin, cout, stride)).eval()
    x = torch.randn(2, cin, 8, 8)
    h = torch.relu(batch_norm_by_hand(F.conv2d(x, block.conv1.weight, stride=stride, padding=1),
                                      block.bn1))
    h = batch_norm_by_hand(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    assert (block.downsample is None) == (stride == 1 and cin == cout)
    shortcut = shortcut_by_hand(x, block.downsample, stride)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(h + shortcut), atol=1e-5)


@pytest.mark.parametrize("in_channels, size", [(3, 32), (1, 28)])
def test_cifar_resnet26_stage_resolutions(in_channels, size):
    """The CIFAR ResNet keeps full resolution in layer1 and halves it in layer2 and layer3
    (32 -> 32, 16, 8 maps; 28 -> 28, 14, 7), widths w, 2w, 4w."""
    model = build_model("resnet26-w4", 10, in_channels).eval()
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, out, name=name: shapes.update({name: tuple(out.shape)}))
    with torch.no_grad():
        model(torch.randn(2, in_channels, size, size))
    half, quarter = (size + 1) // 2, (size + 3) // 4
    assert shapes == {"layer1": (2, 4, size, size), "layer2": (2, 8, half, half),
                      "layer3": (2, 16, quarter, quarter)}


@pytest.mark.parametrize("arch", ["resnet26", "resnet50"])
def test_convs_start_from_torchvisions_fan_out_initialisation(arch):
    """torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu"),
    std = sqrt(2 / (k * k * out_channels)). Fan-in differs wherever the width changes
    (the stem: 3 -> 16 or 64 channels; every 1x1 bottleneck conv of ResNet-50)."""
    torch.manual_seed(0)
    assert_fan_out_init(build_model(arch, 10))


@pytest.mark.parametrize("arch, size, last, grid", [("resnet50", 64, "layer4", 2),
                                                    ("resnet26-w4", 32, "layer3", 8)])
def test_resnet_head_averages_the_last_map(arch, size, last, grid):
    """Global average pooling of the last stage's map, then fc (max pooling, or any
    other reduction, gives other logits)."""
    torch.manual_seed(0)
    model = randomise_norms(build_model(arch, 5)).eval()
    seen = {}
    getattr(model, last).register_forward_hook(lambda m, i, out: seen.update(out=out.clone()))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert seen["out"].shape[-2:] == (grid, grid)
    expected = seen["out"].mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias
    assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_cifar_resnet26_stem_by_hand(in_channels):
    """conv1 3x3 stride 1 padding 1 -> bn1 -> relu: layer1 receives the activated map at full
    resolution (a missing stem ReLU passes every block-level test: the blocks are right)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = randomise_norms(build_model("resnet26-w4", 10, in_channels)).eval()
    seen = {}
    model.layer1.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].clone()))
    x = torch.randn(2, in_channels, 12, 12)
    with torch.no_grad():
        model(x)
        expected = torch.relu(batch_norm_by_hand(F.conv2d(x, model.conv1.weight, padding=1),
                                                 model.bn1))
    assert expected.shape == (2, 4, 12, 12)
    assert (expected < 0).sum() == 0 and (expected == 0).any()  # the ReLU acted here
    assert torch.allclose(seen["x"], expected, atol=1e-5)


@pytest.mark.parametrize("arch, size", [("wrn", 24), ("resnet26-gn", 28), ("resnet26-gn", 64)])
def test_reference_model_heads_average_the_whole_map_at_any_input_size(arch, size):
    """The originals pool with a fixed 8x8 window (the map of a 32x32 input); ours average
    the whole last map so that other sizes work: a 28x28 input (7x7 map) gives the mean of
    the 49 positions, a 64x64 one (16x16 map) the mean of 256, not a 2x2 grid."""
    from deep.models.wide_resnet import WideResNet
    from tests.deep.fixtures.by_hand import group_norm_by_hand
    torch.manual_seed(0)
    if arch == "wrn":
        model, norm_by_hand = WideResNet(5, depth=10, widen_factor=2), batch_norm_by_hand
        last, norm = model.block3, model.bn1
    else:
        model, norm_by_hand = build_model(arch, 5), group_norm_by_hand
        last, norm = model.layer3, model.bn
    model = randomise_norms(model).eval()
    seen = {}
    last.register_forward_hook(lambda m, i, out: seen.update(out=out.clone()))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    quarter = (size + 3) // 4  # two stride-2 stages, each ceil(n / 2)
    assert seen["out"].shape[-2:] == (quarter, quarter)
    pooled = torch.relu(norm_by_hand(seen["out"], norm)).mean(dim=(2, 3))
    assert torch.allclose(logits, pooled @ model.fc.weight.T + model.fc.bias, atol=1e-5)


def test_wide_resnet_starts_with_a_zero_fc_bias():
    """RobustBench's init zeroes the linear layer's bias (nn.Linear's own draws it from
    U(-1/sqrt(640), 1/sqrt(640))): a fresh network starts with equal logit offsets."""
    from deep.models.wide_resnet import WideResNet
    torch.manual_seed(0)
    model = WideResNet(7, depth=10, widen_factor=2)
    assert model.fc.bias.shape == (7,) and torch.equal(model.fc.bias, torch.zeros(7))
    assert model.fc.weight.abs().sum() > 0  # the weight keeps its random draw


# ------------------------------------------------------------------ every registered network

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_network_takes_the_input_channels_it_is_built_for(arch, in_channels):
    """Grayscale benchmarks (Fashion-MNIST) build with in_channels=1: a stem fixed at 3
    channels, or a registry entry that drops in_channels, fails only on such data. Built and
    run on the meta device (shapes only), so ViT-B/16 costs nothing."""
    with torch.device("meta"):
        model = build_model(arch, 5, in_channels).eval()
    size = getattr(getattr(model, "config", None), "image_size", 32)
    with torch.no_grad():
        out = model(torch.empty(2, in_channels, size, size, device="meta"))
    assert tuple(out.shape) == (2, 5)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == in_channels


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stage_index_outside_the_stages_is_refused_naming_the_valid_range(arch):
    """`stage(i, x)` of a network with n stages refuses i = n (and -1) with the range
    [0, n) the engine's Stages count, not a stale count of another network."""
    with torch.device("meta"):
        model = build_model(arch, 5)
    count = len(stages_of(model))
    x = torch.empty(2, 3, 32, 32, device="meta")
    for index in (count, -1):
        with pytest.raises(IndexError, match=re.escape(
                f"stage index must be in [0, {count}), got {index}")):
            model.stage(index, x)


def cifar_resnet26_block_names():
    """The paper's CIFAR ResNet-26 tune blocks, written from its layout: first = the stem
    (conv1, bn1) and layer1, second = layer2, third = layer3, last = fc (weight and bias).
    Each BasicBlock has conv1, bn1, conv2, bn2; the first block of layer2 and layer3 (width
    and stride change) a 1x1 conv + BN shortcut `downsample.0` / `downsample.1`."""
    def layer(i):
        names = []
        for b in range(4):
            p = f"layer{i}.{b}"
            names += [f"{p}.conv1.weight", f"{p}.bn1.weight", f"{p}.bn1.bias",
                      f"{p}.conv2.weight", f"{p}.bn2.weight", f"{p}.bn2.bias"]
            if b == 0 and i > 1:
                names += [f"{p}.downsample.0.weight", f"{p}.downsample.1.weight",
                          f"{p}.downsample.1.bias"]
        return names
    return {"first": ["conv1.weight", "bn1.weight", "bn1.bias", *layer(1)],
            "second": layer(2), "third": layer(3), "last": ["fc.weight", "fc.bias"]}


@pytest.mark.parametrize("arch", ["resnet26", "resnet26-w8", "resnet26-w4"])
def test_cifar_resnet26_tune_blocks_are_the_papers_exactly(arch):
    from deep.blocks import blocks_for, tuned_parameter_names
    model = build_model(arch, 10)
    blocks = blocks_for(arch)
    expected = cifar_resnet26_block_names()
    assert list(blocks) == list(expected)
    for option, names in expected.items():
        assert tuned_parameter_names(model, option, blocks) == names, option
    assert sorted(tuned_parameter_names(model, "all", blocks)) == sorted(
        n for names in expected.values() for n in names)
