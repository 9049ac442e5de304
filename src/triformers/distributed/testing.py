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

import datetime
import faulthandler
import importlib
import importlib.util
import itertools
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["launch", "DistributedWorkers", "RemoteTraceback", "DEFAULT_TIMEOUT_S", "START_TIMEOUT_S", "GRACE_S"]

DEFAULT_TIMEOUT_S = 300.0
# After the first failure, the other ranks get this long to report and exit before they are killed: enough for
# a gloo peer to notice a closed connection (well under a second here) and for a rank to destroy its group.
GRACE_S = 5.0
# Starting a rank (spawn a Python process, import torch, join the group) takes 2-5 s on an idle machine and
# several times that with more ranks than cores; start-up gets at least this long whatever timeout_s is.
START_TIMEOUT_S = 120.0
_POLL_S = 0.05  # how often the parent checks for dead ranks while it waits for results
_STOP = None  # the task that makes a worker leave its loop
_STACKS_WAIT_S = 3.0  # the longest wait for faulthandler to write a hung rank's stacks (a busy machine is slow)
_STACK_FRAMES = 12  # innermost frames of each thread shown in a TimeoutError (a forked rank has its parent's too)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process, chained as the ``__cause__`` of its copy."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


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


def _check_config(world_size: int, backend: str, timeout_s: float, start_method: str) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got world_size={world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPUs), got backend={backend!r}")
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; install a build with distributed support")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"backend='nccl' needs one GPU per rank: world_size={world_size} but "
            f"{torch.cuda.device_count()} GPUs are visible; lower world_size or use backend='gloo'"
        )
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got timeout_s={timeout_s!r}")
    if start_method not in ("spawn", "fork"):
        raise ValueError(f"start_method must be 'spawn' or 'fork', got start_method={start_method!r}")
    if start_method == "fork" and (torch.cuda.is_initialized() or dist.is_initialized()):
        raise ValueError(
            "start_method='fork' copies this process, whose CUDA context or process group cannot be shared with "
            "the copies, and one is initialised here; use start_method='spawn'"
        )


def _function_ref(fn: Callable[..., Any]) -> tuple:
    """How a worker finds ``fn``: its module, qualified name and file, or its pickle."""
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}: {fn!r}")
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname:  # not a lambda, not defined inside a function
        return ("name", module, qualname, getattr(sys.modules.get(module), "__file__", None))
    return ("pickle", _dumps(fn, "fn"))


def _dumps(obj: Any, what: str) -> bytes:
    try:
        return pickle.dumps(obj)
    except Exception as e:
        raise ValueError(
            f"{what} cannot be sent to the worker processes ({type(e).__name__}: {e}); pass a module-level "
            f"function and picklable arguments (no lambdas, local functions or open resources)"
        ) from e


def _resolve(ref: tuple) -> Callable[..., Any]:
    if ref[0] == "pickle":
        return pickle.loads(ref[1])
    _, name, qualname, file = ref
    module = sys.modules.get(name)
    if module is None:
        try:
            module = importlib.import_module(name)
        except ImportError:
            module = None
        if file is not None and (module is None or not _same_file(getattr(module, "__file__", None), file)):
            # a test file imported by path (pytest's importlib mode): load it the same way
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        if module is None:
            raise ImportError(f"cannot import module {name!r} holding fn={qualname!r} in a worker process")
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _same_file(a: str | None, b: str) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _error_payload(exc: BaseException) -> tuple:
    """(time raised, pickled exception or None, type name, message, formatted traceback)."""
    try:
        pickled = pickle.dumps(exc)
        pickle.loads(pickled)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        pickled = None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (time.time(), (pickled, type(exc).__qualname__, str(exc), tb))


def _exit_payload(rank: int, exitcode: int) -> tuple:
    how = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}"
    msg = f"rank {rank} {how} without reporting a result"
    return (None, "RuntimeError", msg, msg + "\n")


def _first_error(errors: dict[int, tuple], world_size: int) -> BaseException:
    """The earliest failure as an exception of its own type, the others summarised in a note."""
    rank = min(errors, key=lambda r: errors[r][0])
    pickled, type_name, message, tb = errors[rank][1]
    try:
        exc = pickle.loads(pickled) if pickled is not None else None
    except Exception:  # e.g. an exception class this process cannot import
        exc = None
    if exc is None:
        exc = RuntimeError(f"{type_name}: {message}")
    exc.__cause__ = RemoteTraceback(f"\n--- traceback of rank {rank} ---\n{tb}")
    others = "; ".join(f"rank {r}: {errors[r][1][1]}: {errors[r][1][2][:200]}" for r in sorted(errors) if r != rank)
    note = f"raised on rank {rank} of {world_size}" + (f" (then {others})" if others else "")
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(note)
    return exc


def _innermost_frames(dump: str) -> str:
    """faulthandler's dump (one block per thread, most recent call first) cut to each thread's innermost frames."""
    blocks = []
    for block in dump.strip().split("\n\n"):
        lines = block.splitlines()
        cut = ["  ..."] if len(lines) > _STACK_FRAMES + 1 else []
        blocks.append("\n".join(lines[: _STACK_FRAMES + 1] + cut))
    return "\n\n".join(blocks) + "\n"


def _stacks_path(tmpdir: str, rank: int) -> str:
    return os.path.join(tmpdir, f"stacks_rank{rank}.txt")


def _worker_main(
    rank: int, world_size: int, backend: str, tmpdir: str, timeout_s: float, tasks: Any, results: Any
) -> None:
    """A rank's process: join the group, then run tasks until told to stop; destroy the group in every case."""
    if hasattr(signal, "SIGUSR1"):
        stacks_file = open(_stacks_path(tmpdir, rank), "w")  # kept open for the process's lifetime
        faulthandler.register(signal.SIGUSR1, file=stacks_file, all_threads=True)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        # past the parent's own deadline: a hang is reported as a TimeoutError naming the hung ranks, not as
        # the gloo timeout of a peer waiting for them
        timeout = datetime.timedelta(seconds=timeout_s + GRACE_S)
        store = dist.FileStore(os.path.join(tmpdir, "store"), world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        results.put((0, rank, True, pickle.dumps(None)))
    except BaseException as e:
        results.put((-1, rank, False, _error_payload(e)))
        return
    try:
        while (task := tasks.get()) is not _STOP:
            task_id, ref, payload = task
            try:
                fn = _resolve(ref)
                args, kwargs = pickle.loads(payload)
                out = _dumps(fn(rank, world_size, *args, **kwargs), "the value fn returned")
                results.put((task_id, rank, True, out))
            except BaseException as e:
                results.put((task_id, rank, False, _error_payload(e)))
    finally:
        dist.destroy_process_group()
        results.close()
        results.join_thread()  # every report delivered
        # A gloo group that saw a peer fail can block the interpreter's shutdown for seconds (its destructor
        # runs at garbage collection); the group is destroyed and the reports sent, so leave at once.
        os._exit(0)
