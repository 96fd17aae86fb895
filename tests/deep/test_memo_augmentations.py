"""MEMO's augmentations against their public definitions (AugMix `augmentations.py`, MEMO's
`third_party.py`, torchvision's RandomCrop / RandomHorizontalFlip, PIL's transforms): the
strength ranges of each operation, the mixing weights, the crop and the geometric
operations' geometry. The expected values are AugMix's formulas and PIL's output, not
read back from `deep.augment_memo`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deep import augment_memo
from deep.augment_memo import MemoAugmenter


def _recorded_arguments(monkeypatch, op: str, primitive: str, severity: float,
                        shape=(1, 30, 12), draws: int = 2000) -> list:
    """The strength argument the operation `op` passes to its primitive over `draws` draws."""
    seen = []
    monkeypatch.setattr(augment_memo, primitive, lambda x, value: seen.append(value) or x)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    for _ in range(draws):
        augment_memo.OPERATIONS[op](x, g, severity)
    return seen


def test_operation_strengths_span_augmix_ranges(monkeypatch):
    """AugMix: level ~ U(0.1, severity); rotate int(level * 30 / 10) degrees, solarize at
    256 - int(level * 256 / 10), posterize to 4 - int(level * 4 / 10) bits, shear
    level * 0.3 / 10, translate int(level * (side / 3) / 10) pixels, the signed ones
    negated with probability 1/2. Over 2000 draws every integer value in range shows."""
    rot = _recorded_arguments(monkeypatch, "rotate", "rotate", 10.0)
    assert set(rot) == set(range(-29, 30))            # int(U(0.1, 10) * 3): 0..29, either sign
    assert 0.45 < np.mean([d < 0 for d in rot if d]) < 0.55
    assert set(_recorded_arguments(monkeypatch, "rotate", "rotate", 1.0)) == set(range(-2, 3))
    # MEMO's severity 1: int(U(0.1, 1) * 25.6) = 2..25, threshold 231..254
    assert set(_recorded_arguments(monkeypatch, "solarize", "solarize", 1.0)) == set(range(231, 255))
    assert set(_recorded_arguments(monkeypatch, "posterize", "posterize", 10.0)) == {1, 2, 3, 4}
    assert set(_recorded_arguments(monkeypatch, "posterize", "posterize", 1.0)) == {4}
    for op in ("shear_x", "shear_y"):
        amounts = np.array(_recorded_arguments(monkeypatch, op, op, 10.0))
        assert np.abs(amounts).min() >= 0.003 - 1e-9 and np.abs(amounts).max() <= 0.3
        assert np.abs(amounts).max() > 0.29 and 0.45 < (amounts < 0).mean() < 0.55
        assert np.abs(_recorded_arguments(monkeypatch, op, op, 1.0)).max() <= 0.03
    # a 30 x 12 image: side / 3 is 10 rows, 4 columns: int(U(0.1, 10) * 1.0) rows, * 0.4 columns
    assert set(_recorded_arguments(monkeypatch, "translate_y", "translate_y", 10.0)) == set(range(-9, 10))
    assert set(_recorded_arguments(monkeypatch, "translate_x", "translate_x", 10.0)) == set(range(-3, 4))


def _pil_levels(image) -> torch.Tensor:
    return torch.tensor(np.asarray(image), dtype=torch.float32)


@pytest.mark.parametrize("name", ["rotate 10", "rotate -25", "shear_x 0.3", "shear_x -0.2",
                                  "shear_y 0.3", "shear_y -0.2", "translate_y 2",
                                  "translate_y -3", "translate_x 2"])
def test_geometric_operations_move_pixels_as_pils_transforms(name):
    """On a 16 x 12 (non-square) grey image, each geometric operation against PIL's own call
    in AugMix (`rotate(degrees, BILINEAR)`, `transform(AFFINE, (1, s, 0, 0, 1, 0))` ...,
    fill 128): PIL rounds to 8 bits and treats the border differently, so pixels may differ
    by a level or so (a few near the edge by more), while the wrong direction, centre or
    axis moves most pixels by tens of levels."""
    Image = pytest.importorskip("PIL.Image")
    op, value = name.split()
    value = float(value)
    levels = (torch.rand(1, 16, 12, generator=torch.Generator().manual_seed(0)) * 255).round()
    image = Image.fromarray(levels[0].to(torch.uint8).numpy())
    size = image.size
    pil = {"rotate": lambda: image.rotate(value, resample=Image.BILINEAR, fillcolor=128),
           "shear_x": lambda: image.transform(size, Image.AFFINE, (1, value, 0, 0, 1, 0),
                                              resample=Image.BILINEAR, fillcolor=128),
           "shear_y": lambda: image.transform(size, Image.AFFINE, (1, 0, 0, value, 1, 0),
                                              resample=Image.BILINEAR, fillcolor=128),
           "translate_x": lambda: image.transform(size, Image.AFFINE, (1, 0, value, 0, 1, 0),
                                                  resample=Image.BILINEAR, fillcolor=128),
           "translate_y": lambda: image.transform(size, Image.AFFINE, (1, 0, 0, 0, 1, value),
                                                  resample=Image.BILINEAR, fillcolor=128)}[op]
    arg = int(value) if op.startswith("translate") else value
    ours = getattr(augment_memo, op)(levels / 255, arg)[0] * 255
    error = (ours - _pil_levels(pil())).abs()
    assert error.median() <= 1 and (error <= 2).float().mean() >= 0.85, \
        (error.median().item(), (error <= 2).float().mean().item())


def test_the_crop_takes_every_offset_of_the_zero_padding_and_flips_half_the_time():
    """torchvision's RandomCrop(size, padding=4) pads with 0 (black) and draws the corner
    uniformly from the 9 x 9 offsets; RandomHorizontalFlip flips with probability 1/2.
    The offset and flip of each crop are recovered from an image of distinct values."""
    side, pad = 6, 4
    image = (1 + torch.arange(side * side, dtype=torch.float32)).view(1, side, side) / 100
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    candidates = {(top, left, flip): (padded[:, top:top + side, left:left + side].flip(-1)
                                      if flip else padded[:, top:top + side, left:left + side])
                  for top in range(2 * pad + 1) for left in range(2 * pad + 1)
                  for flip in (False, True)}
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(2000):
        crop = augment_memo.crop_flip(image, g, pad, True)
        match = [k for k, c in candidates.items() if torch.equal(crop, c)]
        assert len(match) == 1, "not a crop of the zero-padded image"
        seen.append(match[0])
    assert {(t, l) for t, l, _ in seen} == {(t, l) for t in range(9) for l in range(9)}
    assert 0.45 < np.mean([f for _, _, f in seen]) < 0.55


def test_chain_weights_are_dirichlet_ones_and_the_kept_share_is_uniform(monkeypatch):
    """AugMix: ws ~ Dirichlet(1, 1, 1), whose marginals are Beta(1, 2) (P(w < 0.5) = 3/4,
    P(w < 0.1) = 0.19, variance 1/18), and m ~ Beta(1, 1) = U(0, 1). The keep share is read
    off copies whose chains all return black: copy = keep * image."""
    g = torch.Generator().manual_seed(0)
    w = torch.stack([augment_memo._dirichlet_ones(3, g) for _ in range(20000)]).double()
    assert torch.allclose(w.sum(1), torch.ones(20000, dtype=torch.float64), atol=1e-6)
    first = w[:, 0]
    assert abs((first < 0.5).double().mean().item() - 0.75) < 0.012
    assert abs((first < 0.1).double().mean().item() - 0.19) < 0.012
    assert abs(first.var().item() - 1 / 18) < 0.003
    monkeypatch.setitem(augment_memo.OPERATIONS, "black", lambda x, g, s: torch.zeros_like(x))
    aug = MemoAugmenter((0.0,), (1.0,), padding=0, flip=False)
    aug.names = ["black"]
    keep = np.array([aug.augmix(torch.ones(1, 2, 2), g)[0, 0, 0].item() for _ in range(2000)])
    assert keep.min() < 0.01 and keep.max() > 0.99
    for q in (0.1, 0.25, 0.5, 0.75):
        assert abs((keep < q).mean() - q) < 0.035


def test_each_chain_starts_from_the_image_not_from_the_chain_before(monkeypatch):
    """AugMix: `image_aug = image.copy()` for every chain, mixed by weights that sum to 1.
    With one operation per chain that adds 1, every chain is image + 1, so the copy is
    image + (1 - keep): never more than 1 above the image."""
    monkeypatch.setitem(augment_memo.OPERATIONS, "plus1", lambda x, g, s: x + 1)
    aug = MemoAugmenter((0.0,), (1.0,), max_depth=1, padding=0, flip=False)
    aug.names = ["plus1"]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 3, generator=g)
    lifts = torch.stack([aug.augmix(image, g) - image for _ in range(300)])
    assert torch.allclose(lifts, lifts[:, :, :1, :1].expand_as(lifts), atol=1e-6)
    assert lifts.min() >= 0 and lifts.max() <= 1 + 1e-6


def test_copies_come_back_normalised_as_the_stream(monkeypatch):
    """The copies are normalised with the stream's (mean, std) again, as MEMO's
    `preprocess` does: with identity operations, no crop and no flip a copy is the image."""
    monkeypatch.setitem(augment_memo.OPERATIONS, "identity", lambda x, g, s: x)
    aug = MemoAugmenter((0.4, 0.5), (0.3, 0.2), padding=0, flip=False)
    aug.names = ["identity"]
    pixels = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    image = (pixels - torch.tensor([0.4, 0.5]).view(2, 1, 1)) / torch.tensor([0.3, 0.2]).view(2, 1, 1)
    copies = aug(image, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(copies, image.expand(3, 2, 5, 5), rtol=0, atol=1e-5)


def test_a_severity_at_or_below_augmixs_lowest_level_is_refused():
    """AugMix draws the level from U(0.1, severity): a severity of 0.1 or less is no range."""
    for severity in (0.1, 0.05, 0.0):
        with pytest.raises(ValueError, match="severity"):
            MemoAugmenter((0.5,), (0.5,), severity=severity)
    MemoAugmenter((0.5,), (0.5,), severity=0.2)


def test_an_image_goes_back_to_pixels_in_0_1_before_its_augmentations(monkeypatch):
    """A normalised value beyond the stream's pixel range is clipped to a pixel in [0, 1]
    before the operations (defined on 8-bit levels) see it: with identity operations, no
    crop and no flip, the copy of pixels (-1, 2, 0.5, 0.75) is that of (0, 1, 0.5, 0.75)."""
    monkeypatch.setitem(augment_memo.OPERATIONS, "identity", lambda x, g, s: x)
    aug = MemoAugmenter((0.5,), (0.5,), padding=0, flip=False)
    aug.names = ["identity"]
    image = torch.tensor([[[-3.0, 3.0], [0.0, 0.5]]])        # (pixel - 0.5) / 0.5
    copies = aug(image, 2, torch.Generator().manual_seed(0))
    expected = torch.tensor([[[-1.0, 1.0], [0.0, 0.5]]])     # pixels 0, 1, 0.5, 0.75
    torch.testing.assert_close(copies, expected.expand(2, 1, 2, 2), rtol=0, atol=1e-6)


def test_statistics_or_an_image_of_another_channel_count_are_refused():
    """One mean and one std per channel, and images of that many channels: a grayscale
    normalisation would otherwise broadcast over an RGB image in silence."""
    with pytest.raises(ValueError, match="per-channel sequences of equal length"):
        MemoAugmenter((0.5, 0.5, 0.5), (0.5,))
    with pytest.raises(ValueError, match=r"expected one image of shape \(1, H, W\), got \(3, 4, 4\)"):
        MemoAugmenter((0.5,), (0.5,))(torch.zeros(3, 4, 4), 2, torch.Generator())


def test_the_operations_are_augmixs_nine_without_the_colour_ones():
    """MEMO draws from AugMix's `augmentations` list (augmentations.py): autocontrast,
    equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y; not
    `augmentations_all`, which adds color, contrast, brightness and sharpness (they overlap
    the CIFAR-10-C corruptions). A list missing one of the nine changes every copy's law."""
    assert sorted(augment_memo.OPERATIONS) == sorted(
        ["autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
         "translate_x", "translate_y"])


def test_equalize_matches_pils_when_the_top_level_is_rare():
    """PIL's ImageOps.equalize takes its step from the pixels below the top occupied level,
    (pixels - count of the top level) // 255, and starts its table at step // 2. Levels of
    very unequal counts (the lowest level common, the top one rare) tell that count from any
    other level's; each RGB channel has its own histogram."""
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageOps
    rng = np.random.default_rng(0)
    channels = [rng.choice(levels, p=[0.45, 0.3, 0.15, 0.07, 0.03], size=(64, 80))
                for levels in ([10, 50, 90, 200, 240], [0, 30, 128, 129, 255], [5, 6, 7, 100, 101])]
    levels = np.stack(channels).astype(np.uint8)                                  # (3, 64, 80)
    expected = np.asarray(ImageOps.equalize(Image.fromarray(levels.transpose(1, 2, 0), "RGB")))
    ours = augment_memo.equalize(torch.from_numpy(levels).float() / 255) * 255
    assert torch.equal(ours.round(), torch.from_numpy(expected.copy()).permute(2, 0, 1).float())


def test_augmixs_strongest_severity_10_is_accepted():
    """AugMix's levels run 0..10 (its `--aug-severity` up to 10): severity 10 is the top of
    the scale, not beyond it, and 10.5 is."""
    MemoAugmenter((0.5,), (0.5,), severity=10)
    with pytest.raises(ValueError, match="severity"):
        MemoAugmenter((0.5,), (0.5,), severity=10.5)


@pytest.mark.parametrize("option", [dict(width=0), dict(max_depth=0), dict(padding=-1)])
def test_no_chains_no_operations_or_a_negative_padding_are_refused(option):
    """width 0 mixes no chain (every copy would be keep * image, darkened), max_depth 0
    draws depth from an empty range, padding -1 crops outside the image: each is a
    configuration error naming the values, not a quiet or an obscure failure."""
    with pytest.raises(ValueError, match="width >= 1, max_depth >= 1, padding >= 0"):
        MemoAugmenter((0.5,), (0.5,), **option)


def test_a_zero_std_or_no_copies_are_refused():
    """A std of 0 would divide by zero on the way back; 0 copies leave MEMO's marginal
    entropy nothing to average."""
    with pytest.raises(ValueError, match="positive std"):
        MemoAugmenter((0.5, 0.5), (0.5, 0.0))
    with pytest.raises(ValueError, match="copies must be >= 1, got 0"):
        MemoAugmenter((0.5,), (0.5,))(torch.zeros(1, 4, 4), 0, torch.Generator())


def test_uncovered_pixels_are_pils_fillcolor_128():
    """MEMO's PIL calls pass fillcolor=128: a whole-pixel translation leaves the uncovered
    columns and rows exactly at level 128 (not 127, not black), in every channel."""
    x = torch.rand(3, 8, 10, generator=torch.Generator().manual_seed(0))
    moved_x = augment_memo.translate_x(x, 4) * 255
    moved_y = augment_memo.translate_y(x, -2) * 255
    torch.testing.assert_close(moved_x[:, :, 6:], torch.full((3, 8, 4), 128.0), rtol=0, atol=1e-4)
    torch.testing.assert_close(moved_y[:, :2], torch.full((3, 2, 10), 128.0), rtol=0, atol=1e-4)


def test_autocontrast_stretches_two_adjacent_levels_to_black_and_white_as_pil():
    """PIL's ImageOps.autocontrast leaves only a flat channel alone: levels 100 and 101
    (max - min = 1, scale 255) become 0 and 255."""
    ops = pytest.importorskip("PIL.ImageOps")
    from PIL import Image
    levels = np.array([[100, 101, 101], [100, 100, 101]], dtype=np.uint8)
    expected = np.asarray(ops.autocontrast(Image.fromarray(levels))).astype(np.float32)
    assert sorted(set(expected.ravel().tolist())) == [0.0, 255.0]
    ours = augment_memo.autocontrast(torch.from_numpy(levels).float()[None] / 255)[0] * 255
    assert torch.equal(ours.round(), torch.from_numpy(expected))
