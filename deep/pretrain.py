"""Pretrain a source model: all parameters, batch norm in train mode, from scratch.

Uses the one training loop (`deep.train.fit`) with SGD and momentum (Nesterov's by
default), a cosine (default) or step schedule and optional random-crop / flip
augmentation, as `PretrainConfig` says:

    model = pretrain(benchmark.load_source(data_dir), "resnet26", PretrainConfig(epochs=30))

`pretrain_to_file` (the `python -m deep pretrain` command) also reports the source
test accuracy and writes the checkpoint atomically plus its manifest (with the
resolved configuration). `cached_source_model` trains a benchmark's source model on
the fly from its `source_recipe` (the synthetic benchmark) and caches it on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shlex
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import (RANDOM_INIT, CheckpointError, load_backbone, save_checkpoint,
                          manifest_path, verify_checkpoint, write_manifest)
from .data import Benchmark, SourceData, get_benchmark
from .errors import (ConfigError, check_choice, check_int, check_nonnegative, check_positive,
                     check_seed, clash_text, differences)
from .files import check_output, machine, sole_writer
from .models import build_model, get_architecture
from .normalization import loader_options
from .train import (SCHEDULES, RunStateFile, TrainConfig, check_milestones, evaluate, fit,
                    resolve_device)

AUGMENTATIONS = ("crop-flip", "crop", "none")
MOMENTA = ("nesterov", "plain")  # SGD momentum 0.9: Nesterov's or plain


def random_crop_flip(pad: int = 4, flip: bool = True):
    """Augmentation: pad by `pad`, crop back at a random offset, flip half the images
    left-right. (b, C, H, W) -> same shape; randomness from the generator passed in.

    Pads by repeating the edge pixels: images arrive normalised, so zero padding would
    be the mean intensity (mid-grey), not the black border of Fashion-MNIST or CIFAR."""
    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).tolist()
        out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
        if flip:
            mirror = torch.rand(b, generator=generator) < 0.5
            out[mirror] = out[mirror].flip(-1)
        return out
    return augment


def augmentation(name: str):
    check_choice("augment", name, AUGMENTATIONS)
    return {"crop-flip": random_crop_flip(flip=True), "crop": random_crop_flip(flip=False),
            "none": None}[name]


@dataclass(frozen=True)
class PretrainConfig:
    """How a source model is pretrained: the one place these defaults are written.

    A protocol's `[pretrain]` table overrides them per benchmark, and `python -m deep
    pretrain` generates one flag per field (`--batch-size`, ...) that overrides both.
    """

    epochs: int = field(default=30, metadata={"help": "passes over the source training set"})
    lr: float = field(default=0.1, metadata={"help": "SGD peak (initial) learning rate"})
    seed: int = field(default=0, metadata={"help": "initialisation, order and augmentation"})
    batch_size: int = field(default=128, metadata={"help": "training minibatch size"})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 coefficient"})
    augment: str = field(default="crop-flip", metadata={"help": "training augmentation",
                                                        "choices": AUGMENTATIONS})
    schedule: str = field(default="cosine", metadata={
        "help": "lr schedule: cosine to 0, or step (x gamma after each milestone epoch)",
        "choices": SCHEDULES})
    milestones: list[int] = field(default_factory=list, metadata={
        "help": "epochs after which a step schedule multiplies the lr by gamma"})
    gamma: float = field(default=TrainConfig.gamma, metadata={"help": "the step schedule's factor"})
    momentum: str = field(default="nesterov", metadata={
        "help": "SGD momentum 0.9, Nesterov's or plain", "choices": MOMENTA})
    init: str | None = field(default=None, metadata={
        "help": "start from these weights (ours or a torchvision state dict, e.g. ImageNet "
                "ResNet-50); a classifier of another size is re-initialised. 'none': random "
                "weights, also for an architecture that needs weights (CLIP)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the training forward (worth it on long runs only; "
                "compiling takes tens of seconds)"})

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name))
        check_positive("lr", self.lr)
        check_nonnegative("weight_decay", self.weight_decay)
        check_seed("seed", self.seed)
        check_choice("augment", self.augment, AUGMENTATIONS)
        check_choice("momentum", self.momentum, MOMENTA)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_milestones(self.schedule, self.milestones, self.gamma, self.epochs)
        if self.init is not None and not isinstance(self.init, str):
            raise ConfigError(f"init must be a weight file's path, or 'none', got {self.init!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")

    def train_config(self) -> TrainConfig:
        """The engine's settings: all parameters, BN in train mode, SGD, this schedule."""
        return TrainConfig(lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
                           weight_decay=self.weight_decay, freeze_bn=False, seed=self.seed,
                           optimizer="sgd", nesterov=self.momentum == "nesterov",
                           schedule=self.schedule, milestones=tuple(self.milestones),
                           gamma=self.gamma, augment=augmentation(self.augment),
                           compile=self.compile, channels_last=True if self.compile else None)


def check_init(arch: str, config: PretrainConfig) -> None:
    """An architecture that means CLIP's weights (`needs_init`) starts from a file, or
    from random weights only when told (`init="none"`)."""
    if config.init is None and get_architecture(arch).needs_init:
        raise ConfigError(f"{arch} starts from CLIP's weights, not from random ones: pass "
                          f"--init FILE (python -m deep.clip prepare writes one; see "
                          f"docs/vit-wilds.md), or --init {RANDOM_INIT} to train it from "
                          f"random weights anyway")


def pretrain(source: SourceData, arch: str, config: PretrainConfig | None = None,
             progress: bool = True, trust_checkpoint: bool = False, device: str | None = None,
             state_file: str | Path | None = None, data_key: dict | None = None,
             **overrides) -> nn.Module:
    """Train `arch` on `source.train`; returns the model (eval mode).

    `config` (default `PretrainConfig()`), with any of its fields overridden by keyword
    (`pretrain(source, "resnet26", epochs=2)`). Starts from scratch, or from the weights
    in `config.init` (ours or a torchvision-layout state dict; a classifier of another
    size is re-initialised), e.g. ImageNet ResNet-50 weights for Waterbirds and CelebA.
    Deterministic on CPU for a given seed (initialisation, order, augmentation).
    `trust_checkpoint` reads `config.init` with full unpickling (trusted files only; it
    is a safety switch, not a setting of the run, so it is not part of `config`).
    `device`: where to train, "auto" meaning CUDA when present; None (the default, for
    library callers): where the model is built, the CPU. The model stays there.
    `state_file`: the run's state is saved there after every epoch, and a run that finds
    it (stopped, killed) continues after its last epoch with the same numbers; a file of
    other settings or data is refused (`data_key`: what else names the data, e.g. the
    loader options). The caller deletes it once the model is safe.
    Raises ConfigError when the loss diverges (NaN/inf).
    """
    config = dataclasses.replace(config or PretrainConfig(), **overrides)
    check_init(arch, config)
    if config.init == RANDOM_INIT:
        config = dataclasses.replace(config, init=None)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = build_model(arch, source.num_classes, source.in_channels)
    saved, state = _run_state(state_file, source, arch, config, data_key)
    if config.init is not None and state is None:  # a continued run's weights are the state's
        _load_init(model, source, arch, config, trust_checkpoint)
    bar = None
    if progress:
        from tqdm import tqdm
        # a continued run starts at its saved epoch: counting from 0 showed 0/N for its
        # first epoch, then a jump that threw off the bar's rate and time left
        bar = tqdm(total=config.epochs, initial=state["epoch"] if state else 0,
                   desc=f"pretrain {arch} on {source.benchmark}", unit="epoch")

    def on_epoch(record):
        if bar is not None:
            bar.set_postfix(loss=f"{record['train_loss']:.3f}")
            bar.update(record["epoch"] - bar.n)

    try:
        train_config = dataclasses.replace(config.train_config(),
                                           device=resolve_device(device) if device else None)
        result = fit(model, source.train, None, None, "all", train_config, on_epoch=on_epoch,
                     state_file=saved)
    finally:
        if bar is not None:
            bar.close()
    if result.status != "ok":
        if saved is not None:  # a rerun at a smaller lr starts over, not from this run
            saved.path.unlink(missing_ok=True)
        raise ConfigError(f"pretraining diverged (NaN/inf loss) at lr={config.lr}; "
                          "try a smaller --lr")
    return model.eval()


def _run_state(state_file, source: SourceData, arch: str, config: PretrainConfig,
               data_key: dict | None) -> tuple[RunStateFile | None, dict | None]:
    """(the run's state file, the state a stopped run left in it) or (None, None)."""
    if state_file is None:
        return None, None
    # compile changes speed (and rounding), not the run: not part of what must agree
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "compile"}
    saved = RunStateFile(Path(state_file), {
        "arch": arch, "source": source.benchmark, "num_classes": source.num_classes,
        "data": source_fingerprint(source), **(data_key or {}), "pretrain": settings})
    state = saved.load()  # another run's file is refused here, before any work
    if state is not None:
        print(f"continuing the stopped run saved in {saved.path} after epoch "
              f"{state['epoch']} of {config.epochs}", file=sys.stderr, flush=True)
    return saved, state


def _load_init(model: nn.Module, source: SourceData, arch: str, config: PretrainConfig,
               trust_checkpoint: bool) -> None:
    """`config.init`'s weights into `model`; a classifier of another size is left as built."""
    skipped = load_backbone(model, config.init, trust_checkpoint,
                            head=get_architecture(arch).blocks.get("last", ("fc",)), arch=arch)
    if skipped:
        print(f"init from {config.init}: classifier {', '.join(skipped)} re-initialised "
              f"({source.num_classes} classes)")


def source_fingerprint(source: SourceData) -> str:
    """A checksum of the training split's labels and its first images (or file paths), so
    that a stopped run is not continued on other data of the same size."""
    train = source.train
    digest = hashlib.sha256(f"{len(train)}".encode())
    digest.update(train.labels.numpy().tobytes())
    images = getattr(train, "images", None)
    if images is not None:
        digest.update(images[:16].contiguous().numpy().tobytes())
    digest.update("\n".join(map(str, getattr(train, "paths", None) or [])).encode())
    return digest.hexdigest()[:16]


def pretrain_to_file(benchmark: str, out: str | Path, arch: str,
                     config: PretrainConfig | None = None, source_options: dict | None = None,
                     data_dir: str | Path | None = None, command: str | None = None,
                     resolved: dict | None = None, trust_checkpoint: bool = False,
                     device: str | None = None) -> dict:
    """Pretrain the source model of `benchmark`, save it and its manifest; return the manifest.

    `source_options` are the source loader's keywords (a protocol's resolved source
    data). `resolved` (the whole resolved configuration) is saved in the checkpoint's
    meta and in the manifest under "config". `trust_checkpoint`: see `pretrain`.
    Rerun after a stop, it continues the run (`<out>.state`); rerun after it finished, it
    returns the manifest of `out` when that records these settings (a job requeued after
    its end repeats no work) and refuses other settings (a finished model is not
    overwritten); delete `out` to train again.
    """
    config = config or PretrainConfig()
    check_init(arch, config)  # before the source data is read
    out = check_output(out)   # and before hours of training
    bench = get_benchmark(benchmark)
    if bench.load_source is None:
        raise ConfigError(f"benchmark {benchmark!r} has no source data to pretrain on "
                          "(its source model comes from elsewhere)")
    options = dict(source_options or {})
    resolved = resolved or {"benchmark": benchmark, "arch": arch,
                            "pretrain": dataclasses.asdict(config)}
    with sole_writer(out):  # one pretraining per --out
        done = _finished(out, benchmark, arch, resolved, options)
        if done is not None:
            print(f"{out} is already trained with these settings (its manifest says so); "
                  "delete it to train again", file=sys.stderr, flush=True)
            return {"checkpoint": str(out), **done}
        return _pretrain_to_file(bench, out, arch, config, options, data_dir, command,
                                 resolved, trust_checkpoint, device)


def _finished(out: Path, benchmark: str, arch: str, resolved: dict,
              options: dict) -> dict | None:
    """The manifest of `out` if it is a finished pretraining of these settings; None if
    there is none (no file, no manifest, or a file the manifest does not describe: a run
    stopped between writing the two); a ConfigError naming what differs if it is a
    finished pretraining of other settings."""
    if not out.is_file():
        return None
    try:
        manifest = verify_checkpoint(out)
    except CheckpointError:  # no manifest, or a file it does not describe: train anew
        return None
    recorded = {"benchmark": manifest.get("benchmark"), "arch": manifest.get("arch"),
                "data": manifest.get("data"), "config": manifest.get("config")}
    clash = differences(recorded, {"benchmark": benchmark, "arch": arch, "data": options,
                                   "config": resolved})
    if clash:
        raise ConfigError(f"{out} holds a finished model trained with other settings "
                          f"({clash_text(clash, sep='; ')}); delete it (and {out}.json) to "
                          "train it again with these, or choose another --out")
    return manifest


def _pretrain_to_file(bench: Benchmark, out: Path, arch: str, config: PretrainConfig,
                      options: dict, data_dir, command, resolved: dict, trust_checkpoint: bool,
                      device: str | None) -> dict:
    t0 = time.perf_counter()
    source = bench.load_source(Path(data_dir) if data_dir else None,
                               **loader_options(bench.load_source, bench.name, arch, options))
    # after every epoch, so that a stopped or killed run continues there when rerun
    state_file = state_path(out)
    model = pretrain(source, arch, config, trust_checkpoint=trust_checkpoint, device=device,
                     state_file=state_file, data_key={"options": options})
    acc = evaluate(model, source.test).acc
    trained_on = next(model.parameters()).device.type
    model.cpu()  # the checkpoint loads on any machine
    seconds = time.perf_counter() - t0
    settings = dataclasses.asdict(config)
    fields = {"benchmark": bench.name, "source": source.benchmark, "arch": arch, **settings,
              "init": str(config.init) if config.init else None, "data": options,
              "device": trained_on, "machine": machine(trained_on),
              "source_test_acc": acc, "source_train_images": len(source.train),
              "source_test_images": len(source.test), "seconds": round(seconds, 1),
              "torch": torch.__version__, "config": resolved,
              "command": command or " ".join(shlex.quote(a) for a in sys.argv)}
    save_checkpoint(out, model, arch, source.num_classes, source.in_channels, meta=fields)
    manifest = json.loads(write_manifest(out, **fields).read_text())
    state_file.unlink(missing_ok=True)
    return {"checkpoint": str(out), **manifest}


def state_path(out: str | Path) -> Path:
    """Where `pretrain_to_file` keeps the run's state until the checkpoint is written."""
    return Path(f"{out}.state")


# --- source models trained on the fly (the synthetic benchmark) ----------------------

def cache_dir() -> Path:
    """Where on-the-fly source models are kept: $SURGICAL_FT_CACHE, else ~/.cache/surgical-ft."""
    return Path(os.environ.get("SURGICAL_FT_CACHE", Path.home() / ".cache" / "surgical-ft"))


def source_model_path(bench: Benchmark, arch: str) -> Path:
    """Where `cached_source_model` keeps `bench`'s model for `arch`: named by the recipe
    and by the code of the benchmark's data module and the network's module."""
    stamp = "-".join(f"{k}{v}" for k, v in sorted(bench.source_recipe.items()))
    stamp += _code_stamp(bench, arch)
    return cache_dir() / f"{bench.name}-{arch}-{zlib.crc32(stamp.encode()):08x}.pt"


def _code_stamp(bench: Benchmark, arch: str) -> str:
    """The source code of the modules that define the benchmark's images and the network,
    so that editing either trains a new cached model: a model of the old code with the
    same shapes would otherwise load without a word."""
    modules = {inspect.getmodule(bench.load_source),
               inspect.getmodule(get_architecture(arch).build)}
    return "".join(sorted(inspect.getsource(m) for m in modules if m is not None))


def cached_source_model(bench: Benchmark, arch: str) -> Path:
    """Path of `bench`'s source model for `arch`, pretrained now with the benchmark's
    `source_recipe` (PretrainConfig fields) if it is not cached yet.

    Training is deterministic (fixed seed, one thread, CPU), so every process that
    builds it gets the same weights; the file is written atomically, so racing
    builders are safe.
    """
    if bench.source_recipe is None:
        raise ConfigError(f"benchmark {bench.name!r} has no recipe for an on-the-fly source model")
    recipe = dict(bench.source_recipe)
    path = source_model_path(bench, arch)
    if path.is_file() and manifest_path(path).is_file():  # written last: the model is whole
        return path
    print(f"training {bench.name}'s source model for {arch} (first use; cached as {path})",
          file=sys.stderr, flush=True)
    source = bench.load_source(None)
    config = PretrainConfig(**recipe)
    threads = torch.get_num_threads()
    # One thread: the same weights from run to run on one kind of CPU (other CPUs run other
    # kernels: docs/troubleshooting.md), and no OpenMP stalls on a busy CPU.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            model = pretrain(source, arch, config, progress=sys.stderr.isatty())
        acc = evaluate(model, source.test).acc
    finally:
        torch.set_num_threads(threads)
    resolved = {"benchmark": bench.name, "arch": arch, "pretrain": dataclasses.asdict(config)}
    save_checkpoint(path, model, arch, source.num_classes, source.in_channels,
                    meta={"benchmark": bench.name, "source_test_acc": acc, **recipe,
                          "config": resolved})
    write_manifest(path, benchmark=bench.name, arch=arch, source_test_acc=acc, **recipe,
                   config=resolved)
    return path
