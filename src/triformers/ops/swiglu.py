"""SwiGLU (xFormers' ``xformers.ops.swiglu_op``), fused, for fp16 and bf16 (and fp32).

``swiglu(x, ...) = w3(silu(w1 x + b1) ⊙ (w2 x + b2)) + b3``.

The fused operator keeps the GEMMs in torch (cuBLAS) and fuses everything between them:

* forward: when w1 and w2 are the two halves of one packed ``[2H, D]`` weight (``SwiGLU`` stores them so),
  one GEMM computes ``h = x [w1; w2]ᵀ + [b1; b2]`` ``[T, 2H]`` (one read of x instead of two); one Triton pass
  reads both halves of h by stride and writes g = silu(a) ⊙ b; one GEMM gives the output.
* backward: dg = dout w3 (GEMM); one Triton pass reads h and dg and writes both halves of dh straight
  into one ``[T, 2H]`` buffer, recomputes g for dw3 instead of keeping it alive since the forward, and sums
  db1/db2 on the way; then dx = dh [w1; w2] and d[w1; w2] = dhᵀ x are one GEMM each, and the packed
  weight gradient reaches the packed parameter without a copy (``unbind``'s backward).

Eager torch moves 5·T·H elements between the GEMMs in the forward (silu: r+w, mul: 2r+w) and ~10·T·H in
the backward; the fused passes move 3·T·H and 6·T·H. Unpacked weights run two GEMMs where packed ones run
one; everything else is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from triformers._triton import interpret_mode, is_triton_available
from triformers.ops._triton.swiglu import silu_mul_bwd, silu_mul_fwd
from triformers.ops.unbind import get_stack_strides, unbind
from triformers.triton._common import autocast_dtype, device_type, rows_2d, shaped, use_triton

__all__ = [
    "swiglu",
    "SwiGLU",
    "SwiGLUOp",
    "SwiGLUOpDispatch",
    "SwiGLUEagerOp",
    "SwiGLUFusedOp",
    "SwiGLUPackedFusedOp",
    "silu_mul",
    "silu_mul_reference",
    "swiglu_reference",
]


def swiglu_reference(x, w1, b1, w2, b2, w3, b3) -> torch.Tensor:
    """Pure torch: ``F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w2, b2), w3, b3)``."""
    F = nn.functional
    return F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w2, b2), w3, b3)


def silu_mul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pure torch: ``silu(a) * b`` (float32 maths for 16-bit inputs)."""
    compute = torch.promote_types(a.dtype, torch.float32)
    return (nn.functional.silu(a.to(compute)) * b.to(compute)).to(a.dtype)


class _SiluMulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a2, b2 = rows_2d(a), rows_2d(b)
        ctx.save_for_backward(a2, b2)
        ctx.shape = a.shape
        return shaped(silu_mul_fwd(a2, b2), a.shape)

    @staticmethod
    def backward(ctx, dg):
        a2, b2 = ctx.saved_tensors
        da = torch.empty(a2.shape, device=a2.device, dtype=a2.dtype)
        db = torch.empty(b2.shape, device=b2.device, dtype=b2.dtype)
        silu_mul_bwd(a2, b2, rows_2d(dg), da, db)
        return shaped(da, ctx.shape), shaped(db, ctx.shape)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` in one pass (SwiGLU's elementwise core); autograd for both inputs.

    Raises:
        ValueError: if a and b differ in shape or dtype.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"silu_mul needs a and b of one shape and dtype, got a: {tuple(a.shape)} {a.dtype}, "
            f"b: {tuple(b.shape)} {b.dtype}"
        )
    if a.numel() == 0 or not use_triton("silu_mul", a, b):
        return silu_mul_reference(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _SiluMulFn.apply(a, b)
    return shaped(silu_mul_fwd(rows_2d(a), rows_2d(b)), a.shape)


def _packed(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor | None:
    """[w1; w2] as one [2H, D] view when w2 directly follows w1 in memory, else None."""
    strides = get_stack_strides((w1, w2), 0)
    if strides is None or w1.dim() != 2 or strides[0] != w1.shape[0] * strides[1]:
        return None
    return w1.as_strided((2 * w1.shape[0], w1.shape[1]), strides[1:])


class _SwiGLUFn(torch.autograd.Function):
    """The fused operator; packs the first GEMM when w1/w2 (and b1/b2) are packed in memory."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3):
        x2 = rows_2d(x)  # [T, D]
        H = w1.shape[0]
        w12 = _packed(w1, w2)
        b12 = _packed(b1.view(-1, 1), b2.view(-1, 1)) if b1 is not None else None
        if w12 is not None:
            if b1 is not None:
                b12 = b12.view(-1) if b12 is not None else torch.cat([b1, b2])  # [2H]: tiny if not packed
                h = torch.addmm(b12, x2, w12.t())  # [T, 2H]
            else:
                h = x2 @ w12.t()
            a, b = h[:, :H], h[:, H:]
        else:
            a = torch.addmm(b1, x2, w1.t()) if b1 is not None else x2 @ w1.t()
            b = torch.addmm(b2, x2, w2.t()) if b2 is not None else x2 @ w2.t()
        g = silu_mul_fwd(a, b)  # [T, H]
        out = torch.addmm(b3, g, w3.t()) if b3 is not None else g @ w3.t()
        ctx.save_for_backward(x2, w1, w2, w3, a, b)
        ctx.packed, ctx.x_shape, ctx.has_b12, ctx.has_b3 = (
            w12 is not None,
            x.shape,
            b1 is not None,
            b3 is not None,
        )
        return out.view(*x.shape[:-1], w3.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x2, w1, w2, w3, a, b = ctx.saved_tensors
        T, H = a.shape
        dout2 = rows_2d(dout)  # [T, O]
        need = ctx.needs_input_grad
        dg = dout2 @ w3  # [T, H]
        dh = torch.empty((T, 2 * H), device=a.device, dtype=a.dtype)
        g = torch.empty_like(dg) if need[5] else None
        db12 = silu_mul_bwd(a, b, dg, dh[:, :H], dh[:, H:], g, compute_dbias=ctx.has_b12 and (need[2] or need[4]))
        dw3 = dout2.t() @ g if need[5] else None
        db3 = dout2.sum(0) if ctx.has_b3 and need[6] else None
        dx = dw1 = dw2 = None
        if ctx.packed:
            w12 = _packed(w1, w2)
            dx = (dh @ w12).view(ctx.x_shape) if need[0] else None
            if need[1] or need[3]:
                dw12 = dh.t() @ x2  # [2H, D]: dw1, dw2 are its halves, views of one buffer
                dw1, dw2 = dw12[:H], dw12[H:]
        else:
            da, db = dh[:, :H], dh[:, H:]
            dx = torch.addmm(da @ w1, db, w2).view(ctx.x_shape) if need[0] else None
            dw1 = da.t() @ x2 if need[1] else None
            dw2 = db.t() @ x2 if need[3] else None
        db1 = db12[:H].to(dh.dtype) if db12 is not None and need[2] else None
        db2 = db12[H:].to(dh.dtype) if db12 is not None and need[4] else None
        return dx, dw1, db1, dw2, db2, dw3, db3


class SwiGLUOp:
    """A SwiGLU operator: ``op(x, w1, b1, w2, b2, w3, b3)``.

    Attributes:
        NAME: operator name. PACKED_WEIGHTS: whether it needs w1/w2 packed in one buffer.
    """

    def __init__(self, op, packed_weights: bool, name: str, constraints) -> None:
        self.NAME = name
        self.PACKED_WEIGHTS = packed_weights
        self.op = op
        self.constraints = constraints

    def supports(self, op: SwiGLUOpDispatch) -> bool:
        if self.PACKED_WEIGHTS and not op.packed_weights:
            return False
        return all(c(op) for c in self.constraints)

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        return self.op(*args)

    def __repr__(self) -> str:
        return f"SwiGLUOp:{self.NAME}"


def _cast_pair(t1: torch.Tensor, t2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast t1, t2 to ``dtype``, keeping them packed in one buffer when they were."""
    if t1.dtype == dtype and t2.dtype == dtype:
        return t1, t2
    t12 = _packed(t1.view(t1.shape[0], -1), t2.view(t2.shape[0], -1))
    if t12 is None:
        return t1.to(dtype), t2.to(dtype)
    return unbind(t12.to(dtype).view(2, *t1.shape), 0)


def _fused(x, w1, b1, w2, b2, w3, b3):
    amp = autocast_dtype(device_type(x))
    if amp is not None:  # as F.linear under autocast: every operand in the autocast dtype
        x, w3 = x.to(amp), w3.to(amp)
        b3 = b3.to(amp) if b3 is not None else None
        w1, w2 = _cast_pair(w1, w2, amp)
        b1, b2 = _cast_pair(b1, b2, amp) if b1 is not None else (b1, b2)
    if x.numel() == 0 or not use_triton("swiglu", x, w1, w2, w3):
        with torch.autocast(x.device.type, enabled=False):
            return swiglu_reference(x, w1, b1, w2, b2, w3, b3)
    dtypes = {t.dtype for t in (x, w1, b1, w2, b2, w3, b3) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(
            f"swiglu needs one dtype for x, weights and biases (got {sorted(map(str, dtypes))}); "
            "cast them or run under torch.autocast"
        )
    with torch.autocast(x.device.type, enabled=False):
        return _SwiGLUFn.apply(x, w1, b1, w2, b2, w3, b3)


def _packed_fused(x, w1, b1, w2, b2, w3, b3):
    if _packed(w1, w2) is None:
        raise NotImplementedError("w1/w2 needs to be properly packed (w2 must directly follow w1 in memory)")
    if b1 is not None and _packed(b1.view(-1, 1), b2.view(-1, 1)) is None:
        raise NotImplementedError("b1/b2 needs to be properly packed (b2 must directly follow b1 in memory)")
    return _fused(x, w1, b1, w2, b2, w3, b3)


def _triton_runs(op: SwiGLUOpDispatch) -> bool:
    device = torch.device(op.device)
    return is_triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpret_mode()))


def _kernel_dtype(op: SwiGLUOpDispatch) -> bool:
    return (op.dtype_autocast_gpu or op.dtype) in (torch.float16, torch.bfloat16, torch.float32)


SwiGLUEagerOp = SwiGLUOp(swiglu_reference, False, "eager", [])
SwiGLUFusedOp = SwiGLUOp(_fused, False, "fused", [_triton_runs, _kernel_dtype])
SwiGLUPackedFusedOp = SwiGLUOp(_packed_fused, True, "fused.p", [_triton_runs, _kernel_dtype])


@dataclass
class SwiGLUOpDispatch:
    """What the dispatcher looks at; ``op`` picks the first supporting operator, packed first.

    Attributes:
        device, dtype: of x. dtype_autocast_gpu: the autocast dtype if autocast is on for x's device, else
        the weights' dtype. packed_weights: w1/w2 packed in one buffer. bias_enabled: all three biases given.
    """

    device: torch.device | str
    dtype: torch.dtype
    dtype_autocast_gpu: torch.dtype | None
    packed_weights: bool
    bias_enabled: bool

    @property
    def op(self) -> SwiGLUOp:
        for op in (SwiGLUPackedFusedOp, SwiGLUFusedOp):
            if op.supports(self):
                return op
        return SwiGLUEagerOp

    @staticmethod
    def from_arguments(x, w1, b1, w2, b2, w3, b3) -> SwiGLUOpDispatch:
        return SwiGLUOpDispatch(
            device=x.device,
            dtype=x.dtype,
            dtype_autocast_gpu=autocast_dtype(device_type(x)) or w1.dtype,
            packed_weights=_packed(w1, w2) is not None,
            bias_enabled=b1 is not None and b2 is not None and b3 is not None,
        )


def _check(x, w1, b1, w2, b2, w3, b3) -> None:
    if w1.dim() != 2 or w1.shape != w2.shape:
        raise ValueError(f"w1 and w2 must be 2-D of one shape [H, D], got w1: {tuple(w1.shape)}, w2: {tuple(w2.shape)}")
    if x.shape[-1] != w1.shape[1]:
        raise ValueError(f"x.shape={tuple(x.shape)} does not end with w1's input size {w1.shape[1]}")
    for name, bias, size in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"{name}.shape={tuple(bias.shape)} must be ({size},), the rows of w1/w2")
    if (b1 is None) != (b2 is None):
        raise ValueError("pass both b1 and b2, or neither")
    if w3.dim() != 2 or w3.shape[1] != w2.shape[0]:
        raise ValueError(f"w3.shape={tuple(w3.shape)} must be [O, {w2.shape[0]}] (its input is the hidden size)")
    if b3 is not None and tuple(b3.shape) != (w3.shape[0],):
        raise ValueError(f"b3.shape={tuple(b3.shape)} must be ({w3.shape[0]},), the rows of w3")


def swiglu(x, w1, b1, w2, b2, w3, b3, *, op: SwiGLUOp | None = None) -> torch.Tensor:
    """``F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w2, b2), w3, b3)``.

    Args:
        x: input ``[..., D]``.
        w1, w2: ``[H, D]``; b1, b2: ``[H]`` or None.
        w3: ``[O, H]``; b3: ``[O]`` or None.
        op: operator to use (default None: ``SwiGLUOpDispatch`` picks one).

    Returns:
        Tensor ``[..., O]``.

    Raises:
        ValueError: on inconsistent shapes. NotImplementedError: ``SwiGLUPackedFusedOp`` on unpacked weights.
    """
    _check(x, w1, b1, w2, b2, w3, b3)
    if op is None:
        op = SwiGLUOpDispatch.from_arguments(x, w1, b1, w2, b2, w3, b3).op
    return op(x, w1, b1, w2, b2, w3, b3)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward block with w1/w2 packed in one ``nn.Linear`` (``w12``) by default.

    Args:
        in_features: D. hidden_features: H. out_features: O (default: in_features).
        bias: biases on all three projections (default True).
        _pack_weights: store w1/w2 as ``w12`` ``[2H, D]`` (first H rows = w1) so the first GEMM is one call.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        bias: bool = True,
        *,
        _pack_weights: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.w12: nn.Linear | None
        if _pack_weights:
            self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        else:
            self.w12 = None
            self.w1 = nn.Linear(in_features, hidden_features, bias=bias)
            self.w2 = nn.Linear(in_features, hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.op: SwiGLUOp | None = None

    def _ordered_params(self) -> list[torch.Tensor | None]:
        """``[w1, b1, w2, b2, w3, b3]``; w1/w2 (b1/b2) are views of the packed parameter."""
        if self.w12 is not None:
            w12, b12 = self.w12.weight, self.w12.bias
            w1, w2 = unbind(w12.view(2, w12.shape[0] // 2, w12.shape[1]), 0)
            b1, b2 = unbind(b12.view(2, b12.shape[0] // 2), 0) if b12 is not None else (None, None)
        else:
            w1, w2, b1, b2 = self.w1.weight, self.w2.weight, self.w1.bias, self.w2.bias
        return [w1, b1, w2, b2, self.w3.weight, self.w3.bias]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, *self._ordered_params(), op=self.op)
