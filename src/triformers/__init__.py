"""triformers: the xFormers toolbox in pure Python on PyTorch and Triton.

Import what you need from the subpackages: ``triformers.ops`` (memory-efficient attention and fused
operators), ``triformers.triton`` (fused layers), ``triformers.components`` and ``triformers.factory``.
Nothing heavy happens at import time: operators are chosen per call.
"""

__version__ = "0.1.0"

from triformers._triton import is_triton_available as _is_triton_available  # noqa: E402

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
