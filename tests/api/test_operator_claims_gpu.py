"""The operator claims of ``test_operator_claims.py`` on the GPU, bfloat16 included: what ``supports()`` accepts
runs (the lse of every forward operator, every forward/backward pairing), empty inputs forced on every operator,
and ``torch.jit.trace`` of a ``MultiHeadDispatch`` on CUDA tensors."""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BIAS_KINDS = ["none", "causal", "tensor", "blockdiag"]


def _inputs(bias_kind, dtype, requires_grad=False):
    Mq, Mkv = (300, 300) if bias_kind in ("causal", "blockdiag") else (257, 333)
    B = 1 if bias_kind == "blockdiag" else 2
    q, k, v = (torch.randn(B, m, 4, 64, device="cuda", dtype=dtype) for m in (Mq, Mkv, Mkv))
    bias = {
        "none": None,
        "causal": ab.LowerTriangularMask(),
        "tensor": torch.randn(B, 4, Mq, Mkv, device="cuda", dtype=dtype),
        "blockdiag": ab.BlockDiagonalMask.from_seqlens([100, 200], [150, 150], device="cuda"),
    }[bias_kind]
    return [x.requires_grad_(requires_grad) for x in (q, k, v)], bias


def _reference(q, k, v, bias):
    """float64 output with autograd, and lse."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    s = qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5
    if isinstance(bias, torch.Tensor):
        s = s + bias.double()
    elif bias is not None:
        s = s + bias.materialize(s.shape, dtype=torch.float64, device="cuda")
    return (torch.softmax(s, dim=-1) @ vt).transpose(1, 2), torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("op", fmha.ALL_FW_OPS, ids=lambda op: op.NAME)
def test_forward_requires_grad_returns_the_lse_where_supported(op, bias_kind, dtype):
    (q, k, v), bias = _inputs(bias_kind, dtype)
    if not op.supports(fmha.Inputs(q, k, v, bias)):
        pytest.skip(f"{op.NAME} does not claim these inputs")
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, bias, op=op)
    ref_out, ref_lse = _reference(*(x.double() for x in (q, k, v)), bias)
    torch.testing.assert_close(out.double(), ref_out, atol=op.ERROR_ATOL[dtype], rtol=op.ERROR_RTOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse.reshape(lse.shape), atol=2e-3, rtol=2e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("op_bw", fmha.ALL_BW_OPS, ids=lambda op: op.NAME)
@pytest.mark.parametrize("op_fw", fmha.ALL_FW_OPS, ids=lambda op: op.NAME)
def test_every_supported_pairing_runs(op_fw, op_bw, bias_kind, dtype):
    (q, k, v), bias = _inputs(bias_kind, dtype, requires_grad=True)
    if not (op_fw.supports(fmha.Inputs(q, k, v, bias)) and op_bw.supports(fmha.Inputs(q, k, v, bias))):
        pytest.skip("not claimed by both operators")
    out = fmha.memory_efficient_attention(q, k, v, bias, op=(op_fw, op_bw))
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = _reference(*leaves, bias)
    ref_out.backward(grad.double())
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=op_fw.ERROR_ATOL[dtype],
                               rtol=op_fw.ERROR_RTOL[dtype])
    for name, x, r in zip("qkv", (q, k, v), leaves):
        torch.testing.assert_close(x.grad.double(), r.grad, atol=op_bw.ERROR_ATOL[dtype],
                                   rtol=op_bw.ERROR_RTOL[dtype], msg=f"d{name}")


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 5, 0), (0, 5, 5)], ids=["Mq=0", "Mkv=0", "B=0"])
@pytest.mark.parametrize("op_bw", fmha.ALL_BW_OPS, ids=lambda op: op.NAME)
@pytest.mark.parametrize("op_fw", fmha.ALL_FW_OPS, ids=lambda op: op.NAME)
def test_forced_operator_runs_empty_inputs(op_fw, op_bw, shape):
    b, mq, mkv = shape
    q = torch.randn(b, mq, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(b, mkv, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(2))
    out = fmha.memory_efficient_attention(q, k, v, op=(op_fw, op_bw))
    assert out.shape == (b, mq, 2, 64) and not out.any()
    out.backward(torch.randn_like(out))
    assert all(x.grad is not None and not x.grad.any() for x in (q, k, v))
    _, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, op=op_fw)
    assert lse.shape == (b, 2, mq) and (mkv > 0 or bool((lse == -math.inf).all()))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_jit_trace_of_multi_head_dispatch_on_cuda():
    from triformers.components import MultiHeadDispatch, build_attention

    attention = build_attention({"name": "scaled_dot_product", "dropout": 0.0, "causal": True, "seq_len": 64})
    mha = MultiHeadDispatch(dim_model=128, num_heads=2, attention=attention, residual_dropout=0.0).cuda().eval()
    x = torch.randn(2, 64, 128, device="cuda")
    traced = torch.jit.trace(mha, (x, x, x))
    y = torch.randn(3, 64, 128, device="cuda")
    torch.testing.assert_close(traced(y, y, y), mha(y, y, y))
