"""Sparse benchmark: block-sparse attention against flex attention and dense attention, plus the block-sparse
matmuls and the 2:4 linear (``triformers.benchmarks.sparse_matmul``), in one run.

    python -m triformers.benchmarks.sparse [--out benchmarks/results/h200] [--quick] [--no-torch] [--no-matmul]
    triformers bench sparse ...

Attention cases: layouts of 128 x 128 blocks from ``components.attention.sparsity_config`` (BigBird, fixed)
and uniformly random ones, at target sparsities 50/75/90/95 % (the configs' parameters are searched for the
closest sparsity; the record keeps the layout's exact ``sparsity`` and ``nnz_blocks``; the fixed pattern cannot
go past about 82 % at N = 4096), N in {4096, 16384} with
B * N = 16384 tokens, D in {64, 128} with H * D = 2048, bf16, non-causal, forward (``fw``) and forward+backward
(``fwbw``). Providers:

- ``triformers``: ``memory_efficient_attention`` with a ``BlockSparseMask`` on our Triton kernels (hidden tiles
  skipped forward and backward, no mask inside allowed blocks);
- ``flex``: ``torch.compile(flex_attention)`` with the same ``BlockMask`` (built from the layout's CSR with
  ``BlockMask.from_kv_blocks``, every block full, as ours);
- ``sdpa_cudnn``: dense ``scaled_dot_product_attention``, cuDNN backend (CPU: its flash kernel), sparsity 0;
- ``torch``: our chunked operator (pure PyTorch) at N = 4096 only (``--no-torch`` skips it).

Every output is checked against the chunked operator (float32) of the first batch element before timing.
Providers of a case are timed in interleaved rounds of ``triton.testing.do_bench`` (``ms``: the median,
``ms_rounds``: the rounds); on CUDA ``kernel_ms`` is the GPU time of the kernels per call (torch profiler), the
call without its host time, and the targets are computed on both. TFLOP/s count the pairs each computes:
4 * B * H * D * pairs (fw), 3.5x that for fw+bw (dense: N^2 pairs per head; sparse: the layout's non-zero
blocks). ``--quick`` (CPU or CI) runs tiny shapes with the providers the device has. Output: ``sparse.json``
``{"env": ..., "records": [...]}`` (attention records ``kind="attention"``, then the matmul module's) and
``sparse.png``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

from triformers.benchmarks._harness import env_info, geomean, kernel_ms, load_results, rounds_of, write_results

SPARSITIES = [0.5, 0.75, 0.9, 0.95]
PATTERNS = ["bigbird", "fixed", "random"]
BLOCK = 128  # flex's default block; our kernels tile it (64 x 64 forward tiles: 4 full tiles per block)
TOKENS, WIDTH = 16384, 2048  # B * N and H * D of every case
PROVIDERS = ["triformers", "flex", "sdpa_cudnn", "torch"]
REP_MS = 50
ROUNDS = 3  # interleaved timing rounds per case on CUDA
QUICK_SPARSITIES = [0.5, 0.9]
CHECK_ATOL = 2e-2  # bf16 output against the float32 chunked operator


def _random_layout(heads: int, nb: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    keep = round((1 - sparsity) * nb * nb)
    layout = torch.zeros(heads, nb * nb, dtype=torch.bool)
    for h in range(heads):
        layout[h, torch.randperm(nb * nb, generator=gen)[:keep]] = True
    return layout.view(heads, nb, nb)


def _config_layouts(pattern: str, heads: int, nb: int):
    """Candidate layouts of a sparsity config over its main parameter (one layout shared by the heads)."""
    from triformers.components.attention import sparsity_config as sc

    seq = nb * BLOCK
    if pattern == "bigbird":
        for window in range(1, nb + 1, 2):
            for rand in (0, 1, 2, 4):
                yield sc.BigBirdSparsityConfig(1, BLOCK, num_random_blocks=min(rand, nb),
                                               num_sliding_window_blocks=window, num_global_blocks=1).make_layout(seq)
    else:  # fixed (unidirectional): local windows of L blocks, one global block per window; its density is at
        # least about 1/sqrt(nb) (L = sqrt(nb)), so it stops near 82 % sparsity at N = 4096 and 91 % at 16384
        for local in range(1, nb + 1):
            if nb % local == 0:
                yield sc.FixedSparsityConfig(1, BLOCK, num_local_blocks=local, num_global_blocks=1,
                                             attention="unidirectional").make_layout(seq)


def make_layout(pattern: str, heads: int, nb: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A bool layout ``[heads or 1, nb, nb]`` of ``pattern`` at the sparsity closest to ``sparsity``."""
    torch.manual_seed(seed)
    if pattern == "random":
        return _random_layout(heads, nb, sparsity, torch.Generator().manual_seed(seed))
    best = min(_config_layouts(pattern, heads, nb), key=lambda lay: abs(1 - lay.float().mean().item() - sparsity))
    return best.bool()


def _flex_block_mask(layout: torch.Tensor, B: int, H: int, N: int, block: int):
    """flex's BlockMask of the layout: every allowed block full (no mask_mod inside), as BlockSparseMask."""
    from torch.nn.attention.flex_attention import BlockMask

    lay = layout.expand(H, -1, -1).to(torch.int32)
    nb = lay.shape[-1]
    counts = lay.sum(-1, dtype=torch.int32)[None].expand(B, -1, -1).contiguous()  # [B, H, nq]
    # allowed column indices first (stable sort of 1 - layout), padded with the rest
    indices = torch.argsort(1 - lay, dim=-1, stable=True).to(torch.int32)[None].expand(B, -1, -1, -1).contiguous()
    empty = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(empty, torch.zeros_like(indices), counts, indices, BLOCK_SIZE=block,
                                    seq_lengths=(N, N)) if nb else None


_FLEX: dict = {}


def _provider(name: str, q, k, v, layout, mode: str, block: int):
    """A zero-argument callable for ``name`` on BMHK ``q, k, v`` (fw: the output; fwbw: backward included)."""
    from triformers.ops import fmha

    B, N, H, D = q.shape
    if name in ("triformers", "torch"):
        mask = fmha.attn_bias.BlockSparseMask(layout, block)
        if name == "triformers":
            op = (fmha.triton.FwOp, fmha.triton.BwOp) if q.is_cuda else None
        else:
            op = (fmha.chunked.FwOp, fmha.chunked.BwOp)

        def fw():
            return fmha.memory_efficient_attention(q, k, v, mask, op=op)
    elif name == "flex":
        if not q.is_cuda:
            raise NotImplementedError("flex is timed on CUDA only")
        from torch.nn.attention.flex_attention import flex_attention

        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        block_mask = _flex_block_mask(layout.to(q.device), B, H, N, block)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def fw():
            return _FLEX["fn"](qt, kt, vt, block_mask=block_mask).transpose(1, 2)
    elif name == "sdpa_cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.FLASH_ATTENTION  # CPU: its flash kernel
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def fw():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    else:
        raise ValueError(f"unknown provider {name!r}")
    if mode == "fw":
        return fw
    grad = torch.randn_like(q)

    def fwbw():
        out = fw()
        torch.autograd.grad(out, (q, k, v), grad)

    return fwbw


def _check(name, fn_fw, q, k, v, layout, block):
    """Max error of the first batch element's output against the float32 chunked operator."""
    from triformers.ops import fmha

    if name == "sdpa_cudnn":
        return 0.0
    with torch.no_grad():
        got = fn_fw()[:1].float()
        mask = fmha.attn_bias.BlockSparseMask(layout, block)
        want = fmha.memory_efficient_attention_forward(*(x[:1].float() for x in (q, k, v)), mask,
                                                       op=fmha.chunked.FwOp)
    err = (got - want).abs().max().item()
    if not err <= CHECK_ATOL:
        raise AssertionError(f"max error {err:.3g} against the chunked operator")
    return err


def shapes(quick: bool, cuda: bool):
    """``(B, N, H, D)`` of the attention cases."""
    if quick:
        return [(1, 512, 2, 64)] if cuda else [(1, 192, 2, 32)]
    return [(TOKENS // n, n, WIDTH // d, d) for n in (4096, 16384) for d in (64, 128)]


def attention_records(quick: bool = False, torch_path: bool = True, patterns=PATTERNS, sparsities=SPARSITIES,
                      save=None, shape_list=None) -> list[dict]:
    """Records of every (shape, layout, mode, provider); failures are records with an ``error``. ``save``
    (optional) is called with the records so far after each layout, so that a run cut short keeps them;
    ``shape_list``: ``(B, N, H, D)`` cases instead of :func:`shapes`."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    block = BLOCK if not quick or cuda else 32
    records = []
    for B, N, H, D in shape_list or shapes(quick, cuda):
        gen = torch.Generator(device=device).manual_seed(N + D)
        q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype, generator=gen).requires_grad_()
                   for _ in range(3))
        nb = -(-N // block)
        cases = [("dense", 0.0, torch.ones(1, nb, nb, dtype=torch.bool))]
        cases += [(p, s, make_layout(p, H, nb, s)) for p in patterns for s in sparsities]
        for pattern, target, layout in cases:
            layout = layout.to(device)
            nnz = int(layout.expand(H, -1, -1).sum())
            pairs = nnz * block * block  # per batch element, all heads
            names = ["sdpa_cudnn"] if pattern == "dense" else [
                n for n in PROVIDERS if n != "sdpa_cudnn" and (n != "torch" or (torch_path and N <= 4096))]
            for mode in ("fw", "fwbw"):
                recs, fns = {}, {}
                work = H * N * N if pattern == "dense" else pairs
                flops = 4 * B * D * work * (3.5 if mode == "fwbw" else 1)
                for name in names:
                    rec = recs[name] = dict(kind="attention", pattern=pattern, target_sparsity=target,
                                            sparsity=1 - nnz / (H * nb * nb), nnz_blocks=nnz, B=B, N=N, H=H, D=D,
                                            block=block, dtype=str(dtype).replace("torch.", ""), mode=mode,
                                            provider=name)  # fmt: skip
                    try:
                        fn = _provider(name, q, k, v, layout, mode, block)
                        if mode == "fw":
                            rec["max_err"] = _check(name, fn, q, k, v, layout, block)
                        fn()  # compilation and first-call work stay out of the rounds
                        fns[name] = fn
                    except Exception as e:  # recorded, not hidden: a provider without such support
                        rec["error"] = _error(e)
                timed = rounds_of(fns, ROUNDS if cuda else 1, warmup=5, rep=REP_MS if cuda else 1)
                for name, rounds in timed.items():
                    rec = recs[name]
                    if isinstance(rounds, str):
                        rec["error"] = rounds
                        continue
                    ms = statistics.median(rounds)
                    rec.update(ms=ms, tflops=flops / ms / 1e9, ms_rounds=[round(t, 5) for t in rounds])
                    if cuda:
                        rec["kernel_ms"] = kernel_ms(fns[name])
                for rec in recs.values():
                    records.append(rec)
                    print(_fmt(rec), flush=True)
            if save is not None:
                save(records)
        q = k = v = None
        if cuda:
            torch.cuda.empty_cache()
    return records


def _error(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def _fmt(r: dict) -> str:
    head = (f"{r['pattern']:>8} s={r['sparsity']:.3f} B={r['B']} N={r['N']} H={r['H']} D={r['D']} {r['mode']:>4} "
            f"{r['provider']:>11}")
    if "ms" in r:
        kernel = f" (kernels {r['kernel_ms']:.3f} ms)" if "kernel_ms" in r else ""
        return f"{head} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s{kernel}"
    return f"{head} {r.get('error', '')}"


def acceptance(records: list[dict]) -> dict:
    """The issue's targets: ours vs flex (geomean of flex ms / our ms, per mode), ours vs dense cuDNN from 75 %
    sparsity on, and time per non-zero block across sparsities (max / min, per pattern, shape and mode)."""
    att = [r for r in records if r.get("kind") == "attention" and "ms" in r]
    idx = {(r["pattern"], r["target_sparsity"], r["N"], r["D"], r["mode"], r["provider"]): r for r in att}
    out = {}
    for mode in ("fw", "fwbw"):
        out[mode] = {}
        for key, suffix in (("ms", ""), ("kernel_ms", "_kernel")):
            ratios, vs_dense, lin = [], [], []
            for (pat, s, N, D, m, p), r in idx.items():
                if m != mode or p != "triformers" or key not in r:
                    continue
                flex = idx.get((pat, s, N, D, m, "flex"))
                if flex and key in flex:
                    ratios.append(flex[key] / r[key])
                dense = idx.get(("dense", 0.0, N, D, m, "sdpa_cudnn"))
                if dense and key in dense and s >= 0.75:
                    vs_dense.append(dense[key] / r[key])
            for pat in PATTERNS:
                for N, D in {(k[2], k[3]) for k in idx}:
                    per_block = [r[key] / r["nnz_blocks"] for k, r in idx.items()
                                 if k[0] == pat and k[2:] == (N, D, mode, "triformers") and key in r]
                    if len(per_block) > 1:
                        lin.append(max(per_block) / min(per_block))
            if suffix and not ratios and not lin:
                continue  # no kernel times (CPU)
            out[mode].update({
                f"geomean_vs_flex{suffix}": geomean(ratios) if ratios else math.nan,
                f"min_vs_dense_from_75{suffix}": min(vs_dense) if vs_dense else math.nan,
                f"max_linearity{suffix}": max(lin) if lin else math.nan,
            })  # fmt: skip
    return out


def plot(doc: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = [r for r in doc["records"] if r.get("kind") == "attention" and "ms" in r]
    panels = sorted({(r["N"], r["D"], r["mode"]) for r in att})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (N, D, mode) in zip(axes[0], panels):
        rs = [r for r in att if (r["N"], r["D"], r["mode"]) == (N, D, mode)]
        for prov in ("triformers", "flex", "torch"):
            for pat, style in zip(PATTERNS, ("-o", "--s", ":^")):
                pts = sorted((r["sparsity"], r["ms"]) for r in rs if r["provider"] == prov and r["pattern"] == pat)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{prov} {pat}", markersize=3)
        for r in rs:
            if r["provider"] == "sdpa_cudnn":
                ax.axhline(r["ms"], color="k", linewidth=0.8, label="dense sdpa (cuDNN)")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("ms")
        ax.set_title(f"N={N} D={D} {mode}", fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"block-sparse attention — {doc['env']['gpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _matmul_records() -> list[dict]:
    """The block-sparse matmul and 2:4 records of ``triformers.benchmarks.sparse_matmul``, when it exists."""
    try:
        from triformers.benchmarks import sparse_matmul
    except ImportError as e:
        print(f"note: block-sparse matmul and 2:4 records skipped ({e})")
        return []
    args = argparse.Namespace()
    records = []
    for kind, fn in (("matmul", sparse_matmul.matmul_records), ("sp24", sparse_matmul.sp24_records)):
        for rec in fn(args):
            records.append({"kind": kind, **rec})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="block-sparse attention, matmul and 2:4 benchmark")
    parser.add_argument("--out", default="benchmarks/results/h200", help="folder for sparse.json and sparse.png")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU, CI)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch (chunked) provider")
    parser.add_argument("--no-matmul", action="store_true", help="skip the block-sparse matmul and 2:4 records")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--shapes", help="B,N,H,D[;B,N,H,D...] instead of the standard cases (e.g. 1,4096,4,64)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    env = env_info()
    sparsities = QUICK_SPARSITIES if args.quick else [float(s) for s in args.sparsities.split(",")]
    shape_list = [tuple(int(x) for x in c.split(",")) for c in args.shapes.split(";")] if args.shapes else None
    records = attention_records(args.quick, not args.no_torch, args.patterns.split(","), sparsities,
                                save=lambda recs: write_results(out / "sparse.json", recs, env), shape_list=shape_list)
    if not args.no_matmul:
        records += _matmul_records()
    env["acceptance"] = acceptance(records)
    write_results(out / "sparse.json", records, env)
    plot(load_results(out / "sparse.json"), out / "sparse.png")
    print(env["acceptance"])
    return 0


if __name__ == "__main__":
    sys.exit(main())


def markdown_summary(doc: dict) -> str:
    """Block-sparse attention against flex and dense SDPA (ms), and the targets, for the README."""
    env, records = doc["env"], doc["records"]
    att = [r for r in records if r.get("kind") == "attention" and "ms" in r]
    by = {(r["pattern"], r["target_sparsity"], r["N"], r["D"], r["mode"], r["provider"]): r["ms"] for r in att}
    sizes = {(r["N"], r["D"]): (r["B"], r["H"]) for r in att}
    dense = "cuDNN" if env.get("cuda") else "torch's flash kernel"
    dtypes, blocks = ", ".join(sorted({r["dtype"] for r in att})), ", ".join(sorted({str(r["block"]) for r in att}))
    lines = [
        f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}; "
        f"{dtypes}, blocks of {blocks}; ms per call (flex: compiled, the same block mask; dense: SDPA on {dense}); "
        + ", ".join(f"N = {N}, D = {D}: B = {B}, H = {H}" for (N, D), (B, H) in sorted(sizes.items())) + ".",
        "",
        "| pattern | sparsity | N | D | mode | triformers | flex | dense | vs flex | vs dense |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (pat, s, N, D, mode, provider), ms in by.items():
        if provider != "triformers":
            continue
        flex, dense = by.get((pat, s, N, D, mode, "flex")), by.get(("dense", 0.0, N, D, mode, "sdpa_cudnn"))
        cells = [f"{x:.3f}" if x else "-" for x in (flex, dense)]
        ratios = [f"{x / ms:.2f}x" if x else "-" for x in (flex, dense)]
        lines.append(f"| {pat} | {s:.0%} | {N} | {D} | {mode} | {ms:.3f} | {' | '.join(cells)} | "
                     f"{' | '.join(ratios)} |")
    acc = acceptance(records) if env.get("cuda") else {}  # the targets are the GPU's (flex runs on CUDA only)
    lines += ["", "; ".join(
        f"{mode}: geomean {a['geomean_vs_flex']:.2f}x flex (target >= 1.2), lowest {a['min_vs_dense_from_75']:.2f}x "
        f"dense from 75 % (target > 1), time per non-zero block varies {a['max_linearity']:.2f}x (target "
        "<= 1.3)" for mode, a in acc.items())] if acc else []
    if any("geomean_vs_flex_kernel" in a for a in acc.values()):
        lines.append("")
        lines.append("Kernel time only (torch profiler, host time excluded): " + "; ".join(
            f"{mode}: {a['geomean_vs_flex_kernel']:.2f}x flex, lowest {a['min_vs_dense_from_75_kernel']:.2f}x dense, "
            f"per-block time varies {a['max_linearity_kernel']:.2f}x" for mode, a in acc.items()
            if "geomean_vs_flex_kernel" in a))  # fmt: skip
    if env.get("run_note"):
        lines.append(f"\nRun: {env['run_note']}.")
    return "\n".join(lines)
