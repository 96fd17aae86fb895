"""Every registered architecture keeps the promises the engine builds on, checked on the
registry itself (`architecture_names()`), so a new architecture is held to them without
adding its name anywhere:

- each block's prefixes name parameters of the built network (a typo would tune nothing);
- blocks come in forward order (gradual unfreezing and the report's plots rely on it);
- a staged network's stages own every parameter, and running them one by one gives the
  network's own output (the prefix cache runs them that way);
- every (conv, batch norm) pair it lists for folding is one where the norm takes the conv's
  output directly: the folded network gives the same output as the network, with batch-norm
  statistics and affine parameters far from their initial values (a pair listed wrongly,
  e.g. a norm after the ReLU, passes every test at the initial statistics).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deep.models import architecture_names, build_model, get_architecture
from deep.models.registry import matches, matches_any
from deep.models.staged import StagedModel, stages_of
from deep.prefix_cache import FoldedConvBN, folded_view

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES, CHANNELS = 5, 3


@pytest.fixture(scope="module", params=architecture_names())
def built(request):
    """(architecture, network in eval mode with random BN statistics, a batch of inputs)."""
    arch = get_architecture(request.param)
    torch.manual_seed(0)
    model = arch.build(CLASSES, CHANNELS).eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.2, 3)
            with torch.no_grad():
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", 32)
    images = torch.randn(2, CHANNELS, size, size, generator=torch.Generator().manual_seed(1))
    return arch, model, images


def test_every_block_names_parameters_of_the_network(built):
    arch, model, _ = built
    names = [n for n, _ in model.named_parameters()]
    for option, prefixes in arch.blocks.items():
        for prefix in prefixes:
            assert any(matches_any(n, (prefix,)) for n in names), \
                f"{arch.name}: block {option!r} prefix {prefix!r} matches no parameter"


def test_a_prefix_matches_whole_module_names_only():
    """"layer1" owns "layer1.0.conv1.weight" but not "layer10.weight": a bare startswith
    would hand a network's 10th+ layer (or ViT block) to the option naming the 1st."""
    assert matches("layer1.0.conv1.weight", "layer1") and matches("layer1", "layer1")
    assert not matches("layer10.weight", "layer1")
    assert not matches("visual.transformer.resblocks.11.ln_1.bias",
                       "visual.transformer.resblocks.1")


def test_blocks_come_in_forward_order(built):
    arch, model, _ = built
    stages = stages_of(model)
    if stages is None:
        pytest.skip(f"{arch.name} is not staged")
    first_stage = [min(stages.param_stage[n] for n, _ in model.named_parameters()
                       if matches_any(n, prefixes)) for prefixes in arch.blocks.values()]
    assert first_stage == sorted(first_stage), (arch.name, dict(zip(arch.blocks, first_stage)))


def test_stages_own_every_parameter_and_compose_to_the_network(built):
    arch, model, images = built
    stages = stages_of(model)
    if stages is None:
        pytest.skip(f"{arch.name} is not staged")
    assert set(stages.param_stage) == {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        whole = model(images)
        x = images
        for index in range(len(stages)):
            x = stages.run(x, index, index + 1)
    assert torch.allclose(x, whole, rtol=1e-5, atol=1e-5), arch.name


def test_the_folded_network_computes_the_network(built):
    arch, model, images = built
    view = folded_view(model)
    if view is None:  # nothing to fold (GroupNorm, LayerNorm): the loop runs the network itself
        assert not (isinstance(model, StagedModel) and model.conv_bn_pairs())
        return
    with torch.no_grad():
        expected, folded = model(images), view(images)
    scale = expected.abs().max().item()
    assert (folded - expected).abs().max().item() <= 1e-4 * max(scale, 1.0), arch.name


@pytest.mark.parametrize("arch", ["resnet26-w4", "resnet50"])
def test_a_resnets_folded_view_leaves_no_batch_norm_unfolded(arch):
    # Guards conv_bn_pairs missing the downsample pair or a bottleneck's conv3/bn3 (the
    # output stays right: an unfolded norm just runs on its own, slower).
    model = build_model(arch, CLASSES, CHANNELS).eval()
    view = folded_view(model)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FoldedConvBN) for m in view.modules()) == norms
    alone = [n for n, m in view.named_modules()
             if isinstance(m, nn.BatchNorm2d) and not n.endswith(".bn")]
    assert not alone, alone[:3]


def test_set_trainable_refuses_a_name_that_is_no_parameter():
    """A misspelt name would otherwise freeze the whole network and tune nothing."""
    from deep.blocks import set_trainable
    model = build_model("resnet26-w4", CLASSES, CHANNELS)
    with pytest.raises(ValueError, match=r"no such parameter\(s\): \['fc\.weights'\]"):
        set_trainable(model, ["fc.bias", "fc.weights"])
    assert set_trainable(model, ["fc.bias"]) == CLASSES
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.bias"]


def test_every_model_module_is_imported_by_the_package():
    """An architecture registers itself when its module is imported; a new module without
    its import line in deep/models/__init__.py registers nothing, and every test above,
    parametrized over the registry, passes without seeing it ("unknown arch" only when run)."""
    import subprocess
    import sys
    from pathlib import Path

    import deep.models
    code = ("import pkgutil, sys, deep.models as m; print(' '.join(i.name for i in "
            "pkgutil.iter_modules(m.__path__) if 'deep.models.' + i.name not in sys.modules))")
    root = Path(deep.models.__file__).parents[2]
    missing = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                             text=True, check=True).stdout.split()
    assert not missing, f"deep/models/__init__.py imports none of {missing}: add an import line"
