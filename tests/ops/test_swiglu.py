"""swiglu / SwiGLU: fused ops against a float64 reference (outputs, gradients of x and every weight and
bias), packing, dispatch and autocast. The GEMMs are torch's; the Triton kernels are silu(a)·b."""

import importlib

import pytest
import torch

from triformers._triton import can_run_triton
from triformers.ops import (
    SwiGLU,
    SwiGLUEagerOp,
    SwiGLUFusedOp,
    SwiGLUOpDispatch,
    SwiGLUPackedFusedOp,
    swiglu,
)
from triformers.ops.swiglu import silu_mul, silu_mul_reference, swiglu_reference

# (atol, rtol) per dtype against float64 on the same inputs; outputs and gradients are sums of D or H
# products rounded in the GEMMs' dtype, so scale with the values (~1 here).
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 4e-2),  # bf16 GEMM outputs and the hidden activations are rounded to 8 bits
}
DEVICES_DTYPES = [("cpu", torch.float32), ("cpu", torch.bfloat16)] + [
    pytest.param("cuda", d, marks=pytest.mark.gpu) for d in (torch.float16, torch.bfloat16, torch.float32)
]
swiglu_mod = importlib.import_module("triformers.ops.swiglu")


@pytest.fixture(autouse=True)
def _no_torch_path(monkeypatch, request):
    if request.node.name.startswith(("test_torch_path", "test_eager")):
        return

    def fail(*args, **kwargs):
        raise AssertionError("took the pure-torch path")

    monkeypatch.setattr(swiglu_mod, "silu_mul_reference", fail)
    # the fused op's torch path is swiglu_reference; the eager op holds its own reference to it
    monkeypatch.setattr(swiglu_mod, "swiglu_reference", fail)


def _module(d, h, o, bias, packed, device, dtype):
    m = SwiGLU(d, h, o, bias=bias, _pack_weights=packed).to(device)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_().mul_(1.0 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.5)
    return m.to(dtype)


def _check_module(m, x):
    assert can_run_triton(x)
    params = [x, *m.parameters()]
    y = m(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, dy)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    m_ref = {n: r for (n, _), r in zip(m.named_parameters(), ref_params[1:])}
    if m.w12 is not None:
        h = m.hidden_features
        w1, w2 = m_ref["w12.weight"][:h], m_ref["w12.weight"][h:]
        b1, b2 = (m_ref["w12.bias"][:h], m_ref["w12.bias"][h:]) if "w12.bias" in m_ref else (None, None)
    else:
        w1, w2, b1, b2 = m_ref["w1.weight"], m_ref["w2.weight"], m_ref.get("w1.bias"), m_ref.get("w2.bias")
    y_ref = _reference(ref_params[0], w1, b1, w2, b2, m_ref["w3.weight"], m_ref.get("w3.bias"))
    grads_ref = torch.autograd.grad(y_ref, ref_params, dy.double())
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, p, g, g_ref in zip(names, params, grads, grads_ref):
        assert g.dtype == p.dtype and g.shape == p.shape
        # weight gradients sum over the 2 x 7 tokens: twice the output tolerance
        torch.testing.assert_close(g.double(), g_ref, atol=2 * atol, rtol=rtol, msg=lambda s, n=name: f"d{n}: {s}")


_reference = swiglu_reference  # bound before the fixture patches the module attribute


@pytest.mark.parametrize("device,dtype", DEVICES_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [True, False])
def test_module_forward_backward(device, dtype, bias, packed):
    m = _module(24, 40, 16, bias, packed, device, dtype)
    x = torch.randn(2, 7, 24, device=device).to(dtype).requires_grad_()
    op = SwiGLUOpDispatch.from_arguments(x, *m._ordered_params()).op
    assert op is (SwiGLUPackedFusedOp if packed else SwiGLUFusedOp)
    _check_module(m, x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("d,h,o", [(1, 1, 1), (3, 17, 5), (129, 33, 3)])
def test_odd_sizes(device, d, h, o):
    m = _module(d, h, o, True, True, device, torch.float32)
    _check_module(m, torch.randn(5, d, device=device, requires_grad=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_packed_weight_gradient_is_not_copied(device):
    """The packed [2H, D] gradient reaches w12 without torch.stack / cat."""
    m = _module(16, 24, 16, True, True, device, torch.float32)
    x = torch.randn(4, 16, device=device)
    y = m(x)
    with torch.autograd.profiler.profile() as prof:
        y.sum().backward()
    names = {e.name for e in prof.function_events}
    assert "aten::stack" not in names and "aten::cat" not in names, sorted(names)
    assert m.w12.weight.grad.shape == (48, 16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_explicit_ops(device):
    m = _module(8, 12, 8, True, True, device, torch.float32)
    x = torch.randn(3, 8, device=device)
    params = m._ordered_params()
    expected = _reference(x, *params)
    for op in (SwiGLUFusedOp, SwiGLUPackedFusedOp):
        torch.testing.assert_close(swiglu(x, *params, op=op), expected, atol=1e-5, rtol=1e-5)
    unpacked = [p.clone() if p is not None else None for p in params]
    with pytest.raises(NotImplementedError, match="w1/w2 needs to be properly packed"):
        swiglu(x, *unpacked, op=SwiGLUPackedFusedOp)
    assert SwiGLUFusedOp.NAME == "fused" and SwiGLUEagerOp.NAME == "eager" and SwiGLUPackedFusedOp.PACKED_WEIGHTS


def test_eager_op_and_float64_dispatch():
    m = _module(8, 12, 8, True, True, "cpu", torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    params = m._ordered_params()
    assert SwiGLUOpDispatch.from_arguments(x, *params).op is SwiGLUEagerOp
    torch.testing.assert_close(swiglu(x, *params), _reference(x, *params))
    torch.testing.assert_close(swiglu(x, *params, op=SwiGLUEagerOp), _reference(x, *params))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autocast_bf16_keeps_packing(device):
    m = _module(16, 24, 8, True, True, device, torch.float32)
    x = torch.randn(5, 16, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert SwiGLUOpDispatch.from_arguments(x, *m._ordered_params()).dtype_autocast_gpu == torch.bfloat16
        y = m(x)
    assert y.dtype == torch.bfloat16
    expected = _reference(x.double(), *[p.double() if p is not None else None for p in m._ordered_params()])
    torch.testing.assert_close(y.double(), expected, atol=6e-2, rtol=4e-2)
    y.float().sum().backward()
    assert m.w12.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 3, 17, 129, 1000, 1025])
def test_silu_mul(device, dtype, width):
    a = torch.randn(6, width, device=device).to(dtype).requires_grad_()
    b = torch.randn(6, 2 * width, device=device).to(dtype)[:, ::2].detach().requires_grad_()  # strided
    g = silu_mul(a, b)
    dg = torch.randn_like(g)
    ga, gb = torch.autograd.grad(g, (a, b), dg)
    ar, br = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    g_ref = silu_mul_ref(ar, br)
    ga_ref, gb_ref = torch.autograd.grad(g_ref, (ar, br), dg.double())
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (3e-2, 2e-2)
    for t, r in ((g, g_ref), (ga, ga_ref), (gb, gb_ref)):
        torch.testing.assert_close(t.double(), r, atol=atol, rtol=rtol)


silu_mul_ref = silu_mul_reference


def test_bad_arguments():
    m = _module(8, 12, 8, True, True, "cpu", torch.float32)
    x = torch.randn(3, 8)
    w1, b1, w2, b2, w3, b3 = m._ordered_params()
    with pytest.raises(ValueError, match="w1 and w2"):
        swiglu(x, w1, b1, w2[:5], b2, w3, b3)
    with pytest.raises(ValueError, match="b1.shape"):
        swiglu(x, w1, b1[:3], w2, b2, w3, b3)
    with pytest.raises(ValueError, match="w3.shape"):
        swiglu(x, w1, b1, w2, b2, w3[:, :5], b3)
    with pytest.raises(ValueError, match=r"x.shape=\(3, 7\)"):
        swiglu(torch.randn(3, 7), w1, b1, w2, b2, w3, b3)
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul(torch.randn(3), torch.randn(4))


def test_torch_path_without_interpreter(monkeypatch):
    import triformers.triton._common as common

    monkeypatch.setattr(
        common,
        "triton_unavailable_reason",
        lambda *t: "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 ...)",
    )
    m = _module(8, 12, 8, True, True, "cpu", torch.float32)
    x = torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(swiglu(x, *m._ordered_params(), op=SwiGLUFusedOp), _reference(x, *m._ordered_params()))
