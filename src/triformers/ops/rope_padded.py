"""``rope_padded`` (xFormers' ``xformers.ops.rope_padded``): rotary embedding of the new tokens fused with the
K/V cache write, for decoding with a KV cache; on CUDA, on the CPU (torch), and with paged caches.

The kernel and its traffic count are in ``triformers.ops._triton.rope_padded``. CPU tensors without Triton's
interpreter (and any device Triton does not run on) take :func:`_rope_padded_torch`, vectorised torch with the
kernel's arithmetic: frequencies, angles, sines, cosines and the rotation in float32 (float64 with
``internal_dtype="f64"``), one rounding to the output dtype.
"""

from __future__ import annotations

import math

import torch

from triformers.ops._rope_padded_checks import (  # noqa: F401  (re-exported)
    _INDEX_DTYPES,
    _INTERNAL_DTYPES,
    _TENSORS,
    _bias_layout,
    _check_devices,
    _check_inputs,
    _check_positions,
    _check_scalars,
    _check_tensors,
    _max_page_id,
)
from triformers.ops._triton.rope_padded import (
    RopeArgs,
    as_float32,
    dynamic_constants,
    freq_exponent,
    rope_padded_fwd,
)
from triformers.triton._common import use_triton

__all__ = ["rope_padded"]


def rope_padded(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    attn_bias,
    *,
    theta: float = 10000.0,
    linear_scale: float = 1.0,
    use_dynamic_scaling: bool = False,
    dynamic_old_context_len: float = 8192.0,
    dynamic_scale_factor: float = 16.0,
    dynamic_low_freq_factor: float = 1.0,
    dynamic_high_freq_factor: float = 32.0,
    out_q: torch.Tensor | None = None,
    first_seqpos: torch.Tensor | None = None,
    seqpos: torch.Tensor | None = None,
    adjacents: bool = True,
    internal_dtype: str = "",
) -> torch.Tensor:
    """RoPE on the new tokens' queries and keys, and the keys and values written into the KV cache.

    The sequences of the batch are concatenated along M (batch size 1). For sequence b, whose new tokens are
    rows ``[qs_b, qs_{b+1})`` of xq (``attn_bias.q_seqinfo.seqstart``) and whose cache holds ``L_b`` tokens
    once they are added (``attn_bias.k_seqinfo.seqlen``), token t is the ``p = L_b - (qs_{b+1} - t)``-th of its
    sequence and goes to cache row ``k_seqinfo.seqstart[b] + p`` (paged bias: row ``block_tables[b, p //
    page_size] * page_size + p % page_size``)::

        out_q[t] = rope(xq[t], pos);  cache_k[row] = rope(xk[t], pos);  cache_v[row] = xv[t]

    with ``pos = seqpos[t]`` if given, else ``p + first_seqpos[b]`` if given, else ``p``. Every other cache row
    is left untouched, so ``memory_efficient_attention(out_q, cache_k, cache_v, attn_bias)`` can follow. The
    positions and rows are read from the bias's device tensors, never from its Python lists: a CUDA graph that
    captured the call follows in-place updates of ``k_seqinfo.seqlen`` and ``q_seqinfo.seqstart``
    (``q_seqinfo.max_seqlen``, which sizes the launch, must stay >= every sequence's query count). A token whose
    ``p`` falls outside ``[0, padding)`` (or whose page is outside the cache) writes no cache row.

    ``rope`` rotates each feature pair ``(x_re, x_im)`` by ``pos * f_c / linear_scale``, ``f_c =
    theta^(-2c/D)``: ``(x_re cos - x_im sin, x_im cos + x_re sin)``. With ``use_dynamic_scaling`` (llama 3.1),
    with ``w = 2π / f_c``: ``w > old_ctx / low_factor`` gives ``f_c / scale_factor``; ``old_ctx / high_factor <
    w <= old_ctx / low_factor`` gives ``(1 - s) f_c / scale_factor + s f_c``, ``s = (old_ctx / w - low_factor) /
    (high_factor - low_factor)``. theta and linear_scale are taken as float32 numbers, as in xFormers.

    Shapes (BMHK, or BMGHK with a group dim G after M in all five tensors)::

        xq, out_q          [1, Mq, (G,) Hq, D]        Mq = q_seqinfo.seqstart_py[-1], D even
        xk, xv             [1, Mq, (G,) Hkv, D]       Hkv may differ from Hq
        cache_k, cache_v   [1, Mkv, (G,) Hkv, D]      Mkv = k_seqinfo.seqstart_py[-1] (B * padding);
                                                      paged: num_pages * page_size

    An xk expanded over its heads (``xk.stride(-2) == 0``, as xv must then be) counts as one head; the caches
    may then be expanded (stride 0) over any number of heads. Only the last dim must be contiguous.

    Args:
        xq: queries of the new tokens.
        xk: keys of the new tokens; rotated into cache_k.
        xv: values of the new tokens; copied into cache_v.
        cache_k: key cache, modified in place.
        cache_v: value cache, modified in place.
        attn_bias: ``BlockDiagonalCausalWithOffsetPaddedKeysMask`` (any bias with padded keys), or its paged form
            with ``block_tables [B, max_pages]`` and ``page_size``, on the inputs' device.
        theta: RoPE base (default 10000.0).
        linear_scale: positions are divided by it (default 1.0).
        use_dynamic_scaling: llama-3.1 frequency rescaling (default False) with ``dynamic_old_context_len``
            (8192.0), ``dynamic_scale_factor`` (16.0), ``dynamic_low_freq_factor`` (1.0) and
            ``dynamic_high_freq_factor`` (32.0).
        dynamic_old_context_len: see ``use_dynamic_scaling``.
        dynamic_scale_factor: see ``use_dynamic_scaling``.
        dynamic_low_freq_factor: see ``use_dynamic_scaling``.
        dynamic_high_freq_factor: see ``use_dynamic_scaling``.
        out_q: where to write the rotated queries (xq's shape and dtype; may be xq itself); allocated if None.
            Only allowed with gradients disabled.
        first_seqpos: ``[B]`` position of each sequence's first cache row (default: 0s); changes the rotation,
            never which rows are written.
        seqpos: ``[Mq]`` position of each query (out of order allowed); exclusive with first_seqpos.
        adjacents: pairs are ``(2c, 2c + 1)`` (Meta's LLaMA, default) or ``(c, c + D/2)`` (HuggingFace) if False.
        internal_dtype: ``""`` or ``"f32"`` (float32 rotation) or ``"f64"`` (float64).

    Returns:
        out_q: the rotated queries, xq's shape and dtype.

    Raises:
        ValueError: with gradients required (or out_q given while gradients are enabled), on shapes, dtypes,
            strides or devices the description above excludes, a paged block table that points past the cache,
            or both seqpos and first_seqpos.
    """
    if torch.is_grad_enabled() and (any(t.requires_grad for t in (xq, xk, xv, cache_k, cache_v)) or out_q is not None):
        raise ValueError(
            "Gradients not supported. rope_padded writes the KV cache (and out_q) in place for inference: call "
            "it under torch.no_grad() or torch.inference_mode(), with inputs that do not require grad"
        )
    dynamic = (dynamic_old_context_len, dynamic_scale_factor, dynamic_low_freq_factor, dynamic_high_freq_factor)
    _check_scalars(theta, linear_scale, internal_dtype, dynamic if use_dynamic_scaling else None)
    n_kv, slot_len, block_tables, page_size = _check_inputs(
        xq, xk, xv, cache_k, cache_v, attn_bias, out_q, first_seqpos, seqpos
    )
    if out_q is None:
        out_q = xq.new_empty(xq.shape)
    args = RopeArgs(
        xq, xk, xv, out_q, cache_k, cache_v,
        attn_bias.q_seqinfo.seqstart, attn_bias.k_seqinfo.seqstart, attn_bias.k_seqinfo.seqlen, block_tables,
        seqpos, first_seqpos, n_kv, attn_bias.q_seqinfo.max_seqlen, slot_len, page_size, theta, linear_scale,
        dynamic_constants(*dynamic) if use_dynamic_scaling else None, adjacents, internal_dtype == "f64",
    )  # fmt: skip
    if xq.shape[1] == 0 or args.max_q_len == 0:
        return out_q
    if use_triton("rope_padded", xq, xk, xv, cache_k, cache_v, out_q):
        rope_padded_fwd(args)
    else:
        _rope_padded_torch(args)
    return out_q


def _frequencies(head_dim: int, a: RopeArgs, dtype: torch.dtype, device) -> torch.Tensor:
    """``[D/2]`` rotation frequencies computed as the kernel does, in ``dtype``."""
    c = torch.arange(head_dim // 2, dtype=dtype, device=device)
    if dtype == torch.float64:
        freq = torch.exp2(-(2 * c / head_dim) * math.log2(as_float32(a.theta)))
    else:
        freq = torch.exp2(c * torch.tensor(freq_exponent(a.theta, head_dim), dtype=dtype))
    if a.dynamic is not None:
        k = {name: torch.tensor(value, dtype=dtype) for name, value in a.dynamic.items()}
        smooth = freq * k["SMOOTH_A"] - k["SMOOTH_B"]
        scaled = freq / k["SCALE_FACTOR"]
        blended = (1 - smooth) * scaled + smooth * freq
        freq = torch.where(freq < k["FREQ_LO"], scaled, torch.where(freq < k["FREQ_HI"], blended, freq))
    return freq


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacents: bool) -> torch.Tensor:
    """Rotates the feature pairs of ``x [n, G, H, D]`` by the angles of ``cos``/``sin`` ``[n, 1, 1, D/2]``."""
    d = x.shape[-1]
    pairs = x.unflatten(-1, (d // 2, 2)) if adjacents else x.unflatten(-1, (2, d // 2)).transpose(-1, -2)
    re, im = pairs.to(cos.dtype).unbind(-1)
    y = torch.stack((re * cos - im * sin, im * cos + re * sin), dim=-1)  # [n, G, H, D/2, 2]
    y = y.flatten(-2) if adjacents else y.transpose(-1, -2).flatten(-2)
    return y.to(torch.float32).to(x.dtype)  # through float32, as the kernel stores


def _rope_padded_torch(c: RopeArgs) -> None:
    """The kernel's computation in vectorised torch: the same (sequence, query) pairs, rows and guards."""
    c = c._replace(**{n: getattr(c, n).unsqueeze(2) for n in _TENSORS if getattr(c, n).dim() == 4})  # BMGHK
    dev = c.xq.device
    compute = torch.float64 if c.f64 else torch.float32
    n_seqs = c.seqlen_k.shape[0]
    seqstart_q = c.seqstart_q.to(dev, torch.int64)
    j = torch.arange(c.max_q_len, device=dev)
    t = (seqstart_q[:-1, None] + j).flatten()  # [B * max_q_len]: the kernel's grid
    b = torch.arange(n_seqs, device=dev).repeat_interleave(c.max_q_len)
    active = t < seqstart_q[1:].repeat_interleave(c.max_q_len)
    t, b = t[active], b[active]
    p = c.seqlen_k.to(dev, torch.int64)[b] - (seqstart_q[b + 1] - t)

    writable = (p >= 0) & (p < c.slot_len)
    p_safe = torch.where(writable, p, 0)
    n_cache_rows = c.cache_k.shape[1]
    if c.block_tables is not None:
        page = c.block_tables.to(torch.int64)[b, p_safe // c.page_size]
        writable &= (page >= 0) & (page < n_cache_rows // c.page_size)
        row = page * c.page_size + p_safe % c.page_size
    else:
        row = c.seqstart_k.to(dev, torch.int64)[b] + p_safe
        writable &= (row >= 0) & (row < n_cache_rows)

    if c.seqpos is not None:
        pos = c.seqpos[t]
    elif c.first_seqpos is not None:
        pos = p + c.first_seqpos[b]
    else:
        pos = p
    freq = _frequencies(c.xq.shape[-1], c, compute, dev)
    angle = pos.to(compute)[:, None] * freq / torch.tensor(as_float32(c.linear_scale), dtype=compute)
    cos, sin = (f(angle)[:, None, None, :] for f in (torch.cos, torch.sin))  # [n, 1, 1, D/2]

    q_rot = _rotate(c.xq[0, t], cos, sin, c.adjacents)
    c.out_q[0].index_copy_(0, t, q_rot)
    kv = slice(0, c.n_kv_heads)
    k_rot = _rotate(c.xk[0, t, :, kv], cos, sin, c.adjacents)
    rows = row[writable]
    c.cache_k[0, :, :, kv].index_copy_(0, rows, k_rot[writable])
    c.cache_v[0, :, :, kv].index_copy_(0, rows, c.xv[0, t[writable], :, kv])
