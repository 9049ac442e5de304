"""Fused dropout(activation(x + bias)): statistics, seeding, mask regeneration, and exact parity with a
float64 reference given the same keep mask (outputs and gradients of x and bias)."""

import importlib

import pytest
import torch

from triformers._triton import can_run_triton
from triformers.components.activations import Activation
from triformers.triton import FusedDropoutBias, dropout
from triformers.triton._kernels.dropout import BLOCK_S_MAX, LANES
from triformers.triton.dropout import dropout_with_keep_mask, effective_p

# (atol, rtol) per dtype against float64 on the same inputs and mask.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),  # one fp16 rounding of values up to ~8
    torch.bfloat16: (4e-2, 2e-2),  # one bf16 rounding of values up to ~8
}
# The bias gradient sums dx over rows in float32, then rounds once.
GRAD_B_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 4e-3), torch.bfloat16: (2e-1, 2e-2)}
ACTIVATIONS = [None, *Activation]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
dropout_mod = importlib.import_module("triformers.triton.dropout")


@pytest.fixture(autouse=True)
def _no_torch_path(monkeypatch, request):
    if request.node.name.startswith("test_torch_path"):
        return

    def fail(*args, **kwargs):
        raise AssertionError("dropout took the pure-torch path")

    monkeypatch.setattr(dropout_mod, "dropout_reference", fail)


def _keep_mask(x, p, seed):
    """The kernel's keep mask for x's shape and this seed, read off an identity dropout of nonzero inputs."""
    torch.manual_seed(seed)
    probe = dropout(torch.ones_like(x), p)
    return probe != 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference_with_same_mask(device, dtype, activation):
    p = 0.3
    x = (torch.randn(9, 67, device=device) * 2).to(dtype).requires_grad_()
    b = torch.randn(67, device=device).to(dtype).requires_grad_()
    assert can_run_triton(x)
    keep = _keep_mask(x, p, seed=7)
    torch.manual_seed(7)
    y = dropout(x, p, b, activation)
    dy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), dy)
    xr, br = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y_ref = dropout_with_keep_mask(xr, keep, p, br, activation)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (xr, br), dy.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx.double(), gx_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gb.double(), gb_ref, atol=GRAD_B_TOL[dtype][0], rtol=GRAD_B_TOL[dtype][1])
    assert gx.dtype == dtype and gb.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [1, 3, 17, 129, 1000, LANES * BLOCK_S_MAX + 1])
def test_widths_backward_regenerates_forward_mask(device, width):
    p = 0.4
    x = torch.randn(5, width, device=device, requires_grad=True)
    b = torch.randn(width, device=device, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, p, b)
    dy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), dy)
    kept = y != 0  # x + b is nonzero almost surely
    q = effective_p(p)
    torch.testing.assert_close(y, torch.where(kept, (x + b) / (1 - q), 0.0), atol=1e-6, rtol=1e-6)
    expected = torch.where(kept, dy / (1 - q), 0.0)
    torch.testing.assert_close(gx, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gb, expected.sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_unbiased(device, p):
    n = 64 * 257
    x = torch.full((64, 257), 2.0, device=device)
    y = dropout(x, p)
    kept = (y != 0).float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma, (kept, 1 - p)
    # E[y] = x: the mean over n elements is within 5 sigma of 2
    assert abs(y.mean().item() - 2.0) < 5 * 2.0 * (p / (1 - p) / n) ** 0.5
    assert torch.all((y == 0) | torch.isclose(y, torch.full_like(y, 2.0 / (1 - effective_p(p)))))
    assert abs(effective_p(p) - p) <= 2**-17


@pytest.mark.parametrize("device", DEVICES)
def test_seeding(device):
    x = torch.randn(8, 100, device=device)
    torch.manual_seed(11)
    y1 = dropout(x, 0.5)
    torch.manual_seed(11)
    y2 = dropout(x, 0.5)
    y3 = dropout(x, 0.5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3)
    # rows and columns draw independent bits (no repeated pattern across rows)
    assert not torch.equal(y1[0] != 0, y1[1] != 0)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_depends_on_position_not_layout(device):
    base = torch.randn(6, 2 * 37, device=device)
    x = base[:, ::2]  # column stride 2
    torch.manual_seed(5)
    y = dropout(x, 0.5)
    torch.manual_seed(5)
    y_contig = dropout(x.contiguous(), 0.5)
    assert torch.equal(y, y_contig)
    x3 = torch.randn(37, 2, 3, device=device).transpose(0, 2)  # [3, 2, 37], leading dims unmerged
    torch.manual_seed(5)
    y3 = dropout(x3, 0.5)
    torch.manual_seed(5)
    assert torch.equal(y3, dropout(x3.contiguous(), 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_p_zero_and_one(device):
    x = torch.randn(4, 33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    y = dropout(x, 0.0, b, "gelu")
    torch.testing.assert_close(y, torch.nn.functional.gelu(x + b), atol=1e-6, rtol=1e-6)
    y1 = dropout(x, 1.0, b, "relu")
    assert torch.equal(y1, torch.zeros_like(y1))
    gx, gb = torch.autograd.grad(y1.sum(), (x, b))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.parametrize("device", DEVICES)
def test_module(device):
    m = FusedDropoutBias(0.5, 24, "squared_relu").to(device)
    assert isinstance(m.bias, torch.nn.Parameter) and torch.equal(m.bias, torch.zeros(24, device=device))
    x = torch.randn(3, 24, device=device)
    m.eval()
    torch.testing.assert_close(m(x), torch.relu(x) ** 2)
    m.train()
    y = m(x)
    assert ((y == 0) | torch.isclose(y, 2 * torch.relu(x) ** 2)).all()
    y.sum().backward()
    assert m.bias.grad is not None
    assert FusedDropoutBias(0.1, None).bias is None


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_and_promotion(device):
    x = torch.randn(4, 40, device=device, dtype=torch.bfloat16)
    b = torch.randn(40, device=device)
    assert dropout(x, 0.2, b).dtype == torch.float32  # type promotion, as x + b
    with torch.autocast(device, dtype=torch.bfloat16):
        assert dropout(x.float(), 0.2, b).dtype == torch.bfloat16


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="p=1.5"):
        dropout(x, 1.5)
    with pytest.raises(ValueError, match=r"bias.shape=\(7,\)"):
        dropout(x, 0.1, torch.zeros(7))
    with pytest.raises(ValueError, match="'swish'"):
        dropout(x, 0.1, None, "swish")
    with pytest.raises(ValueError, match="p < 1"):
        FusedDropoutBias(1.0, 8)


def test_torch_path_without_interpreter(monkeypatch):
    import triformers.triton._common as common

    monkeypatch.setattr(
        common,
        "triton_unavailable_reason",
        lambda *t: "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 ...)",
    )
    x = torch.full((50, 50), 1.0, requires_grad=True)
    y = dropout(x, 0.5, torch.zeros(50), "relu")
    assert abs((y != 0).float().mean().item() - 0.5) < 0.05
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_grad", [True, False])
def test_whole_tiles_match_the_masked_path(device, bias_grad):
    """M % 64 == 0 and N a multiple of 8 lanes x lane block: the forward and the backward run without bounds
    masks (EVEN). Their bits and values equal those of the masked path (one row fewer) on the shared rows;
    the kept values are gelu(x + b) / (1 - p) and the gradients those of a float64 reference on the same
    mask (the backward's db partial sums, when the bias needs a gradient, also run whole)."""
    p = 0.25
    x = torch.randn(64, LANES * BLOCK_S_MAX, device=device, dtype=torch.float16, requires_grad=True)
    b = torch.randn(x.shape[1], device=device, dtype=torch.float16, requires_grad=bias_grad)
    dy = torch.randn_like(x)
    torch.manual_seed(11)
    y_even = dropout(x, p, b, "gelu")
    torch.manual_seed(11)
    y_masked = dropout(x[:63], p, b, "gelu")
    torch.testing.assert_close(y_even[:63], y_masked, atol=0, rtol=0)
    kept = y_even != 0
    assert 0.7 < kept.float().mean().item() < 0.8
    ref = torch.nn.functional.gelu(x.double() + b.double()) / (1 - effective_p(p))
    torch.testing.assert_close(y_even.double()[kept], ref[kept], atol=4e-3, rtol=4e-3)

    leaves = (x, b) if bias_grad else (x,)
    grads = torch.autograd.grad(y_even, leaves, dy)
    (gx_masked,) = torch.autograd.grad(y_masked, (x,), dy[:63])
    torch.testing.assert_close(grads[0][:63], gx_masked[:63], atol=0, rtol=0)
    xr, br = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y_ref = dropout_with_keep_mask(xr, _keep_mask(x.detach(), p, seed=11), p, br, "gelu")
    grads_ref = torch.autograd.grad(y_ref, (xr, br) if bias_grad else (xr,), dy.double())
    torch.testing.assert_close(grads[0].double(), grads_ref[0], atol=4e-3, rtol=4e-3)
    if bias_grad:
        torch.testing.assert_close(grads[1].double(), grads_ref[1], atol=2e-2, rtol=4e-3)
