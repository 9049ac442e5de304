"""Dispatch decisions as rules (never timings), and the xFormers-facing switches they depend on.

- float16/bfloat16 CPU backward over many query blocks of torch's kernel goes to the chunked operator (torch's
  SDPA rounds dK/dV once per block of 256 queries; ``sdpa.half_backward_reasons``): the decision at shapes on
  both sides of the rule, and the gradients at a shape where SDPA's miss xFormers' tolerance;
- ``triformers._is_triton_available()`` is False where no GPU and no interpreter can run the kernels.
"""

import os
import subprocess
import sys

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import chunked, dispatch, sdpa
from triformers.ops.fmha.common import AttentionBwOpBase


def _pick(q, k, bias=None, needs_gradient=True):
    inp = fmha.Inputs(q, k, k, bias)
    inp.normalize_bmhk()
    return dispatch.dispatch_fw(inp, needs_gradient=needs_gradient)


def _qk(Mq, Mkv, dtype, B=1, H=1, K=8):
    return torch.randn(B, Mq, H, K, dtype=dtype), torch.randn(B, Mkv, H, K, dtype=dtype)


# (dtype, Mq, rule fires): n blocks of 256 queries * unit roundoff (2**-8 bf16, 2**-11 fp16) > xFormers' rtol
# (0.1 bf16, 0.02 fp16), i.e. more than 25 blocks in bfloat16 (Mq > 6400), 40 in float16 (Mq > 10240)
RULE_CASES = [
    (torch.bfloat16, 6400, False),
    (torch.bfloat16, 6401, True),
    (torch.bfloat16, 65537, True),
    (torch.float16, 10240, False),
    (torch.float16, 10241, True),
    (torch.float32, 65537, False),  # float32 gradients: torch accumulates in float32
]


@pytest.mark.parametrize("dtype, Mq, fires", RULE_CASES, ids=lambda x: str(x))
def test_half_backward_rule_decides_by_query_blocks(dtype, Mq, fires):
    for Mkv in (4, 300):  # the key count does not enter the rule
        q, k = _qk(Mq, Mkv, dtype)
        assert bool(sdpa.half_backward_reasons(fmha.Inputs(q, k, k))) is fires
        assert _pick(q, k) is (chunked.FwOp if fires else sdpa.FwOp)
        assert _pick(q, k, needs_gradient=False) is sdpa.FwOp  # the forward is accurate either way


def test_half_backward_rule_counts_the_longest_block_of_a_block_diagonal_mask():
    q, _ = _qk(8000, 1, torch.bfloat16)
    short = ab.BlockDiagonalMask.from_seqlens([4000, 4000])  # one SDPA call per block: 16 blocks each
    long = ab.BlockDiagonalMask.from_seqlens([1000, 7000])
    assert _pick(q, q, short) is sdpa.FwOp
    assert _pick(q, q, long) is chunked.FwOp
    assert "7000" in sdpa.half_backward_reasons(fmha.Inputs(q, q, q, long))[0]


def test_half_backward_rule_is_for_the_cpu_kernel_only():
    q = torch.empty(1, 65537, 1, 8, dtype=torch.bfloat16, device="meta")
    assert sdpa.half_backward_reasons(fmha.Inputs(q, q, q)) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_long_query_half_gradients_within_xformers_tolerance(dtype):
    """xFormers' exotic shape B=1, Mq=65537, Mkv=4, H=1, K=8 (inputs randn * 3): auto's gradients are within
    the backward tolerance of a float64 reference; torch's SDPA backward forced there is not (its dK or dV
    error exceeds it), which is what the rule avoids."""
    q64, k64, v64 = (torch.randn(1, m, 1, 8, dtype=torch.float64) * 3 for m in (65537, 4, 4))
    grad = torch.randn(1, 65537, 1, 8, dtype=torch.float64).to(dtype)
    leaves = [x.to(dtype).double().requires_grad_() for x in (q64, k64, v64)]
    ref = torch.softmax(leaves[0][:, :, 0] @ leaves[1][:, :, 0].transpose(-1, -2) * 8**-0.5, -1) @ leaves[2][:, :, 0]
    ref.unsqueeze(2).backward(grad.double())
    atol, rtol = AttentionBwOpBase.ERROR_ATOL[dtype], AttentionBwOpBase.ERROR_RTOL[dtype]

    def excess(op):
        xs = [x.to(dtype).requires_grad_() for x in (q64, k64, v64)]
        fmha.memory_efficient_attention(*xs, op=op).backward(grad)
        return max(((x.grad.double() - r.grad).abs() - atol - rtol * r.grad.abs()).max().item()
                   for x, r in zip(xs, leaves))

    assert excess(None) <= 0  # auto
    assert excess(fmha.MemoryEfficientAttentionSdpaOp) > 0


@pytest.mark.parametrize("interpret, available", [("0", False), ("1", True)])
def test_is_triton_available_needs_a_gpu_or_the_interpreter(interpret, available):
    """xFormers' ``_is_triton_available()``: False where the kernels cannot run (no CUDA, no interpreter)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": interpret}
    code = "import triformers; print(triformers._is_triton_available())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == str(available)


def test_xformers_private_dispatch_names_answer_like_ours():
    q, k = _qk(33, 40, torch.float32, B=2, H=3, K=16)
    inp = fmha.Inputs(q, k, k, ab.LowerTriangularFromBottomRightMask())
    inp.normalize_bmhk()
    assert dispatch._dispatch_fw(inp, True) is dispatch.dispatch_fw(inp, True, needs_lse=True)
    assert dispatch._dispatch_fw(inp, False) is dispatch.dispatch_fw(inp, False)
    assert dispatch._dispatch_bw(inp) is dispatch.dispatch_bw(inp)
    assert dispatch._dispatch_fw_priority_list(inp, True) == dispatch.fw_priority_list(inp, True)
    with pytest.raises(NotImplementedError, match="Operator `memory_efficient_attention` does not support"):
        dispatch._ensure_op_supports_or_raise(NotImplementedError, "memory_efficient_attention", sdpa.FwOp, inp)
    dispatch._ensure_op_supports_or_raise(ValueError, "memory_efficient_attention", chunked.FwOp, inp)


def test_attention_op_dispatch_gives_a_pair_that_runs_as_auto():
    q, k = (x.requires_grad_() for x in _qk(33, 40, torch.float32, B=2, H=3, K=16))
    op = fmha.AttentionOpDispatch.from_arguments(q, k, k).op
    assert isinstance(op, tuple) and len(op) == 2
    assert issubclass(op[0], fmha.AttentionFwOpBase) and issubclass(op[1], fmha.AttentionBwOpBase)
    out = fmha.memory_efficient_attention(q, k, k, op=op)
    torch.testing.assert_close(out, fmha.memory_efficient_attention(q, k, k))


def test_check_lastdim_alignment_stride1():
    from triformers.ops.fmha.common import check_lastdim_alignment_stride1

    def reasons(x, alignment=8):
        out: list[str] = []
        check_lastdim_alignment_stride1(out, "query", x, alignment)
        return out

    assert reasons(torch.randn(2, 5, 16)) == []
    assert reasons(torch.randn(2, 5, 12)) == ["query.shape[-1] % 8 != 0"]
    assert "query.stride(-2) % 8 != 0" in reasons(torch.randn(2, 5, 20)[..., :16])[0]
    strided = reasons(torch.randn(2, 5, 32)[..., ::2])
    assert len(strided) == 1 and "query.stride(-1) > 1" in strided[0] and ".contiguous()" in strided[0]
