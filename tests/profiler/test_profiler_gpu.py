"""triformers.profiler on CUDA: the memory snapshot and timeline, the kernel trace, MFU, and microGPT's attention
FLOPs through the CUDA operators (cuDNN SDPA for causal, our Triton kernels for the sliding window)."""

import importlib.util
import json
import pickle
from pathlib import Path

import pytest
import torch

from triformers.profiler import attention_flops

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.gpu


def _profile_main():
    spec = importlib.util.spec_from_file_location("profile_microGPT", ROOT / "examples" / "profile_microGPT.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _causal_pairs(S: int, window: int | None) -> int:
    return sum(min(i + 1, window + 1) if window is not None else i + 1 for i in range(S))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention, window", [("scaled_dot_product", None), ("local", 32)])
def test_microgpt_profile_on_cuda(tmp_path, attention, window):
    B, S, emb, heads, layers = 4, 256, 128, 4, 2
    summary = _profile_main()(["--out", str(tmp_path), "--attention", attention, "--block-size", str(S), "--emb",
                               str(emb), "--heads", str(heads), "--layers", str(layers), "--batch", str(B),
                               "--schedule", "quick", "--device", "cuda", "--bf16"])  # fmt: skip
    snapshot = pickle.loads(next(tmp_path.glob("*_memory_snapshot.pickle")).read_bytes())
    assert any(snapshot["device_traces"])
    assert next(tmp_path.glob("*_memory_trace_plot.html")).stat().st_size > 0
    assert next(tmp_path.glob("*_memory_timeline.png")).stat().st_size > 0
    assert next(tmp_path.glob("*_trace.json")).stat().st_size > 0
    assert next(tmp_path.glob("*_kernels.csv")).read_text().count("\n") > 5
    table = json.loads(next(tmp_path.glob("*_modules.json")).read_text())
    assert table["device_limits"] is not None, "add this GPU to DEVICE_LIMITS"
    assert 0 < table["step_mfu"] < 1 and 0 < table["totals"]["bw_fraction"] < 1
    assert "MFU" in summary
    K = emb // heads
    pairs = B * heads * _causal_pairs(S, window)
    expected = attention_flops(pairs, K, K) + attention_flops(pairs, K, K, backward=True)
    rows = [r for r in table["modules"] if r["module"].endswith("sublayer.attention")]
    assert len(rows) == layers and all(round(r["gflop"] * 1e9) == expected for r in rows)
    assert all(r["dtypes"] == ["bfloat16"] for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["dense", "blocksparse", "nystrom", "linformer"])
def test_lra_gpu_preset_runs(attention):
    import dataclasses

    from triformers.benchmarks.lra.run import PRESETS, load_task, train_one

    spec = dataclasses.replace(PRESETS["gpu"]["listops"], n_train=256, n_test=128, steps=10)
    train, test = load_task(spec, None, seed=0)
    record = train_one(spec, attention, train, test, torch.device("cuda"), bf16=True, seed=0, progress=False)
    assert record["peak_memory_mb"] > 0 and record["tokens_per_s"] > 0 and record["bf16"]
