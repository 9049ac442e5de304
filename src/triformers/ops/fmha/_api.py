"""The public attention functions of :mod:`triformers.ops.fmha` (the package re-exports them).

They live here, not in the package's ``__init__``, so that modules the package imports (``merge``) can call
them without importing the package.
"""

from __future__ import annotations

import torch

from triformers.ops.fmha import dispatch
from triformers.ops.fmha._autograd import _fMHA
from triformers.ops.fmha.attn_bias import AttentionBias
from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, AttentionOp, Context, Inputs

_DROPOUT_LOW_LEVEL = (
    "dropout is not supported on the non-autograd API. If you want to use dropout, please call "
    "`memory_efficient_attention` directly"
)


def _needs_grad(inp: Inputs) -> bool:
    if not torch.is_grad_enabled():
        return False
    bias = inp.tensor_bias
    return any(x.requires_grad for x in (inp.query, inp.key, inp.value)) or (
        bias is not None and bias.requires_grad
    )


def memory_efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | AttentionBias | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    op: AttentionOp | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Exact attention without the ``[Mq, Mkv]`` score matrix in memory (FlashAttention-style).

    Shapes::

        query [B, Mq, H, K], key [B, Mkv, H, K], value [B, Mkv, H, Kv] -> [B, Mq, H, Kv]   (BMHK)
        [B, M, K] (BMK, one head) and [B, M, G, H, K] (BMGHK, GQA) are accepted too.

    Only the last dimension must be contiguous. For GQA/MQA, expand K/V over the query heads with
    ``expand`` (stride 0): they are read in place, never copied, and their gradient sums over the heads.

    Args:
        query: ``[B, Mq, H, K]``.
        key: ``[B, Mkv, H, K]``.
        value: ``[B, Mkv, H, Kv]``.
        attn_bias: None; an additive tensor ``[B, H, Mq, Mkv]`` (broadcast views and broadcastable shapes
            are used without a copy, and receive a gradient when they require one); or an
            :class:`~triformers.ops.fmha.attn_bias.AttentionBias` (causal, local, block-diagonal, ...).
        p: dropout probability on the attention weights (reproducible under ``torch.manual_seed``).
        scale: multiplies ``Q @ K^T``; default ``1 / sqrt(K)``.
        op: ``(FwOp, BwOp)`` to force operators (either may be None); by default the dispatcher picks the
            fastest one that supports the inputs, per call.
        output_dtype: dtype of the output (default: the query's); e.g. float32 from half-precision inputs
            (operators with ``SUPPORTS_OUTPUT_DTYPE``: chunked, Triton). Gradients flow as usual.

    Returns:
        ``[B, Mq, H, Kv]`` in ``output_dtype`` (default: the query's dtype). Query rows whose keys are all
        masked give 0.

    Raises:
        ValueError: invalid inputs (the message names the tensor, its shape and the fix), or an ``op``
            that cannot run them.
        NotImplementedError: no operator supports the inputs (each operator's reasons are listed).
    """
    inp = Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale, output_dtype=output_dtype)
    inp.validate_inputs()
    # torch.jit.trace records one graph whatever the grad mode (its check reruns the call without gradients)
    if not _needs_grad(inp) and not torch.jit.is_tracing():
        return _forward(inp, None if op is None else op[0], "memory_efficient_attention", False)[0]
    return _autograd(inp, op, "memory_efficient_attention")[0]


def _autograd(inp: Inputs, op: AttentionOp | None, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs validated inputs with autograd: ``(out in the caller's layout, lse)``. For partial inputs the lse
    is differentiable too; otherwise it is None or carries no gradient."""
    output_shape = inp.normalize_bmhk()
    op_fw, op_bw = (None, None) if op is None else op
    custom_bw = op_bw is not None and not (op_fw is not None and op_fw.AUTOGRAD_BW is op_bw)
    if op_fw is None:
        op_fw = dispatch.dispatch_fw(inp, needs_gradient=True, needs_lse=custom_bw or inp.is_partial)
        custom_bw = op_bw is not None and op_fw.AUTOGRAD_BW is not op_bw
    else:
        dispatch.ensure_op_supports(name, op_fw, inp, needs_lse=custom_bw or inp.is_partial)
    if op_fw.NATIVE_AUTOGRAD and not custom_bw:
        if inp.is_partial:
            out, lse = op_fw.apply_autograd(inp)
            return out.reshape(output_shape), lse
        return op_fw.apply_autograd(inp).reshape(output_shape), None
    tensor = inp.tensor_bias
    bias_kind = torch.Tensor if isinstance(inp.attn_bias, torch.Tensor) else inp.attn_bias
    out, lse = _fMHA.apply(
        op_fw,
        op_bw,
        bias_kind,
        inp.p,
        inp.scale,
        inp.output_dtype,
        inp.is_partial,
        inp.query,
        inp.key,
        inp.value,
        tensor,
    )
    return out.reshape(output_shape), lse


def _forward(inp: Inputs, op: type[AttentionFwOpBase] | None, name: str, needs_gradient: bool
             ) -> tuple[torch.Tensor, Context | None]:
    """Normalize, choose (or check) the forward operator, run it: ``(out in the caller's layout, ctx)``.
    With ``needs_gradient`` the operator must return the lse (the low-level API's backward needs it)."""
    output_shape = inp.normalize_bmhk()
    if op is None:
        op = dispatch.dispatch_fw(inp, needs_gradient=needs_gradient, needs_lse=needs_gradient)
    else:
        dispatch.ensure_op_supports(name, op, inp, needs_lse=needs_gradient)
    out, ctx = op.apply(inp, needs_gradient=needs_gradient)
    return out.reshape(output_shape), ctx


def memory_efficient_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | AttentionBias | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    op: type[AttentionFwOpBase] | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The forward of :func:`memory_efficient_attention`, without autograd."""
    inp = Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale, output_dtype=output_dtype)
    inp.validate_inputs()
    return _forward(inp, op, "memory_efficient_attention_forward", False)[0]


def memory_efficient_attention_forward_requires_grad(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | AttentionBias | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    op: type[AttentionFwOpBase] | None = None,
    output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``; ``out`` in ``output_dtype`` (default: the query's), ``lse`` float32 ``[B, H,
    Mq]`` (``[B, G, H, Mq]`` for BMGHK, ``[1, H, Mq]`` for block-diagonal biases), for
    :func:`memory_efficient_attention_backward`."""
    if p != 0.0:
        raise NotImplementedError(_DROPOUT_LOW_LEVEL)
    inp = Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale, output_dtype=output_dtype)
    inp.validate_inputs()
    out, ctx = _forward(inp, op, "memory_efficient_attention_forward_requires_grad", True)
    return out, ctx.lse


def memory_efficient_attention_partial(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | AttentionBias | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    op: AttentionOp | type[AttentionFwOpBase] | None = None,
    output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over one part of the keys, and its log-sum-exp, for :func:`merge_attentions`.

    Splitting the keys into disjoint parts, computing each part's ``(out, lse)`` and merging them gives the
    attention over all keys exactly (flash-decoding, context parallelism). Unlike xFormers', this function
    is differentiable with respect to query, key, value (and a tensor bias) through both outputs: the
    gradient of the lse enters the backward as ``delta_i = rowsum(dO_i * O_i) - dlse_i``.

    Args:
        query, key, value, attn_bias, scale: as for :func:`memory_efficient_attention`.
        p: must be 0 (the parts would draw different dropout masks than attention over all keys).
        op: a forward operator, or an ``(FwOp, BwOp)`` pair; the operators need ``SUPPORTS_PARTIAL``
            (chunked, Triton).
        output_dtype: dtype of ``out``; default float32 (float64 for float64 queries), so that merging does
            not round the parts.

    Returns:
        ``out`` ``[B, Mq, (G,) H, Kv]`` and ``lse`` float32 ``[B, (G,) H, Mq]`` (block-diagonal biases:
        packed, ``[1, (G,) H, total_Mq]``). Rows that see no key give ``out`` 0 and ``lse`` -inf.

    Raises:
        NotImplementedError: ``p != 0``, or no operator supports the inputs.
        ValueError: invalid inputs, or an ``op`` that cannot run them.
    """
    if p != 0.0:
        raise NotImplementedError("dropout is not supported.")
    pair = op if isinstance(op, tuple) else (op, None)
    inp = Inputs(
        query=query,
        key=key,
        value=value,
        attn_bias=attn_bias,
        p=p,
        scale=scale,
        output_dtype=output_dtype,
        is_partial=True,
    )
    inp.validate_inputs()
    if not _needs_grad(inp):
        out, ctx = _forward(inp, pair[0], "memory_efficient_attention_partial", True)
        return out, ctx.lse
    return _autograd(inp, pair, "memory_efficient_attention_partial")


def memory_efficient_attention_backward(
    grad: torch.Tensor,
    output: torch.Tensor,
    lse: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: torch.Tensor | AttentionBias | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    op: type[AttentionBwOpBase] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv)`` from the output gradient, the output and the lse of
    :func:`memory_efficient_attention_forward_requires_grad` (an ``output_dtype`` there is read from
    ``output.dtype``)."""
    if p != 0.0:
        raise NotImplementedError(_DROPOUT_LOW_LEVEL)
    inp = Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale)
    inp.validate_inputs()
    if output.dtype != query.dtype:  # the backward operator must take this output and its gradient
        inp.output_dtype = output.dtype
    if not (grad.ndim == output.ndim == query.ndim):
        raise ValueError(
            "All tensors should be either in BMK (ndim=3), BMHK (ndim=4) or BMGHK (ndim=5) format: "
            f"grad.ndim={grad.ndim}, output.ndim={output.ndim}, query.ndim={query.ndim}"
        )
    expected_out = (*query.shape[:-1], value.shape[-1])
    for name, x in (("grad", grad), ("output", output)):
        if tuple(x.shape) != expected_out:
            raise ValueError(f"{name}.shape={tuple(x.shape)} but the attention output has shape {expected_out}")
    shapes = (query.shape, key.shape, value.shape)
    inp.normalize_bmhk()
    q = inp.query
    expected_lse = (q.shape[0], *q.shape[2:-1], q.shape[1])
    if lse.dtype != torch.float32 or tuple(lse.shape) != expected_lse:
        raise ValueError(
            f"Input tensors have incompatible shapes: lse.shape={tuple(lse.shape)} ({lse.dtype}), expected "
            f"{expected_lse} float32 as returned by memory_efficient_attention_forward_requires_grad"
        )
    if query.ndim == 3:
        grad, output = grad.unsqueeze(2), output.unsqueeze(2)
    if op is None:
        op = dispatch.dispatch_bw(inp)
    else:
        dispatch.ensure_op_supports("memory_efficient_attention_backward", op, inp)
    grads = op.apply(Context(lse=lse, out=output), inp, grad)
    return grads.dq.reshape(shapes[0]), grads.dk.reshape(shapes[1]), grads.dv.reshape(shapes[2])
