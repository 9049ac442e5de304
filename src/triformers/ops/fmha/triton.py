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
- The kernels are ``torch.library`` custom ops (``triformers::flash_fwd``, ``triformers::flash_bwd``) with
  fake implementations and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces
  ``memory_efficient_attention`` without graph breaks.
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
from triformers.ops.fmha._mask import PAGED_BIAS_TYPES, SUPPORTED_BIAS_TYPES
from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, Context, Gradients, Inputs

MAX_HEAD_DIM = 256


def _launch():
    from triformers.ops.fmha._triton import launch

    return launch


# ------------------------------------------------------------------------------------------------------
# Custom ops: plain tensors and numbers in and out (see _triton/launch.py)
# ------------------------------------------------------------------------------------------------------


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
    return torch.empty_like(q), dk5, dv5, q.new_empty(db_shape, dtype=torch.float32)


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
