"""Attention benchmark on the GPU: triformers against torch SDPA's backends, FlexAttention and eager.

    python -m triformers.benchmarks.fmha [--out benchmarks/results/h100] [--cases dense,varlen,...] [--quick]
    triformers bench fmha ...

Providers: ``triformers`` (auto dispatch), ``triformers_triton`` (our kernels forced), ``sdpa_flash``,
``sdpa_cudnn``, ``sdpa_efficient`` (torch SDPA with one backend), ``flex`` (``torch.compile(flex_attention)``
with the matching block mask) and ``eager`` (naive attention, where it fits in memory). Every output is
checked against a float32 reference (batch element 0, head 0) of the same inputs before timing. Cases, all bf16 with
B * N = 16384 tokens:

- ``dense``: D in {64, 128}, N in {1024, 4096, 16384}, H = 2048 / D, causal and not;
- ``varlen``: BlockDiagonalCausalMask over random document lengths in [64, 4096] (SDPA: one call per
  document; flex: a document mask), D in {64, 128};
- ``window``: BlockDiagonalCausalLocalAttentionMask, window 1024, one 16384-token sequence, D = 128;
- ``bias``: a [B, H, N, N] tensor bias requiring grad, N = 2048, D = 128;
- ``gqa``: Hq = 32, Hkv = 8, D = 128, N = 4096, causal.

Each in modes ``fw`` and ``fwbw``. TFLOP/s count the allowed area of the mask (causal and local masks
count only the pairs they allow): fw = 4 * H * D * sum(allowed pairs), fw+bw = 3.5 * fw. Medians of
``triton.testing.do_bench``, taken in interleaved rounds (see :func:`run`); fw+bw resets the inputs'
``.grad`` to None before each repetition (``grad_to_none``), so accumulation into ``.grad`` is not timed.
Output: ``fmha.json``
``{"env": ..., "records": [...]}`` and ``fmha.png``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from triformers.benchmarks._fmha_cases import TOKENS, WINDOW, Case, cases  # noqa: F401  (re-exported)
from triformers.benchmarks._fmha_summary import (  # noqa: F401  (re-exported: the summary, plot and labels)
    PROVIDERS,
    _fmt,
    _index,
    _label,
    acceptance,
    markdown_summary,
    plot,
)
from triformers.benchmarks._harness import env_info, load_results, write_results
from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha.reference import ref_attention

ROUNDS = 5  # interleaved timing rounds per record (see run)
REP_MS = 40  # do_bench repetition time per provider and round
EAGER_MAX_BYTES = 3 << 30  # the naive path keeps several [B, H, N, N] tensors alive (x4 with backward)


class Inputs:
    """One case's tensors: BMHK for triformers, BHMK views for SDPA and flex."""

    def __init__(self, c: Case, requires_grad: bool):
        gen = torch.Generator(device="cuda").manual_seed(0)
        dt = torch.bfloat16
        hkv = c.Hkv or c.H

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, device="cuda", dtype=dt).requires_grad_(requires_grad)

        self.c = c
        self.q = rnd(c.B, c.N, c.H, c.D)
        self.k_base = rnd(c.B, c.N, hkv, c.D)
        self.v_base = rnd(c.B, c.N, hkv, c.D)
        self.bias_tensor = None
        if c.case == "gqa":  # BMGHK for triformers: K/V expanded over the heads of each group (no copy)
            g = c.H // hkv
            self.q5 = self.q.view(c.B, c.N, hkv, g, c.D)
            self.k5 = self.k_base.unsqueeze(3).expand(c.B, c.N, hkv, g, c.D)
            self.v5 = self.v_base.unsqueeze(3).expand(c.B, c.N, hkv, g, c.D)
        if c.case == "bias":
            self.bias_tensor = (torch.randn(c.B, c.H, c.N, c.N, generator=gen, device="cuda", dtype=dt)
                                .requires_grad_(requires_grad))
        self.attn_bias = self._bias()
        self.window_mask = None
        if c.case == "window":  # SDPA has no sliding window: an additive mask, built once (not timed)
            i = torch.arange(c.N, device="cuda")
            allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < WINDOW)
            self.window_mask = torch.zeros(c.N, c.N, device="cuda", dtype=dt).masked_fill(~allowed, -math.inf)

    def _bias(self):
        c = self.c
        if c.case == "varlen":
            return ab.BlockDiagonalCausalMask.from_seqlens(c.docs)
        if c.case == "window":
            return ab.BlockDiagonalMask.from_seqlens([c.N]).make_local_attention(WINDOW)
        if c.case == "bias":
            return self.bias_tensor
        return ab.LowerTriangularMask() if c.causal else None

    def triformers_args(self):
        if self.c.case == "gqa":
            return self.q5, self.k5, self.v5, self.attn_bias
        return self.q, self.k_base, self.v_base, self.attn_bias

    def leaves(self):
        out = [self.q, self.k_base, self.v_base]
        if self.bias_tensor is not None:
            out.append(self.bias_tensor)
        return out


# ----------------------------------------------------------------------------------------------------
# providers: each returns the output in BMHK [B, N, H, D]
# ----------------------------------------------------------------------------------------------------


def _triformers(inp: Inputs, op=None):
    q, k, v, bias = inp.triformers_args()
    out = fmha.memory_efficient_attention(q, k, v, bias, op=op)
    return out.reshape(inp.q.shape)


def _sdpa(inp: Inputs, backend):
    from torch.nn.attention import sdpa_kernel

    c = inp.c
    q, k, v = (x.transpose(1, 2) for x in (inp.q, inp.k_base, inp.v_base))
    kwargs = {"enable_gqa": True} if c.Hkv else {}
    with sdpa_kernel(backend):
        if c.case == "varlen":
            outs, start = [], 0
            for s in c.docs:
                sl = slice(start, start + s)
                outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True))
                start += s
            out = torch.cat(outs, dim=2)
        elif c.case == "window":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inp.window_mask[None, None])
        elif c.case == "bias":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inp.bias_tensor)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=c.causal, **kwargs)
    return out.transpose(1, 2)


class _Flex:
    """``torch.compile(flex_attention)`` with an explicit block mask (and score_mod for a tensor bias),
    compiled once per case and mode."""

    def __init__(self, inp: Inputs):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        c = inp.c
        self.c = c
        self.fn = torch.compile(flex_attention, dynamic=False)
        self.block_mask = None
        self.score_mod = None
        if c.case == "bias":
            bias = inp.bias_tensor

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[b, h, q_idx, kv_idx]

            self.score_mod = score_mod
        N = c.N
        if c.case == "varlen":
            doc = torch.repeat_interleave(torch.arange(len(c.docs), device="cuda"),
                                          torch.tensor(c.docs, device="cuda"))

            def mask_mod(b, h, q_idx, kv_idx):
                return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        elif c.case == "window":
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)
        elif c.causal:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
        else:
            mask_mod = None
        if mask_mod is not None:
            self.block_mask = create_block_mask(mask_mod, None, None, N, N, device="cuda")

    def __call__(self, inp: Inputs):
        q, k, v = (x.transpose(1, 2) for x in (inp.q, inp.k_base, inp.v_base))
        kwargs = {"enable_gqa": True} if self.c.Hkv else {}
        if self.score_mod is not None:
            kwargs["score_mod"] = self.score_mod
        return self.fn(q, k, v, block_mask=self.block_mask, **kwargs).transpose(1, 2)


def _eager(inp: Inputs):
    q, k, v, bias = inp.triformers_args()
    out, _ = ref_attention(q, k, v, bias, dtype=None)
    return out.reshape(inp.q.shape)


def _provider_fn(name: str, inp: Inputs):
    c = inp.c
    from torch.nn.attention import SDPBackend

    if name == "triformers":
        return lambda inp: _triformers(inp)
    if name == "triformers_triton":
        return lambda inp: _triformers(inp, fmha.TritonFlashAttentionOp)
    if name == "sdpa_flash":
        return lambda inp: _sdpa(inp, SDPBackend.FLASH_ATTENTION)
    if name == "sdpa_cudnn":
        return lambda inp: _sdpa(inp, SDPBackend.CUDNN_ATTENTION)
    if name == "sdpa_efficient":
        return lambda inp: _sdpa(inp, SDPBackend.EFFICIENT_ATTENTION)
    if name == "flex":
        return _Flex(inp)
    if name == "eager":
        heads = c.H
        if c.B * heads * c.N * c.N * 2 > EAGER_MAX_BYTES:
            raise MemoryError(f"naive attention needs [B, H, N, N] = {c.B}x{heads}x{c.N}x{c.N} scores")
        return _eager
    raise ValueError(name)


def _reference_head0(inp: Inputs) -> torch.Tensor:
    """Float32 reference of batch element 0, head 0 (1 GiB of scores at N = 16384): ``[1, N, 1, D]``."""
    c = inp.c
    with torch.no_grad():
        if c.case == "gqa":
            q, k, v = inp.q5[:1, :, :1, :1], inp.k5[:1, :, :1, :1], inp.v5[:1, :, :1, :1]
            return ref_attention(q, k, v, inp.attn_bias, dtype=torch.float32)[0].reshape(1, c.N, 1, c.D)
        q, k, v = inp.q[:1, :, :1], inp.k_base[:1, :, :1], inp.v_base[:1, :, :1]
        bias = inp.attn_bias
        if isinstance(bias, torch.Tensor):
            bias = bias[:1, :1]
        return ref_attention(q, k, v, bias, dtype=torch.float32)[0]


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    out = out[:1, :, :1]
    err = (out.float() - ref).abs().max().item()
    tol = 3e-2 * max(1.0, ref.abs().max().item())
    if not math.isfinite(err) or err > tol:
        raise AssertionError(f"output differs from the float32 reference by {err:.3g} (tolerance {tol:.3g})")


def _flex_wanted(c: Case, flex_dense_n: set[int]) -> bool:
    return c.case != "dense" or c.N in flex_dense_n


def run(selected: set[str], providers: list[str], quick: bool = False, flex_dense_n: set[int] | None = None,
        out_path: Path | None = None, rounds: int = ROUNDS) -> list[dict]:
    """Measure every case and provider; with ``out_path`` the JSON is rewritten after every case (partial
    results survive an interrupted run).

    Providers are timed in ``rounds`` interleaved rounds (each round times every provider once, in an order
    rotated by one from the previous round); a record's ``ms`` is the median of its rounds' medians and
    ``ms_rounds`` lists them, so a slow spell of the machine lands on all providers alike instead of on
    whichever one ran during it."""
    import triton.testing

    env = env_info()

    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.accumulated_recompile_limit = 4096
    records = []
    for c in cases(selected, quick):
        for mode in ("fw", "fwbw"):
            inp = Inputs(c, requires_grad=(mode == "fwbw"))
            ref = _reference_head0(inp)
            g = torch.randn_like(inp.q) if mode == "fwbw" else None
            recs, benches = [], {}
            for name in providers:
                rec = dict(c.record(), mode=mode, provider=name)
                recs.append(rec)
                if name == "flex" and flex_dense_n is not None and not _flex_wanted(c, flex_dense_n):
                    rec["error"] = "not measured: flex compiles for tens of seconds per shape; see --flex-dense-n"
                    continue
                try:
                    fn = _provider_fn(name, inp)
                    with torch.set_grad_enabled(mode == "fwbw"):
                        out = fn(inp)
                    _check(out.detach(), ref)
                    out = None
                    if mode == "fw":
                        def bench(fn=fn, inp=inp):
                            with torch.no_grad():
                                fn(inp)
                    else:
                        def bench(fn=fn, inp=inp, g=g):
                            fn(inp).backward(g)
                    bench()  # compiles and first-call work stay out of the rounds
                    benches[name] = bench
                except Exception as e:  # recorded, not hidden: a provider without such support
                    msg = str(e).strip().splitlines()
                    rec["error"] = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
                finally:
                    for leaf in inp.leaves():
                        leaf.grad = None
            times: dict[str, list[float]] = {name: [] for name in benches}
            # fw+bw: gradients reset before every repetition, as after zero_grad(set_to_none=True), so that
            # accumulating into .grad (an extra read-add-write of every input) is not timed
            grad_to_none = inp.leaves() if mode == "fwbw" else None
            order = list(benches)
            for r in range(rounds):
                shift = r % max(1, len(order))
                for name in order[shift:] + order[:shift]:
                    try:
                        times[name].append(triton.testing.do_bench(
                            benches[name], warmup=10, rep=REP_MS, return_mode="median", grad_to_none=grad_to_none,
                        ))
                    except Exception as e:
                        msg = str(e).strip().splitlines()
                        next(x for x in recs if x["provider"] == name)["error"] = (
                            f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
                        )
                        order.remove(name)
            for rec in recs:
                name = rec["provider"]
                if "error" not in rec and times.get(name):
                    ms = statistics.median(times[name])
                    flops = c.fw_flops() * (3.5 if mode == "fwbw" else 1.0)
                    rec.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, ms_rounds=[round(t, 5) for t in times[name]])
                for leaf in inp.leaves():
                    leaf.grad = None
                records.append(rec)
                print(_fmt(rec), flush=True)
            inp = ref = g = benches = None
            torch.cuda.empty_cache()
            if out_path is not None:
                write_results(out_path, records, env)
    return records


# ----------------------------------------------------------------------------------------------------
# acceptance ratios, README table, plot: all computed from the JSON
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="attention benchmark (GPU)")
    parser.add_argument("--out", default="benchmarks/results/h100", help="folder for fmha.json and fmha.png")
    parser.add_argument("--cases", default="dense,varlen,window,bias,gqa")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help="fewer sequence lengths")
    parser.add_argument("--flex-dense-n", default="all",
                        help="dense sequence lengths at which flex is measured ('all' or e.g. 4096)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing rounds per record")
    parser.add_argument("--summary", metavar="JSON", help="print the README summary of a results file and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(markdown_summary(load_results(args.summary)))
        return 0
    if not torch.cuda.is_available():
        print("the attention benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    flex_n = None if args.flex_dense_n == "all" else {int(x) for x in args.flex_dense_n.split(",")}
    run(set(args.cases.split(",")), args.providers.split(","), quick=args.quick, flex_dense_n=flex_n,
        out_path=out / "fmha.json", rounds=args.rounds)
    doc = load_results(out / "fmha.json")
    plot(doc, out / "fmha.png")
    print()
    print(markdown_summary(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
