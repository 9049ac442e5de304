"""Launcher of the split-K decoding kernel: launch configuration, split count, bias arguments.

Decoding is memory-bound: a step reads the whole KV cache once (``B * L * Hkv * D * 2`` values for K and V) and
does ~``2 * rows`` flops per value read, far below the tensor cores' rate. The launch is built so that the cache
streams at the HBM's rate: enough programs to keep every SM loading (:func:`split_for`), key blocks of 64-128
rows loaded in 16-byte vectors and pipelined over ``num_stages`` buffers, and each program's rows sharing its
K/V head (GQA head swap) so that nothing is read twice.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from triformers._triton import cdiv, interpret_mode, launch, resident_programs
from triformers.ops.fmha import _layout
from triformers.ops.fmha._mask import KV_CACHE_BIAS_TYPES, kv_cache_window, mask_spec
from triformers.ops.fmha._triton import splitk as _kernels
from triformers.ops.fmha._triton.common import LOG2E_F
from triformers.ops.fmha._triton.launch import _dummy_int32, _input_precision
from triformers.ops.fmha._triton.merge import merge_partials

NO_WINDOW = -1


@dataclass(frozen=True)
class Config:
    block_n: int
    num_warps: int
    num_stages: int
    int4_interleaved: bool = False  # int4 at D >= 128: the interleaved products of _triton/splitk_int4.py
    maxnreg: int | None = None  # registers per thread ptxas may use (None: its choice)


# (cache kind, head-dim bucket, BLOCK_M) -> launch configuration. "half" is an fp16/bf16 cache (plain or paged),
# "fp32" a float32 one, "int4"/"fp8" quantized ones (the query fp16/bf16). BLOCK_M 16 is decoding with up to 16
# query rows per K/V head (Hq / Hkv x Mq), 64 speculative decoding (e.g. 4 x 16).
# Measured on an H200 (`python scripts/tune_splitk.py --quick`, bf16, Hq = 32, Hkv = 8, D = 128, Mq = 1, the five
# (B, L) cases of the decoding benchmark): BLOCK_N 64 with 4 warps and 2 stages was the fastest or within 2 % of it
# on every case of the plain cache (128-145 us for 537 MB: 0.90-1.02 of a device copy's bandwidth), and within
# 10 % on the paged one; the previous entry (3 stages, 70 KiB of shared memory per program, with twice the
# splits) took 0.204 ms at B = 1, L = 131072 in the decoding benchmark. The other rows follow the same rule
# (2 stages) untimed, except fp8 and int4 at BLOCK_M 16 (benchmarks/results/h200/tune_splitk_4599731.log): fp8
# BLOCK_N 128 the fastest on all five cases (116-135 us), int4 BLOCK_N 32 with 3 stages and the interleaved
# products (291-309 us, where the decoding benchmark's int4 at (64, 4, 2) took 384-484 us).
CONFIGS: dict[tuple[str, int, int], Config] = {
    ("half", 64, 16): Config(64, 4, 2),
    ("half", 128, 16): Config(64, 4, 2),
    ("half", 128, 32): Config(64, 8, 2),
    ("half", 128, 64): Config(64, 8, 2),
    ("half", 256, 16): Config(32, 4, 2),
    ("half", 512, 16): Config(16, 4, 2),
    # paged: ptxas takes 130 registers at (64, 4, 2), 3 programs per SM; capped at 128 it spills nothing and
    # fits 4 (static sm_90 count, `scripts/tune_splitk.py --compile-only 90 --kinds paged`; untimed)
    ("paged", 128, 16): Config(64, 4, 2, maxnreg=128),
    ("int4", 128, 16): Config(32, 4, 3, int4_interleaved=True),
    ("int4", 128, 64): Config(64, 8, 2),
    ("fp8", 128, 16): Config(128, 4, 2),
    ("fp8", 128, 64): Config(32, 4, 2),
    ("fp32", 128, 16): Config(32, 8, 2),
}
# Under Triton's interpreter (CPU tests): small key blocks, so that a few hundred keys span several blocks.
INTERPRETER_CONFIG = Config(16, 1, 1)

# Split count (see split_for): as many programs as the GPU holds at once, PROGRAMS_PER_SM per SM, and never more
# (a partial second wave of equal programs doubles the time). Measured on an H200 (scripts/tune_splitk.py, the
# cases above, split counts 0.5x, 1x, 2x the heuristic's): the fastest splits gave 512-1024 programs on its 132
# SMs (B = 1: 64 splits of the 8 K/V heads, B = 4: 16, B = 16: 4, B = 64: 2, B = 256: 1); 4 per SM gives 64
# (66, the last two without keys), 16, 4, 1 and 1. Never fewer keys than MIN_KEYS_PER_SPLIT per split (below
# it the partial write and the merge cost more than the split saves: a split writes rows x Dv float32, 2 KiB at
# Hq/Hkv = 4, D = 128, against 128 KiB of bf16 K/V read at 256 keys); at most MAX_SPLIT_K splits (grid axis 1).
PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 256
MAX_SPLIT_K = 128
# SMs assumed when no GPU is visible (tests under the interpreter): an H100/H200.
DEFAULT_NUM_SMS = 132


def _d_bucket(d: int) -> int:
    return next(b for b in (64, 128, 256, 512) if d <= b)


def _load_tuned_table() -> None:
    """``TRIFORMERS_SPLITK_CONFIGS=FILE``: the ``table`` of a ``scripts/tune_splitk.py --out FILE`` run replaces
    the D = 128, BLOCK_M = 16 rows of :data:`CONFIGS` (a table tuned on the user's GPU)."""
    import json
    import os

    path = os.environ.get("TRIFORMERS_SPLITK_CONFIGS")
    if not path:
        return
    with open(path) as f:
        table = json.load(f)["table"]
    for kind, entry in table.items():
        CONFIGS[(kind, 128, 16)] = Config(int(entry["block_n"]), int(entry["num_warps"]), int(entry["num_stages"]),
                                          bool(entry.get("int4_interleaved", False)))


_TUNED: list[bool] = []


def config_for(kind: str, d: int, block_m: int) -> Config:
    """The table's configuration, the nearest entry when the exact key is missing (same kind and head-dim
    bucket, then the "half" row of that bucket, then its BLOCK_M 16 entry). "paged" falls back to "half"."""
    if interpret_mode():
        return INTERPRETER_CONFIG
    if not _TUNED:
        _load_tuned_table()
        _TUNED.append(True)
    bucket = _d_bucket(d)
    for key in ((kind, bucket, block_m), (kind, bucket, 16), ("half", bucket, block_m), ("half", bucket, 16)):
        if key in CONFIGS:
            return CONFIGS[key]
    return CONFIGS[("half", 128, 16)]


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def split_for(programs: int, keys: int, rows: int, sms: int = DEFAULT_NUM_SMS, block_m: int = 16,
              per_sm: int = PROGRAMS_PER_SM) -> int:
    """Splits per (sequence, K/V head, row tile) for ``programs`` (sequence, K/V head) pairs, ``keys`` keys
    per sequence and ``rows`` query rows per pair: ``per_sm`` programs per SM (at most ``PROGRAMS_PER_SM``;
    fewer where fewer fit), at least ``MIN_KEYS_PER_SPLIT`` keys each, between 1 and ``MAX_SPLIT_K``."""
    tiles = programs * cdiv(max(rows, 1), block_m)
    want = (min(per_sm, PROGRAMS_PER_SM) * sms) // max(tiles, 1)
    return max(1, min(want, keys // MIN_KEYS_PER_SPLIT, MAX_SPLIT_K))


@dataclass(frozen=True)
class SeqArgs:
    """A bias as the kernel sees it (tensors are the bias's own, read at every launch)."""

    seq_q: torch.Tensor | None  # [Z + 1] query starts, None for a dense batch
    k_start: torch.Tensor | None  # [Z] first logical key (None: 0)
    k_len: torch.Tensor | None  # [Z] lengths, or end offsets when k_len_is_end
    table: torch.Tensor | None  # [Z, pages] block table
    k_len_is_end: bool
    page_size: int
    len_cap: int  # no sequence longer (its padding)
    end_cap: int  # no key past this logical position
    keys: int  # keys per sequence the split is sized for (fixed while decoding)
    num_seqs: int
    max_q: int
    bottom_right: bool
    window_left: int
    window_right: int


def seq_args(bias, Mq: int, Mkv: int) -> SeqArgs:
    """The :class:`SeqArgs` of ``bias`` for queries ``[B, Mq]`` and a key axis of ``Mkv`` rows."""
    if type(bias) in KV_CACHE_BIAS_TYPES:  # bottom-right; mask_spec would copy the lengths to the host
        br, (wl, wr) = True, kv_cache_window(bias)
    else:
        spec = mask_spec(bias)
        br, wl, wr = spec.bottom_right, spec.window_left, spec.window_right
    mask = dict(bottom_right=br, window_left=NO_WINDOW if wl is None else wl,
                window_right=NO_WINDOW if wr is None else wr)
    if type(bias) not in KV_CACHE_BIAS_TYPES:
        return SeqArgs(None, None, None, None, k_len_is_end=False, page_size=0, len_cap=Mkv, end_cap=Mkv, keys=Mkv,
                       num_seqs=0, max_q=Mq, **mask)
    q, k = bias.q_seqinfo, bias.k_seqinfo
    seqs = dict(num_seqs=len(q.seqstart_py) - 1, max_q=q.max_seqlen, **mask)
    table = getattr(bias, "block_tables", None)
    padding = getattr(k, "padding", None)
    if table is not None:  # logical keys [0, seqlen) (padded) or [seqstart, seqlen) (gappy: seqlen holds ends)
        width = table.shape[1] * bias.page_size
        gappy = padding is None
        return SeqArgs(q.seqstart, k.seqstart if gappy else None, k.seqlen, table, k_len_is_end=gappy,
                       page_size=bias.page_size, len_cap=width, end_cap=width, keys=width, **seqs)
    if padding is not None:  # slot b: rows [seqstart[b], seqstart[b] + seqlen[b]), seqstart[b] = b * padding
        return SeqArgs(q.seqstart, k.seqstart, k.seqlen, None, k_len_is_end=False, page_size=0, len_cap=padding,
                       end_cap=Mkv, keys=padding, **seqs)
    # gappy: rows [seqstart[b], seqstart[b] + seqlen[b]) anywhere on the key axis
    return SeqArgs(q.seqstart, k.seqstart, k.seqlen, None, k_len_is_end=False, page_size=0, len_cap=Mkv,
                   end_cap=Mkv, keys=max(1, k.max_seqlen), **seqs)


def cached_seq_args(bias, Mq: int, Mkv: int) -> SeqArgs:
    """:func:`seq_args`, kept on the bias object per (Mq, Mkv): the CUDA-graph decoding loop calls with the
    same bias at every step (its tensors change in place, nothing kept here depends on their values)."""
    if bias is None or torch.compiler.is_compiling():
        return seq_args(bias, Mq, Mkv)
    cache = bias.__dict__.setdefault("_triformers_splitk_args", {})
    args = cache.get((Mq, Mkv))
    if args is None:
        args = cache[(Mq, Mkv)] = seq_args(bias, Mq, Mkv)
    return args


_QUANT = {"none": 0, "int4": 1, "fp8": 2}
_DEQ = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _bits(tensors) -> tuple:
    return tuple([(t.dtype, t.data_ptr() & 15) for t in tensors])


@dataclass(frozen=True)
class _Plan:
    """What a launch derives from shapes, strides, dtypes and the bias's fixed parameters (kept per key)."""

    grid: tuple[int, int]
    splits: int
    meta: dict
    ints: tuple  # strides and sizes, in the kernel's order (partial-output strides when splits > 1)
    tail: tuple  # window bounds, head dims, row tiles


_PLANS: dict = {}
_MAX_PLANS = 1024


def _pow2(n: int) -> int:
    """The next power of two >= n, at least 16 (the smallest tl.dot / tl.arange tile used here)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _plan(op, L: _layout.Layout5, scales, quant: str, D: int, Dv: int, sa: SeqArgs, out5, lse5,
          per_sm: int = PROGRAMS_PER_SM) -> _Plan:
    q5, k5, v5 = L.q, L.k, L.v
    B, Mq, G, Hg = q5.shape[:4]
    Hk, Mkv = k5.shape[3], k5.shape[1]
    HQ = Hg // Hk  # query heads per K/V head: rows of one program
    Z = sa.num_seqs if sa.seq_q is not None else B
    rows = HQ * sa.max_q
    interpreted = interpret_mode()
    block_m = op.BLOCK_M or (16 if interpreted else min(op.MAX_BLOCK_M, _pow2(rows)))
    kind = quant if quant != "none" else ("fp32" if q5.dtype == torch.float32 else "half")
    if kind == "half" and sa.table is not None:
        kind = "paged"  # its own row when tuned, else the "half" one
    cfg = config_for(kind, max(D, Dv), block_m)
    tiles = cdiv(max(rows, 1), block_m)
    splits = op.SPLIT_K or split_for(Z * G * Hk, sa.keys, rows, num_sms(q5.device), block_m, per_sm)
    if splits > 1:  # partial outputs [S, B, Mq, G, Hq, Dv] and lse [S, B, G, Hq, Mq], contiguous
        o_strides = (B * Mq * G * Hg * Dv, Mq * G * Hg * Dv, G * Hg * Dv, Hg * Dv, Dv)
        l_strides = (B * G * Hg * Mq, G * Hg * Mq, Hg * Mq, Mq)
    else:
        o_strides, l_strides = (0, *out5.stride()[:4]), (0, *lse5.stride()[:3])
    fp8 = quant == "fp8"
    k_strides = k5.stride()[:4] if not fp8 else (*(4 * s for s in k5.stride()[:4]),)  # in fp8 bytes
    v_strides = v5.stride()[:4] if not fp8 else (*(4 * s for s in v5.stride()[:4]),)
    ints = (
        *q5.stride()[:4],
        *k_strides,
        *v_strides,
        *(scales[0].stride()[:4] if fp8 else (0, 0, 0, 0)),
        *(scales[1].stride()[:4] if fp8 else (0, 0, 0, 0)),
        *o_strides,
        *l_strides,
        *(sa.table.stride() if sa.table is not None else (0, 0)),
        G * Hk,
        Hk,
        HQ,
        Mq,
        Mkv,
        sa.len_cap,
        sa.end_cap,
        Mkv // sa.page_size if sa.page_size else 0,
    )
    block_d, block_dv = _pow2(D), _pow2(Dv)
    meta = dict(
        BLOCK_M=block_m,
        BLOCK_N=op.BLOCK_N or cfg.block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        EVEN_D=block_d == D,
        EVEN_DV=block_dv == Dv,
        QUANT=_QUANT[quant],
        NUM_GROUPS=op.NUM_GROUPS if quant == "int4" else 1,
        # quantized caches compute in fp16 for fp16 and bf16 queries: fp8 converts to it natively on sm_89+
        # (to bf16 only through float32: H200, B = 16, L = 8192, fp8 took as long as the bf16 cache, 0.15 ms, at
        # half the bytes); the values (fp8, 0..15) and scales are exact in fp16, the query rounds like bf16 data
        DEQ=0 if quant != "none" and q5.dtype == torch.bfloat16 else _DEQ[q5.dtype],
        IS_VARLEN=sa.seq_q is not None,
        HAS_K_START=sa.k_start is not None,
        K_LEN_IS_END=sa.k_len_is_end,
        PAGED=sa.table is not None,
        PAGE_SIZE=max(sa.page_size, 1),
        BOTTOM_RIGHT=sa.bottom_right,
        HAS_WL=sa.window_left != NO_WINDOW,
        HAS_WR=sa.window_right != NO_WINDOW,
        INPUT_PRECISION=_input_precision(q5.dtype),
        INT4_INTERLEAVED=cfg.int4_interleaved if op.INT4_INTERLEAVED is None else bool(op.INT4_INTERLEAVED),
        num_warps=op.NUM_WARPS or cfg.num_warps,
        num_stages=op.NUM_STAGES or cfg.num_stages,
    )
    if cfg.maxnreg and not (op.BLOCK_N or op.NUM_WARPS or op.NUM_STAGES):  # the cap belongs to the table's tiles
        meta["maxnreg"] = cfg.maxnreg
    tail = (max(sa.window_left, 0), max(sa.window_right, 0), D, Dv, tiles)
    return _Plan((Z * G * Hk * tiles, splits), splits, meta, ints, tail)


def run(
    op,
    L: _layout.Layout5,
    scales,
    quant: str,
    D: int,
    Dv: int,
    bias,
    scale: float,
    out5: torch.Tensor,
    lse5: torch.Tensor,
) -> None:
    """Writes attention into ``out5`` ``[B, Mq, G, Hq, Dv]`` and ``lse5`` ``[B, G, Hq, Mq]`` (canonical views).

    Args:
        op: the operator class (its SPLIT_K, BLOCK_*, NUM_* and NUM_GROUPS attributes).
        L: canonical views of q, k, v (K/V with one head per group when shared).
        scales: fp8 scale|shift words of K and V in the canonical K layout ``[B, Mkv, G, Hk]``, or Nones.
        quant: "none", "int4" or "fp8"; D, Dv: head dims of the query and the output.
        bias: the attention bias (None, a dense mask or a KV-cache bias).
        scale: the softmax scale.
    """
    q5, k5, v5 = L.q, L.k, L.v
    sa = cached_seq_args(bias, q5.shape[1], k5.shape[1])
    if q5.numel() == 0 or (sa.num_seqs if sa.seq_q is not None else q5.shape[0]) == 0:
        lse5.fill_(-math.inf)
        return
    if k5.shape[1] == 0:
        out5.zero_()
        lse5.fill_(-math.inf)
        return
    scale_strides = (scales[0].stride(), scales[1].stride()) if quant == "fp8" else None
    key = (
        op,
        quant,
        D,
        Dv,
        q5.dtype,
        q5.shape,
        q5.stride(),
        k5.shape,
        k5.stride(),
        v5.stride(),
        scale_strides,
        out5.dtype,
        out5.stride(),
        lse5.stride(),
        sa,
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _plan(op, L, scales, quant, D, Dv, sa, out5, lse5)
        if plan.splits > 1 and not op.SPLIT_K and q5.is_cuda and not interpret_mode():
            # the split fills PROGRAMS_PER_SM programs per SM; where the compiled kernel's registers or shared
            # memory leave room for fewer, a last partial wave would run alone: split for what fits instead
            args = _args(plan, L, scales, quant, sa, scale, out5, lse5)[0]
            per_sm = resident_programs(_kernels.splitk_fwd, plan.grid, args, plan.meta, q5.device)
            if per_sm is not None and per_sm < PROGRAMS_PER_SM:
                plan = _plan(op, L, scales, quant, D, Dv, sa, out5, lse5, per_sm)
        _PLANS[key] = plan
    args, tensors, o, ls = _args(plan, L, scales, quant, sa, scale, out5, lse5)
    launch(_kernels.splitk_fwd, plan.grid, args, plan.meta, None, (_bits(tensors), plan.ints, plan.tail))
    if plan.splits > 1:
        merge_partials(o, ls, out5, lse5)


def _args(plan: _Plan, L: _layout.Layout5, scales, quant: str, sa: SeqArgs, scale: float, out5, lse5) -> tuple:
    """``(kernel arguments, their tensors, partial outputs, partial lse)`` of a launch of ``plan`` (the partial
    buffers are ``out5`` and ``lse5`` themselves without a split)."""
    q5, k5, v5 = L.q, L.k, L.v
    dev = q5.device
    if plan.splits > 1:  # one buffer for the partial outputs and their lse
        n_out, n_lse = out5.numel(), lse5.numel()
        buf = torch.empty(plan.splits * (n_out + n_lse), dtype=torch.float32, device=dev)
        o = buf[: plan.splits * n_out].view(plan.splits, *out5.shape)
        ls = buf[plan.splits * n_out :].view(plan.splits, *lse5.shape)
    else:
        o, ls = out5, lse5
    dummy = _dummy_int32(dev)
    if quant == "fp8":  # the int32 words as the fp8 bytes they hold (little-endian: byte j = element 4w + j)
        k5, v5 = k5.view(torch.float8_e4m3fn), v5.view(torch.float8_e4m3fn)
    ks, vs = scales if quant == "fp8" else (k5, v5)
    seq = (sa.seq_q, sa.k_start, sa.k_len, sa.table)
    tensors = (q5, k5, v5, o, ls, ks, vs, *(t if t is not None else dummy for t in seq))
    return (*tensors, *plan.ints, scale * LOG2E_F, *plan.tail), tensors, o, ls
