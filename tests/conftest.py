"""Settings for a parallel run (`pytest -n N --dist loadgroup`, pytest-xdist; `make test`
uses one worker per core). Without -n these hooks change nothing.

- Each worker gets its share of the cores: N workers each running torch on every core
  would oversubscribe the CPU and run slower than one.
- Every test is a unit of work on its own, but the tests of the files that start Ray
  (RAY_FILES) are one unit, run by one worker one after another: two Ray clusters on one
  host would compete for its ports and CPUs, and a test's time bounds assume it has the
  host. xdist's own `xdist_group` marker cannot do this: pytest 9.2 ignores the node id
  that xdist 3.8 rewrites for it, so the scheduler below groups by file name instead.
- The tests marked slow are handed out before the other single tests.
"""
from __future__ import annotations

import os
from pathlib import PurePosixPath

import pytest
import torch

# A new test file that starts Ray (ray.init, `ray start`, a Ray sweep) belongs here.
RAY_FILES = {"test_ray_backend.py", "test_slurm_recipe.py", "test_gpu_check.py"}
# Files whose tests all read one costly module-scoped fixture (a run of `deep.speed`, a
# tiny `make figures`): one unit each, so that it runs once, not once on every worker.
SHARED_FIXTURE_FILES = {"test_speed.py", "test_sims_figures.py"}

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _threads = max(1, (_cores or 1) // _workers)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # subprocesses the tests start


@pytest.fixture(autouse=True)
def _torch_threads_put_back():
    """Every test leaves torch's thread count as it found it. Code under test may set it (a
    task group sets its own; `--threads` is applied in-process): left changed, every later
    test of the process would run on that count, slower or oversubscribed."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def slow_first(items: list) -> None:
    """The tests marked slow before the rest, in place (each group in its own order).
    xdist hands out the biggest units first (the Ray files, test_speed.py), then single
    tests in this order: a 2-minute test handed out last kept one worker busy while the
    other had nothing left."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_modifyitems(config, items):
    if _workers > 1:
        slow_first(items)


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: "ray" for the Ray files, its file for the
    SHARED_FIXTURE_FILES, else the test itself."""
    name = PurePosixPath(nodeid.split("::", 1)[0]).name
    if name in RAY_FILES:
        return "ray"
    return name if name in SHARED_FIXTURE_FILES else nodeid


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist not installed: tests run in one process
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class _RayTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadgroup":
            return _RayTestsTogether(config, log)
        return None
