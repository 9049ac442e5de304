"""Choosing an operator: a pure function of the inputs, evaluated at every call.

Each operator says why it cannot run some inputs (``not_supported_reasons``); the dispatcher walks a
priority list built from the inputs and takes the first operator with no reason. When none fits, the
``NotImplementedError`` lists every operator's reasons. ``TRIFORMERS_FMHA_OP=<name>`` (``chunked``,
``sdpa``, ``triton``, or an operator's NAME such as ``chunkedF``) forces one operator family; if it cannot
run the inputs the call raises ``ValueError`` with its reasons.

Priority rules
--------------
CPU (measured with ``python -m triformers.benchmarks.fmha_cpu``, fp32, 2 threads, B=1, H=8, K=64; the
records are in ``benchmarks/results/cpu/fmha_cpu.json`` and the README):

1. ``sdpa`` first whenever it can run the inputs: torch's fused CPU flash kernel (no mask, top-left causal
   with Mq == Mkv, tensor biases without gradient, GQA) beat ``chunked`` on every dense, bias and GQA
   record, forward (1.5x to 2.7x) and forward+backward (1.5x to 2.8x). Block-diagonal masks run as one SDPA
   call per block; without gradients that won at every block size measured (1.9x to 2.8x, 32 to 1024
   queries per block).
2. With gradients, block-diagonal masks whose blocks average fewer than ``CPU_SDPA_MIN_BLOCK_GRAD``
   queries go to ``chunked`` first: per-block autograd graphs made SDPA 1.2x (128-query blocks) to 3.7x
   (32-query blocks) slower there.
3. With gradients, float16/bfloat16 inputs whose longest query block spans so many query blocks of torch's
   CPU backward kernel that rounding dK and dV once per block (torch adds each block's share into the
   half-precision gradients) can exceed xFormers' backward tolerance go to ``chunked`` first, which
   accumulates in float32: ``sdpa.half_backward_reasons`` has the rule (n blocks * unit roundoff > rtol:
   above 6400 queries in bfloat16, 10240 in float16, whatever Mkv) and the measurements.
4. ``chunked`` for everything else: bottom-right and local masks, dropout, bias gradients, and the KV-cache
   biases (padded, gappy, paged keys), which SDPA cannot express (``chunked`` alone is tried for those). The
   low-level API (which needs the lse) takes ``sdpa`` too: it computes the lse in a separate pass over the
   scores (a matmul per chunk of queries); with it, the forward still took 0.6x the time of ``chunked``'s
   (fp32, B=1, M=1024, H=8, K=64, 2 threads).

CUDA (measured with ``python -m triformers.benchmarks.fmha`` on an H100, bf16; records in
``benchmarks/results/h100/fmha.json``):

1. Dense inputs SDPA expresses (no bias, top-left causal with Mq == Mkv, GQA), without dropout: ``sdpa``
   first, with torch's cuDNN kernel put first in SDPA's priority order. cuDNN was faster than our Triton
   kernel on every dense record (forward 1.2x to 2.7x, forward+backward 1.2x to 2.6x).
2. Everything else: ``triton`` first, then ``sdpa`` where it expresses the inputs, then ``chunked``. For
   packed sequences the single Triton launch beat one SDPA call per document (forward 1.05x to 1.1x over
   cuDNN per document, forward+backward 1.2x to 1.6x); sliding windows and padded keys have no SDPA
   equivalent but a materialized mask. Tensor biases stay on Triton: cuDNN's forward was 1.2x faster at
   N = 2048 but it has no backward for a bias that requires grad (the memory-efficient backend's was on a
   par with ours, 99 vs 94 TFLOP/s).
3. KV-cache biases (padded, gappy, paged keys): ``triton``, then ``chunked`` (SDPA cannot express them).
   The backward of a paged bias (and of overlapping gappy segments) runs on ``chunked``, with a warning
   the first time.
4. Decoding without gradients (:func:`is_decoding`: at most ``SPLITK_MAX_Q`` queries per sequence, at least
   ``SPLITK_MIN_KEYS`` keys per sequence): ``triton_splitk`` first (flash-decoding: the keys of a sequence
   split among programs, GQA heads sharing one K/V read), then the list above; not under ``torch.compile``
   (split-K is not a custom op: the list above traces without graph breaks).

Quantized KV caches (int32 key/value, ``ops.fmha.quantize``) run on ``triton_splitk`` (CUDA, and the CPU under
Triton's interpreter), whatever the shapes, else on ``chunked`` (which dequantizes each key chunk as it reads
it; on CUDA with a warning the first time, as a slow path).
"""

from __future__ import annotations

import os
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from triformers.ops.common import InputError
from triformers.ops.fmha import _registry, chunked, sdpa
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._dispatch_key import fw_cache_key
from triformers.ops.fmha._mask import KV_CACHE_BIAS_TYPES
from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, AttentionOp, AttentionOpBase, Inputs

# Smallest average block (queries per block) for which per-block SDPA with autograd beat the chunked
# operator on the CPU (fp32, H = 8, K = 64, 4096 tokens): at 128 it was 1.2x slower, at 256 1.6x faster.
CPU_SDPA_MIN_BLOCK_GRAD = 256

# Decoding shapes for the split-K operator (rule 4), from `python scripts/tune_splitk.py --crossover` on an H200
# (bf16, Hq = 32, Hkv = 8, D = 128, causal from the bottom right): split-K was faster than fmha.triton at every
# Mq <= 8 queries per sequence, e.g. (B, L) = (1, 32768): 90 vs 337 us at Mq = 1, 129 vs 338 at Mq = 8;
# (8, 8192): 110 vs 138 at Mq = 8, a tie at 16 (137.9 vs 137.8), slower from 32; (64, 2048): 195 vs 306 at
# Mq = 8, 242 vs 308 at 16, slower from 32. In the decoding benchmark at Mq = 16 (benchmarks/results/h200/
# decode.json, commit 1ed3cd2, CUDA graphs) split-K led at all five (B, L): 262 vs 1345 us at (1, 131072), 265 vs
# 353 at (4, 32768), 271 vs 278 at (16, 8192), 288 vs 301 at (64, 2048), 311 vs 401 at (256, 512); hence 16.
# SPLITK_MIN_KEYS: below it a sequence's keys fit a few tiles of the FlashAttention kernel (not measured: the
# split-K kernel needs a split of at least 256 keys to split).
SPLITK_MAX_Q = 16
SPLITK_MIN_KEYS = 256

# The operator modules register themselves into _registry (triton.py, triton_splitk.py); this module reads it.
register_family = _registry.register_family
register_family("chunked", chunked.FwOp, chunked.BwOp)
register_family("sdpa", sdpa.FwOp, sdpa.BwOp)


def forced_ops() -> tuple[type[AttentionFwOpBase], type[AttentionBwOpBase]] | None:
    """The operator pair forced by ``TRIFORMERS_FMHA_OP``, or None."""
    name = os.environ.get("TRIFORMERS_FMHA_OP", "").strip()
    if not name or name == "auto":
        return None
    families = _registry.families()
    for family, (fw, bw) in families.items():
        if name in (family, fw.NAME, bw.NAME):
            return fw, bw
    raise ValueError(
        f"TRIFORMERS_FMHA_OP={name!r} names no operator; choose one of "
        f"{sorted(families)} or 'auto'"
    )


def _avg_block(bias) -> float:
    n = len(bias.q_seqinfo.seqstart_py) - 1
    return bias.q_seqinfo.seqstart_py[-1] / max(n, 1)


def _cpu_priority(inp: Inputs, needs_gradient: bool) -> list[type[AttentionFwOpBase]]:
    bias = inp.attn_bias
    if type(bias) in KV_CACHE_BIAS_TYPES:
        return [chunked.FwOp]
    if needs_gradient and isinstance(bias, ab.BlockDiagonalMask) and _avg_block(bias) < CPU_SDPA_MIN_BLOCK_GRAD:
        return [chunked.FwOp, sdpa.FwOp]
    if needs_gradient and sdpa.half_backward_reasons(inp):  # rule 3: torch's half-precision dK/dV round per block
        return [chunked.FwOp, sdpa.FwOp]
    return [sdpa.FwOp, chunked.FwOp]


_CUDA_SDPA_FIRST = (type(None), ab.LowerTriangularMask, ab.LowerTriangularFromBottomRightMask)


def _cuda_priority(inp: Inputs) -> list[type[AttentionFwOpBase]]:
    pair = _registry.family("triton")
    triton_ops = [pair[0]] if pair is not None else []
    if type(inp.attn_bias) in KV_CACHE_BIAS_TYPES:
        return [*triton_ops, chunked.FwOp]
    if type(inp.attn_bias) in _CUDA_SDPA_FIRST and inp.p == 0.0:
        return [sdpa.FwOp, *triton_ops, chunked.FwOp]
    return [*triton_ops, sdpa.FwOp, chunked.FwOp]


def _splitk_op(inp: Inputs) -> type[AttentionFwOpBase] | None:
    """The split-K operator for ``inp`` (for an int4 cache, the one with its number of groups)."""
    return _registry.decoding_operator(inp)


def is_decoding(inp: Inputs) -> bool:
    """Few queries per sequence (``<= SPLITK_MAX_Q``) against many keys (``>= SPLITK_MIN_KEYS``), from shapes
    and the bias's fixed parameters only (longest query block, padding or block-table width)."""
    bias, q, k = inp.attn_bias, inp.query, inp.key
    if hasattr(bias, "q_seqinfo") and hasattr(bias, "k_seqinfo"):
        q_per_seq = bias.q_seqinfo.max_seqlen
        table = getattr(bias, "block_tables", None)
        keys = getattr(bias.k_seqinfo, "padding", None) or bias.k_seqinfo.max_seqlen
        if table is not None:
            keys = table.shape[1] * bias.page_size
    else:
        q_per_seq, keys = q.shape[1], k.shape[1]
    return q_per_seq <= SPLITK_MAX_Q and keys >= SPLITK_MIN_KEYS


def fw_priority_list(inp: Inputs, needs_gradient: bool) -> list[type[AttentionFwOpBase]]:
    """Forward operators to try, best first."""
    if inp.key.dtype == torch.int32:  # a quantized cache
        splitk = _splitk_op(inp)
        return ([splitk] if splitk is not None else []) + [chunked.FwOp]
    if inp.query.device.type == "cuda":
        # not while torch.compile traces: split-K is not a custom op, the operators below trace without breaks
        decode = not needs_gradient and is_decoding(inp) and not torch.compiler.is_compiling()
        splitk = _splitk_op(inp) if decode else None
        return ([splitk] if splitk is not None else []) + _cuda_priority(inp)
    if inp.query.device.type == "cpu":
        return _cpu_priority(inp, needs_gradient)
    return [chunked.FwOp]


def bw_priority_list(inp: Inputs) -> list[type[AttentionBwOpBase]]:
    """Backward operators to try, best first (they recompute from the lse, which SDPA does not give)."""
    ops: list[type[AttentionBwOpBase]] = []
    if inp.query.device.type == "cuda":
        pair = _registry.family("triton")
        if pair is not None:
            ops.append(pair[1])
    return ops + [chunked.BwOp, sdpa.BwOp]


def _format_inputs(inp: Inputs) -> str:
    def desc(x):
        return f"shape={tuple(x.shape)} ({x.dtype}, {x.device.type})" if isinstance(x, torch.Tensor) else repr(x)

    bias = inp.attn_bias
    bias_desc = f"{type(bias).__name__}" + (f" {desc(bias)}" if isinstance(bias, torch.Tensor) else "")
    return (
        f"     query       : {desc(inp.query)}\n"
        f"     key         : {desc(inp.key)}\n"
        f"     value       : {desc(inp.value)}\n"
        f"     attn_bias   : {bias_desc}\n"
        f"     p           : {inp.p}\n"
        f"     scale       : {inp.scale}"
    )


def _reasons_block(op: type[AttentionOpBase], reasons: Sequence[str]) -> str:
    lines = "\n".join(textwrap.indent(r, "    ") for r in reasons)
    return f"`{op.NAME}` is not supported because:\n{lines}"


def _reasons(op: type[AttentionOpBase], inp: Inputs, needs_lse: bool) -> list[str]:
    """``op``'s reasons, with those it cannot return the lse for when the call needs it (forward operators)."""
    reasons = op.not_supported_reasons(inp)
    if needs_lse and not reasons and hasattr(op, "lse_not_supported_reasons"):
        reasons = op.lse_not_supported_reasons(inp)
    return reasons


def run_priority_list(name: str, priority_list: Sequence[type[AttentionOpBase]], inp: Inputs, *,
                      needs_lse: bool = False) -> type[AttentionOpBase]:
    """The first operator that supports ``inp``; NotImplementedError with every reason otherwise."""
    blocks = []
    for op in priority_list:
        reasons = _reasons(op, inp, needs_lse)
        if not reasons:
            return op
        blocks.append(_reasons_block(op, reasons))
    raise NotImplementedError(
        f"No operator found for `{name}` with inputs:\n{_format_inputs(inp)}\n" + "\n".join(blocks)
    )


def ensure_op_supports(name: str, op: type[AttentionOpBase], inp: Inputs, *, needs_lse: bool = False) -> None:
    """Raises :class:`~triformers.ops.common.InputError` (a ValueError) with the reasons when an explicitly
    chosen ``op`` cannot run ``inp``."""
    key = fw_cache_key(inp, None, needs_lse)
    if key is not None and (op, key) in _SUPPORTED:
        return
    reasons = _reasons(op, inp, needs_lse)
    if reasons:
        raise InputError(
            f"Operator `{name}` does not support inputs:\n{_format_inputs(inp)}\n{_reasons_block(op, reasons)}"
        )
    if key is not None:
        if len(_SUPPORTED) >= _FW_CACHE_MAX:
            _SUPPORTED.clear()
        _SUPPORTED.add((op, key))


# Decisions of dispatch_fw (and checks of an explicitly chosen operator) for inputs that differ only in their
# values, under the key of _dispatch_key.fw_cache_key (everything the choice depends on). It saves the ~20 us of
# reasons per call that showed on small kernels (D=128, N=1024 causal forward: 0.25 ms per call instead of the
# kernel's 0.16).
_FW_CACHE: dict[tuple, type[AttentionFwOpBase]] = {}
_SUPPORTED: set[tuple] = set()  # (operator, key) pairs an explicitly chosen operator was found to support
_FW_CACHE_MAX = 4096


def dispatch_fw(inp: Inputs, needs_gradient: bool, *, needs_lse: bool = False) -> type[AttentionFwOpBase]:
    """The forward operator for ``inp`` (``TRIFORMERS_FMHA_OP`` first, else the priority list)."""
    forced = forced_ops()
    if forced is not None:
        ensure_op_supports("memory_efficient_attention_forward", forced[0], inp, needs_lse=needs_lse)
        return forced[0]
    key = fw_cache_key(inp, needs_gradient, needs_lse)
    if key is not None and key in _FW_CACHE:
        return _FW_CACHE[key]
    op = run_priority_list(
        "memory_efficient_attention_forward", fw_priority_list(inp, needs_gradient), inp, needs_lse=needs_lse
    )
    if op is chunked.FwOp and inp.key.dtype == torch.int32 and inp.query.device.type == "cuda" and not _WARNED_FW:
        _WARNED_FW.add(True)
        warnings.warn(
            "memory_efficient_attention: this quantized KV cache runs on fmha.chunked (pure PyTorch, slower than "
            "fmha.triton_splitk, which cannot run it: see its reasons with triton_splitk.FwOp.not_supported_reasons)",
            stacklevel=2,
        )
    if key is not None:
        if len(_FW_CACHE) >= _FW_CACHE_MAX:
            _FW_CACHE.clear()
        _FW_CACHE[key] = op
    return op


def dispatch_bw(inp: Inputs) -> type[AttentionBwOpBase]:
    """The backward operator for ``inp`` (warning once per bias type when CUDA inputs fall back to the
    pure-PyTorch ``chunked`` backward)."""
    forced = forced_ops()
    if forced is not None and not getattr(forced[1], "NAME", "").startswith("sdpa"):
        ensure_op_supports("memory_efficient_attention_backward", forced[1], inp)
        return forced[1]
    op = run_priority_list("memory_efficient_attention_backward", bw_priority_list(inp), inp)
    if op is chunked.BwOp and inp.query.device.type == "cuda" and type(inp.attn_bias) not in _WARNED_BW:
        _WARNED_BW.add(type(inp.attn_bias))
        warnings.warn(
            f"memory_efficient_attention: the backward with {type(inp.attn_bias).__name__} on CUDA runs on "
            "fmha.chunked (pure PyTorch, slower than the Triton kernels, which cannot run it)",
            stacklevel=2,
        )
    return op


_WARNED_BW: set[type] = set()
_WARNED_FW: set[bool] = set()  # the quantized-cache fallback above, warned once


# xFormers' private names for the functions above (code and tests written against xFormers import them)
def _dispatch_fw(inp: Inputs, needs_gradient: bool) -> type[AttentionFwOpBase]:
    """:func:`dispatch_fw`; with ``needs_gradient`` the operator also returns the lse."""
    return dispatch_fw(inp, needs_gradient, needs_lse=needs_gradient)


def _dispatch_bw(inp: Inputs, varlen_lse_packed: bool | None = None) -> type[AttentionBwOpBase]:
    """:func:`dispatch_bw`; every operator here packs the lse of block-diagonal biases the same way (``[1,
    (G,) H, total_Mq]``), so ``varlen_lse_packed`` leaves the choice unchanged."""
    return dispatch_bw(inp)


def _dispatch_fw_priority_list(inp: Inputs, needs_gradient: bool) -> list[type[AttentionFwOpBase]]:
    """:func:`fw_priority_list`."""
    return fw_priority_list(inp, needs_gradient)


def _ensure_op_supports_or_raise(exc_type: type[Exception], name: str, op: type[AttentionOpBase], inp: Inputs
                                 ) -> None:
    """Raises ``exc_type`` with ``op``'s reasons when it cannot run ``inp``."""
    reasons = op.not_supported_reasons(inp)
    if reasons:
        raise exc_type(f"Operator `{name}` does not support inputs:\n{_format_inputs(inp)}\n"
                       f"{_reasons_block(op, reasons)}")


@dataclass
class AttentionOpDispatch:
    """xFormers' (deprecated) dispatcher object: ``AttentionOpDispatch.from_arguments(q, k, v, ...).op`` is the
    ``(FwOp, BwOp)`` pair that ``memory_efficient_attention`` runs for these inputs with gradients (usable as
    its ``op=``)."""

    op: AttentionOp

    @classmethod
    def from_arguments(cls, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias=None,
                       p: float = 0.0, scale: float | None = None) -> AttentionOpDispatch:
        inp = Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale)
        inp.validate_inputs()
        inp.normalize_bmhk()
        op_fw = dispatch_fw(inp, needs_gradient=True)
        native_bw = op_fw.AUTOGRAD_BW if op_fw.NATIVE_AUTOGRAD else None  # its output carries this backward
        return cls(op=(op_fw, native_bw or dispatch_bw(inp)))


def _get_use_fa3() -> bool:
    """xFormers' FlashAttention-3 switch: False, triformers has no FlashAttention-3 operator."""
    return False


def _set_use_fa3(use_flash_attention3: bool) -> None:
    """xFormers' FlashAttention-3 switch. triformers has no FlashAttention-3 operator (``fmha.flash3`` names
    our Triton one), so asking for it changes nothing, with a warning the first time."""
    if use_flash_attention3 and not _WARNED_FA3:
        _WARNED_FA3.add(True)
        warnings.warn("_set_use_fa3(True) has no effect: triformers has no FlashAttention-3 operator", stacklevel=2)


_WARNED_FA3: set[bool] = set()
