"""Block-sparse products and softmax with autograd, on the Triton kernels or in torch.

Each primitive picks its implementation per call (:func:`~triformers.sparse._backend.run_triton`). The three
products are closed under differentiation, so every backward is again sdd/dsd/dds on the same layout::

    sdd   V = (A @ Bm)|layout   dA = Vg @ Bmᵀ (dsd)          dBm = Aᵀ @ Vg (dds)
    dsd   O = S @ D             dS = (Og @ Dᵀ)|layout (sdd)  dD = Sᵀ @ Og (dsd, transposed)
    dds   O = D @ S             dD = Og @ Sᵀ (dds, transposed) dS = (Dᵀ @ Og)|layout (sdd)
"""

from __future__ import annotations

import torch

from triformers.sparse import _blocksparse_torch as torch_impl
from triformers.sparse._backend import run_triton
from triformers.sparse._blocksparse_layout import BlockLayout

_kernels = None


def _triton_kernels():
    global _kernels
    if _kernels is None:  # importing triton is not free: only where a kernel runs
        from triformers.sparse._triton import blocksparse

        _kernels = blocksparse
    return _kernels


def _impl(op: str, info: BlockLayout, *tensors: torch.Tensor):
    """The module running ``op`` on ``tensors``: the Triton launchers or their torch twins."""
    bs = info.block_size
    unsupported = None
    if bs not in (16, 32, 64, 128):
        unsupported = f"the kernels take block sizes 16, 32, 64 and 128 (got {bs})"
    return _triton_kernels() if run_triton(op, *tensors, unsupported=unsupported) else torch_impl


def sdd(a: torch.Tensor, b: torch.Tensor, info: BlockLayout) -> torch.Tensor:
    """``values`` of ``a @ b`` at the layout's blocks (no autograd)."""
    return _impl("masked_matmul", info, a, b).sdd(a, b, info)


def dsd(values: torch.Tensor, dense: torch.Tensor, info: BlockLayout, transpose_sparse: bool = False) -> torch.Tensor:
    """``S @ dense`` (``Sᵀ @ dense`` with ``transpose_sparse``) as a new contiguous tensor (no autograd)."""
    B, C, _, N = dense.shape
    rows = info.shape[2] if transpose_sparse else info.shape[1]
    out = torch.empty((B, C, rows * info.block_size, N), device=dense.device, dtype=dense.dtype)
    _impl("matmul", info, values, dense, out).dsd(values, dense, info, out, transpose_sparse)
    return out


def dds(dense: torch.Tensor, values: torch.Tensor, info: BlockLayout, transpose_sparse: bool = False) -> torch.Tensor:
    """``dense @ S`` (``dense @ Sᵀ`` with ``transpose_sparse``), computed as ``(Sᵀ @ denseᵀ)ᵀ`` (no autograd)."""
    B, C, M, _ = dense.shape
    cols = info.shape[1] if transpose_sparse else info.shape[2]
    out = torch.empty((B, C, M, cols * info.block_size), device=dense.device, dtype=dense.dtype)
    dense_t, out_t = dense.transpose(-2, -1), out.transpose(-2, -1)
    _impl("matmul", info, values, dense, out).dsd(values, dense_t, info, out_t, not transpose_sparse)
    return out


class _SDD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, info):
        ctx.save_for_backward(a, b)
        ctx.info = info
        return sdd(a, b, info)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        info = ctx.info
        ga = dsd(grad, b.transpose(-2, -1), info) if ctx.needs_input_grad[0] else None
        gb = dds(a.transpose(-2, -1), grad, info) if ctx.needs_input_grad[1] else None
        return ga, gb, None


class _DSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, dense, info):
        ctx.save_for_backward(values, dense)
        ctx.info = info
        return dsd(values, dense, info)

    @staticmethod
    def backward(ctx, grad):
        values, dense = ctx.saved_tensors
        info = ctx.info
        gv = sdd(grad, dense.transpose(-2, -1), info) if ctx.needs_input_grad[0] else None
        gd = dsd(values, grad, info, transpose_sparse=True) if ctx.needs_input_grad[1] else None
        return gv, gd, None


class _DDS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dense, values, info):
        ctx.save_for_backward(dense, values)
        ctx.info = info
        return dds(dense, values, info)

    @staticmethod
    def backward(ctx, grad):
        dense, values = ctx.saved_tensors
        info = ctx.info
        gd = dds(grad, values, info, transpose_sparse=True) if ctx.needs_input_grad[0] else None
        gv = sdd(dense.transpose(-2, -1), grad, info) if ctx.needs_input_grad[1] else None
        return gd, gv, None


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, info, causal, scale):
        y = _impl("softmax", info, values).softmax_fwd(values, info, causal, scale)
        ctx.save_for_backward(y)
        ctx.info, ctx.scale = info, scale
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _impl("softmax", ctx.info, y, grad).softmax_bwd(y, grad, ctx.info, ctx.scale), None, None, None


def _needs_grad(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Function.apply costs as much host time as the whole launch: skipped when nothing needs a gradient
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)


def masked_matmul_blocks(a: torch.Tensor, b: torch.Tensor, info: BlockLayout) -> torch.Tensor:
    """Differentiable sdd: the stored blocks of ``a @ b``."""
    return _SDD.apply(a, b, info) if _needs_grad(a, b) else sdd(a, b, info)


def sparse_dense_matmul(values: torch.Tensor, dense: torch.Tensor, info: BlockLayout) -> torch.Tensor:
    """Differentiable dsd: ``S @ dense``."""
    return _DSD.apply(values, dense, info) if _needs_grad(values, dense) else dsd(values, dense, info)


def dense_sparse_matmul(dense: torch.Tensor, values: torch.Tensor, info: BlockLayout) -> torch.Tensor:
    """Differentiable dds: ``dense @ S``."""
    return _DDS.apply(dense, values, info) if _needs_grad(dense, values) else dds(dense, values, info)


def blocks_softmax(values: torch.Tensor, info: BlockLayout, causal: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Differentiable softmax of ``scale · S`` over the stored entries of each row (``causal``: columns <= row)."""
    return _Softmax.apply(values, info, bool(causal), float(scale))
