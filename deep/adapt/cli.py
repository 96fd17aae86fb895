"""`python -m deep adapt`: the subcommand (HELP, add_arguments, run)."""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import ConfigError
from ..flags import add_trust_checkpoint
from ..models import architecture_names
from ..protocol import data_option
from .protocol import AdaptProtocol, load_adapt_protocol

HELP = "online unsupervised adaptation (MEMO, TENT) restricted to blocks, into a results CSV"

QUICK_IMAGES = {"memo": 200, "tent": 600}   # TENT: three batches of 200, so updates show
QUICK_BLOCKS = {"memo": ["none", "first", "last"], "tent": ["none", "first", "all"]}
# One torch thread unless --threads says otherwise: MEMO's per-image batches (32 copies of
# one small image) are too small to split, and on a busy machine a second OpenMP thread
# spins waiting for a core (see THREADS_HELP; deep.pretrain does the same for its model).
DEFAULT_THREADS = 1
THREADS_HELP = ("torch threads (default 1; 0 = torch's own default, one per core). One is "
                "faster for MEMO on CPU: `first` on 30 fmnist-c images took 2.3 s with 1 "
                "thread and 7.4 s with 2 on a 2-core machine (far worse under load)")


def quick_help() -> str:
    parts = [f"{m.upper()} on the first {n} images, blocks {','.join(QUICK_BLOCKS[m])}"
             for m, n in QUICK_IMAGES.items()]
    return ("smoke test: the protocol's first shift and seed; " + "; ".join(parts)
            + "; MEMO once per learning rate of the protocol (fmnist-c: 0.005 and 0.0005, "
            "so 6 MEMO streams; --lr picks one). About a minute with one thread")


def _list(kind=str):
    def parse(text: str):
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, "
                                             f"got {text!r}") from None
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", required=True,
                   help="a benchmark with a protocol in deep/configs/adapt/ (fmnist-c, cifar10c)")
    p.add_argument("--out", required=True, help="results CSV (created or resumed)")
    p.add_argument("--method", type=_list(), help="memo, tent or memo,tent (default: the protocol's)")
    p.add_argument("--blocks", type=_list(), help="block options, e.g. none,first,first+second,"
                   "last,all ('none' = no adaptation, the baseline; default: the protocol's)")
    p.add_argument("--shifts", type=_list())
    p.add_argument("--seeds", type=_list(int))
    p.add_argument("--images", type=int, help="stream length: the first N >= 0 images of the "
                   "seeded order of the test split (0 = all; TENT needs N != 1)")
    p.add_argument("--test-per-class", type=int, help="size of the test split the stream is drawn from")
    p.add_argument("--episodic", action="store_true",
                   help="reset the adapted parameters after each image (MEMO) or batch (TENT)")
    p.add_argument("--lr", type=_list(float), help="learning rate(s) of the chosen method(s), "
                   "e.g. 0.005 or 0.005,0.0005 (one stream per lr)")
    p.add_argument("--copies", type=int, help="MEMO: augmented copies per image (32)")
    p.add_argument("--prior-strength", type=float,
                   help="MEMO: BN prior adaptation strength N (MEMO's ImageNet code: 16); -1 = off")
    p.add_argument("--batch-size", type=int, help="TENT: images per batch (200)")
    p.add_argument("--batch-stats", choices=["blocks", "all"],
                   help="TENT: BatchNorm layers that use batch statistics")
    p.add_argument("--arch", help="architecture (default: the protocol's; a --checkpoint of "
                   f"ours must hold it), one of {', '.join(architecture_names())}")
    p.add_argument("--checkpoint", help="source model (default: the benchmark's own)")
    add_trust_checkpoint(p)
    p.add_argument("--data-dir")
    p.add_argument("--data", action="append", type=data_option, metavar="KEY=VALUE",
                   help="loader option overriding the protocol's [data] table (repeatable)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=THREADS_HELP)
    p.add_argument("--report", action="store_true",
                   help="also write table.md and the plot next to the CSV (<out>_report/)")
    p.add_argument("--quick", action="store_true", help=quick_help())
    p.add_argument("--no-progress", action="store_true")


def _method_table(protocol: AdaptProtocol, method: str, args) -> dict:
    table = dict(getattr(protocol, method))
    overrides = {"lr": args.lr, "blocks": args.blocks, "images": args.images}
    if method == "memo":
        overrides |= {"copies": args.copies, "prior_strength": args.prior_strength}
    else:
        overrides |= {"batch_size": args.batch_size, "batch_stats": args.batch_stats}
    if args.quick:
        table["blocks"] = args.blocks or QUICK_BLOCKS[method]
        images = args.images if args.images is not None else table.get("images", protocol.images)
        overrides["images"] = min(images or QUICK_IMAGES[method], QUICK_IMAGES[method])
    return table | {k: v for k, v in overrides.items() if v is not None}


def protocol_from_args(args) -> AdaptProtocol:
    protocol = load_adapt_protocol(args.benchmark)
    if args.quick:
        protocol = protocol.replace(shifts=protocol.shifts[:1], seeds=protocol.seeds[:1])
    protocol = protocol.replace(
        arch=args.arch, methods=args.method, shifts=args.shifts, seeds=args.seeds,
        test_per_class=args.test_per_class, checkpoint=args.checkpoint,
        data={**protocol.data, **dict(args.data)} if args.data else None)
    tables = {m: _method_table(protocol, m, args) for m in ("memo", "tent")}
    return dataclasses.replace(protocol, **tables)  # re-validates the method settings


def run(args) -> int:
    import torch

    from .results import write_adapt_report
    from .runner import run_adaptation

    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = protocol_from_args(args)
    summary = run_adaptation(protocol, args.out, data_dir=args.data_dir, episodic=args.episodic,
                             progress=not args.no_progress, trust_checkpoint=args.trust_checkpoint)
    print(f"ran {summary.ran} streams, skipped {summary.skipped} already finished, in "
          f"{summary.seconds:.1f} s; results: {summary.out}")
    if args.report:
        for path in write_adapt_report(args.out):
            print(path)
    return 0
