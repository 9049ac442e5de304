"""Ranks for the distributed tests: worker processes kept for the whole session, one set per world size.

Starting ranks costs time, so the tests share them: the ``ranks`` fixture is parametrized over the world
sizes with session scope (pytest runs every test of one size before starting the other) and restarts the
processes after a failed run. A test sends a module-level
function of its file to the ranks; the function builds its inputs from a seed shared by all ranks, computes
the single-process reference itself and asserts there (an assertion failing on a rank fails the test with
that rank's traceback).
"""

from __future__ import annotations

import sys
import warnings

import pytest

from triformers.distributed.testing import DistributedWorkers

WORLD_SIZES = (2, 4)
# A run is a handful of small collectives and matmuls, seconds on an idle machine; the limit only has to catch a
# hang. On a loaded 2-core machine 4 ranks of the ring attention took over a minute, so it is five.
RUN_TIMEOUT_S = 300
# Forked ranks start in milliseconds with this process's modules already imported; spawned ones take seconds
# each to import torch and triformers (tests/distributed/test_testing.py covers spawn). Like DataLoader
# workers, the ranks run on one intra-op thread, set before any op, so the parent's OpenMP pool is not needed.
START = "fork" if sys.platform == "linux" else "spawn"


class Ranks:
    """``world_size`` ranks that run functions; started on first use, restarted after a failed run."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._workers: DistributedWorkers | None = None

    def run(self, fn, *args, **kwargs) -> list:
        """``fn(rank, world_size, *args, **kwargs)`` on every rank; the results in rank order."""
        if self._workers is None or not self._workers.alive:
            with warnings.catch_warnings():  # Python >= 3.12 on forking pytest-xdist's threaded workers
                warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
                self._workers = DistributedWorkers(self.world_size, timeout_s=RUN_TIMEOUT_S, start_method=START)
        return self._workers.run(fn, *args, **kwargs)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()


@pytest.fixture(scope="session", params=WORLD_SIZES, ids=lambda n: f"ranks{n}")
def ranks(request):
    r = Ranks(request.param)
    yield r
    r.close()
