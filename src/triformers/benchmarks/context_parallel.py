"""Context-parallel attention: how much of the ring's communication hides behind its compute; throughput and
scaling over GPUs; the cost of the one-rank path.

    python -m triformers.benchmarks.context_parallel [--out PATH] [--quick] [--parts cpu,gpu,single]

Parts (default: ``cpu`` on a machine without a GPU; ``single``, and ``gpu`` with two GPUs or more, on a GPU
machine):

- ``cpu``: W = 2 and 4 processes of this machine (gloo, one thread each), zigzag, causal and not, float32.
  Each rank times its ring forward and forward+backward, the same computation with the transfers taken out
  (every step's partial attention, merge and backward on a block of the same shape), and the forward's
  transfers alone. ``overlap = ring / compute``: 1.0 when the transfers hide completely behind the compute,
  ``(compute + comm) / compute`` when nothing overlaps. A record keeps every rank's times; its headline
  numbers are the slowest rank's (the ring finishes with it).
- ``gpu``: W = 1, 2, 4, 8 GPUs (NCCL), bf16, causal, ring and all-to-all: tokens/s of the global sequence at a
  fixed local length (weak scaling) and at a fixed global length (strong scaling), and the efficiency against
  W = 1 (``tokens/s / (W x tokens/s at W = 1)`` for weak scaling, ``speed-up / W`` for strong scaling).
- ``single``: one GPU, a process group of one rank: ``context_parallel_attention`` against
  ``memory_efficient_attention`` on the same inputs, forward and forward+backward (the one-rank path must cost
  nothing: the acceptance is a ratio <= 1.05).

Times are milliseconds, the median of interleaved rounds (each round times every function once, in a rotated
order; every round is kept in the JSON). Ranks run the same functions the same number of times, each preceded
by a barrier, so the collectives inside match up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from triformers.benchmarks._harness import do_bench, env_info, write_results
from triformers.distributed import context_parallel_attention
from triformers.distributed.ring import Ring, ring_backward, ring_forward
from triformers.distributed.ring_plan import GlobalMask, ring_plan
from triformers.distributed.testing import launch
from triformers.ops import LowerTriangularMask, memory_efficient_attention

ROUNDS = 5
CPU_WORLDS = (2, 4)
CPU_SEQ = (1024, 4096)  # a forward of 4096 tokens takes about a second per rank on one core
CPU_SHAPE = dict(heads=8, head_dim=64)
GPU_SHAPE = dict(batch=1, heads=32, head_dim=128)  # a Llama-3-8B-like layer (without GQA)
GPU_LOCAL = 8192  # weak scaling: tokens per GPU
GPU_GLOBAL = 65536  # strong scaling: tokens over all GPUs (a multiple of 2 x 8)
SINGLE_SEQ = (2048, 8192, 32768)


class _Loopback(Ring):
    """A ring whose transfers do nothing: every step computes on the block this rank holds (the compute alone)."""

    def pass_on(self, tensors):
        return [], list(tensors)


def _rounds(fns: dict[str, Callable[[], object]], rounds: int, timer: Callable[[Callable], float]) -> dict:
    """``{name: [ms per round]}``, each round timing every function once in a rotated order."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(timer(fns[n]))
    return times


def _synced_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn`` started by every rank together (a barrier first)."""
    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000.0


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


# ------------------------------------------------------------------------------------------------------------
# cpu: overlap of the ring's transfers with its compute
# ------------------------------------------------------------------------------------------------------------


def _cpu_case(rank: int, world: int, seq_len: int, causal: bool, heads: int, head_dim: int, rounds: int) -> dict:
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(rank)
    q5, k5, v5 = (torch.randn(1, seq_len // world, heads, 1, head_dim, generator=gen) for _ in range(3))
    kv = [k5, v5]
    plan = ring_plan(GlobalMask(causal=causal, docs=None), seq_len, world, rank, "zigzag", q5.device)
    ring, alone = Ring(group), _Loopback(group)
    grad = torch.randn(q5.shape, generator=gen)

    def fwbw(r: Ring) -> None:
        o, m = ring_forward(q5, kv, plan, r, None)
        ring_backward(grad, o, m, q5, kv, plan, r, None)

    def comm() -> None:
        for _ in range(world - 1):
            works, _ = ring.pass_on(kv)
            ring.wait(works)

    fns = {
        "ring_fw": lambda: ring_forward(q5, kv, plan, ring, None),
        "compute_fw": lambda: ring_forward(q5, kv, plan, alone, None),
        "ring_fwbw": lambda: fwbw(ring),
        "compute_fwbw": lambda: fwbw(alone),
        "comm_fw": comm,
    }
    for fn in fns.values():
        fn()  # warm-up
    return _rounds(fns, rounds, _synced_ms)


def _cpu_rank(rank: int, world: int, cases: list[tuple[int, bool]], shape: dict, rounds: int) -> list[dict]:
    return [_cpu_case(rank, world, seq_len, causal, **shape, rounds=rounds) for seq_len, causal in cases]


def run_cpu(quick: bool, rounds: int) -> list[dict]:
    records = []
    for world in CPU_WORLDS[:1] if quick else CPU_WORLDS:
        cases = [(seq_len, causal) for seq_len in (CPU_SEQ[:1] if quick else CPU_SEQ) for causal in (True, False)]
        # forked ranks start in milliseconds; spawn where forking is unsafe (CUDA initialised here)
        start = "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"
        per_rank = launch(world, _cpu_rank, cases, CPU_SHAPE, rounds, timeout_s=3600, start_method=start)
        for i, (seq_len, causal) in enumerate(cases):
            ranks = [r[i] for r in per_rank]
            slowest = {f"{n}_ms": max(_median(r[n]) for r in ranks) for n in ranks[0]}
            rec = dict(part="cpu", world=world, seq_len=seq_len, causal=causal, load_balance="zigzag",
                       dtype="float32", **CPU_SHAPE, **slowest,
                       overlap_fw=slowest["ring_fw_ms"] / slowest["compute_fw_ms"],
                       overlap_fwbw=slowest["ring_fwbw_ms"] / slowest["compute_fwbw_ms"],
                       no_overlap_fw=(slowest["compute_fw_ms"] + slowest["comm_fw_ms"]) / slowest["compute_fw_ms"],
                       ranks=ranks)  # fmt: skip
            records.append(rec)
            print(f"cpu W={world} S={seq_len} causal={causal}: ring {rec['ring_fw_ms']:.1f} ms, compute "
                  f"{rec['compute_fw_ms']:.1f} ms, comm {rec['comm_fw_ms']:.1f} ms -> overlap "
                  f"{rec['overlap_fw']:.2f} (none: {rec['no_overlap_fw']:.2f}); "
                  f"fw+bw {rec['overlap_fwbw']:.2f}")  # fmt: skip
    return records


# ------------------------------------------------------------------------------------------------------------
# gpu: tokens/s and scaling over GPUs; single: the one-rank path against plain attention
# ------------------------------------------------------------------------------------------------------------


def _inputs(rows: int, batch: int, heads: int, head_dim: int, seed: int, requires_grad: bool):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, rows, heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
            .requires_grad_(requires_grad) for _ in range(3)]  # fmt: skip


def _call(attention: Callable, args: tuple, grad: torch.Tensor, what: str, **kwargs) -> Callable[[], None]:
    """``attention(*args, **kwargs)`` without autograd (``what="fw"``) or with its backward (``"fwbw"``)."""
    if what == "fw":

        def fw() -> None:
            with torch.no_grad():
                attention(*args, **kwargs)

        return fw

    def fwbw() -> None:
        attention(*args, **kwargs).backward(grad)

    return fwbw


def _gpu_rank(rank: int, world: int, cases: list[dict], rounds: int) -> list[dict]:
    out = []
    for case in cases:
        q, k, v = _inputs(case["seq_len"] // world, **GPU_SHAPE, seed=rank, requires_grad=True)
        args, grad = (q, k, v, LowerTriangularMask()), torch.randn_like(q)
        fns = {what: _call(context_parallel_attention, args, grad, what, mode=case["mode"]) for what in ("fw", "fwbw")}
        for fn in fns.values():
            fn()  # warm-up (kernels compile)
        out.append(_rounds(fns, rounds, _synced_ms))
    return out


def run_gpu(quick: bool, rounds: int) -> list[dict]:
    worlds = [w for w in (1, 2, 4, 8) if w <= torch.cuda.device_count()]
    records = []
    for world in worlds:
        cases = [dict(mode=mode, scaling=scaling, seq_len=GPU_LOCAL * world if scaling == "weak" else GPU_GLOBAL)
                 for mode in ("ring", "all_to_all") for scaling in ("weak", "strong")]  # fmt: skip
        per_rank = launch(world, _gpu_rank, cases, rounds, backend="nccl", timeout_s=1800)
        for i, case in enumerate(cases):
            for what in ("fw", "fwbw"):
                ms = max(_median(r[i][what]) for r in per_rank)
                rec = dict(part="gpu", world=world, what=what, causal=True, load_balance="zigzag", dtype="bfloat16",
                           **GPU_SHAPE, **case, ms=ms, tokens_per_s=GPU_SHAPE["batch"] * case["seq_len"] / (ms / 1e3),
                           ranks=[r[i][what] for r in per_rank])  # fmt: skip
                records.append(rec)
    for rec in records:  # efficiency against one GPU of the same case
        base = next(r for r in records if r["world"] == 1 and all(r[k] == rec[k] for k in ("mode", "scaling", "what")))
        if rec["scaling"] == "weak":
            rec["efficiency"] = rec["tokens_per_s"] / (rec["world"] * base["tokens_per_s"])
        else:
            rec["efficiency"] = base["ms"] / rec["ms"] / rec["world"]
        print(f"gpu W={rec['world']} {rec['mode']} {rec['scaling']} {rec['what']}: {rec['tokens_per_s']:,.0f} "
              f"tokens/s, efficiency {rec['efficiency']:.2f}")  # fmt: skip
    return records


def _single_rank(rank: int, world: int, seqs: tuple[int, ...], rounds: int) -> list[dict]:
    records = []
    for seq_len in seqs:
        q, k, v = _inputs(seq_len, **GPU_SHAPE, seed=0, requires_grad=True)
        args, grad = (q, k, v, LowerTriangularMask()), torch.randn_like(q)
        for what in ("fw", "fwbw"):
            fns = {
                "plain": _call(memory_efficient_attention, args, grad, what),
                "context_parallel": _call(context_parallel_attention, args, grad, what),
            }
            times = _rounds(fns, rounds, do_bench)  # one rank: no collective to keep in step
            ms = {n: _median(t) for n, t in times.items()}
            records.append(dict(part="single", seq_len=seq_len, what=what, causal=True, dtype="bfloat16", **GPU_SHAPE,
                                plain_ms=ms["plain"], context_parallel_ms=ms["context_parallel"],
                                ratio=ms["context_parallel"] / ms["plain"], rounds=times))  # fmt: skip
    return records


def run_single(quick: bool, rounds: int) -> list[dict]:
    seqs = SINGLE_SEQ[:2] if quick else SINGLE_SEQ
    records = launch(1, _single_rank, seqs, rounds, backend="nccl", timeout_s=1800)[0]
    for rec in records:
        print(f"single S={rec['seq_len']} {rec['what']}: context_parallel {rec['context_parallel_ms']:.3f} ms, plain "
              f"{rec['plain_ms']:.3f} ms, ratio {rec['ratio']:.3f}")  # fmt: skip
    return records


def markdown_summary(doc: dict) -> str:
    """README table of the one-rank records: context-parallel attention against plain attention."""
    env = doc["env"]
    rows = [r for r in doc["records"] if r.get("part") == "single"]
    lines = [
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; bf16, causal, "
        "one rank (a process group of one): `context_parallel_attention` against `memory_efficient_attention` on "
        "the same inputs, milliseconds.",
        "",
        "| B | heads | D | tokens | mode | plain | context parallel | ratio |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['heads']} | {r['head_dim']} | {r['seq_len']} | {r['what']} | "
                     f"{r['plain_ms']:.3f} | {r['context_parallel_ms']:.3f} | {r['ratio']:.3f} |")
    if rows:
        lines += ["", f"Highest ratio: {max(r['ratio'] for r in rows):.3f} (target <= 1.05)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triformers bench context_parallel", description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    default_parts = ("single,gpu" if torch.cuda.device_count() > 1 else "single") if cuda else "cpu"
    parser.add_argument("--parts", default=default_parts, help=f"comma-separated cpu, gpu, single ({default_parts})")
    parser.add_argument("--out", default=f"benchmarks/results/{'gpu' if cuda else 'cpu'}/context_parallel.json")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and world sizes")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    runners = {"cpu": run_cpu, "gpu": run_gpu, "single": run_single}
    unknown = [p for p in parts if p not in runners]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose among {list(runners)}")
    if not cuda and any(p != "cpu" for p in parts):
        parser.error("the gpu and single parts need CUDA GPUs")
    if "gpu" in parts and torch.cuda.device_count() < 2:
        parser.error(f"the gpu part needs 2 GPUs or more, {torch.cuda.device_count()} visible")
    records = []
    for part in parts:
        records += runners[part](args.quick, args.rounds)
    env = {**env_info(), "cpu_count": os.cpu_count(), "gpu_count": torch.cuda.device_count(), "parts": parts}
    write_results(args.out, records, env)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
