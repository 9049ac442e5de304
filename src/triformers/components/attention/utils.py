"""Mask and linear-algebra helpers shared by the attentions (xFormers' ``components/attention/utils.py``)."""

from __future__ import annotations

import torch

from triformers.components.attention.attention_mask import AttentionMask


def bool_mask_to_additive(mask: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """A bool mask (True = attend) as an additive one (0 / -inf) of ``dtype``."""
    if mask.dtype != torch.bool:
        raise ValueError(f"expected a bool mask, got dtype={mask.dtype}")
    additive = torch.zeros(mask.shape, dtype=dtype or torch.float32, device=mask.device)
    return additive.masked_fill_(~mask, float("-inf"))


def reshape_key_padding_mask(key_padding_mask: torch.Tensor, batched_dim: int) -> torch.Tensor:
    """``[B, S]`` -> ``[B*H, 1, S]`` for heads folded into the batch (``batched_dim = B*H``), head-minor."""
    if key_padding_mask.ndim != 2:
        raise ValueError(f"key_padding_mask must be [B, S], got shape={tuple(key_padding_mask.shape)}")
    batch, src_len = key_padding_mask.shape
    if batched_dim % batch:
        raise ValueError(f"batched dim {batched_dim} is not a multiple of the key_padding_mask batch {batch}")
    num_heads = batched_dim // batch
    return key_padding_mask.view(batch, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(batched_dim, 1, src_len)


def maybe_merge_masks(
    att_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch_size: int,
    src_len: int,
    num_heads: int,
    tgt_len: int | None = None,
) -> torch.Tensor | None:
    """Merge an attention mask with a ``[B, S]`` key padding mask into a ``[B*H, tgt, src]`` mask.

    Bool masks (True = attend) stay bool when both are bool; otherwise the result is additive.
    """
    tgt_len = tgt_len or src_len
    if key_padding_mask is None:
        return att_mask
    if tuple(key_padding_mask.shape) != (batch_size, src_len):
        raise ValueError(
            f"key_padding_mask.shape={tuple(key_padding_mask.shape)} should be (batch, key length) = "
            f"{(batch_size, src_len)}"
        )
    kpm = reshape_key_padding_mask(key_padding_mask, batch_size * num_heads)
    if att_mask is None:
        return kpm.expand(-1, tgt_len, -1)
    return combine_masks(att_mask, kpm)


def combine_masks(a: torch.Tensor | AttentionMask | None, b: torch.Tensor | AttentionMask | None):
    """Logical AND of two masks (broadcasting): bool & bool stays bool, anything else becomes additive."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, AttentionMask):
        a = a.values
    if isinstance(b, AttentionMask):
        b = b.values
    if a.is_sparse or b.is_sparse:
        a = a.to_dense() if a.is_sparse else a
        b = b.to_dense() if b.is_sparse else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    dtype = a.dtype if a.is_floating_point() else b.dtype
    a = bool_mask_to_additive(a, dtype) if a.dtype == torch.bool else a
    b = bool_mask_to_additive(b, dtype) if b.dtype == torch.bool else b
    return a + b


def iterative_pinv(softmax_mat: torch.Tensor, n_iter: int = 6, pinverse_original_init: bool = False) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of softmax matrices, Razavi et al. (2014) iteration.

    ``Z <- Z/4 (13 I - K Z (15 I - K Z (7 I - K Z)))`` from ``Z0 = K^T / ||K||``.

    Args:
        softmax_mat: ``[..., n, n]`` non-negative matrix with unit row sums.
        n_iter: iterations (default 6, the paper's recommendation).
        pinverse_original_init: scale Z0 by one global max column sum (Nyströmformer's code) instead of
            each matrix's own 1-norm (default False, converges faster).
    """
    eye = torch.eye(softmax_mat.size(-1), device=softmax_mat.device, dtype=softmax_mat.dtype)
    k = softmax_mat
    col_sums = k.sum(dim=-2)
    if pinverse_original_init:
        v = k.transpose(-1, -2) / col_sums.max()
    else:
        v = k.transpose(-1, -2) / col_sums.max(dim=-1).values[..., None, None]
    for _ in range(n_iter):
        kv = k @ v
        v = (0.25 * v) @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
    return v
