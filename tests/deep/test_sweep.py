"""The sweep runner: atomic rows, resume after SIGKILL, diverged rows, workers."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deep.data import synthetic
from deep.errors import ConfigError, ResultsError
from deep.protocol import load_protocol
from deep.files import cpu_model
from deep.sweep import COLUMNS, machine, plan_cells, quick, read_results, row_key, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
METRICS = ("status", "best_epoch", "val_acc", "test_acc", "tuned_params")


def small_protocol(**overrides):
    base = dict(shifts=["noise"], methods=["first", "second", "third", "last", "all"],
                lrs=[1e-2, 1e-3], seeds=[0], epochs=2, n_target=64, val_per_class=10,
                test_per_class=20)
    return load_protocol("synthetic").replace(**{**base, **overrides})


def by_key(rows):
    return {row_key(r): tuple(r[m] for m in METRICS) for r in rows}


def test_sweep_resumes_after_sigkill(tmp_path, synthetic_checkpoint):
    out = tmp_path / "results.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "deep", "sweep", "--benchmark", "synthetic", "--shifts", "noise",
           "--methods", "first,second,third,last,all", "--lrs", "0.01,0.001", "--seeds", "0",
           "--epochs", "2", "--n-target", "64", "--val-per-class", "10", "--test-per-class", "20",
           "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(read_results(out)) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    killed = read_results(out)  # parses every row: nothing half-written
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert 2 <= len(killed) < 10 and len(by_key(killed)) == len(killed)

    summary = run_sweep(small_protocol(), out, progress=False)
    assert (summary.skipped, summary.ran) == (len(killed), 10 - len(killed))
    resumed = read_results(out)
    assert len(resumed) == 10 and len(by_key(resumed)) == 10
    assert {row_key(r) for r in resumed} == {c.key for c in plan_cells(small_protocol())}
    assert by_key(resumed[:len(killed)]) == by_key(killed)  # finished rows kept as they were

    # the same numbers as a sweep that was never interrupted
    clean = tmp_path / "clean.csv"
    run_sweep(small_protocol(), clean, progress=False)
    assert by_key(read_results(clean)) == by_key(resumed)
    # running it again does nothing
    assert run_sweep(small_protocol(), clean, progress=False).ran == 0


def test_nan_loss_gives_a_diverged_row_and_the_sweep_goes_on(tmp_path, synthetic_checkpoint,
                                                             monkeypatch):
    bench = synthetic.BENCHMARKS["synthetic"]

    def load_task(data_dir, shift, *args, **kwargs):
        task = bench.load_task(data_dir, shift, *args, **kwargs)
        if shift == "flip":
            task.train.images[3] = float("nan")
        return task

    monkeypatch.setitem(synthetic.BENCHMARKS, "synthetic",
                        dataclasses.replace(bench, load_task=load_task))
    out = tmp_path / "r.csv"
    summary = run_sweep(small_protocol(shifts=["flip", "noise"], methods=["last", "all"],
                                       lrs=[1e-2]), out, progress=False)
    rows = read_results(out)
    assert summary.diverged == 2 and len(rows) == 4
    assert {(r["shift"], r["status"]) for r in rows} == {("flip", "diverged"), ("noise", "ok")}
    assert all(r["test_acc"] is None for r in rows if r["status"] == "diverged")


def test_workers_give_the_same_rows(tmp_path, synthetic_checkpoint):
    protocol = small_protocol(shifts=["noise", "flip"], methods=["second", "last"], lrs=[1e-2])
    run_sweep(protocol, tmp_path / "one.csv", progress=False)
    run_sweep(protocol, tmp_path / "two.csv", workers=2, progress=False)
    one, two = read_results(tmp_path / "one.csv"), read_results(tmp_path / "two.csv")
    assert len(two) == 4 and by_key(one) == by_key(two)


def test_a_finished_sweep_resumes_without_starting_workers(tmp_path, synthetic_checkpoint,
                                                            monkeypatch):
    import deep.sweep
    out = tmp_path / "r.csv"
    protocol = small_protocol(methods=["last"], lrs=[1e-2], epochs=1)
    run_sweep(protocol, out, progress=False)

    def no_workers(*args, **kwargs):
        raise AssertionError("a sweep with nothing to run started workers")

    monkeypatch.setattr(deep.sweep, "_run_parallel", no_workers)
    monkeypatch.setattr(deep.sweep, "run_group", no_workers)
    summary = run_sweep(protocol, out, progress=False, workers=2)
    assert (summary.ran, summary.skipped) == (0, 1)


def test_a_cells_row_does_not_depend_on_the_cells_before_it_in_its_group(synthetic_checkpoint):
    """Every method, alone and after the others in one task group: the model is shared by
    the group's cells, so anything a run leaves behind (mode, buffers, flags) would show
    here. Auto-RGN once did (it probed the model in the mode the previous cell left it in)."""
    from deep.blocks import blocks_for
    from deep.methods import method_names
    from deep.sweep import run_group
    protocol = small_protocol(lrs=[1e-2], epochs=2)
    protocol = protocol.replace(methods=method_names(blocks_for(protocol.arch)))
    cells = plan_cells(protocol)
    assert len({(c.shift, c.seed, c.n_target) for c in cells}) == 1  # one group
    def rows(order):
        return by_key(run_group(order, protocol, str(synthetic_checkpoint), None, 64))
    alone = {}
    for cell in cells:  # each the first (and only) cell of its group
        alone.update(rows([cell]))
    assert rows(cells[::-1]) == alone


def test_resume_refuses_other_settings(tmp_path, synthetic_checkpoint):
    out = tmp_path / "r.csv"
    run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1), out, progress=False)
    with pytest.raises(ValueError, match="other settings.*epochs: file 1 vs now 2"):
        run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=2), out, progress=False)


def test_the_pretrain_table_is_recorded_only_for_the_benchmarks_own_source_model(
        tmp_path, synthetic_checkpoint):
    """A --checkpoint of the user's (trained for 30 epochs, say) was recorded beside the
    protocol's [pretrain] table (6 epochs), which did not make it."""
    protocol = small_protocol(methods=["last"], lrs=[1e-2], epochs=1)
    run_sweep(protocol, tmp_path / "own.csv", progress=False)
    (own,) = json.loads((tmp_path / "own.csv.config.json").read_text())["configurations"]
    assert own["pretrain"]["epochs"] == protocol.pretrain.epochs and "source_data" in own
    shutil.copy(synthetic_checkpoint, tmp_path / "mine.pt")
    run_sweep(protocol, tmp_path / "mine.csv", checkpoint=str(tmp_path / "mine.pt"), progress=False)
    (mine,) = json.loads((tmp_path / "mine.csv.config.json").read_text())["configurations"]
    assert "pretrain" not in mine and "source_data" not in mine
    assert mine["checkpoint"].endswith("mine.pt") and len(mine["checkpoint_sha256"]) == 64


def test_a_pretrain_table_that_did_not_make_the_benchmarks_own_model_is_refused(
        tmp_path, synthetic_checkpoint):
    """An edited [pretrain] table (or fmnist-flip's, which shares fmnist-c's model) was
    saved beside the results as how the source model was made, though the model the sweep
    ran (the cached or committed one) was trained otherwise."""
    from deep.pretrain import PretrainConfig
    protocol = small_protocol(methods=["last"], lrs=[1e-2], epochs=1)
    edited = protocol.replace(pretrain=dataclasses.replace(protocol.pretrain, epochs=30))
    with pytest.raises(ConfigError, match=r"\[pretrain\] table of deep/configs/synthetic.toml "
                       r"does not describe .*epochs: model 6, table 30.*--checkpoint PATH"):
        run_sweep(edited, tmp_path / "r.csv", progress=False)
    assert not (tmp_path / "r.csv").exists()
    # a user's --checkpoint: the table is not recorded, so not compared
    run_sweep(edited, tmp_path / "mine.csv", checkpoint=str(synthetic_checkpoint), progress=False)
    assert protocol.pretrain == PretrainConfig(**synthetic.SOURCE_RECIPE)


def test_a_manifest_that_predates_a_pretrain_setting_is_compared_on_the_settings_it_records(
        tmp_path):
    """A source model made before a [pretrain] key existed (its manifest records epochs and
    lr only) is compared on those two: the table's other keys are not "model None"."""
    from deep.sweep import check_pretrain_table
    protocol = small_protocol()        # synthetic.toml's [pretrain]: epochs 6, lr 0.05, ...
    checkpoint = tmp_path / "src.pt"
    checkpoint.write_bytes(b"")
    manifest = tmp_path / "src.pt.json"
    manifest.write_text(json.dumps({"config": {"pretrain": {"epochs": 6, "lr": 0.05}}}))
    check_pretrain_table(protocol, str(checkpoint))
    manifest.write_text(json.dumps({"config": {"pretrain": {"epochs": 5, "lr": 0.05}}}))
    with pytest.raises(ConfigError, match=r"\(epochs: model 5, table 6; src.pt.json\)"):
        check_pretrain_table(protocol, str(checkpoint))


def test_new_cells_beside_rows_of_other_settings_are_refused(tmp_path, synthetic_checkpoint):
    """No cell of the second sweep is skipped, yet its rows would share a table (and the
    report's learning-rate choice) with rows of another protocol."""
    out = tmp_path / "r.csv"
    run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1), out, progress=False)
    other = small_protocol(methods=["first"], lrs=[1e-3], epochs=2)
    with pytest.raises(ResultsError, match="synthetic rows of a sweep with other settings "
                                           r"\(epochs: file 1 vs now 2; recorded in"):
        run_sweep(other, out, progress=False)
    (tmp_path / "r.csv.config.json").unlink()       # then the rows themselves are compared
    with pytest.raises(ResultsError, match="already holds cell .*'last'.*epochs: file 1 vs now 2"):
        run_sweep(other, out, progress=False)
    assert len(read_results(out)) == 1


def entry(**changes):
    base = {"benchmark": "fmnist-c", "arch": "resnet26", "epochs": 25, "patience": None,
            "target_data": {"severity": 5}, "lrs": [0.1], "seeds": [0], "methods": ["all"],
            "shifts": ["fog"], "n_target": 1000, "pretrain": {"epochs": 6},
            "checkpoint": "deep/weights/fmnist-resnet26.pt", "checkpoint_sha256": "a" * 64}
    return {**base, **changes}


@pytest.mark.parametrize("now, clash", [
    (entry(target_data={"severity": 1}), "target_data: file {'severity': 5} vs now {'severity': 1}"),
    (entry(target_data={"severity": 1, "num_workers": 8}), "target_data: file {'severity': 5} vs "
                                                           "now {'severity': 1, 'num_workers': 8}"),
    (entry(patience=1), "patience: file None vs now 1"),
    (entry(checkpoint="elsewhere/fmnist-resnet26.pt", checkpoint_sha256="b" * 64),
     "checkpoint: file 'deep/weights/fmnist-resnet26.pt (sha256 aaaaaaaaaaaa)' vs now "
     "'elsewhere/fmnist-resnet26.pt (sha256 bbbbbbbbbbbb)'"),
    (entry(checkpoint="other.pt", checkpoint_sha256=None), "checkpoint: file"),
])
def test_a_recorded_configuration_of_the_benchmark_must_match_but_for_the_grid(tmp_path, now,
                                                                               clash):
    from deep.sweep import check_same_configuration, config_path
    out = tmp_path / "r.csv"
    config_path(out).write_text(json.dumps({"configurations": [entry()]}))
    with pytest.raises(ResultsError, match=re.escape(clash)):
        check_same_configuration(out, now, rows_exist=True)
    # what may differ: the grid, the [pretrain] table, the checkpoint's path (same contents),
    # another benchmark's settings; and nothing is compared once the rows are gone
    # and how many processes decode the images (docs/benchmarks.md recommends more)
    for fine in (entry(lrs=[1e-3], seeds=[1, 2], methods=["first"], shifts=["snow"],
                       n_target=100, pretrain={"epochs": 30}),
                 entry(checkpoint="/elsewhere/fmnist-resnet26.pt"),
                 entry(benchmark="fmnist-flip", epochs=50),
                 entry(target_data={"severity": 5, "num_workers": 8})):
        check_same_configuration(out, fine, rows_exist=True)
    check_same_configuration(out, now, rows_exist=False)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"configurations": [1]}'])
def test_a_damaged_configuration_record_is_named(tmp_path, synthetic_checkpoint, text):
    out = tmp_path / "r.csv"
    run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1), out, progress=False)
    (tmp_path / "r.csv.config.json").write_text(text)
    with pytest.raises(ResultsError, match="r.csv.config.json is not a sweep's configuration "
                                           "record.*remove it"):
        run_sweep(small_protocol(methods=["last"], lrs=[1e-2, 1e-3], epochs=1), out,
                  progress=False)


@pytest.mark.parametrize("name, values, shown", [("lrs", [1e-2, 0.01], "0.01"),
                                                 ("methods", ["last", "last"], "'last'"),
                                                 ("seeds", [0, 0], "0")])
def test_a_value_listed_twice_is_refused_before_running(tmp_path, synthetic_checkpoint, name,
                                                        values, shown):
    with pytest.raises(ConfigError, match=f"{name} lists {re.escape(shown)} more than once"):
        run_sweep(small_protocol(**{name: values}), tmp_path / "r.csv", progress=False)
    assert not (tmp_path / "r.csv").exists()


def test_rows_record_patience_precision_device_and_commit(tmp_path, synthetic_checkpoint):
    from deep.files import code_commit

    out = tmp_path / "r.csv"
    run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1, patience=3), out,
              progress=False, device="cpu", amp=True)  # amp is a no-op on the CPU
    (row,) = read_results(out)
    assert (row["patience"], row["precision"], row["device"]) == (3, "float32", "cpu")
    assert row["commit"] == code_commit() and row["commit"]  # this test runs in a checkout
    with pytest.raises(ValueError, match="other settings.*patience: file 3 vs now 4"):
        run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1, patience=4), out,
                  progress=False)


def test_resume_on_another_backend_still_checks_the_precision(tmp_path, synthetic_checkpoint):
    """Without --amp every backend runs float32: a file of bf16 rows is not resumed by one."""
    out = tmp_path / "r.csv"
    protocol = small_protocol(methods=["last"], lrs=[1e-2], epochs=1)
    run_sweep(protocol, out, progress=False)
    text = out.read_text()
    assert text.count(",float32,") == 1
    out.write_text(text.replace(",float32,", ",bf16-autocast,"))

    def executor(cells, spec, record):
        raise AssertionError("nothing should run")

    with pytest.raises(ValueError, match="precision: file 'bf16-autocast' vs now 'float32'"):
        run_sweep(protocol, out, progress=False, executor=executor)
    # with --amp and device auto, another backend's workers may or may not have a GPU:
    # not compared, so the finished row is skipped
    summary = run_sweep(protocol, out, progress=False, executor=executor, amp=True)
    assert (summary.ran, summary.skipped) == (0, 1)


def test_expected_precision():
    from deep.sweep import expected_precision
    assert expected_precision("auto", False, on_this_host=False) == "float32"
    assert expected_precision("cuda", True, on_this_host=False) == "bf16-autocast"
    assert expected_precision("cpu", True, on_this_host=False) == "float32"
    assert expected_precision("auto", True, on_this_host=False) is None
    assert expected_precision("cpu", True, on_this_host=True) == "float32"


def test_a_legacy_results_file_is_read_and_resumed_with_provenance_unknown(tmp_path,
                                                                         synthetic_checkpoint):
    from deep.results import LEGACY_COLUMNS

    out = tmp_path / "r.csv"
    protocol = small_protocol(methods=["last"], lrs=[1e-2], epochs=1)
    run_sweep(protocol, out, progress=False)
    # the file as a sweep before the provenance columns wrote it
    lines = out.read_text().splitlines()
    n = len(LEGACY_COLUMNS)
    legacy = [",".join(line.split(",")[:n]) for line in lines]
    assert legacy[0] == ",".join(LEGACY_COLUMNS)
    out.write_text("\n".join(legacy) + "\n")
    (tmp_path / "r.csv.config.json").unlink()     # sweeps of that time wrote none
    (old,) = read_results(out)
    assert old["patience"] is None and old["commit"] is None and old["test_acc"] is not None
    # resuming (other lrs, any patience) keeps the legacy row and writes the new header
    summary = run_sweep(protocol.replace(lrs=[1e-2, 1e-3], patience=2), out, progress=False)
    assert (summary.ran, summary.skipped) == (1, 1)
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    rows = read_results(out)
    assert [r["patience"] for r in rows] == [None, 2]


def test_rows_record_the_machine_and_files_without_that_column_resume(tmp_path, monkeypatch,
                                                                     synthetic_checkpoint):
    """Rows agree bit for bit only on the same kind of machine, so each names its own.
    The committed converged tables predate the column: read with it empty, resumed."""
    out = tmp_path / "r.csv"
    protocol = small_protocol(methods=["last"], lrs=[1e-2], epochs=1)
    run_sweep(protocol, out, progress=False)
    (row,) = read_results(out)
    assert row["machine"] == machine("cpu")
    assert row["machine"].startswith(cpu_model() + ", ")
    assert row["machine"].endswith(f"; torch {torch.__version__}")
    assert f", {torch.get_num_threads()} thread" in row["machine"]
    with monkeypatch.context() as env:
        env.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
        assert "ONEDNN_MAX_CPU_ISA=SSE41" in machine("cpu")
    older = [fields[:-1] for fields in csv.reader(io.StringIO(out.read_text()))]
    assert older[0] == list(COLUMNS[:-1]) and COLUMNS[-1] == "machine"
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(older)
    out.write_text(buffer.getvalue())
    (old,) = read_results(out)
    assert old["machine"] is None and old["commit"] == row["commit"]
    summary = run_sweep(protocol.replace(lrs=[1e-2, 1e-3]), out, progress=False)
    assert (summary.ran, summary.skipped) == (1, 1)
    assert [r["machine"] for r in read_results(out)] == [None, row["machine"]]


def test_quick_protocol():
    p = quick(load_protocol("synthetic"))
    assert p.shifts == ["noise"] and p.seeds == [0] and p.lrs == [1e-2] and p.epochs == 2
    assert p.methods == load_protocol("synthetic").methods


def test_quick_takes_the_middle_of_the_sorted_grid_and_never_adds_epochs():
    """The synthetic grid [0.1, 0.01, 0.001] is sorted already and runs 10 epochs, so
    --quick's middle lr and its cap at 2 epochs hold there whether or not the grid is
    sorted and the epochs capped rather than set."""
    p = quick(small_protocol(lrs=[1e-3, 1e-1, 1e-2, 1e-4, 1e-5], epochs=1))
    assert p.lrs == [1e-3] and p.epochs == 1
    assert quick(small_protocol(lrs=[1e-1, 1e-3, 1e-2], epochs=5)).lrs == [1e-2]


def test_grouping_keeps_every_shift_and_seed_apart():
    """A group runs on the data of its first cell's (shift, seed): a cell of another seed
    in it would run on that seed's data split and record its own."""
    from deep.sweep import group_cells
    cells = plan_cells(small_protocol(shifts=["noise", "flip"], seeds=[0, 1],
                                      methods=["first", "last"], lrs=[1e-2]))
    groups = group_cells(cells, workers=1)
    for g in groups:
        assert {(c.shift, c.seed) for c in g} == {(g[0].shift, g[0].seed)}
    assert sorted((g[0].shift, g[0].seed, len(g)) for g in groups) == [
        ("flip", 0, 2), ("flip", 1, 2), ("noise", 0, 2), ("noise", 1, 2)]


def test_grouping_splits_several_tasks_so_that_every_worker_has_work():
    """3 tasks of 2 cells and 4 workers: each task splits in 2 (ceil(4 / 3)), 6 groups of
    one cell; rounding down would keep 3 groups and leave a worker idle."""
    from deep.sweep import group_cells
    cells = plan_cells(small_protocol(shifts=["noise", "flip", "feature"],
                                      methods=["first", "last"], lrs=[1e-2]))
    groups = group_cells(cells, workers=4)
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1, 1, 1]
    assert sorted(c.key for g in groups for c in g) == sorted(c.key for c in cells)


def test_a_sweep_stopped_before_its_first_row_leaves_no_file(tmp_path, capsys):
    """The resolved configuration is written with the first row: a sweep that stops before
    (here: a data folder the loader cannot read) leaves neither results nor config.json."""
    from deep.__main__ import main

    assert main(["sweep", "--benchmark", "fmnist-c", "--data-dir", str(tmp_path / "nowhere"),
                 "--quick", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "r.csv")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", range(1, 11))
def test_grouping_for_workers_keeps_every_cell_once(workers):
    """More workers than tasks split a task's cells into parts: every cell still runs
    exactly once, in as many groups as there are workers (or cells)."""
    from deep.sweep import group_cells
    cells = plan_cells(small_protocol(methods=["first", "second", "third", "last"]))
    assert len(cells) == 8 and len({(c.shift, c.seed, c.n_target) for c in cells}) == 1
    groups = group_cells(cells, workers)
    assert sorted(c.key for g in groups for c in g) == sorted(c.key for c in cells)
    assert len(groups) == min(workers, len(cells))


def test_a_file_holding_a_cell_twice_is_refused(tmp_path, synthetic_checkpoint):
    from deep.results import ResultsFile
    out = tmp_path / "r.csv"
    run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1), out, progress=False)
    lines = out.read_text().splitlines()
    out.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(ResultsError, match="holds duplicated cells"):
        ResultsFile(out)


def test_a_checkpoint_is_recognised_by_its_file_name_wherever_it_sits():
    """Committed results resumed on another checkout name the same file elsewhere."""
    from deep.results import same_checkpoint
    assert same_checkpoint("/a/deep/weights/fmnist-resnet26.pt", "/b/fmnist-resnet26.pt")
    assert same_checkpoint("deep/weights/x.pt", Path("/elsewhere/x.pt"))
    assert not same_checkpoint("weights/a.pt", "weights/b.pt")


def test_rows_of_another_checkpoint_are_refused_without_a_configuration_record(
        tmp_path, synthetic_checkpoint):
    """Legacy results files have no config.json: the rows' own checkpoint column guards
    the resume then."""
    import shutil
    out = tmp_path / "r.csv"
    protocol = small_protocol(methods=["last"], lrs=[1e-2], epochs=1)
    first, second = tmp_path / "A.pt", tmp_path / "B.pt"
    for path in (first, second):
        shutil.copy(synthetic_checkpoint, path)
    run_sweep(protocol, out, checkpoint=str(first), progress=False)
    (tmp_path / "r.csv.config.json").unlink()
    with pytest.raises(ResultsError, match=r"checkpoint: file '.*A\.pt' vs now '.*B\.pt'"):
        run_sweep(protocol.replace(lrs=[1e-3]), out, checkpoint=str(second), progress=False)


@pytest.mark.parametrize("setting,other", [("weight_decay", 1e-3), ("epochs", 2),
                                           ("batch_size", 16)])
def test_rows_of_other_training_settings_are_refused_without_a_configuration_record(
        tmp_path, synthetic_checkpoint, setting, other):
    """Without config.json (a legacy file) the rows' own settings columns guard the resume:
    a new lr beside rows trained with another weight decay, epoch count or batch size would
    make the report choose learning rates across two protocols."""
    out = tmp_path / "r.csv"
    protocol = small_protocol(methods=["last"], lrs=[1e-2], epochs=1)
    run_sweep(protocol, out, checkpoint=synthetic_checkpoint, progress=False)
    (tmp_path / "r.csv.config.json").unlink()
    with pytest.raises(ResultsError, match=f"other settings \\({setting}: file"):
        run_sweep(protocol.replace(lrs=[1e-3], **{setting: other}), out,
                  checkpoint=synthetic_checkpoint, progress=False)


def test_a_row_takes_validation_metrics_from_the_validation_split_and_test_from_test():
    """Four different numbers in, each in its own column (worst-group test accuracy is the
    report's metric under worst-group selection: it must not be the validation one)."""
    from deep.sweep import Cell, result_row
    from deep.train import FitResult, Metrics
    result = FitResult("ok", 2, Metrics(0.61, 0.42, {0: 0.42, 1: 0.8}),
                       Metrics(0.73, 0.35, {0: 0.35, 1: 0.9}), tuned_params=7)
    settings = dict(arch="resnet26-w4", epochs=2, batch_size=64, weight_decay=1e-4,
                    select="worst_group_val_acc", val_per_class=10, test_per_class=20,
                    checkpoint="none", patience=None, precision="float32")
    row = result_row(Cell("synthetic", "spurious", "last", 0.01, 0, 64), result, 100, settings)
    assert (row["val_acc"], row["val_worst_group_acc"]) == (0.61, 0.42)
    assert (row["test_acc"], row["worst_group_acc"]) == (0.73, 0.35)
    assert (row["best_epoch"], row["tuned_params"], row["total_params"]) == (2, 7, 100)


def test_the_driver_waits_for_rows_that_arrive_after_their_group_finished():
    # A worker's rows reach the driver through the queue's feeder thread, apart from its
    # future's result; under load they can come later than the future. The driver must wait
    # for every row the finished groups sent (it once gave up after a quiet half second).
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from deep.sweep import _collect

    rows = queue.Queue()

    def group(i):  # puts its two rows 1.5 s after it has returned
        threading.Timer(1.5, lambda: [rows.put((i, k)) for k in range(2)]).start()
        return 2

    got = []
    with ThreadPoolExecutor(2) as pool:
        _collect({pool.submit(group, i) for i in range(2)}, rows, got.append)
    assert sorted(got) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_rows_that_never_arrive_stop_the_sweep_with_a_message():
    import queue
    from concurrent.futures import ThreadPoolExecutor
    from deep.sweep import _collect

    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match="1 of the sweep's rows"):
        _collect({pool.submit(lambda: 1)}, queue.Queue(), print, wait_s=0.3)


def test_other_settings_are_refused_before_the_source_model_is_resolved(tmp_path, synthetic_checkpoint,
                                                                       monkeypatch):
    # Resolving may train a source model (synthetic's, for a new --arch): minutes of work
    # for a sweep that is then refused for its other settings.
    import deep.sweep
    out = tmp_path / "r.csv"
    run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1), out, progress=False)

    def resolve(*args):
        raise AssertionError("the source model was resolved before the settings were compared")
    monkeypatch.setattr(deep.sweep, "resolve_checkpoint", resolve)
    with pytest.raises(ResultsError, match=r"arch: file 'resnet26-w4' vs now 'resnet26-w8'"):
        run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1, arch="resnet26-w8"), out,
                  progress=False)


def test_a_resumed_sweep_says_so_on_its_progress_line(tmp_path, synthetic_checkpoint, capsys):
    out = tmp_path / "r.csv"
    run_sweep(small_protocol(methods=["last"], lrs=[1e-2], epochs=1), out, progress=True)
    assert "resumed" not in capsys.readouterr().err
    run_sweep(small_protocol(methods=["last", "all"], lrs=[1e-2], epochs=1), out, progress=True)
    assert "sweep synthetic (resumed: 1 done before)" in capsys.readouterr().err


@pytest.mark.parametrize("benchmark", [b for b in __import__("deep.data").data.benchmark_names()
                                       if b != "synthetic"])
def test_a_data_folder_that_does_not_exist_stops_the_sweep_before_it_starts(tmp_path, benchmark):
    """A typo in --data-dir was met by the first cell's loader, after the source model was
    resolved (for some, trained) and the progress bar drawn; now before anything, naming the
    benchmark's layout, and no results file is made."""
    from deep.data import DataError
    out = tmp_path / "r.csv"
    with pytest.raises(DataError, match=rf"^{benchmark}: data directory .*missing does not exist; "
                                        r"expected:\n"):
        run_sweep(load_protocol(benchmark), out, checkpoint="none", data_dir=tmp_path / "missing",
                  progress=False)
    assert not out.exists()


def test_machine_names_one_thread_in_the_singular_and_more_in_the_plural(monkeypatch):
    """Guards the plural in the machine column: 1 torch thread reads "1 thread;", 2 read
    "2 threads;" (the thread count is part of what makes two rows comparable)."""
    for threads, words in ((1, ", 1 thread; torch"), (2, ", 2 threads; torch")):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        assert words in machine("cpu")
