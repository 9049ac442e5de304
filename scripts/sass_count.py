"""sm_90 SASS instruction count per element of the fused dropout + bias + GeLU forward, without a GPU.

    python scripts/sass_count.py [--block-m 4] [--warps 4] [--even 0|1] [--no-bias] [--no-dropout] [--ttgir]

Compiles ``_dropout_fwd_kernel`` for ``cuda:90`` with Triton's bundled toolchain, with the specialisations a
real bf16 launch gets (unit column stride as a constant, 16-divisible pointers, sizes and row strides),
disassembles it with ``nvdisasm`` and prints the instructions per element and the most frequent opcodes;
``--ttgir`` also prints the layouts and layout conversions. The kernel is issue-bound on an H100 at about
40 instructions per element (132 SMs x 4 schedulers x 32 lanes x ~1.75 GHz over ~0.75e12 bf16 elements/s
at copy speed), so this count predicts its speed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import triton  # noqa: E402
from compile_check import _ptxas_report, sass_op_counts  # noqa: E402  (scripts/ is on sys.path)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from triformers.triton._kernels import dropout as D  # noqa: E402

SIGNATURE = {"x_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "L": "i32",
             "stride_x_m": "i32", "stride_x_n": "constexpr", "stride_y_m": "i32", "seed": "i32",
             "threshold": "i32", "scale": "fp32", "ACTIVATION": "constexpr", "HAS_BIAS": "constexpr",
             "HAS_DROPOUT": "constexpr", "EVEN": "constexpr", "BLOCK_M": "constexpr", "BLOCK_S": "constexpr"}
DIVISIBLE = ("x_ptr", "b_ptr", "y_ptr", "M", "N", "L", "stride_x_m", "stride_y_m")
BWD_SIGNATURE = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "b_ptr": "*bf16", "dx_ptr": "*bf16", "db_ptr": "*fp32",
                 "M": "i32", "N": "i32", "L": "i32", "stride_dy_m": "i32", "stride_dy_n": "constexpr",
                 "stride_x_m": "i32", "stride_x_n": "constexpr", "stride_dx_m": "i32", "seed": "i32",
                 "threshold": "i32", "scale": "fp32", "ACTIVATION": "constexpr", "HAS_BIAS": "constexpr",
                 "HAS_DROPOUT": "constexpr", "COMPUTE_DB": "constexpr", "BLOCK_M": "constexpr",
                 "BLOCK_S": "constexpr"}
BWD_DIVISIBLE = ("dy_ptr", "x_ptr", "b_ptr", "dx_ptr", "db_ptr", "M", "N", "L", "stride_dy_m", "stride_x_m",
                 "stride_dx_m")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-m", type=int, default=4)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--even", type=int, default=1)
    ap.add_argument("--no-bias", action="store_true")
    ap.add_argument("--no-dropout", action="store_true")
    ap.add_argument("--ttgir", action="store_true")
    ap.add_argument("--bwd", action="store_true", help="the backward kernel (with db unless --no-db)")
    ap.add_argument("--no-db", action="store_true")
    args = ap.parse_args()
    block_s = D.BLOCK_S_MAX
    consts = {"stride_x_n": 1, "ACTIVATION": 3, "HAS_BIAS": not args.no_bias, "HAS_DROPOUT": not args.no_dropout,
              "EVEN": bool(args.even), "BLOCK_M": args.block_m, "BLOCK_S": block_s}
    signature, divisible, kernel = SIGNATURE, DIVISIBLE, D._dropout_fwd_kernel
    if args.bwd:
        signature, divisible, kernel = BWD_SIGNATURE, BWD_DIVISIBLE, D._dropout_bwd_kernel
        del consts["stride_x_n"]
        consts.update(stride_dy_n=1, stride_x_n=1, COMPUTE_DB=not args.no_db, EVEN=bool(args.even))
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": args.warps, "num_stages": 3})
    ops = sass_op_counts(k.asm["cubin"])
    per_thread = sum(ops.values())
    elements = args.block_m * D.LANES * block_s
    print(f"{per_thread} instructions per thread, {per_thread * 32 * args.warps / elements:.2f} per element "
          f"(BLOCK_M={args.block_m}, {args.warps} warps, {consts})")
    spills = ops.get("LDL", 0) + ops.get("STL", 0)
    print(f"local-memory (spill) instructions: {spills}; ptxas: {_ptxas_report(k.asm['ptx'], 90)}")
    print(", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:20]))
    if args.ttgir:
        for line in k.asm["ttgir"].splitlines():
            if line.startswith("#blocked") or "convert_layout" in line:
                print(line[:200])


if __name__ == "__main__":
    main()
