"""rms_norm / rms_norm_add / RMSNorm against a float64 reference: outputs and every gradient."""

import importlib

import pytest
import torch

from triformers._triton import can_run_triton
from triformers.ops import RMSNorm, rms_norm, rms_norm_add
from triformers.ops.rmsnorm import rms_norm_reference
from triformers.triton._kernels.norm import MAX_BLOCK_N

# (atol, rtol) per dtype for outputs and dx, against float64 on the same inputs.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),  # one fp16 rounding of values up to ~4
    torch.bfloat16: (3e-2, 2e-2),  # one bf16 rounding of values up to ~4
}
# dw sums over rows in float32, then rounds once to the weight's dtype.
GRAD_W_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 4e-3), torch.bfloat16: (1e-1, 2e-2)}
WIDTHS = [1, 3, 17, 129, 1000, MAX_BLOCK_N + 1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
rms_mod = importlib.import_module("triformers.ops.rmsnorm")


@pytest.fixture(autouse=True)
def _no_torch_path(monkeypatch, request):
    """The kernels must run: taking the pure-torch path fails the test (unless it asks for that path)."""
    if request.node.name.startswith("test_torch_path"):
        return

    def fail(*args, **kwargs):
        raise AssertionError("rms_norm took the pure-torch path")

    monkeypatch.setattr(rms_mod, "rms_norm_reference", fail)


def _check(x, weight, eps=1e-6):
    assert can_run_triton(x)
    y = rms_norm(x, weight, eps)
    dy = torch.randn_like(y)
    leaves = [t for t in (x, weight) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, leaves, dy)
    xr = x.detach().double().requires_grad_(x.requires_grad)
    wr = weight.detach().double().requires_grad_(weight.requires_grad) if weight is not None else None
    y_ref = rms_norm_reference(xr, wr, eps)
    grads_ref = torch.autograd.grad(y_ref, [t for t in (xr, wr) if t is not None and t.requires_grad], dy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_ref, atol=TOL[x.dtype][0], rtol=TOL[x.dtype][1])
    for leaf, g, g_ref in zip(leaves, grads, grads_ref):
        atol, rtol = TOL[x.dtype] if leaf is x else GRAD_W_TOL[x.dtype]
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", WIDTHS)
def test_forward_backward(device, dtype, width):
    rows = 3 if width > 1000 else 7
    x = (torch.randn(rows, width, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    w = torch.randn(width, device=device).to(dtype).requires_grad_()
    _check(x, w)


@pytest.mark.parametrize("device", DEVICES)
def test_looped_kernels_at_small_width(device, monkeypatch):
    import triformers.triton._kernels.norm as norm

    monkeypatch.setattr(norm, "MAX_BLOCK_N", 8)
    _check(
        torch.randn(5, 37, device=device, requires_grad=True),
        torch.randn(37, device=device, requires_grad=True),
    )
    _check(torch.randn(2, 3, 37, device=device, requires_grad=True), None)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_strides_no_weight(device):
    x = torch.randn(3, 4, 2 * 45, device=device)[..., 1::2].requires_grad_()  # column stride 2
    _check(x, None)
    x = torch.randn(45, 5, 3, device=device).transpose(0, 2).requires_grad_()
    _check(x, torch.randn(45, device=device, requires_grad=True))
    with torch.no_grad():
        y = rms_norm(x, None)
    torch.testing.assert_close(y.double(), rms_norm_reference(x.detach().double(), None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [17, 1000])
def test_rms_norm_add_in_place_and_gradients(device, dtype, width, monkeypatch):
    x0 = torch.randn(6, width, device=device).to(dtype)
    y0 = torch.randn(6, width, device=device).to(dtype)
    w = torch.randn(width, device=device).to(dtype)
    # inference: x is updated in place (rounded once in its dtype), y untouched
    x, y = x0.clone(), y0.clone()
    with torch.no_grad():
        out = rms_norm_add(x, y, w)
    expected_x = (x0.float() + y0.float()).to(dtype)
    # Exact on the GPU; Triton's interpreter rounds float32 -> bfloat16 toward zero (1 ulp = 2^-7 relative).
    exact = device == "cuda" or dtype != torch.bfloat16
    torch.testing.assert_close(x, expected_x, atol=0, rtol=0 if exact else 2**-7)
    assert torch.equal(y, y0)
    torch.testing.assert_close(
        out.double(),
        rms_norm_reference(expected_x.double(), w.double()),
        atol=TOL[dtype][0],
        rtol=TOL[dtype][1],
    )
    # training: gradients of x (through the in-place update), y and w; x's new value is used afterwards too
    xl = x0.clone().requires_grad_()
    yl = y0.clone().requires_grad_()
    wl = w.clone().requires_grad_()
    x_work = xl * 1.0  # a non-leaf to update in place
    out = rms_norm_add(x_work, yl, wl)
    loss = (out.float() * torch.arange(width, device=device)).sum() + (x_work.float() ** 2).sum()
    grads = torch.autograd.grad(loss, (xl, yl, wl))
    xr, yr, wr = (t.detach().double().requires_grad_() for t in (x0, y0, w))
    s = xr + yr
    loss_ref = (rms_norm_reference(s, wr) * torch.arange(width, device=device)).sum() + (s**2).sum()
    grads_ref = torch.autograd.grad(loss_ref, (xr, yr, wr))
    scale = width  # the loss weights grow with the column index
    for g, g_ref, tol in zip(grads, grads_ref, (TOL, TOL, GRAD_W_TOL)):
        torch.testing.assert_close(g.double(), g_ref, atol=tol[dtype][0] * scale, rtol=tol[dtype][1] * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_module_and_increment_and_forward(device):
    m = RMSNorm(33).to(device)
    assert torch.equal(m.weight, torch.ones(33, device=device))
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(2, 5, 33, device=device)
    torch.testing.assert_close(m(x).double(), rms_norm_reference(x.double(), m.weight.double()), atol=1e-5, rtol=1e-5)
    y = torch.randn_like(x)
    x2 = x.clone()
    out = m.increment_and_forward_(x2, y)
    torch.testing.assert_close(x2, x + y)
    torch.testing.assert_close(
        out.double(), rms_norm_reference((x + y).double(), m.weight.double()), atol=1e-5, rtol=1e-5
    )
    assert RMSNorm(8, include_weight=False).weight is None


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_returns_float32(device):
    x = torch.randn(6, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = rms_norm(x, w)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight.shape=\(7,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, None, eps=float("nan"))
    with pytest.raises(ValueError, match="y.shape"):
        rms_norm_add(x, torch.randn(4, 7), None)
    with pytest.raises(ValueError, match="floating"):
        rms_norm(torch.ones(3, 3, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)


def test_torch_path_without_interpreter(monkeypatch, recwarn):
    import triformers.triton._common as common

    monkeypatch.setattr(
        common,
        "triton_unavailable_reason",
        lambda *t: "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 ...)",
    )
    x = torch.randn(3, 10, requires_grad=True)
    w = torch.randn(10, requires_grad=True)
    y = rms_norm(x, w)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (10,), w, eps=1e-6))
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    x2, inc = torch.randn(3, 10), torch.randn(3, 10)
    expected = x2 + inc
    rms_norm_add(x2, inc, None)
    torch.testing.assert_close(x2, expected)
    assert not [w for w in recwarn if "pure-torch" in str(w.message)]
