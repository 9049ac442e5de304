"""Run a function on N processes of this machine, each one rank of a fresh ``torch.distributed`` process group.

Used by the distributed tests, and by examples and benchmarks that want several ranks without ``torchrun``::

    from triformers.distributed.testing import launch

    def step(rank, world_size, n):
        x = torch.full((n,), float(rank))
        torch.distributed.all_reduce(x)
        return x

    outs = launch(4, step, 3)              # [tensor([6., 6., 6.])] * 4, one result per rank

:func:`launch` starts the processes, runs ``fn`` once and tears everything down. :class:`DistributedWorkers`
keeps the processes (and their process group) alive between calls, which saves the start-up when many
functions run on the same ranks. Processes are spawned (fresh interpreters, safe everywhere, seconds per rank
to import torch) or, with ``start_method="fork"``, forked (copies of the caller, milliseconds; refused once
the caller initialised CUDA).

Failures never hang:

- a rank that raises makes :meth:`DistributedWorkers.run` raise that exception in the parent (same type and
  message, the rank's traceback chained as its cause, a note naming the rank); when several ranks fail, the
  earliest failure is raised (a rank's error typically makes its peers fail a moment later in a collective);
- the other ranks are asked to stop: those idle destroy their process group, which makes peers blocked in a
  gloo collective fail at once; whatever still runs after :data:`GRACE_S` is killed;
- a run that does not finish within ``timeout_s`` raises :class:`TimeoutError` with the Python stacks of the
  unfinished ranks' threads (``faulthandler``) in its message, and their processes are killed. The process
  group's own timeout is ``timeout_s + GRACE_S``, so a collective waiting for a dead peer gives up as well.

A rendezvous goes through a ``FileStore`` in a fresh temporary directory (no TCP port to pick, none to
collide with concurrent jobs). Each rank runs with one intra-op thread (several ranks share this machine's
cores), ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, and with NCCL on GPU ``rank``. ``fn`` must be importable
by the children: a module-level function (of a module, a test file or a script's ``__main__``), or any
picklable callable.
"""

from __future__ import annotations

import itertools
import os
import pickle
import queue
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from triformers.distributed._workers import (  # noqa: F401  (re-exported)
    _STACK_FRAMES,
    _STOP,
    GRACE_S,
    RemoteTraceback,
    _check_config,
    _dumps,
    _error_payload,
    _exit_payload,
    _first_error,
    _function_ref,
    _innermost_frames,
    _resolve,
    _same_file,
    _stacks_path,
    _worker_main,
)

__all__ = ["launch", "DistributedWorkers", "RemoteTraceback", "DEFAULT_TIMEOUT_S", "START_TIMEOUT_S", "GRACE_S"]

DEFAULT_TIMEOUT_S = 300.0
# Starting a rank (spawn a Python process, import torch, join the group) takes 2-5 s on an idle machine and
# several times that with more ranks than cores; start-up gets at least this long whatever timeout_s is.
START_TIMEOUT_S = 120.0
_POLL_S = 0.05  # how often the parent checks for dead ranks while it waits for results
_STACKS_WAIT_S = 3.0  # the longest wait for faulthandler to write a hung rank's stacks (a busy machine is slow)


def launch(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backend: str = "gloo",
    start_method: str = "spawn",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` new processes, each a rank of one group.

    Args:
        world_size: number of processes (ranks), >= 1.
        fn: a module-level function (or other picklable callable) taking the rank and world size first.
        *args, **kwargs: passed to ``fn`` on every rank (pickled; tensors are fine). ``timeout_s``,
            ``backend`` and ``start_method`` are this function's own keywords.
        timeout_s: limit for running ``fn`` (default :data:`DEFAULT_TIMEOUT_S`); the start-up gets at least
            :data:`START_TIMEOUT_S`; the process group's collective timeout is ``timeout_s + GRACE_S``.
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (one GPU per rank: rank ``r`` uses ``cuda:r``).
        start_method: how the processes start: ``"spawn"`` (a fresh interpreter: the safe default, seconds per
            rank to import torch) or ``"fork"`` (a copy of this process, started in milliseconds; refused once
            CUDA or a process group is initialised here).

    Returns:
        ``[fn's return value on rank 0, on rank 1, ...]``.

    Raises:
        ValueError: bad ``world_size``/``backend``/``timeout_s``, too few GPUs for NCCL, or an ``fn`` that
            cannot be sent to other processes.
        TimeoutError: the ranks did not start or ``fn`` did not return in time.
        Exception: the first exception a rank raised, re-raised here (see the module docstring).
    """
    __tracebackhide__ = True  # pytest: show the rank's traceback, not this machinery
    _function_ref(fn)  # refuse what cannot reach the ranks before starting them
    _dumps((args, kwargs), "the arguments of fn")
    with DistributedWorkers(world_size, backend=backend, timeout_s=timeout_s, start_method=start_method) as workers:
        return workers.run(fn, *args, **kwargs)


class DistributedWorkers:
    """``world_size`` processes that keep one process group and run functions on request.

    Use as a context manager (or call :meth:`close`). After a failed or timed-out run the workers are shut
    down and every later :meth:`run` raises ``RuntimeError``: start new ones.

    Args:
        world_size: number of ranks, >= 1.
        backend: ``"gloo"`` or ``"nccl"``.
        timeout_s: default limit for each run (the start-up gets at least :data:`START_TIMEOUT_S`); the
            process group's timeout is ``timeout_s + GRACE_S``.
        start_method: ``"spawn"`` or ``"fork"`` (see :func:`launch`).
    """

    def __init__(
        self,
        world_size: int,
        *,
        backend: str = "gloo",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start_method: str = "spawn",
    ) -> None:
        _check_config(world_size, backend, timeout_s, start_method)
        self.world_size, self.backend, self.timeout_s = world_size, backend, float(timeout_s)
        self._tmpdir = tempfile.mkdtemp(prefix="triformers_dist_")
        ctx = mp.get_context(start_method)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._task_ids = itertools.count(1)
        self._closed = False
        self._grace_deadline: float | None = None  # set at the first failure: when the stragglers are killed
        self._procs = [
            ctx.Process(
                target=_worker_main, daemon=True, name=f"triformers-rank{rank}",
                args=(rank, world_size, backend, self._tmpdir, self.timeout_s,
                      self._tasks[rank], self._results),
            )
            for rank in range(world_size)
        ]  # fmt: skip
        for p in self._procs:
            p.start()
        try:
            self._collect(0, max(self.timeout_s, START_TIMEOUT_S), what="start (spawn, import, join the group)")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DistributedWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """False once the workers were closed, after a failure or by :meth:`close`."""
        return not self._closed

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank; return the results in rank order.

        Bounded by the workers' ``timeout_s``. Raises what :func:`launch` raises.
        """
        __tracebackhide__ = True
        if self._closed:
            raise RuntimeError(
                "these DistributedWorkers are shut down (closed, or a previous run failed); create new ones"
            )
        task_id = next(self._task_ids)
        message = (task_id, _function_ref(fn), _dumps((args, kwargs), "the arguments of fn"))
        for q in self._tasks:
            q.put(message)
        try:
            return self._collect(task_id, self.timeout_s, what=f"run {getattr(fn, '__qualname__', fn)!r}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every rank (each destroys its process group), kill what does not exit, remove the store."""
        if self._closed:
            return
        self._closed = True
        self._stop_all()
        deadline = self._grace_deadline or time.monotonic() + GRACE_S
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill([p for p in self._procs if p.is_alive()])
        for q in (*self._tasks, self._results):
            q.cancel_join_thread()
            q.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------------------------

    def _on_failure(self) -> None:
        """At the first failure: ask every rank to stop, and give them :data:`GRACE_S` before the kill."""
        if self._grace_deadline is None:
            self._grace_deadline = time.monotonic() + GRACE_S
            self._stop_all()

    def _stop_all(self) -> None:
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                q.put(_STOP)

    def _kill(self, procs: list) -> None:
        for p in procs:
            p.kill()
        for p in procs:
            p.join(GRACE_S)

    def _collect(self, task_id: int, limit: float, what: str) -> list[Any]:
        """Wait for every rank's outcome of ``task_id`` (0: start-up); raise the first failure or a timeout."""
        __tracebackhide__ = True
        deadline = time.monotonic() + limit
        results: dict[int, Any] = {}
        errors: dict[int, tuple] = {}  # rank -> (time raised, exception payload)
        while len(results) + len(errors) < self.world_size:
            if time.monotonic() > (self._grace_deadline or deadline):
                break
            try:
                tid, rank, ok, payload = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                for rank, p in enumerate(self._procs):
                    if rank not in results and rank not in errors and p.exitcode is not None:
                        errors[rank] = (time.time(), _exit_payload(rank, p.exitcode))
                        self._on_failure()
                continue
            if tid not in (task_id, -1):  # -1: a failure to join the process group
                continue
            if ok:
                results[rank] = payload
            else:
                errors[rank] = payload
                self._on_failure()
        if errors:
            raise _first_error(errors, self.world_size)
        if len(results) < self.world_size:
            missing = [r for r in range(self.world_size) if r not in results]
            stacks = self._stacks(missing)
            self._grace_deadline = time.monotonic()  # nothing to wait for: kill them at once
            raise TimeoutError(
                f"ranks {missing} of {self.world_size} did not finish {what} within timeout_s={limit:g} s; pass a "
                f"larger timeout_s if the work is just slow. Where they were:\n{stacks}"
            )
        return [pickle.loads(results[r]) for r in range(self.world_size)]

    def _stacks(self, ranks: list[int]) -> str:
        """The Python stacks of these ranks' threads, which faulthandler writes on SIGUSR1."""
        if not hasattr(signal, "SIGUSR1"):
            return "(stacks unavailable on this platform)"
        signalled = [r for r in ranks if self._procs[r].is_alive()]
        for r in signalled:
            os.kill(self._procs[r].pid, signal.SIGUSR1)
        texts = dict.fromkeys(ranks, "(no stacks: the process had exited or not started)\n")
        deadline = time.monotonic() + _STACKS_WAIT_S
        while signalled and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            for r in list(signalled):
                try:
                    with open(_stacks_path(self._tmpdir, r)) as f:
                        text = f.read()
                except OSError:
                    continue
                if text.strip():
                    texts[r] = _innermost_frames(text)
                    signalled.remove(r)
        return "".join(f"--- rank {r} ---\n{texts[r]}" for r in ranks)


