"""`python -m deep adapt` on the real data layouts and architectures (deep.adapt.runner,
deep.adapt.cli): MEMO's pixels, --arch, --trust-checkpoint, the cifar10c protocol."""

from __future__ import annotations

import argparse
import dataclasses
import fractions

import pytest
import torch

from deep.adapt.protocol import load_adapt_protocol
from deep.adapt.results import read_adapt_results
from deep.adapt.runner import load_test_split, memo_augmenter, run_adaptation
from deep.augment_memo import MemoAugmenter
from tests.deep.fixtures import writers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cifar_dir(tmp_path):
    return writers.write_cifar10c(tmp_path / "data")


def cifar_protocol(benchmark="cifar10c", shift="fog", **kw):
    """The cifar10c protocol cut to one shift, seed and a few images of the fixture."""
    fields = dict(benchmark=benchmark, shifts=[shift], seeds=[0], test_per_class=1, images=2,
                  methods=["memo"], blocks=["none"], memo={"copies": 1, "lr": 0.005})
    return dataclasses.replace(load_adapt_protocol("cifar10c"), **{**fields, **kw})


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


@pytest.mark.parametrize("benchmark,shift,arch", [("cifar10c", "fog", "resnet26-gn"),
                                                  ("cifar10c-official", "gaussian_noise", "resnet26")])
def test_memo_run_augments_the_true_pixels(cifar_dir, monkeypatch, tmp_path, benchmark, shift, arch):
    """End to end: the pixels MEMO's AugMix chains receive during a run."""
    seen = []
    monkeypatch.setattr(MemoAugmenter, "augmix", lambda self, pixels, g: seen.append(pixels) or pixels)
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


def test_memo_normalisation_of_fashion_mnist_gives_its_8_bit_pixels():
    from deep.data.fmnist import DEFAULT_DIR
    if not DEFAULT_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    protocol = dataclasses.replace(load_adapt_protocol("fmnist-c"), test_per_class=2)
    images, _ = load_test_split(protocol, "fog", 0, None)
    augmenter = memo_augmenter(protocol)
    pixels = (images * augmenter.std + augmenter.mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3 and pixels.max() > 200


# --- --arch and --trust-checkpoint --------------------------------------------------------

def parse(*argv):
    from deep.adapt.cli import add_arguments, protocol_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return protocol_from_args(parser.parse_args(["--benchmark", "cifar10c", "--out", "r.csv", *argv]))


def test_arch_flag_overrides_the_protocol_and_is_checked(capsys):
    from deep.__main__ import main
    assert parse("--arch", "wrn28-10").arch == "wrn28-10"
    assert parse().arch == load_adapt_protocol("cifar10c").arch
    with pytest.raises(ValueError, match="unknown arch 'resnet62'"):  # before any data is read
        parse("--arch", "resnet62")
    assert main(["adapt", "--benchmark", "cifar10c", "--out", "r.csv", "--arch", "resnet62"]) == 2
    assert "unknown arch 'resnet62'; known: resnet26" in capsys.readouterr().err


def test_trust_checkpoint_flag_reaches_the_checkpoint_loader(cifar_dir, tmp_path, capsys):
    """A MEMO-layout file with a global that safe loading refuses: the error names the
    flag, and the flag loads it."""
    from deep.__main__ import main
    from deep.models import build_model
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
