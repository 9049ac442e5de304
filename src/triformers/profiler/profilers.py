"""The profilers a schedule runs (xFormers' ``PyTorchProfiler``, ``NsightProfiler``, ``MemSnapshotsProfiler``).

Each is built as ``cls(main_profiler)``, entered when its first step starts, told ``step()`` when each later
step starts, and exited when its last step ends; it writes under the main profiler's ``output_dir`` and adds
``(title, value)`` rows to its ``summary``. The CUDA-only ones do nothing but say so on a CPU.
"""

from __future__ import annotations

import logging
import pickle
import warnings

import torch

logger = logging.getLogger(__name__)


def _cuda(main_profiler) -> bool:
    return main_profiler.device.type == "cuda" and torch.cuda.is_available()


class PyTorchProfiler:
    """``torch.profiler`` over the steps (CPU, and CUDA when the device is a GPU): writes a Chrome/Perfetto
    trace ``<step>_trace.json`` (open it in https://ui.perfetto.dev or chrome://tracing), and on CUDA a
    ``<step>_kernels.csv`` of kernel names and durations; adds the step time and the profiler's own FLOP count
    (matmuls and convolutions) to the summary."""

    ACTIVITIES = (torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA)
    NAME = "trace"

    def __init__(self, main_profiler) -> None:
        self.main_profiler = main_profiler
        activities = [a for a in self.ACTIVITIES if a != torch.profiler.ProfilerActivity.CUDA or _cuda(main_profiler)]
        self.cuda = torch.profiler.ProfilerActivity.CUDA in activities
        self.num_steps = 0
        self.pytorch_profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True, with_stack=True, with_flops=True
        ) if activities else None  # fmt: skip

    def __enter__(self):
        if self.pytorch_profiler is None:
            self.main_profiler.summary.append((type(self).__name__, "(CUDA only)"))
            return self
        self.pytorch_profiler.__enter__()
        return self

    def step(self) -> None:
        self.num_steps += 1
        if self.pytorch_profiler is not None:
            self.pytorch_profiler.step()

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.pytorch_profiler is None:
            return
        self.pytorch_profiler.__exit__(exc_type, exc_val, exc_tb)
        if exc_type is not None:
            return
        path = self.main_profiler._create_output_filename(f"{self.NAME}.json")
        self.pytorch_profiler.export_chrome_trace(str(path))
        self.main_profiler.summary.append((f"{type(self).__name__} trace", str(path)))
        try:
            events = self.pytorch_profiler.key_averages()
        except UnicodeDecodeError as e:  # seen once under a loaded 2-core CI run (torch 2.13, CPU): an event name
            # that is not UTF-8 in torch's own parsing of its results; the trace above is written, the rest skipped
            warnings.warn(f"triformers profiler: torch's profiler could not parse its events ({e}); the trace is "
                          f"in {path}, the kernel table and FLOP count of these steps are skipped", stacklevel=2)
            return
        if self.cuda:
            csv = self.main_profiler._create_output_filename("kernels.csv")
            rows = ["kernel name,duration_us"] + [
                f'"{e.key}",{e.device_time_total:.3f}' for e in events if e.device_time_total > 0
            ]
            csv.write_text("\n".join(rows) + "\n")
        flops = sum(e.flops for e in events if e.flops)
        steps = max(self.num_steps, 1)
        self.main_profiler.summary.append(("TFlop/step (torch profiler: matmuls, convolutions)",
                                           f"{flops / steps / 1e12:.6f}"))  # fmt: skip


class PyTorchProfiler_CUDAOnly(PyTorchProfiler):  # noqa: N801  (xFormers' name)
    """:class:`PyTorchProfiler` recording CUDA activity only (a lighter trace of the kernels)."""

    ACTIVITIES = (torch.profiler.ProfilerActivity.CUDA,)
    NAME = "trace_cuda"


class NsightProfiler:
    """Brackets its steps with ``cudaProfilerStart`` / ``cudaProfilerStop`` and an NVTX range per step, for
    ``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop python train.py``. CUDA only."""

    def __init__(self, main_profiler) -> None:
        self.main_profiler = main_profiler
        self.cuda = _cuda(main_profiler)
        self.range_open = False

    def _push(self) -> None:
        torch.cuda.nvtx.range_push(f"step {self.main_profiler.done_steps}")
        self.range_open = True

    def _pop(self) -> None:
        if self.range_open:
            torch.cuda.nvtx.range_pop()
            self.range_open = False

    def __enter__(self):
        if not self.cuda:
            self.main_profiler.summary.append(("NsightProfiler", "(CUDA only)"))
            return self
        torch.cuda.profiler.start()
        self._push()
        return self

    def step(self) -> None:
        if self.cuda:
            self._pop()
            self._push()

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.cuda:
            self._pop()
            torch.cuda.profiler.stop()
            self.main_profiler.summary.append(("NsightProfiler", "cudaProfilerStart/Stop and NVTX ranges emitted"))


# Allocation events kept by the CUDA allocator's history (xFormers' value)
MAX_ALLOC_ENTRIES = 100_000


class MemSnapshotsProfiler:
    """Records the CUDA allocator's history over its steps and writes ``<step>_memory_snapshot.pickle``
    (drag it into https://pytorch.org/memory_viz), ``<step>_memory_trace_plot.html`` (the allocation timeline,
    torch's ``trace_plot``) and ``<step>_memory_timeline.png`` (bytes allocated over the allocation events).
    CUDA only."""

    def __init__(self, main_profiler) -> None:
        self.main_profiler = main_profiler
        self.cuda = _cuda(main_profiler)

    def __enter__(self):
        if not self.cuda:
            self.main_profiler.summary.append(("MemSnapshotsProfiler", "(CUDA only)"))
            return self
        torch.cuda.memory._record_memory_history(enabled="all", max_entries=MAX_ALLOC_ENTRIES)
        return self

    def step(self) -> None:
        pass

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if not self.cuda:
            return
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        if exc_type is not None:
            return
        pickle_path = self.main_profiler._create_output_filename("memory_snapshot.pickle")
        with open(pickle_path, "wb") as f:
            pickle.dump(snapshot, f)
        traces = snapshot.get("device_traces", [])
        if not any(traces):
            self.main_profiler.summary.append(("MemTrace", "(no allocation recorded)"))
            return
        from torch.cuda import _memory_viz

        html = self.main_profiler._create_output_filename("memory_trace_plot.html")
        html.write_text(_memory_viz.trace_plot(snapshot, device=None, plot_segments=False))
        png = self.main_profiler._create_output_filename("memory_timeline.png")
        plot_allocation_timeline(traces, png)
        self.main_profiler.summary.append(("MemTrace", str(html)))
        self.main_profiler.summary.append(("MemSnapshot", str(pickle_path)))


def allocation_timeline(trace: list[dict]) -> list[int]:
    """Bytes allocated after each event of one device's allocator trace (``alloc`` adds, ``free_completed``
    removes; the allocations alive before the recording started are not known and count from 0)."""
    total, out = 0, []
    for event in trace:
        if event["action"] == "alloc":
            total += event["size"]
        elif event["action"] == "free_completed":
            total -= event["size"]
        out.append(total)
    return out


def plot_allocation_timeline(traces: list[list[dict]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for device, trace in enumerate(traces):
        if trace:
            ax.plot([b / 2**20 for b in allocation_timeline(trace)], label=f"cuda:{device}", lw=1)
    ax.set_xlabel("allocator event")
    ax.set_ylabel("MiB allocated (since the recording started)")
    ax.set_title("CUDA allocations over the profiled steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
