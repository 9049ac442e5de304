"""FLOP formulas for triformers' attention operators: masked attention counts only the pairs its mask allows.

torch's ``FlopCounterMode`` counts matrix products (mm, bmm, convolutions, SDPA); it counts torch's attention
kernels as if every (query, key) pair were computed, causal or not, and it does not know our custom ops. Here
attention is counted from the mask's description in ``triformers.ops.fmha._mask``: the pairs ``(i, j)`` a
bias allows (causal: the lower triangle with its diagonal; local: the band; block-diagonal: the blocks;
KV caches: each sequence's keys; block-sparse: the pairs in the allowed blocks), summed over batch and query
heads, ``P``. Then, with head dims ``K`` (query/key) and ``Kv`` (value)::

    forward  = 2 P K  (Q K^T)  +  2 P Kv  (P V)                              = 2 P (K + Kv)
    backward = 2 P K  (S recomputed)  +  2 P Kv (dP = dO V^T)  +  2 P Kv (dV = P^T dO)
             + 2 P K  (dQ = dS K)  +  2 P K  (dK = dS^T Q)                     = 2 P (3 K + 2 Kv)

(the backward is 5/2 of the forward when ``K == Kv``, torch's and xFormers' convention). Softmax, scaling
and dropout are elementwise and, as everywhere in ``FlopCounterMode``, not counted. A tensor bias is data,
not structure: every pair it covers is counted (an additive ``-inf`` is still computed by the kernels).

Formulas are registered for

- ``triformers::flash_fwd`` / ``triformers::flash_bwd`` (the Triton kernels; eager calls run these custom ops
  whenever a dispatch mode such as ``FlopCounterMode`` is active) and ``triformers::merge_attentions``, in
  torch's global registry when this module is imported, so a plain ``FlopCounterMode()`` counts them;
- torch's SDPA kernels (CPU flash, CUDA flash / memory-efficient / cuDNN, forward and backward), which our
  ``fmha.sdpa`` operator runs, in :func:`flop_formulas`: pass it as
  ``FlopCounterMode(custom_mapping=flop_formulas())`` to count causal SDPA over its allowed pairs (torch's own
  formulas count the full square and have none for the CPU kernel).

Operators whose work is not one op a dispatch mode sees (``fmha.chunked``'s tile loop, the split-K Triton
launches) are counted by the profiler from their :class:`~triformers.ops.fmha.common.Inputs` with
:func:`inputs_attention_flops` (:mod:`triformers.profiler.op_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

from triformers.ops.fmha._mask import BlockSparseSpec, MaskSpec, mask_spec

# The kernels' "no window bound" value (``ops.fmha._triton.launch.NO_WINDOW``): flash_fwd/flash_bwd take
# window bounds as ints.
NO_WINDOW = -1


def pairs_in_block(nq: int, nk: int, offset: int, window_left: int | None, window_right: int | None) -> int:
    """Pairs of a ``nq x nk`` block that ``i + offset - window_left <= j <= i + offset + window_right`` allows."""
    if nq <= 0 or nk <= 0:
        return 0
    if window_left is None and window_right is None:
        return nq * nk
    i = np.arange(nq, dtype=np.int64) + offset
    lo = np.zeros(nq, dtype=np.int64) if window_left is None else np.maximum(i - window_left, 0)
    hi = np.full(nq, nk - 1, dtype=np.int64) if window_right is None else np.minimum(i + window_right, nk - 1)
    return int(np.maximum(hi - lo + 1, 0).sum())


def block_sparse_pairs(spec: MaskSpec, Mq: int, Mkv: int, heads: int) -> int:
    """Allowed pairs of a block-sparse spec, summed over ``heads`` heads: per query row and key block the keys
    the window keeps, summed per block row, times the layout (no ``[Mq, Mkv]`` mask is built)."""
    sparse = spec.block_sparse
    bq, bk = sparse.block_q, sparse.block_k
    layout = sparse.layout.to(device="cpu", dtype=torch.int64).numpy()  # [Hl, nqb, nkb]
    i = np.arange(Mq, dtype=np.int64)[:, None]
    lo = np.arange(layout.shape[2], dtype=np.int64)[None, :] * bk  # first key of each key block
    hi = np.minimum(lo + bk, Mkv) - 1
    if spec.window_right is not None:
        hi = np.minimum(hi, i + spec.window_right)
    if spec.window_left is not None:
        lo = np.maximum(lo, i - spec.window_left)
    per_row = np.broadcast_to(np.maximum(hi - lo + 1, 0), (Mq, layout.shape[2]))  # [Mq, nkb]
    per_block = np.add.reduceat(per_row, np.arange(0, Mq, bq), axis=0) if Mq else per_row[:0]  # [nqb, nkb]
    pairs = int((layout[:, : per_block.shape[0]] * per_block[None]).sum())
    return pairs * heads if layout.shape[0] == 1 else pairs


def allowed_pairs(spec: MaskSpec, Mq: int, Mkv: int, heads: int = 1) -> int:
    """Allowed (query, key) pairs of one batch element, summed over ``heads`` heads: the sum over ``spec``'s
    blocks (a dense spec has one block, ``Mq x Mkv``; block-diagonal ones one per packed sequence), or over the
    allowed blocks of a block-sparse spec."""
    if spec.block_sparse is not None:
        return block_sparse_pairs(spec, Mq, Mkv, heads)
    return heads * sum(
        pairs_in_block(q_len, k_len, offset, spec.window_left, spec.window_right)
        for _, q_len, _, k_len, offset in spec.blocks(Mq, Mkv)
    )


def attention_flops(pairs: int, K: int, Kv: int, backward: bool = False) -> int:
    """FLOPs of attention over ``pairs`` (query, key) pairs (summed over batch and heads); see the module doc."""
    return 2 * pairs * (3 * K + 2 * Kv) if backward else 2 * pairs * (K + Kv)


def _heads(q: torch.Tensor) -> int:
    """Query heads of a BMHK / BMGHK tensor (1 for BMK)."""
    return math.prod(q.shape[2:-1])


def inputs_attention_flops(inp, backward: bool = False) -> int:
    """FLOPs of attention on :class:`~triformers.ops.fmha.common.Inputs` (BMK, BMHK or BMGHK) over the pairs
    their bias allows; K/V given as int32 (a quantized cache) have the query's head dim."""
    q, k, v = inp.query, inp.key, inp.value
    quantized = k.dtype == torch.int32
    pairs = q.shape[0] * allowed_pairs(mask_spec(inp.attn_bias), q.shape[1], k.shape[1], _heads(q))
    return attention_flops(pairs, q.shape[-1], q.shape[-1] if quantized else v.shape[-1], backward)


# ---------------------------------------------------------------------------------------------------------
# Custom ops of the Triton kernels: the mask comes as the kernels' arguments (``launch.MaskArgs``)
# ---------------------------------------------------------------------------------------------------------


def _bind(packet, args: tuple, kwargs: dict) -> dict:
    """The op's arguments by name, defaults filled in (a dispatch mode may receive trailing defaults omitted)."""
    schema = packet.default._schema
    bound = {}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    for a, value in zip(positional, args):
        bound[a.name] = value
    bound.update(kwargs)
    for a in schema.arguments:
        if a.name not in bound and a.has_default_value():
            bound[a.name] = a.default_value
    return bound


def kernel_mask_spec(a: dict) -> MaskSpec:
    """The :class:`MaskSpec` of ``flash_fwd`` / ``flash_bwd`` arguments (names as in their schemas).

    Packed sequences come as device arrays: ``seq_q`` (query block bounds), ``k_start`` (None: every block's
    keys start at 0) and ``k_len``, which holds *end* offsets when a paged bias has starts (paged gappy keys); a
    block-sparse mask as ``bs_layout`` with ``bs_block_q`` / ``bs_block_k`` (absent from older schemas).
    """
    window_left = None if a["window_left"] == NO_WINDOW else int(a["window_left"])
    window_right = None if a["window_right"] == NO_WINDOW else int(a["window_right"])
    if a.get("bs_layout") is not None:  # a block-sparse mask: its layout and block sizes
        sparse = BlockSparseSpec(a["bs_layout"], int(a["bs_block_q"]), int(a["bs_block_k"]))
        return MaskSpec(bottom_right=bool(a["bottom_right"]), window_left=window_left, window_right=window_right,
                        block_sparse=sparse)  # fmt: skip
    if a["seq_q"] is None:
        return MaskSpec(bottom_right=bool(a["bottom_right"]), window_left=window_left, window_right=window_right)
    q_starts = a["seq_q"].tolist()
    nb = len(q_starts) - 1
    lens = a["k_len"].tolist()[:nb]
    starts = [0] * nb if a["k_start"] is None else a["k_start"].tolist()[:nb]
    if a.get("block_tables") is not None and a["k_start"] is not None:
        lens = [end - start for start, end in zip(starts, lens)]
    return MaskSpec(
        q_starts=tuple(q_starts),
        k_starts=tuple(starts),
        k_lens=tuple(lens),
        bottom_right=bool(a["bottom_right"]),
        window_left=window_left,
        window_right=window_right,
    )


def _kernel_pairs(a: dict) -> int:
    q, k = a["q"], a["k"]
    return q.shape[0] * allowed_pairs(kernel_mask_spec(a), q.shape[1], k.shape[1], _heads(q))


def _flash_fwd_flop(*args, out_val=None, **kwargs) -> int:
    a = _bind(torch.ops.triformers.flash_fwd, args, kwargs)
    return attention_flops(_kernel_pairs(a), a["q"].shape[-1], a["v"].shape[-1])


def _flash_bwd_flop(*args, out_val=None, **kwargs) -> int:
    a = _bind(torch.ops.triformers.flash_bwd, args, kwargs)
    return attention_flops(_kernel_pairs(a), a["q"].shape[-1], a["v"].shape[-1], backward=True)


def _merge_flop(attn, lse, out_dtype=None, *, out_val=None) -> int:
    """The weighted sum of the parts: a multiply and an add per part and output element."""
    return 2 * len(attn) * attn[0].numel()


# ---------------------------------------------------------------------------------------------------------
# torch's SDPA kernels ([B, H, M, K] layout; ``is_causal`` is top-left, torch's convention)
# ---------------------------------------------------------------------------------------------------------


def _sdpa_pairs(q: torch.Tensor, k: torch.Tensor, is_causal: bool, mask: torch.Tensor | None) -> int:
    B, Hq, Mq, _ = q.shape
    Mkv = k.shape[-2]
    if mask is not None and mask.dtype == torch.bool:  # a boolean mask is structure: count what it allows
        return int(torch.broadcast_to(mask, (B, Hq, Mq, Mkv)).sum())
    spec = MaskSpec(window_right=0) if is_causal else MaskSpec()
    return B * allowed_pairs(spec, Mq, Mkv, Hq)


def _sdpa_formula(packet, backward: bool) -> Callable[..., int]:
    def formula(*args, out_val=None, **kwargs) -> int:
        a = _bind(packet, args, kwargs)
        mask = a.get("attn_mask", a.get("attn_bias"))
        pairs = _sdpa_pairs(a["query"], a["key"], bool(a.get("is_causal", False)), mask)
        return attention_flops(pairs, a["query"].shape[-1], a["value"].shape[-1], backward)

    formula._get_raw = True  # FlopCounterMode passes tensors, not shapes
    formula.__name__ = f"{packet.__name__}_flop"
    return formula


_SDPA_OPS = {  # forward op -> its backward
    "_scaled_dot_product_flash_attention_for_cpu": "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_flash_attention": "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention": "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention": "_scaled_dot_product_cudnn_attention_backward",
}


def _sdpa_formulas() -> dict:
    formulas = {}
    for fw, bw in _SDPA_OPS.items():
        for name, backward in ((fw, False), (bw, True)):
            packet = getattr(torch.ops.aten, name, None)
            if packet is not None:  # every one exists in torch >= 2.5; older versions miss some
                formulas[packet] = _sdpa_formula(packet, backward)
    return formulas


def _custom_op_formulas() -> dict:
    import triformers.ops  # noqa: F401  (defines the custom ops)

    formulas = {
        torch.ops.triformers.flash_fwd: _flash_fwd_flop,
        torch.ops.triformers.flash_bwd: _flash_bwd_flop,
        torch.ops.triformers.merge_attentions: _merge_flop,
    }
    for formula in formulas.values():
        formula._get_raw = True
    return formulas


def flop_formulas() -> dict:
    """Every formula of this module, keyed by op, for ``FlopCounterMode(custom_mapping=flop_formulas())``:
    our custom ops and torch's SDPA kernels counted over the pairs their masks allow."""
    return {**_custom_op_formulas(), **_sdpa_formulas()}


def register_custom_op_formulas() -> None:
    """Adds the custom ops' formulas to torch's global registry (once; done on import)."""
    for packet, formula in _custom_op_formulas().items():
        if packet not in flop_registry:
            register_flop_formula(packet, get_raw=True)(formula)


register_custom_op_formulas()
