"""``fmha.triton``: our FlashAttention-2 kernels in Triton (forward and backward, every bias type).

- Masks are applied from their parameters (block starts, windows, padding), never from a materialized
  tensor; tiles a mask hides are skipped and only boundary tiles compute a mask. Block-diagonal biases run
  as true varlen: packed sequences, one launch.
- KV-cache biases (padded, gappy keys) are per-block key starts and lengths, read from the bias's own device
  tensors (in-place updates and CUDA-graph replays reach the kernels); unused cache rows may hold NaN. Paged
  biases gather K/V rows through the block table, in the forward only: their backward runs on
  ``fmha.chunked`` (``BwOp`` does not list them), as does the backward of gappy keys whose segments overlap.
- Block-sparse masks (``BlockSparseMask``, blocks of any size >= 16): each program walks a CSR table of the
  tiles its layout allows (``_mask.TileTable``), forward and backward; only boundary tiles read the layout.
- Tensor biases with any strides (stride-0 broadcast dims read in place), with their gradient, reduced
  over broadcast dims.
- GQA/MQA natively: shared K/V heads are read in place and dK/dV are summed over the group in the kernel.
- Dropout from an in-kernel Philox stream keyed by a seed from torch's generator; the backward regenerates
  the mask. The stream is the one the chunked operator draws (bit-identical masks).
- Any head dim up to 256 (padded in registers to the next power of two, not by copying); fp16, bf16, fp32
  (TF32 only if ``torch.backends.cuda.matmul.allow_tf32``); a deterministic backward (no atomics) under
  ``torch.use_deterministic_algorithms(True)``.
- The output may be written in another dtype than the inputs' (``output_dtype``; float32 for partial
  attention), and the lse is a differentiable output: its gradient enters the backward through ``delta``.
- The kernels are ``torch.library`` custom ops (``triformers::flash_fwd``, ``triformers::flash_bwd``, in
  ``_flash_ops``) with fake implementations and a registered autograd formula, so
  ``torch.compile(fullgraph=True)`` traces ``memory_efficient_attention`` without graph breaks.
- Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); bf16 is refused there because the
  interpreter's ``tl.dot`` mishandles bf16 operands.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from triformers._triton import interpret_mode, is_triton_available, triton_unavailable_reason
from triformers.ops.common import register_operator
from triformers.ops.fmha import _layout, _registry, _rng
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._autograd import _fMHA
from triformers.ops.fmha._flash_ops import (  # noqa: F401  (the custom ops and Functions, re-exported)
    _backward,
    _bwd_impl,
    _call_args,
    _eager,
    _flash_autograd,
    _FlashFn,
    _FlashFnSharedKV,
    _fwd_impl,
    _launch,
    _mask_args,
    _setup_context,
    flash_bwd,
    flash_fwd,
)
from triformers.ops.fmha._mask import PAGED_BIAS_TYPES, SUPPORTED_BIAS_TYPES
from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, Context, Gradients, Inputs

MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------------------


def _segments_overlap(bias) -> bool:
    """Whether two key segments of a gappy bias share a key row (the backward writes each block's dK/dV),
    kept on the bias object."""
    overlap = bias.__dict__.get("_triformers_overlap")
    if overlap is None:
        k = bias.k_seqinfo
        segments = sorted((s, s + n) for s, n in zip(k.seqstart_py, k.seqlen_py) if n)
        overlap = any(b_start < a_end for (_, a_end), (b_start, _) in zip(segments, segments[1:]))
        if not torch.compiler.is_compiling():
            object.__setattr__(bias, "_triformers_overlap", overlap)
    return overlap


def _backward_elsewhere(bias) -> bool:
    """Biases the Triton backward cannot run (paged ones, overlapping gappy segments)."""
    return type(bias) in PAGED_BIAS_TYPES or (
        isinstance(bias, ab.BlockDiagonalGappyKeysMask) and _segments_overlap(bias)
    )


def _reasons(cls, d: Inputs) -> list[str]:
    reasons = []
    why = triton_unavailable_reason(d.query)
    if why is not None and d.query.device.type in cls.SUPPORTED_DEVICES:
        reasons.append(why)
    if d.query.device.type == "cpu" and d.query.dtype == torch.bfloat16 and interpret_mode():
        reasons.append("bf16 under Triton's interpreter is unreliable (its tl.dot mishandles bf16 operands)")
    return reasons


@register_operator
class FwOp(AttentionFwOpBase):
    """Triton FlashAttention-2 forward (see the module docstring)."""

    NAME = "tritonflashattF"
    SUPPORTED_DEVICES: ClassVar[set[str]] = {"cuda", "cpu"}
    CUDA_MINIMUM_COMPUTE_CAPABILITY = (8, 0)
    SUPPORTED_DTYPES: ClassVar[set[torch.dtype]] = {torch.float16, torch.bfloat16, torch.float32}
    SUPPORTED_MAX_K = MAX_HEAD_DIM
    SUPPORTED_ATTN_BIAS_TYPES = SUPPORTED_BIAS_TYPES
    SUPPORTS_DROPOUT = True
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    SUPPORTS_OUTPUT_DTYPE = True  # the kernel rounds its float32 accumulator to the output's dtype
    SUPPORTS_PARTIAL = True
    NATIVE_AUTOGRAD = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if is_triton_available() else "triton is not installed"

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        return super().not_supported_reasons(d) + _reasons(cls, d)

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> tuple[torch.Tensor, Context | None]:
        rng_state = _rng.draw_seed() if inp.p > 0.0 else None
        with torch.no_grad():
            out, lse = (_fwd_impl if _eager() else flash_fwd)(*_call_args(inp, rng_state))
        if not needs_gradient:
            return out, None
        return out, Context(out=out, lse=lse, rng_state=rng_state)

    @classmethod
    def apply_autograd(cls, inp: Inputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if _backward_elsewhere(inp.attn_bias):  # this forward; the backward the dispatcher picks (fmha.chunked)
            out, lse = _fMHA.apply(
                cls,
                None,
                inp.attn_bias,
                inp.p,
                inp.scale,
                inp.output_dtype,
                inp.is_partial,
                inp.query,
                inp.key,
                inp.value,
                None,
            )
            return (out, lse) if inp.is_partial else out
        rng_state = _rng.draw_seed() if inp.p > 0.0 else None
        args = _call_args(inp, rng_state)
        out, lse = _flash_autograd(args) if _eager() else flash_fwd(*args)
        return (out, lse) if inp.is_partial else out


@register_operator
class BwOp(AttentionBwOpBase):
    """Triton FlashAttention-2 backward; deterministic (no atomics) when torch asks for determinism."""

    NAME = "tritonflashattB"
    SUPPORTED_DEVICES = FwOp.SUPPORTED_DEVICES
    CUDA_MINIMUM_COMPUTE_CAPABILITY = FwOp.CUDA_MINIMUM_COMPUTE_CAPABILITY
    SUPPORTED_DTYPES = FwOp.SUPPORTED_DTYPES
    SUPPORTED_MAX_K = MAX_HEAD_DIM
    SUPPORTED_ATTN_BIAS_TYPES = SUPPORTED_BIAS_TYPES - PAGED_BIAS_TYPES  # paged: forward only
    SUPPORTS_DROPOUT = True
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    SUPPORTS_ATTN_BIAS_GRAD = True
    SUPPORTS_OUTPUT_DTYPE = True
    SUPPORTS_PARTIAL = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return FwOp.unavailable_reason()

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(d) + _reasons(cls, d)
        if isinstance(d.attn_bias, ab.BlockDiagonalGappyKeysMask) and _segments_overlap(d.attn_bias):
            reasons.append("gappy key segments overlap: their dK/dV would need summing across blocks")
        return reasons

    @classmethod
    def apply(cls, ctx: Context, inp: Inputs, grad: torch.Tensor, grad_lse: torch.Tensor | None = None) -> Gradients:
        if inp.p > 0.0 and ctx.rng_state is None:
            raise ValueError("dropout backward needs the forward's rng_state (the seed) in the Context")
        args = _call_args(inp, ctx.rng_state)
        q, k, v, bias = args[:4]
        share_kv = args[16]
        L = _layout.canonical(q, k, v, bias, share_kv)
        want_db = bias is not None and bias.requires_grad
        mask = sum(1 << d for d in _layout.bias_reduce_dims(bias, L)) if want_db else -1
        with torch.no_grad():
            # args[4:16]: seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered,
            # p, seed, scale
            dq, dk5, dv5, db = (_bwd_impl if _eager() else flash_bwd)(
                grad, q, k, v, ctx.out, ctx.lse, bias, mask, *args[4:16], share_kv,
                torch.are_deterministic_algorithms_enabled(), grad_lse, *args[21:24],
            )
        return Gradients(
            dq=dq,
            dk=_layout.shared_kv_grad(dk5, k, L),
            dv=_layout.shared_kv_grad(dv5, v, L),
            db=_layout.grad_for_input(L.bias_from5(db).to(bias.dtype), bias) if want_db else None,
        )


FwOp.AUTOGRAD_BW = BwOp
_registry.register_family("triton", FwOp, BwOp)  # dispatch.py reads the registry
