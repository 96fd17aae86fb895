"""The adaptation results file and its summary, and what `python -m deep adapt` checks
before any stream runs (deep.adapt.results, deep.adapt.protocol, deep.adapt.cli)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch

import deep
from deep.__main__ import main
from deep.adapt.cli import add_arguments, protocol_from_args
from deep.adapt.core import METHODS
from deep.adapt.protocol import AdaptProtocol, load_adapt_protocol
from deep.adapt.results import (AdaptResults, best_block, markdown_table, read_adapt_results,
                                relative_table, report_text, write_adapt_report)
from deep.adapt.runner import augment_generator, run_adaptation, stream_order, stream_settings
from deep.checkpoints import save_checkpoint
from deep.errors import ConfigError, ResultsError
from deep.models import build_model
from deep.results import recorded_checkpoint, same_checkpoint

ARCH = "resnet26-w4"
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:checkpoint 'none'")]


def _protocol(**kw) -> AdaptProtocol:
    fields = dict(benchmark="synthetic", arch=ARCH, shifts=["noise"], methods=["memo", "tent"],
                  blocks=["none", "first"], seeds=[0], images=6, test_per_class=3,
                  checkpoint="none", memo={"copies": 2, "lr": 0.01}, tent={"batch_size": 3})
    return AdaptProtocol.from_dict({**fields, **kw})


def _row(images, blocks, acc, lr=0.0005, seed=0, shift="fog"):
    return {"benchmark": "fmnist-c", "shift": shift, "method": "memo", "blocks": blocks,
            "seed": seed, "episodic": False, "images": images, "lr": lr, "test_acc": acc,
            "adapted_params": 0, "total_params": 10, "seconds": 1.0, "arch": "resnet26",
            "checkpoint": "w.pt", "test_per_class": 90, "settings": "{}"}


# --- the summary keeps stream lengths apart ---------------------------------------------------

def test_streams_of_two_lengths_get_a_table_each(tmp_path):
    """One seed, one shift, two stream lengths: 200 images (+10 points) and 900 (-10).
    Pooled, the 900-image difference overwrote the 200-image one and `none` read
    60 ± 10 "over seeds" with only one seed."""
    results = AdaptResults(tmp_path / "r.csv")
    for row in (_row(200, "none", 0.5), _row(200, "first", 0.6),
                _row(900, "none", 0.7), _row(900, "first", 0.6)):
        results.append(row)
    rows = read_adapt_results(tmp_path / "r.csv")
    table = relative_table(rows)
    assert set(table) == {("memo", False, 0.0005, 200), ("memo", False, 0.0005, 900)}
    short, full = table[("memo", False, 0.0005, 200)], table[("memo", False, 0.0005, 900)]
    assert short["rel"][("fog", "first")][:1] == pytest.approx((0.1,))
    assert full["rel"][("fog", "first")][:1] == pytest.approx((-0.1,))
    assert short["none"]["fog"][0] == pytest.approx(0.5) and short["none"]["fog"][2] == 1
    assert full["none"]["fog"][0] == pytest.approx(0.7) and full["none"]["fog"][2] == 1
    text = markdown_table(rows)
    assert "lr 0.0005 (200 images per stream)" in text
    assert "lr 0.0005 (900 images per stream)" in text
    assert "| fog | 50.0 | +10.0 | (first) |" in text    # one seed: never separated
    assert "| fog | 70.0 | -10.0 | none |" in text       # nothing beats no adaptation: best none


def test_each_table_names_only_its_own_stream_length():
    rows = [_row(200, "none", 0.5, lr=0.005), _row(200, "first", 0.4, lr=0.005),
            _row(900, "none", 0.5), _row(900, "first", 0.55)]
    text = markdown_table(rows)
    assert "lr 0.005 (200 images per stream)" in text
    assert "lr 0.0005 (900 images per stream)" in text
    assert "200/900" not in text


def test_best_is_none_when_no_block_beats_no_adaptation():
    rows = [_row(200, "none", 0.5), _row(200, "first", 0.4), _row(200, "last", 0.5)]
    assert "| fog | 50.0 | -10.0 | +0.0 | none |" in markdown_table(rows)
    rows += [_row(200, "all", 0.52)]
    assert "| fog | 50.0 | -10.0 | +0.0 | +2.0 | (all) |" in markdown_table(rows)


def _seeds(blocks_acc: dict[str, list[float]], shift="fog") -> list[dict]:
    """Rows for seeds 0, 1, 2, ...: blocks_acc[block][seed] is the stream's accuracy."""
    return [_row(200, b, acc, seed=d, shift=shift) for b, accs in blocks_acc.items()
            for d, acc in enumerate(accs)]


def test_best_is_named_only_as_far_as_the_seeds_separate_it():
    """Three seeds. `first` gains 10 +- 1 points, `last` 2 +- 1: separated from no
    adaptation and from the runner-up, so `first`. With `last` at 9.5 +- 1 the two are
    not separated at 95 %: `first ≈ last`. With gains of +3, -2, +2 the mean is positive
    but the interval covers 0: `(first)`."""
    none = [0.50, 0.52, 0.48]
    rows = _seeds({"none": none, "first": [a + g for a, g in zip(none, (0.09, 0.10, 0.11))],
                   "last": [a + g for a, g in zip(none, (0.01, 0.02, 0.03))]})
    table = relative_table(rows)[("memo", False, 0.0005, 200)]
    assert best_block(table, "fog") == "first"
    rows = _seeds({"none": none, "first": [a + g for a, g in zip(none, (0.09, 0.10, 0.11))],
                   "last": [a + g for a, g in zip(none, (0.105, 0.085, 0.095))]})
    table = relative_table(rows)[("memo", False, 0.0005, 200)]
    assert best_block(table, "fog") == "first ≈ last"
    rows = _seeds({"none": none, "first": [a + g for a, g in zip(none, (0.03, -0.02, 0.02))],
                   "last": [a - 0.01 for a in none]})
    table = relative_table(rows)[("memo", False, 0.0005, 200)]
    assert best_block(table, "fog") == "(first)"
    assert "| fog | 50.0 ± 1.2 | +1.0 ± 1.5 | -1.0 ± 0.0 | (first) |" in markdown_table(rows)


def test_each_pair_of_blocks_gets_its_paired_interval():
    """Gains per seed (points): first 9, 10, 11; last 10, 8, 11; all 0, 0, 3. first - all:
    9, 10, 8, mean 9, s.e. 1/sqrt(3), t(2, 0.975) = 4.303: [+6.5, +11.5], separated;
    last - all: 10, 8, 8: [+5.8, +11.5], separated; first - last: -1, 2, 0: [-3.5, +4.1],
    not, so listed after the separated pairs although first has the larger mean. With one
    seed there is no interval and no line."""
    none = [0.50, 0.52, 0.48]
    rows = _seeds({"none": none, "first": [a + g for a, g in zip(none, (0.09, 0.10, 0.11))],
                   "last": [a + g for a, g in zip(none, (0.10, 0.08, 0.11))],
                   "all": [a + g for a, g in zip(none, (0.00, 0.00, 0.03))]})
    line = next(x for x in markdown_table(rows).splitlines() if x.startswith("Between blocks"))
    assert line.startswith("Between blocks (fog;")
    assert line.endswith(": `first` - `all` +9.0 [+6.5, +11.5] *, `last` - `all` +8.7 "
                         "[+5.8, +11.5] *, `first` - `last` +0.3 [-3.5, +4.1].")
    assert "Between blocks" not in markdown_table([r for r in rows if r["seed"] == 0])


def test_each_gain_gets_its_interval_against_no_adaptation():
    """Gains of `all` per seed (points): 0, 0, 3: mean 1.0, s.e. 1 (sd sqrt(3) over
    sqrt(3)), t(2, 0.975) = 4.303: [-3.3, +5.3]; `first` 9, 10, 11: mean 10, s.e.
    1/sqrt(3): [+7.5, +12.5]. One seed: no interval table (there is no interval)."""
    none = [0.50, 0.52, 0.48]
    rows = _seeds({"none": none, "first": [a + g for a, g in zip(none, (0.09, 0.10, 0.11))],
                   "all": [a + g for a, g in zip(none, (0.00, 0.00, 0.03))]})
    lines = markdown_table(rows).splitlines()
    start = lines.index("95 % t intervals of the same gains (seed-paired with no adaptation):")
    assert lines[start + 2:start + 5] == ["| shift | first | all |", "|---|---|---|",
                                          "| fog | +10.0 [+7.5, +12.5] | +1.0 [-3.3, +5.3] |"]
    assert "95 % t intervals of the same gains" not in markdown_table([r for r in rows if r["seed"] == 0])


def test_best_of_the_mean_row_pairs_each_seed_over_shifts():
    """Per shift `first` and `last` trade places, so neither is separated on a shift; over
    the two shifts `first` gains 1 point more on every seed, which the paired mean row
    separates (an unpaired comparison of the two means would not)."""
    rows = []
    for shift, (first, last) in {"fog": ((0.10, 0.12, 0.14), (0.05, 0.09, 0.13)),
                                 "snow": ((0.06, 0.04, 0.02), (0.09, 0.05, 0.01))}.items():
        rows += _seeds({"none": [0.5, 0.5, 0.5], "first": [0.5 + g for g in first],
                        "last": [0.5 + g for g in last]}, shift=shift)
    table = relative_table(rows)[("memo", False, 0.0005, 200)]
    assert best_block(table, "mean") == "first"
    assert best_block(table, "fog").endswith("≈ last") or best_block(table, "fog") == "(first)"


@pytest.mark.parametrize("csv, table", [
    ("results.csv", "table.md"), ("memo-bn-prior.csv", "memo-bn-prior/table.md"),
    ("memo-full-stream.csv", "memo-full-stream/table.md")])
def test_committed_tables_are_what_their_results_give(csv, table):
    """The committed online-adaptation tables (README and docs quote them) regenerate
    from their CSVs: `python -m deep report figures/fmnist-adapt/<csv> --out ...`."""
    root = Path(__file__).resolve().parents[2] / "figures" / "fmnist-adapt"
    rows = read_adapt_results(root / csv)
    assert (root / table).read_text() == report_text(csv, rows)


# --- a resumed stream must agree on every setting; floats come back exactly -------------------

_KEY = ("benchmark", "shift", "method", "blocks", "seed", "episodic", "images", "lr")
_SETTINGS = {"arch": "resnet26", "checkpoint": "w.pt", "test_per_class": 90, "settings": "{}"}


@pytest.mark.parametrize("column,other", [("test_per_class", 45), ("arch", "resnet50"),
                                          ("settings", '{"copies": 4}')])
def test_a_finished_stream_of_other_settings_is_refused_not_skipped(tmp_path, column, other):
    """A stream finished on a test split of 90 images per class is not the same stream on
    45 per class: skipping it would mix two test sets in one table."""
    path = tmp_path / "r.csv"
    row = _row(200, "first", 0.6)
    AdaptResults(path).append(row)
    key = tuple(row[k] for k in _KEY)
    assert AdaptResults(path).finished(key, dict(_SETTINGS))
    with pytest.raises(ResultsError, match=f"other settings.*{column}"):
        AdaptResults(path).finished(key, {**_SETTINGS, column: other})
    new_seed = tuple(row[k] if k != "seed" else 1 for k in _KEY)   # a new stream beside it
    with pytest.raises(ResultsError, match=f"other settings.*{column}"):
        AdaptResults(path).finished(new_seed, {**_SETTINGS, column: other})


def test_floats_come_back_from_the_file_exactly_and_the_stream_is_found_again(tmp_path):
    """An lr of 1/3000 and an accuracy of 300/900 are written so that they read back as the
    same floats: a rounded lr would no longer match the run's key, and the stream would run
    again as a second row."""
    path = tmp_path / "r.csv"
    row = _row(900, "first", 300 / 900, lr=1 / 3000)
    AdaptResults(path).append(row)
    back = read_adapt_results(path)[0]
    assert back["lr"] == 1 / 3000 and back["test_acc"] == 300 / 900
    assert AdaptResults(path).finished(tuple(row[k] for k in _KEY), dict(_SETTINGS))


# --- the source model is compared by file name -------------------------------------------------

def _checkpoint(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    return save_checkpoint(path, build_model(ARCH, num_classes=4, in_channels=3), ARCH, 4, 3)


def test_committed_results_resume_from_another_checkout(tmp_path):
    """The CSV records the checkpoint's path; the same file name at another path (another
    checkout, another machine) is the same source model, another file name is not."""
    here = _checkpoint(tmp_path / "main" / "weights" / "src.pt")
    out = tmp_path / "adapt.csv"
    first = run_adaptation(_protocol(checkpoint=str(here)), out, progress=False)
    assert first.ran == 4
    there = tmp_path / "elsewhere" / "weights" / "src.pt"
    there.parent.mkdir(parents=True)
    shutil.copy(here, there)
    again = run_adaptation(_protocol(checkpoint=str(there)), out, progress=False)
    assert (again.ran, again.skipped) == (0, 4)
    other = there.with_name("other.pt")
    shutil.copy(here, other)
    with pytest.raises(ResultsError, match="other settings.*checkpoint"):
        run_adaptation(_protocol(checkpoint=str(other)), out, progress=False)


def test_the_checkpoint_given_to_the_run_wins_over_the_protocols(tmp_path):
    """`--checkpoint` (run_adaptation's `checkpoint`) replaces the protocol's own (here
    `none`, a random model): the rows name the file given."""
    given = _checkpoint(tmp_path / "weights" / "src.pt")
    out = tmp_path / "adapt.csv"
    run_adaptation(_protocol(methods=["tent"], blocks=["none"]), out, checkpoint=str(given),
                   progress=False)
    assert [r["checkpoint"] for r in read_adapt_results(out)] == [recorded_checkpoint(str(given))]


def test_same_checkpoint_compares_file_names():
    assert same_checkpoint("/work/main/deep/weights/a.pt", "/tmp/x/a.pt")
    assert same_checkpoint("none", "none")
    assert not same_checkpoint("/work/main/deep/weights/a.pt", "/work/main/deep/weights/b.pt")


def test_a_row_names_a_model_in_the_checkout_relative_to_it(tmp_path):
    """Committed results name deep/weights/..., not the folders of the machine that ran them."""
    checkout = Path(deep.__file__).resolve().parents[1]
    assert recorded_checkpoint(str(checkout / "deep" / "weights" / "a.pt")) == "deep/weights/a.pt"
    assert recorded_checkpoint(str(tmp_path / "a.pt")) == str(tmp_path / "a.pt")
    assert recorded_checkpoint("none") == "none"


def test_an_episodic_value_other_than_true_or_false_is_refused_not_read_as_online(tmp_path):
    """`deep adapt` writes true or false; a hand-edited True (or yes) once read as online."""
    path = tmp_path / "r.csv"
    AdaptResults(path).append(_row(200, "first", 0.6))
    header, line = path.read_text().splitlines()
    column = header.split(",").index("episodic")
    assert line.split(",")[column] == "false"
    for value in ("True", "yes", ""):
        cells = line.split(",")
        cells[column] = value
        path.write_text(f"{header}\n{','.join(cells)}\n")
        with pytest.raises(ResultsError, match=rf"unreadable row \(episodic must be true or "
                                               rf"false, got '{value}'\)"):
            read_adapt_results(path)


def test_a_stream_is_written_once_and_a_file_holding_one_twice_is_refused(tmp_path):
    """`append` refuses a stream the file already holds (the file keeps its one row), and a
    file that holds a stream twice (not written by `deep adapt`) is refused when read, not
    resumed with one of the two rows silently chosen."""
    path = tmp_path / "r.csv"
    results = AdaptResults(path)
    results.append(_row(200, "first", 0.6))
    with pytest.raises(ResultsError, match="already in"):
        results.append(_row(200, "first", 0.7))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and len(read_adapt_results(path)) == 1
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(ResultsError, match="duplicated streams"):
        AdaptResults(path)


def test_a_block_option_tent_cannot_adapt_fails_before_the_streams_before_it(tmp_path):
    """TENT's `last` holds no normalisation layer: refused before the `none` stream listed
    ahead of it runs and is written, not after."""
    out = tmp_path / "a.csv"
    with pytest.raises(ConfigError, match="block option 'last' holds no normalisation layer"):
        run_adaptation(_protocol(methods=["tent"], blocks=["none", "last"]), out, progress=False)
    assert not out.exists()


def test_an_unknown_block_is_named_before_the_source_model_is_looked_for(tmp_path):
    """The blocks are checked first: a misspelt block is the error even when the checkpoint
    does not exist (resolving it could otherwise load, or train, a model first)."""
    with pytest.raises(ConfigError, match=r"unknown block\(s\) \['fourth'\] in 'first\+fourth'"):
        run_adaptation(_protocol(blocks=["none", "first+fourth"],
                                 checkpoint=str(tmp_path / "missing.pt")),
                       tmp_path / "a.csv", progress=False)
    assert not (tmp_path / "a.csv").exists()


def test_an_unknown_shift_is_named_before_the_source_model_is_looked_for(tmp_path):
    """A misspelt shift is the error, not the missing checkpoint, and not after the streams
    of the shifts listed before it have run (the loader would refuse it only there)."""
    with pytest.raises(ConfigError, match=r"unknown shift\(s\) \['nois'\] of synthetic"):
        run_adaptation(_protocol(shifts=["noise", "nois"], checkpoint=str(tmp_path / "missing.pt")),
                       tmp_path / "a.csv", progress=False)
    assert not (tmp_path / "a.csv").exists()


def test_the_local_data_of_every_shift_is_checked_before_the_source_model(tmp_path,
                                                                           monkeypatch):
    """A shift whose files are missing stops the run before anything loads, whichever
    place it has in the protocol (the second here), not hours later at its first stream."""
    from deep.data.base import Benchmark, DataError

    def missing_flip(self, data_dir, shifts):
        if "flip" in shifts:
            raise DataError("the files of shift 'flip' are missing")
    monkeypatch.setattr(Benchmark, "check_local_data", missing_flip)
    with pytest.raises(DataError, match="shift 'flip' are missing"):
        run_adaptation(_protocol(shifts=["noise", "flip"], checkpoint=str(tmp_path / "missing.pt")),
                       tmp_path / "a.csv", progress=False)
    assert not (tmp_path / "a.csv").exists()


# --- stream lengths are checked where the protocol is built ----------------------------------

@pytest.mark.parametrize("fields", [dict(images=-3), dict(memo={"copies": 2, "images": -1}),
                                    dict(tent={"batch_size": 3, "images": -200}),
                                    dict(images=2.5), dict(tent={"batch_size": 3, "images": True}),
                                    # every method its own length: the top-level one is
                                    # still the protocol's, and still checked
                                    dict(images=-3, memo={"copies": 2, "images": 6},
                                         tent={"batch_size": 3, "images": 6})])
def test_a_negative_or_fractional_stream_length_is_a_clear_error(fields):
    with pytest.raises(ConfigError, match="whole number >= 0"):
        _protocol(**fields)


def test_stream_order_refuses_a_negative_length():
    with pytest.raises(ConfigError, match=">= 0"):
        stream_order(10, 0, -2)      # order[:-2] would keep 8 of 10
    assert len(stream_order(10, 0, 0)) == 10 and len(stream_order(10, 0, 3)) == 3


def test_a_one_image_tent_stream_fails_before_any_stream_runs(tmp_path):
    """MEMO runs first: the TENT error used to come after MEMO's streams were written."""
    out = tmp_path / "adapt.csv"
    with pytest.raises(ConfigError, match="TENT needs streams of at least 2 images"):
        run_adaptation(_protocol(images=1), out, progress=False)
    assert not out.exists()
    # Without TENT a one-image stream is fine (the CLI's --images reaches both tables).
    assert run_adaptation(_protocol(images=1, methods=["memo"]), out, progress=False).ran == 2


def test_the_cli_checks_images_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "r.csv"
    base = ["adapt", "--benchmark", "fmnist-c", "--out", str(out), "--no-progress"]
    assert main(base + ["--images", "-5"]) == 2
    assert "whole number >= 0" in capsys.readouterr().err
    assert main(base + ["--images", "1", "--method", "memo,tent"]) == 2
    assert "TENT needs streams of at least 2 images" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--blocks", ""], r"\[memo\] blocks is empty: nothing to run"),
    (["--blocks", "first+first"], r"block\(s\) \['first'\] repeated in 'first\+first'"),
    (["--blocks", "first+second,second+first"], r"'second\+first' repeats 'first\+second'"),
    (["--method", "tent", "--lr", "nan"], r"TENT lr must be a positive number, got nan"),
    (["--data", "foo=1"], r"unknown data option\(s\) \['foo'\] for the fmnist-c loader"),
    ([], r"is a folder; a file is expected"),
])
def test_the_cli_refuses_bad_blocks_lrs_data_and_out_before_running(tmp_path, capsys, extra,
                                                                    message):
    out = tmp_path / "r.csv"
    if not extra:
        out.mkdir()
    base = ["adapt", "--benchmark", "fmnist-c", "--out", str(out), "--no-progress"]
    assert main(base + extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert out.is_dir() if not extra else not out.exists()


# --- numbers that are not finite, repeated values, flags of a method that does not run ---------

def _refused(tmp_path, capsys, extra) -> str:
    """`adapt` with `extra` on fmnist-c: exit 2, one `error:` line, no results file. The
    checkpoint does not exist, so that a value not refused stops there too, not after
    running the protocol."""
    out = tmp_path / "r.csv"
    assert main(["adapt", "--benchmark", "fmnist-c", "--out", str(out), "--no-progress",
                 "--checkpoint", str(tmp_path / "missing.pt"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and not out.exists()
    return err


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_prior_strength_that_is_not_a_finite_number_is_refused(tmp_path, capsys, value):
    """nan passed `prior_strength < 0`, and N/(N+1) of nan or inf is no mixture of statistics."""
    with pytest.raises(ConfigError, match=r"prior_strength \(or -1: off\) must be a number >= 0"):
        METHODS["memo"].config(prior_strength=float(value))
    err = _refused(tmp_path, capsys, ["--method", "memo", "--prior-strength", value])
    assert f"prior_strength (or -1: off) must be a number >= 0, got {value}" in err
    for fine in (-1, 0, 16):
        assert METHODS["memo"].config(prior_strength=fine).prior_strength == fine


@pytest.mark.parametrize("method", ["memo", "tent"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_an_lr_that_is_not_a_finite_positive_number_is_refused(tmp_path, capsys, method, value):
    """As the sweep's lrs: a finite number above 0 (inf passed `not lr > 0`)."""
    label = METHODS[method].label
    with pytest.raises(ConfigError, match=f"{label} lr must be a positive number, got {value}"):
        METHODS[method].config(lr=float(value))
    err = _refused(tmp_path, capsys, ["--method", method, "--lr", f"0.001,{value}"])
    assert f"{label} lr must be a positive number, got {value}" in err


@pytest.mark.parametrize("beta", [1.0, -0.1, float("nan"), "0.9"])
def test_a_tent_beta_adam_would_refuse_is_refused_by_name(beta):
    """beta is a protocol-file key ([tent] beta = ...); Adam raised its own ValueError."""
    with pytest.raises(ConfigError, match=r"TENT beta must be a number in \[0, 1\)"):
        METHODS["tent"].config(beta=beta)


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0,0"], "seeds lists 0 more than once ([0, 0]); name each value once"),
    (["--method", "tent,tent"], "methods lists 'tent' more than once"),
    (["--method", "tent", "--lr", "0.001,1e-3"], "[tent] lr lists 0.001 more than once"),
    (["--lr", "0.001,0.001"], "[memo] lr lists 0.001 more than once"),
    (["--shifts", "fog,fog"], "shifts lists 'fog' more than once"),
    (["--seeds", "-1"], "every seed of seeds must be at least 0, got -1"),
    (["--seeds", str(2**63)], "every seed of seeds must be below 2**63"),
])
def test_repeated_values_and_negative_seeds_are_refused_as_the_sweep_does(tmp_path, capsys,
                                                                          extra, message):
    """`--seeds 0,0` on a fresh file used to print "ran 2 streams, skipped 2 already
    finished": the second copy of each stream found the first one's row."""
    assert message in _refused(tmp_path, capsys, extra)


def test_a_repeated_value_in_a_protocol_is_refused_too():
    for fields, message in [(dict(seeds=[0, 0]), "seeds lists 0 more than once"),
                            (dict(shifts=["noise", "noise"]), "shifts lists 'noise'"),
                            (dict(methods=["memo", "memo"]), "methods lists 'memo'"),
                            (dict(memo={"lr": [0.01, 0.01]}), r"\[memo\] lr lists 0.01"),
                            (dict(seeds=[-2]), "every seed of seeds must be at least 0")]:
        with pytest.raises(ConfigError, match=message):
            _protocol(**fields)


def test_every_seed_below_2_63_draws_memo_augmentations():
    """The largest seed the protocol takes overflowed torch's seed once multiplied."""
    a, b = (torch.rand(3, generator=augment_generator(2**63 - 1, s)) for s in ("fog", "snow"))
    assert not torch.equal(a, b)


def _cli_protocol(*argv):
    return protocol_from_args(_parser().parse_args(["--benchmark", "fmnist-c", "--out", "r.csv",
                                                    *argv]))


@pytest.mark.parametrize("extra, flag, label, method", [
    (["--method", "tent", "--copies", "4"], "--copies", "MEMO", "memo"),
    (["--method", "tent", "--prior-strength", "16"], "--prior-strength", "MEMO", "memo"),
    (["--method", "memo", "--batch-size", "50"], "--batch-size", "TENT", "tent"),
    (["--method", "memo", "--batch-stats", "all"], "--batch-stats", "TENT", "tent"),
])
def test_a_flag_of_a_method_that_does_not_run_is_refused(tmp_path, capsys, extra, flag, label,
                                                         method):
    """It used to be dropped in silence (exit 0, recorded nowhere)."""
    err = _refused(tmp_path, capsys, extra)
    assert f"{flag} is an option of {label}, which does not run here" in err
    assert f"add {method} to --method" in err
    # Both methods running: the flags of both apply.
    both = _cli_protocol("--method", "memo,tent", *extra[2:])
    assert both.methods == ["memo", "tent"]


def test_flags_of_both_methods_reach_them_and_the_protocols_own_tables_are_no_flags():
    both = _cli_protocol("--method", "tent,memo", "--copies", "4", "--prior-strength", "16",
                         "--batch-size", "50", "--batch-stats", "all")
    assert (both.config("memo").copies, both.config("memo").prior_strength) == (4, 16)
    assert (both.config("tent").batch_size, both.config("tent").batch_stats) == (50, "all")
    # The protocol file's [memo] copies / prior_strength are not flags given by the user.
    assert _cli_protocol("--method", "tent").methods == ["tent"]
    assert _cli_protocol("--method", "memo").methods == ["memo"]


# --- --threads and --quick -----------------------------------------------------------------------

def _parser():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


@pytest.mark.parametrize("command", ["adapt", "pretrain"])
def test_threads_below_0_are_refused_by_name(command, capsys):
    args = ["--benchmark", "fmnist-c", "--out", "x.csv" if command == "adapt" else "x.pt"]
    assert main([command, *args, "--threads", "-1"]) == 2
    assert "--threads must be an integer >= 0" in capsys.readouterr().err


def test_one_thread_by_default_and_a_readable_quick_help():
    args = _parser().parse_args(["--benchmark", "fmnist-c", "--out", "r.csv"])
    assert args.threads == 1
    quick, = [a for a in _parser()._actions if "--quick" in a.option_strings]
    text = quick.help
    assert "{" not in text and "[" not in text                        # no raw dicts or lists
    for spec in METHODS.values():
        assert f"{spec.label} on the first {spec.quick_images} images" in text
        assert ",".join(spec.quick_blocks) in text
    assert "once per learning rate" in text and "0.005 and 0.0005" in text


def test_quick_runs_the_protocols_first_shift_and_first_seed_only():
    """--quick's help: "the protocol's first shift and seed" (fmnist-c: the first of its
    three shifts, seed 0 of its two); --seeds given with it still wins."""
    full = _cli_protocol()
    assert len(full.seeds) > 1 and len(full.shifts) > 1
    quick = _cli_protocol("--quick")
    assert quick.seeds == full.seeds[:1] and quick.shifts == full.shifts[:1]
    assert _cli_protocol("--quick", "--seeds", "3,4").seeds == [3, 4]


def test_the_mean_over_shifts_takes_only_the_seeds_every_shift_has():
    """Seed 1 ran fog only: its fog difference must not enter the mean over shifts."""
    rows = [_row(900, "none", 0.5, seed=0, shift="fog"), _row(900, "first", 0.6, seed=0, shift="fog"),
            _row(900, "none", 0.5, seed=0, shift="snow"), _row(900, "first", 0.7, seed=0, shift="snow"),
            _row(900, "none", 0.5, seed=1, shift="fog"), _row(900, "first", 0.9, seed=1, shift="fog")]
    (table,) = relative_table(rows).values()
    assert table["per_seed"][("mean", "first")] == pytest.approx({0: 0.15})
    assert table["per_seed"][("fog", "first")] == pytest.approx({0: 0.1, 1: 0.4})
    # so does the mean `none` accuracy: seed 0's (fog, snow), not seed 1's fog alone
    assert table["none"]["mean"][0] == pytest.approx(0.5) and table["none"]["mean"][2] == 1


# --- the second audit: data options, spellings, value-equal settings, early refusal ------------

def test_a_stream_of_other_data_options_is_refused_and_a_legacy_row_is_not_compared(tmp_path):
    """`--data severity=3` beside rows of severity 5 is another stream (it was skipped as
    finished, or added to their table); a row written before the `data` column has them
    unknown: resumed, not refused."""
    path = tmp_path / "r.csv"
    five = '{"corruption_seed": 0, "severity": 5}'
    row = {**_row(200, "first", 0.6), "data": five}
    AdaptResults(path).append(row)
    key = tuple(row[k] for k in _KEY)
    assert AdaptResults(path).finished(key, {**_SETTINGS, "data": five})
    more_workers = '{"corruption_seed": 0, "num_workers": 4, "severity": 5}'  # speed only
    assert AdaptResults(path).finished(key, {**_SETTINGS, "data": more_workers})
    three = '{"corruption_seed": 0, "severity": 3}'
    with pytest.raises(ResultsError, match="other settings.*'data'.*severity\": 3"):
        AdaptResults(path).finished(key, {**_SETTINGS, "data": three})
    with pytest.raises(ResultsError, match="other settings.*'data'"):
        AdaptResults(path).check_method("fmnist-c", "memo", {**_SETTINGS, "data": three})
    # settings that leave `data` out do not match a row that records it (only a row's own
    # missing value is unknown)
    assert "data" not in _SETTINGS
    with pytest.raises(ResultsError, match="other settings.*'data'"):
        AdaptResults(path).finished(key, dict(_SETTINGS))
    legacy = tmp_path / "legacy.csv"
    AdaptResults(legacy).append(_row(200, "first", 0.6))        # no data: unknown
    assert read_adapt_results(legacy)[0]["data"] is None
    assert AdaptResults(legacy).finished(key, {**_SETTINGS, "data": three})


def test_settings_compare_as_values_so_a_flags_float_matches_a_protocols_int(tmp_path):
    """The protocol's `prior_strength = -1` (TOML int) and `--prior-strength -1` (float)
    are one setting; -1 and 1, or true and 1, are not."""
    path = tmp_path / "r.csv"
    row = {**_row(200, "first", 0.6), "settings": '{"copies": 32, "prior_strength": -1}',
           "data": '{"severity": 5}'}
    AdaptResults(path).append(row)
    key = tuple(row[k] for k in _KEY)
    same = {**_SETTINGS, "settings": '{"copies": 32.0, "prior_strength": -1.0}',
            "data": '{"severity": 5.0}'}
    assert AdaptResults(path).finished(key, same)
    for other in ('{"copies": 32, "prior_strength": 1}', '{"copies": true, "prior_strength": -1}'):
        with pytest.raises(ResultsError, match="other settings"):
            AdaptResults(path).finished(key, {**same, "settings": other})


def test_other_settings_are_refused_before_any_stream_runs(tmp_path):
    """TENT runs before MEMO: a MEMO setting that differs from the file's MEMO rows was
    found only at MEMO's first stream, after TENT's streams had run and been written."""
    out = tmp_path / "adapt.csv"
    run_adaptation(_protocol(methods=["memo"]), out, progress=False)
    before = out.read_bytes()
    with pytest.raises(ResultsError, match="other settings"):
        run_adaptation(_protocol(methods=["tent", "memo"], memo={"copies": 4, "lr": 0.01}), out,
                       progress=False)
    assert out.read_bytes() == before


def test_one_block_option_is_one_stream_whatever_its_spelling(tmp_path):
    out = tmp_path / "adapt.csv"
    assert run_adaptation(_protocol(methods=["memo"], blocks=["none", "first+second"]), out,
                          progress=False).ran == 2
    again = run_adaptation(_protocol(methods=["memo"], blocks=["second + first"]), out,
                           progress=False)
    assert (again.ran, again.skipped) == (0, 1)
    assert [r["blocks"] for r in read_adapt_results(out)] == ["none", "first+second"]


@pytest.mark.parametrize("blocks, message", [
    (["first+all"], "'all' already holds every block: give it alone, not 'first\\+all'"),
    (["first+last"], "in 'first\\+last': block option 'last' holds no normalisation layer"),
])
def test_a_union_with_all_or_with_a_part_tent_cannot_adapt_is_refused(tmp_path, blocks, message):
    """first+all ran as `all` under another name; TENT's first+last ran as `first`,
    dropping `last`, which on its own is refused."""
    with pytest.raises(ConfigError, match=message):
        run_adaptation(_protocol(methods=["tent"], blocks=blocks), tmp_path / "a.csv",
                       progress=False)
    assert not (tmp_path / "a.csv").exists()


def test_an_out_file_of_blank_lines_holds_no_streams_yet(tmp_path):
    """A results file that holds only whitespace (created empty by hand, an editor's
    newline) is an empty results file, not one of foreign columns: read as no rows, and
    the first stream is appended to it."""
    path = tmp_path / "r.csv"
    path.write_text("\n \n")
    assert read_adapt_results(path) == []
    AdaptResults(path).append(_row(200, "first", 0.6))
    assert [r["blocks"] for r in read_adapt_results(path)] == ["first"]


def test_a_binary_file_as_out_is_named_not_a_traceback(tmp_path, capsys):
    (tmp_path / "bin.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ResultsError, match="bin.csv is not a text file"):
        read_adapt_results(tmp_path / "bin.csv")


def test_a_file_of_two_benchmarks_gets_a_section_each_and_no_table_mixes_them():
    """TENT rows of two benchmarks with the same lr and stream length overwrote each other
    in one table, under a footer that counted them all."""
    rows = [_row(900, "none", 0.5), _row(900, "first", 0.6),
            {**_row(900, "none", 0.3), "benchmark": "cifar10c"},
            {**_row(900, "first", 0.2), "benchmark": "cifar10c"}]
    text = markdown_table(rows)
    cifar, fmnist = text.index("## cifar10c"), text.index("## fmnist-c")
    assert cifar < fmnist
    assert "| fog | 30.0 | -10.0 |" in text[cifar:fmnist] and "| fog | 50.0 | +10.0 |" in text[fmnist:]
    with pytest.raises(ResultsError, match="rows of 2 benchmarks"):
        relative_table(rows)
    assert "## fmnist-c" not in markdown_table(rows[:2])   # one benchmark: no section heading


def test_the_none_stream_is_the_baseline_not_a_block_of_the_table():
    """Gains are of the adapted blocks over `none`: no (shift, "none") gain of 0 beside
    them."""
    rows = [_row(900, "none", 0.5), _row(900, "first", 0.6)]
    (table,) = relative_table(rows).values()
    assert table["blocks"] == ["first"]
    assert set(table["per_seed"]) == set(table["rel"]) == {("fog", "first")}


def test_a_report_of_a_file_without_streams_is_refused(tmp_path):
    """An empty results file (the run made it, no stream finished yet) gives no empty
    table.md: refused by name, and no report folder is made."""
    path = tmp_path / "r.csv"
    path.write_text("")
    with pytest.raises(ResultsError, match="r.csv holds no results yet"):
        write_adapt_report(path)
    assert not (tmp_path / "r_report").exists()


def test_the_plot_draws_each_blocks_mean_gain_with_its_standard_error(tmp_path, monkeypatch):
    """Bars in points: `first` gains 10 and 12 points on seeds 0 and 1, so a bar of 11 with
    an error bar of 1 (the table's mean ± standard error), not the error as the bar."""
    figures = []
    monkeypatch.setattr("deep.adapt.results.save_figure",
                        lambda fig, stem: figures.append(fig) or [stem.with_suffix(".png")])
    rows = _seeds({"none": [0.50, 0.50], "first": [0.60, 0.62]})
    from deep.adapt.results import plot
    assert plot(rows, tmp_path / "rel") == [tmp_path / "rel.png"]
    (ax,) = figures[0].axes
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([11.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["first"]


def test_a_table_without_a_none_stream_says_so():
    text = markdown_table([_row(900, "first", 0.6, seed=s) for s in (0, 1)])
    assert "No gain to show: these streams have no `none` stream" in text
    assert "95 % t intervals of the same gains" not in text


def test_a_table_of_none_streams_only_says_there_is_no_block_not_no_none():
    text = markdown_table([_row(900, "none", 0.6, seed=s) for s in (0, 1)])
    assert "No gain to show: these are `none` streams only (no adaptation)" in text
    assert "have no `none` stream" not in text


# --- the third audit ------------------------------------------------------------------------

def test_a_setting_of_true_is_not_the_number_1(tmp_path):
    """Settings compare as values with numbers as floats, but a JSON `true` stays apart from
    1 (Python's True == 1 would make them one setting)."""
    path = tmp_path / "r.csv"
    row = {**_row(200, "first", 0.6), "data": '{"grayscale": 1}'}
    AdaptResults(path).append(row)
    key = tuple(row[k] for k in _KEY)
    assert AdaptResults(path).finished(key, {**_SETTINGS, "data": '{"grayscale": 1.0}'})
    with pytest.raises(ResultsError, match="other settings.*'data'"):
        AdaptResults(path).finished(key, {**_SETTINGS, "data": '{"grayscale": true}'})


def test_the_report_of_a_results_file_goes_next_to_it_by_default(tmp_path, monkeypatch):
    """`adapt --report` (no folder given) writes <out>_report/table.md beside the CSV, as
    its help says."""
    monkeypatch.setattr("deep.adapt.results.plot", lambda rows, stem: [])   # the table only
    path = tmp_path / "r.csv"
    for blocks, acc in (("none", 0.5), ("first", 0.6)):
        AdaptResults(path).append(_row(200, blocks, acc))
    assert write_adapt_report(path) == [tmp_path / "r_report" / "table.md"]
    text = (tmp_path / "r_report" / "table.md").read_text()
    assert text.startswith("# Online adaptation results of r.csv\n")
    assert "| fog | 50.0 | +10.0 | (first) |" in text and text.endswith("\n2 streams.\n")


def test_a_test_split_of_no_image_per_class_is_refused_by_name():
    with pytest.raises(ConfigError, match="test_per_class must be >= 1, got 0"):
        _protocol(test_per_class=0)
    assert _protocol(test_per_class=1).test_per_class == 1


def test_the_images_flag_sets_the_stream_length_of_every_method_that_runs():
    """--images N replaces the top-level length and each method's own (fmnist-c: [memo]
    images = 200, [tent] images = 0)."""
    protocol = _cli_protocol("--images", "7")
    assert (protocol.images_of("memo"), protocol.images_of("tent")) == (7, 7)


def test_quick_keeps_a_methods_own_shorter_stream(monkeypatch):
    """--quick caps a stream at the method's quick length (MEMO 100, TENT 600) but keeps a
    shorter one that the method's own table gives ([memo] images = 50), not the top-level
    length (0 = all)."""
    file = load_adapt_protocol("fmnist-c")
    short = file.replace(memo={**file.settings_of("memo"), "images": 50})
    monkeypatch.setattr("deep.adapt.cli.load_adapt_protocol", lambda benchmark: short)
    quick = _cli_protocol("--quick")
    assert (quick.images_of("memo"), quick.images_of("tent")) == (50, 600)


def test_replacing_one_methods_table_keeps_the_others_and_ignores_none():
    """`replace(memo={...})` (the CLI's method flags) swaps MEMO's table only: TENT keeps its
    batch size of 3, not its default; a None override (a flag not given) changes nothing."""
    protocol = _protocol().replace(memo={"copies": 4, "lr": 0.01}, seeds=None)
    assert protocol.config("tent").batch_size == 3 and protocol.config("memo").copies == 4
    assert protocol.seeds == [0]


def test_method_settings_is_no_key_of_a_protocol_file():
    """The tables are [memo] and [tent]; a file's own `method_settings` is refused as an
    unknown key (by name), not passed twice to the constructor."""
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['method_settings'\]; known: "):
        _protocol(method_settings={"memo": {"copies": 2}})


def test_building_a_protocol_leaves_the_callers_dict_alone():
    """`from_dict` takes the method tables out of a copy: the read file's dict still holds
    [memo] and [tent], and builds the same protocol again."""
    raw = dict(benchmark="synthetic", arch=ARCH, shifts=["noise"], methods=["memo", "tent"],
               blocks=["none"], seeds=[0], memo={"copies": 2}, tent={"batch_size": 3})
    before = dict(raw)
    first = AdaptProtocol.from_dict(raw)
    assert raw == before and AdaptProtocol.from_dict(raw) == first


def test_malformed_method_tables_are_refused_by_name():
    """A protocol file's `memo = 5`, `lr = []` under [memo], a table for a method the table
    of methods lacks, and one block option in two spellings: each named where the protocol
    is built, not a TypeError or a silently ignored table."""
    for fields, message in [(dict(memo=5), r"\[memo\] must be a table of settings, got 5"),
                            (dict(memo={"copies": 2, "lr": []}), r"\[memo\]: lr is an empty list"),
                            (dict(blocks=["first+second", "second+first"]),
                             r"'second\+first' repeats 'first\+second'")]:
        with pytest.raises(ConfigError, match=message):
            _protocol(**fields)
    with pytest.raises(ConfigError, match=r"settings of unknown method\(s\) \['nope'\]"):
        dataclasses.replace(_protocol(), method_settings={"nope": {}})


def test_a_streams_settings_are_the_protocols_as_written():
    """What a resumed stream must agree on, from the protocol (here a split of 3 images per
    class, not the usual 90), spelled out by hand."""
    protocol = _protocol(test_per_class=3, data={"severity": 5})
    assert stream_settings(protocol, "none", protocol.config("tent")) == {
        "arch": ARCH, "checkpoint": "none", "test_per_class": 3, "data": '{"severity": 5}',
        "settings": '{"batch_size": 3, "batch_stats": "blocks", "beta": 0.9, "lr": 0.001, '
                    '"steps": 1}'}


def test_rows_of_another_benchmark_do_not_constrain_a_methods_settings(tmp_path):
    """A file may hold several benchmarks (a section each): MEMO rows of cifar10c with 4
    copies do not refuse fmnist-c MEMO streams with 32, while fmnist-c rows would."""
    path = tmp_path / "r.csv"
    AdaptResults(path).append({**_row(200, "first", 0.6), "benchmark": "cifar10c",
                               "settings": '{"copies": 4}'})
    results = AdaptResults(path)
    results.check_method("fmnist-c", "memo", {**_SETTINGS, "settings": '{"copies": 32}'})
    with pytest.raises(ResultsError, match="other settings"):
        results.check_method("cifar10c", "memo", {**_SETTINGS, "settings": '{"copies": 32}'})
