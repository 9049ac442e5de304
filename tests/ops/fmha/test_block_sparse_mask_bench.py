"""The sparse benchmark's --quick preset runs on the CPU and writes its JSON and plot."""

import json

import pytest
import torch

from triformers.benchmarks import sparse


def test_quick_run_writes_records(tmp_path):
    assert sparse.main(["--quick", "--no-matmul", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "sparse.json").read_text())
    assert doc["env"]["commit"] and "acceptance" in doc["env"]
    att = [r for r in doc["records"] if r["kind"] == "attention"]
    ours = [r for r in att if r["provider"] == "triformers" and "ms" in r]
    # every layout in both modes, each checked against the chunked operator before it was timed
    assert len(ours) == 2 * len(sparse.PATTERNS) * len(sparse.QUICK_SPARSITIES)
    assert all(r["max_err"] <= sparse.CHECK_ATOL for r in ours if r["mode"] == "fw")
    assert all(0 < r["nnz_blocks"] < r["H"] * (r["N"] // r["block"]) ** 2 for r in ours)
    assert (tmp_path / "sparse.png").stat().st_size > 0


def test_layouts_hit_their_sparsity():
    """Random and BigBird layouts come within 5 % of the target; the fixed pattern as close as it can (its
    density stays above about 1 / sqrt(blocks)), and sparser for a sparser target."""
    for pattern in sparse.PATTERNS:
        got = []
        for target in (0.5, 0.9):
            layout = sparse.make_layout(pattern, 4, 32, target)
            assert layout.dtype == torch.bool and layout.shape[-2:] == (32, 32)
            got.append(1 - layout.float().mean().item())
            if pattern != "fixed":
                assert abs(got[-1] - target) < 0.05, (pattern, target, got[-1])
        assert got[1] > got[0]


def test_acceptance_on_wall_and_kernel_times():
    def rec(pattern, s, provider, ms, kernel, nnz, mode="fw"):
        return dict(kind="attention", pattern=pattern, target_sparsity=s, N=4096, D=64, mode=mode,
                    provider=provider, ms=ms, kernel_ms=kernel, nnz_blocks=nnz)  # fmt: skip

    records = [rec("random", 0.75, "triformers", 2.0, 1.0, 100), rec("random", 0.75, "flex", 3.0, 1.5, 100),
               rec("random", 0.9, "triformers", 2.0, 0.5, 40), rec("random", 0.9, "flex", 2.0, 0.8, 40),
               rec("dense", 0.0, "sdpa_cudnn", 4.0, 3.0, 400)]  # fmt: skip
    a = sparse.acceptance(records)["fw"]
    assert a["geomean_vs_flex"] == (1.5 * 1.0) ** 0.5 and a["geomean_vs_flex_kernel"] == (1.5 * 1.6) ** 0.5
    assert a["min_vs_dense_from_75"] == 2.0 and a["min_vs_dense_from_75_kernel"] == 3.0
    assert a["max_linearity"] == (2.0 / 40) / (2.0 / 100) and a["max_linearity_kernel"] == (0.5 / 40) / (1.0 / 100)
    cpu = sparse.acceptance([{k: v for k, v in r.items() if k != "kernel_ms"} for r in records])["fw"]
    assert "geomean_vs_flex_kernel" not in cpu and cpu["geomean_vs_flex"] == a["geomean_vs_flex"]


def test_rounds_rotate_the_order_and_keep_errors(monkeypatch):
    from triformers.benchmarks import _harness

    calls = []

    def bench(fn, **kwargs):
        calls.append(fn())
        return float(len(calls))

    def fails():
        raise RuntimeError("no kernel\nfor this")

    monkeypatch.setattr(_harness, "do_bench", bench)
    times = _harness.rounds_of({"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}, 3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}
    assert _harness.rounds_of({"x": fails}, 2) == {"x": "RuntimeError: no kernel"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_times_of_a_matmul():
    """Per-kernel profiler times against CUDA events around back-to-back calls (launches queued far ahead, so
    the events measure the kernels alone)."""
    from triformers.benchmarks import _harness

    a = torch.randn(4096, 4096, device="cuda")
    per_kernel = _harness.kernel_us(lambda: a @ a, iters=5)
    assert per_kernel and all(t > 0 for t in per_kernel.values())
    assert list(per_kernel.values()) == sorted(per_kernel.values(), reverse=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ a
    end.record()
    end.synchronize()
    events_ms = start.elapsed_time(end) / 20
    assert 0.7 * events_ms < _harness.kernel_ms(lambda: a @ a, iters=5) < 1.3 * events_ms
