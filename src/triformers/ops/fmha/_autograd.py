"""The autograd glue of ``memory_efficient_attention``: the forward operator keeps (out, lse, seed), the backward
operator (the one the forward asks for, or the dispatcher's) recomputes. Its own module so that operators which
run a forward here and their backward elsewhere (``triton.py``) need not import the package."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from triformers.ops.fmha import attn_bias, dispatch
from triformers.ops.fmha.common import Context, Inputs


def _with_tensor(bias: Any, tensor: torch.Tensor | None) -> Any:
    """The bias object with its tensor swapped for ``tensor`` (the one autograd tracks); a tensor bias is
    passed as the class ``torch.Tensor`` (the same tensor given twice would confuse torch.compile)."""
    if bias is torch.Tensor or isinstance(bias, torch.Tensor):
        return tensor
    if isinstance(bias, attn_bias.LowerTriangularMaskWithTensorBias):
        return attn_bias.LowerTriangularMaskWithTensorBias(tensor)
    return bias


class _fMHA(torch.autograd.Function):
    """Autograd glue: the forward operator keeps (out, lse, seed); the backward operator recomputes. Returns
    ``(out, lse)``; the lse has a gradient (partial attention) only when ``is_partial``."""

    @staticmethod
    def forward(ctx, op_fw, op_bw, bias, p, scale, output_dtype, is_partial, query, key, value, bias_tensor):  # noqa: D401
        inp = Inputs(query, key, value, _with_tensor(bias, bias_tensor), p, scale, output_dtype, is_partial)
        out, op_ctx = op_fw.apply(inp, needs_gradient=True)
        ctx.save_for_backward(query, key, value, op_ctx.out, op_ctx.lse, bias_tensor)
        ctx.bias, ctx.p, ctx.scale, ctx.output_dtype, ctx.is_partial = bias, p, scale, output_dtype, is_partial
        ctx.rng_state = op_ctx.rng_state
        ctx.op_bw = op_ctx.op_bw if op_ctx.op_bw is not None else op_bw
        if op_ctx.op_bw is not None and op_bw is not None and op_bw is not op_ctx.op_bw:
            raise ValueError(
                f"Specified op_bw={op_bw.NAME}, but forward op can only run with op_bw={op_ctx.op_bw.NAME}. "
                "Please set op_bw=None."
            )
        if not is_partial:
            ctx.mark_non_differentiable(op_ctx.lse)
        ctx.set_materialize_grads(False)
        return out, op_ctx.lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, grad_lse):
        query, key, value, out, lse, bias_tensor = ctx.saved_tensors
        inp = Inputs(
            query, key, value, _with_tensor(ctx.bias, bias_tensor), ctx.p, ctx.scale, ctx.output_dtype, ctx.is_partial
        )
        op_bw = ctx.op_bw
        if op_bw is None:
            op_bw = dispatch.dispatch_bw(inp)
        else:
            dispatch.ensure_op_supports("memory_efficient_attention_backward", op_bw, inp)
        if grad is None:  # only the lse was used
            grad = torch.zeros_like(out)
        op_ctx = Context(lse=lse, out=out, rng_state=ctx.rng_state)
        # operators without SUPPORTS_PARTIAL (never given partial inputs) keep xFormers' 3-argument apply
        grads = op_bw.apply(op_ctx, inp, grad) if grad_lse is None else op_bw.apply(op_ctx, inp, grad, grad_lse)
        db = grads.db if ctx.needs_input_grad[10] else None
        return None, None, None, None, None, None, None, grads.dq, grads.dk, grads.dv, db
