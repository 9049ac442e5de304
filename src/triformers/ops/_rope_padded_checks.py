"""Argument checks of :func:`triformers.ops.rope_padded`: every tensor, scalar, device and position, with errors
that name the argument and the fix."""

from __future__ import annotations

import math

import torch

from triformers.ops.fmha.attn_bias import _PaddedSeqLenInfo, _SeqLenInfo

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
