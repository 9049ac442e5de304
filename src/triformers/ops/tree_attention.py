"""Tree attention for speculative decoding (xFormers' ``xformers.ops.tree_attention``): Medusa / EAGLE draft trees.

A draft tree of ``tree_size`` tokens (node 0, the root, is the last accepted token) is verified in one step:
every node attends to its sequence's KV cache and, in the tree, to itself and its ancestors::

    out = merge_attentions([attention(q, cache, prefix_attn_bias),    # the prefix: split-K over the cache
                            attention(q, spec, spec_attn_bias)])      # the suffix: the tree's own tokens

Both parts are partial attentions (float32 outputs and their log-sum-exps) that ``merge_attentions`` combines
exactly; the prefix packs the ``B`` sequences along M under a KV-cache bias (padded, gappy or paged keys), the
suffix reads the ``[tree_size_q, tree_size_kv]`` tree mask broadcast (stride 0) over batch and heads. Caches may
be int4 or fp8 (:mod:`~triformers.ops.fmha.quantize`), dequantized in the split-K kernel. Unlike xFormers', the
result is differentiable with float caches (the parts and the merge have backwards), inputs are checked with
ValueErrors that name the argument and the fix, and where split-K cannot run (the CPU without Triton's
interpreter) the dispatcher's operator does.

CUDA graphs: biases are built once (:class:`TreeAttnMetadata` for the tree, ``from_seqlens`` for the cache, whose
lengths are then updated in place in ``k_seqinfo.seqlen``). With the prefix on split-K the call makes no host sync
and replays with the new lengths. The prefixes :func:`select_prefix_op` leaves to the dispatcher (``B < 64`` and
not :func:`use_triton_splitk_for_prefix`: ``B * G > 128``, or most trees of more than 64 nodes) run on
``fmha.triton``, which reads the lengths on the host: pass ``prefix_op=triton_splitk.FwOp`` to capture those.
"""

from __future__ import annotations

import functools

import torch

from triformers.ops import fmha
from triformers.ops._tree_metadata import (  # noqa: F401  (re-exported)
    TreeAttnMetadata,
    _cached_metadata,
    _sorted_choices,
    construct_full_tree_choices,
    construct_tree_choices,
    get_full_tree_size,
)
from triformers.ops.fmha import dispatch, quantize, triton_splitk
from triformers.ops.fmha import triton as triton_op
from triformers.ops.fmha._mask import KV_CACHE_BIAS_TYPES, PAGED_BIAS_TYPES
from triformers.ops.fmha.attn_bias import AttentionBias
from triformers.ops.fmha.common import AttentionFwOpBase, Inputs
from triformers.triton._common import warn_once

__all__ = [
    "TreeAttnMetadata",
    "tree_attention",
    "construct_full_tree_choices",
    "construct_tree_choices",
    "get_full_tree_size",
    "use_triton_splitk_for_prefix",
    "select_prefix_op",
    "SplitKAutotune",
]

# xFormers' select_prefix_op runs FlashAttention-3 on the prefix from this batch size (its split-KV path); split-K
# is our operator for those shapes.
FA3_MIN_BATCH = 64
FP8_BYTE_DTYPES = (torch.uint8, torch.float8_e4m3fn)  # an fp8 cache given as bytes [..., D] (xFormers: uint8)

# ---------------------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------------------


class SplitKAutotune(triton_splitk.FwOp):
    """The split-K operator with ``AUTOTUNE`` set (read by the operator where it autotunes its launches)."""

    AUTOTUNE = True


def use_triton_splitk_for_prefix(B: int, G: int, tree_size: int) -> bool:
    """xFormers' rule for split-K on the prefix (vs. FlashAttention): few sequences x groups, or small trees."""
    return (B * G <= 128 and tree_size <= 64) or (B * G < 4 and tree_size < 100) or B * G < 2


def select_prefix_op(
    B: int,
    G: int,
    tree_size: int,
    autotune: bool,
    attn_bias: AttentionBias,
    kv_cache_dtype: torch.dtype,
) -> type[AttentionFwOpBase] | None:
    """The prefix operator: split-K wherever xFormers runs split-K or FlashAttention-3 (ROCm, biases the
    FlashAttention operators lack, quantized caches, ``B >= FA3_MIN_BATCH``, :func:`use_triton_splitk_for_prefix`);
    else None, the dispatcher's choice. ``autotune`` picks :class:`SplitKAutotune`."""
    splitk = SplitKAutotune if autotune else triton_splitk.FwOp
    quantized = kv_cache_dtype == torch.int32 or kv_cache_dtype in FP8_BYTE_DTYPES
    if torch.version.hip or type(attn_bias) not in triton_op.FwOp.SUPPORTED_ATTN_BIAS_TYPES or quantized:
        return splitk
    if B >= FA3_MIN_BATCH or use_triton_splitk_for_prefix(B, G, tree_size):
        return splitk
    return None


@functools.cache
def _int4_variant(op: type[triton_splitk.FwOp], groups: int) -> type[triton_splitk.FwOp]:
    return type(f"{op.__name__}_G{groups}", (op,), {"NUM_GROUPS": groups, "NAME": f"{op.NAME}_g{groups}"})


def _or_dispatcher(op: type[AttentionFwOpBase], inp: Inputs, part: str) -> type[AttentionFwOpBase] | None:
    """``op`` (a default choice) if it runs ``inp``, else None: the dispatcher's operator (on the CPU without
    Triton's interpreter, the CPU operator; on CUDA with a warning naming the reasons)."""
    try:
        dispatch.ensure_op_supports("tree_attention", op, inp, needs_lse=True)
    except ValueError as e:
        if inp.query.device.type == "cuda":
            warn_once(f"tree_attention: {op.NAME} cannot run the {part}, the dispatcher chooses instead. {e}")
        return None
    return op


# ---------------------------------------------------------------------------------------------------------
# tree_attention
# ---------------------------------------------------------------------------------------------------------


def _desc(name: str, x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{name}.shape={tuple(x.shape)} ({x.dtype})"
    return f"{name} is {type(x).__name__}"


def _check_shapes(q, spec_k, spec_v, cache_k, cache_v, spec_attn_bias) -> None:
    named = {"q": q, "spec_k": spec_k, "spec_v": spec_v, "cache_k": cache_k, "cache_v": cache_v}
    if (
        not all(isinstance(x, torch.Tensor) for x in named.values())
        or q.ndim not in (4, 5)
        or any(x.ndim != q.ndim for x in named.values())
    ):
        raise ValueError(
            "tree_attention takes q, spec_k, spec_v, cache_k, cache_v all BMHK [B, M, H, D] or all BMGHK "
            f"[B, M, G, H, D]: {', '.join(_desc(n, x) for n, x in named.items())}"
        )
    if not isinstance(spec_attn_bias, torch.Tensor) or spec_attn_bias.ndim != 2:
        raise ValueError(
            "spec_attn_bias must be the [tree_size_q, tree_size_kv] tree mask, "
            f"{_desc('spec_attn_bias', spec_attn_bias)}; pass TreeAttnMetadata.from_tree_choices(choices, "
            "q.dtype, q.device).attention_bias (its last tree_size_q rows for fewer queries than tree nodes)"
        )
    float_cache = cache_k.is_floating_point() and cache_k.dtype not in FP8_BYTE_DTYPES
    cache_dtype = q.dtype if float_cache else cache_k.dtype
    for name, x, dtype in (
        ("spec_k", spec_k, q.dtype),
        ("spec_v", spec_v, q.dtype),
        ("cache_k", cache_k, cache_dtype),
        ("cache_v", cache_v, cache_dtype),
        ("spec_attn_bias", spec_attn_bias, q.dtype),
    ):
        if x.device != q.device or x.dtype != dtype:
            raise ValueError(
                f"{name} is {x.dtype} on {x.device}, expected {dtype} on {q.device} (q is {q.dtype}); a cache is "
                "either of q's dtype or quantized (int32 int4/fp8 words, fp8 bytes), the same for cache_k and cache_v"
            )
    Tq, Tkv = spec_attn_bias.shape
    if not q.shape[1] == Tq <= Tkv:
        raise ValueError(
            f"spec_attn_bias.shape={tuple(spec_attn_bias.shape)} but q.shape={tuple(q.shape)}: the mask needs one row "
            "per query (q.shape[1]) and at least as many columns (tree nodes) as rows; take the last q.shape[1] "
            "rows of the tree's attention_bias"
        )
    want = (q.shape[0], Tkv, *q.shape[2:])
    for name in ("spec_k", "spec_v"):
        if tuple(named[name].shape) != want:
            raise ValueError(
                f"{name}.shape={tuple(named[name].shape)}, expected {want}: batch and heads of q, one token per "
                f"column of spec_attn_bias (shape {tuple(spec_attn_bias.shape)})"
            )
    if cache_k.shape != cache_v.shape or cache_k.shape[2:-1] != q.shape[2:-1]:
        raise ValueError(
            f"cache_k.shape={tuple(cache_k.shape)} and cache_v.shape={tuple(cache_v.shape)} must be equal, with the "
            f"heads of q (q.shape={tuple(q.shape)}); expand shared K/V heads with .expand() (no copy)"
        )
    if float_cache and cache_k.shape[-1] != q.shape[-1]:
        raise ValueError(f"cache_k.shape={tuple(cache_k.shape)} has another head dim than q.shape={tuple(q.shape)}")


def _check_prefix_bias(bias, B: int, Tq: int, cache_k: torch.Tensor) -> None:
    if type(bias) not in KV_CACHE_BIAS_TYPES:
        raise ValueError(
            f"prefix_attn_bias is {type(bias).__name__}; it must be a KV-cache bias over the B={B} sequences, e.g. "
            f"BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen=[{Tq}] * {B}, kv_padding=cache_k.shape[1], "
            "kv_seqlen=kv_lens) or its make_paged(...) version"
        )
    starts = bias.q_seqinfo.seqstart_py
    if list(starts) != list(range(0, (B + 1) * Tq, Tq)):
        lens = [b - a for a, b in zip(starts, starts[1:])]
        raise ValueError(
            f"prefix_attn_bias has query lengths {lens} but q holds B={B} sequences of tree_size_q={Tq} queries; "
            f"build it with q_seqlen=[{Tq}] * {B}"
        )
    paged = type(bias) in PAGED_BIAS_TYPES
    if cache_k.shape[0] != (1 if paged else B):
        raise ValueError(
            f"cache_k.shape={tuple(cache_k.shape)} with a {type(bias).__name__}: "
            + ("a paged cache is one row of pages [1, num_pages * page_size, ...]" if paged else f"expected B={B} rows")
        )
    padding = getattr(bias.k_seqinfo, "padding", None)
    if not paged and padding is not None and padding != cache_k.shape[1]:
        raise ValueError(
            f"prefix_attn_bias has kv_padding={padding} but cache_k.shape={tuple(cache_k.shape)} holds "
            f"{cache_k.shape[1]} keys per sequence; build the bias with kv_padding=cache_k.shape[1]"
        )


def _packed(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[B, M, ...]`` as ``[1, B * M, ...]`` without a copy (the cache is never copied)."""
    try:
        return x.view(1, x.shape[0] * x.shape[1], *x.shape[2:])
    except RuntimeError:
        raise ValueError(
            f"{name} (shape {tuple(x.shape)}, strides {x.stride()}) cannot be read as one sequence of "
            f"{x.shape[0] * x.shape[1]} keys without a copy; allocate the cache so that row b + 1 follows row b "
            "(one [B, Mk, ...] tensor, heads may be expanded)"
        ) from None


def _fp8_scales(scales, cache_k: torch.Tensor, bmhk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    want = tuple(cache_k.shape[:-1])
    ok = isinstance(scales, (tuple, list)) and len(scales) == 2
    if not ok or any(
        not isinstance(s, torch.Tensor) or (s.dtype, tuple(s.shape)) != (torch.int32, want) for s in scales
    ):
        got = [_desc("s", s) for s in scales] if isinstance(scales, (tuple, list)) else [type(scales).__name__]
        raise ValueError(
            f"quantized_kv_scales must be (k_scale_shift, v_scale_shift), int32 of cache_k.shape[:-1] = {want} "
            f"(fp16 scale | shift per token and head, as quantize_kv_fp8 returns them); got {got}"
        )
    return tuple(s.unsqueeze(2) if bmhk else s for s in scales)


def tree_attention(
    q: torch.Tensor,
    spec_k: torch.Tensor,
    spec_v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    spec_attn_bias: torch.Tensor,
    prefix_attn_bias: AttentionBias,
    prefix_op: type[AttentionFwOpBase] | None = None,
    suffix_op: type[AttentionFwOpBase] | None = None,
    autotune: bool = False,
    quantized_kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Medusa / EAGLE tree attention: each query over its sequence's cache and its tree ancestors.

    Shapes (BMHK, or BMGHK with G groups of H query heads)::

        q              [B, Tq, (G,) H, D]     the last Tq tree nodes (Tq <= Tkv: new nodes of a growing tree)
        spec_k, spec_v [B, Tkv, (G,) H, D]    the tree's tokens; K/V heads may be expanded (stride 0)
        cache_k/_v     [B, Mk, (G,) H, D]     ([1, num_pages * page_size, ...] with a paged prefix_attn_bias)
        spec_attn_bias [Tq, Tkv]              TreeAttnMetadata.attention_bias[-Tq:] (bottom-right aligned)
        -> out         [B, Tq, (G,) H, D]     in q.dtype

    Quantized caches: int32 without ``quantized_kv_scales`` is int4 (``quantize_kv_int4``: last dim ``D // 8 +
    num_groups``); with them it is fp8, as int32 words (``quantize_kv_fp8``: ``D // 4``) or as bytes (uint8 or
    float8_e4m3fn: ``D``), the scales int32 of ``cache_k.shape[:-1]``.

    Example (biases built once; before each step update ``prefix_attn_bias.k_seqinfo.seqlen`` in place)::

        meta = TreeAttnMetadata.from_tree_choices(choices, q.dtype, q.device)
        prefix = BlockDiagonalPaddedKeysMask.from_seqlens([tree_size] * B, kv_padding=Mk, kv_seqlen=kv_lens)
        out = tree_attention(q, spec_k, spec_v, cache_k, cache_v, meta.attention_bias, prefix)

    Args:
        q, spec_k, spec_v, cache_k, cache_v, spec_attn_bias: see the shapes above.
        prefix_attn_bias: a KV-cache bias over the ``B`` sequences of ``Tq`` queries: padded
            (``kv_padding = Mk``), gappy or paged keys (``BlockDiagonalPaddedKeysMask``, ``make_paged``, ...).
        prefix_op: operator of the prefix; default :func:`select_prefix_op` (split-K where it can run the inputs,
            else the dispatcher's choice; see the module docstring for CUDA graphs).
        suffix_op: operator of the suffix; default split-K if it takes a tensor bias and these inputs, else the
            dispatcher's operator for a tensor bias.
        autotune: use :class:`SplitKAutotune` where split-K is chosen by default.
        quantized_kv_scales: ``(k_scale_shift, v_scale_shift)`` of an fp8 cache.

    Returns:
        ``[B, Tq, (G,) H, D]`` in ``q.dtype``.

    Raises:
        ValueError: shapes, biases or scales that do not fit together (the message names the argument and the
            fix); an operator given that cannot run its part; gradients asked through a quantized cache.
        NotImplementedError: no operator runs a part (each operator's reasons are listed).
    """
    bmhk = q.ndim == 4
    _check_shapes(q, spec_k, spec_v, cache_k, cache_v, spec_attn_bias)
    B, Tq = q.shape[:2]
    Tkv = spec_attn_bias.shape[1]
    _check_prefix_bias(prefix_attn_bias, B, Tq, cache_k)
    scales = None
    if quantized_kv_scales is not None:
        if cache_k.dtype not in (torch.int32, *FP8_BYTE_DTYPES):
            raise ValueError(
                f"quantized_kv_scales are given but cache_k.dtype={cache_k.dtype}; they go with an fp8 cache "
                "(int32 words from quantize_kv_fp8, or uint8 / float8_e4m3fn bytes)"
            )
        scales = _fp8_scales(quantized_kv_scales, cache_k, bmhk)
    elif cache_k.dtype in FP8_BYTE_DTYPES:
        raise ValueError(f"cache_k.dtype={cache_k.dtype} is an fp8 cache: pass its quantized_kv_scales")
    quantized = cache_k.dtype == torch.int32 or scales is not None
    if quantized and torch.is_grad_enabled() and any(x.requires_grad for x in (q, spec_k, spec_v)):
        raise ValueError(
            "tree_attention has no gradient through a quantized cache, but q/spec_k/spec_v require grad; call it "
            "under torch.no_grad() or with the dequantized cache"
        )
    if autotune and not hasattr(triton_splitk.FwOp, "AUTOTUNE"):
        warn_once("tree_attention(autotune=True): triton_splitk does not autotune; it runs its launch table")
    if bmhk:
        q, spec_k, spec_v, cache_k, cache_v = (x.unsqueeze(2) for x in (q, spec_k, spec_v, cache_k, cache_v))
    G, H, D = q.shape[2:]
    if cache_k.dtype in FP8_BYTE_DTYPES:  # 4 bytes per int32 word: the split-K kernel's fp8 layout
        cache_k, cache_v = cache_k.view(torch.int32), cache_v.view(torch.int32)

    # prefix: the B sequences packed along M under prefix_attn_bias
    q_packed = q.reshape(1, B * Tq, G, H, D)
    k_packed, v_packed = _packed(cache_k, "cache_k"), _packed(cache_v, "cache_v")
    if scales is None:
        inp = Inputs(q_packed, k_packed, v_packed, prefix_attn_bias, is_partial=True)
    else:
        k_s, v_s = (_packed(s, name) for s, name in zip(scales, ("k_scale_shift", "v_scale_shift")))
        inp = triton_splitk.InputsFp8(
            q_packed,
            k_packed,
            v_packed,
            prefix_attn_bias,
            is_partial=True,
            k_fp8_scale_shift=k_s,
            v_fp8_scale_shift=v_s,
        )
    inp.validate_inputs()
    if prefix_op is None:
        prefix_op = select_prefix_op(B, G, Tkv, autotune, prefix_attn_bias, cache_k.dtype)
        if prefix_op is not None:
            int4 = cache_k.dtype == torch.int32 and scales is None
            groups = k_packed.shape[-1] - D // 8 if int4 else 1  # scale words per int4 row
            if groups != prefix_op.NUM_GROUPS and groups in quantize.INT4_GROUPS:
                prefix_op = _int4_variant(prefix_op, groups)
            prefix_op = _or_dispatcher(prefix_op, inp, "prefix (over the cache)")
    if scales is None:
        out_prefix, lse_prefix = fmha.memory_efficient_attention_partial(
            q_packed, k_packed, v_packed, attn_bias=prefix_attn_bias, op=prefix_op
        )
    else:  # fp8 scales travel in InputsFp8, which memory_efficient_attention_partial does not take
        out_prefix, ctx = fmha._forward(inp, prefix_op, "tree_attention", True)
        lse_prefix = ctx.lse
    out_prefix = out_prefix.reshape(B, Tq, G, H, D)
    lse_prefix = lse_prefix.reshape(G, H, B, Tq).permute(2, 0, 1, 3)  # packed [1, G, H, B * Tq] -> [B, G, H, Tq]

    # suffix: the tree's tokens under the tree mask, broadcast over batch and heads
    spec_bias = spec_attn_bias.expand(B, G, H, Tq, Tkv)
    if suffix_op is None:
        splitk = SplitKAutotune if autotune else triton_splitk.FwOp
        if torch.Tensor in splitk.SUPPORTED_ATTN_BIAS_TYPES:
            suffix_inp = Inputs(q, spec_k, spec_v, spec_bias, is_partial=True)
            suffix_inp.validate_inputs()
            suffix_op = _or_dispatcher(splitk, suffix_inp, "suffix (over the tree)")
    out_suffix, lse_suffix = fmha.memory_efficient_attention_partial(q, spec_k, spec_v, spec_bias, op=suffix_op)

    out, _ = fmha.merge_attentions([out_prefix, out_suffix], [lse_prefix, lse_suffix], output_dtype=q.dtype)
    return out.squeeze(2) if bmhk else out
