"""Switches that reproduce the public code's automatic methods (docs/reference-models.md):
the "bn"-name exclusion rule, Adam rebuilt every epoch for Auto-RGN and Auto-SNR, and
Auto-SNR's "eb-criterion" statistic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deep.train as train_module
from deep.blocks import blocks_for
from deep.data.base import TensorSplit
from deep.methods import AutoRGN, AutoSNR, eb_criterion, excluded_parameter_names
from deep.models import build_model
from deep.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _norm_names(model, kinds):
    return {f"{m_name}.{p}" for m_name, m in model.named_modules() if isinstance(m, kinds)
            for p, _ in m.named_parameters(recurse=False)}


def test_exclusion_rules_differ_where_the_docs_say():
    gn = build_model("resnet26-gn", 10)
    assert excluded_parameter_names(gn, "batchnorm") == set()
    assert excluded_parameter_names(gn, "bn-name") == _norm_names(gn, nn.GroupNorm)
    assert len(excluded_parameter_names(gn, "bn-name")) == 2 * 25

    r50 = build_model("resnet50", 10)
    by_type, by_name = (excluded_parameter_names(r50, r) for r in ("batchnorm", "bn-name"))
    assert by_type - by_name == {"layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias",
                                 "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
                                 "layer3.0.downsample.1.weight", "layer3.0.downsample.1.bias",
                                 "layer4.0.downsample.1.weight", "layer4.0.downsample.1.bias"}
    assert by_name <= by_type

    from deep.models.wide_resnet import WideResNet
    wrn = WideResNet(10, depth=10, widen_factor=1)
    assert excluded_parameter_names(wrn, "batchnorm") == excluded_parameter_names(wrn, "bn-name")
    with pytest.raises(ValueError, match="exclude must be one of"):
        excluded_parameter_names(wrn, "norms")


def _task(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10, name="t")


# The public code's variants; Auto-SNR's threshold 0 tunes every candidate in both
# epochs, so that each tensor's step count shows whether Adam restarted.
PUBLIC_VARIANTS = {
    "auto-rgn": lambda blocks, reset: AutoRGN(blocks, exclude="bn-name", reset_optimizer=reset),
    "auto-snr": lambda blocks, reset: AutoSNR(blocks, statistic="eb-criterion", exclude="bn-name",
                                              threshold=0.0, reset_optimizer=reset),
}


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("name", sorted(PUBLIC_VARIANTS))
def test_reset_rebuilds_adam_every_epoch(monkeypatch, name, reset):
    """Adam's step count after 2 epochs of 2 steps: 2 when it restarts each epoch, else 4."""
    made = []
    real = train_module._optimizer
    monkeypatch.setattr(train_module, "_optimizer",
                        lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    torch.manual_seed(0)
    model = build_model("resnet26-gn", 10)
    method = PUBLIC_VARIANTS[name](blocks_for("resnet26-gn"), reset)
    fit(model, _task(), _task(10, 1), None, method,
        TrainConfig(lr=1e-3, epochs=2, batch_size=10), blocks_for("resnet26-gn"))
    (optimizer,) = made
    steps = {float(s["step"]) for s in optimizer.state.values()}
    assert steps == {2.0 if reset else 4.0}
    tuned = {n for g in optimizer.param_groups for n in g["names"]}
    assert len(optimizer.state) == len(tuned)  # every candidate was stepped in epoch 2
    assert not any("bn" in n for n in tuned)  # the GroupNorms sit out under the public rule


def test_eb_criterion_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    batches = [(torch.randn(5, 4), torch.randint(0, 2, (5,))) for _ in range(3)]
    names = [n for n, _ in model.named_parameters()]
    got = eb_criterion(model, names, batches)
    for name, param in model.named_parameters():
        values = []
        for x, y in batches:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            g = param.grad
            spread = ((g - g.mean(0, keepdim=True)) ** 2).sum(0, keepdim=True) / (g.shape[0] - 1)
            values.append((g * g / (spread + 1e-8)).mean().item())
        assert got[name] == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_auto_snr_eb_criterion_tunes_tensors_at_or_above_095():
    torch.manual_seed(0)
    model = build_model("resnet26-gn", 10)
    blocks = blocks_for("resnet26-gn")
    method = AutoSNR(blocks, statistic="eb-criterion", exclude="bn-name")
    result = fit(model, _task(), _task(10, 1), None, method,
                 TrainConfig(lr=1e-3, epochs=1, batch_size=10), blocks)
    stats = method.last_snr
    assert stats and not any("bn" in n for n in stats)
    chosen = [n for n, v in stats.items() if v >= 0.95]
    assert 0 < len(chosen) < len(stats)  # a real selection on this model
    assert result.history[0]["tuned"] == sum(dict(model.named_parameters())[n].numel()
                                             for n in chosen)
    with pytest.raises(ValueError, match="statistic must be one of"):
        AutoSNR(blocks, statistic="snr")
