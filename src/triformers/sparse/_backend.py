"""Which implementation a sparse operation runs: our Triton kernels or torch.

Triton runs on CUDA tensors of float16/bfloat16/float32, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, how the CPU test suite covers the kernels). Everything else takes the torch path: CPU
tensors quietly (what a CPU user expects), anything surprising (float64 on CUDA, a block size the kernels do not
take) with a one-time warning. ``TRIFORMERS_SPARSE_BACKEND=torch|triton`` forces one side where both can run.
"""

from __future__ import annotations

import os

import torch

from triformers.triton._common import use_triton, warn_once

__all__ = ["run_triton", "forced_backend"]

_BACKENDS = ("torch", "triton")


def forced_backend() -> str | None:
    """``TRIFORMERS_SPARSE_BACKEND`` (read at call time), or None when unset."""
    value = os.environ.get("TRIFORMERS_SPARSE_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in _BACKENDS:
        raise ValueError(f"TRIFORMERS_SPARSE_BACKEND={value!r} is not one of {_BACKENDS}; unset it or pick one")
    return value


def run_triton(op: str, *tensors: torch.Tensor | None, unsupported: str | None = None) -> bool:
    """Whether ``op`` runs its Triton kernels on ``tensors``.

    Args:
        op: the operation's name, shown in warnings.
        tensors: the tensors the kernels would read and write.
        unsupported: why the kernels cannot take these inputs even where Triton runs (e.g. a block size),
            or None. The torch path then runs, with a one-time warning where Triton would otherwise have run.
    """
    forced = forced_backend()
    if forced == "torch":
        return False
    if not use_triton(op, *tensors):
        return False
    if unsupported is not None:
        warn_once(f"triformers.sparse.{op}: running the torch path because {unsupported}")
        return False
    return True
