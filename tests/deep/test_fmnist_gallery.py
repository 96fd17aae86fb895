"""The picture grid of the Fashion-MNIST suite (deep/gallery.py), drawn from a fake data set."""

import numpy as np
import pytest
from PIL import Image

from deep import gallery
from deep.data import fmnist as F
from deep.errors import ConfigError
from tests.deep.test_fmnist import write_fake


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    """The real files when installed (already loaded by the loader tests), else a fake set."""
    try:
        F.load_fashion_mnist()
        return None
    except F.DataError:
        return write_fake(tmp_path_factory.mktemp("fashion"))


def data_dir_flag(fake_dir) -> list[str]:
    return [] if fake_dir is None else ["--data-dir", str(fake_dir)]


def test_gallery_writes_a_png(fake_dir, tmp_path, capsys):
    """`python -m deep.gallery` end to end (the only test here that draws)."""
    out = tmp_path / "sub" / "g.png"
    argv = ["--out", str(out), "--corruptions", "brightness, contrast", *data_dir_flag(fake_dir)]
    assert gallery.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 1000
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10   # images were drawn, not a blank canvas
    assert not (tmp_path / "sub" / "g.png.tmp.png").exists()   # written atomically


def test_gallery_rejects_unknown_corruptions(fake_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown corruption"):
        gallery.make_gallery(tmp_path / "x.png", fake_dir, ["frost"])


def test_gallery_refuses_a_folder_as_out_before_drawing(fake_dir, tmp_path, monkeypatch):
    """It used to draw the whole picture, then fail renaming it onto the folder
    (IsADirectoryError), leaving <folder>.tmp.png beside it."""
    monkeypatch.setattr(gallery, "panel_c", lambda *args: pytest.fail("drew before checking"))
    with pytest.raises(ConfigError, match="is a folder; give the PNG file to write, e.g. "):
        gallery.make_gallery(tmp_path, fake_dir, ["brightness"])
    assert list(tmp_path.parent.glob(tmp_path.name + ".tmp*")) == []


@pytest.mark.parametrize("argv, message", [
    (["--corruptions", "nope", "--out", "{tmp}/new/g.png"],
     "unknown corruption(s) ['nope']; known: gaussian_noise"),
    (["--corruptions", ","], "--corruptions names no corruption; give a comma-separated subset"),
    (["--data-dir", "{tmp}/missing"], "Fashion-MNIST folder {tmp}/missing does not exist"),
    (["--out", "{tmp}"], "--out {tmp} is a folder; give the PNG file to write"),
    (["--out", "{tmp}/g.jpg"], "--out {tmp}/g.jpg: the gallery is a PNG image"),
    (["--out", "{tmp}/a_file/g.png"], "{tmp}/a_file is a file, not a folder")])
def test_gallery_command_line_reports_bad_input_in_one_line(fake_dir, tmp_path, monkeypatch,
                                                            capsys, argv, message):
    """User errors: `error: <message>`, status 2, no traceback, nothing drawn or written."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(gallery, "panel_c", lambda *args: pytest.fail("drew before checking"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--data-dir" not in argv:
        argv += data_dir_flag(fake_dir)
    assert gallery.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_pixels_undo_the_fashion_mnist_normalisation():
    """The panels show what is tuned on: normalised images back to pixels / 255."""
    import torch
    raw = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    normalised = torch.tensor((raw / 255.0 - F.MEAN[0]) / F.STD[0], dtype=torch.float32)[:, None]
    np.testing.assert_allclose(gallery._pixels(normalised), raw / 255.0, atol=1e-6)


def test_flip_panel_names_each_image_by_its_original_class(fake_dir):
    """Guards the fmnist-flip titles: "<class of the picture>\\nlabel y -> 9 - y", y the
    picture's label in the test labels file (naming the flipped label would call a T-shirt
    an ankle boot), one image of each of the 10 original classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(12, 2))
    try:
        gallery.panel_flip(fig, fake_dir, width=10)
        shown = [(ax.get_title(), ax.get_images()[0].get_array()) for ax in fig.axes
                 if ax.get_title()]
    finally:
        plt.close(fig)
    data = F.load_fashion_mnist(fake_dir)
    label_of = {image.tobytes(): int(y) for image, y in zip(data.test_images, data.test_labels)}
    originals = []
    for title, picture in shown:
        name, line = title.split("\n")
        original, flipped = (int(v) for v in line.removeprefix("label ").split(" -> "))
        pixels = np.rint(np.asarray(picture) * 255).astype(np.uint8)
        assert label_of[pixels.tobytes()] == original, title
        assert flipped == 9 - original and name == F.CLASS_NAMES[original], title
        originals.append(original)
    assert sorted(originals) == list(range(10))


def test_pixels_clamp_values_outside_the_pixel_range():
    """A normalised value past white (pixel 1.5) or below black (-0.5) is shown as 1 or 0."""
    import torch
    pixels = torch.tensor([1.5, -0.5, 0.25]).reshape(1, 1, 1, 3)
    normalised = (pixels - F.MEAN[0]) / F.STD[0]
    np.testing.assert_allclose(gallery._pixels(normalised), [[[1.0, 0.0, 0.25]]], atol=1e-6)


def test_an_upper_case_png_name_is_a_png(tmp_path):
    """The suffix is compared case-blind: G.PNG is a PNG file name."""
    assert gallery.check_png(tmp_path / "G.PNG") == tmp_path / "G.PNG"


def test_a_missing_data_folder_fails_before_the_out_folder_is_made(tmp_path):
    """The data folder is read before `out`'s folder is made: a typo in --data-dir leaves
    no new empty folder behind."""
    with pytest.raises(F.DataError, match="does not exist"):
        gallery.make_gallery(tmp_path / "new" / "g.png", tmp_path / "missing", ["brightness"])
    assert not (tmp_path / "new").exists()


def test_spurious_panel_shows_majority_groups_first_and_minority_groups_in_red(fake_dir):
    """Each row: up to 4 images of each group, in the order 3, 0 (the source's majority
    groups) then 1, 2; a title is red exactly for the minority groups 1 and 2."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(16, 4))
    try:
        gallery.panel_spurious(fig, fake_dir, width=16)
        rows = {}
        for ax in fig.axes:
            if ax.get_title():
                group = F.GROUP_NAMES.index(ax.get_title().split("\n")[1])
                rows.setdefault(round(ax.get_position().y0, 3), []).append(
                    (ax.get_position().x0, group, matplotlib.colors.to_hex(ax.title.get_color())))
    finally:
        plt.close(fig)
    red = matplotlib.colors.to_hex("tab:red")
    order = {3: 0, 0: 1, 1: 2, 2: 3}
    assert len(rows) == 2
    for row in rows.values():
        groups = [g for _, g, _ in sorted(row)]
        assert groups == sorted(groups, key=order.get) and len(set(groups)) > 1
        assert all(groups.count(g) <= 4 for g in set(groups))
        assert all((colour == red) == (g in (1, 2)) for _, g, colour in row)


@pytest.mark.slow
def test_the_committed_picture_is_what_the_documented_command_draws(real_fmnist, tmp_path):
    """docs/fmnist.md shows figures/fmnist_targets.png and says `python -m deep.gallery --out
    figures/fmnist_targets.png` redraws it; the committed one still named the blocknoise
    scales of before (first 0.35, second 0.4, last 2), not NOISE_SCALES. The PNG records
    every text it draws: those are compared, and the pixels loosely (matplotlib versions
    render text a little differently; the images are the data's)."""
    from pathlib import Path
    import matplotlib.pyplot as plt

    from sims.plots import style
    committed = Path(__file__).resolve().parents[2] / "figures" / "fmnist_targets.png"
    with plt.rc_context():  # (puts the process's rcParams back afterwards)
        # the global style another module set (seaborn's theme, as in make figures) must
        # not change the picture: it once moved 4 % of its pixels, in whichever pytest
        # worker had drawn a sims figure first
        style()
        assert gallery.main(["--out", str(tmp_path / "t.png"), "--data-dir", str(real_fmnist)]) == 0
    with Image.open(tmp_path / "t.png") as new, Image.open(committed) as old:
        assert new.text["Description"] == old.text["Description"]
        assert "first 0.45" in new.text["Description"]
        assert new.size == old.size
        a, b = (np.asarray(image.convert("L"), dtype=float) for image in (new, old))
        assert np.mean(np.abs(a - b) > 64) < 0.01    # the same pictures where they are
