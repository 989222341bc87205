"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and do not stall when another process holds the other core
    (each op of a two-thread pool would wait for a thread that is not scheduled). Used by the training, data,
    command-line and benchmark tests: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
