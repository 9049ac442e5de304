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

from triformers.ops._triton.rope_padded import (
    RopeArgs,
    as_float32,
    dynamic_constants,
    freq_exponent,
    rope_padded_fwd,
)
from triformers.ops.fmha.attn_bias import _PaddedSeqLenInfo, _SeqLenInfo
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


_INTERNAL_DTYPES = ("", "f32", "f64")
_TENSORS = ("xq", "xk", "xv", "out_q", "cache_k", "cache_v")
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_scalars(theta, linear_scale, internal_dtype, dynamic: tuple | None) -> None:
    """ValueError for a RoPE parameter outside its domain (``dynamic``: the four llama-3.1 numbers or None)."""
    if internal_dtype not in _INTERNAL_DTYPES:
        raise ValueError(f"internal_dtype must be '', 'f32' or 'f64', got internal_dtype={internal_dtype!r}")
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a finite number > 0 (the RoPE base, e.g. 10000.0), got theta={theta!r}")
    if not (math.isfinite(linear_scale) and linear_scale != 0):
        raise ValueError(
            f"linear_scale must be a finite non-zero number (positions are divided by it), got {linear_scale!r}"
        )
    if dynamic is None:
        return
    old_context_len, scale_factor, low, high = dynamic
    for name, value in (("dynamic_old_context_len", old_context_len), ("dynamic_scale_factor", scale_factor)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0 with use_dynamic_scaling, got {value!r}")
    if not (0 <= low < high < math.inf):
        raise ValueError(
            "use_dynamic_scaling needs 0 <= dynamic_low_freq_factor < dynamic_high_freq_factor (finite), got "
            f"dynamic_low_freq_factor={low!r}, dynamic_high_freq_factor={high!r}"
        )


def _bias_layout(attn_bias, n_rows: int) -> tuple[int, int, torch.Tensor | None, int]:
    """``(number of sequences, slot length, block table or None, page size)`` of a KV-cache bias."""
    q_info, k_info = getattr(attn_bias, "q_seqinfo", None), getattr(attn_bias, "k_seqinfo", None)
    if not isinstance(q_info, _SeqLenInfo) or not isinstance(k_info, _PaddedSeqLenInfo):
        raise ValueError(
            "rope_padded needs a KV-cache bias with padded keys, such as BlockDiagonalCausalWithOffsetPaddedKeysMask "
            f"(or its paged form), got attn_bias of type {type(attn_bias).__name__}; build one with "
            "BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_seqlen, kv_padding, kv_seqlen)"
        )
    n_seqs = len(q_info.seqstart_py) - 1
    shapes = {
        "q_seqinfo.seqstart": (q_info.seqstart, n_seqs + 1),
        "k_seqinfo.seqstart": (k_info.seqstart, n_seqs + 1),
        "k_seqinfo.seqlen": (k_info.seqlen, n_seqs),
    }
    for name, (t, n) in shapes.items():
        if t.shape != (n,) or t.dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"attn_bias.{name} must be an int32/int64 tensor of shape ({n},) for the {n_seqs} sequences of "
                f"q_seqinfo, got shape={tuple(t.shape)}, dtype={t.dtype}; build the bias with from_seqlens"
            )
    block_tables = getattr(attn_bias, "block_tables", None)
    if block_tables is None:
        return n_seqs, k_info.padding, None, 1
    page_size = attn_bias.page_size
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"attn_bias.page_size must be an int > 0, got {page_size!r}")
    if block_tables.dim() != 2 or block_tables.shape[0] != n_seqs or block_tables.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"attn_bias.block_tables must be an int32/int64 [B, max_pages] tensor with B={n_seqs}, got "
            f"shape={tuple(block_tables.shape)}, dtype={block_tables.dtype}"
        )
    if n_rows % page_size:
        raise ValueError(
            f"a paged cache holds whole pages: cache_k.shape[1]={n_rows} is not a multiple of "
            f"attn_bias.page_size={page_size}; allocate num_pages * page_size rows"
        )
    max_page = _max_page_id(attn_bias)
    if max_page is not None and max_page >= n_rows // page_size:
        raise ValueError(
            f"attn_bias.block_tables points to page {max_page} but the cache has {n_rows // page_size} pages "
            f"(cache_k.shape[1]={n_rows} rows of page_size={page_size}); allocate at least "
            f"{(max_page + 1) * page_size} cache rows or fix the block table"
        )
    return n_seqs, block_tables.shape[1] * page_size, block_tables, page_size


def _check_inputs(xq, xk, xv, cache_k, cache_v, attn_bias, out_q, first_seqpos, seqpos) -> tuple:
    """ValueError for any input ``rope_padded`` cannot take; else ``(heads read from xk/xv and written, slot
    length, block table or None, page size)``. Each tensor attribute is read once (decoding calls are short)."""
    sq, sk, sv, sck, scv = xq.shape, xk.shape, xv.shape, cache_k.shape, cache_v.shape
    ndim = len(sq)
    if ndim not in (4, 5):
        raise ValueError(
            f"Unexpected xq dimension: xq.shape={tuple(sq)} has {ndim} dims; pass BMHK [1, Mq, H, D] or "
            "BMGHK [1, Mq, G, H, D] with the new tokens of every sequence concatenated along Mq"
        )
    if sq[0] != 1:
        raise ValueError(
            "Expected batch size dimension to be 1 as batches should be concatenated. Got "
            f"xq.shape={tuple(sq)}: pack the sequences along dim 1 (x.reshape(1, -1, *x.shape[2:]))"
        )
    for name, shape in (("xk", sk), ("xv", sv), ("cache_k", sck), ("cache_v", scv)):
        if len(shape) != ndim:
            raise ValueError(f"{name}.shape={tuple(shape)} must have xq's {ndim} dims (xq.shape={tuple(sq)})")
    n_seqs, slot_len, block_tables, page_size = _bias_layout(attn_bias, sck[1])
    n_queries = attn_bias.q_seqinfo.seqstart_py[-1]
    if sq[1] != n_queries:
        raise ValueError(
            f"xq has {sq[1]} query rows (xq.shape={tuple(sq)}) but attn_bias describes {n_queries} "
            "(q_seqinfo.seqstart_py[-1]); pass the new tokens of its sequences, concatenated"
        )
    d = sq[-1]
    if d % 2:
        raise ValueError(f"RoPE rotates feature pairs: the head dim must be even, got D={d} (xq.shape={tuple(sq)})")
    kv_shape = (*sq[:-2], sk[-2], d)
    for name, shape in (("k", sk), ("v", sv)):
        if shape != kv_shape:
            raise ValueError(
                f"unexpected {name} shape {tuple(shape)}: expected {kv_shape}, [1, Mq, (G,) Hkv, D] with xq's "
                f"Mq, G and D (xq.shape={tuple(sq)}) and xk's Hkv"
            )
    tk, tv, tck, tcv = xk.stride(), xv.stride(), cache_k.stride(), cache_v.stride()
    n_kv = 1 if tk[-2] == 0 else sk[-2]  # an expanded xk is one head
    if n_kv < sv[-2] and tv[-2] != 0:
        raise ValueError(
            f"xk is expanded over its heads (xk.stride()={tk}) so one head is read, but xv is not "
            f"(xv.stride()={tv}): its other heads would be ignored; expand xv the same way"
        )
    cache_heads = sck[-2] if n_kv == 1 and tck[-2] == 0 else n_kv
    n_rows = sck[1] if block_tables is not None else attn_bias.k_seqinfo.seqstart_py[-1]
    cache_shape = (1, n_rows, *sq[2:-2], cache_heads, d)
    rows_hint = "num_pages * page_size" if block_tables is not None else "k_seqinfo.seqstart_py[-1], B * padding"
    for name, shape, stride in (("cache_k", sck, tck), ("cache_v", scv, tcv)):
        if shape != cache_shape:
            raise ValueError(
                f"unexpected {name} shape {tuple(shape)}: expected {cache_shape}, [1, Mkv, (G,) Hkv, D] with "
                f"Mkv = {rows_hint} ({n_rows}) and Hkv = {cache_heads}, xk's heads (any number when xk and "
                "cache_k are both expanded over heads with stride 0)"
            )
        if n_kv < cache_heads and stride[-2] != 0:
            raise ValueError(
                f"cache_k is expanded over its heads so one head is written, but {name} is not "
                f"({name}.stride()={stride}): its other heads would stay stale; expand it the same way"
            )
        if n_kv > 1 and stride[-2] == 0:
            raise ValueError(
                f"{name} repeats one head over dim -2 ({name}.stride()={stride}) but xk has {n_kv} distinct "
                "heads to write into it; pass a cache with a real head dim"
            )
    if out_q is not None and out_q.shape != sq:
        raise ValueError(f"Unexpected shape of out_q {tuple(out_q.shape)}: it must be xq's {tuple(sq)}")
    named = [("xq", "q", xq, xq.stride()), ("xk", "k", xk, tk), ("xv", "v", xv, tv),
             ("cache_k", "cache_k", cache_k, tck), ("cache_v", "cache_v", cache_v, tcv)]  # fmt: skip
    if out_q is not None:
        named.append(("out_q", "out_q", out_q, out_q.stride()))
    _check_tensors(named)
    _check_devices(xq.device, attn_bias, block_tables, first_seqpos, seqpos, xk, xv, cache_k, cache_v, out_q)
    _check_positions(first_seqpos, seqpos, n_seqs, n_queries)
    return n_kv, slot_len, block_tables, page_size


def _check_tensors(named) -> None:
    """One floating dtype and unit last-dim strides; ``named``: (name, short name, tensor, its strides)."""
    dtype = named[0][2].dtype
    if not dtype.is_floating_point:
        raise ValueError(f"xq must be a floating-point tensor, got xq.dtype={dtype}")
    for name, short, t, stride in named:
        if t.dtype != dtype:
            raise ValueError(
                f"{name}.dtype={t.dtype} differs from xq.dtype={dtype}: queries, keys, values, caches and out_q "
                "share one dtype; cast the new tokens to the cache's dtype"
            )
        if stride[-1] != 1:
            fix = "pass it with .contiguous()" if name in ("xq", "xk", "xv") else "allocate it with unit stride on D"
            raise ValueError(
                f"Each {short} head must be contiguous: {name}.stride()={stride} has stride {stride[-1]} on the "
                f"last dim; {fix}"
            )


def _check_devices(dev, attn_bias, block_tables, first_seqpos, seqpos, xk, xv, cache_k, cache_v, out_q) -> None:
    for name, t in (("xk", xk), ("xv", xv), ("cache_k", cache_k), ("cache_v", cache_v), ("out_q", out_q),
                    ("first_seqpos", first_seqpos), ("seqpos", seqpos)):  # fmt: skip
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but xq on {dev}; put every tensor on one device")
    q_info, k_info = attn_bias.q_seqinfo, attn_bias.k_seqinfo
    for name, t in (("q_seqinfo.seqstart", q_info.seqstart), ("k_seqinfo.seqstart", k_info.seqstart),
                    ("k_seqinfo.seqlen", k_info.seqlen), ("block_tables", block_tables)):  # fmt: skip
        if t is not None and t.device != dev:
            raise ValueError(
                f"`attn_bias` must be on the same device as the other inputs: attn_bias.{name} is on {t.device}, "
                f"xq on {dev}; build the bias with device={str(dev)!r} (or move it with "
                "attn_bias.q_seqinfo.to(device) and attn_bias.k_seqinfo.to(device))"
            )


def _check_positions(first_seqpos, seqpos, n_seqs: int, n_queries: int) -> None:
    if first_seqpos is not None and seqpos is not None:
        raise ValueError(
            "seqpos and first_seqpos may not both be provided: seqpos gives every query's position, first_seqpos "
            "an offset per sequence; pass one of them"
        )
    for name, t, n, what in (
        ("first_seqpos", first_seqpos, n_seqs, "one position per sequence of attn_bias"),
        ("seqpos", seqpos, n_queries, "one position per query row of xq"),
    ):
        if t is None:
            continue
        if t.shape != (n,):
            raise ValueError(f"{name}.shape {tuple(t.shape)} but ({n},) expected ({what})")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} must hold integer or real positions, got {name}.dtype={t.dtype}")


def _max_page_id(attn_bias) -> int | None:
    """The block table's largest page id when known without a device sync: stored by the paged biases at
    construction (``_max_page``), or read from a table on the CPU."""
    stored = getattr(attn_bias, "_max_page", None)
    if stored is not None:
        return stored
    table = attn_bias.block_tables
    return int(table.max()) if table.device.type == "cpu" and table.numel() else None


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
