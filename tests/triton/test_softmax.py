"""softmax / log_softmax (mask, causal) against a float64 reference: outputs and gradients of x and mask."""

import importlib

import pytest
import torch

from triformers._triton import can_run_triton
from triformers.triton import log_softmax, softmax
from triformers.triton._kernels.softmax import MAX_BLOCK_N
from triformers.triton.softmax import log_softmax_reference, softmax_reference

# (atol, rtol) per dtype against float64 on the same inputs (probabilities <= 1, log-probs >= ~-10).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),  # one fp16 rounding
    torch.bfloat16: (2e-2, 2e-2),  # one bf16 rounding (of log-probs up to ~10: 4e-2 absolute)
}
WIDTHS = [1, 3, 17, 129, 1000, MAX_BLOCK_N + 1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
sm_mod = importlib.import_module("triformers.triton.softmax")


@pytest.fixture(autouse=True)
def _no_torch_path(monkeypatch, request):
    if request.node.name.startswith("test_torch_path"):
        return

    def fail(*args, **kwargs):
        raise AssertionError("softmax took the pure-torch path")

    monkeypatch.setattr(sm_mod, "softmax_reference", fail)
    monkeypatch.setattr(sm_mod, "log_softmax_reference", fail)


def _check(fn, ref, x, mask=None, causal=False):
    assert can_run_triton(x)
    y = fn(x, mask, causal)
    dy = torch.randn_like(y)
    leaves = [t for t in (x, mask) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, leaves, dy)
    xr = x.detach().double().requires_grad_(x.requires_grad)
    mr = mask.detach().double().requires_grad_(mask.requires_grad) if mask is not None else None
    y_ref = ref(xr, mr, causal)
    grads_ref = torch.autograd.grad(y_ref, [t for t in (xr, mr) if t is not None and t.requires_grad], dy.double())
    assert y.shape == x.shape and y.dtype == x.dtype
    atol, rtol = TOL[x.dtype]
    if fn is log_softmax:
        atol *= 4  # log-probs reach ~-10: one rounding of those
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    for leaf, g, g_ref in zip(leaves, grads, grads_ref):
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g.double(), g_ref, atol=TOL[x.dtype][0] * 4, rtol=TOL[x.dtype][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("log", [False, True])
def test_plain(device, dtype, width, log):
    rows = 3 if width > 1000 else 6
    x = (torch.randn(rows, width, device=device) * 3).to(dtype).requires_grad_()
    fn, ref = (log_softmax, log_softmax_reference) if log else (softmax, softmax_reference)
    _check(fn, ref, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [17, 129])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_mask_and_causal_with_mask_gradient(device, width, log, causal):
    x = torch.randn(2, 3, 9, width, device=device, requires_grad=True)
    mask = torch.randn(9, width, device=device, requires_grad=True)
    fn, ref = (log_softmax, log_softmax_reference) if log else (softmax, softmax_reference)
    _check(fn, ref, x, mask, causal)
    _check(fn, ref, x, None, causal)


@pytest.mark.parametrize("device", DEVICES)
def test_looped_kernels_at_small_width(device, monkeypatch):
    import triformers.triton._kernels.softmax as k

    monkeypatch.setattr(k, "MAX_BLOCK_N", 8)
    x = torch.randn(2, 11, 37, device=device, requires_grad=True)
    mask = torch.randn(11, 37, device=device, requires_grad=True)
    for fn, ref in ((softmax, softmax_reference), (log_softmax, log_softmax_reference)):
        _check(fn, ref, x, mask, causal=True)
        _check(fn, ref, x, None, causal=False)


@pytest.mark.parametrize("device", DEVICES)
def test_strides_broadcast_mask_and_1d(device):
    x = torch.randn(5, 2 * 41, device=device)[:, ::2].requires_grad_()  # column stride 2
    mask = torch.randn(41, device=device).expand(5, 41)  # stride 0 rows
    _check(softmax, softmax_reference, x, mask)
    xt = torch.randn(41, 4, 3, device=device).transpose(0, 2).requires_grad_()  # [3, 4, 41], leading dims unmerged
    _check(log_softmax, log_softmax_reference, xt, torch.randn(1, 4, 41, device=device), causal=True)
    _check(softmax, softmax_reference, torch.randn(23, device=device, requires_grad=True), causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_hidden_row_matches_torch_nan(device):
    x = torch.randn(2, 5, device=device)
    mask = torch.zeros(2, 5, device=device)
    mask[1] = float("-inf")
    y = softmax(x, mask)
    assert torch.isnan(y[1]).all() and torch.isnan(torch.softmax(x + mask, -1)[1]).all()
    torch.testing.assert_close(y[0], torch.softmax(x[0], -1))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_returns_float32(device):
    x = torch.randn(4, 33, device=device, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = softmax(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), softmax_reference(x.detach().double()), atol=1e-6, rtol=1e-5)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_bad_arguments():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="additive"):
        softmax(x, torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="varies across the batch"):
        softmax(x, torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        softmax(x, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="floating"):
        log_softmax(torch.ones(3, dtype=torch.int32))


def test_torch_path_without_interpreter(monkeypatch, recwarn):
    import triformers.triton._common as common

    monkeypatch.setattr(
        common,
        "triton_unavailable_reason",
        lambda *t: "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 ...)",
    )
    x = torch.randn(4, 6)
    y = softmax(x, causal=True)
    torch.testing.assert_close(y, torch.softmax(x.masked_fill(torch.ones(4, 6).triu(1).bool(), float("-inf")), -1))
    assert not [w for w in recwarn if "pure-torch" in str(w.message)]
