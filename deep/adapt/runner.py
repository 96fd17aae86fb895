"""Running an adaptation protocol: streams over the target test splits, into a CSV.

One stream = (shift, method, block option, seed): a fresh copy of the source model
adapts online over the seed's test split in the seed's order and is scored on its
own predictions. Streams are independent, so the run resumes stream by stream.
"""

from __future__ import annotations

import copy
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..augment_memo import MemoAugmenter
from ..blocks import blocks_for
from ..checkpoints import load_model
from ..data import get_benchmark
from ..data.base import mean_std
from ..errors import ConfigError
from ..files import check_output, sole_writer
from ..normalization import OPTION as NORMALIZATION_OPTION, loader_options
from ..results import recorded_checkpoint
from ..files import machine
from ..sweep import resolve_checkpoint
from .core import METHODS, adapted_parameter_names, make_adapter, parse_blocks, run_stream
from .protocol import AdaptProtocol
from .results import AdaptResults, data_json, settings_json


def stream_loader_options(protocol: AdaptProtocol) -> dict:
    """The options the test stream is loaded with: the protocol's [data] plus the
    architecture's own input normalisation when it declares one (e.g. resnet26-gn:
    mean = std = 0.5), as the sweep loads its tasks."""
    bench = get_benchmark(protocol.benchmark)
    return loader_options(bench.load_task, bench.name, protocol.arch, protocol.data)


def stream_normalisation(protocol: AdaptProtocol) -> tuple[tuple, tuple]:
    """(mean, std) per channel the stream was normalised with, from the options it is
    loaded with: their `normalization` when they have one, else the loader's default.
    MEMO needs it to go back to pixels in [0, 1] and to return copies like the stream."""
    given = stream_loader_options(protocol).get(NORMALIZATION_OPTION)
    bench = get_benchmark(protocol.benchmark)
    if given is None and bench.normalization is None:
        raise ConfigError(f"MEMO needs the (mean, std) the {bench.name} loader normalises "
                          "pixels with, to augment pixels in [0, 1]: give its Benchmark a "
                          "`normalization` (deep.data.base)")
    return mean_std(given, bench.normalization, bench.in_channels)


def memo_augmenter(protocol: AdaptProtocol, method: str = "memo") -> MemoAugmenter:
    """MEMO's augmentations for the protocol's stream (its normalisation), at the severity
    of `method`'s settings (a method of the table with `augments`)."""
    return MemoAugmenter(*stream_normalisation(protocol),
                         severity=protocol.config(method).severity)


def stream_order(n: int, seed: int, images: int) -> torch.Tensor:
    """The first `images` (0: all) of a permutation of range(n) drawn from `seed`."""
    if images < 0:  # order[:-k] would keep all but the last k: never what was meant
        raise ConfigError(f"images must be >= 0 (0 = all {n}), got {images}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return order[:images] if images else order


def augment_generator(seed: int, shift: str) -> torch.Generator:
    """MEMO's augmentation draws: fixed by (seed, shift), the same for every block option,
    so the block options of one stream see the same augmented copies. Taken modulo 2**63,
    which torch's seed fits: every seed below 2**63 runs (the same draws as before for
    seeds below 2**43, where the sum never reached 2**63)."""
    return torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + zlib.crc32(shift.encode())) % 2**63)


@dataclass
class StreamResult:
    test_acc: float
    adapted_params: int
    total_params: int
    seconds: float
    images: int


def adapt_stream(source: torch.nn.Module, arch: str, method: str, option: str, config,
                 images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor,
                 augmenter=None, generator=None, episodic: bool = False) -> StreamResult:
    """One stream on a deep copy of `source` (left untouched)."""
    # Channels-last: ~20% faster convolutions on CPU here (see deep.train); same values.
    model = copy.deepcopy(source).to(memory_format=torch.channels_last)
    start = time.perf_counter()
    adapter = make_adapter(model, method, option, blocks_for(arch), config, episodic,
                           augmenter, generator)
    correct = run_stream(adapter, images, labels, order, METHODS[method].batch_size(config))
    params = dict(model.named_parameters())
    return StreamResult(float(correct.float().mean()), sum(params[n].numel() for n in adapter.names),
                        sum(p.numel() for p in params.values()), time.perf_counter() - start,
                        len(order))


def load_test_split(protocol: AdaptProtocol, shift: str, seed: int, data_dir: str | None):
    """(images, labels) of the seed's test split, drawn as the sweep draws it (test
    first, so it does not depend on the small n_target / validation sizes used here)."""
    bench = get_benchmark(protocol.benchmark)
    task = bench.load_task(Path(data_dir) if data_dir else None, shift, bench.num_classes, 1,
                           protocol.test_per_class, seed, **stream_loader_options(protocol))
    test = task.test
    if not hasattr(test, "images"):
        images, labels = zip(*[(x, y) for x, y, _ in test.batches(256)])
        return torch.cat(images), torch.cat(labels)
    return test.images, test.labels


@dataclass
class AdaptSummary:
    ran: int
    skipped: int
    seconds: float
    out: Path


def check_protocol(protocol: AdaptProtocol) -> None:
    """Unknown shifts or blocks fail before anything runs."""
    bench = get_benchmark(protocol.benchmark)
    bench.check_shifts(protocol.shifts)
    known = blocks_for(protocol.arch)
    for method in protocol.methods:
        for option in protocol.blocks_of(method):
            unknown = [b for b in parse_blocks(option) if b not in known and b != "all"]
            if unknown:
                raise ConfigError(f"unknown block(s) {unknown} in {option!r} for {protocol.arch}; "
                                 f"known: none, {', '.join(known)}, all (join with '+')")


def run_adaptation(protocol: AdaptProtocol, out: str | Path, checkpoint: str | None = None,
                   data_dir: str | None = None, episodic: bool = False,
                   progress: bool = True, trust_checkpoint: bool = False) -> AdaptSummary:
    """Every stream of the protocol not yet in `out`, seed by seed, shift by shift.
    `trust_checkpoint`: read the checkpoint with full unpickling (it may run code); only
    for a trusted file that safe loading refuses (see deep.checkpoints)."""
    check_protocol(protocol)
    bench = get_benchmark(protocol.benchmark)
    if bench.check_data_dir is not None:  # before the source model is resolved (or trained)
        bench.check_data_dir(data_dir)
    bench.check_local_data(data_dir, protocol.shifts)  # a partial download: stop now, not hours later
    checkpoint = resolve_checkpoint(bench, protocol.arch, checkpoint or protocol.checkpoint, data_dir)
    source = load_model(checkpoint, protocol.arch, bench.num_classes, bench.in_channels,
                        trust_checkpoint=trust_checkpoint).eval()
    for method in protocol.methods:  # e.g. TENT on a block without normalisation: fail now
        for option in protocol.blocks_of(method):
            adapted_parameter_names(source, method, option, blocks_for(protocol.arch))
    for method in protocol.methods:  # e.g. MEMO's BN prior on a model without BatchNorm
        for config in protocol.configs(method):
            METHODS[method].check_source(source, config)
    augmenters = {m: memo_augmenter(protocol, m) for m in dict.fromkeys(protocol.methods)
                  if METHODS[m].augments}
    out = check_output(out)
    with sole_writer(out):  # one writer per results file
        return _run_streams(protocol, AdaptResults(out), checkpoint, source, augmenters,
                            data_dir, episodic, progress)


def _run_streams(protocol: AdaptProtocol, results: AdaptResults, checkpoint: str, source,
                 augmenters: dict, data_dir: str | None, episodic: bool,
                 progress: bool) -> AdaptSummary:
    """The streams of `run_adaptation`, each skipped if `results` holds it."""
    for method in protocol.methods:  # other settings in the file: refused before any stream
        for config in protocol.configs(method):
            results.check_method(protocol.benchmark, method,
                                 stream_settings(protocol, checkpoint, config))
    mode = "episodic" if episodic else "online"
    ran = skipped = 0
    total = stream_count(protocol)
    start = time.perf_counter()
    for seed in protocol.seeds:
        for shift in protocol.shifts:
            split = None
            for method in protocol.methods:
                for config in protocol.configs(method):
                    for option in protocol.blocks_of(method):
                        split = split or load_test_split(protocol, shift, seed, data_dir)
                        done = _run_or_skip(results, protocol, checkpoint, source,
                                            augmenters.get(method), split, shift, seed, method,
                                            config, option, episodic)
                        ran, skipped = ran + (done is not None), skipped + (done is None)
                        if done is not None and progress:
                            # k/N: a whole protocol runs for an hour or more, and a
                            # resumed one says here how many streams were already done
                            print(f"[{time.perf_counter() - start:7.0f} s] "
                                  f"{ran + skipped}/{total} {shift} seed {seed} "
                                  f"{method} {mode} lr {config.lr:g} {option}: {100 * done.test_acc:.1f}% "
                                  f"on {done.images} images ({done.seconds:.0f} s)",
                                  file=sys.stderr, flush=True)
    return AdaptSummary(ran, skipped, time.perf_counter() - start, results.path)


def stream_count(protocol: AdaptProtocol) -> int:
    """How many streams `run_adaptation` goes through, run or skipped."""
    per_shift = sum(len(protocol.configs(m)) * len(protocol.blocks_of(m))
                     for m in protocol.methods)
    return len(protocol.seeds) * len(protocol.shifts) * per_shift


def stream_settings(protocol: AdaptProtocol, checkpoint: str, config) -> dict:
    """A stream's SETTINGS columns: what a resumed run must agree on."""
    return {"arch": protocol.arch, "checkpoint": recorded_checkpoint(checkpoint),
            "test_per_class": protocol.test_per_class, "settings": settings_json(config),
            "data": data_json(protocol.data)}


def _run_or_skip(results: AdaptResults, protocol: AdaptProtocol, checkpoint: str, source, augmenter,
                 split, shift: str, seed: int, method: str, config, option: str,
                 episodic: bool) -> StreamResult | None:
    """Run one stream and append its row, or None when the CSV already has it."""
    order = stream_order(len(split[1]), seed, protocol.images_of(method))
    row = {"benchmark": protocol.benchmark, "shift": shift, "method": method, "blocks": option,
           "seed": seed, "episodic": episodic, "images": len(order), "lr": float(config.lr)}
    settings = stream_settings(protocol, checkpoint, config)
    if results.finished(tuple(row.values()), settings):
        return None
    r = adapt_stream(source, protocol.arch, method, option, config, *split, order, augmenter,
                     augment_generator(seed, shift), episodic)
    results.append({**row, "test_acc": r.test_acc, "adapted_params": r.adapted_params,
                    "total_params": r.total_params, "seconds": round(r.seconds, 2), **settings,
                    "machine": machine("cpu")})
    return r
