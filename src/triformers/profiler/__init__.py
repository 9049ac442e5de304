"""Profiling a training loop: traces, CUDA memory snapshots, and a per-module table of time, FLOPs, bytes
moved, MFU and bandwidth fraction (xFormers' ``xformers.profiler`` API, plus :class:`ModuleTableProfiler`).

    with triformers.profiler.profile("profile_out", model):
        for batch in data:
            train_step(batch)
            triformers.profiler.step()

:data:`DEFAULT_SCHEDULE` runs, by step: the CUDA memory history (0-2), Nsight capture (4-6), a CPU+CUDA
trace (6-7), a CUDA-only trace (7-8) and the module table (8-11: one instrumented step, two timed ones). On a
CPU the CUDA-only profilers only say so in the summary. Attention FLOPs count the pairs the mask allows
(:mod:`triformers.profiler.flop_formulas`, which also registers our custom ops in torch's
``FlopCounterMode``).
"""

from triformers.profiler._profiler import DEFAULT_SCHEDULE, profile, step
from triformers.profiler.device_limits import DEVICE_LIMITS, DeviceLimit, get_device_limits
from triformers.profiler.flop_formulas import attention_flops, flop_formulas, inputs_attention_flops
from triformers.profiler.module_table import ModuleTableProfiler
from triformers.profiler.op_stats import OpStatsMode
from triformers.profiler.profilers import (
    MemSnapshotsProfiler,
    NsightProfiler,
    PyTorchProfiler,
    PyTorchProfiler_CUDAOnly,
)

__all__ = [
    "DEFAULT_SCHEDULE",
    "DEVICE_LIMITS",
    "DeviceLimit",
    "MemSnapshotsProfiler",
    "ModuleTableProfiler",
    "NsightProfiler",
    "OpStatsMode",
    "PyTorchProfiler",
    "PyTorchProfiler_CUDAOnly",
    "attention_flops",
    "flop_formulas",
    "get_device_limits",
    "inputs_attention_flops",
    "profile",
    "step",
]
