"""The fused-layer benchmark's bookkeeping on the CPU: interleaved timing records and the summary ratios."""

import math
import statistics

import pytest

from triformers.benchmarks import layers


def test_run_records_every_provider_and_round():
    records = layers.run(["rmsnorm"], ["triformers", "torch_eager"], ["fw", "fwbw"], [40], device="cpu",
                         log=lambda *_: None, rows=24, rounds=2)
    assert [(r["provider"], r["mode"]) for r in records] == [
        ("triformers", "fw"), ("torch_eager", "fw"), ("triformers", "fwbw"), ("torch_eager", "fwbw")]
    for r in records:
        # the rounds are stored rounded to 5 decimals; ms is the median of the unrounded rounds
        assert len(r["ms_rounds"]) == 2 and r["ms"] == pytest.approx(statistics.median(r["ms_rounds"]), abs=1e-5)
        assert r["gbps"] == pytest.approx(layers._bytes("rmsnorm", 24, 40, r["mode"]) / (r["ms"] * 1e6))


def test_summary_uses_the_same_size_copy():
    M, N = 16384, 1024
    nbytes = layers._bytes("softmax", M, N, "fw")

    def rec(provider, mode, ms):
        return {"op": "softmax", "provider": provider, "M": M, "N": N, "mode": mode, "ms": ms,
                "gbps": layers._bytes("softmax", M, N, mode) / (ms * 1e6)}

    doc = {"env": {"copy_gbps": 3000.0, "copy_gbps_at_bytes": {str(nbytes): 2500.0}},
           "records": [rec("triformers", "fw", 0.04), rec("torch_eager", "fw", 0.08),
                       rec("triformers", "fwbw", 0.2), rec("torch_eager", "fwbw", 0.1),
                       rec("liger", "fwbw", 0.25)]}
    s = layers.summary(doc)
    gbps = nbytes / 0.04e6
    assert s["memory_fw_min_fraction_of_copy"] == pytest.approx(gbps / 2500.0)
    assert s["memory_fw_min_fraction_of_peak_copy"] == pytest.approx(gbps / 3000.0)
    assert s["all_vs_torch_eager"] == pytest.approx(math.sqrt(2.0 * 0.5))
    assert s["fwbw_vs_liger"] == pytest.approx(1.25)
    assert "softmax" in layers.markdown_summary(doc)
