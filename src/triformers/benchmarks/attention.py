"""Attention-zoo benchmark: every registered attention inside MultiHeadDispatch, forward and
forward+backward time and peak memory at a few sequence lengths, on the CPU or the GPU.

    python -m triformers.benchmarks.attention [--attentions a,b] [--seq-lens 256,1024] [--out PATH]
    triformers bench attention ...

The attentions are read from the registry when the benchmark runs, so a newly registered one is measured
with no change here. Every attention is built from the same superset config as the generic tests
(``triformers.components.attention._generic``). Sequence lengths should be perfect squares (the 2-D token
mixers need a square grid). A configuration that fails (out of memory, unsupported length) is recorded with
its error instead of stopping the run. Writes ``{"env", "records"}`` JSON via the shared harness.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from triformers.benchmarks._harness import do_bench, env_info, write_results


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # op events carry the memory they allocated themselves; "[memory]" events are frees outside any op
    deltas = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak


def measure(
    name: str,
    seq_len: int,
    batch: int,
    dim_model: int,
    heads: int,
    causal: bool,
    device: torch.device,
    dtype: torch.dtype,
    rep: int = 100,
) -> dict:
    """One record: fw / fw+bw median ms and peak MB of attention ``name`` in MultiHeadDispatch."""
    from triformers.components import build_multi_head_attention
    from triformers.components.attention._generic import generic_attention_config

    record = {
        "attention": name, "seq_len": seq_len, "batch": batch, "dim_model": dim_model, "heads": heads,
        "causal": causal, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
    }  # fmt: skip
    try:
        config = generic_attention_config(name, seq_len, dim_model, heads, causal=causal)
        mha = build_multi_head_attention({"dim_model": dim_model, "num_heads": heads, "attention": config})
        mha = mha.to(device=device, dtype=dtype)
        x = torch.randn(batch, seq_len, dim_model, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)

        def fw() -> None:
            with torch.no_grad():
                mha(x)

        def fwbw() -> None:
            x.grad = None
            mha(x).backward(grad)

        mha.eval()
        record["fw_ms"] = do_bench(fw, rep=rep)
        record["fw_peak_mb"] = _peak_bytes(fw, device) / 2**20
        mha.train()
        record["fwbw_ms"] = do_bench(fwbw, rep=rep)
        record["fwbw_peak_mb"] = _peak_bytes(fwbw, device) / 2**20
    except (RuntimeError, ValueError, NotImplementedError) as e:  # OOM, unsupported length, ...
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def run(
    attentions: list[str] | None = None,
    seq_lens: list[int] | None = None,
    batch: int | None = None,
    dim_model: int = 384,
    heads: int = 6,
    causal: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    rep: int = 100,
) -> list[dict]:
    """Measure the selected (default: all registered) attentions; returns the records."""
    from triformers.components import ATTENTION_REGISTRY

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    names = attentions or sorted(ATTENTION_REGISTRY)
    unknown = [n for n in names if n not in ATTENTION_REGISTRY]
    if unknown:
        raise ValueError(f"unknown attention(s) {unknown}; registered: {sorted(ATTENTION_REGISTRY)}")
    seq_lens = seq_lens or ([256, 1024, 4096] if on_gpu else [64, 256])
    batch = batch or (8 if on_gpu else 2)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if on_gpu else torch.float32)
    records = []
    for name in names:
        for s in seq_lens:
            rec = measure(name, s, batch, dim_model, heads, causal, dev, torch_dtype, rep=rep)
            records.append(rec)
            if "error" in rec:
                print(f"{name:>20} S={s:<6} {rec['error']}", flush=True)
            else:
                print(
                    f"{name:>20} S={s:<6} fw {rec['fw_ms']:9.3f} ms {rec['fw_peak_mb']:9.1f} MB   "
                    f"fw+bw {rec['fwbw_ms']:9.3f} ms {rec['fwbw_peak_mb']:9.1f} MB",
                    flush=True,
                )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attentions", help="comma-separated names (default: every registered attention)")
    parser.add_argument(
        "--seq-lens", help="perfect squares, comma-separated (default CPU 64,256; GPU 256,1024,4096)"
    )
    parser.add_argument("--batch", type=int, help="batch size (default CPU 2, GPU 8)")
    parser.add_argument("--dim-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--causal", action="store_true", help="request causal attention where supported")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--dtype", help="float32, float16 or bfloat16 (default: float16 on GPU, float32 on CPU)"
    )
    parser.add_argument("--rep", type=int, default=100, help="timing budget per measurement, ms")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/attention_<device>.json)")
    args = parser.parse_args(argv)
    records = run(
        attentions=args.attentions.split(",") if args.attentions else None,
        seq_lens=[int(s) for s in args.seq_lens.split(",")] if args.seq_lens else None,
        batch=args.batch,
        dim_model=args.dim_model,
        heads=args.heads,
        causal=args.causal,
        device=args.device,
        dtype=args.dtype,
        rep=args.rep,
    )
    env = env_info()
    out = Path(args.out or f"benchmarks/results/attention_{'gpu' if env['gpu'] != 'cpu' else 'cpu'}.json")
    write_results(out, records, env)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
