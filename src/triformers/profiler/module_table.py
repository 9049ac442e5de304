"""``ModuleTableProfiler``: per-module time, FLOPs, bytes moved, TFLOP/s, GB/s, MFU and bandwidth fraction.

Its first step runs under :class:`~.op_stats.OpStatsMode` (every op timed alone, counted, attributed to the
modules it runs in); its later steps run plainly and give the step's wall time. When it stops it prints the
table, and writes ``<step>_modules.json`` (env, device limits, step time, modules, ops) and
``<step>_modules.png`` (time per module; each op on the device's roofline).

MFU is the time the FLOPs would take at the device's peak for their dtype (:mod:`.device_limits`: datasheet
GPUs, or the CPU measured at start) over the time taken; the bandwidth fraction is bytes moved per second over
the peak memory bandwidth. Per module these use its wall time in the instrumented step (synchronized at every
op and module boundary: :mod:`.op_stats`), per op its own time; the step's MFU uses the plain steps' wall time.

Backward ops count in the modules whose forward created their autograd node (:class:`~.op_stats.ModuleStack`),
so a module's FLOPs and bytes are its forward's and its backward's: its children's plus its own ops'.
"""

from __future__ import annotations

import json
import re
import time

import torch

from triformers.profiler.device_limits import get_device_limits, measure_cpu_limits
from triformers.profiler.op_stats import OpStatsMode, Stats, rates

# Printed rows (the JSON has every module): modules taking at least this fraction of the instrumented time
PRINT_MIN_FRACTION = 0.01


class ModuleTableProfiler:
    """Per-module and per-op statistics of one instrumented step (see the module docstring).

    Attributes (after exit):
        result: the document written to ``<step>_modules.json``.
    """

    def __init__(self, main_profiler) -> None:
        self.main_profiler = main_profiler
        self.device = main_profiler.device
        self.limits = measure_cpu_limits() if self.device.type == "cpu" else get_device_limits(self.device)
        peak = self.limits.peak_tflops if self.limits is not None else None
        self.mode = OpStatsMode(self.device, peak)
        self.instrumented = False
        self.step_times: list[float] = []
        self._t0 = 0.0
        self.result: dict | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __enter__(self):
        self.mode.__enter__()
        self.instrumented = True
        return self

    def step(self) -> None:
        if self.instrumented:
            self.mode.__exit__(None, None, None)
            self.instrumented = False
        else:
            self.step_times.append(self._now() - self._t0)
        self._t0 = self._now()

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.instrumented:
            self.mode.__exit__(exc_type, exc_val, exc_tb)
            self.instrumented = False
        if exc_type is not None:
            return
        self.result = self.build()
        path = self.main_profiler._create_output_filename("modules.json")
        path.write_text(json.dumps(self.result, indent=1) + "\n")
        print(format_table(self.result), flush=True)
        png = path.with_suffix(".png")
        plot(self.result, png)
        summary = self.main_profiler.summary
        totals = self.result["totals"]
        summary.append(("Module table", str(path)))
        if self.result["step_time_s"] is not None:
            summary.append(("Step time (ms)", f"{self.result['step_time_s'] * 1e3:.3f}"))
            summary.append(("TFlop/step", f"{totals['gflop'] / 1e3:.6f}"))
            summary.append(("TFlops", f"{self.result['step_tflops']:.3f}"))
            if self.result["step_mfu"] is not None:
                summary.append(("MFU", f"{self.result['step_mfu']:.4f}"))

    def build(self) -> dict:
        from triformers.benchmarks._harness import env_info

        bandwidth = self.limits.gmem_bandwidth if self.limits is not None else None
        glob = self.mode.modules.get("Global", Stats())
        step_time = sorted(self.step_times)[len(self.step_times) // 2] if self.step_times else None
        doc = {
            "env": env_info(),
            "device": str(self.device),
            "device_limits": _limits_doc(self.limits),
            "step_time_s": step_time,
            "plain_steps": len(self.step_times),
            "step_tflops": glob.flops / step_time / 1e12 if step_time else None,
            "step_mfu": glob.ideal_seconds / step_time if step_time and glob.ideal_seconds else None,
            "totals": rates(glob, bandwidth),
            "modules": [{"module": name, **rates(s, bandwidth)} for name, s in sorted(self.mode.modules.items())
                        if name != "Global"],
            "ops": sorted(({"op": name, **rates(s, bandwidth)} for name, s in self.mode.ops.items()),
                          key=lambda r: -r["time_ms"]),
        }  # fmt: skip
        return doc


def _limits_doc(limits) -> dict | None:
    if limits is None:
        return None
    return {
        "name": limits.name,
        "source": limits.source,
        "gmem_bandwidth_gbps": limits.gmem_bandwidth / 1e9,
        "gemm_tflops": {str(k).removeprefix("torch."): v for k, v in limits.gemm_tflops.items()},
        "tf32_tflops": limits.tf32_tflops,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def layer_pattern(name: str) -> str:
    """A module name with its layer indices as ``*`` (``GPT.model.encoders.3.mlp`` -> ``GPT.model.encoders.*.mlp``)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def aggregated_rows(doc: dict, min_fraction: float = PRINT_MIN_FRACTION) -> list[tuple[str, dict]]:
    """``(layer pattern, row)`` of a ``modules.json`` document: repeated layers summed into one row
    (``encoders.*``), rows under ``min_fraction`` of the total time left out, in module-tree order."""
    sums: dict[str, dict] = {}
    for r in doc["modules"]:
        agg = sums.setdefault(layer_pattern(r["module"]), {"time_ms": 0.0, "gflop": 0.0, "gb": 0.0, "ideal_ms": 0.0})
        agg["time_ms"] += r["time_ms"]
        agg["gflop"] += r["gflop"]
        agg["gb"] += r["gb"]
        agg["ideal_ms"] += (r["mfu"] or 0.0) * r["time_ms"]
    limits = doc["device_limits"]
    bandwidth = limits["gmem_bandwidth_gbps"] if limits else None
    total = doc["totals"]["time_ms"] or 1.0
    rows = []
    for key, agg in sums.items():
        if agg["time_ms"] < min_fraction * total:
            continue
        t = agg["time_ms"] / 1e3
        rows.append((key, {"time_ms": agg["time_ms"], "gflop": agg["gflop"], "gb": agg["gb"],
                           "tflops": agg["gflop"] / t / 1e3 if t else None, "gbps": agg["gb"] / t if t else None,
                           "mfu": agg["ideal_ms"] / agg["time_ms"] if agg["ideal_ms"] else None,
                           "bw_fraction": agg["gb"] / t / bandwidth if t and bandwidth else None}))  # fmt: skip
    return rows


def format_table(doc: dict, min_fraction: float = PRINT_MIN_FRACTION) -> str:
    """The module table of a ``modules.json`` document as text (:func:`aggregated_rows`; the JSON has every
    module)."""
    head = ("module", "time ms", "GFLOP", "GB", "TFLOP/s", "GB/s", "MFU", "BW frac")
    rows = [("(all ops)", *_cells(doc["totals"]))]
    for key, r in aggregated_rows(doc, min_fraction):
        rows.append(("  " * key.count(".") + key.rsplit(".", 1)[-1], *_cells(r)))
    widths = [max(len(str(x[i])) for x in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(x, widths)))
             for x in (head, *rows)]  # fmt: skip
    limits = doc["device_limits"]
    title = f"per-module statistics on {doc['device']}" + (f" (peaks: {limits['name']})" if limits else "")
    return "\n".join([title, *lines])


def _cells(r: dict) -> tuple:
    return (_fmt(r["time_ms"], ".3f"), _fmt(r["gflop"], ".4f"), _fmt(r["gb"], ".4f"), _fmt(r["tflops"], ".4f"),
            _fmt(r["gbps"], ".2f"), _fmt(r["mfu"], ".3f"), _fmt(r["bw_fraction"], ".3f"))  # fmt: skip


def plot(doc: dict, path, top_ops: int = 40) -> None:
    """Time per module (bars: :func:`aggregated_rows`) and the ``top_ops`` slowest ops on the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = [{"module": key, **r} for key, r in aggregated_rows(doc)]
    ops = [r for r in doc["ops"] if r["gflop"] > 0 and r["gb"] > 0 and r["time_ms"] > 0][:top_ops]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(15, max(4, 0.22 * len(mods) + 1.5)))
    ax0.barh(range(len(mods)), [r["time_ms"] for r in mods])
    ax0.set_yticks(range(len(mods)), [r["module"] for r in mods], fontsize=6)
    ax0.invert_yaxis()
    ax0.set_xlabel("ms in the instrumented step (forward + backward)")
    ax0.set_title("time per module")
    limits = doc["device_limits"]
    for r in ops:
        intensity = r["gflop"] / r["gb"]
        ax1.scatter(intensity, r["tflops"], s=12)
        ax1.annotate(r["op"].split(".")[-1], (intensity, r["tflops"]), fontsize=6)
    if limits and ops:
        peak = max(limits["gemm_tflops"].values(), default=None)
        bw = limits["gmem_bandwidth_gbps"] / 1e3  # TB/s: TFLOP/s per FLOP/byte
        if peak:
            xs = [min(r["gflop"] / r["gb"] for r in ops) / 2, max(r["gflop"] / r["gb"] for r in ops) * 2,
                  peak / bw]  # fmt: skip
            xs = sorted(xs)
            ax1.plot(xs, [min(peak, x * bw) for x in xs], "k--", lw=1, label=f"roofline ({limits['name']})")
            ax1.legend(fontsize=7)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax1.set_ylabel("achieved TFLOP/s")
    ax1.set_title("ops on the roofline")
    fig.suptitle(f"{doc['device']} — {doc['env']['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
