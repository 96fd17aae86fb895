"""Method plans against every registered architecture (deep/methods.py)."""

from __future__ import annotations

import pytest
import torch

from deep.blocks import ALL, blocks_for, tuned_parameter_names
from deep.data.base import TensorSplit
from deep.methods import get_method
from deep.models import architecture_names, build_model
from deep.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")
GRADUAL = ("gradual-first-last", "gradual-last-first")


def _plans(method, model, epochs):
    method.prepare(model, TrainConfig(lr=1e-3, epochs=epochs))
    return [set(method.plan(e, None).tuned) for e in range(1, epochs + 1)]


@pytest.mark.parametrize("arch", architecture_names())
def test_gradual_unfreezing_ends_as_full_fine_tuning(arch):
    """Whatever the blocks leave out (resnet26-gn's bn, wrn28-10's bn1, resnet50-public's
    bn1, a CLIP ViT's middle blocks, ln_post and proj), the last stage tunes exactly
    what `all` tunes; the stages before it tune the blocks joined so far, nothing more."""
    model, blocks = build_model(arch, 10), blocks_for(arch)
    everything = set(tuned_parameter_names(model, ALL, blocks))
    for name in GRADUAL:
        method = get_method(name, blocks)
        plans = _plans(method, model, 8)
        assert set(method.candidates()) == everything
        assert set().union(*plans) == everything
        assert plans[-1] == everything
        start = method.last_phase_start()
        assert all(plans[e - 1] == everything for e in range(start, 9))
        order = list(blocks) if name.endswith("first-last") else list(reversed(blocks))
        for epoch in range(1, start):  # block k joins at 1 + floor(8k / K)
            joined = [o for k, o in enumerate(order) if 1 + 8 * k // len(order) <= epoch]
            assert plans[epoch - 1] == set(tuned_parameter_names(model, joined, blocks))
    del model


@pytest.mark.parametrize("name", GRADUAL)
def test_gradual_unfreezing_moves_the_final_norm(name):
    """Through `fit`: resnet26-gn's final GroupNorm (in no block) is in the optimizer and
    changes once the last stage starts (epoch 2 of 2: blocks join at epochs 1, 1, 2, 2)."""
    torch.manual_seed(0)
    model, blocks = build_model("resnet26-gn", 10), blocks_for("resnet26-gn")
    g = torch.Generator().manual_seed(0)
    train = TensorSplit(torch.rand(20, 3, 32, 32, generator=g), torch.arange(20) % 10, name="t")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("bn.")}
    result = fit(model, train, None, None, get_method(name, blocks),
                 TrainConfig(lr=1e-2, epochs=2, batch_size=10), blocks)
    assert result.history[-1]["tuned"] == sum(p.numel() for p in model.parameters())
    named = dict(model.named_parameters())
    assert before and all(not torch.equal(named[n], b) for n, b in before.items())


def test_per_example_statistics_stay_on_the_parameters_device():
    """Auto-SNR's float64 sums live where the gradients are (on CUDA a CPU sum fails:
    'Expected all tensors to be on the same device'); the meta device stands in for a
    GPU here: shapes and devices propagate, no numbers are computed."""
    from deep.methods import per_example_gradient_moments
    model = build_model("resnet26-w4", 4).eval().to("meta")
    x = torch.empty(4, 3, 16, 16, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    mean, var, n = per_example_gradient_moments(model, ["fc.weight", "layer1.0.conv1.weight"],
                                                [(x, y)])
    assert n == 4
    assert {t.device.type for t in (*mean.values(), *var.values())} == {"meta"}


def _block_names(model, prefixes):
    """Parameter names under any of `prefixes`, by hand (a prefix names a whole module)."""
    return {n for n, _ in model.named_parameters()
            if any(n == p or n.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("arch", ["resnet26-w4", "resnet26-gn", "wrn28-10", "resnet50-public"])
def test_lp_ft_probes_the_head_for_floor_E_over_2_epochs_then_tunes_every_parameter(arch):
    """README: epochs 1..floor(E/2) tune `last`, the remaining epochs everything, also the
    parameters in no block (resnet26-gn's final GroupNorm `bn`, wrn28-10's `bn1`,
    resnet50-public's `bn1`). E = 1 has no probing epoch at all: floor(1/2) = 0."""
    model, blocks = build_model(arch, 10), blocks_for(arch)
    head = _block_names(model, blocks[list(blocks)[-1]])
    everything = {n for n, _ in model.named_parameters()}
    expected = {1: [everything], 3: [head, everything, everything],
                4: [head, head, everything, everything]}
    for epochs, plans in expected.items():
        method = get_method("lp-ft", blocks)
        assert _plans(method, model, epochs) == plans, epochs
        assert method.last_phase_start() == {1: 1, 3: 2, 4: 3}[epochs]
        assert set(method.candidates()) == everything
