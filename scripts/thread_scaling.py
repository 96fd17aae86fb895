"""Seconds per forward+backward of one batch with 1, 2, ... torch threads, for one
architecture at one image size (docs/troubleshooting.md: when a second thread pays).

    python scripts/thread_scaling.py [--arch resnet50] [--size 224] [--batch 8] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import time

import torch

from deep.flags import comma_list
from deep.models import build_model
from deep.models.staged import guard_channels_last


def seconds_per_step(arch: str, size: int, batch: int, threads: int, repeats: int = 3) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(arch, 10).to(memory_format=torch.channels_last)
    # as the engine does: oneDNN's AVX2 kernel for a strided 1x1 convolution with a channel
    # count off its SIMD width corrupts the heap on channels-last inputs (deep.models.staged)
    guard_channels_last(model)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()  # warm-up: oneDNN picks its kernels
    start = time.perf_counter()
    for _ in range(repeats):
        model(x).sum().backward()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=comma_list(int), default=[1, 2])
    args = p.parse_args(argv)
    for threads in args.threads:
        s = seconds_per_step(args.arch, args.size, args.batch, threads)
        print(f"{args.arch}, {args.batch} images of {args.size} px, {threads} thread(s): "
              f"{s:.2f} s per forward+backward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
