"""The Triton attention kernels as ``torch.library`` custom ops (``triformers::flash_fwd``,
``triformers::flash_bwd``, with fake implementations and an autograd formula, for ``torch.compile``) and as
their eager twins (``torch.autograd.Function``), which :mod:`~triformers.ops.fmha.triton`'s operators call.

Plain tensors and numbers in and out; the launchers are in ``_triton/launch.py``.
"""

from __future__ import annotations

import torch

from triformers.ops.fmha import _layout
from triformers.ops.fmha.common import Inputs


def _launch():
    from triformers.ops.fmha._triton import launch

    return launch


def _mask_args(
    seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered, block_tables=None,
    page_size=0, bs_layout=None, bs_block_q=0, bs_block_k=0,
):
    return _launch().MaskArgs(
        seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered, block_tables,
        page_size, bs_layout, bs_block_q, bs_block_k,
    )


def _fwd_impl(
    q, k, v, bias, seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered, p, seed,
    scale, share_kv, bias_is_leaf, out_dtype, block_tables, page_size, bs_layout=None, bs_block_q=0, bs_block_k=0,
):
    m = _mask_args(
        seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered, block_tables,
        page_size, bs_layout, bs_block_q, bs_block_k,
    )
    return _launch().attention_forward(
        q, k, v, bias, m, p, 0 if seed is None else int(seed[0]), scale, share_kv, out_dtype
    )


def _bwd_impl(
    grad, q, k, v, out, lse, bias, db_reduce_mask, seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left,
    window_right, keys_covered, p, seed, scale, share_kv, deterministic, grad_lse, bs_layout=None, bs_block_q=0,
    bs_block_k=0,
):
    m = _mask_args(seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered,
                   None, 0, bs_layout, bs_block_q, bs_block_k)
    return _launch().attention_backward(
        grad, q, k, v, out, lse, bias, db_reduce_mask, m, p, 0 if seed is None else int(seed[0]), scale, share_kv,
        deterministic, grad_lse,
    )


@torch.library.custom_op("triformers::flash_fwd", mutates_args=())
def flash_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, seq_q: torch.Tensor | None,
    k_start: torch.Tensor | None, k_len: torch.Tensor | None, max_q: int, max_k: int, bottom_right: bool,
    window_left: int, window_right: int, keys_covered: bool, p: float, seed: torch.Tensor | None, scale: float,
    share_kv: bool, bias_is_leaf: bool, out_dtype: torch.dtype, block_tables: torch.Tensor | None, page_size: int,
    bs_layout: torch.Tensor | None = None, bs_block_q: int = 0, bs_block_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``, out in ``out_dtype``; ``keys_covered`` and ``bias_is_leaf`` only inform the backward;
    ``block_tables``/``page_size``: a paged bias's table (K/V rows through it), or None/0; ``bs_layout``,
    ``bs_block_q``, ``bs_block_k``: a block-sparse mask's bool layout and block sizes, or None/0/0."""
    return _fwd_impl(
        q, k, v, bias, seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered, p,
        seed, scale, share_kv, bias_is_leaf, out_dtype, block_tables, page_size, bs_layout, bs_block_q, bs_block_k,
    )


@flash_fwd.register_fake
def _flash_fwd_fake(
    q, k, v, bias, seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered, p, seed,
    scale, share_kv, bias_is_leaf, out_dtype, block_tables, page_size, bs_layout=None, bs_block_q=0, bs_block_k=0,
):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)
    lse = q.new_empty((q.shape[0], *q.shape[2:-1], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("triformers::flash_bwd", mutates_args=())
def flash_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    bias: torch.Tensor | None, db_reduce_mask: int, seq_q: torch.Tensor | None, k_start: torch.Tensor | None,
    k_len: torch.Tensor | None, max_q: int, max_k: int, bottom_right: bool, window_left: int, window_right: int,
    keys_covered: bool, p: float, seed: torch.Tensor | None, scale: float, share_kv: bool, deterministic: bool,
    grad_lse: torch.Tensor | None, bs_layout: torch.Tensor | None = None, bs_block_q: int = 0, bs_block_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk5, dv5, db)``: K/V gradients per shared head in the canonical layout, ``db`` float32 with the
    dims of ``db_reduce_mask`` summed (empty when the mask is negative). ``grad_lse``: the gradient of the lse
    output (partial attention), or None."""
    return _bwd_impl(
        grad, q, k, v, out, lse, bias, db_reduce_mask, seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left,
        window_right, keys_covered, p, seed, scale, share_kv, deterministic, grad_lse, bs_layout, bs_block_q,
        bs_block_k,
    )


@flash_bwd.register_fake
def _flash_bwd_fake(
    grad, q, k, v, out, lse, bias, db_reduce_mask, seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left,
    window_right, keys_covered, p, seed, scale, share_kv, deterministic, grad_lse, bs_layout=None, bs_block_q=0,
    bs_block_k=0,
):
    launch = _launch()
    dk5 = k.new_empty(launch.kv_grad_shape(q, k, share_kv, k.shape[-1]))
    dv5 = v.new_empty(launch.kv_grad_shape(q, v, share_kv, v.shape[-1]))
    db_shape = launch.db_buffer_shape(q, k, bias, share_kv, db_reduce_mask) if (
        db_reduce_mask >= 0 and bias is not None) else (0,)
    # dq is dense whatever q's strides (the kernels write it so; empty_like would copy a transposed q's strides)
    return q.new_empty(q.shape), dk5, dv5, q.new_empty(db_shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    (
        q, k, v, bias, seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left, window_right, keys_covered, p,
        seed, scale, share_kv, bias_is_leaf,
    ) = inputs[:18]
    bs_layout, bs_block_q, bs_block_k = (*inputs[21:], None, 0, 0)[:3]  # a block-sparse mask (or None, 0, 0)
    ctx.num_args = len(inputs)
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, seq_q, k_start, k_len, seed, out, lse, bs_layout)
    ctx.args = (max_q, max_k, bottom_right, window_left, window_right, keys_covered, p, scale, share_kv, bias_is_leaf)
    ctx.sparse_blocks = (bs_block_q, bs_block_k)


def _backward(ctx, grad_out, grad_lse, bwd=None, kv_bases=(None, None)):
    """Gradients of every input of ``flash_fwd``; ``grad_lse`` (None when the lse was not used) reaches the
    kernels' ``delta``."""
    q, k, v, bias, seq_q, k_start, k_len, seed, out, lse, bs_layout = ctx.saved_tensors
    max_q, max_k, bottom_right, window_left, window_right, keys_covered, p, scale, share_kv, bias_is_leaf = ctx.args
    L = _layout.canonical(q, k, v, bias, share_kv)
    want_db = bias is not None and ctx.needs_input_grad[3]
    mask = -1
    if want_db:
        mask = sum(1 << d for d in _layout.bias_reduce_dims(bias, L, is_leaf=bias_is_leaf))
    if grad_out is None:  # only the lse was used
        grad_out = torch.zeros_like(out)
    dq, dk5, dv5, db = (bwd or flash_bwd)(
        grad_out, q, k, v, out, lse, bias, mask, seq_q, k_start, k_len, max_q, max_k, bottom_right, window_left,
        window_right, keys_covered, p, seed, scale, share_kv, torch.are_deterministic_algorithms_enabled(), grad_lse,
        bs_layout, *ctx.sparse_blocks,
    )
    dk = _layout.shared_kv_grad(dk5, k, L, kv_bases[0])
    dv = _layout.shared_kv_grad(dv5, v, L, kv_bases[1])
    dbias = _layout.grad_for_input(L.bias_from5(db).to(bias.dtype), bias) if want_db else None
    return dq, dk, dv, dbias, *(None,) * (ctx.num_args - 4)


flash_fwd.register_autograd(_backward, setup_context=_setup_context)


class _FlashFn(torch.autograd.Function):
    """The eager twin of the custom ops: same launchers and backward formula, without the custom-op
    dispatch (argument binding against the schema costs more host time than a small attention call takes on
    the GPU). ``torch.compile`` traces the custom ops instead, which it treats as opaque."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        ctx.set_materialize_grads(False)  # an unused output (the lse, mostly) costs nothing in the backward
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse, _bwd_impl)


class _FlashFnSharedKV(torch.autograd.Function):
    """:class:`_FlashFn` for K/V that expand tensors of one head per group (``_layout.expanded_base``): those
    tensors are extra inputs and get the group-summed gradients directly; the expanded views get none, so
    autograd never materialises an expanded gradient for them."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _fwd_impl(*inputs[:-2])
        _setup_context(ctx, inputs[:-2], (out, lse))
        ctx.kv_bases = (inputs[-2].shape, inputs[-1].shape)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        dq, dk, dv, *rest = _backward(ctx, grad_out, grad_lse, _bwd_impl, ctx.kv_bases)
        return dq, None, None, *rest, dk, dv


def _flash_autograd(args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager autograd call, ``(out, lse)``: K/V gradients straight to the tensors they expand, where that is
    exact."""
    if args[16]:  # share_kv
        kb, vb = _layout.expanded_base(args[1]), _layout.expanded_base(args[2])
        if kb is not None and vb is not None and (kb.requires_grad or vb.requires_grad):
            return _FlashFnSharedKV.apply(*args, kb, vb)
    return _FlashFn.apply(*args)


def _eager() -> bool:
    # under a TorchDispatchMode (selective checkpointing, list_operators, FlopCounterMode) the custom ops run,
    # so the mode sees attention as one op by name (triformers::flash_fwd) and can save or recompute it
    return not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()


def _call_args(inp: Inputs, seed: torch.Tensor | None):
    q, k, v = inp.query, inp.key, inp.value
    bias = inp.tensor_bias
    m = _launch().mask_args(inp.attn_bias, q.shape[1], k.shape[1], q.device)
    return (
        q, k, v, bias, m.seq_q, m.k_start, m.k_len, m.max_q, m.max_k, m.bottom_right, m.window_left, m.window_right,
        m.keys_covered, float(inp.p), seed, inp.scale_float, _layout.kv_shareable(k, v), bias is None or bias.is_leaf,
        inp.get_output_dtype(), m.block_tables, m.page_size, m.bs_layout, m.bs_block_q, m.bs_block_k,
    )
