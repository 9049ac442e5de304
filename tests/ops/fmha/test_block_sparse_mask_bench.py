"""The sparse benchmark's --quick preset runs on the CPU and writes its JSON and plot."""

import json

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
