"""Shared fixtures of the deep tests."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory):
    """A per-session cache folder for the synthetic source model (trained once, ~10 s)."""
    path = tmp_path_factory.mktemp("surgical-ft-cache")
    old = os.environ.get("SURGICAL_FT_CACHE")
    os.environ["SURGICAL_FT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SURGICAL_FT_CACHE", None)
    else:
        os.environ["SURGICAL_FT_CACHE"] = old


@pytest.fixture(scope="session")
def synthetic_checkpoint(synthetic_cache):
    """Path of the synthetic benchmark's source model (resnet26-w4)."""
    from deep.data import get_benchmark
    from deep.pretrain import cached_source_model
    return cached_source_model(get_benchmark("synthetic"), "resnet26-w4")


@pytest.fixture
def one_thread():
    """One torch thread: steady timings on a shared CPU, and the same numbers as
    subprocesses started with OMP_NUM_THREADS=1."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
