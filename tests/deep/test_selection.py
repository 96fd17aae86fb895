"""The learning-rate selection rule is written once (deep.results) and every caller picks
by it: the report (per seed), the two-stage sweep (its choice, and which later rows the
table keeps) and the two Fashion-MNIST scripts."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

import deep.results
from deep.protocol import load_protocol
from deep.report import select_learning_rates
from deep.results import (SELECT_WORST_GROUP, SELECTION_RULES, best_lr, best_row, results_text,
                          selection_metric)
from deep.train import SELECTION_RULES as TRAIN_RULES
from deep.two_stage import chosen_lrs, drop_superseded

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
LRS = [1e-3, 1e-2, 1e-1]


def row(method, lr, val, wg=None, select="val_acc", seed=0):
    return dict(benchmark="synthetic", shift="noise", method=method, seed=seed, n_target=32,
                lr=lr, val_acc=val, val_worst_group_acc=wg, select=select, status="ok",
                best_epoch=1, test_acc=0.5, worst_group_acc=wg, tuned_params=1,
                total_params=1, seconds=1.0, arch="resnet26-w4", epochs=1, batch_size=8,
                weight_decay=0.0, val_per_class=5, test_per_class=5, checkpoint="none")


# The planted bugs. `last` is selected by worst group, and val_acc points elsewhere (1e-1
# has the best val_acc and the worst worst-group accuracy); its worst-group accuracy ties
# between 1e-3 and 1e-2. `all` ties on val_acc between 1e-3 and 1e-2, and its 1e-1 run
# finished no epoch (no metric: it never wins). The rule: 1e-2 for both. A val_acc-only
# rule picks 1e-1 for `last`; ties to the smaller lr pick 1e-3 for both.
PLANTED = [row("last", 1e-3, 0.50, wg=0.4, select=SELECT_WORST_GROUP),
           row("last", 1e-2, 0.60, wg=0.4, select=SELECT_WORST_GROUP),
           row("last", 1e-1, 0.95, wg=0.0, select=SELECT_WORST_GROUP),
           row("all", 1e-3, 0.7), row("all", 1e-2, 0.7), row("all", 1e-1, None)]
THE_RULE = {"last": 1e-2, "all": 1e-2}
TIES_TO_THE_SMALLER = {"last": 1e-3, "all": 1e-3}


def test_the_rule():
    assert TRAIN_RULES is SELECTION_RULES and SELECT_WORST_GROUP in SELECTION_RULES
    assert [selection_metric(r) for r in PLANTED] == [0.4, 0.4, 0.0, 0.7, 0.7, None]
    assert selection_metric(row("all", 1e-2, float("nan"))) is None
    assert best_row(PLANTED[:3])["lr"] == 1e-2 and best_row(PLANTED[3:])["lr"] == 1e-2
    assert best_row(PLANTED[5:]) is None
    assert best_lr({1e-3: 0.7, 1e-2: 0.7, 1e-1: 0.2}) == 1e-2


def report(tmp_path, capsys):
    return {r["method"]: r["lr"] for r in select_learning_rates(PLANTED)}


def two_stage_choice(tmp_path, capsys):
    protocol = load_protocol("synthetic").replace(shifts=["noise"], methods=["last", "all"],
                                                  lrs=LRS, n_target=32)
    return {method: lr for (_, method), lr in chosen_lrs(PLANTED, protocol, [0]).items()}


def two_stage_kept(tmp_path, capsys):
    """The lr whose later-seed rows the table keeps: the first stage's choice (each later
    seed ran one lr, as a second stage does)."""
    later = [{**r, "seed": seed} for seed, lr in ((1, 1e-3), (2, 1e-2)) for r in PLANTED
             if r["lr"] == lr]
    kept = {}
    for r in drop_superseded(PLANTED + later, [0]):
        if r["seed"] != 0:
            kept[r["method"]] = r["lr"] if r["method"] not in kept else "both"
    return kept


def run_script(name, args, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    return capsys.readouterr().out


def lr_ties_script(tmp_path, capsys, monkeypatch):
    """fmnist_lr_ties.py prints the cells whose choice ties the grid's edge, with the
    choice; under the rule both planted cells are printed."""
    path = tmp_path / "planted.csv"
    path.write_text(results_text(PLANTED))
    out = run_script("fmnist_lr_ties.py", [str(path)], monkeypatch, capsys)
    return {m: float(lr) for m, lr in re.findall(r"'(\w+)', 32\): chosen (\S+),", out)}


def probe_script(tmp_path, capsys, monkeypatch):
    """fmnist_probe_analyze.py's "chosen lr per (shift, method)" (its runs log no
    diverged cell, so the planted run without a metric is left out)."""
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps({**r, "val_curve": [r["val_acc"]], "cpu_seconds": 1.0})
                            + "\n" for r in PLANTED if r["val_acc"] is not None))
    out = run_script("fmnist_probe_analyze.py", [str(path)], monkeypatch, capsys)
    return {m: float(lr) for m, lr in re.findall(r"\('noise', '(\w+)'\) lr (\S+) epoch", out)}


CALLERS = [report, two_stage_choice, two_stage_kept, lr_ties_script, probe_script]


@pytest.mark.parametrize("caller", CALLERS, ids=lambda f: f.__name__)
def test_every_caller_picks_by_the_one_rule(caller, tmp_path, capsys, monkeypatch):
    call = lambda: (caller(tmp_path, capsys, monkeypatch) if "script" in caller.__name__
                    else caller(tmp_path, capsys))
    assert call() == THE_RULE
    # Change the rule in deep.results alone: a caller with its own copy does not follow.
    monkeypatch.setattr(deep.results, "_rank", lambda metric, lr: (metric, -float(lr)))
    assert call() == TIES_TO_THE_SMALLER


def test_the_report_selects_an_lr_per_n_target():
    """A sweep over several target sizes picks the lr separately for each n_target: pooled,
    the n_target=8 rows would take 1e-1 (0.9 beats every n_target=32 value) and the
    n_target=32 table would lose its row, or report 1e-1 for 32 targets."""
    rows = [row("last", 1e-3, 0.6), row("last", 1e-1, 0.5),
            {**row("last", 1e-3, 0.3), "n_target": 8}, {**row("last", 1e-1, 0.9), "n_target": 8}]
    chosen = {r["n_target"]: r["lr"] for r in select_learning_rates(rows)}
    assert chosen == {32: 1e-3, 8: 1e-1}
    assert len(select_learning_rates(rows)) == 2


def test_the_report_selects_an_lr_per_seed_and_per_shift():
    # guards: select_learning_rates pooling seeds, or shifts, into one choice of lr
    rows = [row("last", 1e-3, 0.6), row("last", 1e-1, 0.5),
            row("last", 1e-3, 0.3, seed=1), row("last", 1e-1, 0.9, seed=1),
            {**row("last", 1e-3, 0.2), "shift": "blur"}, {**row("last", 1e-1, 0.1), "shift": "blur"}]
    chosen = {(r["shift"], r["seed"]): r["lr"] for r in select_learning_rates(rows)}
    assert chosen == {("noise", 0): 1e-3, ("noise", 1): 1e-1, ("blur", 0): 1e-3}


@pytest.mark.parametrize("select, epoch", [("val_acc", 1), (SELECT_WORST_GROUP, 2)])
def test_fit_picks_the_epoch_by_the_same_metric(monkeypatch, select, epoch):
    """Within a run the epoch is chosen by the metric `select` names: validation scripted
    so that accuracy peaks at epoch 1 and worst-group accuracy at epoch 2; the run keeps
    that epoch's validation metrics."""
    import torch
    import deep.train as train_module
    from deep.blocks import blocks_for
    from deep.data.base import TensorSplit
    from deep.models import build_model
    from deep.train import Metrics, TrainConfig, fit
    scripted = [Metrics(0.9, 0.1), Metrics(0.5, 0.4), Metrics(0.6, 0.3)]
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda model, split, *a, **k: (
        scripted.pop(0) if split is val else real(model, split, *a, **k)))
    g = torch.Generator().manual_seed(0)
    train, val = (TensorSplit(torch.rand(8, 3, 32, 32, generator=g), torch.arange(8) % 4,
                              torch.arange(8) % 2, name=n) for n in ("train", "val"))
    torch.manual_seed(0)
    result = fit(build_model("resnet26-w4", 4), train, val, None, "last",
                 TrainConfig(lr=1e-2, epochs=3, batch_size=8, select=select),
                 blocks_for("resnet26-w4"))
    assert not scripted and result.best_epoch == epoch
    assert (result.val.acc, result.val.worst_group_acc) == ((0.9, 0.1), (0.5, 0.4))[epoch - 1]


def test_best_row_gives_the_first_of_two_rows_at_one_lr():
    """Equal metric and lr (a cell written twice, e.g. by two protocols): the first row wins,
    whichever way round the two are passed."""
    first, second = row("all", 1e-2, 0.7), row("all", 1e-2, 0.7)
    first["test_acc"], second["test_acc"] = 0.1, 0.9
    assert best_row([first, second]) is first and best_row([second, first]) is second
    assert best_row([row("all", 1e-3, 0.7), first, second]) is first
