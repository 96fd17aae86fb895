"""One writer per output folder, a killed run's leftovers, Ctrl-C: `python -m sims figures`
in real processes (found by a kill -9 audit of the figure pipeline)."""
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from sims import experiments
from sims.figures import LOCK_FILE, FolderBusy, hold_folder, make_figures

pytestmark = pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")
ROOT = Path(__file__).resolve().parents[2]
SMALLEST = experiments.Settings(draws=2, steps=2, device="cpu")
F4 = ["figures", "--only", "f4", "--draws", "2", "--steps", "2", "--device", "cpu"]


def python(code, *args, **kwargs):
    """`python -c code args` from the repository root, with one thread, as a Popen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_a_killed_runs_temp_files_are_removed_and_nothing_else(tmp_path):
    """SIGKILLed just before renaming a CSV into place, a run leaves its temporary file
    (and its lock file); the next run into the folder removes that temp file, those of
    every other output of ours, and no other file."""
    killed = python("""
        import os, runpy, signal, sys
        replace = os.replace
        def kill_before_the_csv(source, target, *args, **kwargs):
            if str(target).endswith("f4_t1_event.csv"):
                os.kill(os.getpid(), signal.SIGKILL)
            return replace(source, target, *args, **kwargs)
        os.replace = kill_before_the_csv
        sys.argv = ["sims", *sys.argv[1:]]
        runpy.run_module("sims", run_name="__main__", alter_sys=True)
        """, *F4, "--out", tmp_path)
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err
    left = sorted(p.name for p in tmp_path.glob(".f4_t1_event.*.csv"))
    assert len(left) == 1, list(tmp_path.iterdir())     # what the kill leaves
    # Another killed run's temps, made as `_atomic` makes them, beside other outputs.
    stale = [Path(tempfile.mkstemp(dir=tmp_path, prefix=f".{stem}.", suffix=suffix)[1])
             for stem, suffix in (("f2_loss_vs_n", ".png"), ("sims_settings", ".json"))]
    others = ["notes.txt", ".other.abcdefgh.png", ".f2_loss_vs_n.abcdefghi.png",
              "f2_loss_vs_n.abcdefgh.png", ".f4_t1_event.abcdefgh.txt", ".f4_t1_event.csv.bak",
              ".f4_t1_event.ABCDEFGH.csv"]
    for name in others:
        (tmp_path / name).write_text(name)
    make_figures(SMALLEST, tmp_path, only="f4", log=lambda line: None)
    assert not any(p.exists() for p in [tmp_path / left[0], *stale])
    for name in others:
        assert (tmp_path / name).read_text() == name, name
    hidden = {p.name for p in tmp_path.glob(".*")}
    assert hidden == {n for n in others if n.startswith(".")}, hidden   # lock file gone too


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    with hold_folder(tmp_path):
        second = python("import sys; from sims.__main__ import main; sys.exit(main(sys.argv[1:]))",
                        *F4, "--out", tmp_path)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, (out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert f"--out {tmp_path} is being written by process {os.getpid()}" in err, err
        assert not list(tmp_path.glob("*.csv")), "the refused run wrote"
        with pytest.raises(FolderBusy, match=f"process {os.getpid()}"):   # `plot` too
            make_figures(SMALLEST, tmp_path, only="f4", simulate=False)
    assert not (tmp_path / LOCK_FILE).exists()
    make_figures(SMALLEST, tmp_path, only="f4", log=lambda line: None)   # free again


def test_ctrl_c_ends_with_status_130_and_one_line(tmp_path):
    """SIGINT while an experiment runs: exit status 130, no traceback, a line saying how to
    resume; the folder is free again. The experiment is replaced by one that says it
    started and sleeps, so the signal always lands mid-run."""
    run = python("""
        import runpy, signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)   # even if pytest ignores it
        from sims import experiments
        def sleeps(settings, progress=None):
            print("started", file=sys.stderr, flush=True)
            time.sleep(120)
        experiments.EXPERIMENTS["t1_event"] = sleeps
        sys.argv = ["sims", *sys.argv[1:]]
        runpy.run_module("sims", run_name="__main__", alter_sys=True)
        """, *F4, "--out", tmp_path)
    try:
        for line in run.stderr:
            if line.strip().endswith("started"):
                break
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == ("interrupted; rerun the same command with "
                                            "--resume to keep the finished experiments"), err
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_write_that_fails_half_way_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    # guards: the output itself written (even once) before the rename: an error or a kill
    # mid-write would leave a half-written CSV where --resume or `plot` reads it.
    from sims.figures import _atomic
    path = tmp_path / "f4_t1_event.csv"
    path.write_text("n,exact\n1,0\n")

    def fails_half_way(target):
        with open(target, "w") as file:
            file.write("n,ex")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        _atomic(path, fails_half_way)
    assert path.read_text() == "n,exact\n1,0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f4_t1_event.csv"]


def test_every_stale_temporary_of_an_output_is_removed_not_only_the_first(tmp_path):
    # guards: one temp file per output removed (two killed runs leave two beside one CSV);
    # a file of another name, though alike, is kept
    from sims.figures import hold_folder
    stale = [tmp_path / ".f4_t1_event.abcd1234.csv", tmp_path / ".f4_t1_event.zz_9zz_9.csv",
             tmp_path / ".f1_t1_curves.q1w2e3r4.png"]
    kept = [tmp_path / ".f4_t1_event.abcd123.csv", tmp_path / "f4_t1_event.abcd1234.csv"]
    for path in stale + kept:
        path.write_text("x")
    with hold_folder(tmp_path):
        assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)


@pytest.mark.parametrize("command, advice", [
    ("plot", "interrupted; `python -m sims plot` with the same arguments redraws them"),
    ("figures", "interrupted; rerun the same command with --resume to keep the finished "
                "experiments"),
])
def test_ctrl_c_advice_fits_the_command_interrupted(command, advice, monkeypatch, capsys):
    # guards: `plot`'s advice naming another command (the real-process test above sees the
    # figures' line only); in-process, make_figures interrupted by a stand-in
    import sims.__main__ as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "make_figures", interrupted)
    assert cli.main([command, "--out", "never-written"]) == 130
    assert capsys.readouterr().err == f"\n{advice}\n"
