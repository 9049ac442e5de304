"""Shared benchmark harness: environment capture, timing, JSON records, geometric means.

Every benchmark measures triformers and its peers side by side in one run and writes
``{"env": {...}, "records": [...]}``; plots and README tables are generated from that JSON.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

import triformers


def git_commit() -> str:
    """The commit measured: ``TRIFORMERS_COMMIT`` if set (a copy without .git), else ``git rev-parse``."""
    if os.environ.get("TRIFORMERS_COMMIT"):
        return os.environ["TRIFORMERS_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=10,
        )
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def env_info() -> dict:
    """GPU, versions and commit, recorded with every benchmark run."""
    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triformers": triformers.__version__,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def do_bench(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``; CPU: wall clock of repeats)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import time

    fn()
    times = []
    deadline = time.perf_counter() + rep / 1000.0
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return times[len(times) // 2]


def bench_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, budget_s: float = 20.0
                      ) -> dict[str, float]:
    """Median milliseconds of each function, timed round-robin (A, B, C, A, B, C, ...) on the CPU so that
    bursts of load from other processes hit every provider alike. Stops early past ``budget_s``."""
    import time

    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000.0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def rounds_of(fns: dict[str, Callable[[], object]], rounds: int, context=None, **bench_kwargs
              ) -> dict[str, list[float] | str]:  # fmt: skip
    """Each function's :func:`do_bench` milliseconds over ``rounds`` rounds, every round timing every function
    once in an order rotated by one from the previous round, so that a slow spell of the machine lands on all of
    them alike; a function that fails while timed gets its error message (one line) instead. ``context(name)``
    (optional): a context manager entered around each of ``name``'s timings, outside the timed calls."""
    times: dict[str, list[float] | str] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        shift = r % max(1, len(order))
        for name in order[shift:] + order[:shift]:
            if isinstance(times[name], str):
                continue
            try:
                with context(name) if context is not None else contextlib.nullcontext():
                    times[name].append(do_bench(fns[name], **bench_kwargs))
            except Exception as e:  # recorded by the caller, not hidden
                msg = str(e).strip().splitlines()
                times[name] = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
    return times


def kernel_us(fn: Callable[[], object], iters: int = 10) -> dict[str, float]:
    """GPU microseconds per call of each kernel ``fn`` launches (torch profiler), longest first. CUDA only."""
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name] = out.get(e.name, 0.0) + e.device_time_total / iters
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def kernel_ms(fn: Callable[[], object], iters: int = 10) -> float:
    """GPU milliseconds per call of the kernels ``fn`` launches: the call without its host time, which for small
    calls can exceed the kernels' own. CUDA only."""
    return sum(kernel_us(fn, iters).values()) / 1000.0


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return float("nan")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def write_results(path: str | os.PathLike, records: list[dict], env: dict | None = None) -> dict:
    """Write ``{"env": env, "records": records}`` as JSON and return it."""
    doc = {"env": env if env is not None else env_info(), "records": records}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return doc


def load_results(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
