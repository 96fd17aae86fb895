"""Command line: `python -m deep {sweep,report,pretrain,protocols} ...`.

Each subcommand is a pair (add_arguments, run) in COMMANDS; `run` parses nothing
and calls one library function. Modules listed in MODULE_COMMANDS add their own
subcommand when they exist (they define HELP, add_arguments(parser), run(args)).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shlex
import sys

from .adapt.protocol import available as adapt_protocols, load_adapt_protocol
from .allocator import keep_freed_memory
from .data import get_benchmark
from .errors import ConfigError, exit_status
from .flags import (PROTOCOL_FLAGS, add_device, add_flags, add_run_options, add_threads,
                    add_trust_checkpoint, check_trust_has_a_file, comma_list, flag_values,
                    set_threads)
from .models import architecture_names
from .pretrain import PretrainConfig, pretrain_to_file
from .protocol import (Protocol, TargetData, Tuning, available_protocols, data_option,
                       engine_default, load_protocol)
from .ray_backend import add_backend_arguments, executor_from_args
from .report import write_report
from .sweep import DEFAULT_WORKERS, quick, run_sweep
from .train import TrainConfig

MODULE_COMMANDS = {"bench": "deep.bench", "adapt": "deep.adapt"}


def _command(args) -> str:
    """The exact command line, for manifests."""
    return "python -m deep " + " ".join(shlex.quote(a) for a in args.argv)


# --- sweep ------------------------------------------------------------------------

def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", required=True, help="registry name, e.g. synthetic, cifar10c")
    p.add_argument("--out", required=True, help="results CSV (created or resumed)")
    p.add_argument("--data-dir", help="where the benchmark's data lives")
    # One flag per field of the protocol's tuning and target sections; given flags
    # override the protocol file (`python -m deep protocols --show NAME` lists its values).
    protocol = p.add_argument_group("the protocol's settings", PROTOCOL_FLAGS.format(
        where="deep/configs/BENCHMARK.toml", name="BENCHMARK"))
    add_flags(protocol, TargetData)
    add_flags(protocol, Tuning)
    p.add_argument("--arch", help="architecture (default: the protocol's), e.g. clip-vit-tiny "
                   f"for a smoke test of a CLIP protocol; one of {', '.join(architecture_names())}")
    p.add_argument("--checkpoint", help="source model: our checkpoint, another project's weight "
                   "file (torchvision ResNet-50, RobustBench WideResNet, TTT/MEMO ResNet-26), "
                   "or 'none' (random init, smoke tests only)")
    add_trust_checkpoint(p)
    p.add_argument("--workers", type=int, help="parallel processes on this machine (default "
                   f"{DEFAULT_WORKERS}; not with --backend ray, which places task groups itself)")
    add_run_options(p, engine_default(TrainConfig, "cache_mb"))
    p.add_argument("--data", action="append", type=data_option, metavar="KEY=VALUE",
                   help="target-loader option overriding the protocol's (repeatable), "
                        "e.g. --data num_workers=8")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: first shift and seed, middle lr, <= 2 epochs (flags given "
                        "beside it, e.g. --seeds, still override it)")
    p.add_argument("--no-progress", action="store_true")
    add_backend_arguments(p)  # --backend ray, --ray-address, --gpus-per-task, --cpus-per-task


def sweep_protocol(args) -> Protocol:
    """The protocol file of --benchmark, then --quick, then the flags given."""
    protocol = load_protocol(args.benchmark)
    if args.quick:
        protocol = quick(protocol)
    target_data = {**protocol.target_data, **dict(args.data)} if args.data else None
    return protocol.replace(arch=args.arch, target_data=target_data).override(
        {**flag_values(args, TargetData), **flag_values(args, Tuning)})


def run_sweep_command(args) -> int:
    check_trust_has_a_file(args.trust_checkpoint, args.checkpoint, "--checkpoint")
    summary = run_sweep(sweep_protocol(args), args.out, checkpoint=args.checkpoint,
                        data_dir=args.data_dir,
                        workers=DEFAULT_WORKERS if args.workers is None else args.workers,
                        cache_mb=args.cache_mb,
                        progress=not args.no_progress, device=args.device,
                        trust_checkpoint=args.trust_checkpoint,
                        executor=executor_from_args(args), amp=args.amp)
    print(f"ran {summary.ran} cells ({summary.diverged} diverged), skipped {summary.skipped} "
          f"already finished, in {summary.seconds:.1f} s; results: {summary.out}")
    return 0


# --- report -----------------------------------------------------------------------

def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results CSV of `sweep`, `bench` or `adapt`")
    p.add_argument("--out", help="output folder (default: <results>_report/)")
    p.add_argument("--lr-seeds", type=comma_list(int), metavar="SEEDS",
                   help="a two-stage run's first-stage seeds (a bench suite's lr_seeds): the "
                   "other seeds count only at the lr these chose, as the suite's table counts "
                   "them (default: each seed picks its own lr)")


def run_report(args) -> int:
    for path in write_report(args.results, args.out, args.lr_seeds):
        print(path)
    return 0


# --- pretrain ---------------------------------------------------------------------

def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", required=True)
    p.add_argument("--out", required=True,
                   help="checkpoint path; the manifest goes to <out>.json, the run's state to "
                        "<out>.state after every epoch (rerun the command to continue a "
                        "stopped run)")
    p.add_argument("--data-dir")
    p.add_argument("--arch", help="default: the benchmark protocol's; one of "
                   f"{', '.join(architecture_names())}")
    # One flag per PretrainConfig field; given flags override the protocol's [pretrain].
    add_flags(p.add_argument_group("pretraining settings", PROTOCOL_FLAGS.format(
        where="the [pretrain] table of deep/configs/BENCHMARK.toml", name="BENCHMARK")),
        PretrainConfig)
    add_trust_checkpoint(p, "the --init file")
    add_device(p)
    add_threads(p, 0, "torch threads on CPU (default 0: torch's, one per core). The thread "
                "count changes the order of sums: the cached synthetic source model trains with "
                "1, so --threads 1 reproduces it bit for bit; the manifest records the count")
    p.add_argument("--data", action="append", type=data_option, metavar="KEY=VALUE",
                   help="source-loader option overriding the protocol's (repeatable)")


def pretrain_settings(args) -> tuple[str, PretrainConfig, dict]:
    """(arch, pretraining config, source-loader options): PretrainConfig's defaults,
    then the protocol's [pretrain] and source data (if the benchmark has a protocol),
    then the flags given."""
    protocol = load_protocol(args.benchmark) if args.benchmark in available_protocols() else None
    if protocol is None:  # an unknown name is that, not a benchmark that lacks an --arch
        get_benchmark(args.benchmark)
    arch = args.arch or (protocol.arch if protocol is not None else None)
    if arch is None:
        raise ConfigError(f"benchmark {args.benchmark!r} has no protocol; pass --arch")
    base = protocol.pretrain if protocol is not None else PretrainConfig()
    config = dataclasses.replace(base, **flag_values(args, PretrainConfig))
    options = {**(protocol.source_options if protocol is not None else {}), **dict(args.data or [])}
    return arch, config, options


def run_pretrain(args) -> int:
    set_threads(args.threads)
    arch, config, options = pretrain_settings(args)
    check_trust_has_a_file(args.trust_checkpoint, config.init, "--init", unset_reads_nothing=True)
    resolved = {"benchmark": args.benchmark, "arch": arch,
                "pretrain": dataclasses.asdict(config), "source_data": options}
    manifest = pretrain_to_file(args.benchmark, args.out, arch, config, options, args.data_dir,
                                command=_command(args), resolved=resolved,
                                trust_checkpoint=args.trust_checkpoint, device=args.device)
    print(f"source test accuracy {100 * manifest['source_test_acc']:.2f}% "
          f"({manifest['seconds']:.0f} s of training, as its manifest records); "
          f"{args.out} and its manifest")
    return 0


# --- protocols --------------------------------------------------------------------

ADAPT_PREFIX = "adapt/"  # `protocols --show adapt/fmnist-c`: deep/configs/adapt/fmnist-c.toml


def add_protocols_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="show these in full (default: list all; "
                   f"{ADAPT_PREFIX}NAME for an online adaptation protocol)")
    p.add_argument("--show", metavar="NAME", action="append",
                   help="print every resolved value of protocol NAME (repeatable)")


def run_protocols(args) -> int:
    shown = [*(args.names or []), *(args.show or [])]
    names = shown or [*available_protocols(), *(ADAPT_PREFIX + n for n in adapt_protocols())]
    for name in names:
        if name.startswith(ADAPT_PREFIX):
            _print_adapt_protocol(name, full=bool(shown))
            continue
        pr = load_protocol(name)
        print(f"{name}: {pr.arch}, {len(pr.shifts)} shift(s), {len(pr.methods)} methods, "
              f"{len(pr.lrs)} lrs, {len(pr.seeds)} seed(s), n_target={pr.n_target}, "
              f"epochs={pr.epochs}, select={pr.select}")
        if shown:
            print(resolved_text(pr))
            print(indented(pr.notes))
    return 0


def _print_adapt_protocol(name: str, full: bool) -> None:
    """One line for an online adaptation protocol (`python -m deep adapt`); with `full`
    every value, each method's settings as its config resolves them."""
    pr = load_adapt_protocol(name.removeprefix(ADAPT_PREFIX))
    print(f"{name}: {pr.arch}, {len(pr.shifts)} shift(s), methods {','.join(pr.methods)}, "
          f"blocks {','.join(pr.blocks)}, {len(pr.seeds)} seed(s) (python -m deep adapt)")
    if full:
        values = {f.name: getattr(pr, f.name) for f in dataclasses.fields(pr)
                  if f.name not in ("method_settings", "notes")}
        for method in pr.methods:  # its table as it resolves: one config per lr
            values[method] = {"images": pr.images_of(method), "blocks": pr.blocks_of(method),
                              "configs": [dataclasses.asdict(c) for c in pr.configs(method)]}
        print("\n".join(f"  {key} = {json.dumps(value)}" for key, value in values.items()))
        print(indented(pr.notes))


def indented(text: str) -> str:
    """`text` with every line indented two spaces (a protocol's notes under its values)."""
    return "  " + text.replace("\n", "\n  ")


def resolved_text(protocol: Protocol) -> str:
    """Every resolved value, one `key = value` line each (values as JSON literals)."""
    lines = []
    for key, value in protocol.resolved().items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"  {key} = {{{inner}}}")
        else:
            lines.append(f"  {key} = {json.dumps(value)}")
    return "\n".join(lines)


COMMANDS = {
    "sweep": ("run a grid of (shift, method, lr, seed) cells into a results CSV",
              add_sweep_arguments, run_sweep_command),
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
    try:  # bad input is one `error:` line; anything else is a bug and keeps its traceback
        return exit_status(lambda: commands[args.command][2](args))
    except KeyboardInterrupt:  # every finished row or file is already written, atomically
        print(f"\ninterrupted; `python -m deep {args.command}` with the same arguments "
              "resumes where this one stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
