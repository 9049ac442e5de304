"""FusedLayerNorm / layer_norm against a float64 reference: outputs and every gradient.

CPU cases run the Triton kernels under the interpreter; ``gpu`` cases run them on CUDA.
"""

import importlib

import pytest
import torch

from triformers._triton import can_run_triton
from triformers.triton import FusedLayerNorm, layer_norm
from triformers.triton._kernels.norm import MAX_BLOCK_N
from triformers.triton.layer_norm import layer_norm_reference

# (atol, rtol) per dtype, outputs and gradients compared with a float64 reference on the same inputs.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),  # one fp16 rounding of values up to ~4
    torch.bfloat16: (3e-2, 2e-2),  # one bf16 rounding of values up to ~4
}
# The weight/bias gradients sum over rows in float32, then round once to the parameter dtype.
GRAD_W_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 4e-3), torch.bfloat16: (1e-1, 2e-2)}
WIDTHS = [1, 3, 17, 129, 1000, MAX_BLOCK_N + 1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ln_mod = importlib.import_module("triformers.triton.layer_norm")  # the package's `layer_norm` is the function


@pytest.fixture(autouse=True)
def _no_torch_path(monkeypatch, request):
    """The kernels must run: taking the pure-torch path fails the test (unless it asks for that path)."""
    if request.node.name.startswith("test_torch_path"):
        return

    def fail(*args, **kwargs):
        raise AssertionError("layer_norm took the pure-torch path")

    monkeypatch.setattr(ln_mod, "layer_norm_reference", fail)


def _check(x, weight, bias, eps=1e-6):
    assert can_run_triton(x)
    inputs = (x, weight, bias)
    y = layer_norm(x, weight, bias, eps)
    dy = torch.randn_like(y)
    wants = [t is not None and t.requires_grad for t in inputs]
    grads = torch.autograd.grad(y, [t for t, w in zip(inputs, wants) if w], dy)
    ref_in = [t.detach().double().requires_grad_(w) if t is not None else None for t, w in zip(inputs, wants)]
    y_ref = layer_norm_reference(*ref_in, eps)
    grads_ref = torch.autograd.grad(y_ref, [t for t, w in zip(ref_in, wants) if w], dy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    names = [n for n, w in zip(("x", "weight", "bias"), wants) if w]
    for name, g, g_ref in zip(names, grads, grads_ref):
        atol, rtol = TOL[x.dtype] if name == "x" else GRAD_W_TOL[x.dtype]
        assert g.dtype == dict(zip(("x", "weight", "bias"), inputs))[name].dtype
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", WIDTHS)
def test_forward_backward(device, dtype, width):
    rows = 3 if width > 1000 else 7
    x = (torch.randn(rows, width, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    w = torch.randn(width, device=device).to(dtype).requires_grad_()
    b = torch.randn(width, device=device).to(dtype).requires_grad_()
    _check(x, w, b)


@pytest.mark.parametrize("device", DEVICES)
def test_looped_kernels_at_small_width(device, monkeypatch):
    """The wide-row kernels (column loops, two-kernel backward) at a width the interpreter runs quickly."""
    import triformers.triton._kernels.norm as norm

    monkeypatch.setattr(norm, "MAX_BLOCK_N", 8)
    x = torch.randn(5, 37, device=device, requires_grad=True)
    _check(
        x,
        torch.randn(37, device=device, requires_grad=True),
        torch.randn(37, device=device, requires_grad=True),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_non_contiguous_and_optional_affine(device):
    base = torch.randn(4, 6, 2 * 33, device=device)
    x = base[..., ::2].requires_grad_()  # column stride 2: passed to the kernel, not copied
    _check(x, None, None)
    xt = torch.randn(33, 5, 3, device=device).transpose(0, 2).requires_grad_()  # leading dims do not merge
    _check(xt, torch.randn(33, device=device, requires_grad=True), None)
    _check(x, None, torch.randn(33, device=device, requires_grad=True))


@pytest.mark.parametrize("device", DEVICES)
def test_only_weight_requires_grad_and_inference(device):
    x = torch.randn(9, 65, device=device)
    w = torch.randn(65, device=device, requires_grad=True)
    b = torch.randn(65, device=device)
    _check(x, w, b)
    with torch.no_grad():
        y = layer_norm(x, w, b)
    torch.testing.assert_close(
        y.double(),
        layer_norm_reference(x.double(), w.double(), b.double()),
        atol=TOL[x.dtype][0],
        rtol=TOL[x.dtype][1],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_torch_layernorm(device):
    torch.manual_seed(1)
    m = FusedLayerNorm(48, eps=1e-5).to(device)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    ref = torch.nn.LayerNorm(48, eps=1e-5).to(device)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, 48, device=device)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
    m2 = FusedLayerNorm((3, 16)).to(device)  # normalised over the last two dims
    x2 = torch.randn(4, 3, 16, device=device)
    torch.testing.assert_close(m2(x2), torch.nn.functional.layer_norm(x2, (3, 16), eps=1e-6), atol=1e-5, rtol=1e-5)
    m2.init_weights()
    assert torch.equal(m2.weight, torch.ones(3, 16, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_returns_float32(device):
    x = torch.randn(6, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer_norm(x, w, None)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(
        y.double(), layer_norm_reference(x.detach().double(), w.detach().double()), atol=1e-5, rtol=1e-5
    )


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight.shape=\(7,\)"):
        layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="normalized_shape"):
        FusedLayerNorm(0)
    with pytest.raises(ValueError, match="does not end with"):
        FusedLayerNorm(5)(x)


def test_torch_path_without_interpreter(monkeypatch, recwarn):
    import triformers.triton._common as common

    monkeypatch.setattr(
        common,
        "triton_unavailable_reason",
        lambda *t: "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 ...)",
    )
    x = torch.randn(3, 10, requires_grad=True)
    y = layer_norm(x, torch.ones(10), torch.zeros(10))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (10,), eps=1e-6))
    assert not [w for w in recwarn if "pure-torch" in str(w.message)]


def test_torch_path_for_float64_warns_once():
    import triformers.triton._common as common

    common._warned.discard(
        "triformers.layer_norm: running the pure-torch path because the kernels take "
        "float16/bfloat16/float32, got torch.float64"
    )
    x = torch.randn(3, 10, dtype=torch.float64)
    with pytest.warns(UserWarning, match="pure-torch path"):
        y = layer_norm(x)
    torch.testing.assert_close(y, layer_norm_reference(x))
