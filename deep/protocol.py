"""Benchmark protocols: one TOML file per benchmark in `deep/configs/`, read into typed
dataclasses, overridden by command-line flags generated from the same fields.

The chain, each default written once:

    TrainConfig (deep.train), PretrainConfig (deep.pretrain)   the engine's defaults
      -> a protocol file (deep/configs/NAME.toml)              the benchmark's values
      -> command-line flags (`python -m deep sweep --epochs 2`) this run's values
      -> the resolved configuration, saved beside results and in checkpoint manifests

A protocol file has top-level keys for the tuning grid and the target data (the
fields of `Tuning` and `TargetData`, flat, as `python -m deep protocols --show NAME`
prints them), a `[data]` table of loader options that both the source and the
target loader accept, optional `[source_data]` / `[target_data]` tables for options
of one loader only, and an optional `[pretrain]` table (`PretrainConfig` fields).

What a protocol does not set: the tuning optimiser and its schedule (Adam at a constant
rate, the paper's; `deep.methods` changes them per method), BatchNorm statistics frozen
(`TrainConfig.freeze_bn`, the paper's; the public code's train mode is a Python switch,
docs/reference-models.md), and the settings for speed, which move numbers at rounding
level at most (`fold_bn`, `eval_batch_size`, `channels_last`; `--cache-mb` is a flag). They
are the engine's, fixed by the code commit every results row records; a study that varies
one calls `deep.train.fit` itself.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import (ConfigError, check_choice, check_int, check_nonnegative, check_positive,
                     check_seeds)
from .methods import GENERIC_METHODS
from .pretrain import PretrainConfig
from .train import SELECTION_RULES, TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"


def engine_default(config_class, name: str):
    """The default of field `name` of an engine config class (so it is written once)."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


@dataclass
class Tuning:
    """The fine-tuning grid and the loop settings every cell of it shares."""

    methods: list[str] = field(metadata={
        "help": "the architecture's blocks (resnet26: first, second, third, last; an unknown "
                "name is refused with the architecture's list) and "
                + ", ".join(GENERIC_METHODS) + " (README's methods table)"})
    epochs: int = field(metadata={"help": "training epochs per (method, lr)"})
    lrs: list[float] = field(metadata={"help": "learning-rate grid"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "seeds to run"})
    batch_size: int = field(default=engine_default(TrainConfig, "batch_size"),
                            metadata={"help": "training minibatch size"})
    weight_decay: float = field(default=engine_default(TrainConfig, "weight_decay"),
                                metadata={"help": "L2 coefficient (Adam)"})
    select: str = field(default=engine_default(TrainConfig, "select"),
                        metadata={"help": "what picks (lr, epoch)", "choices": SELECTION_RULES})
    patience: int | None = field(default=engine_default(TrainConfig, "patience"),
                                 metadata={"help": "early stopping: epochs without a better "
                                           "validation metric before a run stops (none: run "
                                           "every epoch, also over a protocol's value)"})

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name))
        check_choice("select", self.select, SELECTION_RULES)
        check_nonnegative("weight_decay", self.weight_decay)
        if self.patience is not None:
            check_int("patience", self.patience)
        check_seeds(self.seeds)
        if not self.lrs:
            raise ConfigError("lrs must be a non-empty list of positive numbers, got []")
        for lr in self.lrs:
            check_positive("every lr of lrs", lr)

    def run_config(self, lr: float, seed: int, **engine) -> TrainConfig:
        """The engine's settings of one cell; `engine` adds cache_mb, device, ..."""
        return TrainConfig(lr=lr, epochs=self.epochs, batch_size=self.batch_size,
                           weight_decay=self.weight_decay, select=self.select, seed=seed,
                           patience=self.patience,
                           **engine)


@dataclass
class TargetData:
    """Which shifts, and how many labelled target images go into each split."""

    shifts: list[str] = field(metadata={"help": "shifts to run (default: the protocol's)"})
    n_target: int = field(metadata={"help": "labelled target training images"})
    val_per_class: int = field(metadata={"help": "validation images per class"})
    test_per_class: int = field(metadata={"help": "test images per class"})

    def __post_init__(self):
        check_int("n_target", self.n_target)
        # 0 is a loader's business: some take "0 per class" to mean every image left.
        for name in ("val_per_class", "test_per_class"):
            check_int(name, getattr(self, name), minimum=0)


SECTIONS = {"tuning": Tuning, "target": TargetData}
FLAT = {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass
class Protocol:
    """How one benchmark is run: its architecture, the tuning grid, the data, pretraining.

    Attributes:
        benchmark: registry name, same as the config file's stem.
        arch: architecture name (`deep.models`).
        tuning, target: see `Tuning`, `TargetData`; their fields read as attributes of
            the protocol too (`protocol.epochs`, `protocol.shifts`).
        data: loader options both loaders accept (`[data]`).
        source_data, target_data: options of the source / target loader only.
        pretrain: how the benchmark's source model is pretrained (`[pretrain]`).
        notes: free text shown by `python -m deep protocols`: source of the numbers, data cost.
    """

    benchmark: str
    arch: str
    tuning: Tuning
    target: TargetData
    data: dict = field(default_factory=dict)
    source_data: dict = field(default_factory=dict)
    target_data: dict = field(default_factory=dict)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    notes: str = ""

    def __getattr__(self, name: str):
        # Only called for names that are not attributes: the sections' fields.
        if name in FLAT:
            return getattr(self.__dict__[FLAT[name]], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def source_options(self) -> dict:
        """Keywords of the source loader: [data] updated by [source_data]."""
        return {**self.data, **self.source_data}

    @property
    def target_options(self) -> dict:
        """Keywords of the target loader: [data] updated by [target_data]."""
        return {**self.data, **self.target_data}

    def replace(self, **overrides) -> "Protocol":
        """A copy with the given fields changed, section fields by their own names
        (`replace(epochs=2, shifts=[...])`); None values are ignored (flags not given,
        a suite's "each protocol's own"). `override` sets None too."""
        return self.override({k: v for k, v in overrides.items() if v is not None})

    def override(self, overrides: dict) -> "Protocol":
        """A copy with every field of `overrides` set as given, None included (the
        flags given on the command line: `--patience none` turns early stopping off)."""
        own = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - own - set(FLAT)
        if unknown:
            raise ConfigError(f"unknown protocol field(s) {sorted(unknown)}; "
                              f"known: {sorted((own - set(SECTIONS)) | set(FLAT))}")
        changes = {k: v for k, v in overrides.items() if k in own}
        for section in SECTIONS:
            mine = {k: v for k, v in overrides.items() if FLAT.get(k) == section}
            if mine:
                changes[section] = dataclasses.replace(getattr(self, section), **mine)
        return dataclasses.replace(self, **changes)

    def resolved(self) -> dict:
        """Every value this protocol runs with, as plain data (saved beside results)."""
        out = {"benchmark": self.benchmark, "arch": self.arch}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        out.update(source_data=self.source_options, target_data=self.target_options,
                   pretrain=dataclasses.asdict(self.pretrain))
        return out


def available_protocols() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def read_protocol_file(config_dir: Path, benchmark: str,
                       what: str = "protocol") -> tuple[dict, Path]:
    """(table, path) of `config_dir`/<benchmark>.toml, its `benchmark` key filled in and
    checked against the file name (fine-tuning and adaptation protocols alike)."""
    if Path(benchmark).name != benchmark or benchmark.startswith("."):
        # a name, not a path: `../x` would read a file outside the configs folder
        raise ConfigError(f"{what}s are named by their benchmark (e.g. fmnist-c), not a path; "
                          f"got {benchmark!r}")
    path = config_dir / f"{benchmark}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in config_dir.glob("*.toml"))
        raise ConfigError(f"no {what} for benchmark {benchmark!r} ({path} missing); "
                          f"known: {', '.join(known) or 'none'}")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
    raw.setdefault("benchmark", benchmark)
    if raw["benchmark"] != benchmark:
        raise ConfigError(f"{path}: benchmark = {raw['benchmark']!r} does not match the file name")
    return raw, path


def load_protocol(benchmark: str) -> Protocol:
    """The protocol of `benchmark` from deep/configs/<benchmark>.toml."""
    raw, path = read_protocol_file(CONFIG_DIR, benchmark)
    return protocol_from_dict(raw, str(path))


def protocol_from_dict(raw: dict, where: str = "protocol") -> Protocol:
    """A Protocol from a TOML-shaped dict (flat section fields, the tables as dicts)."""
    tables = ("data", "source_data", "target_data", "pretrain")
    known = {"benchmark", "arch", "notes", *tables, *FLAT}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    missing = [k for k in ("benchmark", "arch") if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    for name in ("benchmark", "arch", "notes"):
        if name in raw and not isinstance(raw[name], str):
            raise ConfigError(f"{where}: {name} must be a string, e.g. {name} = \"...\", got "
                              f"{raw[name]!r}")
    _check_shapes(raw, tables, where)
    sections = {}
    try:
        for section, cls in SECTIONS.items():
            sections[section] = cls(**{k: v for k, v in raw.items() if FLAT.get(k) == section})
        pretrain = PretrainConfig(**raw.get("pretrain", {}))
    except TypeError as err:  # a missing field of one section
        raise ConfigError(f"{where}: {err}") from None
    except ConfigError as err:  # a value a section refuses: say which file holds it
        raise ConfigError(f"{where}: {err}") from None
    return Protocol(raw["benchmark"], raw["arch"], **sections,
                    **{t: dict(raw.get(t, {})) for t in tables if t != "pretrain"},
                    pretrain=pretrain, notes=raw.get("notes", ""))


def _check_shapes(raw: dict, tables: tuple[str, ...], where: str) -> None:
    """Lists where a field is a list, tables where a table is, known [pretrain] keys: a
    scalar `lrs = 0.1` would otherwise fail inside the code, and `shifts = "noise"` be
    read as five one-letter shifts."""
    fields = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    for name, value in raw.items():
        if name in fields and str(fields[name].type).startswith("list") and not isinstance(value, list):
            raise ConfigError(f"{where}: {name} must be a list, e.g. {name} = [{value!r}], "
                              f"got {value!r}")
    for table in tables:
        if table in raw and not isinstance(raw[table], dict):
            raise ConfigError(f"{where}: {table} must be a table ([{table}] with key = value "
                              f"lines), got {raw[table]!r}")
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = set(raw.get("pretrain", {})) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} in [pretrain]; "
                          f"known: {sorted(known)}")


def data_option(text: str) -> tuple[str, object]:
    """A `--data KEY=VALUE` flag: VALUE read as a TOML literal (1, 0.5, true, "x", [1, 2])
    or else kept as a string; argparse reports a malformed one."""
    import argparse

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed
