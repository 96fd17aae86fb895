"""Command line: `python -m deep {sweep,report,pretrain,protocols} ...`.

Each subcommand is a pair (add_arguments, run) in COMMANDS; `run` parses nothing
and calls one library function. Modules listed in MODULE_COMMANDS add their own
subcommand when they exist (they define HELP, add_arguments(parser), run(args)).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from .allocator import keep_freed_memory

MODULE_COMMANDS = {"bench": "deep.bench"}


def _list(kind=str):
    """Values given as `a,b,c` and/or as several arguments."""
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, "
                                             f"got {text!r}") from None
    return parse


def _data_option(text: str):
    """KEY=VALUE, VALUE read as a TOML literal (1, 0.5, true, "x", [1, 2]) or else a string."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _flatten(values):
    return None if values is None else [v for group in values for v in group]


# --- sweep ------------------------------------------------------------------------

def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", required=True, help="registry name, e.g. synthetic, cifar10c")
    p.add_argument("--out", required=True, help="results CSV (created or resumed)")
    p.add_argument("--data-dir", help="where the benchmark's data lives")
    p.add_argument("--shifts", nargs="+", type=_list(), help="default: the protocol's")
    p.add_argument("--methods", nargs="+", type=_list(), help="default: the protocol's")
    p.add_argument("--lrs", nargs="+", type=_list(float), help="learning-rate grid")
    p.add_argument("--seeds", nargs="+", type=_list(int))
    p.add_argument("--epochs", type=int)
    p.add_argument("--n-target", type=int, help="labelled target training images")
    p.add_argument("--val-per-class", type=int)
    p.add_argument("--test-per-class", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--select", choices=["val_acc", "worst_group_val_acc"])
    p.add_argument("--arch", help="architecture (default: the protocol's), e.g. clip-vit-tiny "
                   "for a smoke test of a CLIP protocol")
    p.add_argument("--checkpoint", help="source model: our checkpoint, a torchvision ResNet-50 "
                   "state dict, or 'none' (random init, smoke tests only)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--cache-mb", type=float, default=2048,
                   help="memory budget of the frozen-prefix activation cache per process")
    p.add_argument("--data", action="append", type=_data_option, metavar="KEY=VALUE",
                   help="loader option overriding the protocol's [data] table (repeatable), "
                        "e.g. --data num_workers=8")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: first shift and seed, middle lr, <= 2 epochs")
    p.add_argument("--no-progress", action="store_true")


def run_sweep(args) -> int:
    from .protocol import load_protocol
    from .sweep import quick, run_sweep as sweep

    protocol = load_protocol(args.benchmark)
    if args.quick:
        protocol = quick(protocol)
    protocol = protocol.replace(
        shifts=_flatten(args.shifts), methods=_flatten(args.methods), lrs=_flatten(args.lrs),
        seeds=_flatten(args.seeds), epochs=args.epochs, n_target=args.n_target,
        val_per_class=args.val_per_class, test_per_class=args.test_per_class,
        batch_size=args.batch_size, weight_decay=args.weight_decay, select=args.select,
        arch=args.arch,
        data={**protocol.data, **dict(args.data)} if args.data else None)
    summary = sweep(protocol, args.out, checkpoint=args.checkpoint, data_dir=args.data_dir,
                    workers=args.workers, cache_mb=args.cache_mb, progress=not args.no_progress,
                    device=args.device)
    print(f"ran {summary.ran} cells ({summary.diverged} diverged), skipped {summary.skipped} "
          f"already finished, in {summary.seconds:.1f} s; results: {summary.out}")
    return 0


# --- report -----------------------------------------------------------------------

def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results CSV of a sweep")
    p.add_argument("--out", help="output folder (default: <results>_report/)")


def run_report(args) -> int:
    from .report import write_report

    for path in write_report(args.results, args.out):
        print(path)
    return 0


# --- pretrain ---------------------------------------------------------------------

def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", required=True)
    p.add_argument("--out", required=True, help="checkpoint path; the manifest goes to <out>.json")
    p.add_argument("--data-dir")
    p.add_argument("--arch", help="default: the benchmark protocol's")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1, help="SGD (Nesterov) peak lr, cosine schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--augment", default="crop-flip", choices=["crop-flip", "crop", "none"])
    p.add_argument("--data", action="append", type=_data_option, metavar="KEY=VALUE",
                   help="source-loader option overriding the protocol's [data] table (repeatable)")
    p.add_argument("--init", help="start from these weights (ours or a torchvision state dict, "
                   "e.g. ImageNet ResNet-50); a classifier of another size is re-initialised")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (1.6x on long CPU runs, ~40 s to compile)")


def run_pretrain(args) -> int:
    from .pretrain import pretrain_to_file

    command = "python -m deep " + " ".join(shlex.quote(a) for a in args.argv)
    manifest = pretrain_to_file(args.benchmark, args.out, args.arch, args.epochs, args.lr,
                                args.seed, args.data_dir, args.batch_size, args.weight_decay,
                                args.augment, command=command, data=dict(args.data or []),
                                init=args.init, compile=args.compile)
    print(f"source test accuracy {100 * manifest['source_test_acc']:.2f}% "
          f"({manifest['seconds']:.0f} s); wrote {args.out} and its manifest")
    return 0


# --- protocols --------------------------------------------------------------------

def add_protocols_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="show these in full (default: list all)")


def run_protocols(args) -> int:
    from .protocol import available_protocols, load_protocol

    for name in args.names or available_protocols():
        pr = load_protocol(name)
        print(f"{name}: {pr.arch}, {len(pr.shifts)} shift(s), {len(pr.methods)} methods, "
              f"{len(pr.lrs)} lrs, {len(pr.seeds)} seed(s), n_target={pr.n_target}, "
              f"epochs={pr.epochs}, select={pr.select}")
        if args.names:
            print(f"  shifts: {', '.join(pr.shifts)}\n  methods: {', '.join(pr.methods)}\n"
                  f"  lrs: {pr.lrs}\n  seeds: {pr.seeds}\n  data: {pr.data}")
            print("  " + pr.notes.replace("\n", "\n  "))
    return 0


COMMANDS = {
    "sweep": ("run a grid of (shift, method, lr, seed) cells into a results CSV",
              add_sweep_arguments, run_sweep),
    "report": ("markdown table and relative-accuracy plot from a results CSV",
               add_report_arguments, run_report),
    "pretrain": ("train a benchmark's source model and write a checkpoint + manifest",
                 add_pretrain_arguments, run_pretrain),
    "protocols": ("list the benchmark protocols", add_protocols_arguments, run_protocols),
}


def _module_commands() -> dict:
    found = {}
    for name, module_name in MODULE_COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        found[name] = (module.HELP, module.add_arguments, module.run)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep",
                                     description="surgical fine-tuning of deep networks")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {**COMMANDS, **_module_commands()}
    for name, (help_text, add_arguments, _) in commands.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command, for manifests
    keep_freed_memory()  # see deep.allocator: fewer page faults per training step
    try:
        return commands[args.command][2](args) or 0
    except (ValueError, OSError) as err:  # DataError and CheckpointError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
