"""Dispatch: the documented CPU choices, plain-words reasons, forcing with op= and TRIFORMERS_FMHA_OP."""

import json
from pathlib import Path

import pytest
import torch

from triformers.benchmarks import fmha_cpu
from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import chunked, dispatch, sdpa
from triformers.ops.fmha.reference import ref_attention

REPO = Path(__file__).resolve().parents[3]


def _pick(q, k, v, bias=None, p=0.0, needs_gradient=False, needs_lse=False):
    inp = fmha.Inputs(q, k, v, bias, p)
    inp.normalize_bmhk()
    return dispatch.dispatch_fw(inp, needs_gradient=needs_gradient, needs_lse=needs_lse)


def _qkv(B=1, Mq=64, Mkv=64, H=2, K=16, requires_grad=False):
    return (torch.randn(B, Mq, H, K, requires_grad=requires_grad),
            torch.randn(B, Mkv, H, K, requires_grad=requires_grad),
            torch.randn(B, Mkv, H, K, requires_grad=requires_grad))


@pytest.mark.parametrize("needs_gradient", [False, True])
def test_cpu_prefers_sdpa_where_it_runs(needs_gradient):
    q, k, v = _qkv(requires_grad=needs_gradient)
    assert _pick(q, k, v, needs_gradient=needs_gradient) is sdpa.FwOp
    assert _pick(q, k, v, ab.LowerTriangularMask(), needs_gradient=needs_gradient) is sdpa.FwOp
    assert _pick(q, k, v, torch.randn(1, 2, 64, 64), needs_gradient=needs_gradient) is sdpa.FwOp
    k5 = torch.randn(1, 64, 2, 1, 16).expand(1, 64, 2, 3, 16)
    assert _pick(torch.randn(1, 64, 2, 3, 16), k5, k5, needs_gradient=needs_gradient) is sdpa.FwOp


def test_cpu_chunked_for_what_sdpa_cannot_express():
    q, k, v = _qkv(Mq=40, Mkv=64)
    for bias in (ab.LowerTriangularMask(), ab.LowerTriangularFromBottomRightMask(),
                 ab.LocalAttentionFromBottomRightMask(3, 2)):
        assert _pick(q, k, v, bias) is chunked.FwOp
    assert _pick(*_qkv(), p=0.1) is chunked.FwOp  # SDPA's CPU dropout runs in its math backend
    qg, kg, vg = _qkv(requires_grad=True)
    bias = torch.randn(1, 2, 64, 64, requires_grad=True)  # gradient of the mask: math backend
    assert _pick(qg, kg, vg, bias, needs_gradient=True) is chunked.FwOp
    assert _pick(*_qkv(), needs_lse=True) is sdpa.FwOp  # the low-level API: sdpa computes the lse too
    assert _pick(*_qkv(), p=0.1, needs_lse=True) is chunked.FwOp  # but no backward can replay its dropout


def test_cpu_block_diagonal_rule():
    small = ab.BlockDiagonalMask.from_seqlens([64] * 8).make_causal()  # 64 < CPU_SDPA_MIN_BLOCK_GRAD
    big = ab.BlockDiagonalMask.from_seqlens([512] * 2).make_causal()
    q, k, v = _qkv(Mq=512, Mkv=512)
    assert _pick(q, k, v, small, needs_gradient=False) is sdpa.FwOp
    assert _pick(q, k, v, small, needs_gradient=True) is chunked.FwOp
    assert _pick(q, k, v, big, needs_gradient=True) is sdpa.FwOp
    assert dispatch.CPU_SDPA_MIN_BLOCK_GRAD > 64 and dispatch.CPU_SDPA_MIN_BLOCK_GRAD <= 512


def test_reasons_are_plain_words():
    q, k, v = _qkv(Mq=40, Mkv=64)
    reasons = sdpa.FwOp.not_supported_reasons(fmha.Inputs(q, k, v, ab.LowerTriangularMask()))
    assert any("Mq == Mkv" in r for r in reasons)
    reasons = sdpa.FwOp.not_supported_reasons(fmha.Inputs(q, k, v, ab.LocalAttentionFromBottomRightMask(1, 1)))
    assert reasons == ["attn_bias type is LocalAttentionFromBottomRightMask"]
    q16 = q.to(torch.float64)
    assert any("dtype=torch.float64" in r for r in sdpa.FwOp.not_supported_reasons(fmha.Inputs(q16, q16, q16)))


def test_explicit_op_that_cannot_run_raises_value_error():
    q, k, v = _qkv(Mq=40, Mkv=64)
    with pytest.raises(ValueError, match="`sdpaF` is not supported because:\n.*attn_bias type is Local"):
        fmha.memory_efficient_attention(q, k, v, ab.LocalAttentionFromBottomRightMask(1, 1),
                                        op=fmha.MemoryEfficientAttentionSdpaOp)


def test_nothing_fits_lists_every_reason():
    q = torch.randn(1, 8, 2, 16, device="meta")
    with pytest.raises(NotImplementedError) as info:
        fmha.memory_efficient_attention_forward(q, q, q)
    msg = str(info.value)
    assert "No operator found for `memory_efficient_attention_forward`" in msg
    assert "`chunkedF` is not supported because:" in msg and "device=meta" in msg
    assert "query       : shape=(1, 8, 2, 16)" in msg


def test_env_forces_operator(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("TRIFORMERS_FMHA_OP", "chunked")
    assert _pick(q, k, v) is chunked.FwOp
    monkeypatch.setenv("TRIFORMERS_FMHA_OP", "chunkedF")
    assert _pick(q, k, v) is chunked.FwOp
    monkeypatch.setenv("TRIFORMERS_FMHA_OP", "sdpa")
    with pytest.raises(ValueError, match="does not support inputs"):
        fmha.memory_efficient_attention(*_qkv(Mq=40), ab.LocalAttentionFromBottomRightMask(1, 1))
    monkeypatch.setenv("TRIFORMERS_FMHA_OP", "nonsense")
    with pytest.raises(ValueError, match="names no operator"):
        fmha.memory_efficient_attention(q, k, v)
    monkeypatch.setenv("TRIFORMERS_FMHA_OP", "auto")
    assert _pick(q, k, v) is sdpa.FwOp


def test_cpu_auto_picks_the_faster_operator_of_the_committed_benchmark():
    """The CPU rules against their measurements: for every case of ``benchmarks/results/cpu/fmha_cpu.json``
    (``python -m triformers.benchmarks.fmha_cpu``), auto dispatches to an operator whose recorded time is within
    1.2x of the faster one. A rule test on committed records: speed is measured by the benchmark, not here."""
    records = json.loads((REPO / "benchmarks" / "results" / "cpu" / "fmha_cpu.json").read_text())["records"]
    cases: dict = {}
    for r in records:
        case = {k: v for k, v in r.items() if k not in ("provider", "ms", "mode", "dtype", "error")}
        cases.setdefault((json.dumps(case, sort_keys=True), r["mode"], r["dtype"]), {})[r["provider"]] = r.get("ms")
    ops = {"chunked": chunked.FwOp, "sdpa": sdpa.FwOp}
    assert len(cases) >= 20
    for (case, mode, dtype), ms in cases.items():
        c = json.loads(case)
        q, k, v, bias = fmha_cpu._build(c, getattr(torch, dtype), requires_grad=False)
        picked = _pick(q, k, v, bias, needs_gradient=mode == "fwbw")
        best = min(t for name, t in ms.items() if name in ops and t is not None)
        assert ms[next(n for n, op in ops.items() if op is picked)] <= 1.2 * best, (c, mode, ms, picked.NAME)


def test_cached_checks_follow_block_diagonal_parameters():
    """Checks of an explicitly chosen operator are remembered per input signature; two block-diagonal biases
    over the same shapes but different sequences are different signatures."""
    q = torch.randn(1, 12, 2, 8)
    ok = ab.BlockDiagonalCausalMask.from_seqlens([4, 8], [4, 8])
    fmha.memory_efficient_attention(q, q, q, ok, op=fmha.MemoryEfficientAttentionSdpaOp)
    fmha.memory_efficient_attention(q, q, q, ok, op=fmha.MemoryEfficientAttentionSdpaOp)  # remembered
    k = torch.randn(1, 12, 2, 8)  # the same key count for both biases
    unequal = ab.BlockDiagonalCausalMask.from_seqlens([4, 8], [6, 6])  # SDPA cannot express it
    with pytest.raises(ValueError, match="equal query and key lengths"):
        fmha.memory_efficient_attention(q, k, k, unequal, op=fmha.MemoryEfficientAttentionSdpaOp)
    # auto: the same shapes, the two biases, each dispatched to an operator that runs it
    for bias in (ok, unequal, ok, unequal):
        out = fmha.memory_efficient_attention(q, k, k, bias)
        ref, _ = ref_attention(q, k, k, bias)
        torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-4, rtol=1e-4)
