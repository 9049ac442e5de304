"""How ``fmha.sdpa`` calls torch's SDPA on CUDA: cuDNN first in the backend order, and the output's gradient
handed to SDPA's backward in the output's strides."""

from __future__ import annotations

import contextlib

import torch


class _CudnnFirst:
    """Context manager putting torch's cuDNN SDPA kernel first in its priority order (the other backends
    keep their order, and backends the user disabled stay disabled): cuDNN was 1.3x to 1.8x faster than the
    flash backend on every dense bf16 record of the H100 benchmark, forward and forward+backward, while
    torch's default order tries flash first. Setting the order directly costs ~0.3 us; ``sdpa_kernel(...,
    set_priority=True)`` cost ~16 us per call, which showed on small kernels."""

    _CUDNN = 3  # torch._C._SDPBackend.CUDNN_ATTENTION

    def __enter__(self):
        self.prev = torch._C._get_sdp_priority_order()
        torch._C._set_sdp_priority_order([self._CUDNN] + [b for b in self.prev if b != self._CUDNN])

    def __exit__(self, *exc):
        torch._C._set_sdp_priority_order(self.prev)


class _GradInOutputStrides(torch.autograd.Function):
    """Identity whose backward hands the gradient on in the strides of the output it flows into.

    torch's cuDNN SDPA backward assumes ``grad_output.strides() == output.strides()`` (it materialized a matching
    copy up to torch 2.5, and trusts cuDNN >= 9.5.1 to take any layout since): with torch 2.11 on an H200 a
    gradient in another layout than the output's gave wrong dQ/dK/dV, off by up to 1.3 against 0.003 for the
    right ones (bf16, B = 2, H = 8, M = 512, K = 64: a contiguous [B, H, M, K] output, its gradient contiguous
    as [B, M, H, K]), while the flash and memory-efficient backends were right. Inputs handed over as transposed
    [B, H, M, K] tensors, or gradients from another layer's layout, meet that case. A gradient already in the
    output's strides passes untouched (no copy)."""

    @staticmethod
    def forward(ctx, out):
        ctx.layout = (out.shape, out.stride())
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        shape, stride = ctx.layout
        if grad.stride() == stride:
            return grad
        return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def grad_layout_guard(out: torch.Tensor) -> torch.Tensor:
    """``out``, through :class:`_GradInOutputStrides` where its backward runs one of torch's CUDA kernels.
    ``torch.jit.trace`` gets it whatever the grad mode: its check traces the call again without gradients, and
    both traces must hold the same nodes (a traced module may also train)."""
    if out.device.type == "cuda" and (torch.jit.is_tracing() or (out.requires_grad and torch.is_grad_enabled())):
        return _GradInOutputStrides.apply(out)
    return out


def cuda_backends():
    if torch.compiler.is_compiling():  # not traceable; compiled graphs keep torch's own order
        return contextlib.nullcontext()
    if hasattr(torch._C, "_set_sdp_priority_order") and hasattr(torch._C, "_get_sdp_priority_order"):
        return _CudnnFirst()
    return contextlib.nullcontext()  # torch without priorities: its own order
