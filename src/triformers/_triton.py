"""Where Triton kernels can run.

A Triton kernel runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1``, read when the kernels are defined, so it must be set before triformers is
imported). The interpreter is how the CPU test suite covers every kernel.
"""

from __future__ import annotations

import os

import torch

_AVAILABLE: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def is_triton_available() -> bool:
    """True when ``import triton`` works (and ``TRIFORMERS_DISABLE_TRITON`` is not set).

    Evaluated once; ``torch.compile`` treats the answer as a constant.
    """
    if "triton" not in _AVAILABLE:
        ok = os.environ.get("TRIFORMERS_DISABLE_TRITON", "0") != "1"
        if ok:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception:  # ImportError, or a broken install raising anything else
                ok = False
        _AVAILABLE["triton"] = ok
    return _AVAILABLE["triton"]


def interpret_mode() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why Triton kernels cannot run on these tensors, or None when they can."""
    if not is_triton_available():
        return "triton is not installed (pip install triton; Linux x86_64 only)"
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"}:
        if interpret_mode():
            return None
        return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triformers)"
    return f"Triton kernels run on CUDA tensors (got device types {sorted(devices)})"


def can_run_triton(*tensors: torch.Tensor) -> bool:
    return triton_unavailable_reason(*tensors) is None
