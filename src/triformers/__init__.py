"""triformers: the xFormers toolbox in pure Python on PyTorch and Triton.

Import what you need from the subpackages: ``triformers.ops`` (memory-efficient attention and fused
operators), ``triformers.triton`` (fused layers), ``triformers.components`` and ``triformers.factory``.
Nothing heavy happens at import time: operators are chosen per call.
"""

__version__ = "0.1.0"

import torch  # noqa: E402

from triformers import _triton  # noqa: E402


def _is_triton_available() -> bool:
    """xFormers' check: True when Triton kernels can run here, i.e. Triton imports and there is a CUDA device
    or Triton's interpreter is on (``TRITON_INTERPRET=1``: CPU tensors). False on a CPU-only machine without
    the interpreter, where code written against xFormers then takes its non-Triton paths."""
    return _triton.is_triton_available() and (_triton.interpret_mode() or torch.cuda.is_available())


__all__ = ["__version__", "_is_triton_available"]

# selective activation checkpointing at top level, as xFormers exports it (``triformers.checkpoint(fn, ...)``;
# the module stays importable: ``from triformers.checkpoint import SelectiveCheckpointWrapper``)
from triformers.checkpoint import (  # noqa: E402
    checkpoint,
    get_optimal_checkpoint_policy,
    list_operators,
    selective_checkpoint_wrapper,
)

__all__ += ["checkpoint", "get_optimal_checkpoint_policy", "list_operators", "selective_checkpoint_wrapper"]
