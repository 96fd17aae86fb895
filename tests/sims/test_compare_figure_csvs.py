"""scripts/compare_figure_csvs.py: two runs of `sims figures` agree to rounding, or not."""

from __future__ import annotations

import pytest

from tests.scripts import load_script

HEADER = "activation,method,step,mean,log10_mean,log10_se\n"
ROWS = ["linear,first,0,0.5,-0.30103,0.01\n",
        "linear,first,9,1e-30,-30.0,0.2\n",      # an exact fit: every digit is rounding
        "linear,all,9,0.25,-0.60206,0.02\n"]


@pytest.fixture(scope="module")
def compare():
    return load_script("compare_figure_csvs").main


def run(compare, tmp_path, rows):
    (tmp_path / "old").mkdir(exist_ok=True)
    (tmp_path / "new").mkdir(exist_ok=True)
    (tmp_path / "old" / "f1_t1_curves.csv").write_text(HEADER + "".join(ROWS))
    (tmp_path / "new" / "f1_t1_curves.csv").write_text(HEADER + "".join(rows))
    return compare([str(tmp_path / "old"), str(tmp_path / "new")])


def test_identical_and_rounding_level_pass(compare, tmp_path, capsys):
    assert run(compare, tmp_path, ROWS) == 0
    assert "f1_t1_curves.csv: identical" in capsys.readouterr().out
    rounding = [ROWS[0], "linear,first,9,3e-30,-29.5,0.3\n", ROWS[2]]
    assert run(compare, tmp_path, rounding) == 0
    assert "largest difference 4e-30 of its column's scale" in capsys.readouterr().out
    last_digits = ["linear,first,0,0.5000000000001,-0.30103,0.01\n", *ROWS[1:]]
    assert run(compare, tmp_path, last_digits) == 0


@pytest.mark.parametrize("rows", [
    ["linear,first,0,0.5001,-0.30103,0.01\n", *ROWS[1:]],                 # 2e-4 of the scale
    [ROWS[0], ROWS[1], "linear,all,9,0.25,-0.70206,0.02\n"],            # 0.1 decades
    [ROWS[0], ROWS[1], "linear,lp-ft,9,0.25,-0.60206,0.02\n"],          # a label swapped
    ROWS[:2],                                                          # a row missing
])
def test_a_real_difference_fails(compare, tmp_path, capsys, rows):
    assert run(compare, tmp_path, rows) == 1


def test_a_geometric_mean_over_some_exact_fits_is_compared_by_its_arithmetic_mean(compare,
                                                                                    tmp_path,
                                                                                    capsys):
    """F5 on an AMD EPYC: 30 % of a row's draws at rounding level moved its log10_mean by
    0.029 decades (their digits are noise), its mean unchanged. Such a row's log10 columns
    are rounding; its mean and fraction_zero are still held to the tolerance."""
    header = "method,step,mean,log10_mean,log10_se,fraction_zero\n"
    old = ["all,182,0.2,-7.45576911849,0.07,0.305\n", "first,182,0.5,-0.30103,0.01,0\n"]

    def run_f5(rows):
        for side, body in (("old", old), ("new", rows)):
            (tmp_path / side).mkdir(exist_ok=True)
            (tmp_path / side / "f5_forgetting.csv").write_text(header + "".join(body))
        return compare([str(tmp_path / "old"), str(tmp_path / "new")])

    assert run_f5(["all,182,0.2,-7.42651928864,0.07,0.305\n", old[1]]) == 0
    assert "only in rows at rounding level" in capsys.readouterr().out
    assert run_f5(["all,182,0.3,-7.42651928864,0.07,0.305\n", old[1]]) == 1   # the mean moved
    assert run_f5(["all,182,0.2,-7.45576911849,0.07,0.4\n", old[1]]) == 1     # more exact fits
    assert run_f5([old[0], "first,182,0.5,-0.33103,0.01,0\n"]) == 1            # no exact fit: 0.03


def test_a_missing_folder_is_named_not_each_csv(compare, tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "f1_t1_curves.csv").write_text(HEADER + "".join(ROWS))
    assert compare([str(tmp_path / "old"), str(tmp_path / "nowhere")]) == 1
    out = capsys.readouterr().out
    assert "nowhere is not a folder of figure CSVs" in out and "missing in" not in out
