"""Naive attention, the reference every operator is checked against (tests, demo, benchmarks).

It materializes the bias (``AttentionBias.materialize``) and the whole ``[Mq, Mkv]`` score matrix, so it is
only for moderate sizes. Fully masked rows give output 0 and lse -inf, like the operators.
"""

from __future__ import annotations

import math

import torch

from triformers.ops.fmha.attn_bias import AttentionBias


def _to_bhmk(x: torch.Tensor) -> torch.Tensor:
    """BMK / BMHK / BMGHK -> ``[B, heads..., M, K]``."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4:
        return x.permute(0, 2, 1, 3)
    return x.permute(0, 2, 3, 1, 4)


def _from_bhmk(x: torch.Tensor, ndim: int) -> torch.Tensor:
    if ndim == 3:
        return x.squeeze(1)
    if ndim == 4:
        return x.permute(0, 2, 1, 3)
    return x.permute(0, 3, 1, 2, 4)


def ref_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | AttentionBias | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    drop_mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of attention, computed in ``dtype`` (default float64; None: the inputs' dtype).

    Args:
        query, key, value: BMK, BMHK or BMGHK tensors (see ``memory_efficient_attention``).
        attn_bias: None, a tensor (caller's bias layout), or an AttentionBias.
        p: dropout probability; needs ``drop_mask`` (bool, True = keep, shaped like the scores
            ``[B, H, Mq, Mkv]`` / ``[B, G, H, Mq, Mkv]``) since the reference draws no randomness.
        scale: defaults to ``K ** -0.5``.

    Returns:
        ``out`` in the caller's layout and ``dtype``, and ``lse`` ``[B, H, Mq]`` (``[B, G, H, Mq]``).
    """
    ndim = query.ndim
    compute = dtype or query.dtype
    q, k, v = (_to_bhmk(x).to(compute) for x in (query, key, value))
    s = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * s) @ k.transpose(-1, -2)
    if attn_bias is not None:
        if isinstance(attn_bias, torch.Tensor):
            bias = attn_bias.to(compute)
            if ndim == 3:
                bias = bias.unsqueeze(1)
        else:
            bias = attn_bias.materialize(tuple(scores.shape), dtype=compute, device=scores.device)
        scores = scores + bias
    if scores.shape[-1] == 0:  # no keys at all
        lse = scores.new_full(scores.shape[:-1], -math.inf)
        return _from_bhmk(scores @ v, ndim), lse
    m = scores.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = torch.exp(scores - m)
    l_sum = e.sum(-1, keepdim=True)
    probs = e / torch.where(l_sum == 0, torch.ones_like(l_sum), l_sum)
    lse = torch.where(l_sum == 0, -math.inf, m + torch.log(l_sum)).squeeze(-1)
    if p > 0.0:
        if drop_mask is None:
            raise ValueError("ref_attention with p > 0 needs drop_mask (True = keep)")
        keep = drop_mask if ndim != 3 else drop_mask.reshape(probs.shape)
        probs = probs * keep.to(compute) / (1.0 - p) if p < 1.0 else probs * 0.0
    out = probs @ v
    return _from_bhmk(out, ndim), lse
