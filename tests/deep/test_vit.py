"""CLIP ViT: CLIP's key names and shapes, encode_image against a hand computation, stages
and the prefix cache, and weight files (CLIP state dicts, TorchScript, zero-shot head)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deep.blocks import blocks_for, tuned_parameter_names
from deep.checkpoints import CheckpointError, load_model
from deep.data.base import TensorSplit
from deep.models import build_model
from deep.models.staged import Stages
from deep.models.vit import (CONFIGS, CLIPImageClassifier, VisionTransformer, ViTConfig,
                             block_options, is_torchscript_archive, set_zero_shot_head)
from deep.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[2]
TINY = "clip-vit-tiny"


def clip_b16_image_tower() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a CLIP ViT-B/16 image tower, written from the public layout
    (OpenAI clip/model.py VisionTransformer; patch 16, width 768, 12 blocks, output 512)."""
    width, mlp, tokens = 768, 3072, (224 // 16) ** 2 + 1
    keys = {"visual.conv1.weight": (width, 3, 16, 16), "visual.class_embedding": (width,),
            "visual.positional_embedding": (tokens, width),
            "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
            "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
            "visual.proj": (width, 512)}
    for i in range(12):
        block = f"visual.transformer.resblocks.{i}"
        keys.update({
            f"{block}.ln_1.weight": (width,), f"{block}.ln_1.bias": (width,),
            f"{block}.attn.in_proj_weight": (3 * width, width),
            f"{block}.attn.in_proj_bias": (3 * width,),
            f"{block}.attn.out_proj.weight": (width, width),
            f"{block}.attn.out_proj.bias": (width,),
            f"{block}.ln_2.weight": (width,), f"{block}.ln_2.bias": (width,),
            f"{block}.mlp.c_fc.weight": (mlp, width), f"{block}.mlp.c_fc.bias": (mlp,),
            f"{block}.mlp.c_proj.weight": (width, mlp), f"{block}.mlp.c_proj.bias": (width,)})
    return keys


def test_clip_b16_has_clips_keys_and_shapes():
    model = build_model("clip-vit-b16", num_classes=2)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state.pop("head.weight") == (2, 512) and state.pop("head.bias") == (2,)
    assert state == clip_b16_image_tower()
    # 86.2 M parameters in the image tower, as published for ViT-B/16
    assert sum(math.prod(s) for s in state.values()) == 86_192_640


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (LayerNorm weights too), so swapped tensors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def hand_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def hand_block(x, sd, prefix, heads):
    """One CLIP residual attention block on tokens x (n, d), head by head."""
    n, d = x.shape
    h = hand_layer_norm(x, sd[f"{prefix}.ln_1.weight"], sd[f"{prefix}.ln_1.bias"])
    w, b = sd[f"{prefix}.attn.in_proj_weight"], sd[f"{prefix}.attn.in_proj_bias"]
    q, k, v = (h @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3))
    dh = d // heads
    outs = []
    for j in range(heads):
        cols = slice(j * dh, (j + 1) * dh)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(dh)
        weights = torch.exp(scores - scores.max(1, keepdim=True).values)
        outs.append(weights / weights.sum(1, keepdim=True) @ v[:, cols])
    attn = torch.cat(outs, 1) @ sd[f"{prefix}.attn.out_proj.weight"].T \
        + sd[f"{prefix}.attn.out_proj.bias"]
    x = x + attn
    h = hand_layer_norm(x, sd[f"{prefix}.ln_2.weight"], sd[f"{prefix}.ln_2.bias"])
    h = h @ sd[f"{prefix}.mlp.c_fc.weight"].T + sd[f"{prefix}.mlp.c_fc.bias"]
    h = h / (1 + torch.exp(-1.702 * h))  # QuickGELU
    return x + h @ sd[f"{prefix}.mlp.c_proj.weight"].T + sd[f"{prefix}.mlp.c_proj.bias"]


def hand_encode_image(image, sd, config: ViTConfig):
    """CLIP's image embedding of one image (C, H, W), computed from the state dict."""
    p, grid = config.patch_size, config.image_size // config.patch_size
    # patches in row-major order, each flattened as (C, p, p) like the conv weight
    patches = [image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
               for r in range(grid) for c in range(grid)]
    tokens = torch.stack(patches) @ sd["visual.conv1.weight"].reshape(config.width, -1).T
    x = torch.cat([sd["visual.class_embedding"][None], tokens]) + sd["visual.positional_embedding"]
    x = hand_layer_norm(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(config.layers):
        x = hand_block(x, sd, f"visual.transformer.resblocks.{i}", config.heads)
    return hand_layer_norm(x[0], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) \
        @ sd["visual.proj"]


def test_encode_image_matches_a_hand_computation():
    config = ViTConfig(image_size=16, patch_size=4, width=12, layers=3, heads=3, mlp_width=48,
                       output_dim=5)
    model = randomized(CLIPImageClassifier(config, num_classes=2)).double().eval()
    sd = model.state_dict()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        got = model.encode_image(images)
        # one block alone, on the embedded tokens
        tokens = model.visual.embed(images)
        block = model.visual.transformer.resblocks[1](tokens)
    expected_block = hand_block(tokens[0], sd, "visual.transformer.resblocks.1", config.heads)
    assert torch.allclose(block[0], expected_block, atol=1e-10)
    expected = torch.stack([hand_encode_image(im, sd, config) for im in images])
    assert torch.allclose(got, expected, atol=1e-10)
    # the head sees the L2-normalised embedding
    with torch.no_grad():
        logits = model(images)
    assert torch.allclose(logits, F.normalize(expected, dim=1) @ sd["head.weight"].T
                          + sd["head.bias"], atol=1e-10)


def test_gelu_variant_differs_only_in_the_activation():
    quick, gelu = (CLIPImageClassifier(ViTConfig(image_size=8, patch_size=4, width=8, layers=3,
                                                 heads=2, mlp_width=16, output_dim=4,
                                                 activation=a), 2) for a in ("quick_gelu", "gelu"))
    gelu.load_state_dict(randomized(quick).state_dict())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(quick(x), gelu(x))
        gelu.visual.transformer.resblocks.apply(
            lambda m: setattr(m, "activation", quick.visual.transformer.resblocks[0].mlp.activation)
            if hasattr(m, "c_fc") else None)
        assert torch.allclose(quick(x), gelu(x))


@pytest.mark.parametrize("arch, activation", [
    ("clip-vit-b16", lambda x: x * torch.sigmoid(1.702 * x)),            # OpenAI's QuickGELU
    ("clip-vit-b16-gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),  # exact GELU
])
def test_each_b16_variant_has_its_published_activation(arch, activation):
    """open_clip's non-OpenAI ViT-B-16 uses nn.GELU (the erf form, not the tanh
    approximation), OpenAI's QuickGELU; built on the meta device (no weights needed)."""
    with torch.device("meta"):
        model = build_model(arch, 2)
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)
    for block in model.visual.transformer.resblocks:
        assert torch.allclose(block.mlp.activation(x), activation(x), atol=1e-12, rtol=0)


def test_block_options_are_the_papers():
    blocks = blocks_for("clip-vit-b16")
    assert list(blocks) == ["embedding", "first3", "last3", "last"]
    model = build_model(TINY, 3)
    names = {option: tuned_parameter_names(model, option, blocks_for(TINY))
             for option in blocks_for(TINY)}
    assert names["embedding"] == ["visual.class_embedding", "visual.positional_embedding",
                                  "visual.conv1.weight", "visual.ln_pre.weight",
                                  "visual.ln_pre.bias"]
    assert {n.split(".")[3] for n in names["first3"]} == {"0", "1", "2"}
    assert {n.split(".")[3] for n in names["last3"]} == {"3", "4", "5"}
    assert names["last"] == ["head.weight", "head.bias"]
    assert len(names["first3"]) == len(names["last3"]) == 36


def test_first3_of_a_12_block_vit_tunes_no_block_10_or_11():
    """ViT-B/16 has 12 blocks: "first3"'s prefix "...resblocks.1" must not also take blocks
    10 and 11 (a prefix matches whole module names). Checked on a narrow 12-block ViT."""
    config = ViTConfig(image_size=32, patch_size=8, width=32, layers=12, heads=2, mlp_width=128,
                       output_dim=16)
    names = tuned_parameter_names(CLIPImageClassifier(config, 3), "first3",
                                  block_options(config.layers))
    assert {n.split(".")[3] for n in names} == {"0", "1", "2"}
    assert len(names) == 3 * 12          # 12 parameter tensors per block


def test_stages_run_the_same_function_as_forward():
    model = randomized(build_model(TINY, 3)).eval()
    stages = Stages(model)
    assert len(stages) == CONFIGS[TINY].layers + 3
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        middle = stages.run(x, 0, 5)
        assert torch.allclose(stages.run(middle, 5), model(x), atol=1e-6)


def tiny_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    def split(n):
        return TensorSplit(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3)
    return split(24), split(12), split(12)


@pytest.mark.parametrize("method, start", [("last3", 4), ("first3", 1), ("last", 8)])
def test_prefix_cache_gives_the_numbers_of_a_full_forward(method, start):
    """The frozen transformer prefix is cached: same losses and accuracies as without."""
    train, val, test = tiny_task()
    results = []
    for use_cache in (True, False):
        model = randomized(build_model(TINY, 3))
        config = TrainConfig(lr=1e-3, epochs=2, batch_size=8, seed=0, use_cache=use_cache)
        results.append(fit(model, train, val, test, method, config, blocks_for(TINY)))
    cached, plain = results
    assert cached.start_stage == start and plain.start_stage == 0
    assert torch.allclose(torch.tensor(cached.losses), torch.tensor(plain.losses), atol=1e-5)
    assert (cached.val.acc, cached.test.acc) == (plain.val.acc, plain.test.acc)


def test_wrong_image_size_names_both_sizes_and_only_fixes_that_exist():
    """The synthetic benchmark's 16-px images into the 32-px tiny ViT: the error states both
    sizes, offers --data crop/resize only for loaders that have them (synthetic's has none,
    waterbirds' has), and each fix it names works when followed."""
    import dataclasses

    from PIL import Image

    from deep.data import get_benchmark, synthetic
    from deep.data.images import ImageTransform
    from deep.errors import ConfigError
    from deep.normalization import check_data_options
    images = torch.randn(2, 3, synthetic.SIZE, synthetic.SIZE)
    with pytest.raises(ConfigError) as err:
        build_model(TINY, 3)(images)
    message = str(err.value)
    assert "takes images of 32x32 px" in message and "got 16x16 px images" in message
    # The crop/resize advice is conditional: the synthetic loader has no such option ...
    assert "if the benchmark's loader has crop and resize options" in message
    advice = message.index("--data crop=32 --data resize=32")
    assert message.index("if the benchmark's loader") < advice
    with pytest.raises(ConfigError, match="known: none"):
        check_data_options(get_benchmark("synthetic").load_task, "synthetic", {"crop": 32})
    # ... an image-folder loader has it, and its transform then gives what the ViT takes.
    check_data_options(get_benchmark("waterbirds").load_task, "waterbirds",
                       {"crop": 32, "resize": 32})
    picture = Image.fromarray(torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8).numpy())
    assert build_model(TINY, 3)(ImageTransform(resize=32, crop=32)(picture)[None]).shape == (1, 3)
    # The other way out: every registered ViT is listed with its fixed size, and a config
    # for 16 px with a patch size dividing 16 takes the synthetic images.
    for name, config in CONFIGS.items():
        assert f"{name} {config.image_size} px" in message
    assert "ViTConfig(image_size=16, patch_size=P), P dividing 16" in message
    sixteen = dataclasses.replace(CONFIGS[TINY], image_size=16)
    assert CLIPImageClassifier(sixteen, 4)(images).shape == (2, 4)


def test_input_that_is_not_a_batch_of_images_is_named_as_such():
    with pytest.raises(ValueError,
                       match=r"takes images of 32x32 px.*got a tensor of shape \(3, 32, 32\)"):
        build_model(TINY, 3)(torch.randn(3, 32, 32))


# --- weight files -----------------------------------------------------------------

def clip_like_state(seed=0) -> dict[str, torch.Tensor]:
    """What a CLIP state dict holds for the tiny tower: visual.* + text tower + logit_scale."""
    visual = randomized(VisionTransformer(CONFIGS[TINY]), seed)
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state.update({"token_embedding.weight": torch.randn(10, 32),
                  "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32),
                  "positional_embedding": torch.randn(7, 32), "ln_final.weight": torch.ones(32),
                  "text_projection": torch.randn(32, 16),
                  "logit_scale": torch.tensor(math.log(50.0))})
    return state


def test_open_clip_state_dict_loads_its_image_tower(tmp_path):
    """open_clip style: {"state_dict": {"module.<key>": ...}}; text keys ignored."""
    state = clip_like_state()
    path = tmp_path / "open_clip.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_model(path, TINY, 3, 3)
    loaded = model.state_dict()
    for key, value in state.items():
        if key.startswith("visual."):
            assert torch.equal(loaded[key], value), key
    # the head is fresh but seeded: the same file gives the same network
    again = load_model(path, TINY, 3, 3)
    assert torch.equal(again.head.weight, model.head.weight)
    # seeded with 0, as documented: nn.Linear's own init right after manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = nn.Linear(CONFIGS[TINY].output_dim, 3)
    assert torch.equal(model.head.weight, head.weight) and torch.equal(model.head.bias, head.bias)


def test_a_head_under_another_name_is_not_dropped_silently(tmp_path):
    """A fine-tuned CLIP classifier saved as fc.* would otherwise score a random head."""
    import warnings
    state = clip_like_state()
    torch.save(state, tmp_path / "clip.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # CLIP's own keys: no warning
        load_model(tmp_path / "clip.pt", TINY, 3, 3)
    state.update({"fc.weight": torch.randn(3, 16), "fc.bias": torch.zeros(3)})
    torch.save(state, tmp_path / "finetuned.pt")
    with pytest.warns(UserWarning, match=r"ignored \(fc\.bias, fc\.weight\).*rename them to "
                                         r"head\.weight and head\.bias"):
        load_model(tmp_path / "finetuned.pt", TINY, 3, 3)


@pytest.mark.parametrize("key", ["transformer_head.weight", "text_classifier.weight",
                                 "logit_scale_head.weight"])
def test_a_text_tower_name_is_matched_whole_not_as_a_prefix(key):
    """`transformer.*` is the text tower; `transformer_head.*` is not, and is warned about
    (it may be a classification head) rather than dropped silently."""
    from deep.models.vit import image_tower_state
    state = {**clip_like_state(), key: torch.randn(3, 16)}
    with pytest.warns(UserWarning, match=rf"ignored \({re.escape(key)}\)"):
        tower = image_tower_state(state, build_model(TINY, 3))
    assert key not in tower and "transformer.resblocks.0.attn.in_proj_weight" not in tower


def test_only_a_configuration_with_the_files_shapes_is_suggested_as_its_arch():
    """A 12-block tower of another width has the keys of both ViT-B/16 variants but the
    shapes of neither: no configuration fits, so none is named (the strict load then names
    the mismatched shapes). A tower that is a known configuration's is named."""
    from deep.models.vit import image_tower_state
    other = ViTConfig(image_size=32, patch_size=8, width=32, layers=12, heads=2, mlp_width=64,
                      output_dim=16)
    with torch.device("meta"):
        b16 = build_model("clip-vit-b16", 2)
    image_tower_state(CLIPImageClassifier(other, 2).state_dict(), b16, "f.pt")  # none named
    with pytest.raises(CheckpointError, match="image tower of clip-vit-tiny, not of clip-vit-b16: "
                                              "give --arch clip-vit-tiny"):
        image_tower_state(build_model(TINY, 2).state_dict(), b16, "f.pt")


def test_another_vits_weights_are_named_wherever_they_are_loaded(tmp_path):
    """ViT-tiny weights for a ViT-B/16, as `sweep --checkpoint` and `pretrain --init` read
    them: the configuration they fit is named, not 150 mismatched keys."""
    from deep.checkpoints import load_backbone
    torch.save(clip_like_state(), tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="clip.pt holds the image tower of clip-vit-tiny"):
        load_model(tmp_path / "clip.pt", "clip-vit-b16", 2, 3)
    with pytest.raises(CheckpointError, match="clip.pt holds the image tower of clip-vit-tiny"):
        load_backbone(build_model("clip-vit-b16", 2), tmp_path / "clip.pt", head=("head",))


def test_a_checkpoint_of_ours_is_refused_for_another_network_whose_tensors_fit(tmp_path):
    """clip-vit-b16-gelu's weights have clip-vit-b16's keys and shapes, but run with another
    activation: our file records its arch, and `pretrain --init` and `deep.clip prepare`
    refuse it for another network as `sweep --checkpoint` does (the tiny network, recorded
    under the GELU name, stands in for 86M parameters)."""
    from deep.checkpoints import load_backbone, save_checkpoint
    from deep.clip import prepare_checkpoint
    save_checkpoint(tmp_path / "gelu.pt", build_model(TINY, 2), "clip-vit-b16-gelu", 2, 3)
    refused = "gelu.pt holds arch=clip-vit-b16-gelu, not clip-vit-tiny: give --arch clip-vit-b16-gelu"
    with pytest.raises(CheckpointError, match=refused):
        load_backbone(build_model(TINY, 2), tmp_path / "gelu.pt", head=("head",), arch=TINY)
    with pytest.raises(CheckpointError, match=refused):
        prepare_checkpoint(tmp_path / "gelu.pt", tmp_path / "out.pt", 2, TINY)
    assert not (tmp_path / "out.pt").exists()
    # the same network under another name is one network: accepted
    save_checkpoint(tmp_path / "tiny.pt", build_model(TINY, 2), TINY, 2, 3)
    assert load_backbone(build_model(TINY, 2), tmp_path / "tiny.pt", arch=TINY) == []


def test_pretrain_init_refuses_a_checkpoint_of_ours_for_another_network(tmp_path):
    from deep.checkpoints import save_checkpoint
    from deep.data.base import SourceData
    from deep.pretrain import pretrain
    save_checkpoint(tmp_path / "gelu.pt", build_model(TINY, 2), "clip-vit-b16-gelu", 2, 3)
    split = TensorSplit(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    source = SourceData("camelyon17", 2, 3, split, split)
    with pytest.raises(CheckpointError, match="holds arch=clip-vit-b16-gelu, not clip-vit-tiny"):
        pretrain(source, TINY, init=str(tmp_path / "gelu.pt"), epochs=1, progress=False)


def test_a_file_without_image_tower_is_refused(tmp_path):
    path = tmp_path / "text_only.pt"
    torch.save({k: v for k, v in clip_like_state().items() if not k.startswith("visual.")}, path)
    with pytest.raises(ValueError, match="no CLIP image tower"):
        load_model(path, TINY, 3, 3)


class FakeCLIP(nn.Module):
    """Traced into a TorchScript archive, like OpenAI's released .pt files."""

    def __init__(self, state):
        super().__init__()
        self.visual = VisionTransformer(CONFIGS[TINY])
        self.token_embedding = nn.Embedding(10, 32)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.load_state_dict({k: v for k, v in state.items()
                              if k.split(".")[0] in ("visual", "token_embedding", "logit_scale")})

    def forward(self, x):
        return self.visual(x) * self.logit_scale.exp()


@pytest.fixture
def torchscript_file(tmp_path):
    state = clip_like_state()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.trace(FakeCLIP(state), torch.randn(1, 3, 32, 32)), str(path))
    return path, state


def test_torchscript_archive_is_refused_with_how_to_convert(torchscript_file, tmp_path):
    path, state = torchscript_file
    assert is_torchscript_archive(path)
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    assert not is_torchscript_archive(plain)
    with pytest.raises(CheckpointError, match="TorchScript") as err:
        load_model(path, TINY, 3, 3)
    assert "prepare --weights" in str(err.value) and "--trust-torchscript" in str(err.value)
    trusted = load_model(path, TINY, 3, 3, trust_checkpoint=True)
    assert torch.equal(trusted.visual.proj, state["visual.proj"])


@pytest.mark.parametrize("name", ["code.pt", "constants.pt", "code"])
def test_a_plain_file_named_like_torchscript_parts_is_not_torchscript(tmp_path, name):
    """torch.save names the archive's root folder after the file: code.pt holds code/data.pkl."""
    path = tmp_path / name
    torch.save(clip_like_state(), path)
    assert not is_torchscript_archive(path)
    assert torch.equal(load_model(path, TINY, 3, 3).visual.proj, clip_like_state()["visual.proj"])


def test_init_from_clip_weights_or_a_vit_of_another_head_size(tmp_path):
    """pretrain --init: a CLIP state dict (text tower dropped, fresh head) or our ViT
    checkpoint with another number of classes (its head re-initialised, `head.*`)."""
    from deep.checkpoints import load_backbone, save_checkpoint
    from deep.models import get_architecture
    head = get_architecture(TINY).blocks["last"]
    state = clip_like_state()
    torch.save(state, tmp_path / "clip.pt")
    torch.manual_seed(1)
    model = build_model(TINY, 5)
    fresh = model.head.weight.detach().clone()
    assert load_backbone(model, tmp_path / "clip.pt", head=head) == []
    assert torch.equal(model.visual.proj, state["visual.proj"])
    save_checkpoint(tmp_path / "two.pt", load_model(tmp_path / "clip.pt", TINY, 2, 3), TINY, 2, 3)
    torch.manual_seed(1)
    model = build_model(TINY, 5)
    assert load_backbone(model, tmp_path / "two.pt", head=head) == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, fresh)
    assert torch.equal(model.visual.proj, state["visual.proj"])


def test_pretrain_refuses_random_weights_for_clip_unless_told(monkeypatch):
    """ViT-B/16 means CLIP's weights: `pretrain` without `init` is an error that names the
    flags; `init="none"` trains from random weights on purpose."""
    import dataclasses

    import deep.pretrain
    from deep.data.base import SourceData
    from deep.errors import ConfigError
    from deep.models import get_architecture
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 2)
    source = SourceData("camelyon17", 2, 3, split, split)
    with pytest.raises(ConfigError, match="clip-vit-b16 starts from CLIP's weights.*--init FILE"
                                          ".*--init none"):
        deep.pretrain.pretrain(source, "clip-vit-b16", progress=False)
    # From the command's entry point, before any data is looked for (there is none here).
    with pytest.raises(ConfigError, match="clip-vit-b16 starts from CLIP's weights"):
        deep.pretrain.pretrain_to_file("camelyon17", "unused.pt", "clip-vit-b16")
    needs_init = dataclasses.replace(get_architecture(TINY), needs_init=True)
    monkeypatch.setattr(deep.pretrain, "get_architecture", lambda name: needs_init)
    with pytest.raises(ConfigError, match="--init none"):
        deep.pretrain.pretrain(source, TINY, progress=False, epochs=1)
    model = deep.pretrain.pretrain(source, TINY, progress=False, epochs=1, batch_size=4,
                                   augment="none", init="none")
    assert isinstance(model, CLIPImageClassifier)


def test_pretrain_init_reinitialises_a_vit_head_of_another_size(tmp_path):
    """`pretrain --init` with our ViT checkpoint of 5 classes for a 2-class source: the
    head is the architecture's `last` block (`head`, not ResNet's `fc`), so it is the
    part re-initialised rather than a shape mismatch."""
    import deep.pretrain
    from deep.checkpoints import save_checkpoint
    from deep.data.base import SourceData
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(4, 3, 32, 32, generator=g), torch.arange(4) % 2)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "five.pt", build_model(TINY, 5), TINY, 5, 3)
    model = deep.pretrain.pretrain(SourceData("camelyon17", 2, 3, split, split), TINY,
                                   progress=False, epochs=1, batch_size=4, augment="none",
                                   init=str(tmp_path / "five.pt"))
    assert isinstance(model, CLIPImageClassifier) and model.head.weight.shape[0] == 2


def run_prepare(*args):
    return subprocess.run([sys.executable, "-m", "deep.clip", "prepare", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_zero_shot_head_replaces_a_head_of_another_size(tmp_path):
    """Text embeddings for 2 classes on a file whose head has 5: the file's head is
    dropped (it used to fail on its shape although the zero-shot head replaces it)."""
    from deep.clip import prepare_checkpoint
    state = {**clip_like_state(), "head.weight": torch.randn(5, 16), "head.bias": torch.zeros(5)}
    torch.save(state, tmp_path / "five.pt")
    embeddings = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    torch.save(embeddings, tmp_path / "text.pt")
    out = prepare_checkpoint(tmp_path / "five.pt", tmp_path / "two.pt", 2, TINY,
                             text_embeddings=tmp_path / "text.pt")
    model = load_model(out, TINY, 2, 3)
    assert model.head.weight.shape == (2, 16)
    # The head is CLIP's zero-shot head: its rows point along the class embeddings.
    cosine = F.normalize(model.head.weight, dim=1) @ F.normalize(embeddings, dim=1).T
    assert torch.allclose(cosine.diagonal(), torch.ones(2), atol=1e-5)


@pytest.mark.slow
def test_prepare_converts_torchscript_with_a_zero_shot_head(torchscript_file, tmp_path):
    """The zero-shot head reproduces CLIP's logits: logit_scale * cos(image, class text)."""
    path, state = torchscript_file
    embeddings = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    torch.save(embeddings, tmp_path / "text.pt")
    out = tmp_path / "clip-tiny-zs.pt"
    refused = run_prepare("--weights", str(path), "--arch", TINY, "--num-classes", "3",
                          "--out", str(out), "--text-embeddings", str(tmp_path / "text.pt"))
    assert refused.returncode == 2 and "TorchScript" in refused.stderr and not out.exists()
    # the switch it names is this command's (--trust-checkpoint does not read TorchScript)
    assert "add --trust-torchscript" in refused.stderr
    assert "--trust-checkpoint" not in refused.stderr
    done = run_prepare("--weights", str(path), "--arch", TINY, "--num-classes", "3",
                       "--out", str(out), "--text-embeddings", str(tmp_path / "text.pt"),
                       "--trust-torchscript")
    assert done.returncode == 0, done.stderr[-2000:]
    model = load_model(out, TINY, 3, 3).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        image = model.encode_image(x)
        logits = model(x)
    cosine = F.normalize(image, dim=1) @ F.normalize(embeddings, dim=1).T
    assert torch.allclose(logits, 50.0 * cosine, atol=1e-4)  # the file: logit_scale = log 50


@pytest.mark.slow
def test_zero_shot_head_uses_the_files_logit_scale(tmp_path):
    state = clip_like_state()
    torch.save(state, tmp_path / "clip.pt")
    torch.save(torch.randn(3, 16), tmp_path / "text.pt")
    done = run_prepare("--weights", str(tmp_path / "clip.pt"), "--arch", TINY, "--num-classes",
                       "3", "--out", str(tmp_path / "zs.pt"), "--text-embeddings",
                       str(tmp_path / "text.pt"))
    assert done.returncode == 0, done.stderr[-2000:]
    head = load_model(tmp_path / "zs.pt", TINY, 3, 3).head.weight
    assert torch.allclose(head.norm(dim=1), torch.full((3,), 50.0), atol=1e-4)


def test_logit_scale_is_the_exp_of_the_stored_value_clamped_at_100():
    """CLIP stores log(scale) and clamps the scale at 100 (OpenAI's training code); a
    file without it gets 100."""
    from deep.models.vit import logit_scale
    assert logit_scale({"logit_scale": torch.tensor(math.log(50.0))}) == pytest.approx(50.0)
    assert logit_scale({"logit_scale": torch.tensor(math.log(1000.0))}) == 100.0
    assert logit_scale({}) == 100.0


@pytest.mark.parametrize("embeddings, message", [
    (torch.randn(4, 16), r"\[num_classes, embedding\] = \[3, 16\], got \(4, 16\)"),
    (torch.randn(3, 8), r"got \(3, 8\)"),
    (torch.zeros(3, 16), "non-zero"),
    (torch.full((3, 16), float("nan")), "finite"),  # NaN rows: a NaN norm is not 0
    ([[1.0] * 16] * 3, "got list"),
])
def test_zero_shot_head_rejects_bad_embeddings(embeddings, message):
    with pytest.raises(ValueError, match=message):
        set_zero_shot_head(build_model(TINY, 3), embeddings)


@pytest.mark.slow
def test_prepare_rejects_a_text_embeddings_file_of_the_wrong_kind(tmp_path):
    torch.save(clip_like_state(), tmp_path / "clip.pt")
    torch.save({"embeddings": torch.randn(3, 16)}, tmp_path / "text.pt")
    done = run_prepare("--weights", str(tmp_path / "clip.pt"), "--arch", TINY, "--num-classes",
                       "3", "--out", str(tmp_path / "zs.pt"), "--text-embeddings",
                       str(tmp_path / "text.pt"))
    assert done.returncode == 2 and "must hold one tensor" in done.stderr


@pytest.mark.slow
def test_prepare_checks_its_arguments_and_offers_the_flags_it_names(tmp_path):
    import argparse
    torch.save(clip_like_state(), tmp_path / "clip.pt")
    out = tmp_path / "out.pt"
    for n in ("0", "-3"):
        done = run_prepare("--weights", str(tmp_path / "clip.pt"), "--arch", TINY,
                           "--num-classes", n, "--out", str(out))
        assert done.returncode == 2 and "num_classes must be at least 1" in done.stderr
        assert "Traceback" not in done.stderr and not out.exists()
    # a file holding more than tensors: refused, and the flag the message names works
    torch.save({"state_dict": clip_like_state(), "args": argparse.Namespace(lr=1)},
               tmp_path / "with_args.pt")
    args = ("--weights", str(tmp_path / "with_args.pt"), "--arch", TINY, "--num-classes", "3",
            "--out", str(out))
    refused = run_prepare(*args)
    assert refused.returncode == 2 and "--trust-checkpoint" in refused.stderr
    done = run_prepare(*args, "--trust-checkpoint")
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(load_model(out, TINY, 3, 3).visual.proj, clip_like_state()["visual.proj"])


def test_prepare_records_which_head_it_wrote(tmp_path):
    """The manifest says where the head came from: the file's own head.*, or a fresh one."""
    from deep.clip import prepare_checkpoint
    from deep.checkpoints import load_checkpoint
    with_head = {**clip_like_state(), "head.weight": torch.randn(3, 16), "head.bias": torch.ones(3)}
    torch.save(with_head, tmp_path / "with_head.pt")
    torch.save(clip_like_state(), tmp_path / "clip.pt")
    kept = load_checkpoint(prepare_checkpoint(tmp_path / "with_head.pt", tmp_path / "a.pt", 3, TINY))
    assert kept.meta["head"] == "from the weights file"
    assert torch.equal(kept.state_dict["head.bias"], torch.ones(3))
    fresh = load_checkpoint(prepare_checkpoint(tmp_path / "clip.pt", tmp_path / "b.pt", 3, TINY))
    assert fresh.meta["head"] == "random (seed 0)"


def test_prepare_names_bad_files_and_the_flag_that_helps(tmp_path, capsys):
    from deep.clip import main
    torch.save(clip_like_state(), tmp_path / "clip.pt")
    (tmp_path / "junk.bin").write_bytes(b"not weights at all")
    (tmp_path / "empty.bin").write_bytes(b"")

    def error(*args):
        assert main(["prepare", "--num-classes", "3", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
        return err

    out = str(tmp_path / "out.pt")
    assert "junk.bin is not a file written by torch.save" in error(
        "--weights", str(tmp_path / "junk.bin"), "--arch", TINY, "--out", out)
    assert "class text embeddings" in error(
        "--weights", str(tmp_path / "clip.pt"), "--arch", TINY, "--out", out,
        "--text-embeddings", str(tmp_path / "junk.bin"))
    assert "empty.bin is empty (0 bytes)" in error(
        "--weights", str(tmp_path / "empty.bin"), "--arch", TINY, "--out", out)
    # ViT-tiny weights with the default --arch: the configuration they fit is named
    assert "holds the image tower of clip-vit-tiny, not of clip-vit-b16: give --arch " \
           "clip-vit-tiny" in error("--weights", str(tmp_path / "clip.pt"), "--out", out)
    # --out is checked before the weights are read, and named as --out
    assert f"--out {tmp_path} is a folder; a file is expected" in error(
        "--weights", str(tmp_path / "clip.pt"), "--arch", TINY, "--out", str(tmp_path))
    assert not (tmp_path / "out.pt").exists()
    # a folder as --weights is named as one; --out the --weights file is refused, unread
    assert f"checkpoint {tmp_path} is a folder, not a file" in error(
        "--weights", str(tmp_path), "--arch", TINY, "--out", out)
    before = (tmp_path / "clip.pt").read_bytes()
    assert "is the --weights file: writing the checkpoint would replace" in error(
        "--weights", str(tmp_path / "clip.pt"), "--arch", TINY, "--out", str(tmp_path / "clip.pt"))
    assert (tmp_path / "clip.pt").read_bytes() == before


def test_a_torchscript_file_as_text_embeddings_is_named_in_one_line(torchscript_file, tmp_path,
                                                                     capsys):
    from deep.clip import main
    path, state = torchscript_file
    torch.save(state, tmp_path / "clip.pt")
    assert main(["prepare", "--num-classes", "3", "--weights", str(tmp_path / "clip.pt"),
                 "--arch", TINY, "--out", str(tmp_path / "out.pt"),
                 "--text-embeddings", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: class text embeddings") and err.count("\n") == 1, err
    assert "is a TorchScript archive (a model?), not a tensor" in err


@pytest.mark.parametrize("fields, message", [
    ({"image_size": 30}, "image_size 30 is not a multiple of patch_size 8"),
    ({"heads": 3}, "width 32 is not divisible by heads 3"),
    ({"layers": 2}, r"layers must be >= 3 \(first3 and last3 are blocks\), got 2"),
])
def test_a_vit_config_that_cannot_be_built_is_refused(fields, message):
    """A patch grid that does not tile the image, heads that do not split the width, or
    fewer than 3 blocks (first3 and last3 would overlap or name missing blocks)."""
    import dataclasses

    from deep.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CONFIGS[TINY], **fields)


def test_the_scalars_of_clip_files_are_text_tower_keys_not_a_lost_head():
    """OpenAI's TorchScript state dicts hold input_resolution, context_length and
    vocab_size (its build_model deletes them); open_clip's hold logit_scale, logit_bias
    (SigLIP), attn_mask and text.* (CustomTextCLIP): none of them is warned about as a
    head that was dropped."""
    import warnings

    from deep.models.vit import image_tower_state
    scalars = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
               "vocab_size": torch.tensor(49408), "logit_bias": torch.tensor(-10.0),
               "attn_mask": torch.zeros(7, 7), "text.token_embedding.weight": torch.randn(10, 32),
               "ln_final.bias": torch.zeros(32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tower = image_tower_state({**clip_like_state(), **scalars}, build_model(TINY, 3))
    assert not set(scalars) & set(tower)


def test_only_head_dot_keys_are_the_files_head():
    """`head.*` is the head; a key that merely starts with "head" (headline.weight) is not
    taken as one (it would break the strict load): warned about, and the head is fresh."""
    from deep.models.vit import image_tower_state, seeded_head_state
    model = build_model(TINY, 3)
    state = {**clip_like_state(), "headline.weight": torch.randn(3, 16)}
    with pytest.warns(UserWarning, match=r"ignored \(headline\.weight\)"):
        tower = image_tower_state(state, model)
    assert "headline.weight" not in tower
    assert {k for k in tower if not k.startswith("visual.")} == {"head.weight", "head.bias"}
    assert torch.equal(tower["head.weight"], seeded_head_state(model)["head.weight"])


def test_clip_normalisation_is_openais_written_out():
    """OpenAI clip.py's _transform: Normalize((0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711)), for every CLIP ViT and both WILDS loaders."""
    from deep.data import get_benchmark
    from deep.models import get_architecture
    openai = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    for arch in CONFIGS:
        assert get_architecture(arch).normalization == openai, arch
    for name in ("camelyon17", "fmow"):
        assert get_benchmark(name).normalization == openai, name


def test_non_square_images_are_refused_saying_every_vit_takes_square_images():
    """A 32x24 batch: no crop/resize-free ViT of another size would help, so the message
    says every registered ViT takes square images and names each with its size."""
    from deep.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        build_model(TINY, 3)(torch.randn(2, 3, 32, 24))
    message = str(err.value)
    assert "takes images of 32x32 px" in message and "got 32x24 px images" in message
    assert "every ViT here takes square images" in message
    for name, config in CONFIGS.items():
        assert f"{name} {config.image_size} px" in message
    assert "ViTConfig(image_size=" not in message  # no config of a non-square size exists


def test_prepare_records_the_weights_hash_and_the_zero_shot_scale(tmp_path):
    """The checkpoint's manifest names the weights it came from by file name and SHA-256,
    and a zero-shot head by its text-embeddings file and the logit scale it was scaled by
    (the file's: exp(log 50))."""
    import hashlib

    from deep.checkpoints import load_checkpoint
    from deep.clip import prepare_checkpoint
    torch.save(clip_like_state(), tmp_path / "clip.pt")
    torch.save(torch.randn(3, 16, generator=torch.Generator().manual_seed(4)), tmp_path / "text.pt")
    digest = hashlib.sha256((tmp_path / "clip.pt").read_bytes()).hexdigest()
    meta = load_checkpoint(prepare_checkpoint(tmp_path / "clip.pt", tmp_path / "zs.pt", 3, TINY,
                                              text_embeddings=tmp_path / "text.pt")).meta
    assert meta["source_weights"] == "clip.pt" and meta["source_sha256"] == digest
    assert meta["head"] == "zero-shot" and meta["text_embeddings"] == "text.pt"
    assert meta["logit_scale"] == pytest.approx(50.0)
    plain = load_checkpoint(prepare_checkpoint(tmp_path / "clip.pt", tmp_path / "b.pt", 3, TINY)).meta
    assert plain["source_sha256"] == digest
    assert "logit_scale" not in plain and "text_embeddings" not in plain


@pytest.mark.parametrize("arch", ["resnet26", "clip-vit-b32"])
def test_prepare_names_an_arch_that_is_no_clip_vit_before_reading_any_weights(tmp_path, arch):
    """The arch is checked first: with weights that do not even exist, the error is about
    the arch and lists the CLIP ViTs, not about the missing file."""
    from deep.clip import prepare_checkpoint
    from deep.errors import ConfigError
    with pytest.raises(ConfigError, match=re.escape(
            f"arch must be one of {', '.join(sorted(CONFIGS))}; got {arch!r}")):
        prepare_checkpoint(tmp_path / "missing.pt", tmp_path / "out.pt", 3, arch)
    assert not (tmp_path / "out.pt").exists()


def test_a_fresh_vit_starts_from_clips_and_multihead_attentions_initialisation():
    """OpenAI's VisionTransformer draws the class and positional embeddings and proj from
    N(0, width^-1) (scale = width ** -0.5 times randn); nn.MultiheadAttention, whose
    parameters CLIP's blocks are, draws in_proj_weight Xavier-uniform and starts both
    biases at 0. A network pretrained from random weights (`--init none`) starts there."""
    config = ViTConfig(image_size=32, patch_size=8, width=256, layers=3, heads=4, mlp_width=64,
                       output_dim=128)
    torch.manual_seed(0)
    visual = CLIPImageClassifier(config, 2).visual
    scale = config.width ** -0.5
    for name in ("class_embedding", "positional_embedding", "proj"):
        p = getattr(visual, name).detach()
        tolerance = max(0.05, 4 / p.numel() ** 0.5)
        assert abs(p.std().item() / scale - 1) < tolerance, name
        assert abs(p.mean().item()) < 4 * scale / p.numel() ** 0.5, name
    for block in visual.transformer.resblocks:
        attn = block.attn
        bound = (6 / (config.width + 3 * config.width)) ** 0.5  # Xavier: fan_in d, fan_out 3d
        w = attn.in_proj_weight.detach()
        assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
        assert abs(w.std().item() / (bound / 3 ** 0.5) - 1) < 0.05
        assert torch.equal(attn.in_proj_bias, torch.zeros(3 * config.width))
        assert torch.equal(attn.out_proj.bias, torch.zeros(config.width))
