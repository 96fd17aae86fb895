"""The committed source models in deep/weights/ score, on the real Fashion-MNIST test
images, the source test accuracy their manifests record (within 0.1 point).

`python -m deep pretrain` measured `source_test_acc` on the source data's test split, built
by the benchmark's `load_source` with the manifest's `data` options (plain test images for
fmnist; the source subclasses' test images with superclass labels for fmnist-breeds; test
images with marks that agree with the class attribute for `source_agreement` of each class,
drawn after the training split's from the same `cue_seed` stream, for fmnist-spurious).
This test rebuilds that split the same way, loads each checkpoint after checking its
sha256, and counts correct predictions itself.

Needs the real files (apt-get install dataset-fashion-mnist); skipped without them unless
REQUIRE_FMNIST=1, which makes their absence a failure (CI).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from deep.checkpoints import load_checkpoint, verify_checkpoint
from deep.data import fmnist as F
from deep.data import get_benchmark
from deep.normalization import loader_options

WEIGHTS = sorted(F.WEIGHTS_DIR.glob("*.pt"))
TOLERANCE = 0.001           # 0.1 point of accuracy
BATCH = 256


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of correct arg-max predictions, in batches, without autograd."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), BATCH):
            logits = model(images[start:start + BATCH])
            correct += int((logits.argmax(1) == labels[start:start + BATCH]).sum())
    return correct / len(labels)


def test_every_benchmark_source_model_is_committed_with_its_manifest():
    expected = {F.source_checkpoint(b).name for b in F.SOURCE_MODEL}
    assert {p.name for p in WEIGHTS} == expected
    for checkpoint in WEIGHTS:              # sha256 against the manifest; no data needed
        assert verify_checkpoint(checkpoint)["file"] == checkpoint.name


def test_each_manifest_records_the_protocol_its_benchmarks_pretrain_with():
    """A protocol's [pretrain] table or source data changed without retraining (and
    rewriting the manifest) would credit the committed weights to settings that never
    made them: `make pretrain` must rebuild the same files."""
    from deep.protocol import load_protocol
    for checkpoint in WEIGHTS:  # the benchmark `make pretrain` names (fmnist-flip shares fmnist-c's)
        manifest = verify_checkpoint(checkpoint)
        benchmark, protocol = manifest["benchmark"], load_protocol(manifest["benchmark"])
        assert F.source_checkpoint(benchmark) == checkpoint
        assert manifest["config"]["pretrain"] == dataclasses.asdict(protocol.pretrain), benchmark
        assert manifest["config"]["source_data"] == manifest["data"] == protocol.source_options
        assert manifest["config"]["arch"] == manifest["arch"] == protocol.arch
        for name in ("epochs", "lr", "seed", "batch_size", "weight_decay", "augment", "compile"):
            assert manifest[name] == manifest["config"]["pretrain"][name], (benchmark, name)


def test_a_benchmark_that_shares_a_model_carries_its_pretrain_table():
    """fmnist-flip and fmnist-blocknoise run fmnist-c's model; their tables held the
    engine's defaults (30 epochs), which their sweeps saved beside the results as how that
    model was made (a sweep now refuses such a table: `deep.sweep.check_pretrain_table`)."""
    from deep.protocol import load_protocol
    for benchmark in F.SOURCE_MODEL:
        manifest = verify_checkpoint(F.source_checkpoint(benchmark))
        assert manifest["config"]["pretrain"] == \
            dataclasses.asdict(load_protocol(benchmark).pretrain), benchmark


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", WEIGHTS, ids=lambda p: p.stem)
def test_source_model_scores_its_manifest_accuracy_on_the_real_test_images(checkpoint: Path,
                                                                           one_thread,
                                                                           real_fmnist):
    manifest = verify_checkpoint(checkpoint)
    assert manifest == json.loads(Path(f"{checkpoint}.json").read_text())
    bench = get_benchmark(manifest["benchmark"])
    source = bench.load_source(None, **loader_options(bench.load_source, bench.name,
                                                      manifest["arch"], manifest["data"]))
    assert source.benchmark == manifest["source"]
    assert len(source.test) == manifest["source_test_images"]
    saved = load_checkpoint(checkpoint)
    assert (saved.arch, saved.num_classes, saved.in_channels) == \
        (manifest["arch"], source.num_classes, source.in_channels)
    measured = accuracy(saved.build(), source.test.images, source.test.labels)
    assert measured == pytest.approx(manifest["source_test_acc"], abs=TOLERANCE), \
        f"{checkpoint.name}: {measured:.4f} on the source test split, manifest says " \
        f"{manifest['source_test_acc']:.4f}"
