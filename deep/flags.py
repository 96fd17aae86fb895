"""Command-line flags generated from configuration dataclasses (the CLI layer).

One flag per field, named after it (`n_target` -> `--n-target`), typed by its
annotation, with the help text and choices of its metadata. A flag not given on the
command line is absent from the parsed arguments, so it leaves the protocol's value in
place; one given sets it, back to a default too:

    add_flags(parser, Tuning)                # --methods, --epochs, --lrs, ...
    overrides = flag_values(args, Tuning)    # {"epochs": 2} for `--epochs 2`

Lists take `a,b,c` and/or several arguments; a bool field is a switch with its
`--no-` form (`--compile`, `--no-compile`); a number that may be None takes `none`
(`--patience none`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

import torch

from .checkpoints import RANDOM_INIT
from .errors import ConfigError, check_each_once, check_nonnegative, check_positive


def add_flags(parser: argparse.ArgumentParser, config_class, skip=(), defaults=None) -> None:
    """Add one flag per field of `config_class`, except those in `skip`.

    `defaults` (field -> value) replace the dataclass defaults shown in the help; they
    are never applied here: the protocol or the dataclass applies them."""
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        kind = typing.get_type_hints(config_class)[f.name]
        shown = (defaults or {}).get(f.name, _default(f))
        help_text = f.metadata.get("help", "")
        if shown is not None:  # what applies when neither the flag nor a protocol sets it
            help_text += f" (built-in default: {_show(shown)})"
        # not given: no attribute at all, so that a given `none` (None) is told apart
        options = dict(help=help_text.strip() or None, default=argparse.SUPPRESS)
        if "choices" in f.metadata:
            options["choices"] = list(f.metadata["choices"])
        flag = "--" + f.name.replace("_", "-")
        base, is_list = _base_type(kind)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif is_list:
            options["help"] = (options["help"] or "") + "; comma-separated or space-separated"
            parser.add_argument(flag, nargs="+", type=comma_list(base), **options)
        elif _optional(kind) and base is not str:  # (a str field's "none" is its own word)
            parser.add_argument(flag, type=or_none(base), **options)
        else:
            parser.add_argument(flag, type=base, **options)


def flag_values(args: argparse.Namespace, config_class) -> dict:
    """{field: value} for the fields of `config_class` given on the command line (None
    for a given `none`)."""
    out = {}
    for f in dataclasses.fields(config_class):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is not None and _base_type(typing.get_type_hints(config_class)[f.name])[1]:
            value = [v for group in value for v in group]  # nargs="+" of comma lists
        out[f.name] = value
    return out


def add_trust_checkpoint(parser: argparse.ArgumentParser, what: str = "--checkpoint") -> None:
    """--trust-checkpoint, the switch that the safe-loading errors name (deep.checkpoints)."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help=f"read {what} with full unpickling, which can run code from the "
                        "file: only for a file you trust that safe loading refuses")


def check_trust_has_a_file(trust: bool, source: str | None, flag: str,
                           unset_reads_nothing: bool = False) -> None:
    """--trust-checkpoint beside `flag none` (random init) trusts nothing: refused like
    any flag without effect (the user may have meant to name a file); so is it without
    `flag` at all where that reads no file (`unset_reads_nothing`: pretrain's --init;
    a sweep without --checkpoint reads the benchmark's own)."""
    if trust and source == RANDOM_INIT:
        raise ConfigError(f"--trust-checkpoint has no effect with {flag} {RANDOM_INIT} (a random "
                          "init reads no file): drop one of the two")
    if trust and source is None and unset_reads_nothing:
        raise ConfigError(f"--trust-checkpoint has no effect without {flag} FILE (no file is "
                          f"read): drop it, or name the file with {flag}")


def add_threads(parser: argparse.ArgumentParser, default: int, help: str) -> None:
    """--threads: torch threads of this process (0 = torch's default, one per core)."""
    parser.add_argument("--threads", type=int, default=default, help=help)


def set_threads(threads: int) -> None:
    """Apply --threads: torch.set_num_threads(threads) unless 0 (torch's default). On CPU
    the thread count changes the order of sums, so it is part of "same seed, same numbers"
    (`deep.files.machine` records it)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"--threads must be an integer >= 0 (0 = torch's default, one per "
                          f"core), got {threads!r}")
    if threads:
        torch.set_num_threads(threads)


def add_device(parser: argparse.ArgumentParser) -> None:
    """--device, auto by default (`deep.train.resolve_device`)."""
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA when present, else CPU), cpu, cuda, cuda:1, ...")


def add_run_options(parser: argparse.ArgumentParser, cache_mb: float) -> None:
    """--device, --amp and --cache-mb: where and how a sweep's cells run (sweep, bench)."""
    add_device(parser)
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast on CUDA (no effect on CPU); see docs/distributed.md")
    parser.add_argument("--cache-mb", type=float, default=cache_mb,
                        help="memory budget of the frozen-prefix activation cache per process, "
                        f"in MiB (default {cache_mb:g})")


def comma_list(kind=str):
    """An argparse type: `a,b,c` -> [kind(a), kind(b), kind(c)]; spaces around a value are
    dropped (`--shifts "fog, snow"` names the shift `snow`), empty values skipped."""
    def parse(text: str):
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, "
                                             f"got {text!r}") from None
    return parse


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (`--batch 0` is a usage error, not a
    ZeroDivisionError later)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        return check_nonnegative("value", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None


def positive_floats(text: str) -> list[float]:
    """An argparse type: `a,b,c` of finite numbers above 0 (learning rates)."""
    try:
        values = [check_positive("value", float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive numbers, got {text!r}")
    try:  # a repeat would run (and time, or score) the same setting twice
        check_each_once(repr(text), values)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return values


def or_none(kind):
    """An argparse type: `none` -> None, else `kind(text)` (`--patience none`)."""
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)
    parse.__name__ = f"{kind.__name__} or none"   # argparse's "invalid ... value" names it
    return parse


def _optional(kind) -> bool:
    """Whether an annotation admits None (`int | None`)."""
    return ((isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union)
            and type(None) in typing.get_args(kind))


def _base_type(kind) -> tuple[type, bool]:
    """(element type, is a list) of an annotation: int, str | None, list[float], ..."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) in (list, tuple):
        return typing.get_args(kind)[0], True
    return kind, False


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


# The help of a group of generated flags: without this, "--seeds (built-in default: 0)"
# reads as what a sweep runs, where the protocol's seeds (synthetic: 0,1) are what it runs.
PROTOCOL_FLAGS = ("a flag not given keeps the value of {where} (python -m deep protocols "
                  "--show {name} prints them); a built-in default applies only where "
                  "that file sets none")
