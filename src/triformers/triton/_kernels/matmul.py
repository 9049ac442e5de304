"""GEMM with a bias + activation epilogue: y = f(x Wᵀ + b), and its launcher.

A tiled Triton matmul (grouped tile order for L2 reuse, float32 accumulation) whose epilogue adds the
bias and applies the activation while the tile is still in registers; it also stores the pre-activation
z = x Wᵀ + b when a backward will need f'(z).

Memory traffic for x [M, K], W [N, K], y [M, N] (element size s): the GEMM itself reads x and W
(re-reads absorbed by L2/shared memory) and writes y; the epilogue adds nothing. Eager torch writes z,
then reads z and writes y for the activation: 2·M·N·s more (8192 x 4096 bf16: 134 MB, ~45 µs at
3 TB/s, over a ~400 µs GEMM). In training we store z too (M·N·s), the least the backward needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triformers.triton._common import launch, tuned
from triformers.triton._kernels.activations import apply_activation

# H100 tiles: 128x256x64 bf16 with 3 stages (the Triton tutorial's best on Hopper, ~96 KB of shared
# memory per stage set) first, then square and narrow tiles for small or skinny problems. Configs that
# do not fit (float32 inputs) fail to compile and are skipped by the autotuner.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
_INTERP = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


@triton.jit
def _linear_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    z_ptr,  # z_ptr: pre-activation output (STORE_PREACT)
    M,
    N,
    K,
    stride_x_m,
    stride_x_k,
    stride_w_n,
    stride_w_k,
    stride_y_m,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Program computes the [BLOCK_M, BLOCK_N] tile of y; tiles run GROUP_M row blocks per column sweep."""
    pid = tl.program_id(0)  # linear tile id, remapped to grouped (pid_m, pid_n)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_m
    pid_n = (pid % pids_in_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row 0 (always valid) and are dropped at the store: no masks in the loop.
    rm_load = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_load = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = x_ptr + rm_load[:, None] * stride_x_m + rk[None, :] * stride_x_k  # [BLOCK_M, BLOCK_K]
    b_ptrs = w_ptr + rn_load[None, :] * stride_w_n + rk[:, None] * stride_w_k  # [BLOCK_K, BLOCK_N] = Wᵀ tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_x_k
        b_ptrs += BLOCK_K * stride_w_k

    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * stride_y_m + rn[None, :]
    if STORE_PREACT:
        tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=ok)
    y = apply_activation(acc, ACTIVATION)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


_fwd = tuned(
    _linear_fwd_kernel, _CONFIGS, ["M", "N", "K", "ACTIVATION", "HAS_BIAS", "STORE_PREACT", "EVEN_K"]
)


def _input_precision(dtype: torch.dtype) -> str:
    # float32 inputs follow torch's matmul precision setting (IEEE by default); 16-bit inputs ignore it.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def linear_act_fwd(
    x: torch.Tensor,  # [M, K], any strides
    weight: torch.Tensor,  # [N, K], any strides
    bias: torch.Tensor | None,  # [N]
    activation: int,  # index from get_triton_activation_index
    *,
    store_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, z)`` with z = x Wᵀ + b (returned only when ``store_preact``) and y = f(z), both ``[M, N]``."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_preact else None
    block_k_all = [c.kwargs["BLOCK_K"] for c in _CONFIGS] + [_INTERP["BLOCK_K"]]
    even_k = all(K % bk == 0 for bk in block_k_all)
    launch(
        _fwd,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),),
        x,
        weight,
        bias if bias is not None else y,
        y,
        z if z is not None else y,
        M,
        N,
        K,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        interp=_INTERP,
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        STORE_PREACT=store_preact,
        EVEN_K=even_k,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    return y, z
