"""Validation of memory-efficient attention's inputs (:class:`~triformers.ops.fmha.common.Inputs`): every
error is an :class:`~triformers.ops.common.InputError` naming the tensor, its shape, what was expected and the
fix. ``Inputs.validate_inputs`` runs :func:`validate_inputs`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from triformers.ops.common import InputError
from triformers.ops.fmha import attn_bias as ab

_LAYOUTS = "BMK [B, M, K], BMHK [B, M, H, K] or BMGHK [B, M, G, H, K]"


def _describe(name: str, x: torch.Tensor) -> str:
    return f"{name}.shape={tuple(x.shape)} ({x.dtype}, {x.device.type})"


def _is_bias_type_supported_in_BMK(attn_bias_type: Any) -> bool:
    """Whether BMK ``[B, M, K]`` inputs may come with a bias of this type (others need BMHK)."""
    return attn_bias_type in (type(None), ab.LowerTriangularMask, torch.Tensor)


def validate_inputs(inp: Any) -> None:
    """Raises :class:`~triformers.ops.common.InputError` (a ValueError, and an AssertionError as xFormers'
    asserts were), naming the tensor, its shape, what was expected and how to fix it."""
    q, k, v = inp.query, inp.key, inp.value
    for name, x in (("query", q), ("key", k), ("value", v)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (q.ndim == k.ndim == v.ndim) or q.ndim not in (3, 4, 5):
        raise InputError(
            "Query/Key/Value should all have BMGHK, BMHK, or BMK shape: got "
            f"{_describe('query', q)}, {_describe('key', k)}, {_describe('value', v)}; "
            f"use one layout for all three: {_LAYOUTS}"
        )
    if not (q.device == k.device == v.device):
        raise InputError(
            f"Query/Key/Value should all be on the same device: query on {q.device}, key on {k.device}, "
            f"value on {v.device}; move them with .to(query.device)"
        )
    if not (q.dtype == k.dtype == v.dtype) and not (k.dtype == v.dtype == torch.int32):
        raise InputError(
            f"Query/Key/Value should all have the same dtype: query {q.dtype}, key {k.dtype}, "
            f"value {v.dtype}; cast them with .to(query.dtype) (or pass a quantized KV cache: int32 key "
            "and value, see ops.fmha.quantize)"
        )
    if not q.is_floating_point():
        raise InputError(f"query.dtype={q.dtype}; attention needs float16, bfloat16 or float32 inputs")
    bias = inp.attn_bias
    if q.ndim == 3 and not _is_bias_type_supported_in_BMK(type(bias)):
        raise InputError(
            f"Please provide inputs in BMHK format rather than BMK when using bias type "
            f"`{type(bias).__name__}`: query.unsqueeze(2), key.unsqueeze(2), value.unsqueeze(2)"
        )
    if bias is not None and not isinstance(bias, (torch.Tensor, ab.AttentionBias)):
        raise InputError(
            f"attn_bias must be None, a torch.Tensor or an AttentionBias, got {type(bias).__name__}"
        )
    _validate_shapes(inp)
    _validate_tensor_bias(inp)
    if isinstance(bias, ab.VARLEN_BIASES):
        validate_block_diagonal(inp, bias)
    if isinstance(bias, ab.BlockSparseMask):
        bias.check_inputs(q, k)
    if not isinstance(inp.p, (int, float)) or not 0.0 <= float(inp.p) <= 1.0:
        raise InputError(f"Invalid dropout probability: p={inp.p!r}; expected 0 <= p <= 1")
    if inp.scale is not None and not (isinstance(inp.scale, (int, float)) and math.isfinite(inp.scale)):
        raise InputError(f"scale must be a finite float or None, got {inp.scale!r}")
    out_dtype = inp.output_dtype
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise InputError(
            f"output_dtype={out_dtype!r} is not a floating-point torch.dtype; pass e.g. torch.float32, or None "
            f"for the query's dtype ({q.dtype})"
        )
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.numel() and x.stride(-1) != 1:
            raise InputError(
                f"{name}.stride(-1)={x.stride(-1)} ({_describe(name, x)}); only the last dimension must "
                f"be contiguous: pass {name}.contiguous()"
            )


def _validate_shapes(inp: Any) -> None:
    q, k, v = inp.query, inp.key, inp.value
    hint = "HINT: no broadcasting between query and key/value; use key.expand(...) yourself"
    if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
        raise InputError(
            f"Incompatible shapes for attention inputs: batch sizes differ: {_describe('query', q)}, "
            f"{_describe('key', k)}, {_describe('value', v)}. {hint}"
        )
    if k.shape[1] != v.shape[1]:
        raise InputError(
            f"Incompatible shapes for attention inputs: key has {k.shape[1]} positions but value has "
            f"{v.shape[1]} ({_describe('key', k)}, {_describe('value', v)}); they must match"
        )
    if k.shape[-1] != q.shape[-1] and k.dtype != torch.int32:  # int32: packed words of a quantized cache
        raise InputError(
            f"Incompatible shapes for attention inputs: key.shape[-1]={k.shape[-1]} but "
            f"query.shape[-1]={q.shape[-1]} ({_describe('query', q)}, {_describe('key', k)}); query and "
            "key need the same head dim (value may differ)"
        )
    if q.shape[-1] == 0:
        raise InputError(f"query.shape[-1]=0 ({_describe('query', q)}): the head dim must be positive")
    head_dims = slice(2, q.ndim - 1)
    for name, x in (("key", k), ("value", v)):
        if tuple(x.shape[head_dims]) != tuple(q.shape[head_dims]):
            what = "heads" if q.ndim == 4 else "groups/heads"
            fix = (
                "expand key/value to the query's head count (key.expand(...): no copy) or use the "
                "BMGHK layout [B, M, G, H, K] for grouped-query attention"
            )
            raise InputError(
                f"Incompatible shapes for attention inputs: {name} has {what} {tuple(x.shape[head_dims])} "
                f"but query has {tuple(q.shape[head_dims])} ({_describe(name, x)}, "
                f"{_describe('query', q)}); {fix}"
            )


def _validate_tensor_bias(inp: Any) -> None:
    bias = inp.tensor_bias
    if bias is None:
        return
    q, k = inp.query, inp.key
    name = "attn_bias" if isinstance(inp.attn_bias, torch.Tensor) else "attn_bias._bias"
    if q.ndim == 3:
        expected = (q.shape[0], q.shape[1], k.shape[1])
        layout = "[B, Mq, Mkv]"
    elif q.ndim == 4:
        expected = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        layout = "[B, H, Mq, Mkv]"
    else:
        expected = (q.shape[0], q.shape[2], q.shape[3], q.shape[1], k.shape[1])
        layout = "[B, G, H, Mq, Mkv]"
    try:
        ok = bias.ndim == len(expected) and torch.broadcast_shapes(tuple(bias.shape), expected) == expected
    except RuntimeError:
        ok = False
    if not ok:
        raise InputError(
            f"Invalid shape for attention bias: {name}.shape={tuple(bias.shape)}, expected {layout} = "
            f"{expected} or a shape broadcastable to it with the same number of dims (e.g. "
            f"bias[None, :, None, :] for a per-head, per-key bias; .expand({', '.join(map(str, expected))}) "
            "makes a view without copying)"
        )
    if bias.dtype != q.dtype:
        raise InputError(
            f"{name}.dtype={bias.dtype} but query.dtype={q.dtype}; cast the bias: {name}.to(query.dtype)"
        )
    if bias.device != q.device:
        raise InputError(f"{name} is on {bias.device} but query is on {q.device}; move it with .to()")


def validate_block_diagonal(inp: Any, bias: Any) -> None:
    q, k = inp.query, inp.key
    kind = type(bias).__name__
    if q.shape[0] != 1:
        raise InputError(
            f"Expected batch_size=1 when using block-diagonal bias {kind}: {_describe('query', q)}; pack "
            "the sequences along M with BlockDiagonalMask.from_tensor_list (or x.reshape(1, -1, ...))"
        )
    q_total = bias.q_seqinfo.seqstart_py[-1]
    if q.shape[1] != q_total:
        raise InputError(
            f"{kind} describes {q_total} queries in total but query.shape[1]={q.shape[1]} "
            f"({_describe('query', q)}); build the bias from the same sequence lengths as the packed query"
        )
    if isinstance(bias, (ab.PagedBlockDiagonalPaddedKeysMask, ab.PagedBlockDiagonalGappyKeysMask)):
        _validate_paged(inp, bias)
    else:
        k_total = bias.k_seqinfo.seqstart_py[-1]
        if k.shape[1] != k_total:
            raise InputError(
                f"{kind} describes {k_total} key positions in total but key.shape[1]={k.shape[1]} "
                f"({_describe('key', k)}); build the bias from the same lengths (and padding) as the keys"
            )
    if not isinstance(bias, ab.BlockDiagonalMask):  # KV-cache biases: operators read their tensors
        tensors = [bias.q_seqinfo.seqstart, bias.k_seqinfo.seqstart, bias.k_seqinfo.seqlen]
        tensors += [bias.block_tables] if hasattr(bias, "block_tables") else []
        if any(t.device != q.device for t in tensors):
            raise InputError(
                f"{kind}'s tensors are on {sorted({str(t.device) for t in tensors})} but query is on "
                f"{q.device}; move the bias with attn_bias.to(query.device) (or build it with device=...)"
            )


def _validate_paged(inp: Any, bias: Any) -> None:
    """The cache holds whole pages, and every page id of the table (its largest, kept by the bias) is one."""
    k, kind, page_size = inp.key, type(bias).__name__, bias.page_size
    if k.shape[1] % page_size:
        raise InputError(
            f"{kind}: key.shape[1]={k.shape[1]} is not a multiple of page_size={page_size} "
            f"({_describe('key', k)}); the paged cache must hold whole pages [1, num_pages * page_size, ...]"
        )
    if bias._max_page >= k.shape[1] // page_size:
        raise InputError(
            f"{kind}: block_tables refers to page {bias._max_page} but the cache holds "
            f"{k.shape[1] // page_size} pages of {page_size} keys (key.shape[1]={k.shape[1]}); fix block_tables "
            f"or pass a cache of at least {(bias._max_page + 1) * page_size} keys"
        )
