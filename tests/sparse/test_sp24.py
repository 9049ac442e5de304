"""2:4 sparsity (``triformers.ops.sp24``) against masked dense float64 references; the dense fallback on the CPU."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from triformers.ops.common import InputError
from triformers.ops.sp24 import (
    Sparse24Tensor,
    sparse24_largest_mask_2d,
    sparseNM_dense,
    sparsify24,
    sparsify24_like,
    sparsify24_ste,
)

TOL = dict(atol=1e-10, rtol=1e-10)


def test_mask_keeps_two_largest_magnitudes_of_each_four():
    x = torch.randn(7, 24, dtype=torch.float64)
    mask = sparse24_largest_mask_2d(x).bool()
    groups = x.abs().unflatten(-1, (-1, 4))
    kept = mask.unflatten(-1, (-1, 4))
    assert torch.equal(kept.sum(-1), torch.full((7, 6), 2))
    smallest_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
    largest_pruned = groups.masked_fill(kept, float("-inf")).amax(-1)
    assert bool((smallest_kept >= largest_pruned).all())
    signed = sparseNM_dense(x, "largest", 2, 4).unflatten(-1, (-1, 4))
    assert bool((signed.ne(0).sum(-1) == 2).all())
    torch.testing.assert_close(signed.sum(-1), x.unflatten(-1, (-1, 4)).topk(2, -1).values.sum(-1))


@pytest.mark.parametrize("gradient", ["24sparse", "24dense", "ste"])
def test_linear_matmul_and_gradients(gradient):
    w = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU's dense fallback warns once
        s = sparsify24(w, gradient=gradient)
        mask = s.threads_masks
        y = F.linear(x, s, bias)
        d = torch.randn(16, 3, dtype=torch.float64)
        e = torch.randn(3, 12, dtype=torch.float64)
        p, q = s @ d, e @ s
    assert isinstance(s, Sparse24Tensor)
    w_ref, x_ref, b_ref = (t.detach().clone().requires_grad_() for t in (w, x, bias))
    w_masked = w_ref * mask
    y_ref = F.linear(x_ref, w_masked, b_ref)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(p, w_masked @ d, **TOL)
    torch.testing.assert_close(q, e @ w_masked, **TOL)
    g = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, [w, x, bias], g)
    gw_masked, gx, gb = torch.autograd.grad(y_ref, [w_masked, x_ref, b_ref], g)
    gw = gw_masked if gradient == "ste" else gw_masked * mask
    for a, b in zip(got, (gw, gx, gb)):
        torch.testing.assert_close(a, b, **TOL)


def _masked_2of4(x: torch.Tensor) -> torch.Tensor:
    """Independent 2:4 mask: the two largest magnitudes of each group of 4 (ties: the first ones)."""
    groups = x.abs().unflatten(-1, (-1, 4))
    top = groups.topk(2, -1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).flatten(-2)


@pytest.mark.parametrize("block", ["gelu", "relu", "swiglu", "swiglu-dense-gate"])
def test_mlp_with_sparse_activations_matches_masked_dense(block):
    # xFormers' MLPs on 2:4 activations: the hidden activations sparsified, the pointwise ops on the kept
    # entries, the second product Sparse @ dense; outputs and every gradient against the masked dense MLP
    torch.manual_seed(0)
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    w1, w2 = (torch.randn(16, 24, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w3 = torch.randn(24, 12, dtype=torch.float64, requires_grad=True)
    leaves = [x, w1, w2, w3] if block.startswith("swiglu") else [x, w1, w3]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU's dense fallback warns once
        h1 = sparsify24(x @ w1, gradient="24dense")
        if block == "gelu":
            a = F.gelu(h1)
        elif block == "relu":
            a = h1.relu()
        elif block == "swiglu":
            a = F.silu(h1) * sparsify24_like(x @ w2, h1, gradient="24dense")
        else:
            a = F.silu(h1) * (x @ w2)
        assert isinstance(a, Sparse24Tensor) and torch.equal(a.threads_masks, h1.threads_masks)
        out = a @ w3
    rx, rw1 = ref[0], ref[1]
    m = _masked_2of4((rx @ rw1).detach())
    h = (rx @ rw1) * m
    if block == "gelu":
        a_ref = F.gelu(h)
    elif block == "relu":
        a_ref = F.relu(h)
    else:
        a_ref = F.silu(h) * ((rx @ ref[2]) * m)
    out_ref = a_ref @ ref[-1]
    torch.testing.assert_close(out, out_ref, **TOL)
    g = torch.randn_like(out_ref)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(out_ref, ref, g)):
        torch.testing.assert_close(got, want, **TOL)


def test_pointwise_ops_that_would_fill_the_pattern_are_refused():
    s = sparsify24(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(NotImplementedError):
        torch.sigmoid(s)  # sigmoid(0) = 0.5
    with pytest.raises(NotImplementedError):
        s + torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(InputError, match="differs from the Sparse24Tensor"):
        s * torch.randn(1, 8, dtype=torch.float64)


def test_ste_scales_and_like():
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    s = sparsify24_ste(w, bw_mul0=0.5, bw_mul1=2.0)
    g = torch.randn(8, 8, dtype=torch.float64)
    (gw,) = torch.autograd.grad(s.values(), [w], g)
    torch.testing.assert_close(gw, g * torch.where(s.threads_masks, 2.0, 0.5))
    other = torch.randn(8, 8, dtype=torch.float64)
    like = sparsify24_like(other, s)
    assert isinstance(like, Sparse24Tensor) and torch.equal(like.threads_masks, s.threads_masks)
    dense = sparsify24_like(other, s, backend="dense")
    assert not isinstance(dense, Sparse24Tensor)
    torch.testing.assert_close(dense, other * s.threads_masks)
    assert sparsify24(s) is s


def test_errors():
    with pytest.raises(InputError, match="2-D"):
        sparsify24(torch.randn(2, 3, 8))
    with pytest.raises(InputError, match="multiple of 4"):
        sparsify24(torch.randn(4, 6))
    with pytest.raises(InputError, match="floating-point"):
        sparsify24(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(InputError, match="Unknown algorithm"):
        sparsify24(torch.randn(4, 8), algo="bogus")
    with pytest.raises(ValueError, match="Sparse24Tensor"):
        sparsify24_like(torch.randn(4, 8), torch.randn(4, 8))
    s = sparsify24(torch.randn(4, 8))
    with pytest.raises(NotImplementedError, match="Broadcasting"):
        s @ torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="not supported"):
        s @ s.t()


def test_dense_fallback_warns_once():
    s = sparsify24(torch.randn(64, 128, dtype=torch.float32))
    from triformers.triton import _common

    _common._warned.discard("triformers.ops.sp24: multiplying densely because 2:4 sparse GEMMs need a CUDA GPU "
                            "(tensor on cpu)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.linear(torch.randn(3, 128), s)
        F.linear(torch.randn(3, 128), s)
    messages = [str(w.message) for w in caught if "sp24" in str(w.message)]
    assert len(messages) == 1 and "CUDA" in messages[0]
