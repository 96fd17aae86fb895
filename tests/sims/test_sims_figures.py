"""The figure pipeline on a tiny configuration: files, columns, determinism, resume, CLI."""
import json

import pandas as pd
import pytest
import torch

from sims import experiments
from sims.__main__ import main
from sims.figures import SETTINGS_FILE, SOURCES, make_figures, resolve_only, write_csv

# seaborn's heatmap calls a matplotlib method that matplotlib plans to deprecate.
pytestmark = pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")
TINY = experiments.Settings(draws=3, steps=20, device="cpu")
SMALLEST = experiments.Settings(draws=2, steps=2, device="cpu")   # for the pipeline's logic
COLUMNS = {
    "f1_t1_curves": {"activation", "method", "step", "mean", "se", "log10_mean", "log10_se",
                     "fraction_zero", "draws", "lr_halved"},
    "f2_loss_vs_n": {"activation", "kind", "method", "n", "mean", "se", "draws", "train_mean",
                     "lr_halved"},
    "f3_best_layer": {"activation", "kind", "method", "n", "mean", "se", "relative_to_all",
                      "relative_se", "draws"},
    "f4_t1_event": {"n", "exact", "event_frequency", "frequency", "se", "draws", "first_zero",
                    "full_positive", "full_unconverged", "lr_halved"},
    "f5_forgetting": {"method", "quantity", "step", "mean", "se", "log10_mean", "log10_se",
                      "fraction_zero", "draws", "lr_halved"},
    "f6_auto_rgn": {"activation", "kind", "draw", "n", "rgn_first", "rgn_last", "loss_first",
                    "loss_last", "loss_all", "loss_lp_ft", "rgn_points_to", "best_layer",
                    "agree"},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    written = make_figures(TINY, out, log=lambda line: None)
    return out, written


def test_pipeline_writes_png_pdf_and_csv_with_the_expected_columns(tiny_run):
    out, written = tiny_run
    for figure in SOURCES:
        for suffix in (".png", ".pdf", ".csv"):
            path = out / f"{figure}{suffix}"
            assert path in written and path.stat().st_size > 1000, path
        assert (out / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{figure}.pdf").read_bytes()[:5] == b"%PDF-"
        table = pd.read_csv(out / f"{figure}.csv")
        assert set(table.columns) == COLUMNS[figure], figure
        assert len(table) > 0
    assert not list(out.glob(".*")), "temporary files left behind"
    recorded = json.loads((out / SETTINGS_FILE).read_text())
    assert all(recorded[name] == TINY.as_dict() for name in set(SOURCES.values()))


def test_tables_hold_what_the_theory_says(tiny_run):
    out, _ = tiny_run
    f1 = pd.read_csv(out / "f1_t1_curves.csv")
    assert set(f1.method) == set(experiments.METHODS) and f1.draws.max() == TINY.draws
    assert (f1.step.max(), f1.step.min()) == (2 * TINY.steps, 0)
    f2 = pd.read_csv(out / "f2_loss_vs_n.csv")
    assert sorted(set(f2.n)) == list(experiments.N_GRID)
    assert set(f2.kind) == set(experiments.SHIFTS)
    # P2 with relu: first-layer tuning can do no better than predicting 0 (loss >= E[y^2]).
    label_relu_first = f2[(f2.kind == "label") & (f2.activation == "relu") & (f2.method == "first")]
    assert (label_relu_first["mean"] >= 1 - 1e-9).all()
    f4 = pd.read_csv(out / "f4_t1_event.csv")
    assert list(f4.n) == list(experiments.N_EVENT) and f4.exact.iloc[0] == 0.0
    assert f4.exact.max() == pytest.approx(0.98046875)                   # n = 9
    # The forgetting mechanism, exactly: first-layer tuning never moves the head, so the
    # old directions missed by the sample stay exact; full fine-tuning moves it.
    f5 = pd.read_csv(out / "f5_forgetting.csv")
    unseen = f5[f5.quantity == "error on unseen old directions"]
    assert unseen[unseen.method == "first"]["mean"].max() < 1e-25
    assert unseen[(unseen.method == "all")].sort_values("step")["mean"].iloc[-1] > 1e-8
    drift = f5[f5.quantity.str.startswith("head drift") & (f5.method == "first")]
    assert drift["mean"].abs().max() == 0.0
    assert (drift.fraction_zero == 1.0).all() and (unseen[unseen.method == "first"]
                                                   .fraction_zero == 1.0).all()
    moved = f5[f5.quantity.str.startswith("head drift") & (f5.method == "all")].sort_values("step")
    assert moved.fraction_zero.iloc[0] == 1.0 and moved.fraction_zero.iloc[-1] == 0.0
    f6 = pd.read_csv(out / "f6_auto_rgn.csv")
    assert (f6.agree == (f6.rgn_points_to == f6.best_layer)).all()


def test_same_seed_gives_identical_csvs_and_another_seed_does_not(tiny_run, tmp_path):
    out, _ = tiny_run
    for name in ("t1_curves", "t1_event", "forgetting"):
        for table_name, table in experiments.EXPERIMENTS[name](TINY).items():
            write_csv(table, tmp_path / f"{table_name}.csv")
            assert (tmp_path / f"{table_name}.csv").read_bytes() == \
                (out / f"{table_name}.csv").read_bytes(), table_name
    other = experiments.Settings(draws=3, steps=20, seed=1, device="cpu")
    write_csv(experiments.forgetting(other)["f5_forgetting"], tmp_path / "other.csv")
    assert (tmp_path / "other.csv").read_bytes() != (out / "f5_forgetting.csv").read_bytes()


def test_resume_reuses_matching_csvs_only(tmp_path):
    lines = []
    make_figures(TINY, tmp_path, only="f4", log=lines.append)
    before = (tmp_path / "f4_t1_event.csv").stat().st_mtime_ns
    make_figures(TINY, tmp_path, only="f4", resume=True, log=lines.append)
    assert (tmp_path / "f4_t1_event.csv").stat().st_mtime_ns == before
    assert "existing CSVs" in lines[-1]
    changed = experiments.Settings(draws=4, steps=20, device="cpu")
    assert not any("recomputing" in line for line in lines)
    make_figures(changed, tmp_path, only="f4", resume=True, log=lines.append)
    assert pd.read_csv(tmp_path / "f4_t1_event.csv").draws.max() == 4
    # Recomputed, as documented, and said so: the user sees what changed.
    assert "f4 (t1_event): recorded draws 3, now 4: recomputing" in lines


def test_resume_recomputes_an_experiment_one_of_whose_csvs_is_missing(tmp_path):
    # Guards --resume trusting the recorded settings alone: F3's CSV would stay missing.
    make_figures(SMALLEST, tmp_path, only="f2", log=lambda line: None)
    (tmp_path / "f3_best_layer.csv").unlink()
    lines = []
    make_figures(SMALLEST, tmp_path, only="f2", resume=True, log=lines.append)
    assert (tmp_path / "f3_best_layer.csv").exists()
    assert "f2, f3, f6 (shifts): a CSV is missing: recomputing" in lines


def test_only_redraws_every_figure_whose_csv_it_rewrote(tmp_path):
    """F2, F3 and F6 share one experiment: asking for F2 rewrites all three CSVs, so all
    three figures are redrawn (a PNG never sits beside a CSV it was not drawn from)."""
    written = make_figures(SMALLEST, tmp_path, only="f2", log=lambda line: None)
    for figure in ("f2_loss_vs_n", "f3_best_layer", "f6_auto_rgn"):
        assert tmp_path / f"{figure}.csv" in written and tmp_path / f"{figure}.png" in written
    assert not (tmp_path / "f4_t1_event.png").exists()


def test_an_interrupted_experiment_is_not_resumed_from_a_mix_of_csvs(tmp_path, monkeypatch):
    """Interrupted after the first of an experiment's CSVs was replaced, --resume with the
    old settings must rerun it, not keep one new CSV beside old ones."""
    import sims.figures as figures
    make_figures(SMALLEST, tmp_path, only="f2", log=lambda line: None)
    changed = experiments.Settings(draws=3, steps=2, device="cpu")
    calls = []

    def fails_on_the_second(table, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_csv(table, path)
    monkeypatch.setattr(figures, "write_csv", fails_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_figures(changed, tmp_path, only="f2", log=lambda line: None)
    monkeypatch.undo()
    assert "shifts" not in json.loads((tmp_path / SETTINGS_FILE).read_text())
    make_figures(SMALLEST, tmp_path, only="f2", resume=True, log=lambda line: None)
    for figure in ("f2_loss_vs_n", "f3_best_layer"):
        assert pd.read_csv(tmp_path / f"{figure}.csv").draws.max() == SMALLEST.draws, figure


def test_bad_input_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="draws must be an integer >= 2"):
        experiments.Settings(draws=1)
    with pytest.raises(ValueError, match="unknown figure 'f9'"):
        resolve_only("f1,f9")
    assert resolve_only("f2,f2_loss_vs_n,f6") == ["f2_loss_vs_n", "f6_auto_rgn"]
    assert main(["figures", "--only", "f9", "--out", str(tmp_path)]) == 2
    assert main(["plot", "--out", str(tmp_path / "empty")]) == 2
    assert main(["figures", "--draws", "1", "--out", str(tmp_path)]) == 2
    assert main(["figures", "--device", "tpu", "--draws", "2", "--steps", "2", "--only", "f5",
                 "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_written_files_get_the_usual_permissions(tiny_run):
    import os
    out, _ = tiny_run
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "f4_t1_event.csv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_csvs_keep_twelve_significant_digits(tmp_path):
    # guards: a coarser float format (the tables' losses span 1e-32..1)
    import numpy as np
    values = [1 / 3, 2e-31 / 3, 123456.789012345, -np.pi]
    write_csv(pd.DataFrame(dict(x=values)), tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv").x.to_numpy()
    np.testing.assert_allclose(back, values, rtol=1e-11, atol=0)


def test_auto_is_recorded_as_the_device_it_ran_on(tmp_path):
    """sims_settings.json said "auto": --resume on a GPU kept CSVs a CPU made (other digits),
    and `--device cpu --resume` redid identical ones."""
    import dataclasses
    settings = dataclasses.replace(TINY, device="auto")
    make_figures(settings, tmp_path, only="f4", log=lambda line: None)
    ran_on = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["t1_event"]["device"] == ran_on
    lines = []
    make_figures(dataclasses.replace(TINY, device=ran_on), tmp_path, only="f4", resume=True,
                 log=lines.append)
    assert lines and "drawn from existing CSVs" in lines[-1]      # nothing simulated again


def test_the_api_pages_option_table_is_the_parsers():
    """docs/api.md lists `python -m sims figures`' options with their defaults: a new option
    missing there, or a default changed in the code only, fails here."""
    from pathlib import Path

    from sims.__main__ import build_parser

    lines = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text().splitlines()
    start = lines.index("| option | default | what |") + 2
    documented = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        option, default = [cell.strip().strip("`") for cell in line.strip("|").split(" | ")][:2]
        documented[option] = default
    parser_defaults = vars(build_parser().parse_args(["figures"]))
    del parser_defaults["command"]

    def shown(value):
        """How the table writes a default: `--only` absent is every figure, a flag is off."""
        if value is None:
            return "all"
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    assert documented == {f"--{name}": shown(value) for name, value in parser_defaults.items()}


def test_every_figures_flag_reaches_the_settings_and_resume(monkeypatch):
    """`python -m sims figures --draws 7 --steps 11 --seed 5 --dtype float32 --device cpu
    --threads 2 --resume --only f4 --out x` hands make_figures exactly those values (a flag
    dropped, or two swapped, would run the defaults silently); without flags, Settings()'s."""
    import sims.__main__ as cli
    calls = []
    monkeypatch.setattr(cli, "make_figures", lambda *a, **k: calls.append((a, k)))
    threads = torch.get_num_threads()
    try:
        assert cli.main(["figures", "--draws", "7", "--steps", "11", "--seed", "5", "--dtype",
                         "float32", "--device", "cpu", "--threads", "2", "--resume", "--only",
                         "f4", "--out", "x"]) == 0
        assert torch.get_num_threads() == 2
        assert cli.main(["figures"]) == 0
    finally:
        torch.set_num_threads(threads)
    (settings, out, only), options = calls[0]
    assert settings == experiments.Settings(draws=7, steps=11, seed=5, dtype="float32",
                                            device="cpu")
    assert (out, only, options) == ("x", "f4", {"resume": True})
    (settings, out, only), options = calls[1]
    assert settings == experiments.Settings(draws=200, steps=2000, seed=0, dtype="float64",
                                            device="auto")
    assert (out, only, options) == ("figures", None, {"resume": False})


def test_threads_below_one_end_with_status_2_and_one_error_line(capsys):
    from sims.__main__ import main
    assert main(["figures", "--threads", "0", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --threads must be >= 1, got 0\n", err


def test_a_resume_line_names_every_changed_setting_with_its_old_and_new_value():
    from sims.figures import _recomputing
    recorded = dict(draws=3, steps=20, seed=0, dtype="float64", device="cpu")
    now = dict(recorded, draws=4, seed=2)
    assert _recomputing("t1_event", recorded, now) == \
        "f4 (t1_event): recorded draws 3, seed 0, now draws 4, seed 2: recomputing"
    assert _recomputing("shifts", recorded, dict(recorded, dtype="float32")) == \
        "f2, f3, f6 (shifts): recorded dtype float64, now float32: recomputing"


def test_only_takes_names_with_spaces_after_the_commas():
    assert resolve_only(" f1, f4 ,f5_forgetting") == ["f1_t1_curves", "f4_t1_event",
                                                       "f5_forgetting"]


def _stand_in_shifts(monkeypatch):
    """The shifts experiment, reading and drawing replaced by stand-ins (the pipeline's
    choices alone, in milliseconds); returns the list of the experiment's calls."""
    import sims.figures as figures
    calls = []

    def shifts(settings, progress=None):
        calls.append(settings)
        return {name: pd.DataFrame(dict(x=[len(calls)]))
                for name in ("f2_loss_vs_n", "f3_best_layer", "f6_auto_rgn")}
    monkeypatch.setitem(experiments.EXPERIMENTS, "shifts", shifts)
    monkeypatch.setattr(figures, "read_table", lambda path, name: None)
    monkeypatch.setattr(figures.plots, "draw", lambda name, tables: name)
    monkeypatch.setattr(figures, "save_figure", lambda figure, paths: None)
    return calls


def test_a_redraw_or_a_full_resume_of_f2_redraws_f2_alone(tmp_path, monkeypatch):
    """Nothing simulated, so F3 and F6 (same experiment) keep the figures drawn from their
    unchanged CSVs: only the figures asked for are redrawn."""
    _stand_in_shifts(monkeypatch)
    written = make_figures(SMALLEST, tmp_path, only="f2", log=lambda line: None)
    assert {p.name for p in written if p.suffix == ".png"} == {
        "f2_loss_vs_n.png", "f3_best_layer.png", "f6_auto_rgn.png"}       # all rewritten
    expected = [tmp_path / "f2_loss_vs_n.png", tmp_path / "f2_loss_vs_n.pdf"]
    assert make_figures(SMALLEST, tmp_path, only="f2", simulate=False,
                        log=lambda line: None) == expected
    assert make_figures(SMALLEST, tmp_path, only="f2", resume=True,
                        log=lambda line: None) == expected


def test_without_resume_a_run_with_the_recorded_settings_simulates_again(tmp_path, monkeypatch):
    calls = _stand_in_shifts(monkeypatch)
    make_figures(SMALLEST, tmp_path, only="f3", log=lambda line: None)
    written = make_figures(SMALLEST, tmp_path, only="f3", log=lambda line: None)
    assert calls == [SMALLEST, SMALLEST]
    assert tmp_path / "f3_best_layer.csv" in written
    assert pd.read_csv(tmp_path / "f3_best_layer.csv").x.tolist() == [2]


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "seed must be a nonnegative integer, got -1"),
    (["--steps", "1"], "steps must be an integer >= 2, got 1"),
    (["--draws", "0"], "draws must be an integer >= 2, got 0"),
    (["--device", "tpu"], "device"),
    # an unknown --only is refused before make_figures makes --out (guards: resolve_only
    # left to make_figures, which creates the folder first)
    (["--only", "f9"], "unknown figure 'f9'"),
])
def test_a_bad_figures_value_is_one_error_line_before_any_folder_is_made(flags, message,
                                                                          tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["figures", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_written_files_take_their_mode_from_the_umask_of_the_moment(tmp_path):
    # guards: a fixed 0o644 (equal to 0o666 & ~umask only under the usual umask 022): a
    # group-writable umask 002 must give 0o664; and the umask read (by setting it) and
    # not put back, which leaves every later file of the process world-writable
    import os
    before = os.umask(0o002)
    try:
        write_csv(pd.DataFrame(dict(x=[1])), tmp_path / "t.csv")
        left = os.umask(0o002)
    finally:
        os.umask(before)
    assert (tmp_path / "t.csv").stat().st_mode & 0o777 == 0o664
    assert left == 0o002


def test_saved_figures_carry_no_date_so_the_same_data_gives_the_same_bytes(tmp_path):
    # guards: the PDF's CreationDate (or the PNG's Software) left in the metadata
    import matplotlib.pyplot as plt
    from sims.figures import save_figure
    figure, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(figure, [tmp_path / "a.pdf", tmp_path / "a.png"])
    pdf = (tmp_path / "a.pdf").read_bytes()
    assert b"/CreationDate" not in pdf and b"/Producer" not in pdf
    assert b"Software" not in (tmp_path / "a.png").read_bytes()


def test_settings_refuse_a_dtype_other_than_float64_or_float32_and_a_bool_seed():
    # guards: the dtype check dropped (only argparse's choices would stop float16, and
    # make_figures takes Settings directly); True taken as seed 1
    with pytest.raises(ValueError, match="dtype must be 'float64' or 'float32', got 'float16'"):
        experiments.Settings(dtype="float16")
    with pytest.raises(ValueError, match="seed must be a nonnegative integer, got True"):
        experiments.Settings(seed=True)


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_each_experiment_advances_the_progress_bar_by_its_units(name):
    # guards: `units` out of step with the simulate calls (the bar's total, from units,
    # ending short of or past 100 %)
    class Count:
        n = 0

        def update(self, k):
            self.n += k
    progress = Count()
    experiments.EXPERIMENTS[name](SMALLEST, progress)
    assert progress.n == experiments.units(name)
