"""`python -m deep`: sweep -> report end to end, pretrain, protocols, bad input."""

from __future__ import annotations

import fractions
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deep.__main__ import main
from deep.checkpoints import load_model, verify_checkpoint
from deep.models import build_model
from deep.sweep import read_results

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--benchmark", "synthetic", "--shifts", "noise", "--lrs", "0.01", "--epochs", "1",
         "--n-target", "32", "--val-per-class", "5", "--test-per-class", "5", "--no-progress"]


def test_sweep_then_report_end_to_end(tmp_path, synthetic_cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "results.csv"
    run = subprocess.run([sys.executable, "-m", "deep", "sweep", "--benchmark", "synthetic",
                          "--quick", "--shifts", "spurious", "--n-target", "64",
                          "--val-per-class", "16", "--test-per-class", "16", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ran 11 cells (0 diverged), skipped 0" in run.stdout
    assert "cell/s" in run.stderr  # the tqdm progress bar
    rows = read_results(out)
    assert len(rows) == 11 and {r["method"] for r in rows} >= {"first", "all", "auto-snr"}
    assert all(r["worst_group_acc"] is not None for r in rows)

    report = subprocess.run([sys.executable, "-m", "deep", "report", str(out), "--out",
                             str(tmp_path / "rep")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| shift | first | second | third | last | all | lp-ft |" in text
    assert "relative to `all`" in text and "| spurious |" in text
    for suffix in ("png", "pdf"):
        assert (tmp_path / "rep" / f"relative_accuracy.{suffix}").stat().st_size > 1000


def test_pretrain_writes_checkpoint_and_manifest(tmp_path, capsys):
    out = tmp_path / "src.pt"
    code = main(["pretrain", "--benchmark", "synthetic", "--arch", "resnet26-w4", "--epochs", "1",
                 "--lr", "0.05", "--augment", "crop", "--out", str(out)])
    assert code == 0
    assert "source test accuracy" in capsys.readouterr().out
    manifest = verify_checkpoint(out)
    assert manifest["arch"] == "resnet26-w4" and manifest["epochs"] == 1 and manifest["seed"] == 0
    assert 0 <= manifest["source_test_acc"] <= 1 and manifest["seconds"] >= 0
    assert manifest["command"].startswith("python -m deep pretrain --benchmark synthetic")
    assert json.loads(Path(f"{out}.json").read_text())["sha256"] == manifest["sha256"]
    model = load_model(out, "resnet26-w4", 4, 3)   # loads with torch.load(weights_only=True)
    assert model.fc.out_features == 4


@pytest.mark.parametrize("command", [
    ["sweep", "--benchmark", "synthetic", "--quick", "--checkpoint", "none", "--out", "r.csv"],
    ["pretrain", "--benchmark", "synthetic", "--init", "none", "--out", "src.pt"],
    ["adapt", "--benchmark", "fmnist-c", "--quick", "--checkpoint", "none", "--out", "a.csv"],
])
def test_trust_checkpoint_beside_a_random_init_is_refused(tmp_path, capsys, monkeypatch, command):
    """It trusts no file; it used to be accepted without a word."""
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--trust-checkpoint"]) == 2
    flag = "--init" if command[0] == "pretrain" else "--checkpoint"
    assert (f"--trust-checkpoint has no effect with {flag} none (a random init reads no file)"
            in capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_trust_checkpoint_without_an_init_file_is_refused_by_pretrain(tmp_path, capsys,
                                                                     monkeypatch):
    """pretrain without --init reads no file: --trust-checkpoint was accepted silently."""
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--benchmark", "synthetic", "--out", "src.pt",
                 "--trust-checkpoint"]) == 2
    assert ("--trust-checkpoint has no effect without --init FILE (no file is read)"
            in capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_pretrain_init_from_a_file_safe_loading_refuses_needs_trust(tmp_path, capsys):
    """A weight file with a global outside the allowlist (as MEMO's numpy-scalar files were
    before the allowlist): refused with a hint at the flag, loaded with --trust-checkpoint."""
    torch.manual_seed(3)
    init = build_model("resnet26-w4", 4, 3)
    path = tmp_path / "init.pth"
    torch.save({"net": init.state_dict(), "err_cls": fractions.Fraction(917, 10000)}, path)
    argv = ["pretrain", "--benchmark", "synthetic", "--arch", "resnet26-w4", "--epochs", "1",
            "--lr", "1e-9", "--init", str(path), "--out", str(tmp_path / "src.pt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "fractions.Fraction" in err and "--trust-checkpoint" in err
    assert not (tmp_path / "src.pt").exists()
    assert main([*argv, "--trust-checkpoint"]) == 0
    # started from the file: at lr 1e-9 one epoch leaves the first convolution where it was
    model = load_model(tmp_path / "src.pt", "resnet26-w4", 4, 3)
    assert torch.allclose(model.conv1.weight, init.conv1.weight, atol=1e-6)
    assert not torch.allclose(model.conv1.weight, build_model("resnet26-w4", 4, 3).conv1.weight)


@pytest.mark.parametrize("command, where", [
    ("sweep", "deep/configs/BENCHMARK.toml"),
    ("pretrain", "the [pretrain] table of deep/configs/BENCHMARK.toml"),
    ("adapt", "deep/configs/adapt/BENCHMARK.toml (python -m deep protocols --show adapt/BENCHMARK")])
def test_help_says_a_flag_not_given_keeps_the_protocols_value(capsys, command, where):
    """`sweep --help` said "--seeds ... (built-in default: 0)" and nothing else; a sweep
    without --seeds runs the protocol's (synthetic: 0 and 1). `adapt --help` said
    "--copies ... (built-in default: 32)", and --shifts and --seeds had no help at all."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"a flag not given keeps the value of {where}" in out
    assert "built-in default applies only where that file sets none" in out
    assert not re.search(r"--(shifts|seeds) (SHIFTS|SEEDS) --", out)   # each flag has help


def test_help_shows_each_built_in_default_a_list_factory_and_an_empty_list_included(capsys):
    """The help shows the built-in default of each generated flag, that of a field with a
    default_factory (`seeds`: [0]) too, and an empty list (pretrain's milestones) as none."""
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    sweep = " ".join(capsys.readouterr().out.split())
    assert "--seeds SEEDS [SEEDS ...] seeds to run (built-in default: 0);" in sweep
    assert ("--select {val_acc,worst_group_val_acc} what picks (lr, epoch) "
            "(built-in default: val_acc)") in sweep
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    pretrain = " ".join(capsys.readouterr().out.split())
    assert ("epochs after which a step schedule multiplies the lr by gamma "
            "(built-in default: none); comma-separated") in pretrain


def test_protocols_lists_synthetic(capsys):
    assert main(["protocols"]) == 0
    assert "synthetic: resnet26-w4" in capsys.readouterr().out


def test_protocols_lists_and_shows_the_adaptation_protocols(capsys):
    assert main(["protocols"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(l.startswith("adapt/fmnist-c: resnet26, 3 shift(s), methods tent,memo, blocks "
                            "none,first,") for l in out)
    assert any(l.startswith("adapt/cifar10c: resnet26-gn, 15 shift(s)") for l in out)
    assert main(["protocols", "--show", "adapt/fmnist-c"]) == 0
    shown = capsys.readouterr().out
    memo = json.loads(shown.split("\n  memo = ")[1].split("\n")[0])
    # deep/configs/adapt/fmnist-c.toml: [memo] images 200, lr [0.005, 0.0005]
    assert memo["images"] == 200 and [c["lr"] for c in memo["configs"]] == [0.005, 0.0005]
    assert "MEMO's CIFAR-10 settings" in shown
    assert main(["protocols", "adapt/nope"]) == 2
    assert "no adaptation protocol for benchmark 'nope'" in capsys.readouterr().err


def _bad_checkpoint(tmp_path):
    state = build_model("resnet26-w4", 4).state_dict()
    state["classifier.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "bad.pth")
    return str(tmp_path / "bad.pth")


@pytest.mark.parametrize("args,message", [
    (["--methods", "first,bogus"], "unknown method(s) ['bogus'] for resnet26-w4"),
    (["--methods", "fourth"], "unknown method(s) ['fourth']"),
    (["--shifts", "rain"], "unknown shift(s) ['rain'] of synthetic"),
    (["--n-target", "0"], "n_target must be at least 1, got 0"),
    (["--n-target", "100000"], "n_target=100000 exceeds the 1600 target training images"),
    (["--test-per-class", "1000"], "exceeds the 400 per class available"),
    (["--checkpoint", "missing.pt"], "checkpoint file not found: missing.pt"),
    (["--checkpoint", "."], "checkpoint is a folder, not a file: ."),
    (["--val-per-class", "0"], "the val split is empty: set val_per_class (--val-per-class) to at least 1"),
    (["--select", "worst_group_val_acc"], "(--select) needs groups in the validation split, and "
                                          "this data has none: use --select val_acc"),
    ("bad-checkpoint", "missing keys (1): fc.weight; unexpected keys (1): classifier.weight"),
    (["--data", "foo=1"], "unknown data option(s) ['foo'] for the synthetic loader; known: none"),
    ("out-folder", "is a folder; a file is expected"),
])
def test_bad_input_exits_with_a_message(tmp_path, synthetic_cache, capsys, args, message):
    out = tmp_path / "r.csv"
    if args == "bad-checkpoint":
        args = ["--checkpoint", _bad_checkpoint(tmp_path)]
    if args == "out-folder":
        args = []
        out.mkdir()
    code = main(["sweep", *SMALL, "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert out.is_dir() if not args else not out.exists()


@pytest.mark.parametrize("benchmark,source", [
    ("celeba", "`python -m deep pretrain --benchmark celeba --out PATH`"),
    # CLIP's pretrain refuses to start without --init: the first step is deep.clip's
    ("camelyon17", "`python -m deep.clip prepare --weights FILE --num-classes N --out PATH`"),
])
def test_a_benchmark_without_its_own_source_model_says_where_one_comes_from(
        tmp_path, capsys, benchmark, source):
    assert main(["sweep", "--benchmark", benchmark, "--quick", "--out", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert f"benchmark {benchmark!r} needs --checkpoint PATH" in err and source in err, err
    assert not (tmp_path / "r.csv").exists()


def test_unknown_benchmark_and_report_of_missing_file(tmp_path, capsys):
    assert main(["sweep", "--benchmark", "mnist", "--out", str(tmp_path / "r.csv")]) == 2
    assert "no protocol for benchmark 'mnist'" in capsys.readouterr().err
    # pretrain said "has no protocol; pass --arch", and with --arch "unknown benchmark"
    assert main(["pretrain", "--benchmark", "mnist", "--out", str(tmp_path / "m.pt")]) == 2
    assert "unknown benchmark 'mnist'; known: camelyon17," in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none.csv")]) == 2
    assert "results file not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert f"results file is a folder, not a file: {tmp_path}" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["bench", "fmnist", "--summarize-only", "--out", str(tmp_path / "file")]) == 2
    assert "is a file; bench's --out is the suite's folder" in capsys.readouterr().err


@pytest.mark.parametrize("command, out, message", [
    ("sweep", "a-file/r.csv", "a-file is a file, not a folder"),
    ("sweep", "folder", "folder is a folder; a file is expected"),
    ("pretrain", "folder", "folder is a folder; a file is expected"),
    ("report", "a-file", "report folder .*a-file is a file; a folder is expected"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, command,
                                                                    out, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder").mkdir()
    args = {"sweep": ["sweep", "--benchmark", "synthetic", "--quick", "--out"],
            "pretrain": ["pretrain", "--benchmark", "synthetic", "--out"],
            "report": ["report", str(ROOT / "figures" / "fmnist-v2" / "results.csv"), "--out"]}
    assert main([*args[command], str(tmp_path / out)]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--weight-decay", "-1"], "weight_decay must be a number >= 0, got -1.0"),
    (["--seeds", "-1"], "every seed of seeds must be at least 0, got -1"),
    (["--seeds", "99999999999999999999"], "every seed of seeds must be below 2**63"),
    (["--cache-mb", "-5"], "cache_mb must be a number >= 0, got -5.0"),
    (["--data-dir", "."], "synthetic is generated in memory and reads no folder"),
])
def test_bad_engine_settings_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["sweep", "--benchmark", "synthetic", "--quick", "--out",
                 str(tmp_path / "r.csv"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_a_checkpoint_under_home_is_found_as_data_dir_and_out_are(tmp_path, synthetic_cache,
                                                                   monkeypatch, capsys):
    """`--checkpoint=~/w.pt` reaches the program with its ~ (the shell expands one only at
    the start of a word); --data-dir and --out expand it, so the weight files do too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    state = build_model("resnet26-w4", 4).state_dict()
    torch.save(state, tmp_path / "w.pt")
    code = main(["sweep", *SMALL, "--methods", "last", "--seeds", "0", "--checkpoint=~/w.pt",
                 "--out=~/r.csv"])
    assert code == 0, capsys.readouterr().err
    assert [r["checkpoint"] for r in read_results(tmp_path / "r.csv")] == [str(tmp_path / "w.pt")]
    loaded = load_model("~/w.pt", "resnet26-w4", 4, 3)  # the Python API as well
    assert torch.equal(loaded.fc.weight, state["fc.weight"])


def _fake_sweep(monkeypatch, summary=(0, 0, 0)):
    """run_sweep replaced by a recorder: what the command line hands it, without a run."""
    import deep.__main__ as cli
    from deep.sweep import SweepSummary
    seen = {}

    def fake(protocol, out, **kwargs):
        seen.update(kwargs, protocol=protocol, out=out)
        return SweepSummary(*summary, seconds=1.5, out=Path(out))
    monkeypatch.setattr(cli, "run_sweep", fake)
    return seen


def test_every_sweep_flag_reaches_run_sweep(monkeypatch, capsys):
    """--arch, --workers, --amp, --no-progress, ...: a flag argparse reads that never
    reached run_sweep (a keyword left at its default) failed no other test; the sweep would
    run the protocol's architecture, one process, float32, with a progress bar."""
    seen = _fake_sweep(monkeypatch, summary=(3, 2, 1))
    assert main(["sweep", "--benchmark", "synthetic", "--out", "r.csv", "--arch", "resnet26",
                 "--workers", "3", "--amp", "--no-progress", "--device", "cpu", "--cache-mb", "7",
                 "--data-dir", "d", "--checkpoint", "w.pt", "--trust-checkpoint"]) == 0
    assert seen["protocol"].arch == "resnet26" and seen["out"] == "r.csv"
    assert (seen["workers"], seen["amp"], seen["progress"], seen["device"]) == (3, True, False,
                                                                                "cpu")
    assert (seen["cache_mb"], seen["data_dir"], seen["checkpoint"]) == (7.0, "d", "w.pt")
    assert seen["trust_checkpoint"] is True
    assert ("ran 3 cells (1 diverged), skipped 2 already finished, in 1.5 s"
            in capsys.readouterr().out)


def test_a_sweep_without_those_flags_runs_with_their_defaults(monkeypatch):
    seen = _fake_sweep(monkeypatch)
    assert main(["sweep", "--benchmark", "synthetic", "--out", "r.csv"]) == 0
    assert seen["protocol"].arch == "resnet26-w4"   # deep/configs/synthetic.toml
    assert (seen["workers"], seen["amp"], seen["progress"], seen["device"]) == (1, False, True,
                                                                                "auto")
    assert (seen["data_dir"], seen["checkpoint"], seen["trust_checkpoint"]) == (None, None, False)


def test_protocols_show_indents_every_line_of_the_notes(capsys):
    """The notes print under the values, each line indented: a line at column 0 would read
    as the line of another protocol."""
    assert main(["protocols", "--show", "synthetic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("synthetic: resnet26-w4, 4 shift(s), 11 methods, 3 lrs, 2 seed(s)")
    assert ("  Generated in memory (deep/data/synthetic.py): class = orientation of a colour "
            "grating.") in lines
    assert ("  Shifts: noise (input), feature (other subpopulation), flip (labels permuted), "
            "spurious") in lines
    assert "  cells of 10 epochs over 200 images; --quick runs 11 cells in seconds." in lines
    assert all(line.startswith("  ") for line in lines[1:])


def test_a_command_module_whose_dependency_is_missing_is_an_error_not_a_missing_command(
        tmp_path, monkeypatch):
    """A module of MODULE_COMMANDS that is absent leaves its subcommand out; one that is
    there but cannot import a package of its own must say which package, not vanish from
    `python -m deep --help` as though it did not exist."""
    import deep.__main__ as cli
    (tmp_path / "toy_command.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "MODULE_COMMANDS", {"absent": "absent_command"})
    assert cli._module_commands() == {}
    monkeypatch.setattr(cli, "MODULE_COMMANDS", {"toy": "toy_command"})
    with pytest.raises(ModuleNotFoundError, match="a_package_that_is_not_installed"):
        cli._module_commands()
