"""The configuration chain, the registries, the results schema and the CLI's error types."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import threading

import numpy as np
import pytest
import torch

from deep.__main__ import main, pretrain_settings, sweep_protocol
from deep.errors import (ConfigError, DeepError, ResultsError, check_between, check_int,
                         differences)
from deep.flags import add_flags, flag_values
from deep.methods import GENERIC_METHODS, METHODS, get_method, method_names
from deep.models import (Architecture, architecture_names, block_order, build_model,
                         get_architecture, register_architecture)
from deep.pretrain import PretrainConfig
from deep.protocol import TargetData, Tuning, load_protocol, protocol_from_dict, read_protocol_file
from deep.results import COLUMNS, ResultRow, ResultsFile, read_results, results_text
from deep.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# --- registries -------------------------------------------------------------------

def test_architecture_registry_builds_and_refuses_duplicates_and_unknown_names():
    arch = get_architecture("resnet26-w4")
    assert tuple(arch.blocks) == ("first", "second", "third", "last")
    assert arch.build(4, 1).conv1.in_channels == 1 and arch.build(4, 1).conv1.out_channels == 4
    with pytest.raises(ConfigError, match="already registered"):
        register_architecture(Architecture("resnet26", build_model, {"last": ("fc",)}))
    with pytest.raises(ConfigError, match="unknown arch 'resnet27'; known: resnet26, "):
        get_architecture("resnet27")
    with pytest.raises(ConfigError, match="unknown block 'fourth' for resnet26"):
        get_architecture("resnet26").prefixes("fourth")
    with pytest.raises(ConfigError, match="tuple of module-name prefixes"):
        Architecture("broken", build_model, {"first": ()})
    assert {"resnet26", "resnet26-w8", "resnet26-w4", "resnet50"} <= set(architecture_names())


def test_an_architecture_needs_blocks_and_each_prefix_a_non_empty_name():
    """Guards the checks of `Architecture`/`check_prefixes`: no blocks at all, a bare
    string (read as its letters, "fc" -> "f", "c", it would tune every parameter starting
    with those names' letters... or none) and an empty prefix (which `matches` would hold
    to no parameter) are each refused with the block named."""
    with pytest.raises(ConfigError, match="needs a name and at least one block"):
        Architecture("no-blocks", build_model, {})
    with pytest.raises(ConfigError, match=r"block 'last' needs a tuple .* \(one prefix is a "
                       r"tuple of one: \('fc',\)\)"):
        Architecture("bare", build_model, {"last": "fc"})
    with pytest.raises(ConfigError, match=r"broken: block 'first' needs a tuple of module-name "
                       r"prefixes, got \('conv1', ''\)"):
        Architecture("broken", build_model, {"first": ("conv1", ""), "last": ("fc",)})


def test_every_benchmark_is_registered_whole_module_entry_and_protocol():
    """A new benchmark is three pieces (docs/deep-engine.md, "Where to change what"): its module's
    `BENCHMARKS`, one line of `deep.data._MODULES`, `deep/configs/NAME.toml`. A missing
    piece showed only when that benchmark ran (one listed only in its module: "unknown
    benchmark"; a protocol without a benchmark: the same, from `sweep`)."""
    import importlib
    import pkgutil

    import deep.data
    from deep.data import benchmark_names, get_benchmark
    from deep.protocol import available_protocols
    for info in pkgutil.iter_modules(deep.data.__path__):
        module = importlib.import_module(f"deep.data.{info.name}")
        for name, bench in getattr(module, "BENCHMARKS", {}).items():
            assert name in benchmark_names(), f"{name} (deep/data/{info.name}.py) lacks its line of _MODULES"
            assert get_benchmark(name) is bench and bench.name == name
    assert set(available_protocols()) == set(benchmark_names())


def test_a_module_entry_its_module_does_not_list_says_where_to_add_it(monkeypatch):
    """Was `KeyError: 'toy'`, a traceback naming neither file."""
    import deep.data
    monkeypatch.setitem(deep.data._MODULES, "toy", "synthetic")
    with pytest.raises(ConfigError, match=r"_MODULES of deep/data/__init__.py maps benchmark "
                       r"'toy' to deep.data.synthetic, whose BENCHMARKS lists synthetic: add "
                       r"'toy' to that dict"):
        deep.data.get_benchmark("toy")


def test_a_module_entry_whose_module_lists_no_benchmark_says_none(monkeypatch):
    """Guards the `or 'none'` of get_benchmark's message: a module without BENCHMARKS
    (a helper module named by mistake) is said to list none, not an empty phrase."""
    import deep.data
    monkeypatch.setitem(deep.data._MODULES, "toy", "base")
    with pytest.raises(ConfigError, match=r"maps benchmark 'toy' to deep.data.base, whose "
                       r"BENCHMARKS lists none: add 'toy' to that dict"):
        deep.data.get_benchmark("toy")


def test_block_order_merges_every_architecture_in_forward_order():
    order = block_order()
    assert order.index("first") < order.index("second") < order.index("third") \
        < order.index("fourth") < order.index("last")
    a = Architecture("a", build_model, {"x": ("p",), "z": ("q",)})
    b = Architecture("b", build_model, {"x": ("p",), "y": ("q",), "z": ("r",)})
    assert block_order([a, b]) == ("x", "y", "z")


def test_every_method_list_derives_from_the_one_table():
    from deep import bench, report
    assert GENERIC_METHODS == tuple(METHODS) == bench.SINGLE_RUN
    assert report.METHOD_ORDER == (*block_order(), *GENERIC_METHODS)
    assert report.SINGLE_BLOCKS == block_order()
    blocks = get_architecture("resnet26").blocks
    assert method_names(blocks) == [*blocks, *METHODS]
    for name in method_names(blocks):
        assert get_method(name, blocks).name == name
    with pytest.raises(ConfigError, match="needs a block mapping"):
        get_method("lp-ft")


# --- configuration chain ----------------------------------------------------------

def test_tuning_defaults_are_the_engines():
    for name in ("batch_size", "weight_decay", "select"):
        field = next(f for f in dataclasses.fields(Tuning) if f.name == name)
        assert field.default == next(f.default for f in dataclasses.fields(TrainConfig)
                                     if f.name == name)
    tuning = load_protocol("synthetic").tuning
    config = tuning.run_config(0.01, 3, cache_mb=64)
    assert (config.lr, config.seed, config.epochs, config.cache_mb) == (0.01, 3, 10, 64)


def test_protocol_sections_tables_and_flat_attributes():
    raw = {"benchmark": "x", "arch": "resnet26", "shifts": ["a"], "methods": ["all"],
           "n_target": 10, "val_per_class": 1, "test_per_class": 0, "epochs": 2, "lrs": [0.1],
           "data": {"shared": 1}, "source_data": {"only_source": 2},
           "target_data": {"shared": 3}, "pretrain": {"epochs": 5}}
    p = protocol_from_dict(raw)
    assert p.epochs == 2 and p.tuning.epochs == 2 and p.shifts == ["a"]
    assert p.source_options == {"shared": 1, "only_source": 2}
    assert p.target_options == {"shared": 3}
    # a side's own table wins over the shared [data] on that side only
    both = protocol_from_dict({**raw, "source_data": {"shared": 2}, "target_data": {}})
    assert both.source_options == {"shared": 2} and both.target_options == {"shared": 1}
    assert p.pretrain == PretrainConfig(epochs=5)
    q = p.replace(epochs=3, n_target=20, arch="resnet50", lrs=None)
    assert (q.epochs, q.n_target, q.arch, q.lrs, p.epochs) == (3, 20, "resnet50", [0.1], 2)
    resolved = q.resolved()
    assert resolved["epochs"] == 3 and resolved["pretrain"]["epochs"] == 5
    assert resolved["pretrain"]["lr"] == PretrainConfig().lr   # the default, written once
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\]"):
        protocol_from_dict({**raw, "epoch": 1})
    with pytest.raises(ConfigError, match="unknown protocol field"):
        p.replace(nope=1)
    with pytest.raises(ConfigError, match="n_target must be at least 1, got 0"):
        p.replace(n_target=0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['depth'\] in \[pretrain\]; known: \["):
        protocol_from_dict({**raw, "pretrain": {"depth": 3}})


def test_the_resolved_configuration_records_each_loaders_own_options():
    """`resolved()` (saved beside the rows, compared on resume) holds the source loader's
    options under source_data and the target loader's under target_data."""
    raw = {"benchmark": "x", "arch": "resnet26", "shifts": ["a"], "methods": ["all"],
           "n_target": 10, "val_per_class": 1, "test_per_class": 0, "epochs": 2, "lrs": [0.1],
           "data": {"shared": 1, "both": 0}, "source_data": {"both": 2, "s": 5},
           "target_data": {"both": 3, "t": 6}}
    resolved = protocol_from_dict(raw).resolved()
    assert resolved["source_data"] == {"shared": 1, "both": 2, "s": 5}
    assert resolved["target_data"] == {"shared": 1, "both": 3, "t": 6}


@pytest.mark.parametrize("text, message", [
    ("lrs = 0.1", r"lrs must be a list, e\.g\. lrs = \[0\.1\], got 0\.1"),
    ('shifts = "noise"', r"shifts must be a list.*got 'noise'"),   # not five 1-letter shifts
    ('methods = "all"', r"methods must be a list"),
    ("data = 3", r"data must be a table"),
    ('epochs = "six"', r"epochs must be an integer, got 'six'"),
    ("lrs = [0.1", r"is not valid TOML: "),
    ('benchmark = "y"', r"benchmark = 'y' does not match the file name"),  # a copy left unedited
    # were tracebacks (a list as a registry key, an int as a path) or accepted
    ('arch = ["resnet26"]', r"arch must be a string, e\.g\. arch = \"\.\.\.\", got \['resnet26'\]"),
    ("pretrain = {init = 5}", r"init must be a weight file's path, or 'none', got 5"),
    ('pretrain = {compile = "yes"}', r"compile must be true or false, got 'yes'"),
    ('pretrain = {schedule = "step", milestones = 5}', r"milestones must be a list of epochs, "
                                                       r"e\.g\. \[75, 125\], got 5"),
])
def test_a_malformed_protocol_file_is_named_with_what_it_should_hold(tmp_path, text, message):
    key = text.split("=")[0].strip()
    lines = ['arch = "resnet26"', 'methods = ["all"]', "epochs = 2", "lrs = [0.1]",
             'shifts = ["a"]', "n_target = 10", "val_per_class = 1", "test_per_class = 0"]
    body = [line for line in lines if line.split("=")[0].strip() != key] + [text]
    (tmp_path / "x.toml").write_text("\n".join(body) + "\n")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "x.toml")) + r".*" + message):
        raw, path = read_protocol_file(tmp_path, "x")
        protocol_from_dict(raw, str(path))


def test_flags_are_generated_from_the_fields():
    parser = argparse.ArgumentParser()
    add_flags(parser, Tuning)
    add_flags(parser, TargetData)
    add_flags(parser, PretrainConfig, skip=("epochs", "batch_size", "seed", "weight_decay"))
    args = parser.parse_args(["--lrs", "0.1,0.01", "0.001", "--n-target", "5", "--select",
                              "worst_group_val_acc", "--compile", "--augment", "none"])
    assert flag_values(args, Tuning) == {"lrs": [0.1, 0.01, 0.001], "select": "worst_group_val_acc"}
    assert flag_values(args, TargetData) == {"n_target": 5}
    assert flag_values(args, PretrainConfig) == {"compile": True, "augment": "none"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--select", "test_acc"])          # choices from the field metadata
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(Tuning)} <= dests


def test_comma_lists_drop_the_spaces_around_each_value():
    """`--shifts "fog, snow"` names the shift `snow`, not ` snow` (which no benchmark has)."""
    from deep.flags import comma_list
    assert comma_list()("fog, snow ,, gaussian_noise") == ["fog", "snow", "gaussian_noise"]
    assert comma_list(float)(" 0.1, 1e-3") == [0.1, 0.001]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated float"):
        comma_list(float)("0.1, fast")


def test_a_malformed_list_flag_names_the_text_it_could_not_read(capsys):
    with pytest.raises(SystemExit):
        cli_args("sweep", "--benchmark", "synthetic", "--out", "x.csv", "--seeds", "0,1", "2,x")
    assert ("argument --seeds: expected comma-separated int values, got '2,x'"
            in capsys.readouterr().err)


def test_the_number_types_of_flags_take_their_bound_and_refuse_what_lies_past_it():
    from deep.flags import at_least, nonnegative_float, positive_floats
    assert at_least(1)("1") == 1 and at_least(0)("0") == 0 and at_least(1)("12") == 12
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1, got '0'"):
        at_least(1)("0")
    assert nonnegative_float("0") == 0.0 and nonnegative_float("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number >= 0, got '-0.5'"):
        nonnegative_float("-0.5")
    assert positive_floats("0.1, 1e-3,") == [0.1, 0.001]     # a trailing comma is no value
    # a repeat, in any spelling, would time or score one setting twice
    with pytest.raises(argparse.ArgumentTypeError, match=r"'0.1,1e-1' lists 0.1 more than once"):
        positive_floats("0.1,1e-1")


def test_threads_are_set_as_asked_one_included_and_a_bool_is_refused():
    """`--threads 1` is the count that reproduces the cached synthetic model: it must be
    applied, not taken for "leave torch's default" as 0 is."""
    import torch

    from deep.flags import set_threads
    torch.set_num_threads(2)
    set_threads(1)
    assert torch.get_num_threads() == 1
    set_threads(0)                       # 0: torch's default, left as it is
    assert torch.get_num_threads() == 1
    with pytest.raises(ConfigError, match="--threads must be an integer >= 0 .* got True"):
        set_threads(True)
    with pytest.raises(ConfigError, match="got -1"):
        set_threads(-1)


def cli_args(*argv):
    from deep.__main__ import add_pretrain_arguments, add_sweep_arguments
    parser = argparse.ArgumentParser()
    (add_sweep_arguments if "--out" in argv and "sweep" in argv else add_pretrain_arguments)(parser)
    return parser.parse_args([a for a in argv if a not in ("sweep", "pretrain")])


def test_sweep_flags_override_quick_override_the_file():
    args = cli_args("sweep", "--benchmark", "synthetic", "--out", "x.csv", "--quick",
                    "--epochs", "7", "--data", "extra=1")
    protocol = sweep_protocol(args)
    assert protocol.epochs == 7 and protocol.shifts == ["noise"] and protocol.lrs == [0.01]
    assert protocol.target_options == {"extra": 1}


def test_pretrain_takes_the_protocols_pretrain_table_then_flags():
    arch, config, options = pretrain_settings(cli_args(
        "pretrain", "--benchmark", "fmnist-c", "--out", "x.pt", "--lr", "0.05"))
    assert arch == "resnet26" and config.lr == 0.05
    assert config.epochs == load_protocol("fmnist-c").pretrain.epochs == 6 and config.compile
    assert options == {"severity": 5, "corruption_seed": 0}
    # --arch wins over the protocol's arch
    arch, _, _ = pretrain_settings(cli_args(
        "pretrain", "--benchmark", "fmnist-c", "--out", "x.pt", "--arch", "resnet26-w4"))
    assert arch == "resnet26-w4"


def test_a_flag_puts_back_a_value_the_file_changed_none_and_false_included():
    """fmnist-c.toml stops early (patience 4) and compiles its pretraining (compile =
    true): `--patience none` and `--no-compile` undo them; a flag not given keeps the
    file's value, and `--init none` stays the word that means random initialisation."""
    def sweep(*flags):
        return sweep_protocol(cli_args("sweep", "--benchmark", "fmnist-c", "--out", "x.csv",
                                       *flags))
    assert sweep().patience == 4 and sweep("--patience", "none").patience is None
    assert sweep("--quick", "--patience", "NONE").patience is None
    assert sweep("--patience", "2").patience == 2

    def pretrain(*flags):
        return pretrain_settings(cli_args("pretrain", "--benchmark", "fmnist-c", "--out", "x.pt",
                                          *flags))[1]
    assert pretrain().compile and not pretrain("--no-compile").compile
    assert pretrain("--compile").compile and pretrain().init is None
    assert pretrain("--init", "none").init == "none"
    with pytest.raises(SystemExit):
        cli_args("sweep", "--benchmark", "fmnist-c", "--out", "x.csv", "--patience", "some")


def test_pretrain_data_flag_overrides_the_protocols_data_table():
    # Guards a merge in the wrong order: fmnist-c.toml's severity 5 would win over --data.
    _, _, options = pretrain_settings(cli_args(
        "pretrain", "--benchmark", "fmnist-c", "--out", "x.pt", "--data", "severity=3"))
    assert options == {"severity": 3, "corruption_seed": 0}


def test_sweep_data_flag_overrides_the_files_target_data(tmp_path, monkeypatch):
    # Guards a merge in the wrong order: the file's [target_data] would win over --data.
    import deep.protocol as protocol_module
    text = (protocol_module.CONFIG_DIR / "synthetic.toml").read_text()
    (tmp_path / "synthetic.toml").write_text(text + "\n[target_data]\nextra = 1\nkept = 5\n")
    monkeypatch.setattr(protocol_module, "CONFIG_DIR", tmp_path)
    args = cli_args("sweep", "--benchmark", "synthetic", "--out", "x.csv", "--data", "extra=2")
    assert sweep_protocol(args).target_options == {"extra": 2, "kept": 5}


def test_pretrain_takes_the_protocols_source_data_and_not_its_target_data(tmp_path, monkeypatch):
    # guards: the source loader given [data] alone (its [source_data] options dropped)
    import deep.protocol as protocol_module
    text = (protocol_module.CONFIG_DIR / "synthetic.toml").read_text()
    (tmp_path / "synthetic.toml").write_text(
        text + "\n[source_data]\nsource_only = 2\n[target_data]\ntarget_only = 3\n")
    monkeypatch.setattr(protocol_module, "CONFIG_DIR", tmp_path)
    _, _, options = pretrain_settings(cli_args("pretrain", "--benchmark", "synthetic", "--out", "x.pt"))
    assert options == {"source_only": 2}


def test_pretrain_passes_its_device_flag_on(monkeypatch, capsys):
    import deep.__main__ as cli
    from deep.__main__ import main
    calls = []
    monkeypatch.setattr(cli, "pretrain_to_file", lambda *a, **k: calls.append(k) or
                        {"source_test_acc": 0.5, "seconds": 1.0})
    assert main(["pretrain", "--benchmark", "synthetic", "--out", "x.pt", "--device", "cuda:1"]) == 0
    assert calls[0]["device"] == "cuda:1"


def test_pretrain_sets_the_torch_threads_its_flag_asks_for(monkeypatch, capsys):
    """--threads is part of "same seed, same numbers" (the cached synthetic model trains
    on 1); no other test fails when the flag is parsed but never applied."""
    import torch

    import deep.__main__ as cli
    from deep.__main__ import main
    threads = []
    monkeypatch.setattr(cli, "pretrain_to_file", lambda *a, **k: threads.append(
        torch.get_num_threads()) or {"source_test_acc": 0.5, "seconds": 1.0})
    assert main(["pretrain", "--benchmark", "synthetic", "--out", "x.pt", "--threads", "3"]) == 0
    assert threads == [3]      # (the one_thread fixture puts the count back)


def test_the_manifests_command_quotes_an_argument_as_a_shell_would_need_it(monkeypatch, capsys):
    """The manifest's command is to be pasted into a shell: an --out with a space in it
    must come back as one argument."""
    import deep.__main__ as cli
    from deep.__main__ import main
    calls = []
    monkeypatch.setattr(cli, "pretrain_to_file", lambda *a, **k: calls.append(k) or
                        {"source_test_acc": 0.5, "seconds": 1.0})
    assert main(["pretrain", "--benchmark", "synthetic", "--out", "my models/x.pt",
                 "--lr", "0.05"]) == 0
    assert calls[0]["command"] == ("python -m deep pretrain --benchmark synthetic "
                                   "--out 'my models/x.pt' --lr 0.05")


def test_the_synthetic_protocol_records_how_its_cached_source_model_is_trained():
    """A sweep without --checkpoint uses the model `cached_source_model` trains from the
    benchmark's recipe; the protocol (shown, and saved beside the results) must say so."""
    from deep.data.synthetic import SOURCE_RECIPE
    assert load_protocol("synthetic").pretrain == PretrainConfig(**SOURCE_RECIPE)


def test_the_cached_source_model_is_retrained_when_its_network_or_data_code_changes(monkeypatch):
    """The cache is named by the recipe and by the code of the data module and the network's
    module: an edit to either (a BN moved, a generator changed, shapes kept) must not reuse
    a model the old code trained."""
    import inspect

    from deep import pretrain
    from deep.data import get_benchmark
    bench = get_benchmark("synthetic")
    path = pretrain.source_model_path(bench, "resnet26-w4")
    assert path == pretrain.source_model_path(bench, "resnet26-w4")
    assert path != pretrain.source_model_path(bench, "resnet26-w8")
    getsource = inspect.getsource
    for edited in ("deep.models.cifar_resnet", "deep.data.synthetic"):
        monkeypatch.setattr(pretrain.inspect, "getsource", lambda m, e=edited: getsource(m) + (
            "# edited" if m.__name__ == e else ""))
        assert pretrain.source_model_path(bench, "resnet26-w4") != path, edited
        monkeypatch.setattr(pretrain.inspect, "getsource", getsource)
    monkeypatch.setattr(pretrain.inspect, "getsource", lambda m: getsource(m) + (
        "# edited" if m.__name__ == "deep.models.vit" else ""))   # not this network's module
    assert pretrain.source_model_path(bench, "resnet26-w4") == path


class Trained(Exception):
    pass


def test_a_cached_model_without_its_manifest_is_trained_again(tmp_path, monkeypatch):
    """The manifest is written last: a model file without one (a builder killed between
    the two writes) is not whole and is trained again. Training stops at once here; the
    thread count `cached_source_model` lowers to 1 is put back even then."""
    import torch

    from deep import pretrain
    from deep.data import get_benchmark
    monkeypatch.setenv("SURGICAL_FT_CACHE", str(tmp_path))
    bench = get_benchmark("synthetic")
    path = pretrain.source_model_path(bench, "resnet26-w4")
    assert path.parent == tmp_path   # $SURGICAL_FT_CACHE names the cache folder
    path.write_bytes(b"half a model")

    def stop(*args, **kwargs):
        raise Trained
    monkeypatch.setattr(pretrain, "pretrain", stop)
    torch.set_num_threads(2)   # the one_thread fixture puts its own count back afterwards
    with pytest.raises(Trained):
        pretrain.cached_source_model(bench, "resnet26-w4")
    assert torch.get_num_threads() == 2


def test_the_protocols_are_listed_by_name_whatever_order_the_folder_gives(tmp_path, monkeypatch):
    import deep.protocol as protocol_module
    for name in ("waterbirds", "camelyon17", "fmnist-c", "celeba", "synthetic", "cifar10c"):
        (tmp_path / f"{name}.toml").write_text("")
    (tmp_path / "notes.txt").write_text("")
    monkeypatch.setattr(protocol_module, "CONFIG_DIR", tmp_path)
    assert protocol_module.available_protocols() == ["camelyon17", "celeba", "cifar10c",
                                                     "fmnist-c", "synthetic", "waterbirds"]


def test_a_protocol_that_does_not_exist_is_refused_with_the_list_of_those_that_do(tmp_path):
    for name in ("fmnist-c", "celeba"):
        (tmp_path / f"{name}.toml").write_text("")
    with pytest.raises(ConfigError, match=r"no protocol for benchmark 'mnist' \(.*mnist.toml "
                       r"missing\); known: celeba, fmnist-c$"):
        read_protocol_file(tmp_path, "mnist")
    with pytest.raises(ConfigError, match="no protocol for benchmark 'mnist' .*; known: none$"):
        read_protocol_file(tmp_path / "empty", "mnist")


def test_protocols_show_prints_resolved_values(capsys):
    assert main(["protocols", "--show", "fmnist-c"]) == 0
    out = capsys.readouterr().out
    assert "  epochs = 25" in out and "  patience = 4" in out and '"gaussian_noise"' in out
    assert "pretrain = {epochs = 6," in out and "compile = true" in out


@pytest.mark.parametrize("name", ["../configs/fmnist-c", "adapt/../fmnist-c", ".hidden"])
def test_a_protocol_is_named_not_given_as_a_path(capsys, name):
    """`--show ../x` used to read deep/configs/../x.toml, a file outside the configs."""
    assert main(["protocols", "--show", name]) == 2
    assert "named by their benchmark (e.g. fmnist-c), not a path" in capsys.readouterr().err


# --- results schema ---------------------------------------------------------------

def row(**changes):
    base = dict(benchmark="b", shift="s", method="all", seed=0, n_target=10, lr=0.01,
                status="ok", best_epoch=1, val_acc=0.5, val_worst_group_acc=None, test_acc=0.25,
                worst_group_acc=None, tuned_params=3, total_params=4, seconds=1.5, arch="a",
                epochs=1, batch_size=8, weight_decay=0.0001, select="val_acc", val_per_class=1,
                test_per_class=1, checkpoint="c.pt", start_stage=0, patience=4, precision="float32",
                device="cpu", commit="0123abcd+dirty", machine="Some CPU, AVX2, 1 thread; torch 2.13.0")
    return {**base, **changes}


def test_results_round_trip_and_column_order(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text(results_text([row(), row(seed=1, val_acc=None, status="diverged")]))
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS) == ",".join(ResultRow.columns())
    assert read_results(path) == [row(), row(seed=1, val_acc=None, status="diverged")]


def test_a_reader_never_sees_the_results_file_partly_written(tmp_path):
    """report and bench read a sweep's CSV while it runs: each append must replace the
    file whole (write aside, rename), never truncate it and write in place, or a reader
    meets an empty or half-written file and stops with a "malformed row" error."""
    path = tmp_path / "r.csv"
    results = ResultsFile(path)
    results.append(row(seed=0))
    # A reader that opened the file before an append goes on reading the old file, whole.
    with open(path, "rb") as opened_before:
        results.append(row(seed=1))
        assert opened_before.read() == results_text([row(seed=0)]).encode(), \
            "the file changed under a reader that had it open"
    # A reader polling during appends sees each time a complete file of no fewer rows.
    seen, bad, stop = [2], [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                n = len(read_results(path))
            except (ResultsError, OSError) as e:
                bad.append(repr(e))
                continue
            if n < seen[-1]:
                bad.append(f"{n} rows after {seen[-1]}")
            seen.append(n)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for seed in range(2, 40):
            results.append(row(seed=seed))
    finally:
        stop.set()
        reader.join(timeout=10)
    assert not bad, bad[:3]
    assert len(read_results(path)) == 40


@pytest.mark.parametrize("mangle,message", [
    (lambda t: t[:-40], r"r.csv, line 3: the file ends in the middle of a row"),
    (lambda t: t.replace(',"Some CPU, AVX2, 1 thread; torch 2.13.0"\n', "\n", 1),
     r"r.csv, line 2: 28 fields, expected 29"),
    (lambda t: t.replace(",0.25,", ",0.2x5,", 1), r"line 2: column 'test_acc' holds '0.2x5', "
                                                  r"which is not a float"),
    (lambda t: t.replace(",all,0,", ",all,,", 1), r"line 2: column 'seed' is empty; it needs a int"),
    (lambda t: t.replace(",ok,", ",fine,", 1), r"line 2: status 'fine' is not one of"),
])
def test_malformed_rows_stop_with_line_and_reason(tmp_path, mangle, message):
    path = tmp_path / "r.csv"
    path.write_text(mangle(results_text([row(), row(seed=1)])))
    with pytest.raises(ResultsError, match=message):
        read_results(path)


def test_cli_reports_a_truncated_results_file_not_a_settings_clash(tmp_path, capsys,
                                                                   synthetic_cache):
    out = tmp_path / "r.csv"
    small = ["sweep", "--benchmark", "synthetic", "--shifts", "noise", "--methods", "last",
             "--lrs", "0.01", "--seeds", "0,1", "--epochs", "1", "--n-target", "16",
             "--val-per-class", "2", "--test-per-class", "2", "--no-progress", "--out", str(out)]
    assert main(small) == 0
    config = json.loads((tmp_path / "r.csv.config.json").read_text())["configurations"]
    assert len(config) == 1 and config[0]["epochs"] == 1 and config[0]["seeds"] == [0, 1]
    out.write_text(out.read_text()[:-30])     # the last row cut short
    assert main(small) == 2
    err = capsys.readouterr().err
    assert "line 3: the file ends in the middle of a row" in err and "other settings" not in err


def test_the_config_json_describes_the_rows_that_exist(tmp_path, synthetic_cache):
    """A second configuration into the same results file is added beside the first; a
    results file deleted by hand takes its configurations with it."""
    out = tmp_path / "r.csv"
    small = ["sweep", "--benchmark", "synthetic", "--shifts", "noise", "--methods", "last",
             "--epochs", "1", "--n-target", "16", "--val-per-class", "2",
             "--test-per-class", "2", "--no-progress", "--out", str(out)]

    def seeds():
        path = tmp_path / "r.csv.config.json"
        return [c["seeds"] for c in json.loads(path.read_text())["configurations"]]

    assert main([*small, "--lrs", "0.01", "--seeds", "0"]) == 0
    assert main([*small, "--lrs", "0.01", "--seeds", "1"]) == 0
    assert seeds() == [[0], [1]]
    out.unlink()
    assert main([*small, "--lrs", "0.01", "--seeds", "2"]) == 0
    assert seeds() == [[2]]


# --- the CLI's error types --------------------------------------------------------

def test_cli_catches_only_the_projects_errors(monkeypatch, capsys):
    import deep.__main__ as cli

    def bug(args):
        raise ValueError("an internal bug")   # a ValueError, but not one of ours

    def bad_input(args):
        raise ConfigError("a clear message")

    monkeypatch.setitem(cli.COMMANDS, "protocols", ("p", cli.add_protocols_arguments, bad_input))
    assert main(["protocols"]) == 2 and "error: a clear message" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "protocols", ("p", cli.add_protocols_arguments, bug))
    with pytest.raises(ValueError, match="an internal bug"):
        main(["protocols"])
    assert issubclass(ConfigError, DeepError) and issubclass(DeepError, ValueError)

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "protocols", ("p", cli.add_protocols_arguments, interrupted))
    assert main(["protocols"]) == 130      # Ctrl-C: how to resume, not a traceback
    assert "interrupted; `python -m deep protocols` with the same arguments resumes" in \
        capsys.readouterr().err


# --- the resolved configuration in manifests --------------------------------------

def test_manifests_hold_the_resolved_configuration(tmp_path, synthetic_checkpoint):
    from deep.files import verify_checkpoint
    from deep.data.synthetic import SOURCE_RECIPE

    cached = verify_checkpoint(synthetic_checkpoint)["config"]
    assert cached["pretrain"] == dataclasses.asdict(PretrainConfig(**SOURCE_RECIPE))
    out = tmp_path / "src.pt"
    assert main(["pretrain", "--benchmark", "synthetic", "--arch", "resnet26-w4", "--epochs", "1",
                 "--augment", "none", "--out", str(out)]) == 0
    config = verify_checkpoint(out)["config"]
    # the synthetic protocol's [pretrain] table (= SOURCE_RECIPE), then the flags
    assert config["pretrain"] == dataclasses.asdict(PretrainConfig(**{**SOURCE_RECIPE,
                                                                      "epochs": 1}))
    assert (config["benchmark"], config["arch"], config["source_data"]) == \
        ("synthetic", "resnet26-w4", {})


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(lr=0, epochs=1), "lr must be a positive number, got 0"),
    (lambda: TrainConfig(lr=float("inf"), epochs=1), "lr must be a positive number, got inf"),
    (lambda: TrainConfig(lr=1e-3, epochs=1, optimizer="rmsprop"),
     "optimizer must be one of adam, sgd; got 'rmsprop'"),
    (lambda: TrainConfig(lr=1e-3, epochs=1, select="test_acc"),
     "select must be one of val_acc, worst_group_val_acc; got 'test_acc'"),
    (lambda: Tuning(methods=["all"], epochs=1, lrs=[1e-3, -1e-2]), "every lr of lrs must be a positive number, got -0.01"),
    (lambda: Tuning(methods=["all"], epochs=1, lrs=[]), "lrs must be a non-empty list"),
    (lambda: Tuning(methods=["all"], epochs=1, lrs=[1e-3], select="val"), "select must be one of val_acc, worst_group_val_acc"),
])
def test_the_engine_and_the_protocol_check_settings_with_one_message(make, message):
    """The protocol (Tuning) and the engine (TrainConfig) share deep.errors' checks, so the
    same bad value gets the same ConfigError whichever layer sees it first."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be at least 1, got 0"),
    ("batch_size", 6.5, "batch_size must be an integer, got 6.5"),
    ("patience", 0, "patience must be at least 1, got 0"),
    ("patience", 2.5, "patience must be an integer, got 2.5"),
])
def test_a_protocols_batch_size_and_patience_are_checked_where_they_are_given(field, value,
                                                                              message):
    """Named with the file that holds them, and a flag's before anything runs, not by the
    first cell's TrainConfig after the source model was resolved (or trained)."""
    raw = {"benchmark": "x", "arch": "resnet26", "shifts": ["a"], "methods": ["all"],
           "n_target": 10, "val_per_class": 1, "test_per_class": 0, "epochs": 2, "lrs": [0.1]}
    with pytest.raises(ConfigError, match=r"^x\.toml: " + re.escape(message)):
        protocol_from_dict({**raw, field: value}, "x.toml")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_protocol("synthetic").replace(**{field: value})


@pytest.mark.parametrize("seed, message", [
    (-1, "seed must be at least 0, got -1"),
    (1.5, "seed must be an integer, got 1.5"),
    ("0", "seed must be an integer, got '0'"),
    (2**64, "seed must be below 2**63, got 18446744073709551616"),
])
def test_every_seed_is_checked_by_one_rule_wherever_it_is_given(seed, message):
    """A seed torch's generators cannot take (2**64 overflows, -1 wraps around) or that
    int() would change (1.5 -> 1) is refused by deep.errors.check_seed where a config is
    made, not as a traceback at the first generator, nor silently run as another seed."""
    from deep.checkpoints import load_model
    from deep.data.base import DataError, seeded
    for make in (lambda: TrainConfig(lr=1e-3, epochs=1, seed=seed),
                 lambda: PretrainConfig(seed=seed),
                 lambda: load_model("none", "resnet26-w4", 4, 3, seed=seed)):
        with pytest.raises(ConfigError, match=re.escape(message)):
            make()
    # the loaders' generators: torch's whole range, 2**64 the first value out of it
    with pytest.raises(DataError, match=re.escape(message.replace("2**63", "2**64"))):
        seeded(seed)


def test_a_pretrain_seed_out_of_range_is_one_line(tmp_path, capsys):
    assert main(["pretrain", "--benchmark", "synthetic", "--out", str(tmp_path / "m.pt"),
                 "--seed", "99999999999999999999"]) == 2
    assert "error: seed must be below 2**63, got 99999999999999999999" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_differences_names_a_setting_present_on_one_side_only():
    """A resume compares the saved key with the current one by `differences`: a setting
    added (or dropped) since the save must count as a difference, with None on the side
    that lacks it, else a changed run would resume an unrelated checkpoint."""
    assert differences({"a": 1}, {"a": 1, "b": 2}) == {"b": (None, 2)}
    assert differences({"a": 1, "b": 2}, {"a": 1}) == {"b": (2, None)}
    assert differences({"o": {"x": 1}}, {"o": {"x": 1, "y": [3]}}) == {"o.y": (None, [3])}
    assert differences({"a": 1}, {"a": 1}) == {}


def test_a_cell_appended_twice_is_refused_and_the_file_keeps_one_row(tmp_path):
    """Guards ResultsFile.append's check: a cell recorded twice (a resumed sweep that
    re-ran a finished cell) would leave a file that no later run or report accepts
    ("holds duplicated cells"); the second append is refused and the file is unchanged."""
    path = tmp_path / "r.csv"
    results = ResultsFile(path)
    results.append(row(seed=0))
    with pytest.raises(ResultsError, match=r"cell \('b', 's', 'all', 0, 10, 0.01\) is already in"):
        results.append(row(seed=0, test_acc=0.75))
    assert read_results(path) == [row(seed=0)]
    assert ResultsFile(path).rows == [row(seed=0)]


# --- check_int: the one integer rule of every setting ------------------------------------

@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), np.array(3), torch.tensor(3)])
def test_check_int_takes_an_integer_of_any_kind_and_returns_a_python_int(value):
    got = check_int("n", value)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value", [True, np.True_, torch.tensor(True), 2.0, 2.5, np.float64(2.0),
                                   torch.tensor(2.5), torch.tensor([3, 4]), np.array([3]), "3", None])
def test_check_int_refuses_what_is_not_an_integer_rather_than_rounding_it(value):
    # a float tensor has __index__ too (it raises when called): 2.5 once became 2
    with pytest.raises(ConfigError, match=r"^n must be an integer, got "):
        check_int("n", value)


def test_check_int_holds_a_value_to_its_bounds_and_names_them():
    assert check_int("severity", 1, maximum=5) == 1 and check_int("severity", 5, maximum=5) == 5
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ConfigError, match=rf"^severity must be an integer in 1\.\.5, got {bad!r}$"):
            check_int("severity", bad, maximum=5)
    assert check_int("seed", 0, minimum=0) == 0
    with pytest.raises(ConfigError, match=r"^seed must be at least 0, got -1$"):
        check_int("seed", -1, minimum=0)
    with pytest.raises(ValueError) as caught:  # the error type is the caller's
        check_int("contrast: severity", 9, error=ValueError, maximum=5)
    assert type(caught.value) is ValueError


def test_check_between_holds_a_number_to_its_interval_open_or_closed_at_the_top():
    """momentum and TENT's beta in [0, 1) (1 never forgets), source_agreement in [0, 1]."""
    for value in (0, 0.0, 0.5, 0.999):
        assert check_between("momentum", value, 0, 1, high_open=True) == value
    for bad in (1, 1.0, -0.1, float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(ConfigError, match=r"^momentum must be a number in \[0, 1\), got "):
            check_between("momentum", bad, 0, 1, high_open=True)
    assert check_between("agreement", 1, 0, 1, noun="a fraction") == 1
    for bad in (1.5, True, False):                    # a bool is no fraction, though 0 <= True <= 1
        with pytest.raises(ConfigError, match=rf"^agreement must be a fraction in \[0, 1\], got {bad}$"):
            check_between("agreement", bad, 0, 1, noun="a fraction")
    with pytest.raises(ValueError) as caught:
        check_between("x", 3, 0, 1, error=ValueError)
    assert type(caught.value) is ValueError


def _result_row(**changes):
    from tests.deep.fixtures.rows import result_row
    return dict(result_row(val_worst_group_acc=0.4, worst_group_acc=0.3), **changes)


def test_outcome_differences_compare_every_measured_column_and_nothing_else():
    from deep.results import outcome_differences
    old = _result_row()
    measured = dict(status="diverged", best_epoch=2, val_acc=0.6, val_worst_group_acc=0.41,
                    test_acc=0.5000000000000001, worst_group_acc=None)
    elsewhere = dict(seconds=9.0, machine="other cpu", commit="abc+dirty", tuned_params=11,
                     device="cuda", lr=0.1)
    assert outcome_differences(old, _result_row(**elsewhere)) == {}
    assert outcome_differences(old, _result_row(**measured, **elsewhere)) == {
        "status": ("ok", "diverged"), "best_epoch": (1, 2), "val_acc": (0.5, 0.6),
        "val_worst_group_acc": (0.4, 0.41), "test_acc": (0.5, 0.5000000000000001),
        "worst_group_acc": (0.3, None)}


def test_floats_survive_the_results_file_bit_for_bit(tmp_path):
    import struct
    values = [0.1 + 0.2, 1 / 3, 5e-324, 1e300 * 1.7976931348623157, 0.9999999999999999, 1e-4]
    rows = [_result_row(seed=k, test_acc=v, seconds=v, lr=v) for k, v in enumerate(values)]
    (tmp_path / "r.csv").write_text(results_text(rows))
    back = read_results(tmp_path / "r.csv")
    for column in ("test_acc", "seconds", "lr"):
        assert [struct.pack("<d", r[column]) for r in back] == [struct.pack("<d", v) for v in values]


def test_a_folder_is_no_results_file_and_a_blank_file_has_no_rows(tmp_path):
    with pytest.raises(ResultsError, match=r"is a folder; a results file is expected \(e\.g\. "
                       r".*results\.csv\)"):
        read_results(tmp_path)
    (tmp_path / "blank.csv").write_text(" \n\n\t\n")
    assert read_results(tmp_path / "blank.csv") == []
    assert read_results(tmp_path / "missing.csv") == []


def test_a_row_with_an_unknown_status_is_refused_with_the_known_ones(tmp_path):
    (tmp_path / "r.csv").write_text(results_text([_result_row()]).replace(",ok,", ",done,"))
    with pytest.raises(ResultsError, match=r"r\.csv, line 2: status 'done' is not one of "
                       r"\('ok', 'diverged'\)"):
        read_results(tmp_path / "r.csv")


def test_a_file_with_an_older_header_is_read_with_its_missing_columns_empty(tmp_path):
    from deep.results import LEGACY_COLUMNS
    full = results_text([_result_row(patience=3, machine="cpu")]).splitlines()
    short = [",".join(LEGACY_COLUMNS), ",".join(full[1].split(",")[:len(LEGACY_COLUMNS)])]
    (tmp_path / "r.csv").write_text("\n".join(short) + "\n")
    (back,) = read_results(tmp_path / "r.csv")
    assert back["test_acc"] == 0.5 and back["patience"] is None and back["machine"] is None


def test_a_results_file_refuses_to_append_a_cell_it_holds(tmp_path):
    results = ResultsFile(tmp_path / "r.csv")
    results.append(_result_row())
    with pytest.raises(ResultsError, match=r"cell \('synthetic', 'noise', 'all', 0, 100, 0\.01\) "
                       r"is already in"):
        results.append(_result_row(test_acc=0.9))
    assert [r["test_acc"] for r in read_results(tmp_path / "r.csv")] == [0.5]
