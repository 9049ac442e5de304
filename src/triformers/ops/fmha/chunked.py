"""``fmha.chunked``: exact attention in pure PyTorch on any device, in O(M * chunk) memory.

Flash-attention's algorithm written with tensor ops: queries are processed in chunks; for each, the key
chunks the mask allows are visited with an online softmax (running max ``m_i``, running sum ``l_i``,
accumulator ``acc``), and the log-sum-exp is kept. The backward recomputes each score tile from the lse
(``P = exp(S - lse)``) instead of storing it. Only one ``[chunk_q, chunk_k]`` tile per head is alive at a
time, never the ``[Mq, Mkv]`` score matrix.

- Masks come from :mod:`_mask` (every bias type): tiles a mask hides entirely are never visited, tiles it
  allows entirely are not masked, only boundary tiles build a mask (:mod:`_chunk_tiles`). A block-sparse mask
  is read from its tile table, ~128 queries (whole query blocks) at a time: a shared layout gathers the key
  blocks the chunk allows, a per-head layout each head's own blocks (work follows the non-zero blocks; rows
  a head hides are never read, padding reads a zero row).
- KV caches (padded, gappy, paged keys): only each block's keys are read, so unused cache rows may hold
  anything (NaN) and get zero dK/dV. A paged bias's key chunk is gathered through the block table (that
  chunk's rows only, never the whole logical cache) and its dK/dV are scattered back with ``index_add_``.
- GQA/MQA: a group's query heads are stacked into one matrix product with their shared K/V head (no
  expanded copy), and dK/dV come out summed over the group.
- Half-precision inputs are computed in float32 tile by tile; the output may be written in another dtype
  (``output_dtype``: float32 for partial attention).
- Partial attention: the lse is an output with a gradient, which the backward takes in
  ``delta_i = rowsum(dO_i * O_i) - dlse_i`` (``d lse_i / d s_ij = P_ij``).
- Dropout regenerates its mask from the seed (:mod:`_rng`) in the backward; the mask is the one the Triton
  operator draws.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from triformers.ops.common import register_operator
from triformers.ops.fmha import _layout, _rng, quantize
from triformers.ops.fmha._chunk_tiles import HeadRows, Tiles, accumulate_heads, gather_heads, with_zero_row
from triformers.ops.fmha._mask import SUPPORTED_BIAS_TYPES, mask_spec
from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, Context, Gradients, Inputs

# Score elements per tile, summed over batch and heads: 2**21 fp32 = 8 MiB per intermediate (scores,
# probabilities, masks: about 5 alive at once, ~40 MiB). On 2 CPU cores 2**20..2**23 time within 5% of each
# other at M = 4096; smaller tiles pay Python overhead per tile, larger ones only memory.
TILE_BUDGET = 1 << 21
# Keys per tile: long rows amortise the per-tile work of the online softmax; 512 keeps causal/local waste
# (the masked half of diagonal tiles) small.
MAX_CHUNK_K = 512
MIN_CHUNK_Q = 16


def _chunk_sizes(n_heads: int, Mq: int, Mkv: int) -> tuple[int, int]:
    chunk_k = max(1, min(Mkv, MAX_CHUNK_K))
    chunk_q = max(MIN_CHUNK_Q, TILE_BUDGET // max(1, n_heads * chunk_k))
    return min(chunk_q, max(Mq, 1)), chunk_k


def _fold(x: torch.Tensor, hk: int) -> torch.Tensor:
    """``[B, G, Hg, n, X]`` -> ``[B, G, Hk, (Hg / Hk) * n, X]``: a group's heads share one K/V matmul."""
    B, G, Hg, n, X = x.shape
    return x if hk == Hg else x.reshape(B, G, hk, (Hg // hk) * n, X)


def _unfold(x: torch.Tensor, hg: int) -> torch.Tensor:
    """Inverse of :func:`_fold`."""
    B, G, hk, rows, X = x.shape
    return x if hk == hg else x.reshape(B, G, hg, rows // (hg // hk), X)


def _dropout_scale(seed: int, p: float, L: _layout.Layout5, q0: int, q1: int, keys) -> torch.Tensor:
    """Keep mask divided by ``1 - p`` for tile rows ``[q0, q1)`` and key rows ``keys`` (the counter's column
    is the key's row in the key tensor: a paged cache's physical row), float32."""
    B, _, G, Hg, _ = L.q.shape
    dev = L.q.device
    rows = torch.arange(q0, q1, device=dev).view(1, 1, 1, -1, 1)
    if isinstance(keys, HeadRows):  # each head's own key rows
        cols = keys.rows.view(1, G, Hg, 1, -1)
    else:
        cols = keys if isinstance(keys, torch.Tensor) else torch.arange(keys.start, keys.stop, device=dev)
        cols = cols.view(1, 1, 1, 1, -1)
    heads = torch.arange(B * G * Hg, device=dev).view(B, G, Hg, 1, 1)
    keep = _rng.keep_mask(seed, p, rows, cols, heads)
    return keep.to(torch.float32) * (1.0 / (1.0 - p) if p < 1.0 else 0.0)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Tiles are computed in float32 (float64 for float64 inputs)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tile(x: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (a slice, or row indices: a gather) of a canonical ``[B, M, G, H, X]`` tensor as
    ``[B, G, H, n, X]`` in the accumulation dtype."""
    return x[:, rows].permute(0, 2, 3, 1, 4).to(_acc_dtype(x))


def _accumulate(buf: torch.Tensor, keys: slice | torch.Tensor, value: torch.Tensor) -> None:
    """``buf[:, :, :, keys] += value`` for a ``[B, G, H, Mkv, X]`` buffer; row indices may repeat (a page
    read twice), hence ``index_add_``."""
    if isinstance(keys, torch.Tensor):
        buf.index_add_(3, keys, value)
    else:
        buf[:, :, :, keys] += value


def _scores(L, qf_scaled, keys, q0, q1, mask):
    """Scaled scores ``[B, G, Hg, n, nk]`` of one tile, bias added and mask applied."""
    hg = L.q.shape[3]
    kc = _tile(L.k, keys)  # [B, G, Hk, nk, K]
    s = _unfold(qf_scaled @ kc.transpose(-1, -2), hg)
    if L.bias is not None:  # tensor biases come without paging: keys is a slice
        s = s + L.bias[:, :, :, q0:q1, keys].to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return s


def _head_tile_backward(L, kv0, keys: HeadRows, mask, qs, qs_scaled, dos, lse_c, delta_c, dropout, dq_acc, dk5,
                        dv5):  # fmt: skip
    """One key chunk of a per-head block-sparse layout in the backward: its dQ into ``dq_acc`` (folded like the
    query), dK (unscaled) and dV into the ``[B, G, Hk, Mkv, X]`` buffers at each head's rows."""
    hk = dk5.shape[2]
    kc, vc = gather_heads(kv0[0], keys, qs.dtype), gather_heads(kv0[1], keys, qs.dtype)  # [B, G, Hg, nk, X]
    s = qs_scaled @ kc.transpose(-1, -2)
    prob = torch.exp((s if mask is None else s.masked_fill(~mask, -math.inf)) - lse_c)
    dp = dos @ vc.transpose(-1, -2)
    if dropout is not None:
        seed, p, q0, q1 = dropout
        z = _dropout_scale(seed, p, L, q0, q1, keys).to(qs.dtype)
        accumulate_heads(dv5, keys, (prob * z).transpose(-1, -2) @ dos)
        dp = dp * z
    else:
        accumulate_heads(dv5, keys, prob.transpose(-1, -2) @ dos)
    ds = prob * (dp - delta_c)
    dq_acc += _fold(ds @ kc, hk)
    accumulate_heads(dk5, keys, ds.transpose(-1, -2) @ qs)


def forward(inp: Inputs, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)`` in the caller's layout (BMHK or BMGHK)."""
    q, k, v = inp.query, inp.key, inp.value
    # a quantized (int4/fp8) cache is dequantized a key chunk at a time, as the chunks are read
    L = quantize.dequantized_layout(inp, _layout.canonical(q, k, v, inp.tensor_bias))
    spec = mask_spec(inp.attn_bias)
    B, Mq, G, Hg, _ = L.q.shape
    Mkv, hk, Kv = L.k.shape[1], L.k.shape[3], L.v.shape[-1]
    scale = inp.scale_float
    out = torch.empty((*q.shape[:-1], Kv), dtype=inp.get_output_dtype(), device=q.device)
    lse = torch.empty((q.shape[0], *q.shape[2:-1], Mq), dtype=torch.float32, device=q.device)
    out5, lse5 = L.to5(out), L.lse5(lse)
    acc_dtype = _acc_dtype(q)
    chunk_q, chunk_k = _chunk_sizes(B * G * Hg, Mq, Mkv)
    tiles = Tiles(spec, Mq, Mkv, chunk_q, chunk_k, q.device, (G, Hg))
    k0, v0 = (with_zero_row(L.k), with_zero_row(L.v)) if tiles.per_head else (None, None)
    for blk, q0, q1 in tiles.query_chunks():
        n = q1 - q0
        qs = _tile(L.q, slice(q0, q1)) * scale  # [B, G, Hg, n, K]
        qf = _fold(qs, hk)  # [B, G, Hk, rows, K]
        m_i = torch.full((B, G, Hg, n), -math.inf, dtype=acc_dtype, device=q.device)
        l_i = torch.zeros((B, G, Hg, n), dtype=acc_dtype, device=q.device)
        acc = torch.zeros((B, G, Hg, n, Kv), dtype=acc_dtype, device=q.device)
        for keys, mask in tiles.key_chunks(blk, q0, q1):
            per_head = isinstance(keys, HeadRows)  # a per-head block-sparse layout: each head's own keys
            if per_head:
                s = qs @ gather_heads(k0, keys, acc_dtype).transpose(-1, -2)
                if mask is not None:
                    s = s.masked_fill(~mask, -math.inf)
            else:
                s = _scores(L, qf, keys, q0, q1, mask)
            m_new = torch.maximum(m_i, s.amax(-1))
            m_safe = torch.where(m_new == -math.inf, 0.0, m_new)
            p = torch.exp(s - m_safe.unsqueeze(-1))
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            if seed is not None:
                p = p * _dropout_scale(seed, inp.p, L, q0, q1, keys).to(acc_dtype)
            if per_head:
                pv = p @ gather_heads(v0, keys, acc_dtype)
            else:
                pv = _unfold(_fold(p, hk) @ _tile(L.v, keys), Hg)  # V tile [B, G, Hk, nk, Kv]
            acc = acc * alpha.unsqueeze(-1) + pv
            m_i = m_new
        empty = l_i == 0
        o = acc / torch.where(empty, 1.0, l_i).unsqueeze(-1)
        out5[:, q0:q1] = o.permute(0, 3, 1, 2, 4).to(out.dtype)
        lse5[..., q0:q1] = torch.where(empty, -math.inf, m_i + torch.log(torch.where(empty, 1.0, l_i)))
    return out, lse


def backward(
    ctx: Context, inp: Inputs, grad: torch.Tensor, seed: int | None, grad_lse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns ``(dq, dk, dv, dbias)`` for the caller's tensors (dbias None unless the bias needs grad);
    ``grad_lse`` (shaped like ``ctx.lse``) is the gradient of the lse output of partial attention."""
    q, k, v = inp.query, inp.key, inp.value
    bias = inp.tensor_bias
    L = _layout.canonical(q, k, v, bias)
    spec = mask_spec(inp.attn_bias)
    B, Mq, G, Hg, K = L.q.shape
    Mkv, hk, Kv = L.k.shape[1], L.k.shape[3], L.v.shape[-1]
    scale = inp.scale_float
    dev = q.device
    acc_dtype = _acc_dtype(q)
    if _acc_dtype(grad) != acc_dtype:  # an output_dtype whose tiles would not match the query's
        grad = grad.to(acc_dtype)
    go5, o5, lse5 = L.to5(grad), L.to5(ctx.out), L.lse5(ctx.lse)
    # D_i = rowsum(dO_i * O_i) - dlse_i [B, G, Hg, Mq] (d lse_i / d s_ij = P_ij)
    delta = (go5.to(acc_dtype) * o5.to(acc_dtype)).sum(-1).permute(0, 2, 3, 1)
    if grad_lse is not None:
        delta = delta - L.lse5(grad_lse).to(acc_dtype)
    dq5 = torch.zeros((B, G, Hg, Mq, K), dtype=acc_dtype, device=dev)
    dk5 = torch.zeros((B, G, hk, Mkv, K), dtype=acc_dtype, device=dev)
    dv5 = torch.zeros((B, G, hk, Mkv, Kv), dtype=acc_dtype, device=dev)
    want_db = bias is not None and bias.requires_grad
    if want_db:
        reduce_dims = _layout.bias_reduce_dims(bias, L)
        db_shape = [1 if d in reduce_dims else s for d, s in enumerate(L.bias.shape)]
        db5 = torch.zeros(db_shape, dtype=acc_dtype, device=dev)
    chunk_q, chunk_k = _chunk_sizes(B * G * Hg, Mq, Mkv)
    tiles = Tiles(spec, Mq, Mkv, chunk_q, chunk_k, dev, (G, Hg))
    kv0 = (with_zero_row(L.k), with_zero_row(L.v)) if tiles.per_head else None
    for blk, q0, q1 in tiles.query_chunks():
        qs = _tile(L.q, slice(q0, q1))  # [B, G, Hg, n, K]
        qs_scaled = qs * scale
        qf, qf_scaled = _fold(qs, hk), _fold(qs_scaled, hk)  # [B, G, Hk, rows, K]
        dos = _tile(go5, slice(q0, q1))  # [B, G, Hg, n, Kv]
        dof = _fold(dos, hk)  # [B, G, Hk, rows, Kv]
        lse_c = lse5[..., q0:q1]
        lse_c = torch.where(lse_c == -math.inf, math.inf, lse_c).unsqueeze(-1)
        delta_c = delta[..., q0:q1].unsqueeze(-1)
        dq_acc = torch.zeros_like(qf)
        for keys, mask in tiles.key_chunks(blk, q0, q1):
            if isinstance(keys, HeadRows):  # a per-head block-sparse layout: each head's own keys
                _head_tile_backward(L, kv0, keys, mask, qs, qs_scaled, dos, lse_c, delta_c,
                                    None if seed is None else (seed, inp.p, q0, q1), dq_acc, dk5, dv5)  # fmt: skip
                continue
            s = _scores(L, qf_scaled, keys, q0, q1, mask)
            prob = torch.exp(s - lse_c)  # [B, G, Hg, n, nk]
            kc, vc = _tile(L.k, keys), _tile(L.v, keys)
            dp = _unfold(dof @ vc.transpose(-1, -2), Hg)
            if seed is not None:
                z = _dropout_scale(seed, inp.p, L, q0, q1, keys).to(acc_dtype)
                _accumulate(dv5, keys, _fold(prob * z, hk).transpose(-1, -2) @ dof)
                dp = dp * z
            else:
                _accumulate(dv5, keys, _fold(prob, hk).transpose(-1, -2) @ dof)
            ds = prob * (dp - delta_c)
            dsf = _fold(ds, hk)
            dq_acc += dsf @ kc
            _accumulate(dk5, keys, dsf.transpose(-1, -2) @ qf)
            if want_db:
                part = ds.sum(dim=reduce_dims, keepdim=True) if reduce_dims else ds
                qi = slice(None) if 3 in reduce_dims else slice(q0, q1)
                ki = slice(None) if 4 in reduce_dims else keys
                db5[:, :, :, qi, ki] += part
        dq5[:, :, :, q0:q1] = _unfold(dq_acc, Hg) * scale
    dq_out = L.from5(dq5.permute(0, 3, 1, 2, 4).to(q.dtype))
    dk_out = _layout.shared_kv_grad((dk5 * scale).permute(0, 3, 1, 2, 4).to(k.dtype), k, L)
    dv_out = _layout.shared_kv_grad(dv5.permute(0, 3, 1, 2, 4).to(v.dtype), v, L)
    db_out = None
    if want_db:
        db_out = _layout.grad_for_input(L.bias_from5(db5).to(bias.dtype), bias)
    return dq_out, dk_out, dv_out, db_out


@register_operator
class FwOp(AttentionFwOpBase):
    """Pure-PyTorch memory-efficient attention: any device, every bias type, dropout, GQA, any head dim
    (float64 too, for gradcheck)."""

    NAME = "chunkedF"
    SUPPORTED_DEVICES: ClassVar[set[str]] = {"cpu", "cuda", "mps", "xpu"}
    SUPPORTED_DTYPES: ClassVar[set[torch.dtype]] = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    SUPPORTED_MAX_K = math.inf
    SUPPORTED_ATTN_BIAS_TYPES = SUPPORTED_BIAS_TYPES
    SUPPORTS_DROPOUT = True
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    SUPPORTS_OUTPUT_DTYPE = True
    SUPPORTS_PARTIAL = True
    SUPPORTS_QUANTIZED_KV = True  # int4/fp8 caches (forward only: int32 tensors have no gradient)
    # float64 keeps float32's tolerances: tests written against xFormers compute their reference in float32
    ERROR_ATOL: ClassVar[dict[torch.dtype, float]] = {
        **AttentionFwOpBase.ERROR_ATOL, torch.float64: AttentionFwOpBase.ERROR_ATOL[torch.float32]}
    ERROR_RTOL: ClassVar[dict[torch.dtype, float]] = {
        **AttentionFwOpBase.ERROR_RTOL, torch.float64: AttentionFwOpBase.ERROR_RTOL[torch.float32]}

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        return super().not_supported_reasons(d) + quantize.cache_errors(d, None)

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> tuple[torch.Tensor, Context | None]:
        rng_state = _rng.draw_seed() if inp.p > 0.0 else None
        seed = None if rng_state is None else int(rng_state[0])
        out_dtype = inp.get_output_dtype()
        if not needs_gradient or out_dtype.itemsize >= 4:
            out, lse = forward(inp, seed)
            return (out, None) if not needs_gradient else (out, Context(out=out, lse=lse, rng_state=rng_state))
        # The backward's delta_i = rowsum(dO_i * O_i) from a float16/bfloat16 O errs by O's rounding, and dK/dV
        # sum that error over every query: at Mq = 65537 (bfloat16, Mkv = 4, K = 8) past xFormers' tolerance.
        # The backward gets the float32 output instead (twice the memory of the saved output).
        out32, lse = forward(dataclasses.replace(inp, output_dtype=torch.float32), seed)
        return out32.to(out_dtype), Context(out=out32, lse=lse, rng_state=rng_state)


@register_operator
class BwOp(AttentionBwOpBase):
    """Backward of :class:`FwOp`, recomputing score tiles from the lse; gives the tensor bias a gradient."""

    NAME = "chunkedB"
    SUPPORTED_DEVICES = FwOp.SUPPORTED_DEVICES
    SUPPORTED_DTYPES = FwOp.SUPPORTED_DTYPES
    SUPPORTED_MAX_K = FwOp.SUPPORTED_MAX_K
    SUPPORTED_ATTN_BIAS_TYPES = FwOp.SUPPORTED_ATTN_BIAS_TYPES
    SUPPORTS_DROPOUT = True
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    SUPPORTS_ATTN_BIAS_GRAD = True
    SUPPORTS_OUTPUT_DTYPE = True
    SUPPORTS_PARTIAL = True
    ERROR_ATOL: ClassVar[dict[torch.dtype, float]] = {
        **AttentionBwOpBase.ERROR_ATOL, torch.float64: AttentionBwOpBase.ERROR_ATOL[torch.float32]}
    ERROR_RTOL: ClassVar[dict[torch.dtype, float]] = {
        **AttentionBwOpBase.ERROR_RTOL, torch.float64: AttentionBwOpBase.ERROR_RTOL[torch.float32]}

    @classmethod
    def apply(cls, ctx: Context, inp: Inputs, grad: torch.Tensor, grad_lse: torch.Tensor | None = None) -> Gradients:
        seed = None
        if inp.p > 0.0:
            if ctx.rng_state is None:
                raise ValueError("dropout backward needs the forward's rng_state (the seed) in the Context")
            seed = int(ctx.rng_state[0])
        dq, dk, dv, db = backward(ctx, inp, grad, seed, grad_lse)
        return Gradients(dq=dq, dk=dk, dv=dv, db=db)
