"""Launchers of the attention kernels: tensors and plain numbers in, tensors out (no autograd here).

They take only tensors, ints, floats and bools, so that they can be registered as ``torch.library`` custom
ops (``triformers::flash_fwd`` / ``flash_bwd``, in ``ops/fmha/triton.py``) that ``torch.compile`` treats as
opaque. :class:`MaskArgs` carries an attention bias as the kernels see it; :func:`mask_args` builds it.
"""

from __future__ import annotations

import functools
import math

import torch

from triformers._triton import cdiv, int_code
from triformers._triton import launch as _launch
from triformers.ops.fmha import _layout
from triformers.ops.fmha._mask import block_sparse_spec
from triformers.ops.fmha._triton import bwd as _bwd
from triformers.ops.fmha._triton import configs
from triformers.ops.fmha._triton import fwd as _fwd
from triformers.ops.fmha._triton.common import LOG2E_F as LOG2E
from triformers.ops.fmha._triton.mask_args import (  # noqa: F401  (re-exported)
    NO_WINDOW,
    MaskArgs,
    _kv_cache_mask_args,
    _mask_args,
    _varlen_arrays,
    mask_args,
)
from triformers.ops.fmha._triton.sparse_order import heavy_first

# Q/K/V/dO tiles through TMA descriptors where the strides allow (fwd.py); tests also cover the pointer path.
USE_TMA = True
# The backward adds dS K into dQ with atomics only when asked: the two-kernel backward (dK/dV, then dQ) was
# faster at every measured shape and is deterministic (benchmarks/NOTES.md).
ATOMIC_DQ = False
# Block-sparse grids run heavy programs first (sparse_order.py); tests switch it off to compare.
HEAVY_FIRST = True


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _descriptor(x: torch.Tensor, block: list[int]):
    """A TMA descriptor of ``x`` with the given block shape, or None when TMA cannot address it (base or
    strides not 16-byte aligned, stride-0 broadcast dims, last dim not contiguous)."""
    if x.data_ptr() % 16:
        return None
    shape = x.shape
    strides = _tma_strides(shape, x.stride(), x.element_size())
    if strides is None:
        return None
    # The checks are the ones TensorDescriptor.__post_init__ makes (and block shapes come from the
    # configuration table, powers of two): skipping it saves host time on every call.
    desc = object.__new__(_tensor_descriptor())
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.padding = x, list(shape), list(strides), block, "zero"
    return desc


@functools.lru_cache(maxsize=1024)
def _tma_strides(shape: torch.Size, stride: tuple[int, ...], size: int) -> tuple[int, ...] | None:
    """The descriptor strides of a tensor of this shape, strides and element size, or None when TMA cannot
    address it. Size-1 dims are never stepped over: any aligned stride stands for theirs."""
    if math.prod(shape) == 0 or stride[-1] != 1:
        return None
    out = []
    for n, st in zip(shape[:-1], stride[:-1]):
        if n == 1:
            st = 16 // size
        elif st == 0 or (st * size) % 16:
            return None
        out.append(st)
    return (*out, 1)


@functools.cache
def _tensor_descriptor():
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


_DUMMIES: dict = {}
_ZEROS: dict = {}


def _zeros_int32(device: torch.device, *shape: int) -> torch.Tensor:
    """int32 zeros of ``shape``, one tensor per device and shape (never written: a constant a CUDA graph may
    keep)."""
    t = _ZEROS.get((device, shape))
    if t is None:
        t = _ZEROS[device, shape] = torch.zeros(shape, dtype=torch.int32, device=device)
    return t


def _dummy_int32(device: torch.device) -> torch.Tensor:
    """A one-element int32 tensor per device, for the sequence-array arguments of dense calls (allocating
    one per call cost a fill kernel on every launch)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _strides4(x5: torch.Tensor) -> tuple[int, int, int, int]:
    return x5.stride()[:4]


class _Call:
    """What both directions derive from one call: canonical views, sizes, kernel flags."""

    def __init__(self, q, k, v, bias, m: MaskArgs, p: float, scale: float, share_kv: bool):
        self.L = _layout.canonical(q, k, v, bias, share_kv)
        self.m = m
        self.B, self.Mq, self.G, self.HG, self.K = self.L.q.shape
        self.Mkv, self.Kv = self.L.k.shape[1], self.L.v.shape[-1]
        self.num_heads = self.G * self.HG
        self.kv_shared = self.L.k.shape[3] == 1 and self.HG > 1
        self.device = q.device
        self.dtype = q.dtype
        self.scale = float(scale)  # a Python float always: launch keys count on the argument's type
        self.varlen = m.seq_q is not None
        self.Z = m.seq_q.shape[0] - 1 if self.varlen else self.B
        dummy = m.seq_q if self.varlen else _dummy_int32(q.device)  # never read by dense kernels
        self.seq_q, self.k_start, self.k_len = (m.seq_q, m.k_start, m.k_len) if self.varlen else (dummy,) * 3
        if self.varlen and m.k_start is None:  # paged rows from logical key 0
            self.k_start = _zeros_int32(q.device, self.Z)
        self.block_d = max(16, 1 << (self.K - 1).bit_length())
        self.block_dv = max(16, 1 << (self.Kv - 1).bit_length())
        self.flags = dict(
            IS_VARLEN=self.varlen,
            KV_SHARED=self.kv_shared,
            BOTTOM_RIGHT=m.bottom_right,
            HAS_WL=m.window_left != NO_WINDOW,
            HAS_WR=m.window_right != NO_WINDOW,
            HAS_BIAS=self.L.bias is not None,
            HAS_DROPOUT=p > 0.0,
            KEYS_PADDED=not m.keys_covered,
            BLOCK_SPARSE=m.bs_layout is not None,
            INPUT_PRECISION=_input_precision(q.dtype),
        )
        self.wl, self.wr = max(m.window_left, 0), max(m.window_right, 0)
        self.kind = "local" if m.window_left != NO_WINDOW else ("causal" if m.window_right != NO_WINDOW else "dense")
        self.p = float(p)

    def sparse_args(self, tile_q: int, tile_k: int, transposed: bool = False) -> tuple[tuple, tuple, bool]:
        """A block-sparse mask's kernel arguments at tiles ``[tile_q, tile_k]``: the tile table's tensors, the
        int8 layout and the launch order (``sparse_order.heavy_first``), then (head step, layout head stride,
        key blocks, block_q, block_k), then whether the order applies (``BS_ORDERED``); placeholders that no
        kernel reads when the mask is not block-sparse. ``transposed``: rows are key tiles (dK/dV)."""
        m = self.m
        if m.bs_layout is None:
            d = _dummy_int32(self.device)
            return (d, d, d, d, d), (0, 0, 1, 1, 1), False
        spec = block_sparse_spec(m.bs_layout, m.bs_block_q, m.bs_block_k)
        causal = m.window_right == 0
        table = spec.table(self.Mq, self.Mkv, tile_q, tile_k, causal, transposed=transposed)
        group = self.HG if transposed and self.kv_shared else 1  # a dK/dV program covers its K/V head's readers
        order = heavy_first(spec, self.Mq, self.Mkv, tile_q, tile_k, causal, transposed, self.Z, self.num_heads,
                            group) if HEAVY_FIRST else None
        layout = spec.kernel_layout()
        ints = (int(layout.shape[0] > 1), layout.stride(0), layout.shape[2], m.bs_block_q, m.bs_block_k)
        tensors = (table.offsets, table.full_start, table.cols, layout, table.offsets if order is None else order)
        return tensors, ints, order is not None

    def descriptors(self, rows_q: int, rows_k: int, extra=()) -> dict | None:
        """TMA descriptors of q, k, v (and ``extra`` ``(name, tensor, rows, cols)``), or None when any of
        them cannot be addressed by TMA (then every tile uses the pointer path)."""
        if not USE_TMA or self.device.type not in ("cuda", "cpu"):
            return None
        L = self.L
        out = {  # canonical K/V views hold one head per shared group already
            "desc_q": _descriptor(L.q, [1, rows_q, 1, 1, self.block_d]),
            "desc_k": _descriptor(L.k, [1, rows_k, 1, 1, self.block_d]),
            "desc_v": _descriptor(L.v, [1, rows_k, 1, 1, self.block_dv]),
        }
        for name, x, rows, cols in extra:
            out[name] = _descriptor(x, [1, rows, 1, 1, cols])
        return None if any(d is None for d in out.values()) else out

    def bias_descriptor(self, cfg):
        """TMA descriptor of the canonical bias ``[B, G, Hg, Mq, Mkv]`` (None: pointer loads)."""
        if not USE_TMA or self.L.bias is None:
            return None
        return _descriptor(self.L.bias, [1, 1, 1, cfg.block_m, cfg.block_n])

    def kv_strides(self, x5: torch.Tensor) -> tuple[int, int, int, int]:
        """(b, n, g, h) strides of a canonical K/V view; the head stride is 0 when heads share it."""
        st = x5.stride()
        return st[0], st[1], st[2], 0 if self.kv_shared else st[3]

    def bias_strides(self) -> tuple[int, ...]:
        b = self.L.bias
        return tuple(b.stride()) if b is not None else (0, 0, 0, 0, 0)

    def common_strides(self, go5) -> tuple[int, ...]:
        """Strides shared by the forward, dK/dV and dQ kernels, after the sequence arrays."""
        L = self.L
        return (*_strides4(L.q), *self.kv_strides(L.k), *self.kv_strides(L.v), *_strides4(go5))


def _bits(tensors: tuple) -> tuple:
    """Each tensor's dtype and 16-byte alignment: with a launch's meta-parameters (which fix the TMA
    descriptors' block shapes) and its ints as they are, what Triton specialises the launch on (a
    ``dyn_key`` for :func:`triformers._triton.launch`; its floats are always Python floats)."""
    return tuple([(t.dtype, t.data_ptr() & 15) for t in tensors])


def kv_grad_shape(q: torch.Tensor, k: torch.Tensor, share_kv: bool, dim: int) -> tuple[int, ...]:
    """Shape of the canonical K (or V, with its ``dim``) gradient ``[B, Mkv, G, Hk, dim]``."""
    if q.ndim == 4:
        B, Mkv, H = k.shape[:3]
        return (B, Mkv, 1, 1, dim) if share_kv else (B, Mkv, H, 1, dim)
    B, Mkv, G, H = k.shape[:4]
    return (B, Mkv, G, 1 if share_kv else H, dim)


def attention_forward(
    q, k, v, bias, m: MaskArgs, p: float, seed: int, scale: float, share_kv: bool, out_dtype: torch.dtype | None = None
):
    """``(out, lse)`` in the caller's layout; out in ``out_dtype`` (default the query's: the kernel rounds its
    float32 accumulator once, to that dtype), lse float32 ``[B, H, Mq]`` (``[B, G, H, Mq]``)."""
    c = _Call(q, k, v, bias, m, p, scale, share_kv)
    out = torch.empty((*q.shape[:-1], c.Kv), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], *q.shape[2:-1], c.Mq), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or c.Z == 0:
        return out, lse
    if m.max_k == 0:
        return out.zero_(), lse.fill_(-math.inf)
    out5, lse5 = c.L.to5(out), c.L.lse5(lse)
    paged = m.block_tables is not None  # K/V rows through the table
    tables = m.block_tables if paged else _zeros_int32(q.device, 1, 1)
    num_pages = tables.shape[1] if paged else 0

    def launch(cfg):
        tiles = cdiv(m.max_q, cfg.block_m)
        grid = (c.Z * c.num_heads * tiles,)
        desc = c.descriptors(cfg.block_m, cfg.block_n)
        desc_b = c.bias_descriptor(cfg) if desc is not None else None
        ptrs = (c.L.q, c.L.k, c.L.v, out5, lse5, c.L.bias if c.L.bias is not None else out5)
        seqs = (c.seq_q, c.k_start, c.k_len, tables)
        bs_tensors, bs_ints, bs_ordered = c.sparse_args(cfg.block_m, cfg.block_n)
        strides = (*c.common_strides(out5), *lse5.stride()[:3], *c.bias_strides(), *tables.stride())
        _launch(
            _fwd.attn_fwd,
            grid,
            (
                *ptrs, *((desc[n] for n in ("desc_q", "desc_k", "desc_v")) if desc else (None, None, None)), desc_b,
                *seqs, *bs_tensors, *strides, c.num_heads, c.HG, c.Mq, c.Mkv, c.scale * LOG2E, c.wl, c.wr, c.p, seed,
                c.K, c.Kv, tiles, num_pages, *bs_ints,
            ),
            dict(
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv,
                USE_TMA=desc is not None, BIAS_TMA=desc_b is not None, PAGED=paged, PAGE_SIZE=m.page_size,
                # every key tile is a run of rows of one page: loaded as one (TMA when it can), not gathered
                PAGE_TILES=paged and m.k_start is None and m.page_size % cfg.block_n == 0, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, BS_ORDERED=bs_ordered, **c.flags,
            ),
            None,
            (
                _bits(ptrs + seqs + bs_tensors), strides, c.num_heads, c.HG, c.Mq, c.Mkv, c.wl, c.wr, int_code(seed),
                c.K, c.Kv, tiles, num_pages, bs_ints,
            ),
        )

    configs.launch_with_fallback(launch, configs.forward_config(c, launch), "fwd")
    return out, lse


def db_buffer_shape(q, k, bias, share_kv: bool, reduce_mask: int) -> tuple[int, ...]:
    """Shape of the float32 bias-gradient buffer: the canonical bias shape with reduced dims set to 1."""
    L = _layout.canonical(q, k, k, bias, share_kv)
    return tuple(1 if (reduce_mask >> d) & 1 else s for d, s in enumerate(L.bias.shape))


def attention_backward(
    grad, q, k, v, out, lse, bias, db_reduce_mask: int, m: MaskArgs, p: float, seed: int, scale: float, share_kv: bool,
    deterministic: bool, grad_lse: torch.Tensor | None = None,
):
    """Raw gradients: ``dq`` (caller layout), ``dk5``/``dv5`` (canonical ``[B, Mkv, G, Hk, X]``, one per
    shared head), and ``db`` float32 of :func:`db_buffer_shape` (empty when ``db_reduce_mask < 0``).

    ``grad`` and ``out`` may have any float dtype (an ``output_dtype``); ``grad_lse`` (shaped like ``lse``) is
    the gradient of the lse output of partial attention, subtracted from ``delta``."""
    if m.block_tables is not None:
        raise ValueError("paged attention biases have no Triton backward: their gradients come from fmha.chunked")
    c = _Call(q, k, v, bias, m, p, scale, share_kv)
    L = c.L
    dev = q.device
    if grad.stride(-1) != 1:  # e.g. the expanded gradient of out.sum(): kernels read rows contiguously
        grad = grad.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    go5, o5, lse5 = L.to5(grad), L.to5(out), L.lse5(lse)
    # Every key row inside a block gets its dK/dV written; packed sequences may leave keys outside every
    # block (padded keys), which must read 0.
    alloc = torch.empty if m.keys_covered and q.numel() and c.Z and m.max_k else torch.zeros
    dk5 = alloc(kv_grad_shape(q, k, share_kv, c.K), dtype=k.dtype, device=dev)
    dv5 = alloc(kv_grad_shape(q, v, share_kv, c.Kv), dtype=v.dtype, device=dev)
    want_db = db_reduce_mask >= 0 and bias is not None
    db_buf = (torch.zeros(db_buffer_shape(q, k, bias, share_kv, db_reduce_mask), dtype=torch.float32, device=dev)
              if want_db else torch.empty(0, dtype=torch.float32, device=dev))
    if q.numel() == 0 or c.Z == 0 or m.max_k == 0:
        return torch.zeros_like(q), dk5, dv5, db_buf

    delta = torch.empty((c.B, c.G, c.HG, c.Mq), dtype=torch.float32, device=dev)
    pre_m = 64 if c.block_dv <= 128 else 16  # 64 x 256 float32 rows spilled (ptxas: 100 bytes/thread)
    pre_ints = (*_strides4(o5), *_strides4(go5), *delta.stride()[:3], c.num_heads, c.HG, c.Mq, c.Kv)
    _launch(
        _bwd.attn_bwd_preprocess, (c.B * c.num_heads, cdiv(c.Mq, pre_m)), (o5, go5, delta, *pre_ints),
        dict(BLOCK_M=pre_m, BLOCK_DV=c.block_dv), None, (_bits((o5, go5, delta)), pre_ints),
    )
    if grad_lse is not None:  # d lse_i / d s_ij = P_ij: dS = P * (dP - (delta - dlse))
        delta.sub_(L.lse5(grad_lse))
    if go5.dtype != q.dtype:  # the matrix products take dO in the inputs' dtype (delta kept the precise one)
        go5 = go5.to(q.dtype)
    db_mode, db_target = 0, o5
    if want_db:
        reduce_dims = [d for d in range(5) if (db_reduce_mask >> d) & 1]
        if deterministic and reduce_dims:
            db_full = torch.zeros(L.bias.shape, dtype=torch.float32, device=dev)  # no atomics: reduce after
            db_mode, db_target = 1, db_full
        else:
            db_target = db_buf.expand(L.bias.shape)
            db_mode = 1 if not reduce_dims else (3 if 3 in reduce_dims and 4 not in reduce_dims else 2)
    db_strides = tuple(db_target.stride()) if db_mode else (0, 0, 0, 0, 0)
    atomic_dq = ATOMIC_DQ and not deterministic
    dq_acc = torch.zeros(L.q.shape, dtype=torch.float32, device=dev) if atomic_dq else o5
    num_kv_heads = c.G * (1 if c.kv_shared else c.HG)
    bias_arg = L.bias if L.bias is not None else o5

    def launch_dkdv(cfg):
        if atomic_dq:
            dq_acc.zero_()
        extra = [("desc_do", go5, cfg.block_m, c.block_dv)]
        dq_tma = atomic_dq and dev.type == "cuda"  # Triton's interpreter has no TMA reduce
        if dq_tma:
            extra.append(("desc_dq", dq_acc, cfg.block_m, c.block_d))
        desc = c.descriptors(cfg.block_m, cfg.block_n, extra)
        desc_b = c.bias_descriptor(cfg) if desc is not None else None
        names = ("desc_q", "desc_k", "desc_v", "desc_do")
        tiles = cdiv(m.max_k, cfg.block_n)
        ptrs = (L.q, L.k, L.v, go5, lse5, delta, bias_arg, db_target, dq_acc, dk5, dv5)
        seqs = (c.seq_q, c.k_start, c.k_len)
        bs_tensors, bs_ints, bs_ordered = c.sparse_args(cfg.block_m, cfg.block_n, transposed=True)
        strides = (
            *c.common_strides(go5), *lse5.stride()[:3], *c.bias_strides(), *db_strides,
            *(_strides4(dq_acc) if atomic_dq else (0, 0, 0, 0)), *_strides4(dk5), *_strides4(dv5),
        )
        _launch(_bwd.attn_bwd_dkdv, (c.Z * num_kv_heads * tiles,), (
            *ptrs, *((desc[n] for n in names) if desc else (None,) * 4), desc_b,
            desc["desc_dq"] if desc and dq_tma else None,
            *seqs, *bs_tensors, *strides,
            c.num_heads, c.HG, c.Mq, c.Mkv, c.scale * LOG2E, c.scale, c.wl, c.wr, c.p, seed, c.K, c.Kv, tiles,
            *bs_ints,
        ), dict(
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv,
            DB_MODE=db_mode, ATOMIC_DQ=atomic_dq, USE_TMA=desc is not None, BIAS_TMA=desc_b is not None,
            DQ_TMA=desc is not None and dq_tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, BS_ORDERED=bs_ordered, **c.flags,
        ), None, (_bits(ptrs + seqs + bs_tensors), strides, c.num_heads, c.HG, c.Mq, c.Mkv, c.wl, c.wr,
                  int_code(seed), c.K, c.Kv, tiles, bs_ints))

    tune_dkdv = launch_dkdv if not (want_db and db_mode != 1) else None  # atomics accumulate: no re-runs
    configs.launch_with_fallback(launch_dkdv, configs.backward_config(c, tune_dkdv), "bwd")
    if atomic_dq:
        dq = L.from5(dq_acc.mul_(c.scale).to(q.dtype))
    else:
        dq5 = torch.empty(L.q.shape, dtype=q.dtype, device=dev)

        def launch_dq(cfg):
            desc = c.descriptors(cfg.block_m, cfg.block_n, [("desc_do", go5, cfg.block_m, c.block_dv)])
            desc_b = c.bias_descriptor(cfg) if desc is not None else None
            names = ("desc_q", "desc_k", "desc_v", "desc_do")
            tiles = cdiv(m.max_q, cfg.block_m)
            ptrs = (L.q, L.k, L.v, go5, lse5, delta, bias_arg, dq5)
            seqs = (c.seq_q, c.k_start, c.k_len)
            bs_tensors, bs_ints, bs_ordered = c.sparse_args(cfg.block_m, cfg.block_n)
            strides = (*c.common_strides(go5), *lse5.stride()[:3], *c.bias_strides(), *_strides4(dq5))
            _launch(_bwd.attn_bwd_dq, (c.Z * c.num_heads * tiles,), (
                *ptrs, *((desc[n] for n in names) if desc else (None,) * 4), desc_b, *seqs, *bs_tensors, *strides,
                c.num_heads, c.HG, c.Mq, c.Mkv, c.scale * LOG2E, c.scale, c.wl, c.wr, c.p, seed, c.K, c.Kv,
                tiles, *bs_ints,
            ), dict(
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv,
                USE_TMA=desc is not None, BIAS_TMA=desc_b is not None,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, BS_ORDERED=bs_ordered, **c.flags,
            ), None, (_bits(ptrs + seqs + bs_tensors), strides, c.num_heads, c.HG, c.Mq, c.Mkv, c.wl, c.wr,
                      int_code(seed), c.K, c.Kv, tiles, bs_ints))

        configs.launch_with_fallback(launch_dq, configs.dq_config(c, launch_dq), "dq")
        dq = L.from5(dq5)
    if want_db and deterministic and db_mode == 1 and db_target is not db_buf:
        reduce_dims = tuple(d for d in range(5) if (db_reduce_mask >> d) & 1)
        db_buf = db_target.sum(dim=reduce_dims, keepdim=True) if reduce_dims else db_target
    return dq.reshape(q.shape), dk5, dv5, db_buf
