"""Host side of benchmark calls on the GPU: synchronising operations, host issue time, and where it goes.

    PYTHONPATH=src python scripts/host_gpu_probe.py [--fmha window,varlen,bias] [--layers rmsnorm,softmax]

For each attention case (``triformers.benchmarks.fmha``, provider ``triformers``) and fused-layer op
(``triformers.benchmarks.layers`` at N = 1024, provider ``triformers``), forward and forward + backward:

- one call under ``torch.cuda.set_sync_debug_mode("error")``: a call that makes the host wait for the GPU
  (a device-to-host read, a pageable host-to-device copy) stops with the stack that did it;
- the host's issue time per call (a loop synchronised only at the end) and the wall time per call
  (synchronised each time), next to an identity ``autograd.Function`` as the floor;
- the top functions of a cProfile of a loop of calls.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import traceback

import torch
from profile_fmha import attention_call, ms_per_call  # scripts/ is on sys.path

from triformers.benchmarks import fmha as fbench
from triformers.benchmarks import layers as lbench


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def probe(name: str, run, iters: int, top: int) -> None:
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        sync = "none"
    except RuntimeError as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "triformers" in f.filename]
        sync = "; ".join(f"{f.filename.split('src/')[-1]}:{f.lineno} {f.line}" for f in frames[-3:]) or str(e)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    host = min(ms_per_call(run, iters, until_done=False) for _ in range(3))
    wall = min(ms_per_call(run, iters, until_done=True) for _ in range(3))
    print(f"\n=== {name}: host issue {host * 1e3:.1f} us/call | wall {wall * 1e3:.1f} us/call | sync: {sync}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(iters):
        run()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmha", default="window,varlen,bias,dense")
    ap.add_argument("--layers", default="rmsnorm,softmax,layernorm")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()

    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    print(f"identity Function fw: {ms_per_call(lambda: _Identity.apply(x), 500, False) * 1e3:.1f} us/call, "
          f"fw+bw: {ms_per_call(lambda: _Identity.apply(x).backward(g), 500, False) * 1e3:.1f} us/call")

    seen = set()
    for c in fbench.cases(set(args.fmha.split(",")), quick=False):
        if (c.case, c.D) in seen:  # one record per case and head dim
            continue
        seen.add((c.case, c.D))
        for mode in ("fw", "fwbw"):
            inp = fbench.Inputs(c, requires_grad=(mode == "fwbw"))
            fn = fbench._provider_fn("triformers", inp)
            g = torch.randn_like(inp.q)

            def run(fn=fn, inp=inp, g=g, mode=mode):
                attention_call(fn, inp, g, mode)
                for leaf in inp.leaves():
                    leaf.grad = None

            probe(f"attention {c.case} D={c.D} N={c.N} B={c.B} {mode}", run, args.iters, args.top)
            del inp, fn, run

    for op in args.layers.split(","):
        torch.manual_seed(0)
        inputs, fns, _ = lbench._memory_case(op, lbench.ROWS, 1024, "cuda")
        with torch.no_grad():
            dy = torch.randn_like(fns["torch_eager"](*inputs))
        for mode in ("fw", "fwbw"):
            probe(f"{op} N=1024 {mode}", lbench._runner(fns["triformers"], inputs, range(len(inputs)), dy, mode),
                  args.iters, args.top)


if __name__ == "__main__":
    main()
