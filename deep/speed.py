"""Speed benchmark: our engine against a reference-style loop, same data, model, seeds.

    python -m deep.speed            # ResNet-26, 28x28 grayscale, 1000 / 100 / 900 images

Both run the surgical sweep (every single block + `all`, two learning rates, a few
epochs, Adam, BN frozen, epoch chosen by validation) in one process:

- reference-style (how the public code runs it): every parameter keeps
  requires_grad=True (the optimizer holds only the tuned block), the whole
  network runs every step, the model is reloaded from disk for every
  (option, lr), and validation and test are evaluated after every epoch;
- ours: `deep.train.fit` with one `PrefixCache` per task (frozen params
  requires_grad=False, cached prefix activations for train/val/test, BN folded
  into the convs, channels-last activations, evaluation in batches of 64, test
  evaluated once at the best epoch), pretrained weights read once.

Both loops run under the same settings: one torch thread by default, and
glibc malloc keeping freed activation buffers (`deep.allocator`, as every `python -m
deep` command does; `--default-malloc` leaves glibc's defaults, for both).

The two must reach the same test accuracies (each (option, lr), within 0.5
points); then per-option and total wall-clock ratios are printed (CPU-time ratios
beside them, which are steadier on a shared machine). The last line is
`total speedup: <ratio>`.

`--count-work` runs both loops once more (first learning rate only; the work does
not depend on it) under `torch.utils.flop_counter` and prints the convolution and
matmul FLOPs each performs: the work ratio says how much of the speedup comes from
work ours skips, and speedup / work ratio how much from doing the same work faster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .allocator import keep_freed_memory
from .errors import ConfigError, exit_status
from .flags import at_least, nonnegative_float, positive_floats
from .blocks import ALL, blocks_for, tuned_parameter_names
from .checkpoints import load_model, save_checkpoint
from .data.base import ShiftTask, SourceData, TensorSplit, seeded
from .data.synthetic import NUM_CLASSES, generate
from .models.vit import CONFIGS as VIT_CONFIGS
from .pretrain import pretrain
from .train import PrefixCache, TrainConfig, accuracy, fit, resolve_device


def make_data(size: int, channels: int, n_source: int, n_train: int, n_val: int,
              n_test: int) -> tuple[SourceData, ShiftTask]:
    """Source ("clean"): synthetic gratings, with the generator's own pixel noise (sigma
    0.3); target: the same with pixel noise of sigma 0.6 added (about 0.67 in all)."""
    g = seeded(0)

    def split(n, noise, name):
        labels = torch.arange(NUM_CLASSES).repeat_interleave(-(-n // NUM_CLASSES))[:n]
        images = generate(labels, 0, g, size=size, channels=channels)
        if noise:
            images = images + noise * torch.randn(images.shape, generator=g)
        return TensorSplit(images, labels, name=name)

    source = SourceData("speed", NUM_CLASSES, channels, split(n_source, 0, "source"),
                        split(400, 0, "source-test"))
    task = ShiftTask("speed", "noise", NUM_CLASSES, split(n_train, 0.6, "train"),
                     split(n_val, 0.6, "val"), split(n_test, 0.6, "test"))
    return source, task


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


@torch.no_grad()
def _reference_eval(model, split, batch_size, device="cpu"):
    preds = torch.cat([model(x.to(device)).argmax(1) for x, _, _ in split.batches(batch_size)])
    return accuracy(preds, split.labels).acc


def reference_run(checkpoint, arch, task, option, lr, epochs, batch_size, weight_decay, seed,
                  device="cpu"):
    """One (option, lr) the way the public code does it; returns (test acc at best val, val)."""
    model = load_model(checkpoint, arch, task.num_classes, task.train.images.shape[1]).to(device)
    model.eval()  # BN statistics frozen, as in the reference protocol
    names = set(tuned_parameter_names(model, option, blocks_for(arch)))
    params = [p for n, p in model.named_parameters() if n in names]  # all keep requires_grad
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        for x, y, _ in task.train.batches(batch_size, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append((_reference_eval(model, task.val, 256, device),
                        _reference_eval(model, task.test, 256, device)))
    best = max(range(epochs), key=lambda i: (history[i][0], -i))
    return history[best][1], history[best][0]


def ours_setup(checkpoint, arch, task, device="cpu"):
    """Ours' one-off work for a task: (model, weights to reset each run to, prefix cache)."""
    model = load_model(checkpoint, arch, task.num_classes, task.train.images.shape[1]).to(device)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, base_state, PrefixCache(model, {"train": task.train, "val": task.val,
                                                  "test": task.test})


def ours_run(model, base_state, cache, blocks, task, option, lr, epochs, batch_size, weight_decay,
             seed):
    """One (option, lr) with our engine from the weights read once; returns the test acc."""
    model.load_state_dict(base_state)
    config = TrainConfig(lr=lr, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed)
    return fit(model, task.train, task.val, task.test, option, config, blocks, cache).test.acc


def count_flops(fn) -> int:
    """Convolution and matmul FLOPs (forward and backward) that `fn()` performs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def work_table(options, checkpoint, arch, task, lr, timed, total_speedup, run_args,
               device="cpu") -> list[str]:
    """Rerun both loops (one lr) counting FLOPs; lines comparing work and time ratios.

    `timed` maps option -> (reference seconds, ours seconds) of the timed pass."""
    model, base_state, cache = ours_setup(checkpoint, arch, task, device)
    lines = [f"{'option':>8} | {'ref GFLOP':>10} {'ours GFLOP':>10} {'work ratio':>10} | "
             f"{'speedup':>7} {'speedup / work ratio':>20}"]
    total_ref = total_ours = 0
    for option in options:
        ref = count_flops(lambda: reference_run(checkpoint, arch, task, option, lr, *run_args,
                                                device=device))
        ours = count_flops(lambda: ours_run(model, base_state, cache, blocks_for(arch), task,
                                            option, lr, *run_args))
        total_ref, total_ours = total_ref + ref, total_ours + ours
        speedup = timed[option][0] / timed[option][1]
        lines.append(f"{option:>8} | {ref / 1e9:10.2f} {ours / 1e9:10.2f} {ref / ours:9.2f}x | "
                     f"{speedup:6.2f}x {speedup / (ref / ours):19.2f}x")
    lines.append(f"{'total':>8} | {total_ref / 1e9:10.2f} {total_ours / 1e9:10.2f} "
                 f"{total_ref / total_ours:9.2f}x | {total_speedup:6.2f}x "
                 f"{total_speedup / (total_ref / total_ours):19.2f}x")
    return lines


def is_convolution(op: str) -> bool:
    """Whether a profiler op name is a convolution kernel, forward or backward
    (aten::mkldnn_convolution, aten::convolution_backward, ...)."""
    return "conv" in op.lower()


def convolution_share(fn) -> tuple[float, float]:
    """(seconds of CPU time, the share of it in convolution ops) of `fn()`, by the self
    times of torch.profiler's ops (nested ops are not counted twice)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if is_convolution(e.key))
    return total / 1e6, conv / total if total else float("nan")


def profile_table(options, checkpoint, arch, task, lr, run_args) -> list[str]:
    """Ours once more per option (one lr) under torch.profiler: where its time goes."""
    model, base_state, cache = ours_setup(checkpoint, arch, task)
    lines = [f"{'option':>8} | {'profiled s':>10} {'in convolutions':>15}"]
    for option in options:
        seconds, share = convolution_share(
            lambda: ours_run(model, base_state, cache, blocks_for(arch), task, option, lr, *run_args))
        lines.append(f"{option:>8} | {seconds:10.2f} {100 * share:14.1f}%")
    return lines


def timing_table(rows, options, setup) -> tuple[list[str], dict, float]:
    """Per-option and total seconds and ratios of the timed pass.

    Returns (lines, {option: (reference s, ours s)}, total speedup); ours' total
    includes its one-off `setup`."""
    lines = [f"{'option':>8} | {'ref s':>7} {'ours s':>7} {'speedup':>8} | {'cpu speedup':>11}"]
    total_ref = total_ours = cpu_ref = cpu_ours = 0.0
    timed = {}
    for option in options:
        r = [row for row in rows if row[0] == option]
        rw, ow = sum(x[2].wall for x in r), sum(x[3].wall for x in r)
        rc, oc = sum(x[2].cpu for x in r), sum(x[3].cpu for x in r)
        total_ref, total_ours, cpu_ref, cpu_ours = total_ref + rw, total_ours + ow, cpu_ref + rc, cpu_ours + oc
        timed[option] = (rw, ow)
        lines.append(f"{option:>8} | {rw:7.1f} {ow:7.1f} {rw / ow:7.2f}x | {rc / oc:10.2f}x")
    total_ours += setup.wall
    cpu_ours += setup.cpu
    lines.append(f"{'total':>8} | {total_ref:7.1f} {total_ours:7.1f} {total_ref / total_ours:7.2f}x | "
                 f"{cpu_ref / cpu_ours:10.2f}x")
    return lines, timed, total_ref / total_ours


def check_input_size(arch: str, size: int) -> None:
    """A ViT takes images of exactly its configured side."""
    vit = VIT_CONFIGS.get(arch)
    if vit is not None and size != vit.image_size:
        raise ConfigError(f"--arch {arch} takes images of {vit.image_size}x{vit.image_size} px; "
                          f"give --size {vit.image_size}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deep.speed", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet26")
    p.add_argument("--size", type=at_least(1), default=28, help="image side in pixels")
    p.add_argument("--channels", type=at_least(1), default=1)
    p.add_argument("--n-train", type=at_least(1), default=1000)
    p.add_argument("--n-val", type=at_least(1), default=100)
    p.add_argument("--n-test", type=at_least(1), default=900)
    p.add_argument("--epochs", type=at_least(1), default=3)
    p.add_argument("--lrs", type=positive_floats, default=[1e-3, 1e-4],
                   help="learning rates, comma-separated (default 1e-3,1e-4)")
    p.add_argument("--threads", type=at_least(1), default=1,
                   help="torch threads for both loops (default 1: on a shared 2-core machine, "
                        "2-thread OpenMP runs stall whenever another process holds a core)")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's malloc defaults (every freed activation unmapped), for both loops")
    p.add_argument("--device", default="cpu",
                   help="where both loops run: cpu (default), cuda, cuda:1, ..., or auto "
                        "(CUDA when this process sees a GPU)")
    p.add_argument("--tolerance", type=nonnegative_float, default=0.5,
                   help="max test-accuracy gap, points")
    p.add_argument("--count-work", action="store_true",
                   help="afterwards, count each loop's convolution/matmul FLOPs (one more pass of "
                        "both loops at the first lr) and print work ratios beside the speedups")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, run ours once more per option (first lr, CPU) under "
                        "torch.profiler and print the share of its time in convolution kernels")
    args = p.parse_args(argv)
    return exit_status(lambda: run(args))


def source_model(source, arch: str) -> torch.nn.Module:
    """The source model both loops start from: 2 epochs on the clean images."""
    with Clock() as c:
        model = pretrain(source, arch, epochs=2, lr=0.05, seed=0, batch_size=64,
                         augment="none", progress=False)
    source_acc = accuracy(torch.cat([model(x).argmax(1) for x, _, _ in source.test.batches(256)]),
                          source.test.labels).acc
    print(f"# source model: 2 epochs of pretraining on 1000 clean images ({c.wall:.0f} s), "
          f"source test accuracy {100 * source_acc:.1f}%")
    return model


def time_cell(checkpoint, args, task, option: str, lr: float, run_args: tuple, ours_state):
    """One (option, lr) run by each loop, timed, and its line of the table; returns the two
    clocks and their test-accuracy gap in points."""
    ours_model, base_state, cache, blocks = ours_state
    with Clock() as ref:
        ref_acc, _ = reference_run(checkpoint, args.arch, task, option, lr, *run_args,
                                   device=args.device)
    with Clock() as ours:
        ours_acc = ours_run(ours_model, base_state, cache, blocks, task, option, lr, *run_args)
    print(f"{option:>8} {lr:>7g} | {ref.wall:7.2f} {ours.wall:7.2f} | "
          f"{100 * ref_acc:7.2f} {100 * ours_acc:8.2f}", flush=True)
    return ref, ours, abs(ours_acc - ref_acc) * 100


def run(args: argparse.Namespace) -> int:
    # every bad value fails here, before the source model is trained; "auto" becomes the
    # device it means (both loops move their models with `.to(args.device)`)
    args.device = resolve_device(args.device)
    blocks = blocks_for(args.arch)
    options = [*blocks, ALL]
    check_input_size(args.arch, args.size)
    torch.set_num_threads(args.threads)
    malloc = "glibc defaults" if args.default_malloc else (
        "freed memory kept (deep.allocator)" if keep_freed_memory() else "platform defaults")
    lrs = args.lrs
    defaults = TrainConfig(lr=lrs[0], epochs=args.epochs)  # both loops: the engine's defaults
    batch_size, weight_decay, seed = defaults.batch_size, defaults.weight_decay, defaults.seed

    print(f"# {args.arch}, {args.channels}x{args.size}x{args.size} images, train/val/test = "
          f"{args.n_train}/{args.n_val}/{args.n_test}, {args.epochs} epochs, lrs {lrs}, "
          f"batch {batch_size}, device {args.device}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, "
          f"malloc for both loops: {malloc}")
    source, task = make_data(args.size, args.channels, 1000, args.n_train, args.n_val, args.n_test)
    model = source_model(source, args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "source.pt"
        save_checkpoint(checkpoint, model, args.arch, NUM_CLASSES, args.channels)

        # Ours: weights read once, one cache for the task, every run from the same state.
        with Clock() as setup:
            ours_model, base_state, cache = ours_setup(checkpoint, args.arch, task, args.device)
        run_args = (args.epochs, batch_size, weight_decay, seed)
        rows, worst_gap = [], 0.0
        print(f"{'option':>8} {'lr':>7} | {'ref s':>7} {'ours s':>7} | {'ref acc':>7} {'ours acc':>8}")
        for option in options:
            for lr in lrs:
                ref, ours, gap = time_cell(checkpoint, args, task, option, lr, run_args,
                                           (ours_model, base_state, cache, blocks))
                worst_gap = max(worst_gap, gap)
                rows.append((option, lr, ref, ours))

        print(f"\n# ours includes filling the prefix cache ({cache.seconds:.2f} s, counted in the "
              f"run that needed it) and {setup.wall:.2f} s of setup (added to the total)")
        lines, timed, speedup = timing_table(rows, options, setup)
        print("\n".join(lines))
        if args.count_work:
            print(f"\n# work: convolution and matmul FLOPs of each loop (torch.utils.flop_counter, "
                  f"lr {lrs[0]:g}; both lrs do the same work), against the measured speedups")
            for line in work_table(options, checkpoint, args.arch, task, lrs[0], timed, speedup,
                                   run_args, args.device):
                print(line, flush=True)
        if args.profile:
            print(f"\n# profile: ours per option (lr {lrs[0]:g}, CPU), CPU time by op self "
                  f"times (torch.profiler; slower than the timed pass), share in convolutions")
            for line in profile_table(options, checkpoint, args.arch, task, lrs[0], run_args):
                print(line, flush=True)
    ok = worst_gap <= args.tolerance
    print(f"accuracy check: largest test-accuracy gap {worst_gap:.2f} points "
          f"({'OK' if ok else 'FAILED'}, tolerance {args.tolerance})")
    print(f"total speedup: {speedup:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
