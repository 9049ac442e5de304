"""One intra-op thread for these tests: their tensors are tiny, so threads cost more than they give, and the
suite runs one pytest worker per core (``-n 2`` on two cores), where extra threads oversubscribe the CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
