"""The decoding benchmark's bookkeeping on the CPU: cases, bytes counted, acceptance ratios and the summary."""

import math

import pytest

from triformers.benchmarks import decode


def test_cases_cover_the_groups():
    cs = decode.cases({"bf16", "quant", "hkv", "mq"}, quick=False)
    assert {(c.B, c.L) for c in cs} == set(decode.SHAPES)
    assert {c.cache for c in cs} == {"contiguous", "padded", "paged256", "paged16", "int4", "fp8"}
    assert {c.Hkv for c in cs} == {1, 8, 32} and {c.Mq for c in cs} == {1, 4, 16}
    assert all(c.B * c.L == 131072 for c in cs)
    padded = [c for c in cs if c.cache == "padded"]
    assert all(c.L // 2 <= n <= c.L for c in padded for n in c.lens) and all(len(c.lens) == c.B for c in padded)


def test_kv_bytes():
    c = decode.Case(4, 1000, 8, 1, "contiguous")
    assert c.kv_bytes() == 2 * 4 * 1000 * 8 * 2 * decode.D
    assert decode.Case(4, 1000, 8, 1, "int4").kv_bytes() == 2 * 4 * 1000 * 8 * (decode.D // 2 + 4)
    assert decode.Case(4, 1000, 8, 1, "fp8").kv_bytes() == 2 * 4 * 1000 * 8 * (decode.D + 4)
    p = decode.Case(2, 1000, 8, 1, "padded")
    assert p.kv_bytes() == 2 * sum(p.lens) * 8 * 2 * decode.D
    assert decode.Case(2, 512, 8, 1, "paged16").page_size == 16


def _rec(B, L, cache, provider, ms, Hkv=8, Mq=1):
    c = decode.Case(B, L, Hkv, Mq, cache)
    moved = c.kv_bytes() * (2 if provider == "copy" else 1)
    return dict(c.record(), provider=provider, ms=ms, ms_eager=ms * 1.5, gbps=moved / (ms * 1e-3) / 1e9)


def test_acceptance_ratios():
    recs = []
    for (B, L), ours in zip([(1, 131072), (4, 32768)], [0.10, 0.12]):
        recs += [_rec(B, L, "contiguous", "triformers", ours), _rec(B, L, "contiguous", "copy", 0.18),
                 _rec(B, L, "contiguous", "sdpa", 0.25), _rec(B, L, "contiguous", "flex", 0.15),
                 _rec(B, L, "paged256", "triformers", ours * 1.05), _rec(B, L, "int4", "triformers", ours / 3),
                 _rec(B, L, "fp8", "triformers", ours / 1.7)]
    acc = decode.acceptance({"env": {}, "records": recs})
    vals = list(acc.values())
    # fraction of copy: ours reads X bytes in t, copy moves 2X in 0.18 ms
    assert vals[0] == pytest.approx(math.sqrt((0.18 / 2 / 0.10) * (0.18 / 2 / 0.12)))
    assert vals[1] == pytest.approx(0.25 / 0.12)
    assert vals[2] == pytest.approx(0.15 / 0.12)
    assert vals[3] == pytest.approx(1.05)
    assert vals[4] == pytest.approx(3.0)
    assert vals[5] == pytest.approx(1.7)
    summary = decode.markdown_summary({"env": {"gpu": "GPU", "torch": "t", "triton": "tr", "commit": "c"},
                                       "records": recs + [dict(_rec(1, 131072, "paged16", "sdpa", 1.0),
                                                               error="x")]})
    assert "B=1 L=131072 Hkv=8 Mq=1 contiguous" in summary and "0.100 / 0.150" in summary


@pytest.mark.parametrize("cache,Mq", [("contiguous", 1), ("padded", 1), ("paged16", 1), ("contiguous", 4),
                                      ("int4", 1), ("fp8", 1)])
def test_providers_match_the_reference_on_the_cpu(cache, Mq):
    """Each case's inputs and the providers that run on the CPU (the Triton ones under the interpreter) agree
    with the float32 reference of the first sequence, as the GPU run checks before timing."""
    import torch

    from triformers.benchmarks import _decode_providers as prov

    c = decode.Case(2, 48, 2, Mq, cache)
    inp = prov.make_inputs(c, Hq=4, D=32, device="cpu", dtype=torch.float16)
    ref = prov.reference_seq0(inp)
    names = ["triformers", "triformers_splitk"]
    if cache not in ("int4", "fp8"):
        names.append("triformers_triton")
    if not cache.startswith("paged") and cache not in ("int4", "fp8"):
        names.append("sdpa")
    for name in names:
        prov.check_seq0(prov.provider(name, inp)(), ref, inp)
    prov.provider("copy", inp)()
