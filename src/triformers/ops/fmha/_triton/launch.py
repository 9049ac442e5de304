"""Launchers of the attention kernels: canonical views in, tensors out (no autograd here).

``attention_forward(inp, seed) -> (out, lse)`` and ``attention_backward(...) -> (dq, dk, dv, db)`` take the
same :class:`Inputs` as every operator; masks come from :func:`mask_spec`, K/V sharing and bias broadcasting
from :mod:`_layout`. Launch configurations come from :mod:`configs`.
"""

from __future__ import annotations

import math

import torch

import triton
from triformers.ops.fmha import _layout
from triformers.ops.fmha._mask import MaskSpec, mask_spec
from triformers.ops.fmha._triton import bwd as _bwd
from triformers.ops.fmha._triton import configs
from triformers.ops.fmha._triton import fwd as _fwd
from triformers.ops.fmha._triton.common import LOG2E
from triformers.ops.fmha.common import Inputs

_INT32_DUMMY: dict[torch.device, torch.Tensor] = {}


def _dummy(device: torch.device) -> torch.Tensor:
    if device not in _INT32_DUMMY:
        _INT32_DUMMY[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _INT32_DUMMY[device]


def _varlen_arrays(bias, spec: MaskSpec, device: torch.device):
    """``(seq_q, k_start, k_len)`` int32 device tensors, cached on the bias object per device."""
    cache = getattr(bias, "_triformers_varlen", None)
    if cache is None:
        cache = {}
        try:
            object.__setattr__(bias, "_triformers_varlen", cache)
        except (AttributeError, TypeError):
            pass
    if device not in cache:
        packed = torch.tensor([*spec.q_starts, *spec.k_starts, *spec.k_lens], dtype=torch.int32)
        packed = packed.to(device, non_blocking=True)
        nb = spec.num_blocks
        cache[device] = (packed[: nb + 1], packed[nb + 1: 2 * nb + 1], packed[2 * nb + 1:])
    return cache[device]


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class _Call:
    """Everything both directions derive from the inputs: views, mask, sizes, kernel flags."""

    def __init__(self, inp: Inputs):
        self.inp = inp
        self.L = _layout.canonical(inp.query, inp.key, inp.value, inp.tensor_bias)
        self.spec = mask_spec(inp.attn_bias)
        L, spec = self.L, self.spec
        self.B, self.Mq, self.G, self.HG, self.K = L.q.shape
        self.Mkv, self.Kv = L.k.shape[1], L.v.shape[-1]
        self.num_heads = self.G * self.HG
        self.kv_shared = L.k.shape[3] == 1 and self.HG > 1
        self.device = inp.query.device
        self.scale = inp.scale_float
        if spec.is_block_diagonal:
            self.Z = spec.num_blocks
            self.max_q = max((b - a for a, b in zip(spec.q_starts, spec.q_starts[1:])), default=0)
            self.max_k = max(spec.k_lens, default=0)
            self.seq_q, self.k_start, self.k_len = _varlen_arrays(inp.attn_bias, spec, self.device)
        else:
            self.Z, self.max_q, self.max_k = self.B, self.Mq, self.Mkv
            self.seq_q = self.k_start = self.k_len = _dummy(self.device)
        self.block_d = max(16, triton.next_power_of_2(self.K))
        self.block_dv = max(16, triton.next_power_of_2(self.Kv))
        self.flags = dict(
            EVEN_D=self.block_d == self.K and self.block_dv == self.Kv,
            IS_VARLEN=spec.is_block_diagonal,
            BOTTOM_RIGHT=spec.bottom_right,
            HAS_WL=spec.window_left is not None,
            HAS_WR=spec.window_right is not None,
            HAS_BIAS=L.bias is not None,
            HAS_DROPOUT=inp.p > 0.0,
            INPUT_PRECISION=_input_precision(inp.query.dtype),
        )
        self.wl = 0 if spec.window_left is None else spec.window_left
        self.wr = 0 if spec.window_right is None else spec.window_right
        self.kind = configs.mask_kind(spec)

    def kv_strides(self, x5: torch.Tensor) -> tuple[int, int, int, int]:
        """(b, n, g, h) strides of a canonical K/V view; the head stride is 0 when the heads share it."""
        return x5.stride(0), x5.stride(1), x5.stride(2), 0 if self.kv_shared else x5.stride(3)

    def bias_strides(self) -> tuple[int, ...]:
        b = self.L.bias
        return tuple(b.stride()) if b is not None else (0, 0, 0, 0, 0)


def _q_strides(x5: torch.Tensor) -> tuple[int, int, int, int]:
    return x5.stride(0), x5.stride(1), x5.stride(2), x5.stride(3)


def attention_forward(inp: Inputs, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` in the caller's layout; lse float32 ``[B, H, Mq]`` (``[B, G, H, Mq]``)."""
    c = _Call(inp)
    q = inp.query
    out = torch.empty((*q.shape[:-1], c.Kv), dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], *q.shape[2:-1], c.Mq), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or c.Z == 0:
        return out, lse
    if c.max_k == 0:
        return out.zero_(), lse.fill_(-math.inf)
    out5, lse5 = c.L.to5(out), c.L.lse5(lse)
    cfg = configs.forward_config(c)
    grid = (c.Z * c.num_heads, triton.cdiv(c.max_q, cfg.block_m))
    _fwd.attn_fwd[grid](
        c.L.q, c.L.k, c.L.v, out5, lse5, c.L.bias if c.L.bias is not None else out5,
        c.seq_q, c.k_start, c.k_len,
        *_q_strides(c.L.q), *c.kv_strides(c.L.k), *c.kv_strides(c.L.v), *_q_strides(out5),
        lse5.stride(0), lse5.stride(1), lse5.stride(2),
        *c.bias_strides(),
        c.num_heads, c.HG, c.Mq, c.Mkv, c.scale * LOG2E, c.wl, c.wr, float(inp.p), seed or 0, c.K, c.Kv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **c.flags,
    )
    return out, lse


def attention_backward(
    inp: Inputs, out: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, seed: int | None, *,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dq, dk, dv, dbias)`` for the caller's tensors (dbias None unless the bias requires grad)."""
    c = _Call(inp)
    q, k, v = inp.query, inp.key, inp.value
    bias = inp.tensor_bias
    L = c.L
    dev = q.device
    if grad.stride(-1) != 1:  # e.g. the expanded gradient of out.sum(): kernels read rows contiguously
        grad = grad.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    go5, o5, lse5 = L.to5(grad), L.to5(out), L.lse5(lse)
    want_db = bias is not None and bias.requires_grad
    # buffers in the canonical layouts; K/V gradients per shared head
    dk5 = torch.zeros(L.k.shape[:3] + (1 if c.kv_shared else c.HG, c.K), dtype=k.dtype, device=dev)
    dv5 = torch.zeros(L.v.shape[:3] + (1 if c.kv_shared else c.HG, c.Kv), dtype=v.dtype, device=dev)
    if q.numel() == 0 or c.Z == 0 or c.max_k == 0:
        dq = torch.zeros_like(q)
        db = None
        if want_db:
            db = _layout.grad_for_input(torch.zeros_like(bias), bias)
        return dq, _layout.shared_kv_grad(dk5, k, L), _layout.shared_kv_grad(dv5, v, L), db
    delta = torch.empty((c.B, c.G, c.HG, c.Mq), dtype=torch.float32, device=dev)
    pre_m = 64
    _bwd.attn_bwd_preprocess[(c.B * c.num_heads, triton.cdiv(c.Mq, pre_m))](
        o5, go5, delta, *_q_strides(o5), *_q_strides(go5), delta.stride(0), delta.stride(1), delta.stride(2),
        c.num_heads, c.HG, c.Mq, c.Kv, BLOCK_M=pre_m, BLOCK_DV=c.block_dv,
    )
    db_mode, db_buf, db_view = 0, None, None
    if want_db:
        full = L.bias.shape
        if deterministic:
            reduce_dims = ()
        else:
            reduce_dims = _layout.bias_reduce_dims(bias, L)
        db_buf = torch.zeros([1 if d in reduce_dims else s for d, s in enumerate(full)], dtype=torch.float32,
                             device=dev)
        db_view = db_buf.expand(full)
        if not reduce_dims:
            db_mode = 1
        elif 3 in reduce_dims and 4 not in reduce_dims:
            db_mode = 3
        else:
            db_mode = 2
    atomic_dq = not deterministic
    dq_acc = torch.zeros(L.q.shape, dtype=torch.float32, device=dev) if atomic_dq else None
    cfg = configs.backward_config(c)
    num_kv_heads = c.G * (1 if c.kv_shared else c.HG)
    dq_arg = dq_acc if atomic_dq else o5
    db_arg = db_view if db_view is not None else o5
    db_strides = tuple(db_view.stride()) if db_view is not None else (0, 0, 0, 0, 0)
    _bwd.attn_bwd_dkdv[(c.Z * num_kv_heads, triton.cdiv(c.max_k, cfg.block_n))](
        L.q, L.k, L.v, go5, lse5, delta, L.bias if L.bias is not None else o5, db_arg, dq_arg, dk5, dv5,
        c.seq_q, c.k_start, c.k_len,
        *_q_strides(L.q), *c.kv_strides(L.k), *c.kv_strides(L.v), *_q_strides(go5),
        lse5.stride(0), lse5.stride(1), lse5.stride(2),
        *c.bias_strides(), *db_strides, *(_q_strides(dq_acc) if atomic_dq else (0, 0, 0, 0)),
        *_q_strides(dk5), *_q_strides(dv5),
        c.num_heads, c.HG, c.Mq, c.Mkv, c.scale * LOG2E, c.scale, c.wl, c.wr, float(inp.p), seed or 0, c.K, c.Kv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv,
        DB_MODE=db_mode, ATOMIC_DQ=atomic_dq, KV_SHARED=c.kv_shared,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **c.flags,
    )
    if atomic_dq:
        dq = L.from5(dq_acc.mul_(c.scale).to(q.dtype))
    else:
        dq5 = torch.empty(L.q.shape, dtype=q.dtype, device=dev)
        dcfg = configs.dq_config(c)
        _bwd.attn_bwd_dq[(c.Z * c.num_heads, triton.cdiv(c.max_q, dcfg.block_m))](
            L.q, L.k, L.v, go5, lse5, delta, L.bias if L.bias is not None else o5, dq5,
            c.seq_q, c.k_start, c.k_len,
            *_q_strides(L.q), *c.kv_strides(L.k), *c.kv_strides(L.v), *_q_strides(go5),
            lse5.stride(0), lse5.stride(1), lse5.stride(2), *c.bias_strides(), *_q_strides(dq5),
            c.num_heads, c.HG, c.Mq, c.Mkv, c.scale * LOG2E, c.scale, c.wl, c.wr, float(inp.p), seed or 0, c.K,
            c.Kv, BLOCK_M=dcfg.block_m, BLOCK_N=dcfg.block_n, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv,
            num_warps=dcfg.num_warps, num_stages=dcfg.num_stages, **c.flags,
        )
        dq = L.from5(dq5)
    dq = dq.reshape(q.shape)
    dk = _layout.shared_kv_grad(dk5, k, L)
    dv = _layout.shared_kv_grad(dv5, v, L)
    db = None
    if want_db:
        red = _layout.bias_reduce_dims(bias, L)
        if deterministic and red:
            db_buf = db_buf.sum(dim=red, keepdim=True)
        db = _layout.grad_for_input(L.bias_from5(db_buf).to(bias.dtype), bias)
    return dq, dk, dv, db
