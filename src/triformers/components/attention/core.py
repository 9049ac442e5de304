"""Scaled dot-product attention on folded heads, computed by ``triformers.ops.memory_efficient_attention``.

``scaled_dot_product_attention(q, k, v, att_mask)`` takes ``[N, S, D]`` tensors (N = batch x heads, or
any leading dims) and a mask in any of the forms the attention zoo produces:

- None, or ``causal=True`` -> ``memory_efficient_attention`` with no bias / ``LowerTriangularMask``;
- a bool tensor (True = attend), a float (additive) tensor or an :class:`AttentionMask`, ``[Sq, Sk]`` or
  ``[b, Sq, Sk]`` with b dividing N (row n uses ``mask[n // (N / b)]``: a per-sample mask for heads folded
  head-minor) -> ``memory_efficient_attention`` with the mask as a tensor bias ``[b, N/b, Sq, Sk]`` (an
  expanded view, not a copy);
- a bool ``torch.sparse`` mask (stored True = attend) -> :func:`sparse_attention`, O(nnz) work and memory in
  plain torch. This is the one case memory_efficient_attention cannot take.
- a float ``torch.sparse`` mask is an additive mask like its dense form (entries not stored add 0, as in
  torch, so a 0/-inf mask stored sparse gives what the dense one gives): densified, then as above.

Masks larger than ``[Sq, Sk]`` are cropped to their top-left corner; a mask with one query row
(``[b, 1, Sk]``, a key padding mask) applies to every query.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from triformers import ops
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.utils import bool_mask_to_additive

_DENSITY_THRESHOLD = 0.30  # below this fraction of attended pairs, a pattern is kept sparse


def sparsify(matrix: torch.Tensor) -> torch.Tensor:
    """A bool pattern as a coalesced sparse COO tensor (True = attend)."""
    return matrix.bool().to_sparse().coalesce()


def maybe_sparsify(matrix: torch.Tensor) -> AttentionMask | torch.Tensor:
    """Dense :class:`AttentionMask` if more than 30% of ``matrix`` is True, else a sparse pattern."""
    if matrix.float().mean().item() > _DENSITY_THRESHOLD:
        return AttentionMask.from_bool(matrix.bool())
    return sparsify(matrix)


def _crop(mask: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
    if mask.shape[-2] == 1 and sq > 1:  # one row for every query (a key padding mask)
        mask = mask.expand(*mask.shape[:-2], sq, mask.shape[-1])
    if mask.shape[-2] < sq or mask.shape[-1] < sk:
        raise ValueError(
            f"att_mask covers {tuple(mask.shape[-2:])} (queries, keys) but the inputs have {(sq, sk)}; "
            "build the mask for the full sequence lengths"
        )
    if mask.shape[-2:] != (sq, sk):
        mask = mask[..., :sq, :sk]
    return mask


def _mask_groups(mask: torch.Tensor, n: int) -> int:
    """Number of mask batches b (mask is ``[b, Sq, Sk]``); checks that b divides n."""
    b = mask.shape[0]
    if n % b:
        raise ValueError(
            f"att_mask has batch {b}, which does not divide the attention batch {n} (batch x heads); pass "
            "a mask "
            "of shape [Sq, Sk], [1, Sq, Sk], [batch, Sq, Sk] or [batch * heads, Sq, Sk]"
        )
    return b


def _to_additive(att_mask, dtype: torch.dtype, sq: int, sk: int, causal: bool) -> torch.Tensor | None:
    """Dense additive ``[b, Sq, Sk]`` mask (causal folded in), or None when there is no mask."""
    if isinstance(att_mask, AttentionMask):
        att_mask = att_mask.values
    if att_mask is None:
        return None
    if att_mask.ndim == 2:
        att_mask = att_mask.unsqueeze(0)
    if att_mask.ndim != 3:
        raise ValueError(f"att_mask must be [Sq, Sk] or [b, Sq, Sk], got shape={tuple(att_mask.shape)}")
    # converted before _crop broadcasts a key padding row over the queries, so that it stays a stride-0 view
    additive = bool_mask_to_additive(att_mask, dtype) if att_mask.dtype == torch.bool else att_mask.to(dtype)
    additive = _crop(additive, sq, sk)
    if causal:
        upper = torch.ones(sq, sk, dtype=torch.bool, device=additive.device).triu(1)
        additive = additive.masked_fill(upper, float("-inf"))
    return additive


def _dropout_p(dropout: nn.Module | None) -> float | None:
    """The probability to hand to the kernel, or None if ``dropout`` is not a plain ``nn.Dropout``."""
    if dropout is None:
        return 0.0
    if type(dropout) is nn.Dropout:
        return dropout.p if dropout.training else 0.0
    return None


def scaled_query_key_softmax(q: torch.Tensor, k: torch.Tensor, att_mask=None) -> torch.Tensor:
    """Dense attention probabilities ``softmax(q k^T / sqrt(D) + mask)``, ``[N, Sq, Sk]``."""
    q = q / math.sqrt(k.size(-1))
    if isinstance(att_mask, torch.Tensor) and att_mask.is_sparse:
        att_mask = att_mask.to_dense()
    additive = _to_additive(att_mask, q.dtype, q.shape[-2], k.shape[-2], causal=False)
    att = q @ k.transpose(-2, -1)
    if additive is not None:
        g = att.shape[0] // _mask_groups(additive, att.shape[0])
        att = (att.unflatten(0, (-1, g)) + additive.unsqueeze(1)).flatten(0, 1)
    return torch.softmax(att, dim=-1)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matmul (dense or sparse ``a``)."""
    return a @ b


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Attention over the stored entries of a sparse mask only: O(nnz) time and memory.

    Args:
        q: ``[N, Sq, D]``; k: ``[N, Sk, D]``; v: ``[N, Sk, Dv]``.
        mask: sparse COO ``[Sq, Sk]`` or ``[b, Sq, Sk]`` (b divides N); bool entries: True = attend;
            float entries: additive biases on the stored pairs. Pairs not stored are not attended.
        dropout_p: dropout on the attention weights.

    Returns:
        ``[N, Sq, Dv]``; a query with no stored key gets zeros.
    """
    mask = mask.coalesce()
    if mask.ndim == 3:
        b = _mask_groups(mask, q.shape[0])
        qs, ks, vs = (t.unflatten(0, (b, -1)) for t in (q, k, v))
        return torch.cat([sparse_attention(qs[i], ks[i], vs[i], mask[i], dropout_p) for i in range(b)], dim=0)
    n, sq, _ = q.shape
    idx, vals = mask.indices(), mask.values()
    keep = idx[0] < sq
    keep &= idx[1] < k.shape[-2]
    if vals.dtype == torch.bool:
        keep &= vals
        bias = None
    else:
        bias = vals[keep].to(q.dtype)
    rows, cols = idx[0][keep], idx[1][keep]
    scores = (q[:, rows] * k[:, cols]).sum(-1) / math.sqrt(q.shape[-1])  # [N, nnz]
    if bias is not None:
        scores = scores + bias
    rows_n = rows.expand(n, -1)
    row_max = torch.full((n, sq), float("-inf"), dtype=scores.dtype, device=q.device)
    row_max = row_max.scatter_reduce(1, rows_n, scores.detach(), reduce="amax")
    weights = torch.exp(scores - row_max[:, rows])
    denom = torch.zeros((n, sq), dtype=scores.dtype, device=q.device).index_add(1, rows, weights)
    weights = weights / denom[:, rows]
    if dropout_p > 0:
        weights = nn.functional.dropout(weights, dropout_p)
    out = torch.zeros((n, sq, v.shape[-1]), dtype=v.dtype, device=v.device)
    return out.index_add(1, rows, weights.unsqueeze(-1).to(v.dtype) * v[:, cols])


def _dense_attention(q, k, v, additive, causal, dropout) -> torch.Tensor:
    """Plain softmax attention (used only with a custom dropout module)."""
    sq, sk = q.shape[-2], k.shape[-2]
    if additive is None and causal:
        additive = _to_additive(torch.zeros(sq, sk, device=q.device), q.dtype, sq, sk, causal=True)
    att = scaled_query_key_softmax(q, k, additive)
    return dropout(att) @ v if dropout is not None else att @ v


def attention_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias, dropout: nn.Module | None = None
) -> torch.Tensor:
    """``memory_efficient_attention`` on folded heads ``[N, S, D]`` with an ``AttentionBias`` object
    (e.g. a local window) that the kernel applies without materialising it."""
    p = _dropout_p(dropout)
    out = ops.memory_efficient_attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), attn_bias, p=p or 0.0)
    return out.squeeze(2)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    att_mask: torch.Tensor | AttentionMask | None = None,
    dropout: nn.Module | None = None,
    block_size: int = 128,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + mask) v`` with heads folded into the batch.

    Shapes: q ``[N, Sq, D]``, k ``[N, Sk, D]``, v ``[N, Sk, Dv]`` (any leading dims are flattened into N),
    output ``[N, Sq, Dv]``.

    Args:
        q, k, v: query, key, value.
        att_mask: None, bool (True = attend) / additive float tensor or :class:`AttentionMask`,
            ``[Sq, Sk]`` or ``[b, Sq, Sk]`` with b dividing N; or a ``torch.sparse`` tensor: bool (stored True
            = attend, computed in O(nnz)) or float (additive, entries not stored add 0).
        dropout: dropout module for the attention weights; an ``nn.Dropout`` runs inside the kernel.
        block_size: kept for xFormers compatibility (the kernel picks its own tiles).
        causal: also mask keys after the query (top-left aligned, j <= i).

    Returns:
        Tensor ``[N, Sq, Dv]`` (with q's leading dims).

    Raises:
        ValueError: on a mask whose shape does not fit the inputs.
    """
    lead = q.shape[:-2]
    if q.ndim != 3:
        q, k, v = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))
    n, sq, sk = q.shape[0], q.shape[-2], k.shape[-2]

    if isinstance(att_mask, AttentionMask) and att_mask.is_causal:
        # a pure causal mask: let the kernel generate it
        causal, att_mask = True, None if att_mask.values.shape[0] == 1 else att_mask
    if isinstance(att_mask, torch.Tensor) and att_mask.is_sparse and att_mask.dtype != torch.bool:
        att_mask = att_mask.to_dense()  # additive: entries not stored add 0, as in the dense mask
    if isinstance(att_mask, torch.Tensor) and att_mask.is_sparse:
        if causal:
            tri = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
            att_mask = (att_mask.to_dense()[..., :sq, :sk] & tri).to_sparse()
        out = sparse_attention(q, k, v, att_mask, _dropout_p(dropout) or 0.0)
        return out.reshape(*lead, sq, v.shape[-1])

    additive = _to_additive(att_mask, q.dtype, sq, sk, causal)
    p = _dropout_p(dropout)
    if p is None:
        out = _dense_attention(q, k, v, additive, causal, dropout)
        return out.reshape(*lead, sq, v.shape[-1])

    if additive is None:
        bias = ops.LowerTriangularMask() if causal else None
        out = ops.memory_efficient_attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), bias, p=p)
        return out.squeeze(2).reshape(*lead, sq, v.shape[-1])

    b = _mask_groups(additive, n)
    g = n // b
    q4, k4, v4 = (t.reshape(b, g, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))  # [b, S, g, D]
    bias = additive.unsqueeze(1).expand(b, g, sq, sk)  # [b, g, Sq, Sk], a view
    out = ops.memory_efficient_attention(q4, k4, v4, bias, p=p)  # [b, Sq, g, Dv]
    return out.transpose(1, 2).reshape(*lead, sq, v.shape[-1])
