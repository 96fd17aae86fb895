"""What one image costs a CLIP ViT: forward FLOPs, inference and training seconds.

    python -m deep.vit_cost                          # ViT-B/16 on the CPU, 1 thread (docs/vit-wilds.md)
    python -m deep.vit_cost --device cuda [--amp]    # on a GPU (make gpu-check runs both)

The numbers behind docs/vit-wilds.md's cost of the full WILDS protocols: per image,
multiply by the images a protocol evaluates and trains on. FLOPs count a multiply-add
as two (`forward_flops`, checked against torch.utils.flop_counter). `--arch clip-vit-tiny`
is for smoke tests.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .errors import exit_status
from .flags import add_device, at_least
from .models import build_model
from .models.vit import CONFIGS
from .prefix_cache import autocast
from .train import resolve_device


def forward_flops(arch: str, num_classes: int = 2) -> int:
    """FLOPs of one image's forward pass, in closed form (a multiply-add counts two): the
    patch embedding, per block the qkv, attention (q k^T and its product with v), output
    and MLP matmuls over every token, then `proj` and the head on the class token.
    On the CPU torch's flop counter sees all but the attention matmuls (its CPU kernel of
    `scaled_dot_product_attention` is not among the counted ones: 4 % of ViT-B/16's
    forward); the CUDA kernels are counted."""
    c = CONFIGS[arch]
    n, d = c.tokens, c.width
    embedding = 2 * (n - 1) * d * 3 * c.patch_size ** 2  # every token but the class token
    linear = 2 * n * d * (3 * d + d + 2 * c.mlp_width)  # per block: qkv, out_proj, c_fc, c_proj
    head = 2 * d * c.output_dim + 2 * c.output_dim * num_classes
    return embedding + c.layers * linear + attention_flops(arch) + head


def attention_flops(arch: str) -> int:
    """The attention matmuls of one forward pass: per block and head, q k^T and (.) v,
    each tokens x tokens x head width multiply-adds."""
    c = CONFIGS[arch]
    return c.layers * c.heads * 2 * (2 * c.tokens ** 2 * (c.width // c.heads))


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, device: str, amp: bool, batch: int, repeats: int) -> dict:
    """{"gflops": forward GFLOPs per image (`forward_flops`), "counted_gflops": what torch's
    flop counter sees, "forward_s", "train_s": seconds per image (the best of `repeats`
    timed batches after one warm-up batch)."""
    torch.manual_seed(0)
    model = build_model(arch, 2).to(device).eval()
    size = CONFIGS[arch].image_size
    x = torch.randn(batch, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1])
    counted = counter.get_total_flops() / 1e9

    def best(step) -> float:
        step()  # warm-up: kernel selection, allocator
        times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append((time.perf_counter() - t0) / batch)
        return min(times)

    def forward():
        with torch.inference_mode(), autocast(device, amp):
            model(x)

    def train_step():  # every parameter tuned: the upper bound of a training step
        model.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = model(x).float().sum()
        loss.backward()

    forward_s = best(forward)
    model.train()
    return {"gflops": forward_flops(arch) / 1e9, "counted_gflops": counted,
            "forward_s": forward_s, "train_s": best(train_step)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deep.vit_cost", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="clip-vit-b16", choices=sorted(CONFIGS))
    add_device(p)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only, as in sweeps)")
    p.add_argument("--batch", type=at_least(1), default=8, help="images per timed batch")
    p.add_argument("--repeats", type=at_least(1), default=2,
                   help="timed batches (the best counts)")
    p.add_argument("--threads", type=at_least(1), default=1,
                   help="torch CPU threads (default 1, as deep.speed: on a shared machine "
                        "multi-thread timings stall whenever another process holds a core)")
    args = p.parse_args(argv)
    return exit_status(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    amp = args.amp and device.startswith("cuda")
    shown_amp = "on" if amp else ("off (--amp acts on CUDA only)" if args.amp else "off")
    r = measure(args.arch, device, amp, args.batch, args.repeats)
    print(f"# {args.arch}, device {device}, amp {shown_amp}, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    missed = r["gflops"] - r["counted_gflops"]
    print(f"forward FLOPs per image: {r['gflops']:.4g} G (closed form; torch's flop counter "
          f"sees {r['counted_gflops']:.4g} G" + (f": {missed:.3g} G of attention matmuls in a "
                                                 "kernel it does not count)" if missed > 0
                                                 else ")"))
    print(f"forward (inference): {r['forward_s']:.4g} s/image, "
          f"{r['gflops'] / r['forward_s']:.4g} GFLOP/s")
    print(f"forward+backward, all parameters: {r['train_s']:.4g} s/image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
