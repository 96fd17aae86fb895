"""The parallel run's work units (tests/conftest.py): the Ray files' tests are one unit,
the tests of each file that shares a costly fixture one unit per file."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import RAY_FILES, SHARED_FIXTURE_FILES, slow_first, work_unit


def test_the_ray_files_exist():
    """A renamed Ray test file would silently leave the group."""
    here = Path(__file__).parent
    assert all(len(list(here.rglob(name))) == 1 for name in RAY_FILES | SHARED_FIXTURE_FILES)


def test_ray_tests_share_one_unit_and_every_other_test_is_its_own():
    assert work_unit("tests/deep/test_ray_backend.py::TestLocalRay::test_a") == "ray"
    assert work_unit("tests/deep/test_gpu_check.py::test_b[0.25-x]") == "ray"
    assert work_unit("tests/deep/test_slurm_recipe.py::test_c") == "ray"
    other = "tests/deep/test_engine.py::test_frozen[second]"
    assert work_unit(other) == other
    assert work_unit("tests/deep/test_not_ray_backend.py::test_d") != "ray"


def test_a_file_that_shares_a_costly_fixture_is_one_unit_of_its_own():
    speed = ["tests/deep/test_speed.py::test_a", "tests/deep/test_speed.py::test_b[x]"]
    assert {work_unit(n) for n in speed} == {"test_speed.py"}
    assert work_unit("tests/sims/test_sims_figures.py::test_c") == "test_sims_figures.py"
    assert work_unit("tests/sims/test_sims_figure_claims.py::test_d") == \
        "tests/sims/test_sims_figure_claims.py::test_d"


def test_slow_tests_are_handed_out_first_each_group_in_its_order():
    class Item:
        def __init__(self, name, slow):
            self.name, self.slow = name, slow

        def get_closest_marker(self, name):
            return pytest.mark.slow.mark if self.slow and name == "slow" else None

    items = [Item("a", False), Item("b", True), Item("c", False), Item("d", True)]
    slow_first(items)
    assert [i.name for i in items] == ["b", "d", "a", "c"]
