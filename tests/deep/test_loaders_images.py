"""The shared 224-px transform, checked against geometry worked out independently."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from deep.data import DataError
from deep.errors import ConfigError
from deep.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

MEAN = np.array(IMAGENET_MEAN).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD).reshape(3, 1, 1)


def gradient_image(w, h):
    """Red grows linearly with x, green with y: a bilinear resize keeps both linear."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def unnormalise(t: torch.Tensor) -> np.ndarray:
    return (t.numpy() * STD + MEAN) * 255


@pytest.mark.parametrize("w, h", [(300, 400), (500, 333)])
def test_resize_shorter_side_then_centre_crop(w, h):
    out = ImageTransform(resize=256, crop=224)(gradient_image(w, h))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # resized size and crop offsets, as torchvision's Resize(256) + CenterCrop(224)
    rw, rh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    left, top = round((rw - 224) / 2), round((rh - 224) / 2)
    rgb = unnormalise(out)
    # output pixel j sits at source coordinate (j + left + 0.5) * w / rw - 0.5
    cols = np.arange(40, 184)  # away from the borders, where resampling clamps
    src_x = (cols + left + 0.5) * w / rw - 0.5
    assert np.allclose(rgb[0, 112, cols], src_x * 255 / (w - 1), atol=1.5)
    src_y = (cols + top + 0.5) * h / rh - 0.5
    assert np.allclose(rgb[1, cols, 112], src_y * 255 / (h - 1), atol=1.5)
    assert np.allclose(rgb[2], 128, atol=0.5)


def test_no_resize_keeps_a_224_image_exactly():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    out = ImageTransform(resize=None, crop=224)(image)
    expected = (np.asarray(image).transpose(2, 0, 1) / 255.0 - MEAN) / STD
    assert np.allclose(out.numpy(), expected, atol=1e-6)


def test_an_odd_margin_is_split_as_torchvision_rounds_it():
    """CenterCrop starts at int(round(margin / 2)), Python's rounding: a 3-px margin puts
    2 px above the crop (round(1.5) = 2), a 7-px one 4 px left of it (round(3.5) = 4)."""
    image = np.random.default_rng(0).integers(0, 256, (227, 231, 3), dtype=np.uint8)  # h, w
    out = ImageTransform(resize=None, crop=224)(Image.fromarray(image))
    expected = (image[2:226, 4:228].transpose(2, 0, 1) / 255.0 - MEAN) / STD
    assert np.allclose(out.numpy(), expected, atol=1e-6)


def test_bad_sizes():
    with pytest.raises(DataError, match="smaller than the 224-px crop"):
        ImageTransform(resize=None, crop=224)(Image.new("RGB", (200, 300)))
    with pytest.raises(ConfigError, match="resize must be at least crop"):
        ImageTransform(resize=200, crop=224)


def test_transform_pickles_for_dataloader_workers():
    t = pickle.loads(pickle.dumps(ImageTransform(resize=36, crop=32)))
    assert t(Image.new("RGB", (50, 40), (255, 0, 0))).shape == (3, 32, 32)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_bad_image_is_named_in_one_line_with_or_without_workers(tmp_path, num_workers):
    """A worker's DataError reaches the user as the same one line (which file, why), not
    torch's "Caught DataError in DataLoader worker process 0 ... Original Traceback"."""
    from deep.data.base import FileSplit
    good, small, broken = tmp_path / "good.png", tmp_path / "small.png", tmp_path / "broken.png"
    Image.new("RGB", (40, 40)).save(good)
    Image.new("RGB", (20, 20)).save(small)
    broken.write_bytes(b"not a png")
    for bad, message in ((small, "small.png: image of 20x20 px is smaller than the 32-px crop"),
                         (broken, "cannot decode image .*broken.png")):
        split = FileSplit([good, bad], torch.tensor([0, 1]), None,
                          ImageTransform(resize=None, crop=32), num_workers=num_workers)
        with pytest.raises(DataError, match=message) as error:
            list(split.batches(1))
        assert "Traceback" not in str(error.value) and "\n" not in str(error.value)


def test_normalisation_is_imagenets_per_channel_mean_and_std_in_rgb_order():
    """Guards the constants themselves (the other tests un-normalise with the same ones):
    torchvision's ImageNet statistics, mean (0.485, 0.456, 0.406), std (0.229, 0.224,
    0.225), red first."""
    out = ImageTransform(resize=None, crop=4)(Image.new("RGB", (4, 4), (51, 102, 204)))
    expected = [(51 / 255 - 0.485) / 0.229, (102 / 255 - 0.456) / 0.224, (204 / 255 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        assert torch.allclose(out[channel], torch.tensor(value), atol=1e-5), channel


def test_list_images_takes_jpeg_jpg_and_png_in_any_case_and_nothing_else(tmp_path):
    from deep.data.images import list_images
    names = ["a.JPEG", "b.jpg", "c.png", "d.PNG", "e.txt", "f.jpeg.bak", "g.gif"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "h.png").mkdir()                       # a folder is not an image
    assert [p.name for p in list_images(tmp_path, "LAYOUT", "t")] == ["a.JPEG", "b.jpg", "c.png",
                                                                       "d.PNG"]


# (benchmark, fixture writer, metadata file under the written root)
TEXT_FILES = [
    ("waterbirds", "write_waterbirds", "waterbird_complete95_forest2water2/metadata.csv"),
    ("celeba", "write_celeba", "celeba/list_attr_celeba.txt"),
    ("celeba", "write_celeba", "celeba/list_eval_partition.txt"),
    ("living17", "write_breeds_full", "imagenet_class_hierarchy/modified/class_hierarchy.txt"),
    ("living17", "write_breeds_full", "imagenet_class_hierarchy/modified/node_names.txt"),
]


@pytest.mark.parametrize("benchmark, writer, name", TEXT_FILES,
                         ids=[f"{b}-{n.rsplit('/', 1)[1]}" for b, _, n in TEXT_FILES])
def test_a_metadata_file_that_is_not_text_is_a_data_error_naming_it(tmp_path, benchmark, writer,
                                                                    name):
    """A zip or image saved under a metadata file's name (or a damaged copy) stops with a
    DataError naming the file, not a UnicodeDecodeError traceback."""
    from deep.data import get_benchmark
    from tests.deep.fixtures import writers
    root = getattr(writers, writer)(tmp_path)
    (root / name).write_bytes(b"PK\x03\x04\x14\x00\x08\x08\xff\xfe\x00\x89PNG" * 8)
    bench = get_benchmark(benchmark)
    with pytest.raises(DataError, match=rf"{name.rsplit('/', 1)[1]} is not a text file"):
        bench.load_task(root, bench.shifts[0], n_target=4, val_per_class=2, test_per_class=2,
                        seed=0, resize=36, crop=32)


def test_a_metadata_file_that_is_not_text_names_the_first_byte_that_is_not_utf8(tmp_path):
    """Guards `err.start` in read_text's message: the offset of the first bad byte (3 in
    b"abc\\xff..."), where a user looking at the file finds what went wrong."""
    from deep.data.images import read_text
    (tmp_path / "meta.csv").write_bytes(b"abc\xffdef")
    with pytest.raises(DataError, match=r"t: .*meta\.csv is not a text file \(byte 3 is not "
                                        r"UTF-8\)"):
        read_text(tmp_path / "meta.csv", "LAYOUT", "t")


def test_a_metadata_file_may_start_with_a_byte_order_mark(tmp_path):
    """A BOM (an editor's "UTF-8 with signature") is not part of CelebA's count line."""
    from deep.data import get_benchmark
    from tests.deep.fixtures import writers
    root = writers.write_celeba(tmp_path)
    path = root / "celeba" / "list_attr_celeba.txt"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    task = get_benchmark("celeba").load_task(root, "group-balanced", n_target=4, val_per_class=2,
                                             test_per_class=0, seed=0, resize=36, crop=32)
    assert len(task.test) == 24


@pytest.mark.parametrize("w, h, size", [(300, 350, (256, 298)), (350, 300, (298, 256))])
def test_resize_truncates_the_longer_side_and_is_bilinear_as_torchvision(w, h, size):
    """Guards the resize against PIL's own bilinear resize to the size torchvision's
    Resize(256) computes: the longer side int(256 * 350 / 300) = int(298.67) = 298 (not
    rounded to 299), then the 224 crop at round((298 - 224) / 2) = 37 along it and
    round((256 - 224) / 2) = 16 along the shorter side. The image is noise,
    so another size, offset or filter (nearest) shows in the pixels."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = ImageTransform(resize=256, crop=224)(image)
    resized = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float64)
    left, top = (16, 37) if w < h else (37, 16)
    expected = (resized[top:top + 224, left:left + 224].transpose(2, 0, 1) / 255 - MEAN) / STD
    assert np.allclose(out.numpy(), expected, atol=1e-5)


def test_list_images_is_sorted_whatever_the_order_the_files_were_made_in(tmp_path):
    """The draws index this list, so a seed picks the same images on every file system:
    the order must not be the directory's own (creation or hash order)."""
    from deep.data.images import list_images
    names = [f"{i:03d}.JPEG" for i in range(40)]
    for name in names[::-1]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path, "LAYOUT", "t")] == names


def test_an_image_whose_longer_side_is_already_the_resize_size_is_still_resized():
    """Guards `min(w, h)` in the resize test: a 256 x 240 image (its longer side 256) must
    be resized to 273 x 256, its shorter side to 256 (skipping it would crop 224 px from a
    240-px side, another field of view, or refuse an image under 224 px)."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (240, 256, 3), dtype=np.uint8))
    out = ImageTransform(resize=256, crop=224)(image)
    resized = np.asarray(image.resize((273, 256), Image.BILINEAR), dtype=np.float64)
    left, top = round((273 - 224) / 2), 16
    expected = (resized[top:top + 224, left:left + 224].transpose(2, 0, 1) / 255 - MEAN) / STD
    assert np.allclose(out.numpy(), expected, atol=1e-5)


def test_find_dir_takes_the_given_folder_before_a_subfolder_of_the_same_layout(tmp_path):
    """Guards the order of find_dir's candidates: --data-dir pointing at the dataset itself
    wins over a folder of that name inside it (a copy or an older version nested there)."""
    from deep.data.images import find_dir
    (tmp_path / "metadata.csv").write_text("x")
    (tmp_path / "waterbirds").mkdir()
    (tmp_path / "waterbirds" / "metadata.csv").write_text("x")
    assert find_dir(tmp_path, ["waterbirds"], "metadata.csv", "LAYOUT", "t") == tmp_path
    assert find_dir(tmp_path / "waterbirds", ["waterbirds"], "metadata.csv", "LAYOUT",
                    "t") == tmp_path / "waterbirds"
