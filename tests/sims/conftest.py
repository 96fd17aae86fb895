import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The simulator's tensors are small: one torch thread, as `python -m sims` uses, keeps
    these tests fast on a shared 2-core machine (restored afterwards for other suites)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
