"""Compile every attention-kernel specialization for a GPU target on a machine without a GPU.

    python scripts/compile_check.py [--arch 90] [--quick]

Runs the real launchers on small CPU tensors, but instead of launching each kernel it compiles it for
``cuda:<arch>`` with Triton's bundled toolchain, then reports registers, spills and shared memory from
``ptxas -v``. It catches what Triton's interpreter accepts but the compiler refuses (non-constexpr
globals, type mismatches, unsupported ops) before any GPU time is spent, and shows register pressure.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, not the interpreter
os.environ["TRIFORMERS_FAST_LAUNCH"] = "0"  # every launch through kernel[grid], which compiles here instead

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

RESULTS: list[dict] = []
_SEEN: set = set()


def _ptxas_report(ptx: str, arch: int) -> str:
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    proc = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", f.name, "-o", os.devnull],
                          capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    smem = re.search(r"(\d+) bytes smem", proc.stderr)
    return (f"regs={regs.group(1) if regs else '?'} spill_st={spill.group(1) if spill else '?'} "
            f"spill_ld={spill.group(2) if spill else '?'} smem={smem.group(1) if smem else 0}")


SASS_OPS: list[str] = []  # --sass: opcodes to count in the kernel's SASS (besides the total)


def _sass(cubin: bytes) -> str:
    """A cubin's SASS text (``nvdisasm`` from Triton's toolchain)."""
    from triton import knobs

    nvdisasm = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    return sass


def _instructions(sass: str) -> list[tuple[int, str]]:
    """``(address, opcode)`` of every instruction but NOPs (predicates dropped, modifiers kept)."""
    out = []
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_][A-Z0-9_.]*)", line)
        if m and m.group(2) != "NOP":
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def sass_op_counts(cubin: bytes) -> dict[str, int]:
    """Opcode (without modifiers) -> count in a cubin's SASS (NOPs left out)."""
    ops: dict[str, int] = {}
    for _, op in _instructions(_sass(cubin)):
        op = op.split(".")[0]
        ops[op] = ops.get(op, 0) + 1
    return ops


def sass_loop_counts(cubin: bytes) -> dict[str, int]:
    """Opcode (with modifiers) -> count in the largest loop body of a cubin's SASS (a backward branch to a
    label): the per-iteration work of a kernel's main loop."""
    sass = _sass(cubin)
    labels, lines = {}, sass.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\.(L_x_\d+):", line.strip())
        if m:
            nxt = next((re.search(r"/\*([0-9a-f]{4,})\*/", x) for x in lines[i + 1 :] if "/*" in x), None)
            if nxt:
                labels[m.group(1)] = int(nxt.group(1), 16)
    loops = []
    for line in lines:
        m = re.search(r"/\*([0-9a-f]{4,})\*/.*\bBRA\b.*?\.?(L_x_\d+)", line)
        if m and labels.get(m.group(2), 1 << 62) < int(m.group(1), 16):
            loops.append((labels[m.group(2)], int(m.group(1), 16)))
    if not loops:
        return {}
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    ops: dict[str, int] = {}
    for addr, op in _instructions(sass):
        if lo <= addr <= hi:
            ops[op] = ops.get(op, 0) + 1
    return ops


def _sass_summary(cubin: bytes) -> str:
    """Instruction count of the kernel's SASS, and of the opcodes in SASS_OPS."""
    ops = sass_op_counts(cubin)
    return f"sass={sum(ops.values())} " + " ".join(f"{op}={ops.get(op, 0)}" for op in SASS_OPS if op != "all")


def _compile_launch(kernel: JITFunction, args, kwargs, arch: int, label: str):
    signature, constexprs = {}, {}
    for i, p in enumerate(kernel.params):
        value = args[i] if i < len(args) else kwargs[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        else:
            signature[p.name] = mangle_type(value)
    options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
    key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
           tuple(sorted(options.items())))
    if key in _SEEN:
        return
    _SEEN.add(key)
    t0 = time.time()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        report = _ptxas_report(compiled.asm["ptx"], arch)
        if SASS_OPS:
            report += " " + _sass_summary(compiled.asm["cubin"])
        status = "ok"
    except Exception as e:  # reported, then the script exits non-zero
        report = str(e).strip().splitlines()[-1][:300]
        status = "FAIL"
    RESULTS.append({"kernel": kernel.__name__, "label": label, "status": status, "report": report})
    print(f"{status:4s} {kernel.__name__:22s} {label:60s} {options} {report} ({time.time() - t0:.1f}s)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="bf16 D=128 for every bias type only")
    for direction in ("fwd", "bwd", "dq"):
        ap.add_argument(f"--{direction}", metavar="BM,BN,WARPS,STAGES", help=f"force the {direction} configuration")
    ap.add_argument("--bias", help="only bias types whose name contains this (e.g. 'None', 'Causal')")
    ap.add_argument("--d", type=int, default=128, help="head dim of the bias-type scenarios (default 128)")
    ap.add_argument("--gqa", type=int, default=1, help="bias-type scenarios in BMGHK with shared K/V (default 1)")
    ap.add_argument("--sass", metavar="OPS", help="also count SASS instructions: 'all', or opcodes 'FFMA,MUFU,...'")
    ap.add_argument("--forward-only", action="store_true", help="compile the forward kernels only")
    args = ap.parse_args(argv)
    if args.sass:
        SASS_OPS.extend(args.sass.split(","))

    from triformers.ops import fmha
    from triformers.ops.fmha._triton import configs
    from triformers.ops.fmha.attn_bias_utils import ALL_BIAS_TYPES, bias_name, create_inputs

    configs._arch = lambda *_: f"sm{args.arch}"  # the table of the target, not of this CPU
    label = [""]

    def fake_getitem(self, grid):
        return lambda *a, **kw: _compile_launch(self, a, kw, args.arch, label[0])

    JITFunction.__getitem__ = fake_getitem
    from triformers._triton import _AVAILABLE

    _AVAILABLE["triton"] = True
    from triformers.ops.fmha._triton import launch

    for direction in ("fwd", "bwd", "dq"):
        if getattr(args, direction):
            configs.override(direction, configs.Config(*map(int, getattr(args, direction).split(",")))).__enter__()
    scenarios = []
    for bias_type in ALL_BIAS_TYPES:
        if args.bias is None or args.bias in bias_name(bias_type):
            scenarios.append((bias_type, torch.bfloat16, args.d, bool(args.gqa)))
    if not args.quick and args.bias is None:
        for d in (32, 64, 80, 256):
            scenarios.append((type(None), torch.bfloat16, d, False))
            scenarios.append((torch.Tensor, torch.float16, d, False))
        scenarios.append((torch.Tensor, torch.float32, 64, False))
        scenarios.append((fmha.attn_bias.LowerTriangularMask, torch.float32, 128, False))
    for bias_type, dtype, d, gqa in scenarios:
        for dropout in ((0.0, 0.2) if bias_type is type(None) and d == 128 else (0.0,)):
            inp = create_inputs(bias_type, batch_size=2, q_len=64, kv_len=64, num_heads=2, k=d, dtype=dtype,
                                fmt="BMGHK" if gqa else "BMHK", gqa=gqa, bias_requires_grad=True, seed=0)
            label[0] = f"{bias_name(bias_type)} {str(dtype)[6:]} D={d} gqa={int(gqa)} p={dropout}"
            q, k, v, bias = inp.query, inp.key, inp.value, inp.attn_bias
            finp = fmha.Inputs(q, k, v, bias, dropout)
            call = fmha.triton._call_args(finp, torch.tensor([1]) if dropout else None)
            # call: q, k, v, bias, nine MaskArgs fields, p, seed, scale, share_kv, bias_is_leaf, out_dtype, and the
            # paged MaskArgs fields (block_tables, page_size)
            m = launch.MaskArgs(*call[4:13], *call[19:21])
            out, lse = launch.attention_forward(*call[:4], m, call[13], 1, call[15], call[16])
            tensor_bias = finp.tensor_bias
            mask = 0 if tensor_bias is not None else -1
            paged = m.block_tables is not None  # forward only: its backward runs on fmha.chunked
            for deterministic in (() if args.forward_only or paged else (False, True)):
                launch.attention_backward(torch.randn_like(out), *call[:3], out, lse, tensor_bias, mask,
                                          m, call[13], 1, call[15], call[16], deterministic)
    failed = [r for r in RESULTS if r["status"] != "ok"]
    spills = [r for r in RESULTS if "spill_st=0" not in r["report"] and r["status"] == "ok"]
    print(f"\n{len(RESULTS)} kernels compiled for sm{args.arch}: {len(failed)} failed, {len(spills)} with spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
