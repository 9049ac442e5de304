"""The context-parallel benchmark end to end at tiny sizes: the CPU overlap part on 2 gloo processes; the
single-GPU and multi-GPU parts on a GPU machine. Sizes are the parent's module constants (the ranks get them as
arguments)."""

import json

import pytest
import torch

from triformers.benchmarks import context_parallel as bench

# Python >= 3.12 warns when forking a process with threads (pytest-xdist's workers); the ranks take no lock
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def test_rounds_rotate_the_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench._rounds(fns, 3, lambda fn: float(fn() or 1))
    assert calls == list("abcbcacab") and all(t == [1.0] * 3 for t in times.values())


def test_cpu_overlap(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CPU_WORLDS", (2,))
    monkeypatch.setattr(bench, "CPU_SEQ", (64,))
    monkeypatch.setattr(bench, "CPU_SHAPE", dict(heads=2, head_dim=8))
    out = tmp_path / "cp.json"
    assert bench.main(["--parts", "cpu", "--quick", "--rounds", "2", "--out", str(out)]) == 0
    assert all(r["heads"] == 2 and r["head_dim"] == 8 for r in json.loads(out.read_text())["records"])
    doc = json.loads(out.read_text())
    assert doc["env"]["parts"] == ["cpu"] and len(doc["records"]) == 2  # causal and not
    for rec in doc["records"]:
        assert rec["world"] == 2 and rec["seq_len"] == 64 and len(rec["ranks"]) == 2
        for name in ("ring_fw", "compute_fw", "ring_fwbw", "compute_fwbw", "comm_fw"):
            assert rec[f"{name}_ms"] > 0 and all(len(r[name]) == 2 for r in rec["ranks"])
        assert rec["overlap_fw"] == rec["ring_fw_ms"] / rec["compute_fw_ms"]
        assert rec["no_overlap_fw"] > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_single_gpu_ratio(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SINGLE_SEQ", (4096,))
    out = tmp_path / "single.json"
    assert bench.main(["--parts", "single", "--rounds", "3", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["what"] for r in records] == ["fw", "fwbw"]
    for rec in records:  # a loose bound here; the benchmark run itself reports the acceptance ratio
        assert 0 < rec["ratio"] < 1.5, rec


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs")
def test_multi_gpu_scaling(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "GPU_LOCAL", 1024)
    monkeypatch.setattr(bench, "GPU_GLOBAL", 4096)
    out = tmp_path / "gpu.json"
    assert bench.main(["--parts", "gpu", "--rounds", "2", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    worlds = {r["world"] for r in records}
    assert 1 in worlds and 2 in worlds
    assert all(r["tokens_per_s"] > 0 and r["efficiency"] > 0 for r in records)
