"""Adaptation protocols: `deep/configs/adapt/<benchmark>.toml`.

Top-level keys: arch, shifts, methods, blocks, seeds, images (stream length: the
first `images` of the seeded order of the test split; 0 = all), test_per_class
(size of the test split: for fmnist-c the same images as the sweep's test set of
that seed), checkpoint (optional), notes. Tables: [memo] and [tent] (the method's
settings, `MemoConfig` / `TentConfig` fields, `lr` a number or a list of them, plus optional `blocks` and `images`
overriding the top-level ones for that method) and [data] (loader options).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..models import get_architecture
from ..protocol import read_protocol_file
from .core import METHODS, MemoConfig, TentConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "adapt"
_METHOD_KEYS = {"blocks", "images"}
_CONFIGS = {"memo": MemoConfig, "tent": TentConfig}


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
    memo: dict = field(default_factory=dict)
    tent: dict = field(default_factory=dict)
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
        if self.test_per_class < 1:
            raise ConfigError(f"test_per_class must be >= 1, got {self.test_per_class}")
        _check_images("images", self.images)
        for method in METHODS:
            self.configs(method)  # unknown keys or bad values fail here, not mid-run
            _check_images(f"[{method}] images", getattr(self, method).get("images", self.images))
        # A TENT stream of one image is one batch of one: no batch statistics. Only for
        # a method that runs (the CLI's --images reaches both tables).
        if "tent" in self.methods and self.images_of("tent") == 1:
            raise ConfigError("TENT needs streams of at least 2 images (a batch of one has no "
                              "batch statistics); got images 1: use --images 0 (all) or >= 2, "
                              "or --method memo")

    def replace(self, **overrides) -> "AdaptProtocol":
        """A copy with the given fields changed; None values are ignored (CLI defaults)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def config(self, method: str):
        """The method's MemoConfig / TentConfig (at its first learning rate)."""
        return self.configs(method)[0]

    def configs(self, method: str) -> list:
        """One MemoConfig / TentConfig per learning rate (`lr` may be a list)."""
        table = dict(getattr(self, method))
        lrs = table.get("lr", [])
        if isinstance(lrs, list):
            if "lr" in table and not lrs:
                raise ConfigError(f"[{method}]: lr is an empty list")
            return [self._config(method, {**table, "lr": lr} if lrs else table) for lr in lrs or [None]]
        return [self._config(method, table)]

    def _config(self, method: str, table: dict):
        settings = {k: v for k, v in table.items() if k not in _METHOD_KEYS}
        known = {f.name for f in dataclasses.fields(_CONFIGS[method])}
        unknown = set(settings) - known
        if unknown:
            raise ConfigError(f"[{method}]: unknown key(s) {sorted(unknown)}; known: "
                             f"{sorted(known | _METHOD_KEYS)}")
        return _CONFIGS[method](**settings)

    def blocks_of(self, method: str) -> list[str]:
        return list(getattr(self, method).get("blocks", self.blocks))

    def images_of(self, method: str) -> int:
        return int(getattr(self, method).get("images", self.images))


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
    known = {f.name for f in dataclasses.fields(AdaptProtocol)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    try:
        return AdaptProtocol(**raw)
    except TypeError as err:
        raise ConfigError(f"{path}: {err}") from None
