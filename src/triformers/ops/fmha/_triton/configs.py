"""Launch configurations of the attention kernels, per architecture, dtype, head dim and mask kind.

The table below was chosen by measurement: ``python scripts/tune_fmha.py`` sweeps the candidates on the GPU
(bf16, B * N = 16384 tokens, H = 2048 / D) and prints the fastest per key; the numbers that chose each entry
are in ``benchmarks/NOTES.md``. Nothing is tuned on the first call. ``TRIFORMERS_AUTOTUNE=1`` instead times
every candidate once per (kernel, key, shape bucket) and keeps the fastest for the process.

Under Triton's interpreter (CPU tests) blocks are small so that several tiles and ragged edges are
exercised at small sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from triformers._triton import device_capability, interpret_mode


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _arch(device: torch.device | None = None) -> str:
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return "cpu"
    major, _ = device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def _d_bucket(d: int) -> int:
    for bucket in (32, 64, 128, 256):
        if d <= bucket:
            return bucket
    return 512


# (arch, direction, head-dim bucket) -> Config. Forward candidates were first filtered on register use
# (`scripts/compile_check.py` compiles for sm90 without a GPU and reports ptxas spills); the GPU sweep
# (`scripts/tune_fmha.py`, bf16, H100) picked among the spill-free ones. The backward was swept again with
# spilling tiles included (below): there the larger tiles win despite the spills.
_TABLE: dict[tuple[str, str, int], Config] = {
    # Forward, H100 bf16 N=4096, with the tile-fastest grid (`tune_fmha.py --quick --directions fwd`,
    # benchmarks/results/h100/tune_fmha_fwd.json): (64,64,4,3) is fastest at D=64 (473 TFLOP/s, causal 395)
    # and D=128 (512 vs 495 for (128,128,8,3); causal 471 vs 401 for (64,64,4,2)).
    ("sm90", "fwd", 32): Config(64, 64, 4, 2),
    ("sm90", "fwd", 64): Config(64, 64, 4, 3),
    ("sm90", "fwd", 128): Config(64, 64, 4, 3),
    ("sm90", "fwd", 256): Config(64, 64, 8, 2),
    ("sm90", "bwd", 32): Config(32, 128, 4, 2),
    # dK/dV and dQ: `scripts/tune_fmha.py --wide --directions bwd` (H100, bf16, N=4096, 2.5x forward FLOPs,
    # benchmarks/results/h100/tune_fmha_bwd_d{64,128}.json). The 128-key dK/dV tiles spill 100-1000 bytes per
    # thread at D=128 and still beat the spill-free (32, 64, 8, 2): D=128 273 vs 164 TFLOP/s (causal 243 vs 155),
    # D=64 278 vs 238 for (64, 128, 8, 2). dQ, with them: D=128 (128, 64, 8, 3) 334 vs 269 for (128, 32, 8, 2),
    # D=64 (64, 64, 4, 2) 301 vs 276. At D=128 (32, 128, 8, 3) ties (64, 128, 8, 3) on dense batches (272 vs 273,
    # causal 248 vs 243) and wins on every masked case of the benchmark (fw+bw: packed sequences 295 vs 191,
    # sliding window 285 vs 251, tensor bias 150 vs 129; tune_fmha_cases.json).
    ("sm90", "bwd", 64): Config(64, 128, 8, 3),
    ("sm90", "bwd", 128): Config(32, 128, 8, 3),
    ("sm90", "bwd", 256): Config(16, 32, 8, 1),
    ("sm90", "dq", 32): Config(128, 32, 4, 2),
    ("sm90", "dq", 64): Config(64, 64, 4, 2),
    ("sm90", "dq", 128): Config(128, 64, 8, 3),
    ("sm90", "dq", 256): Config(64, 16, 8, 2),
}
# Ampere: smaller shared memory (164 KB vs 228 KB) -> fewer stages.
_SM80 = {
    ("sm80", d, bucket): Config(c.block_m, c.block_n, c.num_warps, max(1, c.num_stages - 1))
    for (_, d, bucket), c in _TABLE.items()
}
_TABLE.update(_SM80)
_INTERPRETER = {"fwd": Config(16, 16, 1, 1), "bwd": Config(16, 16, 1, 1), "dq": Config(16, 16, 1, 1)}
# fp32 operands take twice the registers and shared memory of bf16: halve the key/query tile.
_FP32_SHRINK = 2


# Per mask kind where it was measured apart from the dense table (H100, bf16, D=128; the benchmark's masked
# cases through `scripts/tune_fmha_cases.py`, benchmarks/results/h100/tune_fmha_cases.json):
# - "masked" (causal, packed causal sequences): forward as dense (64,64,4,3) since the tile-fastest grid
#   (before it: (64,64,4,2), 362 TFLOP/s vs 331 for the then dense (128,128,8,3)).
# - "local" (sliding window, 16384 tokens, window 1024): forward (64,64,4,3) 404 vs 249-321 for the others;
#   dQ (64,64,4,2) 289 vs 249 for (128,64,8,3) (fw+bw).
# - "bias" ([B,H,N,N] tensor bias, N=2048): forward (128,64,8,3) 237 vs 228 for (64,64,4,2); a 128 x 128
#   bias tile per stage overflows shared memory (262 KB asked, 227 KB on an H100).
_BY_KIND = {
    ("sm90", "fwd", 128, "masked"): Config(64, 64, 4, 3),
    ("sm90", "fwd", 128, "local"): Config(64, 64, 4, 3),
    ("sm90", "fwd", 128, "bias"): Config(128, 64, 8, 3),
    ("sm90", "dq", 128, "local"): Config(64, 64, 4, 2),
}
# Forward over paged K/V gathered row by row (pages not a multiple of the key tile, or gappy starts): its
# [BLOCK_N, D] int64 address tiles take registers TMA does not. Chosen spill-free, or least spilling, by
# `scripts/compile_check.py` for sm90 bf16 (D=128: the table's (64,64,4,3) spills 3.2 KB per thread, (128,32,8,2)
# none; D=64: (64,32,4,2) none; D=256: (64,16,8,2) 360 B, the least of the 7 tried). Not yet timed on a GPU.
_PAGED_GATHER = {32: Config(64, 32, 4, 2), 64: Config(64, 32, 4, 2), 128: Config(128, 32, 8, 2),
                 256: Config(64, 16, 8, 2)}


def _kind(call) -> str:
    if call.flags["HAS_BIAS"]:
        return "bias"
    if call.kind == "local":
        return "local"
    return "masked" if call.kind != "dense" else "dense"


def _table_config(call, direction: str) -> Config:
    if interpret_mode() and call.device.type == "cpu":
        return _INTERPRETER[direction]
    bucket = _d_bucket(max(call.K, call.Kv))
    arch = _arch(call.device)
    cfg = _TABLE[(arch, direction, bucket)]
    kind = _kind(call)
    if kind == "local" and (arch, direction, bucket, kind) not in _BY_KIND:
        kind = "masked"
    cfg = _BY_KIND.get((arch, direction, bucket, kind), cfg)
    m = call.m
    if direction == "fwd" and m.block_tables is not None and not (m.k_start is None and m.page_size % cfg.block_n == 0):
        cfg = _PAGED_GATHER.get(bucket, cfg)
    if call.dtype == torch.float32:
        cfg = Config(cfg.block_m, max(16, cfg.block_n // _FP32_SHRINK), cfg.num_warps, max(1, cfg.num_stages - 1))
    return cfg


_TUNED: dict[tuple, Config] = {}
_OVERRIDE: dict[str, Config] = {}


class override:
    """Context manager forcing the configuration of one direction (``fwd``, ``bwd``, ``dq``): for sweeps."""

    def __init__(self, direction: str, cfg: Config):
        self.direction, self.cfg = direction, cfg

    def __enter__(self):
        _OVERRIDE[self.direction] = self.cfg

    def __exit__(self, *exc):
        _OVERRIDE.pop(self.direction, None)


def _candidates(direction: str, d: int) -> list[Config]:
    if direction == "fwd":
        return [Config(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
                if not (bm * bn < 128 * 128 and w == 8) and not (d > 128 and bn > 64)]
    if direction == "bwd":
        return [Config(bm, bn, w, s) for bm in (16, 32, 64) for bn in (64, 128) for w in (4, 8) for s in (1, 2, 3)
                if not (d > 128 and bn > 64)]
    return [Config(bm, bn, w, s) for bm in (64, 128) for bn in (16, 32, 64) for w in (4, 8) for s in (1, 2, 3)
            if not (d > 128 and bm > 64)]


def _get(call, direction: str, run=None) -> Config:
    if direction in _OVERRIDE:
        return _OVERRIDE[direction]
    if os.environ.get("TRIFORMERS_AUTOTUNE", "0") != "1" or run is None or call.device.type != "cuda":
        return _table_config(call, direction)
    key = (direction, _arch(call.device), call.dtype, call.K, call.Kv, call.kind, call.flags["HAS_BIAS"],
           call.flags["IS_VARLEN"], call.flags["HAS_DROPOUT"], 1 << max(0, call.m.max_q - 1).bit_length())
    if key not in _TUNED:
        import triton.testing

        best, best_ms = None, float("inf")
        for cfg in _candidates(direction, max(call.K, call.Kv)):
            try:
                ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20)
            except Exception:  # out of shared memory or registers: not a candidate on this GPU
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _TUNED[key] = best or _table_config(call, direction)
    return _TUNED[key]


def forward_config(call, run=None) -> Config:
    return _get(call, "fwd", run)


def backward_config(call, run=None) -> Config:
    return _get(call, "bwd", run)


def dq_config(call, run=None) -> Config:
    return _get(call, "dq", run)


_WARNED: set = set()


def launch_with_fallback(launch, cfg: Config, direction: str) -> None:
    """Launch with ``cfg``; if the GPU lacks the shared memory or registers for it, retry with fewer
    pipeline stages, then smaller tiles (warning once per configuration)."""
    import triton

    while True:
        try:
            launch(cfg)
            return
        except triton.runtime.errors.OutOfResources as e:
            if cfg.num_stages > 1:
                nxt = Config(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages - 1)
            elif cfg.block_n > 16:
                nxt = Config(cfg.block_m, cfg.block_n // 2, cfg.num_warps, 2)
            elif cfg.block_m > 16:
                nxt = Config(cfg.block_m // 2, cfg.block_n, cfg.num_warps, 2)
            else:
                raise
            if (direction, cfg) not in _WARNED:
                _WARNED.add((direction, cfg))
                import warnings

                warnings.warn(f"attention {direction} kernel: {cfg} does not fit this GPU ({e}); using {nxt}",
                              stacklevel=3)
            cfg = nxt
