"""The rank side of :mod:`triformers.distributed.testing`: the worker loop each process runs, and how functions,
arguments, results and errors cross between the parent and the ranks."""

from __future__ import annotations

import datetime
import faulthandler
import importlib
import importlib.util
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# After the first failure, the other ranks get this long to report and exit before they are killed: enough for
# a gloo peer to notice a closed connection (well under a second here) and for a rank to destroy its group.
GRACE_S = 5.0


_STOP = None  # the task that makes a worker leave its loop


_STACK_FRAMES = 12  # innermost frames of each thread shown in a TimeoutError (a forked rank has its parent's too)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process, chained as the ``__cause__`` of its copy."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


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
