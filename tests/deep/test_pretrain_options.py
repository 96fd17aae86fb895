"""Pretraining options: --data KEY=VALUE, --init weights, edge padding, committed source models."""

from __future__ import annotations

import argparse

import pytest
import torch

from deep.protocol import data_option
from deep.checkpoints import CheckpointError, load_backbone, save_checkpoint, write_manifest
from deep.data import fmnist
from deep.models import build_model
from deep.pretrain import random_crop_flip


@pytest.mark.parametrize("text,expected", [
    ("num_workers=8", ("num_workers", 8)), ("noise_scale=0.5", ("noise_scale", 0.5)),
    ("allow_subset=true", ("allow_subset", True)), ("split=rand", ("split", "rand")),
    ('split_file="a b.json"', ("split_file", "a b.json")), ("sizes=[1, 2]", ("sizes", [1, 2])),
])
def test_data_options_are_toml_literals_or_strings(text, expected):
    assert data_option(text) == expected


def test_data_option_without_equals_is_rejected():
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        data_option("num_workers")


def test_data_option_drops_the_spaces_around_its_key_and_refuses_an_empty_one():
    """`--data " severity = 3"` names the option `severity`, which the loader knows;
    `--data =3` names none."""
    assert data_option(" severity = 3") == ("severity", 3)
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE, got ' =3'"):
        data_option(" =3")


@pytest.mark.parametrize("benchmark,options,message", [
    ("cifar10c", {"severity": "five"}, "severity='five': the cifar10c loader expects int"),
    ("cifar10c", {"severity": 2.0}, "expects int"),
    ("imagenet-c", {"allow_subset": "yes"}, "expects bool"),
    # None cannot be written in TOML: the refusal does not offer it, it names the default
    ("waterbirds", {"resize": "none"}, r"expects int \(--data resize=VALUE, or the protocol's "
                                       r"\[data\] table\); leave it out for its default, 256$"),
    ("fmnist-c", {"severity": True}, "expects int"),
    ("fmnist-spurious", {"source_agreement": "high"}, "expects float"),
    ("living17", {"split": 3}, "expects str"),
])
def test_data_option_values_of_the_wrong_type_are_refused_before_loading(benchmark, options,
                                                                          message):
    from deep.data import get_benchmark
    from deep.errors import ConfigError
    from deep.normalization import check_data_options
    loader = get_benchmark(benchmark).load_task
    with pytest.raises(ConfigError, match=message):
        check_data_options(loader, benchmark, options)


def test_data_option_values_of_the_right_type_pass():
    from deep.data import get_benchmark
    from deep.normalization import check_data_options
    for benchmark, options in [("cifar10c", {"severity": 3}), ("waterbirds", {"resize": 256}),
                               ("fmnist-spurious", {"source_agreement": 1}),
                               ("fmnist-blocknoise", {"noise_scale": 0.5}),
                               ("cifar10c", {"normalization": [[0.5] * 3, [0.5] * 3]}),
                               ("living17", {"split_file": "s.json", "split": "good"})]:
        check_data_options(get_benchmark(benchmark).load_task, benchmark, options)


def test_a_loader_that_takes_any_keyword_takes_any_data_option():
    """A registered loader may take `**options` (deep.data.base.Benchmark.load_task): it
    names no option of its own, so none is refused as unknown; it checks them itself."""
    from deep.normalization import check_data_options

    def load_task(data_dir, shift, n_target, val_per_class, test_per_class, seed, **options):
        raise AssertionError("not called")
    check_data_options(load_task, "mine", {"severity": 5, "anything": "at all"})


def test_out_of_range_data_options_are_configuration_errors(tmp_path):
    """Reached through the CLI these must print one `error:` line (exit 2), not a traceback."""
    from deep.data.images import ImageTransform
    from deep.errors import ConfigError
    with pytest.raises(ConfigError, match="resize must be at least crop"):
        ImageTransform(resize=30, crop=32)
    # zero or negative sizes and worker counts: named, not PIL's or DataLoader's error later
    with pytest.raises(ConfigError, match="crop must be at least 1, got 0"):
        ImageTransform(resize=0, crop=0)
    with pytest.raises(ConfigError, match="crop must be at least 1, got -32"):
        ImageTransform(resize=64, crop=-32)
    with pytest.raises(ConfigError, match="resize must be at least 1, got -5"):
        ImageTransform(resize=-5, crop=32)
    from deep.data.base import FileSplit
    with pytest.raises(ConfigError, match="num_workers must be at least 0, got -1"):
        FileSplit(["a.png"], torch.tensor([0]), None, ImageTransform(), num_workers=-1)
    with pytest.raises(ConfigError, match="severity must be an integer in 1..5, got 9"):
        fmnist._corrupted(None, "fog", 9, 0)


def test_init_keeps_the_backbone_and_reinitialises_a_classifier_of_another_size(tmp_path):
    torch.manual_seed(0)
    imagenet = build_model("resnet26-w4", 1000)
    torch.save(imagenet.state_dict(), tmp_path / "tv.pth")
    torch.manual_seed(1)
    model = build_model("resnet26-w4", 2)
    fresh_fc = model.fc.weight.detach().clone()
    assert load_backbone(model, tmp_path / "tv.pth") == ["fc.bias", "fc.weight"]
    assert torch.equal(model.layer2[0].conv1.weight, imagenet.layer2[0].conv1.weight)
    assert torch.equal(model.bn1.running_var, imagenet.bn1.running_var)
    assert torch.equal(model.fc.weight, fresh_fc)


def test_init_names_an_unexpected_key_under_the_classifier(tmp_path):
    # guards `k in expected` before comparing shapes: a classifier key the model lacks is
    # an unexpected key (CheckpointError), not a KeyError
    state = build_model("resnet26-w4", 10).state_dict()
    state["fc.scale"] = torch.ones(10)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): fc\.scale"):
        load_backbone(build_model("resnet26-w4", 10), tmp_path / "extra.pth")


def test_init_still_rejects_a_backbone_that_does_not_fit(tmp_path):
    torch.save(build_model("resnet26-w8", 10).state_dict(), tmp_path / "w8.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_backbone(build_model("resnet26-w4", 10), tmp_path / "w8.pth")


def test_augmentation_pads_with_edge_pixels_not_the_mean():
    # a normalised black image: every pixel at the same negative value
    x = torch.full((8, 1, 6, 6), -0.8)
    out = random_crop_flip(pad=2)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, x)


def _crops(image, pad):
    """(dy, dx, flipped) -> the crop of `image` (H, W) padded by repeating its edge, by index."""
    h, w = image.shape
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            rows = [min(max(i + dy - pad, 0), h - 1) for i in range(h)]
            cols = [min(max(j + dx - pad, 0), w - 1) for j in range(w)]
            crop = image[rows][:, cols]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = crop[:, list(range(w - 1, -1, -1))]
    return out


@pytest.mark.parametrize("name, flips", [("crop-flip", True), ("crop", False)])
def test_augmentation_draws_every_offset_and_flips_left_right_only_when_asked(name, flips):
    """Pretraining's augmentation: a crop at one of the (2 pad + 1)^2 offsets, each drawn,
    mirrored left-right (never upside down) for about half the images with crop-flip and
    for none with crop."""
    from deep.pretrain import augmentation
    image = torch.arange(144.0).reshape(12, 12)  # every crop and mirror distinct
    crops = {crop.numpy().tobytes(): key for key, crop in _crops(image, pad=4).items()}
    assert len(crops) == 2 * 9 * 9
    x = image.expand(2000, 1, 12, 12).clone()
    out = augmentation(name)(x, torch.Generator().manual_seed(0))
    seen = [crops[img.numpy().tobytes()] for img in out[:, 0]]  # KeyError: not a crop
    assert {(dy, dx) for dy, dx, _ in seen} == {(dy, dx) for dy in range(9) for dx in range(9)}
    flipped = sum(f for _, _, f in seen) / len(seen)
    assert 0.45 < flipped < 0.55 if flips else flipped == 0


def test_committed_source_models_are_verified(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist, "WEIGHTS_DIR", tmp_path)
    find = fmnist.BENCHMARKS["fmnist-flip"].pretrained
    with pytest.raises(ValueError, match="no source model for arch 'resnet26'.*make pretrain"):
        find("resnet26")
    path = fmnist.source_checkpoint("fmnist-flip", "resnet26-w4")
    assert path == tmp_path / "fmnist-resnet26-w4.pt"  # shared with fmnist-c and blocknoise
    save_checkpoint(path, build_model("resnet26-w4", 10, 1), "resnet26-w4", 10, 1)
    write_manifest(path, note="test")
    assert find("resnet26-w4") == path
    path.write_bytes(path.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        find("resnet26-w4")


def test_pretrain_device_auto_is_the_cpu_run_here_and_recorded(tmp_path, one_thread):
    """--device auto (the CLI default) trains where CUDA is, else on the CPU: here the same
    weights as the library default; the manifest says where it ran; the saved model is on
    the CPU."""
    import json
    from deep.data import get_benchmark
    from deep.pretrain import PretrainConfig, pretrain, pretrain_to_file
    from deep.train import resolve_device
    source = get_benchmark("synthetic").load_source(None)
    config = PretrainConfig(epochs=1, batch_size=64, lr=0.05, augment="none")
    plain = pretrain(source, "resnet26-w4", config, progress=False)
    auto = pretrain(source, "resnet26-w4", config, progress=False, device="auto")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 auto.state_dict().values()))
    pretrain_to_file("synthetic", tmp_path / "m.pt", "resnet26-w4", config, device="auto")
    manifest = json.loads((tmp_path / "m.pt.json").read_text())
    assert manifest["device"] == resolve_device("auto") == "cpu"
    state = torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]
    assert {t.device.type for t in state.values()} == {"cpu"}


@pytest.mark.parametrize("field, bad, listed", [
    ("momentum", "heavy-ball", "nesterov, plain"),
    ("schedule", "linear", "constant, cosine, step"),
    ("augment", "mixup", "crop-flip, crop, none"),
])
def test_a_bad_choice_names_every_valid_one(field, bad, listed):
    """One check for every set of choices (deep.errors.check_choice): the message names
    the field, what was given, and each valid choice; it is a ConfigError, which the
    command line prints as one line."""
    from deep.errors import ConfigError
    from deep.pretrain import PretrainConfig
    with pytest.raises(ConfigError, match=f"{field} must be one of {listed}; got '{bad}'"):
        PretrainConfig(**{field: bad})


def test_every_pretrain_setting_reaches_the_engine():
    """PretrainConfig.train_config hands each of its settings to the engine: a weight
    decay, milestones or gamma left out would train with TrainConfig's tuning defaults
    (1e-4, no milestones, 0.1) without a word. Pretraining trains BN (train mode) and
    every parameter with SGD, momentum 0.9. Expected values are the ones given here."""
    from deep.pretrain import PretrainConfig
    config = PretrainConfig(epochs=4, lr=0.03, seed=7, batch_size=16, weight_decay=2e-3,
                            augment="none", schedule="step", milestones=[2, 3], gamma=0.5,
                            momentum="plain").train_config()
    got = {name: getattr(config, name) for name in (
        "lr", "epochs", "seed", "batch_size", "weight_decay", "schedule", "milestones",
        "gamma", "nesterov", "optimizer", "momentum", "freeze_bn", "augment", "compile")}
    assert got == {"lr": 0.03, "epochs": 4, "seed": 7, "batch_size": 16, "weight_decay": 2e-3,
                   "schedule": "step", "milestones": (2, 3), "gamma": 0.5, "nesterov": False,
                   "optimizer": "sgd", "momentum": 0.9, "freeze_bn": False, "augment": None,
                   "compile": False}
    assert PretrainConfig().train_config().nesterov is True   # Nesterov's by default


def test_the_manifest_and_the_checkpoint_meta_record_the_run(tmp_path, one_thread):
    """Guards the fields `pretrain_to_file` writes: the source *test* accuracy (recounted
    here by hand from the saved weights), the sizes of both splits, the init file, and the
    same fields in the checkpoint's meta (docs: "saved in the checkpoint's meta and in
    the manifest"); the run's state file is gone once both are written."""
    import json
    from deep.checkpoints import load_checkpoint, load_model
    from deep.data import get_benchmark
    from deep.pretrain import PretrainConfig, pretrain_to_file, state_path
    source = get_benchmark("synthetic").load_source(None)
    torch.manual_seed(0)
    init = tmp_path / "init.pth"
    torch.save(build_model("resnet26-w4", source.num_classes).state_dict(), init)
    config = PretrainConfig(epochs=1, batch_size=64, lr=0.05, augment="none", init=str(init))
    pretrain_to_file("synthetic", tmp_path / "m.pt", "resnet26-w4", config)
    manifest = json.loads((tmp_path / "m.pt.json").read_text())
    model = load_model(tmp_path / "m.pt", "resnet26-w4", source.num_classes, source.in_channels)
    with torch.no_grad():   # one batch: BN in eval mode, so the same as any batching
        right = (model.eval()(source.test.images).argmax(1) == source.test.labels).sum()
    # float32 accuracy in the file: equal to the count over the images to 1e-6
    assert manifest["source_test_acc"] == pytest.approx(int(right) / len(source.test), abs=1e-6)
    assert (manifest["source_train_images"], manifest["source_test_images"]) == (
        len(source.train.labels), len(source.test.labels))
    assert manifest["init"] == str(init)
    meta = load_checkpoint(tmp_path / "m.pt").meta
    assert meta["config"] == manifest["config"] and meta["init"] == str(init)
    assert meta["source_test_acc"] == manifest["source_test_acc"]
    assert not state_path(tmp_path / "m.pt").exists()   # the model is safe: state removed


def test_pretraining_without_weight_decay_is_allowed_but_a_negative_one_is_not():
    """weight_decay is an L2 coefficient: 0 (none) is a setting, a negative one is not."""
    from deep.errors import ConfigError
    from deep.pretrain import PretrainConfig
    assert PretrainConfig(weight_decay=0.0).train_config().weight_decay == 0.0
    with pytest.raises(ConfigError, match="weight_decay"):
        PretrainConfig(weight_decay=-1e-4)


@pytest.mark.parametrize("name", ["data_dir", "shift", "n_target", "val_per_class",
                                  "test_per_class", "seed"])
def test_a_loaders_own_arguments_are_not_data_options(name):
    """The loader's positional arguments (data folder, shift, split sizes, seed) come from
    the protocol and the CLI, never from `--data` or a [data] table: each is refused as
    unknown there, though the loader has a parameter of that name."""
    from deep.data import get_benchmark
    from deep.errors import ConfigError
    from deep.normalization import check_data_options
    with pytest.raises(ConfigError, match=rf"unknown data option\(s\) \['{name}'\]"):
        check_data_options(get_benchmark("cifar10c").load_task, "cifar10c", {name: 1})
