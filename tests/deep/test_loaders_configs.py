"""The seven protocol files: they load, name what exists, and carry the reference numbers."""

import inspect

import pytest

from deep.data import get_benchmark
from deep.protocol import load_protocol

PAPER = ("cifar10c", "cifar-flip", "imagenet-c", "living17", "entity30", "waterbirds", "celeba")
ARCH = {"cifar10c": "resnet26-gn", "cifar-flip": "resnet26-gn"}  # the others: resnet50
BLOCKS = {"resnet26": ["first", "second", "third", "last"],
          "resnet26-gn": ["first", "second", "third", "last"],
          "resnet50": ["first", "second", "third", "fourth", "last"]}
OTHERS = ["all", "lp-ft", "gradual-first-last", "gradual-last-first", "l1sp", "auto-rgn",
          "auto-snr"]


@pytest.mark.parametrize("name", PAPER)
def test_protocol_is_consistent_with_its_benchmark(name):
    protocol = load_protocol(name)
    benchmark = get_benchmark(name)
    assert protocol.arch == ARCH.get(name, "resnet50")
    assert protocol.methods == BLOCKS[protocol.arch] + OTHERS
    assert protocol.shifts and set(protocol.shifts) <= set(benchmark.shifts)
    assert protocol.lrs == [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    assert protocol.batch_size == 64 and protocol.weight_decay == 1e-4
    assert protocol.select == ("worst_group_val_acc" if benchmark.has_groups else "val_acc")
    assert protocol.notes.strip() and protocol.val_per_class > 0
    # every [data] option is a keyword both loaders accept
    for loader in (benchmark.load_task, benchmark.load_source):
        if loader is not None:
            assert set(protocol.data) <= set(inspect.signature(loader).parameters), loader


def test_cifar_flip_takes_the_cifar10c_source_model():
    """docs/benchmarks.md passes one `pretrain --benchmark cifar10c` file to both sweeps."""
    flip, c = load_protocol("cifar-flip"), load_protocol("cifar10c")
    assert flip.arch == c.arch
    assert get_benchmark("cifar-flip").num_classes == get_benchmark("cifar10c").num_classes


def test_block_names_match_the_engine_registry():
    blocks = pytest.importorskip("deep.blocks")
    for arch, options in BLOCKS.items():
        assert list(blocks.block_options(arch)) == options


def test_reference_numbers():
    """From the public reference code (dataset.py, configs, README sweep commands)."""
    c = load_protocol("cifar10c")
    assert (c.n_target, c.val_per_class, c.test_per_class, c.epochs) == (1000, 10, 90, 15)
    assert len(c.shifts) == 15 and c.data == {"severity": 5}
    i = load_protocol("imagenet-c")
    assert (i.n_target, i.val_per_class, i.test_per_class, i.epochs) == (5000, 10, 10, 10)
    assert i.shifts == c.shifts and i.data["severity"] == 5


def test_every_benchmark_declares_the_statistics_its_loader_normalises_with():
    """Benchmark.normalization (what MEMO un-normalises with, and what spares a model of
    the same statistics the loader warning) against each family's constants, which the
    loader tests check pixel by pixel (test_loaders_*: un-normalised images = the files)."""
    from deep.data import benchmark_names
    from deep.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
    from deep.data.fmnist import MEAN, STD
    from deep.data.images import IMAGENET_MEAN, IMAGENET_STD
    from deep.models.vit import CLIP_MEAN, CLIP_STD
    imagenet, clip = (IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD)
    expected = {"cifar10c": (CIFAR10_MEAN, CIFAR10_STD), "cifar-flip": (CIFAR10_MEAN, CIFAR10_STD),
                "cifar10c-official": (CIFAR10_MEAN, CIFAR10_STD), "imagenet-c": imagenet,
                "living17": imagenet, "entity30": imagenet, "waterbirds": imagenet,
                "celeba": imagenet, "camelyon17": clip, "fmow": clip,
                "synthetic": ((0.5,) * 3, (0.5,) * 3),  # not pixels: [-1, 1] read as [0, 1]
                **{name: (MEAN, STD) for name in benchmark_names() if name.startswith("fmnist-")}}
    assert set(benchmark_names()) == set(expected), (
        f"a benchmark without its normalisation here: {set(benchmark_names()) ^ set(expected)}; "
        "add it to `expected` with the constants its loader normalises with")
    for name, normalization in expected.items():
        assert get_benchmark(name).normalization == normalization, name
