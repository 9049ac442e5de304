"""triformers.profiler: the schedule, the profilers' files, the module table, and microGPT's attention FLOPs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import triformers.profiler as profiler
from triformers.profiler import attention_flops
from triformers.profiler._profiler import check_schedule
from triformers.profiler.device_limits import lookup_device_limits, measure_cpu_limits
from triformers.profiler.op_stats import OpStatsMode, tensor_bytes
from triformers.profiler.profilers import allocation_timeline

ROOT = Path(__file__).resolve().parents[2]


def _train(model, steps, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        profiler.step()


def _mlp():
    return nn.Sequential(nn.Linear(13, 29), nn.ReLU(), nn.Linear(29, 7))


def test_schedule_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"schedule\[0\].*end step must come after"):
        check_schedule([(profiler.PyTorchProfiler, 3, 3)])
    with pytest.raises(ValueError, match="overlap"):
        check_schedule([(profiler.PyTorchProfiler, 0, 3), (profiler.ModuleTableProfiler, 2, 4)])
    with pytest.raises(ValueError, match=r"schedule\[0\].*\(ProfilerClass, begin, end\)"):
        check_schedule([(profiler.PyTorchProfiler, 0)])
    with pytest.raises(ValueError, match="non-negative"):
        check_schedule([(profiler.PyTorchProfiler, -1, 2)])


def test_one_profiler_at_a_time(tmp_path):
    profiler.step()  # no profiler: nothing happens
    with profiler.profile(tmp_path, schedule=[]):
        with pytest.raises(ValueError, match="Only one triformers profiler"):
            profiler.profile(tmp_path / "b", schedule=[]).start()
    with profiler.profile(tmp_path, schedule=[]):  # the first one was released
        pass


def test_profile_writes_trace_and_table(tmp_path, capsys):
    model = _mlp()
    x = torch.randn(17, 13)
    schedule = [(profiler.PyTorchProfiler, 0, 1), (profiler.MemSnapshotsProfiler, 1, 2),
                (profiler.NsightProfiler, 2, 3), (profiler.ModuleTableProfiler, 3, 6)]  # fmt: skip
    with profiler.profile(tmp_path, model, schedule=schedule) as prof:
        _train(model, 7, x)
    trace = json.loads((tmp_path / "000001_trace.json").read_text())
    assert any("addmm" in e.get("name", "") for e in trace["traceEvents"])
    table = json.loads((tmp_path / "000006_modules.json").read_text())
    assert (tmp_path / "000006_modules.png").stat().st_size > 0
    rows = {r["module"]: r for r in table["modules"]}
    # forward 2*B*in*out per Linear; backward twice that for the first layer's weight and input... the input
    # needs no gradient, so the first Linear's backward is its weight gradient only
    fw = 2 * 17 * 13 * 29, 2 * 17 * 29 * 7
    assert rows["Sequential.0"]["gflop"] * 1e9 == pytest.approx(fw[0] * 2)
    assert rows["Sequential.2"]["gflop"] * 1e9 == pytest.approx(fw[1] * 3)
    assert rows["Sequential"]["gflop"] == pytest.approx(rows["Sequential.0"]["gflop"] + rows["Sequential.2"]["gflop"])
    assert table["plain_steps"] == 2 and table["step_time_s"] > 0
    assert 0 < table["totals"]["mfu"] and 0 < table["totals"]["bw_fraction"]
    summary = dict(prof.summary)
    assert summary["MemSnapshotsProfiler"] == "(CUDA only)" and summary["NsightProfiler"] == "(CUDA only)"
    out = capsys.readouterr().out
    assert "per-module statistics on cpu" in out and "triformers profiler done" in out


def test_unparsable_profiler_events_leave_the_trace_and_warn(tmp_path, monkeypatch):
    """torch's profiler once failed to decode an event name (not UTF-8) while parsing its own results: the step's
    trace is still written and the profiler warns instead of ending the training run."""

    def broken(self, *args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xae", 0, 1, "invalid start byte")

    monkeypatch.setattr(torch.profiler.profile, "key_averages", broken)
    model = _mlp()
    with pytest.warns(UserWarning, match="could not parse its events"):
        with profiler.profile(tmp_path, model, schedule=[(profiler.PyTorchProfiler, 0, 1)]):
            _train(model, 2, torch.randn(17, 13))
    trace = json.loads((tmp_path / "000001_trace.json").read_text())
    assert any("addmm" in e.get("name", "") for e in trace["traceEvents"])


def test_bytes_moved_and_views():
    a = torch.randn(31, 5)
    with OpStatsMode("cpu") as mode:
        b = a.t()  # a view: no traffic, no row
        c = b + 1.0  # reads 155 floats, writes 155
        torch.randn(1, 5).expand(31, 5) * c.t()  # the broadcast operand is read once: 5 floats
    assert "aten.t" not in mode.ops
    assert mode.ops["aten.add"].bytes == 2 * 155 * 4
    assert mode.ops["aten.mul"].bytes == (5 + 155 + 155) * 4
    assert tensor_bytes(torch.empty(4, 1).expand(4, 9)) == 16


def test_device_limits():
    assert lookup_device_limits("NVIDIA H200", (9, 0)).name == "H200"
    assert lookup_device_limits("NVIDIA H200 NVL", (9, 0)).name == "H200 NVL"
    assert lookup_device_limits("NVIDIA H100 80GB HBM3", (9, 0)).name == "H100"
    assert lookup_device_limits("NVIDIA A100-SXM4-80GB", (8, 0)).name == "A100-SXM4-80GB"
    assert lookup_device_limits("NVIDIA L4", (8, 9)).gemm_tflops[torch.bfloat16] == 121.0
    assert lookup_device_limits("NVIDIA H200", (8, 0)) is None  # capability must match too
    cpu = measure_cpu_limits()
    assert cpu.peak_tflops(torch.float32) > 0 and cpu.gmem_bandwidth > 0


def test_allocation_timeline():
    trace = [{"action": "alloc", "size": 10}, {"action": "alloc", "size": 5}, {"action": "free_requested", "size": 10},
             {"action": "free_completed", "size": 10}, {"action": "segment_alloc", "size": 64}]  # fmt: skip
    assert allocation_timeline(trace) == [10, 15, 15, 5, 5]


def _causal_pairs(S: int, window: int | None) -> int:
    """Pairs j <= i (and i - window <= j with a window), counted one by one."""
    return sum(1 for i in range(S) for j in range(S) if j <= i and (window is None or i - window <= j))


@pytest.mark.parametrize("attention, window", [("scaled_dot_product", None), ("local", 32)])
def test_microgpt_attention_flops_in_table(tmp_path, attention, window):
    """microGPT's attention modules count exactly the pairs of their mask: causal (torch's SDPA on the CPU) and
    a 32-key causal window (the chunked operator). Run without Triton's interpreter (fused layers use torch)."""
    B, S, emb, heads, layers = 3, 48, 16, 2, 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [sys.executable, str(ROOT / "examples" / "profile_microGPT.py"), "--out", str(tmp_path), "--attention",
           attention, "--block-size", str(S), "--emb", str(emb), "--heads", str(heads), "--layers", str(layers),
           "--batch", str(B), "--vocab", "11", "--schedule", "quick", "--device", "cpu"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = json.loads(next(tmp_path.glob("*_modules.json")).read_text())
    attention_rows = [r for r in table["modules"] if r["module"].endswith("sublayer.attention")]
    assert len(attention_rows) == layers
    K = emb // heads
    pairs = B * heads * _causal_pairs(S, window)
    expected = attention_flops(pairs, K, K) + attention_flops(pairs, K, K, backward=True)
    for row in attention_rows:
        assert round(row["gflop"] * 1e9) == expected
    # backward ops count in the module whose forward made them: each block is its two halves
    rows = {r["module"]: r["gflop"] for r in table["modules"]}
    blocks = [name for name in rows if name.endswith(tuple(f"encoders.{i}" for i in range(layers)))]
    assert len(blocks) == layers
    for block in blocks:
        assert rows[block] == pytest.approx(rows[f"{block}.wrap_att"] + rows[f"{block}.wrap_ff"], rel=1e-12)
    assert next(tmp_path.glob("*_trace.json")).stat().st_size > 0
    assert "per-module statistics on cpu" in run.stdout and "MFU" in run.stdout
