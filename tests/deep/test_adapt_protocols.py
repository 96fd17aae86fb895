"""`python -m deep adapt` on the real data layouts and architectures (deep.adapt.runner,
deep.adapt.cli): MEMO's pixels, --arch, --trust-checkpoint, the cifar10c protocol."""

from __future__ import annotations

import argparse
import dataclasses
import fractions
from pathlib import Path

import pytest
import torch

from deep.__main__ import main
from deep.adapt import MemoConfig, TentConfig, make_adapter, run_stream
from deep.adapt.cli import add_arguments, protocol_from_args, run
from deep.adapt.protocol import load_adapt_protocol
from deep.adapt.results import read_adapt_results
from deep.adapt.runner import AdaptSummary, load_test_split, memo_augmenter, run_adaptation
from deep.augment_memo import MemoAugmenter
from deep.blocks import blocks_for
from deep.checkpoints import save_checkpoint
from deep.models import build_model
from deep.protocol import load_protocol
from tests.deep.fixtures import writers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cifar_dir(tmp_path):
    return writers.write_cifar10c(tmp_path / "data")


def cifar_protocol(benchmark="cifar10c", shift="fog", **kw):
    """The cifar10c protocol cut to one shift, seed and a few images of the fixture."""
    fields = dict(benchmark=benchmark, shifts=[shift], seeds=[0], test_per_class=1, images=2,
                  methods=["memo"], blocks=["none"], memo={"copies": 1, "lr": 0.005})
    return load_adapt_protocol("cifar10c").replace(**{**fields, **kw})


def assert_fixture_pixels(pixels: torch.Tensor, labels: torch.Tensor) -> None:
    """writers.write_cifar10c's severity-5 images: red 200, green = row, blue = 20 * label."""
    assert torch.allclose(pixels[:, 0], torch.tensor(200 / 255), atol=1e-5)
    assert torch.allclose(pixels[:, 2], (20 * labels / 255).view(-1, 1, 1).expand_as(pixels[:, 2]),
                          atol=1e-5)
    green = pixels[:, 1] * 255
    assert torch.allclose(green, green.round(), atol=1e-3) and 0 <= green.min() <= green.max() < 40


# --- MEMO augments the pixels the stream was made from --------------------------------

@pytest.mark.parametrize("benchmark,shift,arch", [
    ("cifar10c", "fog", "resnet26-gn"),            # mean = std = 0.5
    ("cifar10c", "fog", "wrn28-10"),               # [0, 1]
    ("cifar10c", "fog", "clip-vit-tiny"),          # CLIP's statistics
    ("cifar10c", "fog", "resnet26"),               # none of its own: the loader's (CIFAR-10)
    ("cifar10c-official", "gaussian_noise", "resnet26-gn"),
    ("cifar10c-official", "gaussian_noise", "resnet26")])
def test_memo_unnormalises_with_the_statistics_of_the_stream(cifar_dir, benchmark, shift, arch):
    protocol = cifar_protocol(benchmark, shift, arch=arch)
    images, labels = load_test_split(protocol, shift, 0, str(cifar_dir))
    augmenter = memo_augmenter(protocol)
    assert_fixture_pixels(images * augmenter.std + augmenter.mean, labels)


@pytest.mark.parametrize("benchmark,shift,arch", [
    ("cifar10c", "fog", "resnet26-gn"), ("cifar10c-official", "gaussian_noise", "resnet26")])
def test_memo_run_augments_the_true_pixels(cifar_dir, monkeypatch, tmp_path, benchmark, shift,
                                           arch):
    """End to end: the pixels MEMO's AugMix chains receive during a run."""
    seen = []
    monkeypatch.setattr(MemoAugmenter, "augmix",
                        lambda self, pixels, generator: seen.append(pixels) or pixels)
    protocol = cifar_protocol(benchmark, shift, arch=arch, blocks=["last"])
    with pytest.warns(UserWarning, match="RANDOM INITIALISATION"):
        run_adaptation(protocol, tmp_path / "r.csv", checkpoint="none", data_dir=str(cifar_dir),
                       progress=False)
    pixels = torch.stack(seen)
    assert len(pixels) == 2
    blue = pixels[:, 2, 0, 0] * 255 / 20
    assert_fixture_pixels(pixels, blue.round().long())


def test_memo_normalisation_of_a_loader_without_the_option(recwarn):
    """imagenet-c's loader takes no `normalization`: it keeps ImageNet's statistics (and
    warns) whatever the architecture, so MEMO must use those too."""
    from deep.data.images import IMAGENET_MEAN, IMAGENET_STD
    protocol = cifar_protocol("imagenet-c", "fog", arch="clip-vit-tiny")
    augmenter = memo_augmenter(protocol)
    assert torch.allclose(augmenter.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(augmenter.std.flatten(), torch.tensor(IMAGENET_STD))


def test_memo_normalisation_of_fashion_mnist_gives_its_8_bit_pixels(real_fmnist):
    protocol = dataclasses.replace(load_adapt_protocol("fmnist-c"), test_per_class=2)
    images, _ = load_test_split(protocol, "fog", 0, None)
    augmenter = memo_augmenter(protocol)
    pixels = (images * augmenter.std + augmenter.mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3 and pixels.max() > 200


# --- --arch and --trust-checkpoint --------------------------------------------------------

def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--benchmark", "cifar10c", "--out", "r.csv", *argv])
    return protocol_from_args(args)


def test_arch_flag_overrides_the_protocol_and_is_checked(capsys):
    assert parse("--arch", "wrn28-10").arch == "wrn28-10"
    assert parse().arch == load_adapt_protocol("cifar10c").arch
    with pytest.raises(ValueError, match="unknown arch 'resnet62'"):  # before any data is read
        parse("--arch", "resnet62")
    assert main(["adapt", "--benchmark", "cifar10c", "--out", "r.csv", "--arch", "resnet62"]) == 2
    assert "unknown arch 'resnet62'; known: resnet26" in capsys.readouterr().err


def test_trust_checkpoint_flag_reaches_the_checkpoint_loader(cifar_dir, tmp_path, capsys):
    """A MEMO-layout file with a global that safe loading refuses: the error names the
    flag, and the flag loads it."""
    state = build_model("resnet26-gn", 10).state_dict()
    torch.save({"net": state, "err_cls": fractions.Fraction(917, 10000)}, tmp_path / "ckpt.pth")
    out = tmp_path / "r.csv"
    args = ["adapt", "--benchmark", "cifar10c", "--arch", "resnet26-gn", "--out", str(out),
            "--checkpoint", str(tmp_path / "ckpt.pth"), "--data-dir", str(cifar_dir),
            "--method", "tent", "--blocks", "none", "--shifts", "fog", "--seeds", "0",
            "--test-per-class", "1", "--images", "2", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fractions.Fraction" in err and "--trust-checkpoint" in err and not out.exists()
    assert main(args + ["--trust-checkpoint"]) == 0
    assert [r["blocks"] for r in read_adapt_results(out)] == ["none"]


# --- cifar10c: MEMO's GroupNorm ResNet-26 -------------------------------------------------

def test_cifar10c_protocol_adapts_the_model_pretrain_writes(cifar_dir, tmp_path):
    """`python -m deep pretrain --benchmark cifar10c` writes the sweep protocol's arch
    (the checkpoint adapt gets); the adapt protocol must use that arch or loading fails."""
    arch = load_adapt_protocol("cifar10c").arch
    assert arch == load_protocol("cifar10c").arch == "resnet26-gn"
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "source.pt", build_model(arch, 10), arch, 10, 3)
    protocol = cifar_protocol(methods=["memo", "tent"], images=4,
                              memo={"copies": 2, "blocks": ["none", "first"]},
                              tent={**load_adapt_protocol("cifar10c").settings_of("tent"), "batch_size": 2})
    run_adaptation(protocol, tmp_path / "r.csv", checkpoint=str(ckpt), data_dir=str(cifar_dir),
                   progress=False)
    rows = {(r["method"], r["blocks"]): r for r in read_adapt_results(tmp_path / "r.csv")}
    assert set(rows) == {("memo", "none"), ("memo", "first"), ("tent", "none"), ("tent", "first"),
                         ("tent", "first+second"), ("tent", "all")}
    assert all(r["arch"] == "resnet26-gn" for r in rows.values())
    tent = [rows["tent", b]["adapted_params"] for b in ("none", "first", "first+second", "all")]
    assert tent[0] == 0 < tent[1] < tent[2] < tent[3]


@pytest.mark.parametrize("option", ["first", "second", "first+second", "all"])
def test_tent_on_groupnorm_updates_exactly_its_affine_parameters(option):
    """GroupNorm normalises each image with its own statistics (there is no batch-statistics
    switch to make): TENT then adapts the GroupNorm weights and biases of the blocks, all of
    them, nothing else. Channels-last, as adapt_stream runs (GroupNorm's CPU backward
    crashed on such inputs, see deep.models.gn_resnet)."""
    torch.manual_seed(0)
    model = build_model("resnet26-gn", 10).eval().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = make_adapter(model, "tent", option, blocks_for("resnet26-gn"),
                           TentConfig(batch_size=4))
    images, labels = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(10, (8,))
    run_stream(adapter, images, labels, torch.arange(8), 4)
    modules = dict(model.named_modules())
    assert adapter.names and all(isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.GroupNorm)
                                 for n in adapter.names)
    after = model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(adapter.names)


def test_memo_bn_prior_on_a_model_without_batchnorm_is_a_clear_error(tmp_path):
    """The prior mixes BatchNorm running and input statistics: on a GroupNorm model it
    would silently change nothing."""
    model = build_model("resnet26-gn", 10)
    with pytest.raises(ValueError, match="no BatchNorm.*prior_strength -1"):
        make_adapter(model, "memo", "first", blocks_for("resnet26-gn"),
                     MemoConfig(prior_strength=16), augment=MemoAugmenter((0.5,) * 3, (0.5,) * 3),
                     generator=torch.Generator())
    protocol = cifar_protocol(methods=["tent", "memo"], memo={"prior_strength": 16})
    writers.write_cifar10c(tmp_path)    # the data folder is checked first (check_local_data)
    with pytest.warns(UserWarning, match="RANDOM"), pytest.raises(ValueError, match="no BatchNorm"):
        run_adaptation(protocol, tmp_path / "r.csv", checkpoint="none", data_dir=tmp_path,
                       progress=False)
    assert not (tmp_path / "r.csv").exists()       # before any stream (and any data) ran


def test_a_data_flag_overrides_the_protocols_data_table():
    """--data KEY=VALUE beats the protocol's [data] for that key and keeps the others."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    file_data = load_adapt_protocol("fmnist-c").data
    assert file_data.get("severity") == 5
    args = parser.parse_args(["--benchmark", "fmnist-c", "--out", "r.csv", "--data", "severity=3"])
    assert protocol_from_args(args).data == {**file_data, "severity": 3}


# --- the third audit: what the command line hands the runner ------------------------------

def test_memo_augments_at_the_severity_of_the_protocols_memo_table():
    """[memo] severity = 3 (AugMix's 0..10 scale) reaches the augmenter the runner uses,
    not MEMO's default 1."""
    protocol = load_adapt_protocol("fmnist-c")
    protocol = protocol.replace(memo={**protocol.settings_of("memo"), "severity": 3.0})
    assert memo_augmenter(protocol).severity == 3.0


def test_the_run_flags_reach_the_runner(monkeypatch, capsys):
    """--episodic, --no-progress, --data-dir, --trust-checkpoint, --checkpoint,
    --test-per-class, --threads and --report reach run_adaptation, set_threads and the
    report as given; without them: online, with progress lines, the benchmark's own data
    location, safe loading, the file's checkpoint and split, one thread, no report."""
    calls, threads = [], []
    def runner(protocol, out, **kw):
        calls.append({**kw, "checkpoint": protocol.checkpoint, "per_class": protocol.test_per_class})
        return AdaptSummary(0, 0, 0.0, Path(out))
    monkeypatch.setattr("deep.adapt.cli.run_adaptation", runner)
    monkeypatch.setattr("deep.adapt.cli.set_threads", threads.append)
    reports = []
    monkeypatch.setattr("deep.adapt.cli.write_adapt_report", lambda out: reports.append(out) or [])
    base = ["--benchmark", "fmnist-c", "--out", "r.csv"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(base)) == 0
    assert run(parser.parse_args([*base, "--episodic", "--no-progress", "--data-dir", "/d",
                                  "--checkpoint", "m.pt", "--trust-checkpoint", "--test-per-class", "7",
                                  "--threads", "3", "--report"])) == 0
    assert calls == [dict(data_dir=None, episodic=False, progress=True, trust_checkpoint=False,
                          checkpoint=None, per_class=90),
                     dict(data_dir="/d", episodic=True, progress=False, trust_checkpoint=True,
                          checkpoint="m.pt", per_class=7)]
    assert threads == [1, 3] and reports == ["r.csv"]
    assert "ran 0 streams, skipped 0 already finished" in capsys.readouterr().out
