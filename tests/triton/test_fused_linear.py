"""FusedLinear / fused_linear against a float64 reference: outputs and gradients of x, weight and bias.

The GEMMs are torch's; the Triton kernels are the activation pass and the fused activation gradient.
"""

import importlib

import pytest
import torch

from triformers._triton import can_run_triton
from triformers.components.activations import Activation
from triformers.triton import FusedLinear
from triformers.triton.fused_linear import fused_linear, fused_linear_reference

# (atol, rtol) per dtype, relative to a float64 reference; GEMM sums of K products rounded once.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 5e-3),  # fp16 output rounding of values up to ~10
    torch.bfloat16: (8e-2, 2e-2),  # bf16 output rounding of values up to ~10
}
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES_DTYPES = [("cpu", d) for d in CPU_DTYPES] + [
    pytest.param("cuda", d, marks=pytest.mark.gpu) for d in (torch.float32, torch.float16, torch.bfloat16)
]
fl_mod = importlib.import_module("triformers.triton.fused_linear")


@pytest.fixture(autouse=True)
def _no_torch_path(monkeypatch, request):
    if request.node.name.startswith("test_torch_path"):
        return

    def fail(*args, **kwargs):
        raise AssertionError("FusedLinear took the pure-torch path")

    monkeypatch.setattr(fl_mod, "fused_linear_reference", fail)


def _check(x, w, b, activation, scale=1.0):
    assert can_run_triton(x)
    y = fused_linear(x, w, b, activation)
    dy = torch.randn_like(y)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = fused_linear_reference(ref_in[0], ref_in[1], ref_in[2] if b is not None else None, activation)
    grads_ref = torch.autograd.grad(y_ref, ref_in, dy.double())
    atol, rtol = TOL[x.dtype]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    torch.testing.assert_close(y.double(), y_ref, atol=atol * scale, rtol=rtol)
    for name, g, g_ref in zip(("dx", "dw", "db"), grads, grads_ref):
        # gradients sum over the batch (dw, db) or the output features (dx): scale with those sums
        torch.testing.assert_close(
            g.double(), g_ref, atol=atol * scale * 4, rtol=rtol * 2, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("device,dtype", DEVICES_DTYPES)
@pytest.mark.parametrize("activation", [None, *Activation])
@pytest.mark.parametrize("bias", [False, True])
def test_activations_and_bias(device, dtype, activation, bias):
    x = torch.randn(2, 9, 48, device=device).to(dtype).requires_grad_()
    w = (torch.randn(40, 48, device=device) / 48**0.5).to(dtype).requires_grad_()
    b = torch.randn(40, device=device).to(dtype).requires_grad_() if bias else None
    _check(x, w, b, activation)


@pytest.mark.parametrize("device,dtype", DEVICES_DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 17, 3), (17, 129, 33), (5, 1000, 7), (129, 40, 257)])
def test_odd_shapes(device, dtype, m, k, n):
    x = torch.randn(m, k, device=device).to(dtype).requires_grad_()
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype).requires_grad_()
    b = torch.randn(n, device=device).to(dtype).requires_grad_()
    _check(x, w, b, "gelu", scale=max(1.0, (m / 32) ** 0.5))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_strided_inputs_and_inference(device):
    x = torch.randn(2 * 48, 7, device=device).t()[:, ::2].requires_grad_()  # [7, 48] with strides (1, 14)
    w = torch.randn(48, 2 * 30, device=device).t()[::2].requires_grad_()  # [30, 48], column-major
    _check(x, w, None, "leaky_relu")
    with torch.no_grad():
        y = fused_linear(x, w, None, "relu")
    torch.testing.assert_close(y, torch.relu(x @ w.t()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_module_and_autocast(device):
    torch.manual_seed(2)
    m = FusedLinear(32, 24, bias=True, activation="star_relu").to(device)
    ref = torch.nn.Linear(32, 24).to(device)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 32, device=device)
    torch.testing.assert_close(m(x), 0.8944 * torch.relu(ref(x)) ** 2 - 0.4472, atol=1e-4, rtol=1e-4)
    bound = 1 / 32**0.5
    assert m.bias.abs().max() <= bound and m.weight.abs().max() <= bound * 1.0001
    with torch.autocast(device, dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and m.bias.grad.dtype == torch.float32
    assert FusedLinear(4, 3).bias is None


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight.shape"):
        fused_linear(x, torch.randn(3, 7))
    with pytest.raises(ValueError, match="bias.shape"):
        fused_linear(x, torch.randn(3, 8), torch.randn(4))
    with pytest.raises(ValueError, match="dtype"):
        fused_linear(x, torch.randn(3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="positive"):
        FusedLinear(0, 3)


def test_torch_path_without_interpreter(monkeypatch):
    import triformers.triton._common as common

    monkeypatch.setattr(
        common,
        "triton_unavailable_reason",
        lambda *t: "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 ...)",
    )
    m = FusedLinear(8, 4, bias=True, activation="gelu")
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), torch.nn.functional.gelu(torch.nn.functional.linear(x, m.weight, m.bias)))
