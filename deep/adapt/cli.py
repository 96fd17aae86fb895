"""`python -m deep adapt`: the subcommand (HELP, add_arguments, run).

The methods, their flags (`deep.flags.add_flags` on the fields each row of
`core.METHODS` names: type, help, choices and default from the config dataclass) and
their --quick streams come from the method table.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import ConfigError
from ..flags import (PROTOCOL_FLAGS, add_flags, add_threads, add_trust_checkpoint,
                     check_trust_has_a_file, comma_list, flag_values, set_threads)
from ..models import architecture_names
from ..protocol import data_option
from .core import METHODS
from .protocol import AdaptProtocol, load_adapt_protocol
from .results import write_adapt_report
from .runner import run_adaptation

HELP = (f"online unsupervised adaptation ({', '.join(s.label for s in METHODS.values())}) "
        "restricted to blocks, into a results CSV")
# One torch thread unless --threads says otherwise: MEMO's per-image batches (32 copies of
# one small image) are too small to split, and on a busy machine a second OpenMP thread
# spins waiting for a core (see THREADS_HELP; deep.pretrain does the same for its model).
DEFAULT_THREADS = 1
THREADS_HELP = ("torch threads (default 1; 0 = torch's own default, one per core). MEMO's "
                "steps are small: a second thread gives about 1.25x on an idle machine and "
                "costs several times that when another process holds a core "
                "(docs/online-adaptation.md, Cost)")


def quick_help() -> str:
    parts = [f"{s.label} on the first {s.quick_images} images, blocks {','.join(s.quick_blocks)}"
             for s in METHODS.values()]
    return ("smoke test: the protocol's first shift and seed; " + "; ".join(parts)
            + "; MEMO once per learning rate of the protocol (fmnist-c: 0.005 and 0.0005, "
            "so 6 MEMO streams; --lr sets the learning rate of every method that runs). About a "
            "minute with one thread")


def _one_image_at_a_time(spec) -> bool:
    return spec.batch_size(spec.config()) == 1


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field that a row of the method table names in `flags`."""
    owner: dict[str, str] = {}
    for spec in METHODS.values():
        taken = [f for f in spec.flags if f in owner]
        if taken:
            raise ConfigError(f"method {spec.name!r} flags field(s) {taken} that "
                             f"{sorted({owner[f] for f in taken})} flag already: one flag would "
                             "set both; give the field another name")
        fields = {f.name for f in dataclasses.fields(spec.config)}
        missing = set(spec.flags) - fields
        if missing:
            raise ConfigError(f"method {spec.name!r} flags {sorted(missing)}, which are not "
                             f"fields of {spec.config.__name__}")
        add_flags(p, spec.config, skip=fields - set(spec.flags))
        owner |= {f: spec.name for f in spec.flags}


def add_arguments(p: argparse.ArgumentParser) -> None:
    names = list(METHODS)
    batched = [s.label for s in METHODS.values() if not _one_image_at_a_time(s)]
    units = [f"{'image' if _one_image_at_a_time(s) else 'batch'} ({s.label})"
             for s in METHODS.values()]
    p.add_argument("--benchmark", required=True,
                   help="a benchmark with a protocol in deep/configs/adapt/ (fmnist-c, cifar10c)")
    p.add_argument("--out", required=True, help="results CSV (created or resumed)")
    # "--copies (built-in default: 32)" would read as what runs; the protocol's value does
    protocol = p.add_argument_group("the protocol's settings", PROTOCOL_FLAGS.format(
        where="deep/configs/adapt/BENCHMARK.toml", name="adapt/BENCHMARK"))
    protocol.add_argument("--method", type=comma_list(),
                          help=f"{', '.join(names)} or {','.join(names)}")
    protocol.add_argument("--blocks", type=comma_list(),
                          help="block options, e.g. none,first,first+second,last,all "
                          "('none' = no adaptation, the baseline)")
    protocol.add_argument("--shifts", type=comma_list(), help="comma-separated shifts to run")
    protocol.add_argument("--seeds", type=comma_list(int),
                          help="comma-separated seeds (a stream order and test split each)")
    protocol.add_argument("--images", type=int,
                          help="stream length: the first N >= 0 images of the seeded order of "
                          "the test split (0 = all"
                          + (f"; {' and '.join(batched)} need{'s' * (len(batched) == 1)} N != 1"
                             if batched else "") + ")")
    protocol.add_argument("--test-per-class", type=int,
                          help="size of the test split the stream is drawn from")
    p.add_argument("--episodic", action="store_true",
                   help=f"reset the adapted parameters after each {' or '.join(units)}")
    protocol.add_argument("--lr", type=comma_list(float),
                          help="learning rate(s) of the chosen method(s), e.g. 0.005 or "
                          "0.005,0.0005 (one stream per lr)")
    add_method_flags(protocol)  # --copies, --prior-strength (MEMO), --batch-size, --batch-stats (TENT)
    p.add_argument("--arch", help="architecture (default: the protocol's; a --checkpoint of "
                   f"ours must hold it), one of {', '.join(architecture_names())}")
    p.add_argument("--checkpoint", help="source model (default: the benchmark's own)")
    add_trust_checkpoint(p)
    p.add_argument("--data-dir", help="where the benchmark's data lives (default: its own "
                   "location, e.g. $FASHION_MNIST_DIR for fmnist-c)")
    p.add_argument("--data", action="append", type=data_option, metavar="KEY=VALUE",
                   help="loader option overriding the protocol's [data] table (repeatable)")
    add_threads(p, DEFAULT_THREADS, THREADS_HELP)
    p.add_argument("--report", action="store_true",
                   help="also write table.md and the plot next to the CSV (<out>_report/)")
    p.add_argument("--quick", action="store_true", help=quick_help())
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def _method_table(protocol: AdaptProtocol, method: str, args) -> dict:
    spec = METHODS[method]
    table = protocol.settings_of(method)
    overrides = {"lr": args.lr, "blocks": args.blocks, "images": args.images}
    overrides |= {k: v for k, v in flag_values(args, spec.config).items() if k in spec.flags}
    if args.quick:
        table["blocks"] = args.blocks or list(spec.quick_blocks)
        images = args.images if args.images is not None else table.get("images", protocol.images)
        overrides["images"] = min(images or spec.quick_images, spec.quick_images)
    return table | {k: v for k, v in overrides.items() if v is not None}


def check_flags_of_methods_run(protocol: AdaptProtocol, args) -> None:
    """A method's own flag (--copies, --batch-size, ...) given on the command line for a
    method that does not run would change nothing and be recorded nowhere: an error.
    The flags default to None, so only what the user typed counts, never the protocol's
    tables (which hold every method's settings, run or not)."""
    for method, spec in METHODS.items():
        if method in protocol.methods:
            continue
        given = [f for f in spec.flags if f in flag_values(args, spec.config)]
        if given:
            flags = " ".join("--" + f.replace("_", "-") for f in given)
            raise ConfigError(
                f"{flags} {'is an option' if len(given) == 1 else 'are options'} of "
                f"{spec.label}, which does not run here (methods: {','.join(protocol.methods)}): "
                f"add {method} to --method (e.g. --method {','.join([*protocol.methods, method])}) "
                f"or drop {flags}")


def protocol_from_args(args) -> AdaptProtocol:
    protocol = load_adapt_protocol(args.benchmark)
    if args.quick:
        protocol = protocol.replace(shifts=protocol.shifts[:1], seeds=protocol.seeds[:1])
    protocol = protocol.replace(
        arch=args.arch, methods=args.method, shifts=args.shifts, seeds=args.seeds,
        test_per_class=args.test_per_class, checkpoint=args.checkpoint,
        data={**protocol.data, **dict(args.data)} if args.data else None)
    check_flags_of_methods_run(protocol, args)
    # The flags reach the methods that run; the others keep their tables.
    tables = {m: _method_table(protocol, m, args) if m in protocol.methods
              else protocol.settings_of(m) for m in METHODS}
    return dataclasses.replace(protocol, method_settings=tables)  # re-validates the settings


def run(args) -> int:
    set_threads(args.threads)
    protocol = protocol_from_args(args)
    check_trust_has_a_file(args.trust_checkpoint, protocol.checkpoint, "--checkpoint")
    summary = run_adaptation(protocol, args.out, data_dir=args.data_dir, episodic=args.episodic,
                             progress=not args.no_progress, trust_checkpoint=args.trust_checkpoint)
    print(f"ran {summary.ran} streams, skipped {summary.skipped} already finished, in "
          f"{summary.seconds:.1f} s; results: {summary.out}")
    if args.report:
        for path in write_adapt_report(args.out):
            print(path)
    return 0
