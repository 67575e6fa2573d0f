"""Fixtures of the engine tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead, and on a shared 2-core machine OpenMP spinning made a
    tiny-model training test ~40x slower (0.5 s -> 20 s). Restores the thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
