"""The method table of deep.adapt (core.METHODS) drives every site: the protocol's tables,
the command line's methods, flags and --quick streams, the adapter maker and the runner.
A trivial third method registered in the table alone must show up in all of them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from deep.adapt import cli, core
from deep.adapt.cli import add_arguments, protocol_from_args
from deep.adapt.core import (METHODS, Adapter, AdaptMethod, MemoConfig, TentConfig,
                             adapted_parameter_names, make_adapter)
from deep.adapt.protocol import AdaptProtocol, load_adapt_protocol
from deep.adapt.results import read_adapt_results
from deep.adapt.runner import run_adaptation
from deep.blocks import blocks_for
from deep.errors import ConfigError
from deep.models import build_model

ARCH = "resnet26-w4"
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:checkpoint 'none'")]


# --- a trivial third method: predicts with the source model, in batches of `batch` ----------

@dataclass(frozen=True)
class EchoConfig:
    lr: float = 0.1
    repeats: int = field(default=3, metadata={"help": "ECHO: how often to say it"})
    batch: int = field(default=2, metadata={"help": "ECHO: images per batch"})
    tone: str = field(default="low", metadata={"help": "ECHO: its tone",
                                               "choices": ("low", "high")})


class EchoAdapter(Adapter):
    batches: list[int] = []

    def __init__(self, model, names, config, episodic):
        self.config = config
        super().__init__(model, names, episodic)

    def _optimizer(self):
        return torch.optim.SGD(self.params, lr=self.config.lr)

    def _predict(self, x):
        EchoAdapter.batches.append(len(x))
        with torch.no_grad():
            return self.model(x)


ECHO = AdaptMethod(
    "echo", "ECHO", EchoConfig,
    parameters=lambda model, option, names, prefixes: names[:1],
    make=lambda model, names, config, prefixes, episodic, augment, generator:
        EchoAdapter(model, names, config, episodic),
    batch_size=lambda config: config.batch, flags=("repeats", "batch", "tone"),
    quick_images=4, quick_blocks=("none", "second"))


@pytest.fixture
def echo(monkeypatch):
    """ECHO registered in the table, and nowhere else."""
    monkeypatch.setitem(METHODS, "echo", ECHO)
    EchoAdapter.batches = []
    return ECHO


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def cli_protocol(*argv) -> AdaptProtocol:
    return protocol_from_args(parser().parse_args(["--benchmark", "fmnist-c", "--out", "r.csv",
                                                   *argv]))


def action(p: argparse.ArgumentParser, flag: str) -> argparse.Action:
    found, = [a for a in p._actions if flag in a.option_strings]
    return found


def tiny(**kw) -> AdaptProtocol:
    fields = dict(benchmark="synthetic", arch=ARCH, shifts=["noise"], methods=["echo"],
                  blocks=["none", "first"], seeds=[0], images=5, test_per_class=3,
                  checkpoint="none")
    return AdaptProtocol.from_dict({**fields, **kw})


# --- the table reaches every site ------------------------------------------------------------

def test_a_method_in_the_table_reaches_the_command_line(echo):
    p = parser()
    assert "echo" in action(p, "--method").help
    assert "batch (ECHO)" in action(p, "--episodic").help and "ECHO" in action(p, "--images").help
    assert "ECHO on the first 4 images, blocks none,second" in action(p, "--quick").help
    tone = action(p, "--tone")
    assert tone.choices == ["low", "high"] and tone.default is argparse.SUPPRESS  # absent unless given
    assert tone.help == "ECHO: its tone (built-in default: low)"
    protocol = cli_protocol("--method", "echo", "--repeats", "5", "--batch", "4", "--lr", "0.2,0.3",
                            "--images", "8")
    assert protocol.methods == ["echo"]
    assert protocol.configs("echo") == [EchoConfig(lr=0.2, repeats=5, batch=4),
                                        EchoConfig(lr=0.3, repeats=5, batch=4)]
    assert protocol.images_of("echo") == 8
    assert cli_protocol().config("echo") == EchoConfig()     # no [echo] table: the defaults
    quick = cli_protocol("--quick", "--method", "echo")
    assert quick.blocks_of("echo") == ["none", "second"] and quick.images_of("echo") == 4
    with pytest.raises(SystemExit):
        parser().parse_args(["--benchmark", "b", "--out", "o", "--tone", "loud"])


def test_quick_caps_the_stream_at_the_methods_quick_length_and_keeps_a_shorter_one(echo):
    """--quick runs at most the method's quick_images (ECHO: 4); a shorter --images is kept,
    --images 0 (all) and a longer one are cut to 4; --blocks given with it is kept."""
    for given, want in ((None, 4), ("0", 4), ("2", 2), ("50", 4)):
        argv = ["--quick", "--method", "echo"] + (["--images", given] if given else [])
        assert cli_protocol(*argv).images_of("echo") == want, given
    assert cli_protocol("--quick", "--method", "echo", "--blocks", "first").blocks_of("echo") \
        == ["first"]


def test_a_method_in_the_table_reaches_the_protocol(echo):
    protocol = tiny(echo={"repeats": 2, "lr": [0.1, 0.2], "blocks": ["first"]})
    assert [c.lr for c in protocol.configs("echo")] == [0.1, 0.2]
    assert protocol.blocks_of("echo") == ["first"]
    assert protocol.replace(echo={"batch": 3}).config("echo") == EchoConfig(batch=3)
    with pytest.raises(ConfigError, match=r"\[echo\]: unknown key"):
        tiny(echo={"repeatz": 2})
    # It adapts on batches (batch_size 2): a one-image stream is refused, naming the
    # methods that adapt one image at a time.
    with pytest.raises(ConfigError, match="ECHO needs streams of at least 2 images.*--method memo"):
        tiny(images=1)
    assert load_adapt_protocol("fmnist-c").config("echo") == EchoConfig()


def test_a_method_in_the_table_reaches_the_adapter_maker_and_the_runner(echo, tmp_path):
    model = build_model(ARCH, num_classes=4, in_channels=3)
    blocks = blocks_for(ARCH)
    names = adapted_parameter_names(model, "echo", "first", blocks)
    assert len(names) == 1
    adapter = make_adapter(model, "echo", "first", blocks, EchoConfig())
    assert isinstance(adapter, EchoAdapter) and adapter.names == names
    with pytest.raises(ConfigError, match="ECHO needs a EchoConfig"):
        make_adapter(model, "echo", "first", blocks, TentConfig())
    EchoAdapter.batches = []
    summary = run_adaptation(tiny(echo={"batch": 2}), tmp_path / "r.csv", progress=False)
    assert summary.ran == 2
    rows = read_adapt_results(tmp_path / "r.csv")
    assert {(r["method"], r["blocks"]) for r in rows} == {("echo", "none"), ("echo", "first")}
    assert EchoAdapter.batches == [2, 3] * 2       # its batch size; a trailing one joins


def test_without_the_row_the_method_is_unknown_everywhere():
    assert "echo" not in METHODS
    with pytest.raises(ConfigError, match="unknown method 'echo'; known: memo, tent"):
        adapted_parameter_names(torch.nn.Linear(2, 2), "echo", "all", {})
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['echo'\]"):
        tiny()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['echo'\]"):
        tiny(methods=["memo"], echo={})
    assert "--repeats" not in parser().format_help()


# --- the flags come from the config dataclasses ---------------------------------------------

def test_method_flags_are_the_flagged_config_fields_with_their_dataclass_defaults():
    p = parser()
    for spec in METHODS.values():
        for f in dataclasses.fields(spec.config):
            flag = "--" + f.name.replace("_", "-")
            if f.name not in spec.flags:
                assert flag not in p.format_help() or f.name == "lr"   # --lr: every method's
                continue
            a = action(p, flag)
            assert a.default is argparse.SUPPRESS      # the protocol's value stays unless given
            assert a.help.endswith(f"(built-in default: {f.default})")
            assert a.help.startswith(f"{spec.label}: ")
    assert action(p, "--batch-stats").choices == list(core.BATCH_STATS)
    assert {n for s in METHODS.values() for n in s.flags} == {
        "copies", "prior_strength", "batch_size", "batch_stats"}     # the flags of before
    assert all(s.label in cli.HELP for s in METHODS.values())
    args = p.parse_args(["--benchmark", "fmnist-c", "--out", "r.csv", "--copies", "4",
                         "--prior-strength", "16", "--batch-size", "50", "--batch-stats", "all",
                         "--blocks", "none, first", "--seeds", "1, 2", "--lr", "0.1,0.2"])
    protocol = protocol_from_args(args)
    assert (protocol.config("memo").copies, protocol.config("memo").prior_strength) == (4, 16.0)
    assert protocol.config("tent") == TentConfig(batch_size=50, batch_stats="all", lr=0.1)
    assert protocol.blocks_of("tent") == ["none", "first"] and protocol.seeds == [1, 2]
    assert [c.lr for c in protocol.configs("memo")] == [0.1, 0.2]
    assert MemoConfig().copies == 32 and TentConfig().batch_size == 200


def test_two_methods_flagging_one_field_is_an_error(monkeypatch):
    monkeypatch.setitem(METHODS, "tent2", dataclasses.replace(METHODS["tent"], name="tent2"))
    with pytest.raises(ConfigError, match=r"flags field\(s\) \['batch_size', 'batch_stats'\]"):
        parser()
