"""``masked_matmul`` (xFormers' ``xformers.ops.masked_matmul``): ``a @ b`` kept only where a mask allows.

Sparse masks (:class:`~triformers.sparse.BlockSparseTensor`, :class:`~triformers.sparse.SparseCSRTensor`) take
over through ``__torch_function__`` and compute only the stored entries (SDDMM); dense masks are applied to the
full product.
"""

from __future__ import annotations

import torch

__all__ = ["masked_matmul"]


def masked_matmul(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` restricted to ``mask``.

    Args:
        a: ``[..., M, K]``.
        b: ``[..., K, N]``.
        mask: None (plain ``a @ b``); a bool tensor broadcastable to ``[..., M, N]`` (a 2-D mask applies to every
            batch element), False entries become ``-inf``; a float tensor, added to the product; or a sparse
            tensor (BlockSparseTensor / SparseCSRTensor), which returns a sparse tensor of the same pattern
            holding the product's entries there.

    Returns:
        ``[..., M, N]`` dense, or sparse like ``mask``.
    """
    if torch.overrides.has_torch_function((a, b, mask) if mask is not None else (a, b)):
        return torch.overrides.handle_torch_function(masked_matmul, (a, b, mask), a, b, mask)
    att = a @ b
    if mask is None:
        return att
    if mask.dtype == torch.bool:
        return att.masked_fill(~mask, float("-inf"))
    return att + mask
