"""`python -m deep adapt` on the real data layouts and architectures (deep.adapt.runner,
deep.adapt.cli): MEMO's pixels, --arch, --trust-checkpoint, the cifar10c protocol."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deep.adapt.protocol import load_adapt_protocol
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
