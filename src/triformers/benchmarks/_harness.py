"""Shared benchmark harness: environment capture, timing, JSON records, geometric means.

Every benchmark measures triformers and its peers side by side in one run and writes
``{"env": {...}, "records": [...]}``; plots and README tables are generated from that JSON.
"""

from __future__ import annotations

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
