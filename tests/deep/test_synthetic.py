"""The built-in `synthetic` benchmark (deep/data/synthetic.py) does what its table says.

Each image's class is read back from the image itself: a class's grating is coloured by
its palette entry (one per subpopulation), so the covariance of the three channels over
the pixels is 0.5 * m m^T with m = (0.5 + 0.5 |colour|) sign(colour), whatever the
orientation and phase; the corner patch of `spurious` is 2 x the colour of its cue class.
"""

from __future__ import annotations

import pytest
import torch

from deep.data import DataError, get_benchmark
from deep.data.synthetic import _palette

BENCH = get_benchmark("synthetic")


def drawn_class(images: torch.Tensor, subpopulation: int = 0) -> torch.Tensor:
    """The class whose colour the grating of each image (n, 3, H, W) carries."""
    x = images.flatten(2)
    x = x - x.mean(-1, keepdim=True)
    cov = x @ x.transpose(1, 2) / x.shape[-1]
    pairs = [(0, 1), (0, 2), (1, 2)]             # off the diagonal: free of the pixel noise
    observed = torch.stack([cov[:, i, j] for i, j in pairs], 1)
    colour = _palette()[subpopulation]
    m = (0.5 + 0.5 * colour.abs()) * colour.sign()
    expected = torch.stack([0.5 * m[:, i] * m[:, j] for i, j in pairs], 1)
    return torch.cdist(observed, expected).argmin(1)


def test_source_images_carry_the_colour_of_their_label():
    """The reading itself: every source image is read as its own label."""
    source = BENCH.load_source(None)
    assert torch.equal(drawn_class(source.test.images), source.test.labels)


def test_flip_labels_are_three_minus_the_class_drawn():
    task = BENCH.load_task(None, "flip", n_target=400, val_per_class=25, test_per_class=25)
    for split in (task.train, task.val, task.test):
        assert torch.equal(split.labels, 3 - drawn_class(split.images))


def test_feature_shift_draws_the_same_classes_from_subpopulation_b():
    """Read with B's palette, the images show their labels (B's colours for classes 0 and 3
    differ only in strength, so at 3.5 cycles a few are misread: 1 in 400 measured); read
    with A's, none does."""
    task = BENCH.load_task(None, "feature", n_target=400, val_per_class=25, test_per_class=25)
    as_b = drawn_class(task.train.images, subpopulation=1) == task.train.labels
    as_a = drawn_class(task.train.images, subpopulation=0) == task.train.labels
    assert as_b.float().mean() > 0.98 and as_a.float().mean() < 0.1


def test_spurious_patch_matches_the_label_in_90_percent_of_training_and_25_percent_of_evaluation():
    """Labels are the drawn class + 1 (mod 4); the 4x4 patch shows a cue class whose colour
    matches the label in 90 % of training images and at random (1 in 4) in validation and
    test; a differing cue is never the label, and the group is 2 * label + (cue matches)."""
    task = BENCH.load_task(None, "spurious", n_target=1600, val_per_class=100,
                           test_per_class=300)
    patch_colours = 2.0 * _palette()[0]
    rates = {}
    for name, split in (("train", task.train), ("val", task.val), ("test", task.test)):
        images, labels = split.images, split.labels
        assert torch.equal(labels, (drawn_class(images[:, :, 4:, :]) + 1) % 4)
        patch = images[:, :, :4, :4]
        cue = torch.cdist(patch.mean(dim=(2, 3)), patch_colours).argmin(1)
        assert torch.allclose(patch, patch_colours[cue][:, :, None, None].expand_as(patch))
        assert torch.equal(split.groups, 2 * labels + (cue == labels).long())
        rates[name] = (cue == labels).float().mean().item()
    assert abs(rates["train"] - 0.9) < 0.03, rates
    assert abs(rates["val"] - 0.25) < 0.06 and abs(rates["test"] - 0.25) < 0.04, rates


def test_validation_and_test_images_are_disjoint():
    task = BENCH.load_task(None, "noise", n_target=16, val_per_class=100, test_per_class=300)
    val = task.val.images.flatten(1)
    test = task.test.images.flatten(1)
    assert torch.cdist(test, val).min() > 0


def _rows_within(small: torch.Tensor, large: torch.Tensor) -> bool:
    """Whether every image of `small` is one of `large`'s."""
    return bool((torch.cdist(small.flatten(1), large.flatten(1)).min(1).values == 0).all())


def test_a_seeds_test_and_validation_images_do_not_depend_on_n_target():
    """An n_target sweep (and an adaptation stream, deep.adapt.runner.load_test_split)
    scores every size on one test set: test, then val, then train are drawn, so a seed's
    test images do not depend on n_target or val_per_class, its validation images not on
    n_target, and its training sets are nested as n_target grows."""
    small = BENCH.load_task(None, "noise", n_target=4, val_per_class=10, test_per_class=50, seed=3)
    large = BENCH.load_task(None, "noise", n_target=200, val_per_class=10, test_per_class=50, seed=3)
    other_val = BENCH.load_task(None, "noise", n_target=4, val_per_class=1, test_per_class=50, seed=3)
    for a, b in ((small.test, large.test), (small.test, other_val.test), (small.val, large.val)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert _rows_within(small.train.images, large.train.images)
    other_seed = BENCH.load_task(None, "noise", n_target=4, val_per_class=10, test_per_class=50, seed=4)
    assert not torch.equal(small.test.images, other_seed.test.images)


@pytest.mark.parametrize("sizes, message", [
    ({"val_per_class": -1}, "val_per_class must be at least 0, got -1"),
    ({"test_per_class": -5}, "test_per_class must be at least 0, got -5"),
    ({"n_target": 2.5}, "n_target must be an integer, got 2.5"),
    ({"n_target": "8"}, "n_target must be an integer, got '8'"),
])
def test_a_split_size_that_is_not_a_count_is_refused(sizes, message):
    """val_per_class=-1 used to give a validation split one image short of the pool per
    class (a slice [:-1]), without a word; a float or a string n_target a TypeError."""
    with pytest.raises(DataError, match=message):
        BENCH.load_task(None, "noise", **{"n_target": 8, **sizes})


def test_a_data_folder_is_refused_not_ignored(tmp_path, monkeypatch):
    """`--data-dir my_data --benchmark synthetic` used to report synthetic numbers as if the
    folder had been read. `adapt` refuses it before the source model is resolved (which
    may train one)."""
    from deep.adapt.protocol import AdaptProtocol
    from deep.adapt.runner import run_adaptation
    monkeypatch.setattr("deep.adapt.runner.resolve_checkpoint",
                        lambda *a, **k: pytest.fail("resolved a model before the check"))
    adapt = AdaptProtocol("synthetic", "resnet26-w4", ["noise"], ["tent"], ["none"], [0])
    for load in (lambda: BENCH.load_task(tmp_path, "noise", n_target=8),
                 lambda: BENCH.load_source(tmp_path), lambda: BENCH.check_data_dir(tmp_path),
                 lambda: run_adaptation(adapt, tmp_path / "a.csv", data_dir=str(tmp_path))):
        with pytest.raises(DataError, match="synthetic is generated in memory and reads no "
                                            "folder.*drop --data-dir"):
            load()
