"""``fmha.sdpa``: attention through ``torch.nn.functional.scaled_dot_product_attention``.

Used wherever SDPA expresses the inputs exactly and reaches one of torch's fused kernels (flash or cuDNN
or memory-efficient on CUDA, flash on the CPU): no bias, top-left causal with ``Mq == Mkv``, a tensor bias,
GQA/MQA through ``enable_gqa``, and block-diagonal masks (non-causal, or causal with equal query and key
lengths per block) as one SDPA call per block. Inputs SDPA would only run in its O(M²) math backend are
refused with that reason, so the dispatcher picks another operator instead of silently using it.

Its output carries torch's own autograd graph (``NATIVE_AUTOGRAD``): ``memory_efficient_attention`` with
gradients calls it directly, and torch's fused backward runs. torch's kernels do not hand back the lse, so
where a call needs it (``memory_efficient_attention_forward_requires_grad``, pairing with another backward
operator) it is computed separately: one pass of ``q @ k.T`` over chunks of queries, whose scores are
reduced to their log-sum-exp and dropped (float32, at most ``LSE_CHUNK_ELEMENTS`` scores at a time). Its
backward operator (for ``memory_efficient_attention_backward``) recomputes the forward under autograd.

Empty inputs (``Mq = 0`` or ``Mkv = 0``) run as plain matmuls (nothing to compute): an output of zeros,
lse ``-inf``, zero gradients, as the other operators give.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from triformers.ops.common import register_operator
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha._layout import _stride0_shared, expanded_base
from triformers.ops.fmha._sdpa_backends import cuda_backends, grad_layout_guard
from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, Context, Gradients, Inputs

_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
_HAS_GQA = _TORCH_VERSION >= (2, 5)
_MATH_BACKEND = 0  # torch._C._SDPBackend.MATH
_ERROR_BACKEND = -1

_CAUSAL_SQUARE = (ab.LowerTriangularMask, ab.LowerTriangularFromBottomRightMask)

# Scores held at once by the separate lse pass (float32: 64 MiB), bounding its memory like the chunked operator's.
LSE_CHUNK_ELEMENTS = 2**24

# torch's CPU flash backward splits the queries into blocks of 32, 64 or 256 rows (fewer than 192, fewer than
# 768, otherwise: aten/src/ATen/native/cpu/FlashAttentionKernel.cpp) and adds each block's share of dK and dV
# into the gradients in their own dtype, so a float16/bfloat16 dK or dV is rounded once per query block. After n
# roundings the relative error can reach n * u (u = 2**-8 for bfloat16, 2**-11 for float16). Where that exceeds the
# backward tolerance (xFormers': rtol 0.1 bfloat16, 0.02 float16, i.e. more than 25 or 40 blocks of 256: above 6400
# or 10240 queries), gradients go through the chunked operator, which accumulates in float32 and keeps a float32
# output for the backward (tests/api/test_dispatch_rules.py checks both at Mq = 65537). Measured (K = 8, inputs
# randn * 3, max of |dX - ref| - rtol * |ref| against atol 0.9 bfloat16 / 0.1 float16): bfloat16 dK 0.92 to 1.12
# at Mq = 16384 (Mkv = 4 or 512), 3.2 at Mq = 65537; float16 dK 0.31 at Mq = 65537, Mkv = 64; within it at
# Mq <= 8192 (bfloat16) and 16384 (float16).
_CPU_BW_Q_BLOCK = ((768, 256), (192, 64), (0, 32))
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


_BLOCK_TYPES = (ab.BlockDiagonalMask, ab.BlockDiagonalCausalMask, ab.BlockDiagonalCausalFromBottomRightMask)


def _shared_head(x: torch.Tensor, dim: int, squeeze: bool) -> torch.Tensor:
    """Head 0 of K/V expanded over heads (stride 0), for SDPA's ``enable_gqa``: the tensor ``x`` expands,
    when autograd would route its gradient there (``_layout.expanded_base``), so that SDPA's gradient reaches
    it directly; otherwise a view of ``x``, whose backward (zeros with the summed gradient in head 0) is what
    the Triton operator hands autograd too (``_layout.grad_for_input``)."""
    base = expanded_base(x)
    if base is not None:
        return base
    return x.select(dim, 0) if squeeze else x.narrow(dim, 0, 1)


def _cpu_bw_q_block(Mq: int) -> int:
    return next(block for least, block in _CPU_BW_Q_BLOCK if Mq >= least)


def half_backward_reasons(inp: Inputs) -> list[str]:
    """Why torch's CPU backward would miss the tolerance on ``inp`` (float16/bfloat16 dK and dV rounded once per
    query block of its kernel, see ``_CPU_BW_Q_BLOCK``); empty unless the gradients would be inaccurate."""
    q = inp.query
    u = _UNIT_ROUNDOFF.get(q.dtype)
    if u is None or q.device.type != "cpu":
        return []
    bias = inp.attn_bias
    if type(bias) in _BLOCK_TYPES:  # one SDPA call per block: the longest block counts
        Mq = bias.q_seqinfo.max_seqlen
    else:
        Mq = q.shape[1]
    blocks = -(-Mq // _cpu_bw_q_block(Mq))
    rtol = AttentionBwOpBase.ERROR_RTOL[q.dtype]
    if blocks * u <= rtol:
        return []
    return [
        f"torch's CPU backward rounds {q.dtype} dK/dV once per block of {_cpu_bw_q_block(Mq)} queries: {blocks} "
        f"blocks (Mq={Mq}) can err by {blocks * u:.3g} relative, more than the tolerance {rtol}"
    ]


class _Plan:
    """How one call maps onto SDPA: BHMK views, causal flag, mask, GQA flag, and blocks to loop over."""

    def __init__(self, inp: Inputs):
        self.reasons: list[str] = []
        q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
        self.source = (q, k, v, bias)
        self.out_shape = (*q.shape[:-1], v.shape[-1])
        self.gqa = False
        if q.ndim == 3:  # BMK [B*H, M, K], asked before normalize_bmhk: as BMHK with one head
            q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
            bias = bias.unsqueeze(1) if isinstance(bias, torch.Tensor) and bias.ndim == 3 else bias
        # B = 0 too: torch's CUDA SDPA returns None for an empty batch (torch 2.11)
        self.empty = q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0
        if q.ndim == 5:
            B, M, G, H = q.shape[:4]
            q4 = self._fold_heads("query", q)
            if _stride0_shared(k, 3) and _stride0_shared(v, 3):
                k4, v4, self.gqa = _shared_head(k, 3, True), _shared_head(v, 3, True), True
            else:
                k4, v4 = self._fold_heads("key", k), self._fold_heads("value", v)
        else:
            q4, k4, v4 = q, k, v
            if _stride0_shared(k, 2) and _stride0_shared(v, 2):
                k4, v4, self.gqa = _shared_head(k, 2, False), _shared_head(v, 2, False), True
        if self.gqa and not _HAS_GQA:
            self.reasons.append(f"GQA/MQA needs torch >= 2.5 (enable_gqa), this is {torch.__version__}")
        self.q, self.k, self.v = (None if x is None else x.transpose(1, 2) for x in (q4, k4, v4))
        self.is_causal = False
        self.mask = None
        self.blocks: list[tuple[int, int, int, int]] | None = None
        Mq, Mkv = q.shape[1], k.shape[1]
        kind = type(bias)
        if bias is None:
            pass
        elif kind in _CAUSAL_SQUARE:
            if Mq != Mkv:
                self.reasons.append(f"causal masks need Mq == Mkv in SDPA (got Mq={Mq}, Mkv={Mkv})")
            self.is_causal = True
        elif kind is torch.Tensor:
            self.mask = bias if q.ndim == 4 else self._fold_bias(bias)  # [B|1, H|1, Mq|1, Mkv]
        elif kind in _BLOCK_TYPES:
            q_iv = list(bias.q_seqinfo.intervals())
            k_iv = list(bias.k_seqinfo.intervals())
            self.is_causal = kind is not ab.BlockDiagonalMask
            if self.is_causal and any((a1 - a0) != (b1 - b0) for (a0, a1), (b0, b1) in zip(q_iv, k_iv)):
                self.reasons.append("causal block-diagonal masks need equal query and key lengths per block")
            self.blocks = [(a0, a1, b0, b1) for (a0, a1), (b0, b1) in zip(q_iv, k_iv)]
        else:
            self.reasons.append(f"attn_bias type is {kind.__name__}")

    def _fold_heads(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        B, M, G, H, K = x.shape
        if G > 1 and H > 1 and x.stride(2) != x.stride(3) * H:
            self.reasons.append(f"{name}'s G and H dims cannot be merged into one head dim without a copy")
            return None
        return x.reshape(B, M, G * H, K)

    def _fold_bias(self, bias: torch.Tensor) -> torch.Tensor | None:
        B, G, H, Mq, Mkv = bias.shape
        full = bias.expand(B, G, H, Mq, Mkv)
        if G > 1 and H > 1 and full.stride(1) != full.stride(2) * H:
            self.reasons.append("attn_bias's G and H dims cannot be merged without a copy")
            return None
        return full.reshape(B, G * H, Mq, Mkv)

    def backend_reasons(self, inp: Inputs) -> list[str]:
        # Under torch.compile the probe cannot be traced (it returns an int); the compiled graph keeps
        # torch's own run-time backend choice then.
        if self.reasons or self.empty or not hasattr(torch, "_fused_sdp_choice") or torch.compiler.is_compiling():
            return []
        q, k, v = self.q, self.k, self.v
        if self.blocks:
            a0, a1, b0, b1 = max(self.blocks, key=lambda blk: blk[1] - blk[0])
            q, k, v = q[:, :, a0:a1], k[:, :, b0:b1], v[:, :, b0:b1]
        kwargs = {"scale": inp.scale}
        if _HAS_GQA:
            kwargs["enable_gqa"] = self.gqa
        try:
            if q.device.type == "cuda":
                with cuda_backends():
                    choice = torch._fused_sdp_choice(q, k, v, self.mask, inp.p, self.is_causal, **kwargs)
            else:
                choice = torch._fused_sdp_choice(q, k, v, self.mask, inp.p, self.is_causal, **kwargs)
        except RuntimeError as e:
            return [f"torch SDPA refuses these inputs: {e}"]
        if choice in (_MATH_BACKEND, _ERROR_BACKEND):
            return ["torch SDPA would run these inputs in its math backend (O(Mq*Mkv) memory)"]
        return []

    def run(self, inp: Inputs) -> torch.Tensor:
        if self.q.device.type == "cuda":
            with cuda_backends():
                return self._run(inp)
        return self._run(inp)

    def _run(self, inp: Inputs) -> torch.Tensor:
        if self.empty:
            return self._run_empty(inp)
        kwargs = {"scale": inp.scale, "dropout_p": inp.p}
        if self.gqa:
            kwargs["enable_gqa"] = True
        if self.blocks is None:
            out = grad_layout_guard(F.scaled_dot_product_attention(
                self.q, self.k, self.v, attn_mask=self.mask, is_causal=self.is_causal, **kwargs
            ))  # fmt: skip
        else:
            outs = [
                grad_layout_guard(F.scaled_dot_product_attention(
                    self.q[:, :, a0:a1], self.k[:, :, b0:b1], self.v[:, :, b0:b1], is_causal=self.is_causal,
                    **kwargs,
                ))  # fmt: skip
                for a0, a1, b0, b1 in self.blocks
            ]
            out = torch.cat(outs, dim=2) if outs else self.q.new_zeros((*self.q.shape[:3], self.v.shape[-1]))
        out = out.transpose(1, 2)  # [B, Mq, H', Kv]
        return out.reshape(self.out_shape)

    def _heads_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V with one head per query head (GQA: each K/V head expanded over its group, a view)."""
        k, v, groups = self.k, self.v, self.q.shape[1] // self.k.shape[1]
        if groups == 1:
            return k, v
        B, Hk, Mkv = k.shape[:3]
        return tuple(x[:, :, None].expand(B, Hk, groups, Mkv, x.shape[-1]).flatten(1, 2) for x in (k, v))

    def _run_empty(self, inp: Inputs) -> torch.Tensor:
        """``B = 0``, ``Mq = 0`` or ``Mkv = 0``: softmax(q k^T) v as matmuls of empty tensors (zeros, zero
        gradients)."""
        k, v = self._heads_kv()
        scores = self.q @ k.transpose(-1, -2) * inp.scale_float  # [B, H', Mq, Mkv], one of them 0
        if self.mask is not None:
            scores = scores + self.mask
        out = torch.softmax(scores, dim=-1) @ v  # [B, H', Mq, Kv]
        return out.transpose(1, 2).reshape(self.out_shape)

    def lse(self, inp: Inputs) -> torch.Tensor:
        """float32 log-sum-exp of the scaled, masked scores: ``[B, H, Mq]`` (``[B, G, H, Mq]`` for BMGHK), by
        chunks of queries against all the keys they may see (their block's, for block-diagonal masks)."""
        with torch.no_grad():  # the lse of this operator has no gradient
            return self._lse(inp)

    def _lse(self, inp: Inputs) -> torch.Tensor:
        q, scale = self.q, inp.scale_float  # [B, H', Mq, K]
        B, Hq, Mq = q.shape[:3]
        k, _ = self._heads_kv()
        k = k.float()  # [B, H', Mkv, K]
        lse = torch.full((B, Hq, Mq), -math.inf, dtype=torch.float32, device=q.device)
        spans = self.blocks if self.blocks is not None else [(0, Mq, 0, k.shape[2])]
        mask = None if self.mask is None else self.mask.expand(B, Hq, Mq, k.shape[2])
        for a0, a1, b0, b1 in spans:
            kb = k[:, :, b0:b1]
            rows = max(1, LSE_CHUNK_ELEMENTS // max(1, B * Hq * (b1 - b0)))
            for r0 in range(a0, a1, rows):
                r1 = min(a1, r0 + rows)
                s = q[:, :, r0:r1].float() @ kb.transpose(-1, -2) * scale  # [B, H', rows, keys]
                if mask is not None:
                    s = s + mask[:, :, r0:r1, b0:b1]
                if self.is_causal:  # top-left causal within the (square) span
                    i = torch.arange(r0 - a0, r1 - a0, device=q.device)[:, None]
                    s = s.masked_fill(torch.arange(b1 - b0, device=q.device) > i, -math.inf)
                lse[:, :, r0:r1] = torch.logsumexp(s, dim=-1)
        if len(self.out_shape) == 5:  # BMGHK: the heads were folded as G * H
            return lse.unflatten(1, self.out_shape[2:4])
        return lse


def _plan(inp: Inputs) -> _Plan:
    """The plan of ``inp``, built once per Inputs object (reasons and run share it)."""
    plan = inp.__dict__.get("_sdpa_plan")
    current = (inp.query, inp.key, inp.value, inp.attn_bias)
    if plan is None or any(a is not b for a, b in zip(plan.source, current)):
        plan = _Plan(inp)
        inp.__dict__["_sdpa_plan"] = plan
    return plan


@register_operator
class FwOp(AttentionFwOpBase):
    """torch's fused SDPA kernels for the inputs they express exactly (see the module docstring)."""

    NAME = "sdpaF"
    SUPPORTED_DEVICES: ClassVar[set[str]] = {"cpu", "cuda"}
    SUPPORTED_DTYPES: ClassVar[set[torch.dtype]] = {torch.float32, torch.float16, torch.bfloat16}
    SUPPORTED_MAX_K = math.inf  # what the fused kernels take is checked per call with torch's own rules
    SUPPORTED_ATTN_BIAS_TYPES = frozenset({type(None), torch.Tensor, *_CAUSAL_SQUARE, *_BLOCK_TYPES})
    SUPPORTS_DROPOUT = True
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    SUPPORTS_OUTPUT_DTYPE = False  # torch's kernels write the query's dtype
    SUPPORTS_PARTIAL = False  # its lse has no gradient
    RETURNS_LSE = True  # computed separately (see the module docstring), when the call needs it
    NATIVE_AUTOGRAD = True

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(d)
        if reasons:
            return reasons
        plan = _plan(d)
        return plan.reasons + plan.backend_reasons(d)

    @classmethod
    def lse_not_supported_reasons(cls, d: Inputs) -> list[str]:
        if d.p > 0.0:
            return ["torch SDPA draws its own dropout mask, which no backward operator can replay: "
                    "with dropout, memory_efficient_attention runs torch's own backward"]
        return []

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> tuple[torch.Tensor, Context | None]:
        plan = _plan(inp)
        out = plan.run(inp)
        if not needs_gradient:
            return out, None
        if inp.p > 0.0:
            raise ValueError(cls.lse_not_supported_reasons(inp)[0])
        return out, Context(lse=plan.lse(inp), out=out)

    @classmethod
    def apply_autograd(cls, inp: Inputs) -> torch.Tensor:
        return _plan(inp).run(inp)


@register_operator
class BwOp(AttentionBwOpBase):
    """Backward for the low-level API: recomputes the SDPA forward under autograd, then runs its backward."""

    NAME = "sdpaB"
    SUPPORTED_DEVICES = FwOp.SUPPORTED_DEVICES
    SUPPORTED_DTYPES = FwOp.SUPPORTED_DTYPES
    SUPPORTED_MAX_K = FwOp.SUPPORTED_MAX_K
    SUPPORTED_ATTN_BIAS_TYPES = FwOp.SUPPORTED_ATTN_BIAS_TYPES
    SUPPORTS_DROPOUT = False
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    SUPPORTS_ATTN_BIAS_GRAD = True
    SUPPORTS_OUTPUT_DTYPE = False  # it backpropagates through a recomputed output in the query's dtype
    SUPPORTS_PARTIAL = False  # no lse gradient

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(d)
        if reasons:
            return reasons
        plan = _Plan(d)
        return plan.reasons + plan.backend_reasons(d)

    @classmethod
    def apply(cls, ctx: Context, inp: Inputs, grad: torch.Tensor) -> Gradients:
        bias = inp.attn_bias
        with torch.enable_grad():
            q, k, v = (x.detach().requires_grad_() for x in (inp.query, inp.key, inp.value))
            leaves = [q, k, v]
            if isinstance(bias, torch.Tensor) and bias.requires_grad:
                bias = bias.detach().requires_grad_()
                leaves.append(bias)
            out = FwOp.apply_autograd(Inputs(q, k, v, bias, inp.p, inp.scale))
            grads = torch.autograd.grad(out, leaves, grad)
        return Gradients(dq=grads[0], dk=grads[1], dv=grads[2], db=grads[3] if len(grads) > 3 else None)


FwOp.AUTOGRAD_BW = BwOp
