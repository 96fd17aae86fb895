"""The parallel run's work units (tests/conftest.py): the Ray files' tests are one unit."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import RAY_FILES, work_unit


def test_the_ray_files_exist():
    """A renamed Ray test file would silently leave the group."""
    here = Path(__file__).parent
    assert all(len(list(here.rglob(name))) == 1 for name in RAY_FILES), RAY_FILES


def test_ray_tests_share_one_unit_and_every_other_test_is_its_own():
    assert work_unit("tests/deep/test_ray_backend.py::TestLocalRay::test_a") == "ray"
    assert work_unit("tests/deep/test_gpu_check.py::test_b[0.25-x]") == "ray"
    assert work_unit("tests/deep/test_slurm_recipe.py::test_c") == "ray"
    other = "tests/deep/test_engine.py::test_frozen[second]"
    assert work_unit(other) == other
    assert work_unit("tests/deep/test_not_ray_backend.py::test_d") != "ray"
