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


@pytest.fixture
def real_fmnist():
    """The folder of the real Fashion-MNIST files; the test is skipped without them, and
    fails instead under REQUIRE_FMNIST=1 (CI installs them: a skip there would hide it)."""
    from deep.data import fmnist as F
    folder = F.resolve_dir(None)
    present = all(any((folder / (stem + ext)).is_file() for ext in (".gz", ""))
                  for stem, _ in F.FILES.values())
    if not present:
        if os.environ.get("REQUIRE_FMNIST") == "1":
            pytest.fail(f"REQUIRE_FMNIST=1 but the Fashion-MNIST files are not in {folder}")
        pytest.skip(f"Fashion-MNIST files not in {folder}: apt-get install dataset-fashion-mnist "
                    f"or set {F.ENV_VAR} (REQUIRE_FMNIST=1 makes this a failure)")
    return folder
