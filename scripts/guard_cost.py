"""What the engine's guard of functional calls (`deep.models.staged.plain_strided_calls`, a
torch function mode around each training forward on the CPU) costs per training step:
steps timed with and without it, alternating, in one run (docs/performance.md).

    python scripts/guard_cost.py [--arch resnet26] [--channels 1] [--size 28] [--batch 64]
                                 [--steps 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from deep.models import build_model
from deep.models.staged import guard_channels_last, plain_strided_calls


class _CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet26")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="training steps per timing")
    p.add_argument("--rounds", type=int, default=5, help="timings with and without the mode")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args.arch, 10, args.channels).to(memory_format=torch.channels_last)
    guard_channels_last(model)  # the module hooks, on in both timings as in the engine
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as the engine
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))

    def step(forward_context):
        """As `deep.train.TrainingRun.train_epoch`: the context around the forward only."""
        with forward_context:
            logits = model(x)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y).backward()
        optimizer.step()

    counter = _CountCalls()
    step(counter)  # also the warm-up: oneDNN picks its kernels
    contexts = {"without": contextlib.nullcontext, "with": lambda: plain_strided_calls(model)}
    seconds = {"without": [], "with": []}
    for _ in range(args.rounds):  # alternating, so a busy spell hits both alike
        for name, context in contexts.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(context())
            seconds[name].append((time.perf_counter() - start) / args.steps)
    without, with_mode = (statistics.median(seconds[k]) for k in ("without", "with"))
    print(f"{args.arch}, {args.batch} images of {args.channels}x{args.size}x{args.size}, "
          f"{torch.get_num_threads()} thread(s): {counter.calls} torch calls per forward")
    print(f"median per step: {1e3 * without:.2f} ms without the mode, "
          f"{1e3 * with_mode:.2f} ms with it; ratio {with_mode / without:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
