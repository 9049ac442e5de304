"""``fmha.triton``: our FlashAttention-2 kernels in Triton (forward and backward, every bias type).

- Masks are applied from their parameters (block starts, windows, padding), never from a materialized
  tensor; tiles a mask hides are skipped and only boundary tiles compute a mask. Block-diagonal biases run
  as true varlen: packed sequences, one launch.
- Tensor biases with any strides (stride-0 broadcast dims read in place), with their gradient, reduced
  over broadcast dims.
- GQA/MQA natively: shared K/V heads are read in place and dK/dV are summed over the group in the kernel.
- Dropout from an in-kernel Philox stream keyed by a seed from torch's generator; the backward regenerates
  the mask. The stream is the one the chunked operator draws (bit-identical masks).
- Any head dim up to 256 (padded in registers to the next power of two, not by copying); fp16, bf16, fp32
  (TF32 only if ``torch.backends.cuda.matmul.allow_tf32``); a deterministic backward (no atomics) under
  ``torch.use_deterministic_algorithms(True)``.
- Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); bf16 is refused there because the
  interpreter's ``tl.dot`` mishandles bf16 operands.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from triformers._triton import interpret_mode, is_triton_available, triton_unavailable_reason
from triformers.ops.common import register_operator
from triformers.ops.fmha import _rng, dispatch
from triformers.ops.fmha._mask import SUPPORTED_BIAS_TYPES
from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, Context, Gradients, Inputs

MAX_HEAD_DIM = 256


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

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if is_triton_available() else "triton is not installed"

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        return super().not_supported_reasons(d) + _reasons(cls, d)

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> tuple[torch.Tensor, Context | None]:
        from triformers.ops.fmha._triton.launch import attention_forward

        rng_state = _rng.draw_seed() if inp.p > 0.0 else None
        out, lse = attention_forward(inp, None if rng_state is None else int(rng_state[0]))
        if not needs_gradient:
            return out, None
        return out, Context(out=out, lse=lse, rng_state=rng_state)


@register_operator
class BwOp(AttentionBwOpBase):
    """Triton FlashAttention-2 backward; deterministic (no atomics) when torch asks for determinism."""

    NAME = "tritonflashattB"
    SUPPORTED_DEVICES = FwOp.SUPPORTED_DEVICES
    CUDA_MINIMUM_COMPUTE_CAPABILITY = FwOp.CUDA_MINIMUM_COMPUTE_CAPABILITY
    SUPPORTED_DTYPES = FwOp.SUPPORTED_DTYPES
    SUPPORTED_MAX_K = MAX_HEAD_DIM
    SUPPORTED_ATTN_BIAS_TYPES = SUPPORTED_BIAS_TYPES
    SUPPORTS_DROPOUT = True
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    SUPPORTS_ATTN_BIAS_GRAD = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return FwOp.unavailable_reason()

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        return super().not_supported_reasons(d) + _reasons(cls, d)

    @classmethod
    def apply(cls, ctx: Context, inp: Inputs, grad: torch.Tensor) -> Gradients:
        from triformers.ops.fmha._triton.launch import attention_backward

        seed = None
        if inp.p > 0.0:
            if ctx.rng_state is None:
                raise ValueError("dropout backward needs the forward's rng_state (the seed) in the Context")
            seed = int(ctx.rng_state[0])
        dq, dk, dv, db = attention_backward(
            inp, ctx.out, ctx.lse, grad, seed, deterministic=torch.are_deterministic_algorithms_enabled()
        )
        return Gradients(dq=dq, dk=dk, dv=dv, db=db)


dispatch.register_family("triton", FwOp, BwOp)
