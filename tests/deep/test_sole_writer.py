"""One writer per output: a second sweep, adaptation run or pretraining into the same file
is refused at once (two writers each rewrote the CSV with their own rows, and the later
one's rows were all that was left, silently), and a killed writer's lock and temp files
stand in no one's way."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deep.errors import ConfigError
from deep.files import sole_writer
from deep.protocol import load_protocol
from deep.sweep import quick
from deep.sweep import read_results, run_sweep

ROOT = Path(__file__).resolve().parents[2]
HELD = r"is being written by process \d+ on .*; wait for it to finish, or write to another --out"


@contextlib.contextmanager
def held_elsewhere(path):
    """`path` held by another process (sole_writer is re-entrant within one)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deep.files import sole_writer\n"
         f"with sole_writer({str(path)!r}):\n    print('held', flush=True); time.sleep(120)"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def small_protocol():
    return quick(load_protocol("synthetic")).replace(lrs=[0.01], methods=["last"])


def test_a_second_sweep_into_the_same_file_is_refused(tmp_path, synthetic_checkpoint):
    out = tmp_path / "r.csv"
    with held_elsewhere(out):  # another sweep, running
        with pytest.raises(ConfigError, match=f"--out {out} {HELD}"):
            run_sweep(small_protocol(), out, progress=False)
    assert not out.exists()
    assert run_sweep(small_protocol(), out, progress=False).ran == 1   # the lock went with it
    assert len(read_results(out)) == 1 and not list(tmp_path.glob(".*.lock"))


@pytest.mark.filterwarnings("ignore:checkpoint 'none'")
def test_a_second_adaptation_run_into_the_same_file_is_refused(tmp_path, one_thread):
    from tests.deep.test_adapt import _tiny_protocol
    from deep.adapt.runner import run_adaptation
    out = tmp_path / "a.csv"
    with held_elsewhere(out):
        with pytest.raises(ConfigError, match=HELD):
            run_adaptation(_tiny_protocol(methods=["tent"]), out, progress=False)
    assert not out.exists()


def test_a_killed_writers_lock_and_temp_files_are_taken_over(tmp_path):
    """A writer killed with SIGKILL leaves its lock file (no lock: flock went with it)
    and perhaps a temp file of an atomic write; the next writer takes both over."""
    out = tmp_path / "r.csv"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deep.files import sole_writer\n"
         f"with sole_writer({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"process {holder.pid} on "):
        with sole_writer(out):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    stale = tmp_path / ".r.csv.abc12345.tmp"
    stale.write_text("half a row")
    assert (tmp_path / ".r.csv.lock").exists()
    with sole_writer(out):
        assert not stale.exists()
    assert not (tmp_path / ".r.csv.lock").exists()


@pytest.mark.slow
def test_a_killed_sweeps_workers_stop_with_it(tmp_path, synthetic_checkpoint):
    """--workers 2: the workers die with the sweep's process (Linux: PR_SET_PDEATHSIG), not
    after their cell (here tens of seconds), so a rerun does not share the CPU with them."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    out = tmp_path / "r.csv"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "deep", "sweep", "--benchmark", "synthetic", "--shifts", "noise,flip",
         "--methods", "all", "--lrs", "0.01", "--seeds", "0", "--epochs", "200", "--patience", "200",
         "--workers", "2", "--no-progress", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers():
        children = Path(f"/proc/{sweep.pid}/task/{sweep.pid}/children")
        return children.read_text().split() if children.exists() else []
    deadline = time.time() + 120
    while len(workers()) < 2 and time.time() < deadline:
        time.sleep(0.1)
    found = [int(p) for p in workers()]
    assert found, "the sweep started no workers"
    time.sleep(3)  # the workers are inside their cells (200 epochs each)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in found):
        time.sleep(0.05)
    alive = [pid for pid in found if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed sweep"
    assert not out.exists()


def test_a_file_system_without_locks_warns_and_writes(tmp_path, monkeypatch):
    import fcntl
    def no_locks(fd, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*No locks available.*make sure no other"):
        with sole_writer(tmp_path / "r.csv") as path:
            path.write_text("rows")
    assert (tmp_path / "r.csv").read_text() == "rows"


def test_an_out_given_with_a_tilde_is_one_file_for_rows_lock_and_configuration(
        tmp_path, monkeypatch, synthetic_checkpoint):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    summary = run_sweep(small_protocol(), "~/runs/r.csv", progress=False)
    assert summary.out == tmp_path / "runs" / "r.csv"
    assert len(read_results(tmp_path / "runs" / "r.csv")) == 1
    assert (tmp_path / "runs" / "r.csv.config.json").is_file()
    assert not (tmp_path / "~").exists()


def test_a_symlinked_out_is_held_and_written_at_its_target(tmp_path):
    from deep.files import atomic_write_text, check_output
    target, link = tmp_path / "s1.csv", tmp_path / "link.csv"
    target.write_text("old")
    link.symlink_to(target)
    with held_elsewhere(target):
        with pytest.raises(ConfigError, match=HELD):
            with sole_writer(check_output(link)):
                pass
    with sole_writer(check_output(link)) as path:
        atomic_write_text(path, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_symlink_planted_at_the_lock_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".r.csv.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="cannot create its lock file"):
        with sole_writer(tmp_path / "r.csv"):
            pass
    assert victim.read_text() == "precious"


def test_stale_temps_of_this_output_only_are_removed(tmp_path):
    ours = [tmp_path / n for n in (".m.pt.a1b2c3d4.tmp", ".m.pt.json.a1b2c3d4.tmp",
                                   ".m.pt.state.a1b2c3d4.tmp")]
    theirs = [tmp_path / n for n in (".m.pt.v2.a1b2c3d4.tmp", ".mXpt.a1b2c3d4.tmp")]
    for f in ours + theirs:
        f.write_text("x")
    with sole_writer(tmp_path / "m.pt"):
        pass
    assert not any(f.exists() for f in ours) and all(f.exists() for f in theirs)


def test_a_process_holding_an_output_may_open_it_again(tmp_path):
    """A two-stage sweep holds its file across stages; each stage's sweep opens it again."""
    with sole_writer(tmp_path / "r.csv"):
        with sole_writer(tmp_path / "r.csv"):
            pass
        assert (tmp_path / ".r.csv.lock").exists()   # still the outer holder's
    assert not (tmp_path / ".r.csv.lock").exists()


# --- summaries and reports: a killed writer's temp files go with the next one -------------

ROOT = Path(__file__).resolve().parents[2]
STALE = "a1b2c3d4"  # mkstemp's eight random characters


def _plant(folder, *names):
    paths = [folder / f".{name}.{STALE}.tmp" for name in names]
    for p in paths:
        p.write_text("half a file")
    return paths


def _copy_committed(folder, source, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes((ROOT / "figures" / source / name).read_bytes())


def test_a_bench_summary_removes_a_killed_summarys_temps_and_only_those(tmp_path):
    from deep.bench import SUITES, summarize
    _copy_committed(tmp_path, "fmnist-v2", "results.csv", "curves.csv", "n_target.csv",
                    "n_target_curves.csv")
    stale = _plant(tmp_path, "table.md", "relative_accuracy.png", "learning_curves.pdf",
                   "n_target.png")
    others = _plant(tmp_path, "results.csv", "notes.md")   # not the summary's to remove
    summarize(tmp_path, SUITES["fmnist"])
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


def test_a_bench_run_removes_a_killed_runs_curves_temps(tmp_path, monkeypatch):
    import deep.bench
    from deep.__main__ import main
    monkeypatch.setattr(deep.bench, "run_benchmark", lambda *a, **k: None)   # no training
    monkeypatch.setattr(deep.bench, "summarize", lambda *a, **k: [])
    stale = _plant(tmp_path, "curves.csv", "n_target_curves.csv")
    assert main(["bench", "fmnist", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert not any(p.exists() for p in stale)


def test_a_report_removes_a_killed_reports_temps(tmp_path):
    from deep.report import write_report
    _copy_committed(tmp_path, "fmnist-v2", "results.csv")
    (tmp_path / "rep").mkdir()
    stale = _plant(tmp_path / "rep", "report.md", "relative_accuracy.png", "relative_accuracy.pdf")
    others = _plant(tmp_path / "rep", "mine.png")
    write_report(tmp_path / "results.csv", tmp_path / "rep")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


def test_an_adaptation_report_removes_a_killed_reports_temps(tmp_path):
    from deep.adapt import write_adapt_report
    _copy_committed(tmp_path, "fmnist-adapt", "results.csv")
    (tmp_path / "rep").mkdir()
    stale = _plant(tmp_path / "rep", "table.md", "relative_accuracy.png", "relative_accuracy.pdf")
    write_adapt_report(tmp_path / "results.csv", tmp_path / "rep")
    assert not any(p.exists() for p in stale)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_an_atomically_written_file_gets_the_mode_a_plain_open_gives(tmp_path, umask):
    """mkstemp makes its temp file private (0600); the renamed output must read as a file
    written with open() would (0666 less the umask), or a results CSV or checkpoint written
    on a shared machine is unreadable to the group it was meant for."""
    from deep.files import atomic_write_bytes
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "r.csv", lambda f: f.write(b"x\n"))
        with open(tmp_path / "plain.csv", "w") as f:
            f.write("x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "r.csv").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "r.csv").stat().st_mode & 0o777 == (tmp_path / "plain.csv").stat().st_mode & 0o777


def test_a_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    """Guards atomic_write_bytes' clean-up: a writer that fails half way (a full disk, a
    figure that cannot be drawn) leaves the previous file as it was and no temp file
    beside it (a results folder would gather .r.csv.*.tmp files on every failure)."""
    from deep.files import atomic_write_bytes
    path = tmp_path / "r.csv"
    path.write_bytes(b"old\n")

    def fail(f):
        f.write(b"half a ro")
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space left"):
        atomic_write_bytes(path, fail)
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


def test_a_saved_pdf_has_no_creation_date_so_the_same_data_give_the_same_bytes(tmp_path):
    """Guards save_figure's PDF metadata: without a creation date, a summary redrawn from
    the same CSVs gives byte-identical PDFs (a committed figure does not change on a rerun);
    matplotlib's default stamps the time of drawing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from deep.files import save_figure

    def draw(stem):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([1, 2, 3], [3, 1, 2])
        return save_figure(fig, tmp_path / stem)

    png, pdf = draw("a")
    assert (png.name, pdf.name) == ("a.png", "a.pdf")
    assert b"/CreationDate" not in pdf.read_bytes()
    assert draw("b")[1].read_bytes() == pdf.read_bytes()


def test_check_output_refuses_a_file_where_a_folder_is_expected_and_the_reverse(tmp_path):
    """Guards both directions of check_output's kind check: an existing file given as an
    output folder, and an existing folder given as an output file, are ConfigErrors that
    name the kind found and the kind expected."""
    from deep.files import check_output
    (tmp_path / "f.csv").write_text("x\n")
    with pytest.raises(ConfigError, match=r"f\.csv is a file; a folder is expected"):
        check_output(tmp_path / "f.csv", folder=True)
    with pytest.raises(ConfigError, match="is a folder; a file is expected"):
        check_output(tmp_path, folder=False)
    assert check_output(tmp_path, folder=True) == tmp_path


def test_remove_figure_deletes_both_the_png_and_the_pdf(tmp_path):
    """Guards remove_figure's two suffixes: a stale plot's PDF would otherwise stay beside
    a table that no longer has it; other files of the folder stay."""
    from deep.files import remove_figure
    for name in ("plot.png", "plot.pdf", "plot.csv"):
        (tmp_path / name).write_text("x")
    remove_figure(tmp_path / "plot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.csv"]
    remove_figure(tmp_path / "plot")  # nothing left to remove: no error
