"""The scheduler behind :func:`triformers.profiler.profile`: runs each profiler of the schedule over its steps."""

from __future__ import annotations

import logging
import os
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from triformers.profiler.module_table import ModuleTableProfiler
from triformers.profiler.profilers import (
    MemSnapshotsProfiler,
    NsightProfiler,
    PyTorchProfiler,
    PyTorchProfiler_CUDAOnly,
)

# The profilers `profile` runs without a schedule, by step (re-exported as triformers.profiler.DEFAULT_SCHEDULE)
DEFAULT_SCHEDULE = (
    (MemSnapshotsProfiler, 0, 2),
    (NsightProfiler, 4, 6),
    (PyTorchProfiler, 6, 7),
    (PyTorchProfiler_CUDAOnly, 7, 8),
    (ModuleTableProfiler, 8, 11),
)

logger = logging.getLogger(__name__)

# After the schedule, every this many steps, a file ``<output_dir>/trigger`` starts it again (xFormers' manual
# re-trigger: the file is renamed to ``trigger.<step>`` and the schedule restarts after that step).
CHECK_TRIGGER_EVERY = 10


def check_schedule(schedule) -> list[tuple[Any, int, int]]:
    """The schedule as a list of ``(profiler class, begin step, end step)``; ValueError naming a bad entry.

    Each profiler runs for steps ``[begin, end)``; ranges must not overlap (profilers would disturb each other).
    """
    entries = []
    for index, entry in enumerate(schedule):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 3):
            raise ValueError(f"schedule[{index}]={entry!r}: each entry must be (ProfilerClass, begin, end)")
        cls, begin, end = entry
        if not callable(cls):
            raise ValueError(f"schedule[{index}]: {cls!r} is not a profiler class (e.g. PyTorchProfiler)")
        if not (isinstance(begin, int) and isinstance(end, int)):
            raise ValueError(f"schedule[{index}]: begin={begin!r} and end={end!r} must be ints (step numbers)")
        if begin < 0:
            raise ValueError(f"schedule[{index}]: begin step must be non-negative, found begin={begin}")
        if end <= begin:
            raise ValueError(
                f"schedule[{index}]: the end step must come after the begin step, found begin={begin} and "
                f"end={end}; {getattr(cls, '__name__', cls)} runs for steps [begin, end)"
            )
        entries.append((cls, begin, end))
    ordered = sorted(entries, key=lambda e: e[1])
    for (a, _, a_end), (b, b_begin, _) in zip(ordered, ordered[1:]):
        if b_begin < a_end:
            raise ValueError(
                f"{a.__name__} (until step {a_end}) and {b.__name__} (from step {b_begin}) overlap in the "
                f"schedule {schedule}; give each profiler its own steps, they would disturb each other"
            )
    if not entries:
        logger.warning("You specified an empty schedule for profiling: no data will be captured.")
    return entries


@dataclass
class _ProfilerState:
    cls: Any
    iter_begin: int
    iter_end: int
    object: Any = None


class _Profiler:
    """Runs the profilers of a schedule: ``cls(self)`` entered when step ``begin`` starts, ``step()`` at each
    later step, ``step()`` and exit when step ``end`` starts. A context manager, or ``start()`` / ``stop()``.

    Attributes:
        output_dir: where every profiler writes (created).
        done_steps: steps completed (``step()`` calls).
        device: the device profiled: the module's (its first parameter), else CUDA when available, else CPU.
        summary: ``(title, value)`` rows the profilers add, logged and printed when the schedule ends.
    """

    _CURRENT_PROFILER: _Profiler | None = None

    def __init__(self, output_dir: str | os.PathLike, schedule, module: nn.Module | None) -> None:
        self.schedule = check_schedule(schedule)
        self.done_steps = 0
        self.output_dir = Path(output_dir).absolute()
        self.output_dir.mkdir(exist_ok=True, parents=True)
        self.worker_name = ""
        if dist.is_available() and dist.is_initialized():
            rank = f"{dist.get_rank()}".zfill(len(f"{dist.get_world_size() - 1}"))
            self.worker_name = f"rank{rank}_{socket.gethostname()}_{os.getpid()}"
        self.module = weakref.ref(module if module is not None else nn.Module())
        param = next(iter(module.parameters()), None) if module is not None else None
        if param is not None:
            self.device = param.device
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.init_schedule()

    def init_schedule(self, offset: int = 0) -> None:
        self.profilers = sorted(
            (_ProfilerState(cls, begin + offset, end + offset) for cls, begin, end in self.schedule),
            key=lambda p: p.iter_begin,
        )
        self.last_step = self.profilers[-1].iter_end if self.profilers else 0
        self.summary: list[tuple[str, str]] = []

    def update_profilers_on_step(self) -> None:
        for p in self.profilers:
            if p.iter_begin <= self.done_steps < p.iter_end:
                if p.object is None:
                    logger.info("Starting %s profiler...", p.cls.__name__)
                    p.object = p.cls(self)
                    p.object.__enter__()
                else:
                    p.object.step()
            elif p.object is not None:
                o, p.object = p.object, None
                logger.info("Shutting down %s profiler...", p.cls.__name__)
                o.step()  # a profiler active for N steps sees N step() calls
                o.__exit__(None, None, None)

    def _create_output_filename(self, filename: str) -> Path:
        """``<output_dir>/<step:06>_<filename>``, or in a distributed run
        ``<output_dir>/<stem>/<step:06>_<worker><suffix>`` (one file per rank)."""
        if self.worker_name:
            file = Path(filename)
            folder = self.output_dir / file.stem
            folder.mkdir(parents=True, exist_ok=True)
            return folder / f"{self.done_steps:06}_{self.worker_name}{file.suffix}"
        return self.output_dir / f"{self.done_steps:06}_{filename}"

    def start(self) -> _Profiler:
        return self.__enter__()

    def stop(self, exc_type=None, exc_val=None, exc_tb=None) -> None:
        self.__exit__(exc_type, exc_val, exc_tb)

    def __enter__(self) -> _Profiler:
        if _Profiler._CURRENT_PROFILER is not None:
            raise ValueError(
                "Only one triformers profiler can be active at a time: stop the running one (leave its `with` "
                "block or call .stop()) before starting another"
            )
        _Profiler._CURRENT_PROFILER = self
        self.update_profilers_on_step()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        _Profiler._CURRENT_PROFILER = None
        for p in self.profilers:
            if p.object is not None:
                o, p.object = p.object, None
                o.__exit__(exc_type, exc_val, exc_tb)

    def step(self) -> None:
        """Signals that the next step starts."""
        self.done_steps += 1
        if self.done_steps <= self.last_step:
            self.update_profilers_on_step()
        if self.done_steps == self.last_step:
            text = self.format_summary()
            logger.info("triformers profiler done. %s", text)
            if text:
                print(f"triformers profiler done. {text}", flush=True)
        if self.done_steps > self.last_step and self.done_steps % CHECK_TRIGGER_EVERY == 0:
            try:
                (self.output_dir / "trigger").unlink()
                (self.output_dir / f"trigger.{self.done_steps + CHECK_TRIGGER_EVERY:09}").write_text(self.worker_name)
            except FileNotFoundError:
                pass
            if (self.output_dir / f"trigger.{self.done_steps:09}").exists():
                logger.info("triformers profiler manually triggered at step %d", self.done_steps)
                self.init_schedule(offset=self.done_steps + 1)

    def format_summary(self) -> str:
        if not self.summary:
            return ""
        pad = max(len(title) for title, _ in self.summary)
        return "summary:\n" + "\n".join(f"  {title.ljust(pad)}: {value}" for title, value in self.summary)


def profile(output_dir: str | os.PathLike, module: nn.Module | None = None, schedule=None) -> _Profiler:
    """A profiler running ``schedule`` over the steps marked by :func:`step` (xFormers' ``profile``).

    Use it as a context manager (or ``.start()`` / ``.stop()``) around a training loop that calls
    ``triformers.profiler.step()`` once per step::

        with triformers.profiler.profile("profile_out", model):
            for batch in data:
                train_step(batch)
                triformers.profiler.step()

    Args:
        output_dir: folder for every file the profilers write (created); in a distributed run each rank writes
            its own files.
        module: the model (only weakly referenced); its first parameter's device is the device profiled
            (default: CUDA when available, else the CPU).
        schedule: ``(ProfilerClass, begin_step, end_step)`` entries, each profiler running for steps
            ``[begin, end)``, without overlaps; default :data:`~triformers.profiler.DEFAULT_SCHEDULE`.

    Returns:
        The profiler (a context manager).

    Raises:
        ValueError: a malformed or overlapping schedule, or a second profiler started while one is active.
    """
    if schedule is None:
        schedule = DEFAULT_SCHEDULE
    return _Profiler(output_dir, schedule, module)


def step() -> None:
    """Marks the start of the next step for the active profiler (nothing when none is active)."""
    if _Profiler._CURRENT_PROFILER is not None:
        _Profiler._CURRENT_PROFILER.step()
