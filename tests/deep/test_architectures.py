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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

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


def test_architecture_names_keep_registration_order(monkeypatch):
    """A later registration is listed last, whatever its name: the CLI's choices and the
    README list the built-ins in the order their modules register them (sorted names
    would put this one first)."""
    from deep.models import registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # restored after
    before = architecture_names()
    registry.register_architecture(registry.Architecture(
        "a-late-arrival", build=lambda num_classes, in_channels: nn.Linear(in_channels, num_classes),
        blocks={"last": ("weight",)}))
    assert architecture_names() == (*before, "a-late-arrival")
    assert before.index("resnet26") < before.index("resnet26-w8") < before.index("resnet26-w4")


def test_stages_run_each_stage_on_its_chosen_memory_format():
    """`Stages.formats` (the prefix cache's channels-last choice per stage) lays out each
    stage's input as chosen, also for stages run in one call after the first; the same
    numbers either way."""
    torch.manual_seed(0)
    model = build_model("resnet26-w4", CLASSES, CHANNELS).eval()
    seen = {}
    for name in ("layer2", "layer3"):
        getattr(model, name).register_forward_pre_hook(
            lambda m, args, name=name: seen.update({name: args[0]}))
    stages = stages_of(model)
    x = torch.randn(2, CHANNELS, 16, 16)
    with torch.no_grad():
        plain = stages.run(x, 0)
        stages.formats = {1: torch.channels_last, 2: torch.contiguous_format}
        formatted = stages.run(x, 0)
    # a channels-last tensor of >1 channels and >1 columns is not NCHW-contiguous
    assert seen["layer2"].is_contiguous(memory_format=torch.channels_last)
    assert not seen["layer2"].is_contiguous()
    assert seen["layer3"].is_contiguous()
    assert torch.allclose(formatted, plain, atol=1e-5)


def test_a_sequentials_stages_are_its_children_one_each():
    """An nn.Sequential is staged child by child: stages [start, stop) run exactly those
    children, so running them one at a time (as the prefix cache does) gives the forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    stages = stages_of(model)
    x = torch.randn(5, 4)
    assert len(stages) == 3 and stages.param_stage["2.weight"] == 2
    with torch.no_grad():
        first = x @ model[0].weight.T + model[0].bias
        assert torch.allclose(stages.run(x, 0, 1), first)
        assert torch.allclose(stages.run(first, 1, 2), torch.tanh(first))
        h = x
        for index in range(len(stages)):
            h = stages.run(h, index, index + 1)
        assert torch.allclose(h, model(x))
        assert torch.allclose(stages.run(x, 0), model(x))


# --------------------------------------------- what each stage and block computes with

class _ParametersUsed(TorchFunctionMode):
    """Records the name of every parameter of a network passed to a torch function while
    active (a module's weight to conv2d or layer_norm, a ViT's class embedding to `.to`):
    what the code computes with, whatever its stage prefixes say."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor) and id(value) in self.names:
                self.used.add(self.names[id(value)])
        return func(*args, **kwargs)


def _parameters_each_stage_computes_with(name: str, in_channels: int = CHANNELS):
    """(network, its Stages, for each stage the names of the parameters it computes with),
    traced on the meta device (shapes only: no memory, no arithmetic, ViT-B/16 included)."""
    with torch.device("meta"):
        model = get_architecture(name).build(CLASSES, in_channels).eval()
    stages = stages_of(model)
    if stages is None:
        pytest.skip(f"{name} is not staged")
    size = getattr(getattr(model, "config", None), "image_size", 32)
    x = torch.empty(2, in_channels, size, size, device="meta")
    used = []
    with torch.no_grad():
        for index in range(len(stages)):
            with _ParametersUsed(model) as trace:
                x = stages.run(x, index, index + 1)
            used.append(trace.used)
    assert tuple(x.shape) == (2, CLASSES), name
    return model, stages, used


@pytest.mark.parametrize("name", architecture_names())
def test_each_stage_owns_exactly_the_parameters_it_computes_with(name):
    """The prefix cache starts at the first stage that owns a tuned parameter and replays
    the stages before it from stored inputs: a parameter owned by a later stage than the one
    that computes with it (resnet26's stem bn1 listed with layer2, say) would be tuned
    without ever reaching the loss, and one owned by an earlier stage would make the cache
    recompute frozen stages. Ownership is derived here from the stages' own computation."""
    _, stages, used = _parameters_each_stage_computes_with(name)
    owned = [{n for n, s in stages.param_stage.items() if s == index} for index in range(len(stages))]
    for index, (computes, owns) in enumerate(zip(used, owned)):
        assert computes == owns, (name, index, sorted(computes - owns)[:4], sorted(owns - computes)[:4])


# Parameters that only `all` tunes, as the docs say (docs/reference-models.md: the final
# norm of wrn28-10 and resnet26-gn, resnet50-public's stem bn1; docs/vit-wilds.md: ln_post
# and proj): in no single block although a stage computes with them.
ONLY_ALL = {"resnet26-gn": ("bn",), "wrn28-10": ("bn1",), "resnet50-public": ("bn1",),
            **{vit: ("visual.ln_post", "visual.proj")
               for vit in ("clip-vit-b16", "clip-vit-b16-gelu", "clip-vit-tiny")}}


@pytest.mark.parametrize("name", architecture_names())
def test_each_block_tunes_what_its_stages_compute_with_but_the_documented_all_only_parameters(name):
    """A block tunes every parameter of the stages it reaches into (resnet26's `first` takes
    the stem conv1 and bn1 with layer1), except those the docs give to `all` alone, which no
    block tunes (resnet26-gn's final `bn`, not `third`; wrn28-10's final `bn1`)."""
    from deep.blocks import tuned_parameter_names
    model, stages, used = _parameters_each_stage_computes_with(name)
    arch = get_architecture(name)
    names = [n for n, _ in model.named_parameters()]
    for prefix in ONLY_ALL.get(name, ()):
        assert any(matches(n, prefix) for n in names), (name, prefix)
    only_all = {n for n in names if matches_any(n, ONLY_ALL.get(name, ()))}
    for option in arch.blocks:
        tuned = set(tuned_parameter_names(model, option, arch.blocks))
        reached = {index for index, computes in enumerate(used) if computes & tuned}
        expected = set().union(*(used[index] for index in reached)) - only_all
        assert tuned == expected, (name, option, sorted(tuned ^ expected)[:4])


def _small_network(name: str) -> nn.Module:
    """A registered network, or for the large ones the same code at a small size."""
    from deep.models.resnet import ResNet50
    from deep.models.wide_resnet import WideResNet
    small = {"resnet50": lambda: ResNet50(CLASSES, CHANNELS, layers=(1, 1, 1, 1)),
             "resnet50-public": lambda: ResNet50(CLASSES, CHANNELS, layers=(1, 1, 1, 1)),
             "wrn28-10": lambda: WideResNet(CLASSES, CHANNELS, depth=10, widen_factor=1)}
    if name in small:
        return small[name]()
    return get_architecture(name).build(CLASSES, CHANNELS)


@pytest.mark.parametrize("name", [n for n in architecture_names() if not n.startswith("clip-")])
def test_every_fresh_batch_norm_starts_as_the_identity_map(name):
    """torchvision's ResNet and RobustBench's WideResNet initialise each BatchNorm to weight
    1 and bias 0 (and statistics 0 and 1): a fresh network's norms pass their normalised
    input on unchanged, so a network trained from scratch starts where the originals do."""
    torch.manual_seed(0)
    model = _small_network(name)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight)), m
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), m
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    assert norms or name == "resnet26-gn", name  # resnet26-gn's GroupNorms: see its own tests
