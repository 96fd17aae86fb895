"""scripts/compare_figure_csvs.py: two runs of `sims figures` agree to rounding, or not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_figure_csvs.py"
HEADER = "activation,method,step,mean,log10_mean,log10_se\n"
ROWS = ["linear,first,0,0.5,-0.30103,0.01\n",
        "linear,first,9,1e-30,-30.0,0.2\n",      # an exact fit: every digit is rounding
        "linear,all,9,0.25,-0.60206,0.02\n"]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_figure_csvs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


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
