"""Which convolution shapes oneDNN's kernels corrupt memory on, and that the guard avoids them.

    python -m deep.onednn_check                 # the AVX2 grid, raw and guarded
    python -m deep.onednn_check --isa DEFAULT   # this CPU's own kernels

Each shape runs in its own subprocess (a corrupted heap must not take this one down) under
`ONEDNN_MAX_CPU_ISA=<isa>` and `MALLOC_CHECK_=3` (glibc before 2.34 aborts at the first
inconsistency it sees; later ones ignore it unless libc_malloc_debug.so is preloaded), 50
weight-gradient steps of a bias-free 1 x 1 convolution on a channels-last batch of
64 x C x 16 x 16. "raw" feeds the channels-last input straight to the convolution;
"guarded" goes through `deep.models.staged.guard_channels_last`, as the engine does. The
kernel column is what oneDNN reports for the weight gradient (`ONEDNN_VERBOSE=1`).
A heap corruption is not always detected, so "ok" on one run is evidence, not proof; the
guard therefore excludes a wider set of shapes than the ones seen to crash.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

_PROBE = """
import sys, torch
from torch import nn
from deep.models.staged import guard_channels_last
torch.set_num_threads(1)
cin, cout, stride, guarded = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
conv = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)
if guarded:
    guard_channels_last(conv)
for _ in range(50):
    conv(torch.randn(64, cin, 16, 16).contiguous(memory_format=torch.channels_last)).sum().backward()
print("ok")
"""

SHAPES = [(cin, 8, stride) for stride in (1, 2, 3) for cin in (2, 3, 4, 6, 7, 8, 12, 16)]


def probe(cin: int, cout: int, stride: int, guarded: bool, isa: str) -> tuple[str, str]:
    """(outcome, oneDNN weight-gradient kernel) of one shape in a fresh process."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "MALLOC_CHECK_": "3", "ONEDNN_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(cin), str(cout), str(stride),
                           "1" if guarded else "0"], env=env, capture_output=True, text=True,
                          timeout=300)
    kernel = next((line.split(",")[6] for line in done.stdout.splitlines()
                   if ",backward_weights," in line and ",exec," in line), "?")
    if done.returncode == 0 and done.stdout.rstrip().endswith("ok"):
        return "ok", kernel
    lines = (done.stderr or "").strip().splitlines()
    reason = next((line for line in lines if "free" in line or "corrupt" in line),
                  lines[-1] if lines else "")
    return f"CRASH rc={done.returncode} {reason.strip()[:40]}", kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep.onednn_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA value (default AVX2)")
    args = parser.parse_args(argv)
    print(f"torch {__import__('torch').__version__}, ONEDNN_MAX_CPU_ISA={args.isa}")
    print(f"{'in':>3} {'out':>3} {'stride':>6}  {'kernel (raw)':<18} {'raw':<44} guarded")
    crashes_guarded = 0
    for cin, cout, stride in SHAPES:
        raw, kernel = probe(cin, cout, stride, False, args.isa)
        guarded, _ = probe(cin, cout, stride, True, args.isa)
        crashes_guarded += guarded != "ok"
        print(f"{cin:>3} {cout:>3} {stride:>6}  {kernel:<18} {raw:<44} {guarded}")
    print(f"guarded crashes: {crashes_guarded}")
    return 1 if crashes_guarded else 0


if __name__ == "__main__":
    sys.exit(main())
