"""Decoding benchmark on the GPU: a few query tokens against a KV cache, at the memory-bandwidth limit.

    python -m triformers.benchmarks.decode [--out benchmarks/results/h200] [--quick] [--groups bf16,hkv,mq,quant]
    triformers bench decode ...

Every case reads a KV cache of B * L tokens (bf16, Hq = 32 query heads, D = 128) with Mq query tokens per
sequence, for (B, L) in {(1, 131072), (4, 32768), (16, 8192), (64, 2048), (256, 512)}:

- ``bf16``: Hkv = 8, Mq = 1, caches ``contiguous`` (a dense [B, L] cache), ``padded`` (random lengths in
  [L/2, L], the rest of each slot unused), ``paged256`` and ``paged16`` (pages of 256 / 16 tokens, block tables
  a random permutation of the page pool);
- ``quant``: the contiguous cache quantized to ``int4`` (xFormers' packing, one scale/shift per row) and ``fp8``
  (e4m3, a scale/shift per token and head), dequantized in the kernel;
- ``hkv``: MQA (Hkv = 1) and MHA (Hkv = 32), contiguous;
- ``mq``: Mq = 4 and 16 (speculative / tree decoding: causal within the new tokens), contiguous.

Providers, side by side in interleaved rounds: ``triformers`` (dispatch), ``triformers_splitk`` (the split-K
operator forced), ``triformers_triton`` (our FlashAttention kernel forced), ``sdpa`` (torch picks, with
``enable_gqa``), ``sdpa_flash`` and ``sdpa_efficient`` (where they accept the case), ``flex``
(``torch.compile(flex_attention)`` with the matching block mask) and ``copy``: a device copy of as many bytes as
the case's K/V, the bandwidth ceiling, in every group. Every output is checked against a float32 reference of
the first sequence before timing.

Times are medians of ``triton.testing.do_bench`` over replays of a CUDA graph holding one call (``ms``: the
kernels, as a decoding loop runs them) and of plain calls (``ms_eager``: with the host's work per call); the
``copy`` ceiling is the eager copy (``ms``; its graph replay is kept as ``ms_graph``: captured, torch's copy
becomes a memcpy node, which can run slower than the eager copy and would flatter every ratio to it). GB/s
count the K/V bytes the case must read: 2 * sum(lengths) * Hkv * bytes per (token, head) (bf16: 2 D; int4:
D / 2 + 4; fp8: D + 4); ``copy`` counts its bytes read plus written. Output: ``decode.json``
``{"env": ..., "records": [...]}`` and ``decode.png``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from triformers.benchmarks import _decode_providers as prov
from triformers.benchmarks._harness import env_info, geomean, load_results, write_results

SHAPES = [(1, 131072), (4, 32768), (16, 8192), (64, 2048), (256, 512)]
HQ, D = 32, 128
PROVIDERS = ["triformers", "triformers_splitk", "triformers_triton", "sdpa", "sdpa_flash", "sdpa_efficient", "flex",
             "copy"]
QUANT_PROVIDERS = ["triformers", "triformers_splitk", "copy"]
ROUNDS = 3  # interleaved timing rounds per group
REP_MS = 30  # do_bench repetition time per provider and round


@dataclass
class Case:
    B: int
    L: int
    Hkv: int
    Mq: int
    cache: str  # contiguous | padded | paged256 | paged16 | int4 | fp8
    lens: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.lens:
            if self.cache == "padded":
                rng = random.Random(self.B * 7919 + self.L)
                self.lens = [rng.randint(self.L // 2, self.L) for _ in range(self.B)]
            else:
                self.lens = [self.L] * self.B

    @property
    def page_size(self) -> int:
        return int(self.cache[5:]) if self.cache.startswith("paged") else 0

    def bytes_per_token_head(self) -> int:
        return {"int4": D // 2 + 4, "fp8": D + 4}.get(self.cache, 2 * D)

    def kv_bytes(self) -> int:
        return 2 * sum(self.lens) * self.Hkv * self.bytes_per_token_head()

    def record(self) -> dict:
        return {"case": "decode", "mode": "fw", "B": self.B, "L": self.L, "Hq": HQ, "Hkv": self.Hkv, "D": D,
                "Mq": self.Mq, "cache": self.cache}


def cases(groups: set[str], quick: bool) -> list[Case]:
    """The cases of ``groups``, cache kind by cache kind (contiguous, paged256, int4, fp8, then the others), so
    that a run cut short still holds the cases the ratios of :func:`acceptance` need."""
    shapes = SHAPES[::2] if quick else SHAPES
    kinds = []
    if "bf16" in groups:
        kinds += [(8, 1, "contiguous"), (8, 1, "paged256")]
    if "quant" in groups:
        kinds += [(8, 1, "int4"), (8, 1, "fp8")]
    if "bf16" in groups:
        kinds += [(8, 1, "padded"), (8, 1, "paged16")]
    if "hkv" in groups:
        kinds += [(1, 1, "contiguous"), (32, 1, "contiguous")]
    if "mq" in groups:
        kinds += [(8, 4, "contiguous"), (8, 16, "contiguous")]
    return [Case(B, L, hkv, mq, cache) for hkv, mq, cache in kinds for B, L in shapes]


def _graph(fn):
    """A CUDA graph holding one call of ``fn`` (warmed up on a side stream first, as torch documents)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _err(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def run(case_list: list[Case], out_path: Path | None = None, rounds: int = ROUNDS, flex: bool = True) -> list[dict]:
    """Measure every case; with ``out_path`` the JSON is rewritten after every case."""
    import triton.testing

    from triformers.ops.fmha._triton import splitk_launch

    env = env_info()
    # the split-K launch table the run used (TRIFORMERS_SPLITK_CONFIGS replaces its D = 128 rows)
    splitk_launch.config_for("half", 128, 16)  # loads the file's table first
    env["splitk_configs"] = {f"{k[0]}/{k[1]}/{k[2]}": list(vars(c).values()) for k, c in splitk_launch.CONFIGS.items()}
    env["splitk_configs_file"] = os.environ.get("TRIFORMERS_SPLITK_CONFIGS")
    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.accumulated_recompile_limit = 4096
    records = []
    for c in case_list:
        inp = prov.make_inputs(c, HQ, D)
        ref = prov.reference_seq0(inp)
        names = QUANT_PROVIDERS if c.cache in ("int4", "fp8") else PROVIDERS
        recs, calls = [], {}
        for name in names:
            rec = dict(c.record(), provider=name)
            recs.append(rec)
            if name == "flex" and not flex:
                rec["error"] = "not measured (--no-flex)"
                continue
            try:
                fn = prov.provider(name, inp)
                if name != "copy":
                    prov.check_seq0(fn(), ref, inp)
                calls[name] = fn
            except Exception as e:  # recorded, not hidden: a provider without such support
                rec["error"] = _err(e)
        graphs = {}
        for name, fn in calls.items():
            try:
                graphs[name] = _graph(fn)
            except Exception as e:
                next(r for r in recs if r["provider"] == name)["graph_error"] = _err(e)
        times = {name: [] for name in calls}
        eager = {name: [] for name in calls}
        order = list(calls)
        for r in range(rounds):
            shift = r % max(1, len(order))
            for name in order[shift:] + order[:shift]:
                g = graphs.get(name)
                times[name].append(triton.testing.do_bench(g.replay if g else calls[name], warmup=5, rep=REP_MS,
                                                           return_mode="median"))
                eager[name].append(triton.testing.do_bench(calls[name], warmup=5, rep=REP_MS, return_mode="median"))
        nbytes = c.kv_bytes()
        for rec in recs:
            name = rec["provider"]
            if times.get(name):
                ms, ms_eager = statistics.median(times[name]), statistics.median(eager[name])
                moved = 2 * nbytes if name == "copy" else nbytes
                rec.update(ms=ms, ms_eager=ms_eager, graph=name in graphs, kv_bytes=nbytes,
                           ms_rounds=[round(t, 5) for t in times[name]])
                if name == "copy":  # the ceiling is the eager copy (see the module docstring)
                    rec.update(ms=ms_eager, ms_graph=ms, graph=False)
                rec["gbps"] = moved / (rec["ms"] * 1e-3) / 1e9
            records.append(rec)
            print(_fmt(rec), flush=True)
        inp = ref = calls = graphs = None
        torch.cuda.empty_cache()
        if out_path is not None:
            write_results(out_path, records, env)
    return records


def _label(r: dict) -> str:
    return f"B={r['B']} L={r['L']} Hkv={r['Hkv']} Mq={r['Mq']} {r['cache']}"


def _fmt(r: dict) -> str:
    if "gbps" in r:
        res = f"{r['gbps']:7.0f} GB/s ({r['ms']:.4f} ms graph, {r['ms_eager']:.4f} ms eager)"
    else:
        res = f"error: {r['error']}"
    return f"{_label(r):42s} {r['provider']:18s} {res}"


# ----------------------------------------------------------------------------------------------------
# acceptance, README table, plot: all computed from the JSON
# ----------------------------------------------------------------------------------------------------


def _index(records) -> dict:
    return {(_label(r), r["provider"]): r for r in records if "ms" in r}


def _find(t, B, L, cache, provider, Hkv=8, Mq=1):
    r = t.get((_label({"B": B, "L": L, "Hkv": Hkv, "Mq": Mq, "cache": cache}), provider))
    return r


def acceptance(doc: dict) -> dict:
    """The issue's ratios: bandwidth fraction, speed-ups over the peers, paged and quantized caches."""
    t = _index(doc["records"])
    shapes = sorted({(r["B"], r["L"]) for r in doc["records"]})
    frac, vs_sdpa, vs_flex, paged, int4, fp8 = [], [], [], [], [], []
    for B, L in shapes:
        ours, copy = _find(t, B, L, "contiguous", "triformers"), _find(t, B, L, "contiguous", "copy")
        if ours and copy:
            frac.append(ours["gbps"] / copy["gbps"])
        for peer, acc in (("sdpa", vs_sdpa), ("flex", vs_flex)):
            other = _find(t, B, L, "contiguous", peer)
            if ours and other:
                acc.append(other["ms"] / ours["ms"])
        pg = _find(t, B, L, "paged256", "triformers")
        if ours and pg:
            paged.append(pg["ms"] / ours["ms"])
        for cache, acc in (("int4", int4), ("fp8", fp8)):
            q = _find(t, B, L, cache, "triformers")
            if ours and q:
                acc.append(ours["ms"] / q["ms"])

    def low(xs):
        return min(xs) if xs else float("nan")

    def high(xs):
        return max(xs) if xs else float("nan")

    return {
        "bf16 Mq=1: fraction of copy bandwidth (geomean, target >= 0.85)": geomean(frac),
        "bf16 Mq=1: speed-up over sdpa (lowest, target >= 1.8)": low(vs_sdpa),
        "bf16 Mq=1: speed-up over flex (lowest, target >= 1.3)": low(vs_flex),
        "paged256 / contiguous time (highest, target <= 1.10)": high(paged),
        "int4 speed-up over bf16 (lowest, target >= 2.5)": low(int4),
        "fp8 speed-up over bf16 (lowest, target >= 1.6)": low(fp8),
    }


def markdown_summary(doc: dict) -> str:
    """README table: GB/s per case and provider (CUDA-graph replays), then the acceptance ratios."""
    recs = doc["records"]
    t = _index(recs)
    labels = list(dict.fromkeys(_label(r) for r in recs))
    env = doc["env"]
    lines = [
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; bf16 queries, Hq = {HQ}, "
        f"D = {D}; GB/s of K/V read (higher is better; `copy`: read + write of as many bytes), CUDA-graph replays; "
        "'-' = provider has no such support or errored (see the JSON).",
        "",
        "| case | " + " | ".join(PROVIDERS) + " | triformers ms (graph / eager) |",
        "| --- | " + " | ".join("---:" for _ in PROVIDERS) + " | ---: |",
    ]
    for label in labels:
        cells = [f"{t[(label, p)]['gbps']:.0f}" if (label, p) in t else "-" for p in PROVIDERS]
        ours = t.get((label, "triformers"))
        ms = f"{ours['ms']:.3f} / {ours['ms_eager']:.3f}" if ours else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ms} |")
    lines += ["", "| ratio | measured |", "| --- | ---: |"]
    for k, v in acceptance(doc).items():
        lines.append(f"| {k} | {v:.2f} |")
    return "\n".join(lines)


def plot(doc: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = _index(doc["records"])
    labels = list(dict.fromkeys(_label(r) for r in doc["records"]))
    fig, ax = plt.subplots(figsize=(max(12, len(labels) * 0.5), 6))
    width = 0.8 / len(PROVIDERS)
    for i, p in enumerate(PROVIDERS):
        vals = [t[(lab, p)]["gbps"] if (lab, p) in t else 0.0 for lab in labels]
        ax.bar([x + i * width for x in range(len(labels))], vals, width, label=p)
    ax.set_xticks([x + 0.4 for x in range(len(labels))], labels, rotation=70, ha="right", fontsize=6)
    ax.set_ylabel("GB/s of K/V read")
    ax.set_title(f"decoding — {doc['env']['gpu']}, Hq={HQ}, D={D}")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="decoding benchmark (GPU)")
    parser.add_argument("--out", default="benchmarks/results/h200", help="folder for decode.json and decode.png")
    parser.add_argument("--groups", default="bf16,quant,hkv,mq")
    parser.add_argument("--quick", action="store_true", help="three of the five (B, L) shapes")
    parser.add_argument("--no-flex", action="store_true", help="skip flex (it compiles for seconds per shape)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing rounds per case")
    parser.add_argument("--summary", metavar="JSON", help="print the README summary of a results file and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(markdown_summary(load_results(args.summary)))
        return 0
    if not torch.cuda.is_available():
        print("the decoding benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    run(cases(set(args.groups.split(",")), args.quick), out / "decode.json", args.rounds, flex=not args.no_flex)
    doc = load_results(out / "decode.json")
    plot(doc, out / "decode.png")
    print()
    print(markdown_summary(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
