"""The CIFAR-10-C-style corruptions of deep/data/corruptions.py on synthetic 28x28 images.

Each corruption is checked for the contract (shape, dtype, range, determinism per
seed) and for doing what its recipe says, by a number computed independently of
the implementation: noise levels against their distributions, blurs against the
energy they must remove, contrast against its factor, and so on.
"""

import io

import numpy as np
import pytest
from PIL import Image

from deep.data import corruptions as C
from deep.data.corruptions import CORRUPTIONS, RANDOM, corrupt

NAMES = list(CORRUPTIONS)


def garments(n: int = 12, seed: int = 0) -> np.ndarray:
    """Fashion-MNIST-like float images (n, 28, 28) in [0, 1]: a textured bright shape on black."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:28, 0:28]
    out = np.zeros((n, 28, 28))
    for i in range(n):
        cy, cx = rng.uniform(10, 18, size=2)
        ry, rx = rng.uniform(5, 12, size=2)
        inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
        texture = 0.5 + 0.3 * np.sin(cols / rng.uniform(1.0, 3.0)) + 0.2 * rng.random((28, 28))
        out[i] = np.where(inside, np.clip(texture, 0, 1), 0.0)
    return out


def high_frequency_energy(x: np.ndarray) -> float:
    """Energy of the spectrum above a quarter cycle per pixel (mean removed per image)."""
    spectrum = np.abs(np.fft.fft2(x - x.mean(axis=(-2, -1), keepdims=True))) ** 2
    f = np.fft.fftfreq(x.shape[-1])
    high = np.maximum(np.abs(f)[:, None], np.abs(f)[None, :]) > 0.25
    return float(spectrum[..., high].sum())


def mid_grey(n=16, value=0.5):
    return np.full((n, 28, 28), value)


# ----------------------------------------------------------------------------- contract

@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_range_and_change(name):
    x = garments()
    y = corrupt(x, name, 5, np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    # Every corruption visibly changes the images (the smallest, JPEG, moves ~0.01 on average).
    assert np.abs(y - x).mean() > 0.005, name
    one = corrupt(x[3], name, 5, np.random.default_rng(0))
    assert one.shape == (28, 28) and one.dtype == np.float32


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(name):
    x = garments()
    a = corrupt(x, name, 5, np.random.default_rng(7))
    b = corrupt(x, name, 5, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    c = corrupt(x, name, 5, np.random.default_rng(8))
    if name in RANDOM:
        assert np.abs(a - c).max() > 0.01, f"{name} ignores its generator"
    else:
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(a, corrupt(x, name, 5, None))


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"elastic_transform"}))
def test_severity_5_is_stronger_than_severity_1(name):
    # elastic_transform is excluded: its severity 1 has the largest affine jitter in the recipe.
    x = garments()
    weak = np.abs(corrupt(x, name, 1, np.random.default_rng(0)) - x).mean()
    strong = np.abs(corrupt(x, name, 5, np.random.default_rng(0)) - x).mean()
    assert strong > weak, (name, weak, strong)


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "zoom_blur", "motion_blur",
                                  "elastic_transform", "pixelate", "glass_blur", "contrast"])
def test_constant_image_is_left_constant(name):
    # Blurs and warps average neighbouring pixels, so a flat image stays flat
    # (glass blur truncates to 8 bits in the middle: within 1/255).
    y = corrupt(mid_grey(4), name, 5, np.random.default_rng(0))
    np.testing.assert_allclose(y, 0.5, atol=1.01 / 255)


# ----------------------------------------------------------------------------- noise levels

def test_gaussian_noise_std_is_sigma_on_mid_grey():
    y = C.gaussian_noise(mid_grey(32), 5, np.random.default_rng(0)) - 0.5
    # 25,088 pixels: the sample std of N(0, 0.1^2) is within 0.1 * 3 / sqrt(2 n) ~ 0.002.
    assert abs(y.std() - 0.10) < 0.003 and abs(y.mean()) < 0.003


def test_shot_noise_is_poisson_with_50_photons():
    y = C.shot_noise(mid_grey(32), 5, np.random.default_rng(0))
    counts = y * 50   # Poisson(25): mean 25, variance 25, integer valued
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    assert abs(counts.mean() - 25) < 0.15 and abs(counts.var() - 25) < 0.8


def test_impulse_noise_hits_7_percent_half_salt_half_pepper():
    y = C.impulse_noise(mid_grey(32), 5, np.random.default_rng(0))
    salt, pepper = (y == 1.0).mean(), (y == 0.0).mean()
    assert abs(salt + pepper - 0.07) < 0.006 and abs(salt - pepper) < 0.006
    assert np.all((y == 0) | (y == 1) | (y == np.float32(0.5)))


def test_speckle_noise_std_scales_with_intensity():
    for value in (0.25, 0.5):
        y = C.speckle_noise(mid_grey(32, value), 5, np.random.default_rng(0))
        assert abs(y.std() - 0.20 * value) < 0.004, value


# ----------------------------------------------------------------------------- blurs

@pytest.mark.parametrize("name, kept", [("gaussian_blur", 0.5), ("defocus_blur", 0.5), ("motion_blur", 0.5),
                                        ("zoom_blur", 0.5), ("pixelate", 0.5),
                                        # glass blur mostly scrambles; only its two 0.35 px blurs smooth
                                        ("glass_blur", 0.75)])
def test_blurs_remove_high_frequency_energy(name, kept):
    x = np.random.default_rng(1).random((8, 28, 28))   # white noise: energy at every frequency
    y = corrupt(x, name, 5, np.random.default_rng(0))
    assert high_frequency_energy(y) < kept * high_frequency_energy(x), name


def test_gaussian_blur_shrinks_white_noise_variance_by_the_kernel_energy():
    # A linear filter k scales the variance of white noise by sum(k^2); the Gaussian
    # of sigma 0.875 px (1.0 * 28/32) is built here by hand, separable, truncated at 4 sigma.
    sigma = 1.0 * 28 / 32
    t = np.arange(-4, 5)
    k = np.exp(-t ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    expected = (k ** 2).sum() ** 2
    x = np.random.default_rng(2).random((64, 28, 28))
    y = C.gaussian_blur(x, 5).astype(np.float64)
    inner = (slice(None), slice(5, -5), slice(5, -5))   # away from the repeated edges
    ratio = y[inner].var() / x.var()
    assert abs(ratio / expected - 1) < 0.06, (ratio, expected)


def test_disk_kernel_weights_are_pixel_coverage():
    k = C.disk_kernel(5.0, alias_sigma=0.01)
    assert k.shape[0] == k.shape[1] and abs(k.sum() - 1) < 1e-12
    np.testing.assert_allclose(k, k.T)
    np.testing.assert_allclose(k, k[::-1])
    # Interior pixels are fully covered: weight 1 / (pi r^2) (the disk's area in pixels).
    centre = k.shape[0] // 2
    assert abs(k[centre, centre] * np.pi * 25 - 1) < 0.01
    assert k[centre, centre + 6] == 0 and k[centre, 0] == 0


def test_motion_blur_spreads_a_dot_along_a_line_within_45_degrees_of_horizontal():
    x = np.zeros((20, 28, 28))
    x[:, 14, 14] = 1.0
    y = C.motion_blur(x, 5, np.random.default_rng(3))
    for image in y:
        # The blur is a weighted average; away from the edges a dot's mass is kept.
        assert abs(image.sum() - 1) < 1e-5
        rows, cols = np.nonzero(image)
        assert cols.max() - cols.min() >= rows.max() - rows.min()
        assert cols.max() - cols.min() >= 5   # sigma 2.19 px: taps up to ~7 px carry weight
        # one-sided: the dot itself keeps the largest weight
        assert image[14, 14] == image.max()


def test_zoom_blur_keeps_the_centre_and_smears_radially_outwards():
    x = np.zeros((1, 28, 28))
    x[0, 12:16, 12:16] = 1.0   # centre block: zooms of at most 1.25 keep most of it in place
    x[0, 6, 6] = 1.0            # a dot 7.5 px from the centre moves up to ~1.9 px outwards
    y = C.zoom_blur(x, 5)
    assert y[0, 12:16, 12:16].mean() > 0.8
    assert y[0, 6, 6] < 0.5                       # the dot is spread out ...
    assert y[0, 5, 5] > 0.2                       # ... along the ray away from the centre
    assert y[0, 7, 7] < 0.2 * y[0, 5, 5]          # ... and not towards it


# ----------------------------------------------------------------------------- weather, digital

def test_fog_adds_a_haze_between_zero_and_strength():
    x = garments(8)
    y = C.fog(x, 5, np.random.default_rng(0)).astype(np.float64)
    peak = x.max(axis=(1, 2), keepdims=True)
    haze = y * (peak + 1.5) / peak - x   # invert (x + 1.5 h) * peak / (peak + 1.5)
    assert haze.min() > -1e-5 and haze.max() < 1.5 + 1e-5
    # The plasma map spans [0, 1] on its 32x32 grid; the 28x28 crop keeps most of that range.
    assert np.all(haze.max(axis=(1, 2)) - haze.min(axis=(1, 2)) > 0.5 * 1.5)


def test_plasma_fractal_range_and_smoothness():
    rng = np.random.default_rng(0)
    maps = C.plasma_fractal(16, rng, 32, decay=1.75)
    assert maps.shape == (16, 32, 32)
    np.testing.assert_allclose(maps.min(axis=(1, 2)), 0)
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1)
    rough = C.plasma_fractal(16, rng, 32, decay=1.0)
    step = lambda m: np.abs(np.diff(m, axis=2)).mean()
    assert step(maps) < step(rough)   # a larger decay damps the fine scales
    with pytest.raises(ValueError, match="power of two"):
        C.plasma_fractal(1, rng, 28)


def test_brightness_adds_point_three_and_clips():
    x = garments()
    np.testing.assert_allclose(C.brightness(x, 5), np.minimum(x + 0.3, 1), atol=1e-6)


def test_contrast_shrinks_each_image_std_by_the_factor_and_keeps_its_mean():
    x = garments()
    y = C.contrast(x, 5).astype(np.float64)
    np.testing.assert_allclose(y.std(axis=(1, 2)), 0.15 * x.std(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-6)


def test_jpeg_round_trip_is_lossy_on_the_8_bit_grid_and_worse_at_lower_quality():
    x = garments()
    y = C.jpeg_compression(x, 5)
    np.testing.assert_allclose(y * 255, np.round(y * 255), atol=1e-3)
    x8 = np.round(x * 255) / 255
    err5 = np.abs(y - x8).mean()
    err1 = np.abs(C.jpeg_compression(x, 1) - x8).mean()
    assert 0.002 < err1 < err5 < 0.1, (err1, err5)


def test_pixelate_has_the_resolution_of_65_percent():
    # Box-resampling down to 18x18 and back keeps only 18 distinct columns of information:
    # the 28 output columns are combinations of 18, so their rank is at most 18.
    x = np.random.default_rng(0).random((4, 28, 28))
    y = C.pixelate(x, 5).astype(np.float64)
    for image in y:
        assert np.linalg.matrix_rank(image, tol=1e-4) <= 18
    assert np.linalg.matrix_rank(x[0]) == 28


def test_elastic_transform_moves_pixels_by_about_a_pixel():
    # On a horizontal ramp (value = column / 27) the warp's column displacement shows directly.
    ramp = np.broadcast_to(np.arange(28) / 27.0, (16, 28, 28)).copy()
    y = C.elastic_transform(ramp, 5, np.random.default_rng(0)).astype(np.float64)
    shift = np.abs(y - ramp)[:, 4:-4, 4:-4] * 27   # pixels, away from reflected borders
    assert 0.1 < shift.mean() < 3.0, shift.mean()


def test_glass_blur_only_moves_pixels_up_or_left_before_blurring():
    # Severity 1 has sigma 0.05 * 28/32: the blur is negligible, so the gather shows.
    x = np.zeros((64, 28, 28))
    x[:, 14, 14] = 1.0
    y = C.glass_blur(x, 1, np.random.default_rng(0))
    heavy = np.argwhere(y > 0.5)[:, 1:]
    assert len(heavy) > 0
    assert np.all(heavy >= 14)   # the dot can only be copied down/right (its pixel read from up/left)
    assert np.all(heavy <= 15)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 28, 28), dtype=np.uint8), "divide uint8"),
    (np.zeros((2, 1, 28, 28)), r"\(H, W\) or \(n, H, W\)"),
    (np.full((2, 28, 28), np.nan), "NaN"),
    (np.full((2, 28, 28), 2.0), r"\[0, 1\]"),
    (np.zeros((2, 4, 4)), "at least 8x8"),
    ([[0.0] * 28] * 28, "numpy array"),
])
def test_bad_images_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        corrupt(bad, "gaussian_noise", 5, np.random.default_rng(0))


@pytest.mark.parametrize("severity", [0, 6, 2.5, True])
def test_bad_severity_raises(severity):
    with pytest.raises(ValueError, match="severity"):
        corrupt(garments(2), "contrast", severity)


def test_unknown_name_and_missing_generator_raise():
    with pytest.raises(ValueError, match="unknown corruption 'frost'"):
        corrupt(garments(2), "frost")
    for name in sorted(RANDOM):
        with pytest.raises(ValueError, match="numpy Generator"):
            corrupt(garments(2), name, 5, None)
        with pytest.raises(ValueError, match="numpy Generator"):
            corrupt(garments(2), name, 5, 42)


# ----------------------------------------------------------------------------- recipe details

def test_defocus_blur_reflects_at_the_border_without_repeating_the_edge_pixel():
    # cv2.filter2D's default border (BORDER_REFLECT_101) is numpy's pad mode "reflect":
    # the row outside the image repeats row 1, not row 0. A hand convolution of the padded
    # image with the disk kernel; a bright second row shows the difference at the edge.
    x = np.zeros((1, 28, 28))
    x[0, 1, :] = 1.0
    x[0, :, 1] = 1.0
    kernel = C.disk_kernel(1.5 * 28 / 32, 0.1)
    r = kernel.shape[0] // 2
    padded = np.pad(x[0], r, mode="reflect")
    expected = np.zeros((28, 28))
    for i in range(28):
        for j in range(28):
            expected[i, j] = (padded[i:i + 2 * r + 1, j:j + 2 * r + 1] * kernel[::-1, ::-1]).sum()
    np.testing.assert_allclose(C.defocus_blur(x, 5)[0], np.clip(expected, 0, 1), atol=1e-6)


def _recipe_zoom_blur(x: np.ndarray, severity: int) -> np.ndarray:
    """The recipe's zoom_blur, one image at a time: the mean of the image and its
    clipped_zooms by 1.00, 1.01, ... below the severity's top factor. clipped_zoom crops the
    central ceil(side / z) pixels of each axis, scipy.ndimage.zoom's them by z (order 1,
    corners aligned) and trims back to the image's size around the centre; rows and columns
    each take their own crop (the recipe's squares are the case h = w)."""
    from scipy import ndimage

    def clipped_zoom(img, z):
        (h, w), (ch, cw) = img.shape, (int(np.ceil(img.shape[0] / z)), int(np.ceil(img.shape[1] / z)))
        top, left = (h - ch) // 2, (w - cw) // 2
        out = ndimage.zoom(img[top:top + ch, left:left + cw], z, order=1)
        t, l = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
        return out[t:t + h, l:l + w]

    factors = np.arange(1.0, C.PARAMS["zoom_blur"][severity - 1], 0.01)
    return np.clip(np.stack([(img + sum(clipped_zoom(img, z) for z in factors)) / (len(factors) + 1)
                             for img in x]), 0, 1)


@pytest.mark.parametrize("severity", [1, 5])
def test_zoom_blur_zooms_like_the_recipes_scipy_zoom(severity):
    x = garments(3)
    np.testing.assert_allclose(C.zoom_blur(x, severity), _recipe_zoom_blur(x, severity), atol=1e-6)


def test_elastic_warp_mirrors_the_image_at_its_border_instead_of_repeating_the_edge():
    # Severity 1 is the random affine warp alone (alpha = sigma = 0). On an image that is 1
    # on its outermost ring and 0 inside, samples from outside the image read the zeros
    # inside the ring when mirrored without repeating the edge (cv2.warpAffine's default);
    # with the edge repeated every such sample reads 1, and the mass grows far beyond the
    # ring's own (measured: mean 63 mirrored, 147 with the edge repeated; the ring is 108).
    ring = np.zeros((32, 28, 28))
    ring[:, 0, :] = ring[:, -1, :] = ring[:, :, 0] = ring[:, :, -1] = 1.0
    y = C.elastic_transform(ring, 1, np.random.default_rng(0)).astype(np.float64)
    assert y.sum(axis=(1, 2)).mean() < ring[0].sum()


def test_glass_blur_truncates_the_first_blur_to_8_bits():
    # A constant image stays constant through both blurs and the pixel shuffles, so what is
    # left is the recipe's truncation of the middle image: floor(255 c) / 255.
    c = 0.5 + 0.3 / 255                      # 127.8 on the 8-bit scale
    y = C.glass_blur(mid_grey(4, c), 5, np.random.default_rng(0))
    np.testing.assert_allclose(y, np.float32(127 / 255), atol=1e-7)


def test_motion_blur_leaves_a_dot_its_first_tap_weight():
    # ImageMagick's weights exp(-i^2 / (2 sigma^2)), i = 0 .. 2 ceil(radius), normalised: the
    # dot's own pixel is reached only by tap 0, whatever the direction, so it keeps w_0.
    x = np.zeros((16, 28, 28))
    x[:, 14, 14] = 1.0
    for severity in (1, 5):
        radius, sigma = C.PARAMS["motion_blur"][severity - 1]
        taps = np.arange(2 * int(np.ceil(radius)) + 1)
        w0 = 1 / np.exp(-taps ** 2 / (2 * sigma ** 2)).sum()
        y = C.motion_blur(x, severity, np.random.default_rng(severity))
        np.testing.assert_allclose(y[:, 14, 14], w0, rtol=1e-6)


# ----------------------------------------------------------------------------- every severity

# Severities 1..5 of Hendrycks' make_cifar_c.py (the pixel-scale parameters, kept as they are).
PUBLISHED = {"gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
             "shot_noise": (500, 250, 100, 75, 50),
             "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
             "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
             "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),
             "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
             "jpeg_compression": (80, 65, 58, 50, 40)}


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_every_severity_uses_the_published_parameter(severity):
    """Guards the parameter table row by row (the tests above look at severity 5, or only
    compare 1 with 5): each severity's effect is measured and compared with its
    make_cifar_c.py value."""
    c = {name: values[severity - 1] for name, values in PUBLISHED.items()}
    rng = lambda: np.random.default_rng(severity)
    noise = C.gaussian_noise(mid_grey(32), severity, rng()) - 0.5
    assert abs(noise.std() - c["gaussian_noise"]) < 0.003
    shot = C.shot_noise(mid_grey(32), severity, rng()).astype(np.float64)
    assert abs(shot.var() / (0.5 / c["shot_noise"]) - 1) < 0.06      # Poisson(0.5 c) / c
    hit = (C.impulse_noise(mid_grey(32), severity, rng()) != np.float32(0.5)).mean()
    assert abs(hit - c["impulse_noise"]) < 0.004
    speckle = C.speckle_noise(mid_grey(32), severity, rng())
    assert abs(speckle.std() - 0.5 * c["speckle_noise"]) < 0.003
    np.testing.assert_allclose(C.brightness(mid_grey(2, 0.25), severity), 0.25 + c["brightness"],
                               atol=1e-6)
    x = garments()
    y = C.contrast(x, severity).astype(np.float64)
    np.testing.assert_allclose(y.std(axis=(1, 2)), c["contrast"] * x.std(axis=(1, 2)), rtol=1e-5)
    pixels = np.rint(x * 255).astype(np.uint8)
    expected = []
    for image in pixels:                                        # PIL at the published quality
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=c["jpeg_compression"])
        expected.append(np.asarray(Image.open(buffer).convert("L"), dtype=np.float64) / 255)
    np.testing.assert_allclose(C.jpeg_compression(x, severity), np.stack(expected), atol=1e-6)


# Severities 1..5 of make_cifar_c.py for the spatial corruptions, written out as published
# (pixel units on 32 x 32 images; the module multiplies them by 28 / 32 where they are in
# pixels, and keeps zoom factors, fog, the pixelate factor and elastic's fractions).
PUBLISHED_SPATIAL = {
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}


def test_spatial_parameters_are_the_published_ones_at_every_severity():
    """Guards the parameter table of the spatial corruptions, severity by severity: the
    behavioural tests above look at severities 1 and 5, or compare them, and some take
    their numbers from PARAMS itself. Pixel lengths scale by 28 / 32; glass blur's shift
    and pass count, and the ratios, do not."""
    s = 28 / 32
    expected = {
        "gaussian_blur": [v * s for v in PUBLISHED_SPATIAL["gaussian_blur"]],
        # the 3x3 anti-alias sigma is used unscaled, as PARAMS has it
        "defocus_blur": [(r * s, a) for r, a in PUBLISHED_SPATIAL["defocus_blur"]],
        "glass_blur": [(g * s, d, k) for g, d, k in PUBLISHED_SPATIAL["glass_blur"]],
        "motion_blur": [(r * s, g * s) for r, g in PUBLISHED_SPATIAL["motion_blur"]],
        "zoom_blur": list(PUBLISHED_SPATIAL["zoom_blur"]),
        "fog": list(PUBLISHED_SPATIAL["fog"]),
        "elastic_transform": list(PUBLISHED_SPATIAL["elastic_transform"]),
        "pixelate": list(PUBLISHED_SPATIAL["pixelate"]),
    }
    for name, values in expected.items():
        np.testing.assert_allclose(np.array(C.PARAMS[name], dtype=float),
                                   np.array(values, dtype=float), rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("severity, side", [(1, 26), (2, 25), (3, 23), (4, 21), (5, 18)])
def test_pixelate_keeps_int_of_the_factor_times_28_columns(severity, side):
    """The recipe resizes to int(32 c) (truncated); here int(28 c) with c = 0.95, 0.9,
    0.85, 0.75, 0.65: 26.6 -> 26, 25.2 -> 25, 23.8 -> 23, 21, 18.2 -> 18. Box-upsampled
    back, a random image keeps exactly that many independent columns (its rank)."""
    x = np.random.default_rng(severity).random((2, 28, 28))
    for image in C.pixelate(x, severity).astype(np.float64):
        assert np.linalg.matrix_rank(image, tol=1e-4) == side


def test_fog_crops_its_haze_from_a_32_px_plasma_map():
    """As CIFAR-10-C (32 x 32 images, a 32 x 32 map): the 28 x 28 crop of a 32-px map keeps
    nearly its whole [0, 1] range (measured 0.9995 on average over 64 maps, against 0.68
    for a 28-px crop of a 64-px map). On a white image fog is (1 + 1.5 h) / 2.5, so the
    haze h reads back as (2.5 y - 1) / 1.5."""
    y = C.fog(np.ones((64, 28, 28)), 5, np.random.default_rng(0)).astype(np.float64)
    haze = (2.5 * y - 1) / 1.5
    assert (haze.max(axis=(1, 2)) - haze.min(axis=(1, 2))).mean() > 0.95


def test_zoom_blur_zooms_a_wide_image_about_its_centre_on_each_axis():
    """The recipe's clipped_zoom on an image that is not square (28 rows, 40 columns): rows
    and columns each take their own central crop."""
    x = np.random.default_rng(0).random((2, 28, 40))
    np.testing.assert_allclose(C.zoom_blur(x, 5), _recipe_zoom_blur(x, 5), atol=1e-6)


def _recipe_plasma_fractal(rng, mapsize=32, wibbledecay=3.0):
    """Hendrycks' plasma_fractal (make_cifar_c.py) as published, np.random.uniform replaced
    by `rng.uniform`: square step, then the two diamond steps, each with its own draws."""
    maparray = np.empty((mapsize, mapsize))
    maparray[0, 0] = 0
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2:mapsize:stepsize, stepsize // 2:mapsize:stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[stepsize // 2:mapsize:stepsize, stepsize // 2:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, stepsize // 2:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[stepsize // 2:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


@pytest.mark.parametrize("decay", [3.0, 1.75])
def test_plasma_fractal_is_the_recipes_for_the_same_draws(decay):
    """One map from the same generator state as the published diamond-square code: the
    amplitude divided by `decay` at every halving, the draws in the recipe's order."""
    ours = C.plasma_fractal(1, np.random.default_rng(5), 32, decay)[0]
    np.testing.assert_allclose(ours, _recipe_plasma_fractal(np.random.default_rng(5), 32, decay),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("severity", [1, 5])
def test_pixelate_is_the_recipes_two_box_resizes(severity):
    """The recipe: x.resize((int(side * c),) * 2, BOX) then x.resize((side, side), BOX), both
    box filters (a bilinear way back would smooth the blocks the corruption is about), here
    on float ('F') images so that nothing is rounded in between."""
    x = garments(3)
    c = C.PARAMS["pixelate"][severity - 1]
    expected = np.stack([np.asarray(Image.fromarray(img.astype(np.float32))
                                    .resize((int(28 * c), int(28 * c)), Image.BOX)
                                    .resize((28, 28), Image.BOX)) for img in x])
    np.testing.assert_allclose(C.pixelate(x, severity), np.clip(expected, 0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("severity", [1, 5])
def test_gaussian_blur_is_skimages_gaussian_with_the_scaled_sigma(severity):
    """The recipe's skimage.filters.gaussian(x, sigma) is scipy's gaussian_filter with its
    defaults, truncate 4 and edges repeated ('nearest'), one image at a time; sigma is the
    published one times 28/32."""
    from scipy import ndimage
    x = garments(3)
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1] * 28 / 32
    expected = np.stack([ndimage.gaussian_filter(img, sigma, mode="nearest") for img in x])
    np.testing.assert_allclose(C.gaussian_blur(x, severity), expected, rtol=0, atol=1e-6)


def test_glass_blur_sweeps_rows_and_columns_2_to_the_last():
    """The recipe's sweep, range(32 - 1, 1, -1) for rows and for columns: pixels 2 .. side - 1
    take a neighbour's value, rows and columns 0 and 1 never do. At severity 1 the blur
    (sigma 0.05 * 28/32 px) has a one-pixel kernel, so the output is that gather truncated
    to 8 bits: the first two rows and columns are the image, the last row and column are
    moved (3 pixels in 4 take an up/left neighbour's level)."""
    x = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28)) / 255
    y = C.glass_blur(x, 1, np.random.default_rng(1)).astype(np.float64)
    np.testing.assert_allclose(y[:, :2], x[:, :2], rtol=0, atol=1.01 / 255)
    np.testing.assert_allclose(y[:, :, :2], x[:, :, :2], rtol=0, atol=1.01 / 255)
    for last in (y[:, -1, 2:] - x[:, -1, 2:], y[:, 2:, -1] - x[:, 2:, -1]):
        assert (np.abs(last) > 1.01 / 255).mean() > 0.6


@pytest.mark.parametrize("severity", [2, 5])
def test_elastic_transform_is_the_recipes_warp_then_displacement_image_by_image(severity):
    """The recipe, one image at a time, with the module's draws in its order (the affine
    jitter of every image, then both displacement fields): the three corners of a centred
    triangle moved by uniform(-shift, shift); the output sampled bilinearly from the inverse
    affine map with cv2.warpAffine's default border (reflect without repeating the edge:
    scipy's "mirror"); then a uniform(-1, 1) field smoothed as skimage's
    `gaussian(..., mode="reflect", truncate=3)` and scaled by alpha, sampled with "reflect".
    Caught: the warp with "reflect" (repeating the edge); the field smoothed to 4 sigma
    (severity 2, sigma 5.6 px: at severity 5, 0.84 px, both truncations give radius 3)."""
    from scipy import ndimage
    n, side = 3, 28
    x = np.random.default_rng(1).uniform(0, 1, size=(n, side, side))
    alpha, sigma, shift = (v * side for v in C.PARAMS["elastic_transform"][severity - 1])
    rng = np.random.default_rng(7)
    jitter = rng.uniform(-shift, shift, size=(n, 3, 2))
    fields = rng.uniform(-1.0, 1.0, size=(2, n, side, side))
    centre, arm = np.array([side // 2, side // 2], dtype=float), side // 3
    src = np.stack([centre + arm, centre + [arm, -arm], centre - arm])
    rr, cc = np.meshgrid(np.arange(side, dtype=float), np.arange(side, dtype=float), indexing="ij")
    expected = []
    for i in range(n):
        dst = src + jitter[i]
        inverse = np.linalg.solve(np.c_[dst, np.ones(3)], src)      # [dst 1] @ inverse = src
        rows = rr * inverse[0, 0] + cc * inverse[1, 0] + inverse[2, 0]
        cols = rr * inverse[0, 1] + cc * inverse[1, 1] + inverse[2, 1]
        warped = ndimage.map_coordinates(x[i], [rows, cols], order=1, mode="mirror")
        dr, dc = (alpha * ndimage.gaussian_filter(f[i], sigma, mode="reflect", truncate=3.0)
                  for f in fields)
        expected.append(ndimage.map_coordinates(warped, [rr + dr, cc + dc], order=1, mode="reflect"))
    y = C.elastic_transform(x, severity, np.random.default_rng(7))
    np.testing.assert_allclose(y, np.clip(expected, 0, 1), atol=1e-6)
