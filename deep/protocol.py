"""Benchmark protocols: one small TOML file per benchmark in `deep/configs/`.

A protocol says how a benchmark is run in full (the paper's settings); the CLI
reads it and lets every value be overridden on the command line.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"

SELECTION_RULES = ("val_acc", "worst_group_val_acc")


@dataclass
class Protocol:
    """How one benchmark is run.

    Attributes:
        benchmark: registry name, same as the config file's stem.
        arch: architecture name in `deep.models` and `deep.blocks`.
        shifts: the benchmark's shifts run by default (e.g. corruptions).
        methods: method names run by default (see `deep.methods`).
        n_target: labelled target training images, class balanced.
        val_per_class, test_per_class: validation / test images per class.
        epochs: training epochs per (method, learning rate).
        lrs: the learning-rate grid.
        batch_size, weight_decay: Adam settings.
        select: "val_acc" or "worst_group_val_acc": what picks (lr, epoch).
        seeds: seeds run by default.
        data: benchmark-specific loader options, passed to the loader as keywords.
        notes: free text shown by `python -m deep protocols`: source of the numbers, data cost.
    """

    benchmark: str
    arch: str
    shifts: list[str]
    methods: list[str]
    n_target: int
    val_per_class: int
    test_per_class: int
    epochs: int
    lrs: list[float]
    batch_size: int = 64
    weight_decay: float = 1e-4
    select: str = "val_acc"
    seeds: list[int] = field(default_factory=lambda: [0])
    data: dict = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self):
        if self.select not in SELECTION_RULES:
            raise ValueError(f"select must be one of {SELECTION_RULES}, got {self.select!r}")
        for name in ("n_target", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be a non-empty list of positive numbers, got {self.lrs}")

    def replace(self, **overrides) -> "Protocol":
        """A copy with the given fields changed; None values are ignored (CLI defaults)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown protocol field(s) {sorted(unknown)}; known: {sorted(known)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def available_protocols() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_protocol(benchmark: str) -> Protocol:
    path = CONFIG_DIR / f"{benchmark}.toml"
    if not path.exists():
        raise ValueError(f"no protocol for benchmark {benchmark!r}; "
                         f"known: {', '.join(available_protocols())}")
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    raw.setdefault("benchmark", benchmark)
    if raw["benchmark"] != benchmark:
        raise ValueError(f"{path}: benchmark = {raw['benchmark']!r} does not match the file name")
    known = {f.name for f in dataclasses.fields(Protocol)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return Protocol(**raw)
