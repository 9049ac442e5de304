"""Test configuration shared by the whole suite.

On a machine without CUDA the Triton kernels run under Triton's interpreter, which must be switched on
before any kernel is defined, hence before triformers is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one intra-op thread each avoids oversubscribing the cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
