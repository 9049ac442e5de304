"""The multi-process launcher: results, the environment the ranks see, and failures that end the job quickly
with the failing rank's error (an exception, a hang, a crash), never a hang of the test."""

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

from triformers.distributed.testing import DistributedWorkers, RemoteTraceback, launch

# Python >= 3.12 warns when forking a process that has threads (pytest-xdist's workers do); the ranks use no
# lock another thread could hold
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
FORK = "fork" if sys.platform == "linux" else "spawn"


class CustomError(Exception):
    pass


def _report(rank, world, scale):
    x = torch.full((3,), float(rank + 1))
    dist.all_reduce(x)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": x * scale,
        "threads": torch.get_num_threads(),
        "env": (os.environ.get("RANK"), os.environ.get("WORLD_SIZE"), os.environ.get("TRIFORMERS_TEST_MARKER")),
    }


def test_launch_spawn_results_and_environment(monkeypatch):
    """The default start method: fresh interpreters that see the parent's environment."""
    monkeypatch.setenv("TRIFORMERS_TEST_MARKER", "from-parent")
    out = launch(2, _report, 2.0, timeout_s=60)
    for rank, r in enumerate(out):
        assert (r["rank"], r["world"], r["threads"]) == (rank, 2, 1)
        assert r["env"] == (str(rank), "2", "from-parent")
        torch.testing.assert_close(r["sum"], torch.full((3,), 6.0))


def test_workers_run_many(monkeypatch):
    monkeypatch.delenv("TRIFORMERS_TEST_MARKER", raising=False)
    with DistributedWorkers(4, timeout_s=60, start_method=FORK) as workers:
        for scale in (1.0, -3.0):
            out = workers.run(_report, scale)
            assert [r["rank"] for r in out] == [0, 1, 2, 3]
            assert all(r["env"][2] is None for r in out)
            torch.testing.assert_close(out[3]["sum"], torch.full((3,), 10.0 * scale))
        assert workers.alive
    assert not workers.alive
    assert all(not p.is_alive() for p in workers._procs)


def _raise_on_one(rank, world):
    if rank == 1:
        raise CustomError(f"rank {rank} found a bad input")
    dist.barrier()  # the others wait in a collective for the failed rank


def test_failing_rank_ends_the_job():
    workers = DistributedWorkers(4, timeout_s=60, start_method=FORK)
    with pytest.raises(CustomError, match="rank 1 found a bad input") as info:
        workers.run(_raise_on_one)
    # released, not killed after GRACE_S: every rank left its loop and exited by itself
    exitcodes = [p.exitcode for p in workers._procs]
    assert exitcodes == [0] * 4, f"exit codes {exitcodes}: the waiting ranks were killed, not released"
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "_raise_on_one" in str(info.value.__cause__) and "traceback of rank 1" in str(info.value.__cause__)
    if sys.version_info >= (3, 11):
        assert info.value.__notes__[0].startswith("raised on rank 1 of 4")
    assert not workers.alive and all(not p.is_alive() for p in workers._procs)
    with pytest.raises(RuntimeError, match="shut down"):
        workers.run(_report, 1.0)


def _hang_on_last(rank, world):
    if rank == world - 1:
        time.sleep(60)
    dist.barrier()


def test_hang_times_out_with_stacks():
    workers = DistributedWorkers(2, timeout_s=2, start_method=FORK)
    with pytest.raises(
        TimeoutError,
        match=r"ranks \[0, 1\] of 2 did not finish run '_hang_on_last' within "
        r"timeout_s=2 s",
    ) as info:
        workers.run(_hang_on_last)
    assert workers._procs[1].exitcode < 0, "the rank sleeping past the timeout is killed, not waited for"
    message = str(info.value)
    assert "--- rank 1 ---" in message and "in _hang_on_last" in message
    assert all(not p.is_alive() for p in workers._procs)


def _die(rank, world):
    if rank == 1:
        os._exit(3)
    dist.barrier()


def test_crashed_rank():
    with pytest.raises(RuntimeError, match="rank 1 exited with code 3 without reporting a result"):
        launch(2, _die, timeout_s=60, start_method=FORK)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"fn cannot be sent to the worker processes .*<lambda>.*module-level"):
        launch(2, lambda rank, world: None)
    with pytest.raises(ValueError, match=r"the arguments of fn cannot be sent"):
        launch(2, _report, (x for x in range(3)))
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1, got world_size=0"):
        launch(0, _report, 1.0)
    with pytest.raises(ValueError, match=r"backend must be 'gloo' \(CPU\) or 'nccl' \(GPUs\), got backend='mpi'"):
        launch(2, _report, 1.0, backend="mpi")
    with pytest.raises(ValueError, match=r"start_method must be 'spawn' or 'fork', got start_method='forkserver'"):
        launch(2, _report, 1.0, start_method="forkserver")
    with pytest.raises(ValueError, match=r"timeout_s must be > 0 seconds, got timeout_s=0"):
        DistributedWorkers(2, timeout_s=0)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match=r"needs one GPU per rank: world_size=64 but"):
            launch(64, _report, 1.0, backend="nccl")


def _nccl_sum(rank, world):
    x = torch.full((1000,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    return x.cpu(), torch.cuda.current_device()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl():
    out = launch(2, _nccl_sum, timeout_s=120, backend="nccl")
    for rank, (x, device) in enumerate(out):
        assert device == rank
        torch.testing.assert_close(x, torch.full((1000,), 3.0))
