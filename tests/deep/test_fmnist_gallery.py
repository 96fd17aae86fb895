"""The picture grid of the Fashion-MNIST suite (deep/gallery.py), drawn from a fake data set."""

import numpy as np
import pytest
from PIL import Image

from deep import gallery
from deep.data import fmnist as F
from tests.deep.test_fmnist import write_fake


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    """The real files when installed (already loaded by the loader tests), else a fake set."""
    try:
        F.load_fashion_mnist()
        return None
    except F.DataError:
        return write_fake(tmp_path_factory.mktemp("fashion"))


def test_gallery_writes_a_png(fake_dir, tmp_path):
    out = gallery.make_gallery(tmp_path / "sub" / "g.png", fake_dir, ["brightness", "contrast"])
    assert out == tmp_path / "sub" / "g.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 1000
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10   # images were drawn, not a blank canvas
    assert not (tmp_path / "sub" / "g.png.tmp.png").exists()   # written atomically


def test_gallery_rejects_unknown_corruptions(fake_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown corruption"):
        gallery.make_gallery(tmp_path / "x.png", fake_dir, ["frost"])


def test_pixels_undo_the_fashion_mnist_normalisation():
    """The panels show what is tuned on: normalised images back to pixels / 255."""
    import torch
    raw = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    normalised = torch.tensor((raw / 255.0 - F.MEAN[0]) / F.STD[0], dtype=torch.float32)[:, None]
    np.testing.assert_allclose(gallery._pixels(normalised), raw / 255.0, atol=1e-6)
