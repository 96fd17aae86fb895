"""Exact numbers the docs quote (parameter counts, FLOPs, grid sizes, sums over committed
CSVs) recomputed the way the doc beside them says, and compared with the doc's text: a
changed protocol, architecture or committed CSV otherwise leaves a stale number behind."""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.doc_text import doc_text

ROOT = Path(__file__).resolve().parents[2]
CIFAR10_TRAIN = 50_000  # CIFAR-10's training images, what `pretrain` passes over per epoch


def table_row(page: str, start: str) -> str:
    """The line of a Markdown table on `page` that starts with `start`."""
    return next(line for line in (ROOT / page).read_text().splitlines() if line.startswith(start))


def grid_runs(protocol: str, methods=None) -> int:
    """shifts x methods x lrs x seeds of a protocol (`python -m deep protocols` prints them)."""
    from deep.protocol import load_protocol
    p = load_protocol(protocol)
    methods = p.tuning.methods if methods is None else methods
    return len(p.target.shifts) * len(methods) * len(p.tuning.lrs) * len(p.tuning.seeds)


def flops_per_image(arch: str) -> tuple[float, float]:
    """GFLOP of one forward and of one training step (forward + backward) on a 32x32 image,
    as the snippet in docs/reference-models.md counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    from deep.models import build_model
    torch.manual_seed(0)
    model, x = build_model(arch, 10), torch.rand(1, 3, 32, 32)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(model(x), torch.tensor([0])).backward()
    return forward.get_total_flops() / 1e9, step.get_total_flops() / 1e9


def test_the_grid_sizes_the_docs_quote_are_the_protocols():
    """docs/distributed.md and docs/benchmarks.md: ImageNet-C 2,700 runs, CIFAR-10-C 2,475;
    docs/reference-models.md: cifar10c-official 1,575; docs/vit-wilds.md: 60 tuning runs
    per WILDS benchmark (every method but `none`, which trains nothing)."""
    distributed, benchmarks = doc_text("docs/distributed.md"), doc_text("docs/benchmarks.md")
    imagenet, cifar = f"{grid_runs('imagenet-c'):,} runs", f"{grid_runs('cifar10c'):,} runs"
    assert f"ImageNet-C: {imagenet} of ResNet-50" in distributed
    assert f"CIFAR-10-C: {cifar}; each shifts x methods x lrs x seeds" in distributed
    assert f"Cost: {cifar} x 15 epochs" in benchmarks and f"Cost: {imagenet} x 10" in benchmarks
    assert f"`cifar10c-official` ({grid_runs('cifar10c-official'):,} runs of 15 epochs" in doc_text(
        "docs/reference-models.md")
    from deep.protocol import load_protocol
    for name in ("camelyon17", "fmow"):
        tuned = [m for m in load_protocol(name).tuning.methods if m != "none"]
        assert f"a full protocol ({grid_runs(name, tuned)} tuning runs per benchmark" in doc_text(
            "docs/vit-wilds.md"), name


@pytest.mark.parametrize("arch", ["resnet26-gn", "wrn28-10", "resnet50-public"])
def test_reference_models_parameter_counts_are_the_built_networks(arch):
    """The table's parameters column (ResNet-50 with its ImageNet head, as published)."""
    from deep.models import build_model
    model = build_model(arch, 1000 if arch == "resnet50-public" else 10)
    count, keys = sum(p.numel() for p in model.parameters()), len(model.state_dict())
    row = table_row("docs/reference-models.md", f"| `{arch}` |")
    quoted = f"| {count / 1e6:.1f} M |" if arch == "resnet50-public" else f"| {count:,} ({keys} "
    assert quoted in row, (count, keys)


def test_reference_models_cost_table_is_what_its_snippet_counts():
    """The cost table's GFLOP per image and the full recipes' totals (epochs from each
    protocol's [pretrain] table, 50,000 CIFAR-10 images an epoch; 2 FLOPs per multiply-add)."""
    from deep.protocol import load_protocol
    text = doc_text("docs/reference-models.md")
    for arch, protocol, forward_digits in (("resnet26-gn", "cifar10c", 2),
                                           ("wrn28-10", "cifar10c-official", 1)):
        forward, step = flops_per_image(arch)
        row = table_row("docs/reference-models.md",
                        f"| `{arch}` | {forward:.{forward_digits}f} GFLOP")
        assert f"| {step:.{forward_digits}f} GFLOP |" in row, (arch, step)
        epochs = load_protocol(protocol).pretrain.epochs
        image_steps = epochs * CIFAR10_TRAIN
        assert f"{epochs} x 50,000 = {image_steps / 1e6:g} M image-steps" in row
        total = round(image_steps * float(f"{step:.{forward_digits}f}") / 1e6, 1)   # PFLOP
        assert f"= {total:g} PFLOP" in row or f"= {round(total):g} PFLOP" in row, (arch, total)
    # fine-tuning cifar10c-official: runs x epochs x 1,000 images, every run through the WRN
    runs, epochs = grid_runs("cifar10c-official"), load_protocol("cifar10c-official").tuning.epochs
    passes = runs * epochs * 1000
    wrn_step = float(f"{flops_per_image('wrn28-10')[1]:.1f}")
    assert f"at most {passes / 1e6:.1f} M training image-passes" in text
    assert f"{round(passes * wrn_step / 1e6, -1):.0f} PFLOP if every run" in text


def test_vit_wilds_counts_and_the_gpu_estimate_follow_from_the_flop_count():
    """docs/vit-wilds.md: the image tower's parameters, one stored stage input, the forward
    FLOPs (`python -m deep.vit_cost`'s closed form) and the GPU table at the assumed rate."""
    from deep.models import build_model
    from deep.vit_cost import forward_flops
    text = doc_text("docs/vit-wilds.md")
    model = build_model("clip-vit-b16", 2)
    tower = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert f"({tower:,} image-tower parameters)" in text
    assert f"197 x 768 floats = {197 * 768 * 4 / 1000:.0f} KB per image" in text
    gflop = forward_flops("clip-vit-b16") / 1e9
    assert f"forward FLOPs per image: {gflop:.2f} G (closed form" in text
    rate, per_image = 30e12, float(f"{gflop:.2f}") * 1e9   # the doc's assumed 30 TFLOP/s
    hours = lambda images, passes=1: images * passes * per_image / rate / 3600   # noqa: E731
    from deep.protocol import load_protocol
    # the test set is the rest of the OOD test split (85,054 and 22,108 images, WILDS' sizes)
    for split, classes, name, benchmark in ((85_054, 2, "camelyon17", "Camelyon17"),
                                            (22_108, 62, "fmow", "FMoW")):
        target = load_protocol(name).target
        train_images = target.n_target
        test_images = split - target.val_per_class * classes - train_images
        assert f"OOD test {split:,}" in text, benchmark
        test_h, train_h = hours(60 * test_images), hours(60 * 10 * train_images, 3)
        assert (f"| {benchmark} | 60 x {test_images:,} images: ~{test_h:.1f} h | "
                f"60 x 10 x {train_images:,} images: ~{train_h:.1f} h |") in text, benchmark
    for images, seconds in ((302_436, "1,060"), (76_863, "270")):
        assert f"{round(images * 3 * per_image / rate, -1):,.0f}" == seconds
        assert f"{seconds} s per epoch" in text and f"{images:,}" in text


def _adapt_rows(name: str) -> list[dict]:
    with open(ROOT / "figures/fmnist-adapt" / name) as f:
        return list(csv.DictReader(f))


def test_online_adaptation_minutes_and_per_image_costs_are_the_seconds_columns():
    """docs/online-adaptation.md sums and medians of the committed CSVs' `seconds` columns
    (its own `python -c` sums them)."""
    text = doc_text("docs/online-adaptation.md")
    results, prior = _adapt_rows("results.csv"), _adapt_rows("memo-bn-prior.csv")
    minutes = [sum(float(r["seconds"]) for r in rows) / 60 for rows in (results, prior)]
    assert f"{minutes[0]:.1f} minutes of streams" in text
    assert f"plus {minutes[1]:.1f} minutes for the BN-prior variant" in text
    assert f": {sum(minutes):.0f} minutes in all" in text

    def per_image(method, blocks=None):
        return [float(r["seconds"]) / int(r["images"]) for r in results
                if r["method"] == method and (blocks is None or r["blocks"] == blocks)]
    for blocks in ("first", "all", "last"):
        cost = per_image("memo", blocks)
        quoted = re.search(rf"`{blocks}` ([\d.]+) s \(([\d.]+)-([\d.]+)", text).groups()
        assert [float(q) for q in quoted] == pytest.approx(
            [statistics.median(cost), min(cost), max(cost)], abs=0.005), blocks
    tent = per_image("tent")
    assert f"TENT {statistics.median(tent):.4f} s per image (median of its {len(tent)} streams" in text

    full = _adapt_rows("memo-full-stream.csv")
    seed0 = sum(float(r["seconds"]) for r in full if r["seed"] == "0") / 60
    assert f"(seed 0: {seed0:.1f} minutes of streams" in text


def test_online_adaptation_source_accuracy_is_its_manifests():
    import json
    manifest = json.loads((ROOT / "deep/weights/fmnist-resnet26.pt.json").read_text())
    assert (f"(BatchNorm ResNet-26, {100 * manifest['source_test_acc']:.1f} % on clean test images: "
            "`source_test_acc` in its manifest") in doc_text("docs/online-adaptation.md")


def test_online_adaptation_whole_stream_subtraction():
    """'209 of 700 right (29.9 %) against 397 (56.7 %)': gaussian noise, seed 0, MEMO `first`
    and `none` over 900 images minus their first 200 (results.csv's 200-image rows)."""
    text = doc_text("docs/online-adaptation.md")

    def correct(rows, blocks, images):
        row, = [r for r in rows if r["shift"] == "gaussian_noise" and r["seed"] == "0"
                and r["method"] == "memo" and r["episodic"] == "false" and r["lr"] == "0.0005"
                and r["blocks"] == blocks and r["images"] == str(images)]
        return round(float(row["test_acc"]) * images)
    results, full = _adapt_rows("results.csv"), _adapt_rows("memo-full-stream.csv")
    first, none = (correct(full, b, 900) - correct(results, b, 200) for b in ("first", "none"))
    assert (f"{first} of 700 right ({100 * first / 700:.1f} %) against {none} "
            f"({100 * none / 700:.1f} %)") in text


def _quoted_intervals(text: str) -> list[str]:
    return re.findall(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", text)


@pytest.mark.parametrize("page, section, tables", [
    ("README.md", "Results at a glance", ["figures/fmnist-v2/table.md"]),
    ("figures/README.md", "Verdicts (test accuracy", ["figures/fmnist-v2/table.md"]),
    ("docs/online-adaptation.md", "**Whole streams.**",
     ["figures/fmnist-adapt/memo-full-stream/table.md", "figures/fmnist-adapt/table.md"])])
def test_quoted_intervals_are_in_the_committed_tables(page, section, tables):
    """Every 'mean [low, high]' a results paragraph quotes is printed in a committed table
    (`python -m deep bench fmnist --summarize-only`, `python -m deep report` make them)."""
    text = doc_text(page)
    body = text[text.index(section):][:6000]
    printed = " ".join(doc_text(t) for t in tables)
    quoted = _quoted_intervals(body)
    assert quoted, (page, section)
    assert [q for q in quoted if q not in printed] == []


def _mean_row(table: str, heading: str) -> dict[str, str]:
    """{column: cell} of the **mean** row of the section of a report table.md under `heading`."""
    section = (ROOT / table).read_text().split(heading, 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    mean = next(line for line in lines if line.startswith("| **mean**"))
    return dict(zip(header, (c.strip() for c in mean.strip("|").split("|"))))


def test_readme_online_adaptation_numbers_are_the_tables_mean_rows():
    """README's MEMO/TENT paragraph quotes the three-shift means of the committed tables."""
    readme = doc_text("README.md")
    tent = _mean_row("figures/fmnist-adapt/table.md", "### TENT, online, lr 0.001 (900 images")
    assert f"({tent['all']} points for `all`, {tent['first']} for `first`, 5 seeds)" in readme
    memo = _mean_row("figures/fmnist-adapt/memo-full-stream/table.md", "### MEMO, online, lr 0.0005")
    means = {block: memo[block].split(" ±")[0] for block in ("last", "first", "first+second", "all")}
    assert (f"(last {means['last']}, first {means['first']}, first+second "
            f"{means['first+second']}, all {means['all']} points)") in readme
