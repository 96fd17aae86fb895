"""Adaptation protocols: `deep/configs/adapt/<benchmark>.toml`.

Top-level keys: arch, shifts, methods, blocks, seeds, images (stream length: the
first `images` of the seeded order of the test split; 0 = all), test_per_class
(size of the test split: for fmnist-c the same images as the sweep's test set of
that seed), checkpoint (optional), notes. Tables: one per method of `core.METHODS`,
[memo] and [tent] (the method's settings, the fields of its config dataclass,
`MemoConfig` / `TentConfig`, `lr` a number or a list of them, plus optional `blocks` and
`images` overriding the top-level ones for that method; `AdaptProtocol.method_settings`
holds them by method name), and [data] (loader options).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, check_each_once, check_seeds
from ..models import get_architecture
from ..protocol import read_protocol_file
from ..blocks import blocks_for
from .core import METHODS, canonical_blocks, method_spec, parse_blocks

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "adapt"
_METHOD_KEYS = {"blocks", "images"}


@dataclass
class AdaptProtocol:
    benchmark: str
    arch: str
    shifts: list[str]
    methods: list[str]
    blocks: list[str]
    seeds: list[int]
    images: int = 0
    test_per_class: int = 90
    checkpoint: str | None = None
    method_settings: dict[str, dict] = field(default_factory=dict)  # method -> its table
    data: dict = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self):
        get_architecture(self.arch)  # an unknown name fails here, listing the known ones
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
        for name in ("shifts", "methods", "blocks", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: nothing to run")
        check_seeds(self.seeds)
        for name in ("shifts", "methods", "seeds"):   # blocks: _check_blocks, per method
            check_each_once(name, getattr(self, name))
        if self.test_per_class < 1:
            raise ConfigError(f"test_per_class must be >= 1, got {self.test_per_class}")
        _check_images("images", self.images)
        clash = set(METHODS) & {f.name for f in dataclasses.fields(self)}
        if clash:
            raise ConfigError(f"method name(s) {sorted(clash)} are also protocol keys")
        unknown = [m for m in self.method_settings if m not in METHODS]
        if unknown:
            raise ConfigError(f"settings of unknown method(s) {unknown}; "
                             f"known: {', '.join(METHODS)}")
        for method, table in self.method_settings.items():
            if not isinstance(table, dict):
                raise ConfigError(f"[{method}] must be a table of settings, got {table!r}")
        for method in METHODS:
            self.configs(method)  # unknown keys or bad values fail here, not mid-run
            _check_images(f"[{method}] images", self.images_of(method))
            _check_blocks(f"[{method}] blocks", self.settings_of(method).get("blocks", self.blocks))
        # A stream of one image is one batch of one for a method that adapts on batches:
        # no batch statistics. Only for a method that runs (a protocol file may give a
        # method it does not run a length of 1).
        one_at_a_time = [m for m in METHODS if self._batch_sizes(m) == {1}]
        for method in self.methods:
            if self.images_of(method) == 1 and self._batch_sizes(method) != {1}:
                others = [m for m in one_at_a_time if m != method]
                raise ConfigError(
                    f"{method_spec(method).label} needs streams of at least 2 images (a batch of "
                    "one has no batch statistics); got images 1: use --images 0 (all) or >= 2"
                    + (f", or --method {' or '.join(others)}" if others else ""))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "adaptation protocol") -> "AdaptProtocol":
        """A protocol in the layout of its TOML file: the top-level keys, and one table per
        method named after it ([memo], [tent]) instead of `method_settings`."""
        raw = dict(raw)
        tables = {m: raw.pop(m) for m in list(raw) if m in METHODS}
        known = {f.name for f in dataclasses.fields(cls)} - {"method_settings"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: "
                             f"{sorted(known | set(METHODS))}")
        try:
            return cls(**raw, method_settings=tables)
        except TypeError as err:
            raise ConfigError(f"{where}: {err}") from None

    def replace(self, **overrides) -> "AdaptProtocol":
        """A copy with the given fields changed, a method's name replacing its whole table
        (`replace(memo={...})`); None values are ignored (CLI defaults)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        tables = {m: given.pop(m) for m in list(given) if m in METHODS}
        if tables:
            given["method_settings"] = {**self.method_settings, **tables}
        return dataclasses.replace(self, **given)

    def settings_of(self, method: str) -> dict:
        """The method's table: its config fields plus `blocks` / `images` (may be empty)."""
        method_spec(method)
        return dict(self.method_settings.get(method, {}))

    def config(self, method: str):
        """The method's config dataclass, e.g. MemoConfig (at its first learning rate)."""
        return self.configs(method)[0]

    def configs(self, method: str) -> list:
        """One config per learning rate (`lr` may be a list)."""
        table = self.settings_of(method)
        lrs = table.get("lr", [])
        if isinstance(lrs, list):
            if "lr" in table and not lrs:
                raise ConfigError(f"[{method}]: lr is an empty list")
            if _all_numbers(lrs):  # else the config's own check names the bad value
                check_each_once(f"[{method}] lr", lrs, float)
            return [self._config(method, {**table, "lr": lr} if lrs else table) for lr in lrs or [None]]
        return [self._config(method, table)]

    def _config(self, method: str, table: dict):
        config_class = method_spec(method).config
        settings = {k: v for k, v in table.items() if k not in _METHOD_KEYS}
        known = {f.name for f in dataclasses.fields(config_class)}
        unknown = set(settings) - known
        if unknown:
            raise ConfigError(f"[{method}]: unknown key(s) {sorted(unknown)}; known: "
                             f"{sorted(known | _METHOD_KEYS)}")
        return config_class(**settings)

    def _batch_sizes(self, method: str) -> set[int]:
        spec = method_spec(method)
        return {spec.batch_size(c) for c in self.configs(method)}

    def blocks_of(self, method: str) -> list[str]:
        """The method's block options, each in its one spelling (`canonical_blocks`)."""
        order = list(blocks_for(self.arch))
        return [canonical_blocks(option, order)
                for option in self.settings_of(method).get("blocks", self.blocks)]

    def images_of(self, method: str) -> int:
        return self.settings_of(method).get("images", self.images)


def _check_blocks(name: str, options: list[str]) -> None:
    """Block options to run: at least one, each well formed, none listed twice (in any
    order of its parts: first+second is second+first)."""
    if not options:
        raise ConfigError(f"{name} is empty: nothing to run (e.g. --blocks none,first)")
    seen = {}
    for option in options:
        parts = frozenset(parse_blocks(option))
        if parts in seen:
            raise ConfigError(f"{name}: {option!r} repeats {seen[parts]!r}; list each once")
        seen[parts] = option


def _all_numbers(values: list) -> bool:
    try:
        [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return True


def _check_images(name: str, value) -> None:
    """A stream length: an int >= 0 (0 = the whole test split). Checked where the protocol
    is built, since a negative N would silently keep all but the last |N| images."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a whole number >= 0 (the first N images of the "
                          f"seeded stream; 0 = all of them), got {value!r}")


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_adapt_protocol(benchmark: str) -> AdaptProtocol:
    raw, path = read_protocol_file(CONFIG_DIR, benchmark, "adaptation protocol")
    return AdaptProtocol.from_dict(raw, str(path))
