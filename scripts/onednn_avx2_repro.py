"""oneDNN AVX2 heap corruption in a 1x1 strided conv's weight gradient (torch 2.13.0 CPU).

    ONEDNN_MAX_CPU_ISA=AVX2 python scripts/onednn_avx2_repro.py   # aborts: "free(): invalid next size"
    python scripts/onednn_avx2_repro.py                          # on an AVX-512 CPU: completes

See docs/troubleshooting.md; `python -m deep.onednn_check` runs the shape grid.
"""
import torch
from torch import nn

torch.set_num_threads(1)
conv = nn.Conv2d(4, 8, kernel_size=1, stride=2, bias=False)
for _ in range(50):
    x = torch.randn(64, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    conv(x).sum().backward()
print("completed without a crash")
