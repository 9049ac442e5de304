"""Launches that pass ``dyn_key`` skip the per-argument specialisation key: their caller claims that
``(static_key, dyn_key)`` fixes what Triton specialises every argument on. These tests run the callers over
inputs that vary in every such property (sizes, strides, alignment, dtypes, optional arguments) and check
the claim against ``_key`` on every launch (``launch``'s own use of ``dyn_key`` is tested in test_launch.py)."""

import pytest
import torch

from triformers import _triton as T
from triformers.ops import swiglu
from triformers.ops.rmsnorm import rms_norm, rms_norm_add
from triformers.ops.swiglu import silu_mul
from triformers.triton import _common, dropout, layer_norm, log_softmax, softmax
from triformers.triton._kernels import reduce


def _checking(checked: list, require_dyn_key: bool = False):
    """A launch function that does not launch but checks, on every launch with a ``dyn_key``, that the full key
    and the grid are the ones first seen with that ``(static, dyn_key)``; appends ``(static, dyn_key, kernel
    name)``. The kernel itself does not run: the key and the grid depend on the arguments' sizes, strides,
    alignment and dtypes, never on values, and the kernels' results are tested elsewhere (running them under
    the interpreter made this file the slowest of the suite)."""
    seen: dict = {}

    def checking(kernel, grid, args, meta, static_key=None, dyn_key=None):
        assert dyn_key is not None or not require_dyn_key, f"{kernel.__name__} launched without a dyn_key"
        if dyn_key is not None:
            static = static_key if static_key is not None else (id(kernel), tuple(meta.items()))
            full = T._key(args)
            first = seen.setdefault((static, dyn_key), (full, kernel.__name__, tuple(grid)))
            assert first[0] == full, f"{first[1]}: dyn_key {dyn_key} stood for {first[0]}, now {full}"
            # Tuner launches reuse the grid of a (key, dyn_key) they have seen: it must be the same
            assert first[2] == tuple(grid), f"{first[1]}: dyn_key {dyn_key} had grid {first[2]}, now {tuple(grid)}"
            checked.append((static, dyn_key, kernel.__name__))
        return None

    return checking


@pytest.fixture
def claims(monkeypatch):
    """Checks the launches of the fused layers; returns the list of launches checked."""
    checked: list = []
    checking = _checking(checked)
    monkeypatch.setattr(_common, "launch", checking)
    monkeypatch.setattr(reduce, "launch", checking)
    return checked


def _inputs(kind: str, M: int, N: int, dtype):
    """x [M, N] laid out as ``kind``: fresh, one element off 16-byte alignment, a column slice of a wider
    buffer, or a transposed view."""
    if kind == "fresh":
        return torch.randn(M, N, dtype=dtype)
    if kind == "offset":
        return torch.randn(M * N + 1, dtype=dtype)[1:].view(M, N)
    if kind == "wide":
        return torch.randn(M, N + 24, dtype=dtype)[:, 5 : 5 + N]
    return torch.randn(N, M, dtype=dtype).t()


def _param(N: int, dtype, offset: bool):
    """A [N] parameter, aligned or one element off alignment."""
    p = torch.randn(N + 1, dtype=dtype)
    return p[1:] if offset else p[:N]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_launch_keys(claims, dtype):
    for M, N in [(1, 16), (3, 17), (16, 32)]:
        for kind in ("fresh", "offset", "wide", "transposed"):
            for offset_params in (False, True):
                x = _inputs(kind, M, N, dtype).requires_grad_()
                w = _param(N, dtype, offset_params).detach().requires_grad_()
                b = _param(N, dtype, not offset_params).detach().requires_grad_()
                for dy_kind in ("offset", "transposed"):
                    dy = _inputs(dy_kind, M, N, dtype)
                    torch.autograd.grad(rms_norm(x, w), (x, w), dy)
                    torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)
                    torch.autograd.grad(layer_norm(x, None, b), (x, b), dy)
                    torch.autograd.grad(rms_norm(x, None), (x,), dy)
                with torch.no_grad():
                    rms_norm(x, w)
                    base = _inputs("fresh", M, N, dtype)
                    rms_norm_add(base, _inputs(kind, M, N, dtype), w)
    assert len(claims) > 300 and len(set(claims)) > 100  # the callers did pass dyn keys, of many kinds
    assert {c[2] for c in claims} >= {"_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_rows_kernel"}


def test_elementwise_and_softmax_launch_keys(claims):
    torch.manual_seed(0)  # the dropout seeds, whose keys vary with their value
    for M, N in [(1, 16), (3, 17)]:
        for kind in ("fresh", "offset", "wide", "transposed"):
            for dtype in (torch.float16,):
                x, other = _inputs(kind, M, N, dtype).requires_grad_(), _inputs("offset", M, N, dtype)
                mask = _inputs(kind, M, N, torch.float32)
                for dy_kind in ("offset", "transposed"):
                    dy = _inputs(dy_kind, M, N, dtype)
                    torch.autograd.grad(softmax(x), (x,), dy)
                    torch.autograd.grad(log_softmax(x, mask, causal=True), (x,), dy)
                    for offset in (False, True):
                        bias = _param(N, dtype, offset).detach().requires_grad_()
                        for p in (0.0, 0.3):
                            torch.autograd.grad(dropout(x, p, bias, "gelu"), (x, bias), dy)
                        torch.autograd.grad(dropout(x, 0.5, None, None), (x,), dy)
                    b = other.detach().requires_grad_()
                    torch.autograd.grad(silu_mul(x, b), (x, b), dy)
                    torch.autograd.grad(silu_mul(b, x), (b, x), dy)
        x = torch.randn(M, 3, 8, requires_grad=True)
        w = [torch.randn(s, requires_grad=True) for s in ((N, 8), (N,), (N, 8), (N,), (8, N), (8,))]
        torch.autograd.grad(swiglu(x, *w).sum(), (x, *w))
    kernels = {c[2] for c in claims}
    assert kernels >= {"_softmax_fwd_kernel", "_softmax_bwd_kernel", "_dropout_fwd_kernel", "_dropout_bwd_kernel",
                       "_silu_mul_fwd_kernel", "_silu_mul_bwd_kernel", "_sum_rows_kernel"}, kernels


def test_attention_launch_keys(claims, monkeypatch):
    """The attention launchers' dyn keys, over masks, packed sequences, GQA, tensor biases, dropout seeds,
    odd head dims, misaligned and strided inputs, both TMA and pointer paths, and int or float scales."""
    from triformers.ops import fmha
    from triformers.ops.fmha import attn_bias as ab
    from triformers.ops.fmha._triton import launch as fmha_launch
    from triformers.ops.fmha.attn_bias_utils import create_inputs

    monkeypatch.setattr(fmha_launch, "_launch", _checking(claims, require_dyn_key=True))
    op = fmha.TritonFlashAttentionOp
    torch.manual_seed(0)

    def shifted(t):
        """t's values one element off 16-byte alignment (a leaf that requires grad)."""
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
        return flat.view(t.shape).copy_(t).detach().requires_grad_()

    def heads_major(t):
        """t's values stored heads before positions (other strides, same shape)."""
        return t.detach().transpose(1, -2).contiguous().transpose(1, -2).requires_grad_()

    cases = [(bias, fmt, dtype) for bias in (type(None), ab.LowerTriangularMask, ab.BlockDiagonalCausalMask,
                                             ab.LocalAttentionFromBottomRightMask, torch.Tensor)
             for fmt, dtype in (("BMHK", torch.float32), ("BMGHK", torch.float16))]
    # KV caches: padded keys (rows past a block zeroed), paged keys (block tables of either int dtype)
    cases[-2:-2] = [(ab.BlockDiagonalCausalWithOffsetPaddedKeysMask, "BMHK", torch.float32),
                    (ab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask, "BMGHK", torch.float16)]
    for tma in (True, False):
        monkeypatch.setattr(fmha_launch, "USE_TMA", tma)
        for c, (bias_type, fmt, dtype) in enumerate(cases if tma else cases[-2:]):
            kv_len = 17 if bias_type is ab.BlockDiagonalCausalMask else 23
            inp = create_inputs(bias_type, batch_size=1, q_len=17, kv_len=kv_len, num_heads=2, k=24, kv=16, fmt=fmt,
                                num_groups=2, gqa=fmt == "BMGHK", dtype=dtype, requires_grad=True,
                                bias_requires_grad=True, seed=3)
            q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
            variants = [(q, k, v, 1), (shifted(q), k, shifted(v), 0.3), (heads_major(q), heads_major(k), v, 0.5)]
            # dropout on or off per variant, alternating over the cases: every (variant, p) pair is seen
            for i, (qq, kk, vv, scale) in enumerate(variants):
                for p in [(0.0, 0.3)[(i + c) % 2]]:
                    out = fmha.memory_efficient_attention(qq, kk, vv, bias, p=p, scale=scale, op=op)
                    leaves = [x if x.is_leaf else x._base for x in (qq, kk, vv)]
                    torch.autograd.grad(out, leaves, torch.randn_like(out).transpose(1, 2).contiguous()
                                        .transpose(1, 2))
    with torch.no_grad():  # one setup, many dropout seeds: 1 in 16 is a multiple of 16, specialised apart
        for _ in range(48):
            fmha.memory_efficient_attention(q, k, v, bias, p=0.3, op=op)
    kernels = {c[2] for c in claims}
    assert kernels >= {"attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"}, kernels
