"""rope_padded against a float64 complex-multiplication reference, token by token: the kernel (under Triton's
interpreter on the CPU) and the torch path; cache rows written exactly where the bias says and nowhere else
(NaN-filled caches), padded and paged caches, positions, scaling, layouts, in-place bias updates, every error.
"""

import importlib
import math
from dataclasses import dataclass

import pytest
import torch

from triformers._triton import can_run_triton
from triformers.ops import rope_padded
from triformers.ops.fmha.attn_bias import (
    BlockDiagonalCausalWithOffsetPaddedKeysMask,
    PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
)

rp_mod = importlib.import_module("triformers.ops.rope_padded")
kernel_mod = importlib.import_module("triformers.ops._triton.rope_padded")

# Half an ulp of the output dtype (relative): the final rounding of a rotated value.
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
# Unit roundoff of the compute dtype (the rotation's arithmetic).
UNIT = {"": 2.0**-24, "f32": 2.0**-24, "f64": 2.0**-53}
DYNAMIC = {  # rope_padded's defaults: with D=34 and theta=1e4 the frequencies fall in all three bands
    "dynamic_old_context_len": 8192.0,
    "dynamic_scale_factor": 16.0,
    "dynamic_low_freq_factor": 1.0,
    "dynamic_high_freq_factor": 32.0,
}


# ------------------------------------------------------------------------------------------------- reference


def ref_frequencies(d: int, theta: float, dynamic: dict | None) -> torch.Tensor:
    """Float64 ``theta^(-2c/D)``, rescaled per llama 3.1 (the wavelength rule) when ``dynamic`` is given."""
    freqs = []
    for c in range(d // 2):
        f = theta ** (-2 * c / d)
        if dynamic is not None:
            old, scale = dynamic["dynamic_old_context_len"], dynamic["dynamic_scale_factor"]
            low, high = dynamic["dynamic_low_freq_factor"], dynamic["dynamic_high_freq_factor"]
            wavelen = 2 * math.pi / f
            if wavelen > old / low:
                f = f / scale
            elif wavelen > old / high:
                smooth = (old / wavelen - low) / (high - low)
                f = (1 - smooth) * f / scale + smooth * f
        freqs.append(f)
    return torch.tensor(freqs, dtype=torch.float64)


def ref_rope(x: torch.Tensor, pos: float, freqs: torch.Tensor, linear_scale: float, adjacents: bool) -> torch.Tensor:
    """One token ``x [..., D]`` rotated by ``pos * f / linear_scale``: complex multiplication in float64."""
    x = x.double().cpu()
    half = x.shape[-1] // 2
    re, im = (x[..., 0::2], x[..., 1::2]) if adjacents else (x[..., :half], x[..., half:])
    z = torch.complex(re, im) * torch.polar(torch.ones_like(freqs), pos * freqs / linear_scale)
    y = torch.empty_like(x)
    if adjacents:
        y[..., 0::2], y[..., 1::2] = z.real, z.imag
    else:
        y[..., :half], y[..., half:] = z.real, z.imag
    return y


@dataclass
class Expected:
    out_q: torch.Tensor  # float64, xq's shape
    rows: list  # cache rows written, in token order
    k: list  # float64 roped xk per written row
    v: list  # xv per written row (exact)
    max_angle: float


def expected(xq, xk, xv, q_lens, kv_lens, row_of, *, n_kv=None, theta=10000.0, linear_scale=1.0, dynamic=None,
             adjacents=True, first_seqpos=None, seqpos=None) -> Expected:  # fmt: skip
    """Token by token: token i of sequence b is the (kv_len - q_len + i)-th of its sequence."""
    freqs = ref_frequencies(xq.shape[-1], theta, dynamic)
    n_kv = xk.shape[-2] if n_kv is None else n_kv
    out = torch.empty(xq.shape, dtype=torch.float64)
    rows, ks, vs, max_angle = [], [], [], 0.0
    t = 0
    for b, (nq, nk) in enumerate(zip(q_lens, kv_lens)):
        for i in range(nq):
            p = nk - nq + i
            if seqpos is not None:
                pos = float(seqpos[t])
            else:
                pos = p + (float(first_seqpos[b]) if first_seqpos is not None else 0.0)
            max_angle = max(max_angle, abs(pos * freqs[0].item() / linear_scale))
            out[0, t] = ref_rope(xq[0, t], pos, freqs, linear_scale, adjacents)
            rows.append(row_of(b, p))
            ks.append(ref_rope(xk[0, t, ..., :n_kv, :], pos, freqs, linear_scale, adjacents))
            vs.append(xv[0, t, ..., :n_kv, :])
            t += 1
    return Expected(out, rows, ks, vs, max_angle)


def assert_rope_close(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, *, max_angle: float, internal_dtype="",
                      adjacents=True, what="") -> None:  # fmt: skip
    """Per feature pair: |got - ref| <= |pair| (output rounding + angle error + arithmetic), no NaN.

    The angle error is bounded by 8 roundings of the largest angle: the frequency (its exponent, and exp2 with
    up to 2 ulps on GPUs), the product by the position, the division by linear_scale (2 ulps on GPUs)."""
    assert not got.isnan().any(), f"{what}: NaN in the output"
    u = UNIT[internal_dtype]
    xd = x.double().cpu()
    half = xd.shape[-1] // 2
    re, im = (xd[..., 0::2], xd[..., 1::2]) if adjacents else (xd[..., :half], xd[..., half:])
    norm = torch.sqrt(re * re + im * im)
    norm = torch.stack([norm, norm], -1).flatten(-2) if adjacents else torch.cat([norm, norm], -1)
    rel = HALF_ULP[got.dtype] + 2.0**-24 + 8 * u * max(max_angle, 1.0) + 8 * u
    err = (got.double().cpu() - ref).abs()
    bound = norm * rel * 1.01 + 1e-300
    worst = (err / bound).max().item()
    assert worst <= 1, f"{what}: error {err.max().item():.3e} is {worst:.2f}x the bound (relative {rel:.2e})"


def check_call(xq, xk, xv, cache_k, cache_v, out, exp: Expected, n_kv, *, internal_dtype="", adjacents=True) -> None:
    """out_q and the written rows against ``exp``; every other cache row still NaN (never written)."""
    kw = {"max_angle": exp.max_angle, "internal_dtype": internal_dtype, "adjacents": adjacents}
    assert out.shape == xq.shape and out.dtype == xq.dtype
    assert_rope_close(out, exp.out_q, xq, what="out_q", **kw)
    assert len(set(exp.rows)) == len(exp.rows)
    for row, k_ref, v_ref, t in zip(exp.rows, exp.k, exp.v, range(xq.shape[1])):
        got, x = cache_k[0, row, ..., :n_kv, :], xk[0, t, ..., :n_kv, :]
        assert_rope_close(got, k_ref, x, what=f"cache_k row {row}", **kw)
        assert torch.equal(cache_v[0, row, ..., :n_kv, :], v_ref), f"cache_v row {row} is not xv's token {t}"
    untouched = torch.ones(cache_k.shape[1], dtype=torch.bool, device=cache_k.device)
    untouched[exp.rows] = False
    for name, cache in (("cache_k", cache_k), ("cache_v", cache_v)):
        assert cache[0, untouched].isnan().all(), f"{name}: a row outside the written ones was modified"


# ------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Runs a test on the Triton kernel (interpreter) and on the torch implementation; fails on the other."""

    def fail(*args, **kwargs):
        raise AssertionError(f"rope_padded left the {request.param} path")

    if request.param == "kernel":
        monkeypatch.setattr(rp_mod, "_rope_padded_torch", fail)
    else:
        monkeypatch.setattr(rp_mod, "use_triton", lambda *a: False)
        monkeypatch.setattr(rp_mod, "rope_padded_fwd", fail)
    return request.param


def nan_cache(rows, mid, heads, d, dtype, expand_to=None):
    """NaN-filled cache ``[1, rows, (G,) heads, D]``, expanded (stride 0) to ``expand_to`` heads if given."""
    c = torch.full((1, rows, *mid, heads, d), math.nan, dtype=dtype)
    return c.expand(*c.shape[:-2], expand_to, d) if expand_to is not None else c


def padded_case(q_lens, kv_lens, padding, *, hq=5, hkv=2, d=34, groups=1, dtype=torch.float32):
    """Random BMHK (groups=1) or BMGHK tokens, NaN caches of ``B * padding`` rows, and the bias."""
    mid = (groups,) if groups > 1 else ()
    t = sum(q_lens)
    xq, xk, xv = (torch.randn(1, t, *mid, h, d).to(dtype) for h in (hq, hkv, hkv))
    rows = len(q_lens) * padding
    bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, padding, kv_lens, device="cpu")
    return xq, xk, xv, nan_cache(rows, mid, hkv, d, dtype), nan_cache(rows, mid, hkv, d, dtype), bias


def paged_bias(q_lens, kv_lens, block_tables, page_size):
    return PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_lens, kv_lens, block_tables, page_size, device="cpu"
    )


Q_LENS, KV_LENS, PADDING = [2, 0, 3, 1], [5, 4, 9, 11], 11  # a sequence without new tokens, one at its slot's end


# ------------------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("adjacents", [True, False], ids=["adj", "halves"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("internal_dtype", ["", "f32", "f64"])
@pytest.mark.parametrize("d, groups", [(6, 1), (34, 3), (128, 1)])
def test_matches_reference(path, adjacents, dtype, internal_dtype, d, groups):
    xq, xk, xv, ck, cv, bias = padded_case(Q_LENS, KV_LENS, PADDING, d=d, groups=groups, dtype=dtype)
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias, adjacents=adjacents, internal_dtype=internal_dtype)
    exp = expected(xq, xk, xv, Q_LENS, KV_LENS, lambda b, p: b * PADDING + p, adjacents=adjacents)
    check_call(xq, xk, xv, ck, cv, out, exp, 2, internal_dtype=internal_dtype, adjacents=adjacents)


def test_kernel_and_torch_paths_agree():
    """Same inputs through both paths: equal cache_v, out_q and cache_k within an output ulp."""
    xq, xk, xv, ck, cv, bias = padded_case(Q_LENS, KV_LENS, PADDING, d=34, groups=3, dtype=torch.float16)
    results = []
    for use_kernel in (True, False):
        k, v = ck.clone(), cv.clone()
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            if not use_kernel:
                mp.setattr(rp_mod, "use_triton", lambda *a: False)
            out = rope_padded(xq, xk, xv, k, v, bias, use_dynamic_scaling=True, linear_scale=2.5,
                              first_seqpos=torch.tensor([7, 0, 300, 5]))  # fmt: skip
        results.append((out, k, v))
    (o1, k1, v1), (o2, k2, v2) = results
    assert torch.equal(v1.isnan(), v2.isnan()) and torch.equal(v1.nan_to_num(), v2.nan_to_num())
    assert torch.equal(k1.isnan(), k2.isnan())
    ulp = 2.0**-10 * xq.abs().max().item() * 1.5
    torch.testing.assert_close(o1, o2, atol=ulp, rtol=0)
    torch.testing.assert_close(k1.nan_to_num(), k2.nan_to_num(), atol=ulp, rtol=0)


@pytest.mark.parametrize("linear_scale, dynamic", [(4.0, None), (1.0, DYNAMIC), (2.5, DYNAMIC)])
@pytest.mark.parametrize("internal_dtype", ["", "f64"])
def test_scaling(path, linear_scale, dynamic, internal_dtype):
    d = 34
    if dynamic is not None:  # every band of the llama-3.1 rule is exercised
        wavelen = 2 * math.pi / ref_frequencies(d, 1e4, None)
        old = dynamic["dynamic_old_context_len"]
        assert (wavelen > old).any() and (wavelen < old / 32).any() and ((wavelen < old) & (wavelen > old / 32)).any()
    xq, xk, xv, ck, cv, bias = padded_case(Q_LENS, KV_LENS, PADDING, d=d)
    first = torch.tensor([1000, 0, 20000, 3])  # large positions: float32 angles would miss the f64 bound
    kw = {"use_dynamic_scaling": True, **dynamic} if dynamic is not None else {}
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias, linear_scale=linear_scale, first_seqpos=first,
                          internal_dtype=internal_dtype, **kw)  # fmt: skip
    exp = expected(xq, xk, xv, Q_LENS, KV_LENS, lambda b, p: b * PADDING + p, linear_scale=linear_scale,
                   dynamic=dynamic, first_seqpos=first)  # fmt: skip
    check_call(xq, xk, xv, ck, cv, out, exp, 2, internal_dtype=internal_dtype)


def test_positions(path):
    """first_seqpos shifts positions per sequence; seqpos (out of order, repeated) sets each one; neither changes
    which rows are written. theta other than the default."""
    xq, xk, xv, ck, cv, bias = padded_case(Q_LENS, KV_LENS, PADDING, hq=3, hkv=3)
    row_of = lambda b, p: b * PADDING + p  # noqa: E731
    first = torch.tensor([4, 9, 0, 123], dtype=torch.int32)
    seqpos = torch.tensor([934, 3, 3, 0, 17, 2])
    for kw in ({"first_seqpos": first}, {"seqpos": seqpos}, {"seqpos": seqpos.double() + 0.5}):
        k, v = ck.clone(), cv.clone()
        with torch.no_grad():
            out = rope_padded(xq, xk, xv, k, v, bias, theta=500000.0, **kw)
        exp = expected(xq, xk, xv, Q_LENS, KV_LENS, row_of, theta=500000.0, **kw)
        check_call(xq, xk, xv, k, v, out, exp, 3)


def test_llama_layout_expanded_kv_and_caches(path):
    """BMGHK from one packed q/k/v projection (strided views), K/V and caches expanded over the query heads
    of each group (stride 0): one head per group is read and written."""
    groups, hg, d = 2, 3, 34
    q_lens, kv_lens, padding = [3, 1], [3, 8], 9
    t = sum(q_lens)
    qkv = torch.randn(t, (groups * hg + 2 * groups) * d)
    xq, xk, xv = qkv.split([groups * hg * d, groups * d, groups * d], dim=-1)
    xq = xq.view(1, t, groups, hg, d)
    xk, xv = (x.view(1, t, groups, 1, d).expand(1, t, groups, hg, d) for x in (xk, xv))
    ck, cv = (nan_cache(2 * padding, (groups,), 1, d, torch.float32, expand_to=hg) for _ in range(2))
    bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, padding, kv_lens, device="cpu")
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias, adjacents=False)
    exp = expected(xq, xk, xv, q_lens, kv_lens, lambda b, p: b * padding + p, n_kv=1, adjacents=False)
    check_call(xq, xk, xv, ck, cv, out, exp, 1, adjacents=False)


def test_out_q(path):
    """out_q written in place: a strided view into a larger buffer, and xq itself."""
    xq, xk, xv, ck, cv, bias = padded_case(Q_LENS, KV_LENS, PADDING, d=6)
    exp = expected(xq, xk, xv, Q_LENS, KV_LENS, lambda b, p: b * PADDING + p)
    buf = torch.full((1, xq.shape[1], 7, 8), math.nan)
    out_q = buf[:, :, 1:6, 1:7]
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias, out_q=out_q)
    assert out is out_q
    check_call(xq, xk, xv, ck, cv, out, exp, 2)
    assert buf[:, :, 0].isnan().all() and buf[..., 0].isnan().all() and buf[..., 7].isnan().all()
    x = xq.clone()
    with torch.no_grad():
        out = rope_padded(x, xk, xv, ck.clone(), cv.clone(), bias, out_q=x)
    assert out is x
    assert_rope_close(x, exp.out_q, xq, max_angle=exp.max_angle, what="in place")


def test_seqlen_updated_in_place(path):
    """Decoding as under a CUDA graph: seqlen and seqstart tensors change in place, the Python lists go stale;
    the rows and positions follow the tensors."""
    q_lens, kv_lens, padding = [1, 1, 1], [4, 1, 6], 8
    xq, xk, xv, ck, cv, bias = padded_case(q_lens, kv_lens, padding, d=6)
    for step in range(3):
        lens = [n + step for n in kv_lens]
        k, v = ck.clone(), cv.clone()
        with torch.no_grad():
            out = rope_padded(xq, xk, xv, k, v, bias)
        exp = expected(xq, xk, xv, q_lens, lens, lambda b, p: b * padding + p)
        check_call(xq, xk, xv, k, v, out, exp, 2)
        bias.k_seqinfo.seqlen.add_(1)
    assert list(bias.k_seqinfo.seqlen_py) == kv_lens


def test_rows_outside_the_slot_are_not_written(path):
    """A seqlen tensor inconsistent with the bias (fewer used rows than new tokens, or more than the padding)
    rotates q as usual but writes no cache row outside the sequence's slot."""
    q_lens, kv_lens, padding = [3, 2, 2], [3, 2, 2], 4
    xq, xk, xv, ck, cv, bias = padded_case(q_lens, kv_lens, padding, d=6)
    bias.k_seqinfo.seqlen.copy_(torch.tensor([1, 6, 3]))  # 2 tokens before the slot, 2 past it, 2 inside
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias)
    exp = expected(xq, xk, xv, q_lens, [1, 6, 3], lambda b, p: b * padding + p)
    assert_rope_close(out, exp.out_q, xq, max_angle=exp.max_angle, what="out_q")
    written = {r for r, p in zip(exp.rows, [-2, -1, 0, 4, 5, 1, 2]) if 0 <= p < padding}
    assert written == {0, 9, 10}
    assert [r for r in range(ck.shape[1]) if not ck[0, r].isnan().all()] == sorted(written)
    assert [r for r in range(cv.shape[1]) if not cv[0, r].isnan().all()] == sorted(written)


@pytest.mark.parametrize("page_size", [1, 4])
def test_paged_cache(path, page_size):
    """Paged bias: rows through the block table (pages in random order, some unused), logical positions."""
    q_lens, kv_lens, pages_per_row = [2, 0, 3], [5, 3, 8], 3 if page_size == 4 else 9
    n_pages = 2 * len(q_lens) * pages_per_row + 1
    block_tables = torch.randperm(n_pages)[: len(q_lens) * pages_per_row].view(len(q_lens), -1).to(torch.int32)
    bias = paged_bias(q_lens, kv_lens, block_tables, page_size)
    d, t = 6, sum(q_lens)
    xq, xk, xv = (torch.randn(1, t, h, d) for h in (4, 2, 2))
    ck, cv = (nan_cache(n_pages * page_size, (), 2, d, torch.float32) for _ in range(2))
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias, first_seqpos=torch.tensor([3, 0, 11]))
    row_of = lambda b, p: block_tables[b, p // page_size].item() * page_size + p % page_size  # noqa: E731
    exp = expected(xq, xk, xv, q_lens, kv_lens, row_of, first_seqpos=torch.tensor([3, 0, 11]))
    check_call(xq, xk, xv, ck, cv, out, exp, 2)


def test_paged_guard_skips_bad_pages(path):
    """Block-table entries changed after the bias was built (negative, past the cache): those tokens write
    nothing, the others are written."""
    q_lens, kv_lens, page_size = [2, 2], [2, 4], 2
    block_tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    bias = paged_bias(q_lens, kv_lens, block_tables, page_size)
    xq, xk, xv = (torch.randn(1, 4, 2, 6) for _ in range(3))
    ck, cv = (nan_cache(4 * page_size, (), 2, 6, torch.float32) for _ in range(2))
    block_tables[0, 0] = -1
    block_tables[1, 1] = 4
    with torch.no_grad():
        rope_padded(xq, xk, xv, ck, cv, bias)
    assert ck.isnan().all() and cv.isnan().all()
    block_tables[1, 1] = 3
    with torch.no_grad():
        rope_padded(xq, xk, xv, ck, cv, bias)
    assert torch.equal(cv[0, 6:8], xv[0, 2:4])
    assert ck[0, :6].isnan().all() and cv[0, :6].isnan().all()


@pytest.mark.parametrize("programs_per_sm", [1, 64], ids=["one-program-per-token", "rows-split"])
def test_small_tiles_loop(path, monkeypatch, programs_per_sm):
    """Head dims over several D-chunks (9 pairs in chunks of 4) and head rows over several tiles (14 rows in
    tiles of 8), looped over by one program per token or split over two."""
    monkeypatch.setattr(kernel_mod, "BLOCK_D_MAX", 4)
    monkeypatch.setattr(kernel_mod, "MAX_WARPS", 1)
    monkeypatch.setattr(kernel_mod, "PAIRS_PER_THREAD", {False: 1, True: 1})  # tiles of 8 rows x 4 pairs
    monkeypatch.setattr(kernel_mod, "PROGRAMS_PER_SM", programs_per_sm)
    assert kernel_mod._tiles(9, 14, False)[:2] == (4, 8)
    assert kernel_mod.row_splits(2, 4, kernel_mod.sm_count(torch.empty(0))) == (1 if programs_per_sm == 1 else 2)
    xq, xk, xv, ck, cv, bias = padded_case([1, 2], [3, 2], 4, hq=3, hkv=2, d=18, groups=2)
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias, adjacents=False)
    exp = expected(xq, xk, xv, [1, 2], [3, 2], lambda b, p: b * 4 + p, adjacents=False)
    check_call(xq, xk, xv, ck, cv, out, exp, 2, adjacents=False)


def test_empty_batch(path):
    xq, xk, xv, ck, cv, bias = padded_case([0, 0], [1, 2], 3, d=6)
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias)
    assert out.shape == xq.shape and ck.isnan().all() and cv.isnan().all()


def test_plain_cpu_takes_torch_path_silently(monkeypatch, recwarn):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(rp_mod, "rope_padded_fwd", lambda *a, **k: pytest.fail("kernel on a plain CPU tensor"))
    xq, xk, xv, ck, cv, bias = padded_case(Q_LENS, KV_LENS, PADDING, d=6)
    assert not can_run_triton(xq)
    with torch.no_grad():
        out = rope_padded(xq, xk, xv, ck, cv, bias)
    check_call(xq, xk, xv, ck, cv, out, expected(xq, xk, xv, Q_LENS, KV_LENS, lambda b, p: b * PADDING + p), 2)
    assert not [w for w in recwarn if "rope_padded" in str(w.message)]


def test_float64_inputs_torch_path():
    """float64 tokens and caches (no kernel dtype) run the torch path with a one-time warning."""
    xq, xk, xv, ck, cv, bias = padded_case(Q_LENS, KV_LENS, PADDING, d=6, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(UserWarning, match="rope_padded: running the pure-torch path"):
        out = rope_padded(xq, xk, xv, ck, cv, bias, internal_dtype="f64")
    exp = expected(xq, xk, xv, Q_LENS, KV_LENS, lambda b, p: b * PADDING + p)
    check_call(xq, xk, xv, ck, cv, out, exp, 2, internal_dtype="f64")


# ------------------------------------------------------------------------------------------------- errors


def _base(groups=1):
    xq, xk, xv, ck, cv, bias = padded_case([2, 1], [3, 4], 5, hq=4, hkv=2, d=6, groups=groups)
    return {"xq": xq, "xk": xk, "xv": xv, "cache_k": ck, "cache_v": cv, "attn_bias": bias}


def _set(**changes):
    return lambda a: a.update({k: (v(a) if callable(v) else v) for k, v in changes.items()})


def _paged_stand_in(a, *, rows=None, **changes):
    """Duck-typed paged bias (no construction-time checks) over the base case; 2 pages of 5 rows per sequence."""
    from types import SimpleNamespace

    q_info, k_info = a["attn_bias"].q_seqinfo, a["attn_bias"].k_seqinfo
    fields = {"q_seqinfo": q_info, "k_seqinfo": k_info, "page_size": 5,
              "block_tables": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), **changes}  # fmt: skip
    a["attn_bias"] = SimpleNamespace(**fields)
    n = rows if rows is not None else 20
    a["cache_k"], a["cache_v"] = (nan_cache(n, (), 2, 6, torch.float32) for _ in range(2))


def _expanded(name, heads):
    return lambda a: a.update({name: a[name][..., :1, :].expand(*a[name].shape[:-2], heads, a[name].shape[-1])})


def _last_dim_strided(name):
    return lambda a: a.update({name: torch.stack([a[name], a[name]], -1)[..., 0]})


ERRORS = {
    "internal_dtype": (_set(internal_dtype="f16"), "internal_dtype must be '', 'f32' or 'f64', got .*'f16'"),
    "theta": (_set(theta=0.0), r"theta must be a finite number > 0 .* got theta=0.0"),
    "linear_scale": (_set(linear_scale=math.inf), "linear_scale must be a finite non-zero number"),
    "old_ctx": (_set(use_dynamic_scaling=True, dynamic_old_context_len=-1.0), "dynamic_old_context_len must be"),
    "scale_factor": (_set(use_dynamic_scaling=True, dynamic_scale_factor=0.0), "dynamic_scale_factor must be"),
    "freq_factors": (_set(use_dynamic_scaling=True, dynamic_low_freq_factor=4.0, dynamic_high_freq_factor=4.0),
                     r"0 <= dynamic_low_freq_factor < dynamic_high_freq_factor .* got dynamic_low_freq_factor=4.0"),
    "xq_dims": (_set(xq=lambda a: a["xq"][0]), r"Unexpected xq dimension: xq.shape=\(3, 4, 6\) has 3 dims"),
    "batch": (_set(xq=lambda a: a["xq"].expand(2, -1, -1, -1)), "Expected batch size dimension to be 1 as batches"),
    "xk_dims": (_set(xk=lambda a: a["xk"][None]), r"xk.shape=\(1, 1, 3, 2, 6\) must have xq's 4 dims"),
    "bias_type": (_set(attn_bias=None), "needs a KV-cache bias with padded keys.* got attn_bias of type NoneType"),
    "bias_inconsistent": (lambda a: setattr(a["attn_bias"].k_seqinfo, "seqlen", torch.tensor([3, 4, 5])),
                          r"attn_bias.k_seqinfo.seqlen must be an int32/int64 tensor of shape \(2,\)"),
    "query_rows": (_set(xq=lambda a: a["xq"][:, :2]), r"xq has 2 query rows .* attn_bias describes 3"),
    "odd_dim": (_set(**{n: (lambda a, n=n: a[n][..., :5]) for n in ("xq", "xk", "xv", "cache_k", "cache_v")}),
                "the head dim must be even, got D=5"),
    "k_shape": (_set(xk=lambda a: a["xk"][:, :2]), r"unexpected k shape \(1, 2, 2, 6\): expected \(1, 3, 2, 6\)"),
    "v_shape": (_set(xv=lambda a: a["xv"][..., :1, :]), r"unexpected v shape \(1, 3, 1, 6\): expected \(1, 3, 2, 6\)"),
    "cache_k_rows": (_set(cache_k=lambda a: a["cache_k"][:, :9]),
                     r"unexpected cache_k shape \(1, 9, 2, 6\): expected \(1, 10, 2, 6\)"),
    "cache_v_heads": (_set(cache_v=lambda a: a["cache_v"][..., :1, :]), r"unexpected cache_v shape \(1, 10, 1, 6\)"),
    "xv_not_expanded": (_expanded("xk", 2), "xk is expanded over its heads .* but xv is not"),
    "cache_v_not_expanded": (lambda a: [_expanded(n, 2)(a) for n in ("xk", "xv", "cache_k")],
                             r"one head is written, but cache_v is not \(cache_v.stride\(\)=\(120, 12, 6, 1\)\)"),
    "cache_repeats_head": (_expanded("cache_k", 2), r"cache_k repeats one head over dim -2 .* xk has 2 distinct"),
    "dtype": (_set(xv=lambda a: a["xv"].half()), "xv.dtype=torch.float16 differs from xq.dtype=torch.float32"),
    "int_inputs": (_set(**{n: (lambda a, n=n: a[n].int()) for n in ("xq", "xk", "xv", "cache_k", "cache_v")}),
                   "xq must be a floating-point tensor, got xq.dtype=torch.int32"),
    "q_stride": (_last_dim_strided("xq"), r"Each q head must be contiguous: xq.stride\(\)=.* has stride 2"),
    "k_stride": (_last_dim_strided("xk"), "Each k head must be contiguous.*pass it with .contiguous()"),
    "v_stride": (_last_dim_strided("xv"), "Each v head must be contiguous"),
    "cache_k_stride": (_last_dim_strided("cache_k"), "Each cache_k head must be contiguous.*unit stride on D"),
    "cache_v_stride": (_last_dim_strided("cache_v"), "Each cache_v head must be contiguous"),
    "out_q_stride": (_set(out_q=lambda a: torch.stack([a["xq"], a["xq"]], -1)[..., 0]),
                     "Each out_q head must be contiguous"),
    "out_q_shape": (_set(out_q=lambda a: a["xq"][..., :3, :].clone()), r"Unexpected shape of out_q \(1, 3, 3, 6\)"),
    "device": (_set(cache_v=lambda a: a["cache_v"].to("meta")), "cache_v is on meta but xq on cpu"),
    "bias_device": (lambda a: setattr(a["attn_bias"].k_seqinfo, "seqlen", torch.tensor([3, 4], device="meta")),
                    "`attn_bias` must be on the same device as the other inputs: .*seqlen is on meta"),
    "both_positions": (_set(seqpos=torch.arange(3), first_seqpos=torch.zeros(2, dtype=torch.int32)),
                       "seqpos and first_seqpos may not both be provided"),
    "first_seqpos_shape": (_set(first_seqpos=torch.zeros(3, dtype=torch.int32)),
                           r"first_seqpos.shape \(3,\) but \(2,\) expected \(one position per sequence"),
    "seqpos_shape": (_set(seqpos=torch.arange(2)), r"seqpos.shape \(2,\) but \(3,\) expected \(one position per query"),
    "seqpos_dtype": (_set(seqpos=torch.ones(3, dtype=torch.bool)), "seqpos must hold integer or real positions"),
    "seqpos_device": (_set(seqpos=torch.arange(3, device="meta")), "seqpos is on meta but xq on cpu"),
    "page_size": (lambda a: _paged_stand_in(a, page_size=0), "attn_bias.page_size must be an int > 0, got 0"),
    "block_tables": (lambda a: _paged_stand_in(a, block_tables=torch.zeros(2, 2)),
                     r"block_tables must be an int32/int64 \[B, max_pages\] tensor with B=2, got shape=\(2, 2\), "
                     "dtype=torch.float32"),
    "paged_rows": (lambda a: _paged_stand_in(a, rows=19), "cache_k.shape\\[1\\]=19 is not a multiple of"),
    "page_past_cache": (lambda a: _paged_stand_in(a, rows=15),
                        "block_tables points to page 3 but the cache has 3 pages .* at least 20 cache rows"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(case):
    mutate, match = ERRORS[case]
    args = _base()
    mutate(args)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        rope_padded(**args)


def test_paged_bias_page_check_uses_stored_max():
    """The real paged bias: its stored largest page id is checked against the cache at call time."""
    bias = paged_bias([1, 1], [3, 4], torch.tensor([[0, 5], [2, 3]], dtype=torch.int32), 2)
    xq, xk, xv = (torch.randn(1, 2, 2, 6) for _ in range(3))
    ck, cv = (nan_cache(10, (), 2, 6, torch.float32) for _ in range(2))
    with torch.no_grad(), pytest.raises(ValueError, match="points to page 5 but the cache has 5 pages"):
        rope_padded(xq, xk, xv, ck, cv, bias)


def test_gradients_not_supported():
    a = _base()
    a["xk"].requires_grad_()
    with pytest.raises(ValueError, match="Gradients not supported.*torch.no_grad"):
        rope_padded(**a)
    a = _base()
    with pytest.raises(ValueError, match="Gradients not supported"):  # out_q while grad is enabled, as in xFormers
        rope_padded(**a, out_q=torch.empty_like(a["xq"]))
    with torch.inference_mode():
        rope_padded(**a, out_q=torch.empty_like(a["xq"]))
