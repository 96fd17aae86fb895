"""The project's own error types: what the command line reports as one line.

Every error that bad input can cause (a protocol value, a data folder, a checkpoint,
a results file) derives from `DeepError`. `python -m deep` prints those as
`error: <message>` and exits with status 2; any other exception is a bug and keeps
its traceback. They stay `ValueError`s so that callers who catch ValueError still do.
"""

from __future__ import annotations

import math
import operator
import sys
from typing import Callable


class DeepError(ValueError):
    """Base class: bad input, with a message that names what was expected."""


class ConfigError(DeepError):
    """A protocol, a command-line value or a registry name is wrong."""


class ResultsError(DeepError):
    """A results file cannot be read or resumed (malformed row, other settings)."""


def check_int(name: str, value, minimum: int = 1, error: type[ValueError] = ConfigError, *,
              maximum: int | None = None) -> int:
    """`value` as an int if it is an integer >= `minimum` (and <= `maximum` when given):
    numpy integers and one-element integer tensors too, never a bool; else `error` naming
    `name` and what was given."""
    expected = "an integer" if maximum is None else f"an integer in {minimum}..{maximum}"
    try:
        # operator.index: exactly the integers. hasattr(value, "__index__") would take a
        # float tensor (every tensor has the method) and int() would then truncate 2.5 to 2.
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or str(getattr(value, "dtype", "")) == "torch.bool":
        raise error(f"{name} must be {expected}, got {value!r}")
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"at least {minimum}" if maximum is None else expected
        raise error(f"{name} must be {bound}, got {value!r}")
    return number


def check_choice(name: str, value, choices, error: type[DeepError] = ConfigError):
    """`value` if it is one of `choices`; else `error` naming `name`, what was given and
    every valid choice (in the order `choices` lists them)."""
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_nonnegative(name: str, value, error: type[DeepError] = ConfigError) -> float:
    """`value` if it is a finite number >= 0 (a weight decay, say); else `error`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value >= 0 and math.isfinite(value)):
        raise error(f"{name} must be a number >= 0, got {value!r}")
    return value


def check_positive(name: str, value, error: type[DeepError] = ConfigError) -> float:
    """`value` if it is a finite number above 0 (a learning rate, say); else `error`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value > 0 and math.isfinite(value)):
        raise error(f"{name} must be a positive number, got {value!r}")
    return value


def check_between(name: str, value, low: float, high: float, *, high_open: bool = False,
                  noun: str = "a number", error: type[DeepError] = ConfigError) -> float:
    """`value` if it is a number in [low, high] ([low, high) with `high_open`: a momentum
    of 1 never forgets); else `error` naming `name` and the interval. NaN is outside."""
    inside = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and low <= value and (value < high if high_open else value <= high))
    if not inside:
        raise error(f"{name} must be {noun} in [{low:g}, {high:g}{')' if high_open else ']'}, "
                    f"got {value!r}")
    return value


def check_seed(name: str, value, error: type[DeepError] = ConfigError, bits: int = 63) -> int:
    """`value` as an int if it is an integer in [0, 2**bits); else `error` naming `name`.
    The one check of a seed: torch's generators take [0, 2**64) and wrap or overflow
    outside it, int() would turn 1.5 into 1; 63 bits leave room for the streams derived
    as seed + 1 (augmentation)."""
    seed = check_int(name, value, minimum=0, error=error)
    if seed >= 2**bits:
        raise error(f"{name} must be below 2**{bits}, got {seed}")
    return seed


def check_seeds(seeds) -> None:
    """Every seed an integer in [0, 2**63) (what torch's generators take); else a
    ConfigError naming the first that is not."""
    for seed in seeds:
        check_seed("every seed of seeds", seed)


def check_each_once(name: str, values, key=None) -> None:
    """Each value of the list `name` once (compared as `key(value)` when given, e.g.
    float for learning rates): a repeated one would run the same cells twice, the second
    time as "already finished". Else a ConfigError naming the first repeat."""
    seen = [key(v) for v in values] if key else list(values)
    twice = [v for i, v in enumerate(seen) if v in seen[:i]]
    if twice:
        raise ConfigError(f"{name} lists {twice[0]!r} more than once ({values}); "
                          "name each value once")


def differences(saved, now, prefix: str = "") -> dict:
    """{dotted name: (saved, now)} for each leaf that differs between two JSON-like dicts."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return {name: pair for k in sorted(set(saved) | set(now), key=str)
                for name, pair in differences(saved.get(k), now.get(k), f"{prefix}{k}.").items()}
    return {} if saved == now else {prefix.rstrip("."): (saved, now)}


def clash_text(clash: dict, sep: str = ", ", sides: tuple[str, str] = ("file", "now")) -> str:
    """{setting: (recorded, now)} as "epochs: file 1 vs now 2, ...": how a refused resume
    names what differs (`sides` names the two values otherwise)."""
    return sep.join(f"{k}: {sides[0]} {a!r} vs {sides[1]} {b!r}" for k, (a, b) in clash.items())


def exit_status(command: Callable[[], int | None]) -> int:
    """Run a command-line tool's body: bad input (a DeepError) is printed as one
    `error: <message>` line, status 2; any other exception is a bug and keeps its traceback."""
    try:
        return command() or 0
    except DeepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
