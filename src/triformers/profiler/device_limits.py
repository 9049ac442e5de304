"""What a device can do at best: matmul TFLOP/s per dtype and memory bandwidth, the denominators of MFU and
bandwidth fractions.

GPUs come from NVIDIA's datasheets (dense tensor-core rates: the datasheets' sparsity figures halved; HBM
bandwidth of the board named). The CPU has no datasheet here: it is measured once per process, when first
asked, by a 1024 x 1024 fp32 matmul and a 32 MiB copy (best of a few runs), so its fractions are relative to
what torch reaches on this machine with its current threads, and can exceed 1 for ops larger than the probe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Mapping

import torch

TERA = 1e12


@dataclasses.dataclass(frozen=True)
class DeviceLimit:
    """Peak rates of one device (xFormers' ``DeviceLimit``, with TF32 told apart from FP32).

    Attributes:
        name: device name; a GPU entry matches when it is a substring of ``torch.cuda.get_device_name()``.
        source: where the numbers come from.
        sm: CUDA compute capability the entry applies to ((0, 0): the CPU).
        gmem_bandwidth: main-memory bandwidth, bytes/s.
        gemm_tflops: dense matmul TFLOP/s per dtype (float32: without tensor cores).
        tf32_tflops: float32 matmuls on TF32 tensor cores, used when torch allows TF32 (None: no TF32).
    """

    name: str = "default"
    source: str = ""
    sm: tuple[int, int] = (0, 0)
    gmem_bandwidth: float = math.inf
    gemm_tflops: Mapping[torch.dtype, float] = dataclasses.field(default_factory=dict)
    tf32_tflops: float | None = None

    def peak_tflops(self, dtype: torch.dtype | None) -> float | None:
        """Matmul TFLOP/s for operands of ``dtype`` (float32 on TF32 when torch allows it), None if unknown."""
        if dtype is None:
            return None
        if dtype == torch.float32 and self.tf32_tflops is not None and torch.backends.cuda.matmul.allow_tf32:
            return self.tf32_tflops
        return self.gemm_tflops.get(dtype)


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _gpu(name, source, sm, bandwidth_tb_s, fp64, fp32, tf32, half, fp8=None, int8=None) -> DeviceLimit:
    tflops = {torch.float64: fp64, torch.float32: fp32, torch.float16: half, torch.bfloat16: half}
    if fp8 is not None:
        tflops.update(dict.fromkeys(_FP8, fp8))
    if int8 is not None:
        tflops[torch.int8] = int8
    return DeviceLimit(name, source, sm, bandwidth_tb_s * TERA, tflops, tf32)


# Ordered: the first entry whose name is in the device's name wins (variants before the plain name).
DEVICE_LIMITS: tuple[DeviceLimit, ...] = (
    _gpu("H200 NVL", "NVIDIA H200 NVL datasheet (2024)", (9, 0), 4.8, 60.0, 60.0, 417.5, 835.5, 1671.0, 1671.0),
    _gpu("H200", "NVIDIA H200 SXM datasheet (2024)", (9, 0), 4.8, 67.0, 67.0, 494.7, 989.4, 1978.9, 1978.9),
    _gpu("H100 NVL", "NVIDIA H100 NVL datasheet (2023)", (9, 0), 3.9, 60.0, 60.0, 417.5, 835.5, 1671.0, 1671.0),
    _gpu("H100 PCIe", "NVIDIA H100 PCIe datasheet (2023)", (9, 0), 2.0, 51.0, 51.0, 378.0, 756.0, 1513.0, 1513.0),
    _gpu("H100", "NVIDIA H100 SXM5 datasheet (2023)", (9, 0), 3.35, 67.0, 67.0, 494.7, 989.4, 1978.9, 1978.9),
    _gpu("A100-SXM4-80GB", "NVIDIA A100 datasheet (2021), SXM4 80GB", (8, 0), 2.039, 19.5, 19.5, 156.0, 312.0,
         int8=624.0),
    _gpu("A100 80GB PCIe", "NVIDIA A100 datasheet (2021), PCIe 80GB", (8, 0), 1.935, 19.5, 19.5, 156.0, 312.0,
         int8=624.0),
    _gpu("A100", "NVIDIA A100 datasheet (2021), 40GB", (8, 0), 1.555, 19.5, 19.5, 156.0, 312.0, int8=624.0),
    _gpu("L4", "NVIDIA L4 datasheet (2023)", (8, 9), 0.3, 0.49, 30.3, 60.0, 121.0, 242.0, 242.0),
)  # fmt: skip


def get_device_limits(device: torch.device | str) -> DeviceLimit | None:
    """The limits of ``device``: a :data:`DEVICE_LIMITS` entry matching the GPU's name and compute capability,
    the measured CPU (:func:`measure_cpu_limits`), or None for a GPU not in the table."""
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu_limits()
    if device.type != "cuda":
        return None
    return lookup_device_limits(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def lookup_device_limits(name: str, capability: tuple[int, int]) -> DeviceLimit | None:
    """The first :data:`DEVICE_LIMITS` entry whose name is in ``name`` and whose compute capability is
    ``capability`` (e.g. ``("NVIDIA H200", (9, 0))``), or None."""
    for limit in DEVICE_LIMITS:
        if limit.name in name and limit.sm == tuple(capability):
            return limit
    return None


# The CPU probe: big enough to leave the caches (the copy) and to run at the matmul's steady rate, small
# enough to take well under a second on two cores (1024^3 fp32 multiply-adds: ~20 ms at 100 GFLOP/s).
PROBE_MATMUL_N = 1024
PROBE_COPY_BYTES = 32 << 20
PROBE_REPEATS = 5
_MEASURED: dict[tuple, float] = {}


def _best_seconds(fn, repeats: int = PROBE_REPEATS) -> float:
    fn()  # warm-up (allocations, thread pool)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_matmul_tflops(dtype: torch.dtype = torch.float32) -> float:
    """TFLOP/s of a ``PROBE_MATMUL_N``-square matmul in ``dtype`` on the CPU (cached per dtype and thread count)."""
    key = ("mm", dtype, torch.get_num_threads())
    if key not in _MEASURED:
        n = PROBE_MATMUL_N
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
        _MEASURED[key] = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b)) / TERA
    return _MEASURED[key]


def measure_cpu_bandwidth() -> float:
    """Bytes/s of a ``PROBE_COPY_BYTES`` copy on the CPU, read and write counted (cached per thread count)."""
    key = ("copy", torch.get_num_threads())
    if key not in _MEASURED:
        src = torch.ones(PROBE_COPY_BYTES // 4)
        dst = torch.empty_like(src)
        _MEASURED[key] = 2 * PROBE_COPY_BYTES / _best_seconds(lambda: dst.copy_(src))
    return _MEASURED[key]


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_limits(dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> DeviceLimit:
    """The CPU's :class:`DeviceLimit`, measured (matmul rate for each of ``dtypes``, copy bandwidth)."""
    threads = torch.get_num_threads()
    return DeviceLimit(
        name=f"CPU {cpu_name()} ({threads} threads of {os.cpu_count()})",
        source=f"measured: {PROBE_MATMUL_N}^2 matmul and {PROBE_COPY_BYTES >> 20} MiB copy, best of {PROBE_REPEATS}",
        gmem_bandwidth=measure_cpu_bandwidth(),
        gemm_tflops={dtype: measure_cpu_matmul_tflops(dtype) for dtype in dtypes},
    )
