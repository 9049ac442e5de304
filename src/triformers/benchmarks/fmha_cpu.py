"""CPU attention benchmark: ``chunked`` vs ``sdpa`` vs ``auto``, the measurements behind the CPU rules of
:mod:`triformers.ops.fmha.dispatch`.

    python -m triformers.benchmarks.fmha_cpu [--out benchmarks/results/cpu/fmha_cpu.json] [--quick]

Each record times one provider on one case (median of round-robin repeats, milliseconds) after checking
its output against the chunked operator's.
"""

from __future__ import annotations

import argparse
import sys

import torch

from triformers.benchmarks._harness import bench_interleaved, env_info, write_results
from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab

PROVIDERS = {
    "chunked": fmha.MemoryEfficientAttentionChunkedOp,
    "sdpa": fmha.MemoryEfficientAttentionSdpaOp,
    "auto": None,
}


def _cases(quick: bool):
    Ms = [512, 2048] if quick else [256, 1024, 4096]
    for M in Ms:
        for causal in (False, True):
            yield dict(case="dense", M=M, causal=causal, B=1, H=8, K=64)
    yield dict(case="bias", M=1024, causal=False, B=1, H=8, K=64)
    yield dict(case="gqa", M=2048, causal=True, B=1, H=8, K=64)
    for avg in ([64, 256] if quick else [32, 64, 128, 256, 1024]):
        yield dict(case="varlen", M=4096, avg_block=avg, causal=True, B=1, H=8, K=64)


def _build(c, dtype, requires_grad):
    B, M, H, K = c["B"], c["M"], c["H"], c["K"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)

    if c["case"] == "gqa":  # 8 query heads in 2 groups sharing K/V
        q = rnd(B, M, 2, H // 2, K)
        k = rnd(B, M, 2, 1, K)
        v = rnd(B, M, 2, 1, K)
        return q, k.expand(B, M, 2, H // 2, K), v.expand(B, M, 2, H // 2, K), ab.LowerTriangularMask()
    q, k, v = rnd(B, M, H, K), rnd(B, M, H, K), rnd(B, M, H, K)
    if c["case"] == "bias":
        return q, k, v, torch.randn(B, H, M, M, generator=gen, dtype=dtype)
    if c["case"] == "varlen":
        n = M // c["avg_block"]
        cuts = sorted(torch.randperm(M - 1, generator=gen)[: n - 1].add(1).tolist())
        lens = [b - a for a, b in zip([0, *cuts], [*cuts, M])]
        return q, k, v, ab.BlockDiagonalMask.from_seqlens(lens).make_causal()
    return q, k, v, (ab.LowerTriangularMask() if c["causal"] else None)


def run(quick: bool = False, dtype=torch.float32) -> list[dict]:
    records = []
    for c in _cases(quick):
        for mode in ("fw", "fwbw"):
            q, k, v, bias = _build(c, dtype, requires_grad=(mode == "fwbw"))
            expected = fmha.memory_efficient_attention(q, k, v, bias, op=PROVIDERS["chunked"]).detach()
            fns, recs = {}, {}
            for name, op in PROVIDERS.items():
                rec = dict(c, mode=mode, provider=name, dtype=str(dtype).replace("torch.", ""))
                recs[name] = rec
                try:
                    out = fmha.memory_efficient_attention(q, k, v, bias, op=op)
                    torch.testing.assert_close(out.detach(), expected, atol=1e-4, rtol=1e-4)
                except (ValueError, NotImplementedError, AssertionError) as e:
                    rec["error"] = str(e).splitlines()[0][:200]
                    continue
                args = (q, k, v, bias)
                if mode == "fw":
                    def fn(op=op, args=args):
                        with torch.no_grad():
                            fmha.memory_efficient_attention(*args, op=op)
                else:
                    g = torch.randn_like(out)

                    def fn(op=op, g=g, args=args):
                        fmha.memory_efficient_attention(*args, op=op).backward(g)
                fns[name] = fn
            for name, ms in bench_interleaved(fns).items():
                recs[name]["ms"] = ms
            for rec in recs.values():
                records.append(rec)
                print(_fmt(rec), flush=True)
    return records


def _fmt(r: dict) -> str:
    what = f"{r['case']:7s} M={r['M']:5d} causal={int(r['causal'])} " + (
        f"avg_block={r['avg_block']:5d}" if "avg_block" in r else " " * 14
    )
    res = f"{r['ms']:9.1f} ms" if "ms" in r else f"error: {r['error']}"
    return f"{what} {r['mode']:4s} {r['provider']:8s} {res}"


def markdown_summary(doc: dict) -> str:
    """README table: milliseconds per case and provider, and auto's ratio to the faster operator."""
    env = doc["env"]
    rows: dict[tuple, dict] = {}
    for r in doc["records"]:
        key = (r["case"], r["M"], r["causal"], r.get("avg_block"), r["mode"])
        rows.setdefault(key, {})[r["provider"]] = r.get("ms")
    lines = [
        f"CPU ({env.get('threads')} threads), torch {env['torch']}, fp32, B=1, H=8, K=64, commit {env['commit']}; "
        "milliseconds (lower is better).",
        "",
        "| case | M | causal | avg block | mode | chunked | sdpa | auto | auto / best |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for (case, M, causal, avg, mode), ms in rows.items():
        best = min(v for k, v in ms.items() if k != "auto" and v is not None)
        cells = [f"{ms[p]:.1f}" if ms.get(p) is not None else "-" for p in ("chunked", "sdpa", "auto")]
        ratio = f"{ms['auto'] / best:.2f}" if ms.get("auto") else "-"
        lines.append(f"| {case} | {M} | {'y' if causal else 'n'} | {avg or '-'} | {mode} | " + " | ".join(cells)
                     + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu/fmha_cpu.json")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    args = parser.parse_args(argv)
    env = env_info()
    env["threads"] = torch.get_num_threads()
    records = run(quick=args.quick)
    write_results(args.out, records, env)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
