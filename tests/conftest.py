"""Settings for a parallel run (`pytest -n N`, pytest-xdist; `make test` uses one worker per
core). Without -n these hooks change nothing.

- Each worker gets its share of the cores: N workers each running torch on every core
  would oversubscribe the CPU and run slower than one.
- Tests are grouped by file (run with `--dist loadgroup`), so a module's fixtures are built
  once; every file that starts Ray shares one group, since two Ray clusters on one host
  would compete for its ports and CPUs and a test's time bounds assume it has the host.
"""
from __future__ import annotations

import os

import pytest
import torch

RAY_FILES = {"test_ray_backend.py", "test_slurm_recipe.py", "test_gpu_check.py"}

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _threads = max(1, (_cores or 1) // _workers)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # subprocesses the tests start


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name))
