"""What an attention operator claims is what it does, as code written against xFormers relies on:

- every dtype in ``SUPPORTED_DTYPES`` has ``ERROR_ATOL`` / ``ERROR_RTOL`` entries (tests read them);
- ``not_supported_reasons`` answers (a list), never raises, whatever the inputs (BMK with a 3-D tensor bias...);
- what ``supports()`` accepts runs: the low-level ``memory_efficient_attention_forward_requires_grad`` (which needs
  the lse) with every forward operator, and every (forward, backward) pairing, against a float64 reference;
- an operator forced with ``op=`` runs ``Mq = 0``, ``Mkv = 0`` and ``B = 0`` as ``auto`` does;
- invalid inputs raise :class:`InputError`, caught by ``except ValueError`` and ``except AssertionError`` alike.

The reference is written here, in float64: ``softmax(q k^T * scale + bias) v`` on the materialised bias.
"""

import math

import pytest
import torch

from triformers._triton import interpret_mode
from triformers.ops import fmha
from triformers.ops.common import InputError
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase

FW_OPS = fmha.ALL_FW_OPS
BW_OPS = fmha.ALL_BW_OPS
B, H, K = 1, 2, 16  # small: the Triton operators run under the interpreter here


def _reference(q, k, v, bias):
    """float64 ``(out, lse)`` of BMHK inputs; rows that see no key give 0 and -inf."""
    q, k, v = (x.detach().double().transpose(1, 2) for x in (q, k, v))  # [B, H, M, K]
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if isinstance(bias, torch.Tensor):
        s = s + bias.double()
    elif bias is not None:
        s = s + bias.materialize((q.shape[0], q.shape[1], s.shape[-2], s.shape[-1]), dtype=torch.float64)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(lse == -math.inf, 0.0, lse).unsqueeze(-1))
    return (p @ v).transpose(1, 2), lse


def _inputs(bias_kind: str, dtype: torch.dtype, requires_grad: bool = False):
    """Random BMHK inputs (odd sizes) and a bias of the kind named."""
    Mq, Mkv = (19, 19) if bias_kind in ("causal", "blockdiag") else (17, 23)
    Bq = 1 if bias_kind == "blockdiag" else B
    q, k, v = (torch.randn(Bq, m, H, K, dtype=dtype) for m in (Mq, Mkv, Mkv))
    bias = {
        "none": None,
        "causal": ab.LowerTriangularMask(),
        "tensor": torch.randn(Bq, H, Mq, Mkv, dtype=dtype),
        "blockdiag": ab.BlockDiagonalMask.from_seqlens([7, 12], [11, 8]),
    }[bias_kind]
    return [x.requires_grad_(requires_grad) for x in (q, k, v)], bias


BIAS_KINDS = ["none", "causal", "tensor", "blockdiag"]
DTYPES = [torch.float32, torch.float16]  # bfloat16 only on the GPU: the interpreter's bf16 tl.dot is not exact


@pytest.mark.parametrize("op", FW_OPS + BW_OPS, ids=lambda op: op.NAME)
def test_every_supported_dtype_has_tolerances(op):
    missing = [dt for dt in op.SUPPORTED_DTYPES if dt not in op.ERROR_ATOL or dt not in op.ERROR_RTOL]
    assert not missing, f"{op.NAME} lists {missing} in SUPPORTED_DTYPES without ERROR_ATOL/ERROR_RTOL"
    base = AttentionFwOpBase if issubclass(op, AttentionFwOpBase) else AttentionBwOpBase
    for dt in (torch.float32, torch.float16, torch.bfloat16):  # never tighter than xFormers' defaults
        if dt in op.SUPPORTED_DTYPES:
            assert op.ERROR_ATOL[dt] >= base.ERROR_ATOL[dt] and op.ERROR_RTOL[dt] >= base.ERROR_RTOL[dt]


def _odd_inputs():
    """Inputs of every layout, some valid, some not, as xFormers' tests hand them to ``supports()``."""
    x3, x4, x5 = torch.randn(6, 10, 16), torch.randn(2, 10, 3, 16), torch.randn(2, 10, 2, 3, 16)
    yield "BMK, 3-D tensor bias", fmha.Inputs(x3, x3, x3, torch.randn(6, 10, 10))
    yield "BMK, broadcast 3-D bias", fmha.Inputs(x3, x3, x3, torch.randn(1, 10, 10).expand(6, 10, 10))
    yield "BMK, causal", fmha.Inputs(x3, x3, x3, ab.LowerTriangularMask())
    yield "BMK, block-diagonal", fmha.Inputs(x3[:1], x3[:1], x3[:1], ab.BlockDiagonalMask.from_seqlens([4, 6]))
    yield "BMHK, 3-D bias (wrong rank)", fmha.Inputs(x4, x4, x4, torch.randn(2, 10, 10))
    yield "BMHK, bias of another dtype", fmha.Inputs(x4, x4, x4, torch.randn(2, 3, 10, 10, dtype=torch.float16))
    yield "BMGHK, 5-D bias", fmha.Inputs(x5, x5, x5, torch.randn(2, 2, 3, 10, 10))
    yield "BMHK, K != Kv", fmha.Inputs(x4, x4, torch.randn(2, 10, 3, 8))
    yield "BMHK, Mq = 0", fmha.Inputs(x4[:, :0], x4, x4)
    yield "BMHK, int64", fmha.Inputs(*(torch.ones(2, 10, 3, 16, dtype=torch.int64),) * 3)
    yield "BMHK, float64", fmha.Inputs(*(x4.double(),) * 3)
    yield "BMHK, last dim strided", fmha.Inputs(*(torch.randn(2, 10, 3, 32)[..., ::2],) * 3)
    yield "BMHK, meta device", fmha.Inputs(*(torch.empty(2, 10, 3, 16, device="meta"),) * 3)


@pytest.mark.parametrize("op", FW_OPS + BW_OPS, ids=lambda op: op.NAME)
def test_not_supported_reasons_answers_and_never_raises(op):
    for what, inp in _odd_inputs():
        reasons = op.not_supported_reasons(inp)
        assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons), (what, reasons)
        assert op.supports(inp) == (not reasons)


def test_sdpa_folds_a_bmk_bias_like_bmhk():
    """The SDPA operator's answer on BMK ``[B*H, M, K]`` with a 3-D bias is its answer on the BMHK view."""
    q, bias = torch.randn(6, 10, 16), torch.randn(6, 10, 10)
    for op in (fmha.sdpa.FwOp, fmha.sdpa.BwOp):
        assert op.not_supported_reasons(fmha.Inputs(q, q, q, bias)) == op.not_supported_reasons(
            fmha.Inputs(q.unsqueeze(2), q.unsqueeze(2), q.unsqueeze(2), bias.unsqueeze(1))
        )
    out = fmha.memory_efficient_attention(q, q, q, bias, op=fmha.MemoryEfficientAttentionSdpaOp)
    ref, _ = _reference(q.unsqueeze(2), q.unsqueeze(2), q.unsqueeze(2), bias.unsqueeze(1))
    torch.testing.assert_close(out, ref.squeeze(2).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("op", FW_OPS, ids=lambda op: op.NAME)
def test_forward_requires_grad_returns_the_lse_where_supported(op, bias_kind, dtype):
    (q, k, v), bias = _inputs(bias_kind, dtype)
    if not op.supports(fmha.Inputs(q, k, v, bias)):
        pytest.skip(f"{op.NAME} does not claim these inputs")
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, bias, op=op)
    ref_out, ref_lse = _reference(q, k, v, bias)
    atol, rtol = op.ERROR_ATOL[dtype], op.ERROR_RTOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse.reshape(lse.shape), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("op_bw", BW_OPS, ids=lambda op: op.NAME)
@pytest.mark.parametrize("op_fw", FW_OPS, ids=lambda op: op.NAME)
def test_every_supported_pairing_runs(op_fw, op_bw, bias_kind):
    """xFormers pairs any forward operator with any backward operator both of which support the inputs."""
    if op_bw is fmha.triton.BwOp and bias_kind != "tensor":
        pytest.skip("the interpreter is slow: test_triton.py covers this backward's masks")
    (q, k, v), bias = _inputs(bias_kind, torch.float32, requires_grad=True)
    inp = fmha.Inputs(q, k, v, bias)
    if not (op_fw.supports(inp) and op_bw.supports(inp)):
        pytest.skip("not claimed by both operators")
    out = fmha.memory_efficient_attention(q, k, v, bias, op=(op_fw, op_bw))
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out = _reference_autograd(*leaves, bias)
    ref_out.backward(grad.double())
    atol, rtol = op_bw.ERROR_ATOL[torch.float32], op_bw.ERROR_RTOL[torch.float32]
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=op_fw.ERROR_ATOL[torch.float32],
                               rtol=op_fw.ERROR_RTOL[torch.float32])
    for name, x, r in zip("qkv", (q, k, v), leaves):
        torch.testing.assert_close(x.grad.double(), r.grad, atol=atol, rtol=rtol, msg=f"d{name}")


def _reference_autograd(q, k, v, bias):
    """:func:`_reference`'s output with autograd (float64 leaves in, float64 out)."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    s = qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5
    if isinstance(bias, torch.Tensor):
        s = s + bias.double()
    elif bias is not None:
        s = s + bias.materialize((qt.shape[0], qt.shape[1], s.shape[-2], s.shape[-1]), dtype=torch.float64)
    return (torch.softmax(s, dim=-1) @ vt).transpose(1, 2)


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 5, 0), (0, 5, 5)], ids=["Mq=0", "Mkv=0", "B=0"])
@pytest.mark.parametrize("op_bw", BW_OPS, ids=lambda op: op.NAME)
@pytest.mark.parametrize("op_fw", FW_OPS, ids=lambda op: op.NAME)
def test_forced_operator_runs_empty_inputs_like_auto(op_fw, op_bw, shape):
    b, mq, mkv = shape
    q = torch.randn(b, mq, H, K, requires_grad=True)
    k, v = (torch.randn(b, mkv, H, K, requires_grad=True) for _ in range(2))
    inp = fmha.Inputs(q, k, v)
    if not (op_fw.supports(inp) and op_bw.supports(inp)):
        reasons = op_fw.not_supported_reasons(inp) + op_bw.not_supported_reasons(inp)
        assert not interpret_mode(), reasons  # under the interpreter every operator takes these CPU tensors
        pytest.skip(f"not claimed (no interpreter for the Triton kernels here): {reasons}")
    out = fmha.memory_efficient_attention(q, k, v, op=(op_fw, op_bw))
    assert out.shape == (b, mq, H, K) and not out.any()
    out.backward(torch.randn_like(out))
    for name, x in zip("qkv", (q, k, v)):
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any(), name
    _, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, op=op_fw)
    _, lse_auto = fmha.memory_efficient_attention_forward_requires_grad(q, k, v)
    assert lse.shape == lse_auto.shape == (b, H, mq)
    assert torch.equal(lse, lse_auto)  # -inf where no key (Mkv = 0)


def _invalid_calls():
    x = torch.randn(2, 8, 3, 16)
    yield "dtypes differ", lambda: fmha.memory_efficient_attention(x, x.half(), x.half())
    yield "ranks differ", lambda: fmha.memory_efficient_attention(x, x[0], x[0])
    yield "batch sizes differ", lambda: fmha.memory_efficient_attention(x, x[:1], x[:1])
    yield "bias of the wrong shape", lambda: fmha.memory_efficient_attention(x, x, x, torch.randn(2, 3, 8, 7))
    yield "dropout p > 1", lambda: fmha.memory_efficient_attention(x, x, x, p=1.5)
    yield "BMK with a BMHK-only bias", lambda: fmha.memory_efficient_attention(
        x[:, :, 0], x[:, :, 0], x[:, :, 0], ab.BlockDiagonalMask.from_seqlens([8]))
    yield "operator forced on inputs it refuses", lambda: fmha.memory_efficient_attention(
        x, x, x, ab.LowerTriangularFromBottomRightMask(), p=0.3, op=fmha.MemoryEfficientAttentionSdpaOp)


@pytest.mark.parametrize("exc", [AssertionError, ValueError], ids=lambda e: e.__name__)
def test_invalid_inputs_raise_input_error_caught_as_xformers_would(exc):
    assert issubclass(InputError, ValueError) and issubclass(InputError, AssertionError)
    for what, call in _invalid_calls():
        with pytest.raises(exc) as info:
            call()
        assert isinstance(info.value, InputError), (what, info.value)
