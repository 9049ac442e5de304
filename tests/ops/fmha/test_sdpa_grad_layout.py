"""Gradients through ``fmha.sdpa`` do not depend on the layout of the incoming gradient.

torch's cuDNN SDPA backward (torch 2.11, H200) returned wrong dQ/dK/dV when the output's gradient had other
strides than the output; ``_sdpa_backends._GradInOutputStrides`` hands it on in the output's strides."""

import pytest
import torch
import torch.nn.functional as F

from triformers.ops import fmha
from triformers.ops.fmha import _sdpa_backends


def test_gradient_reaches_the_output_in_its_strides():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    y = x.transpose(1, 2)  # strides of a [B, H, M, K] view of [B, M, H, K] data
    seen = []
    y.register_hook(seen.append)
    z = _sdpa_backends._GradInOutputStrides.apply(y)
    for g in (torch.randn(z.shape, dtype=torch.float64), torch.ones(()).expand(z.shape).double()):
        (gx,) = torch.autograd.grad(z, x, g, retain_graph=True)
        assert seen[-1].stride() == y.stride() and torch.equal(seen[-1], g)
        assert torch.equal(gx, g.transpose(1, 2))
    same = torch.empty_strided(y.shape, y.stride(), dtype=torch.float64).normal_()
    torch.autograd.grad(z, x, same)
    assert seen[-1].data_ptr() == same.data_ptr()  # already in the output's strides: no copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("inputs", ["bmhk", "transposed"])
@pytest.mark.parametrize("grad", ["bmhk", "bhmk", "expanded"])
def test_sdpa_gradients_whatever_the_gradient_layout(inputs, grad):
    torch.manual_seed(0)
    B, M, H, K = 2, 384, 8, 64
    base = [torch.randn(B, H, M, K, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    if inputs == "bmhk":
        leaves = [x.transpose(1, 2).contiguous().requires_grad_() for x in base]
        args = leaves
    else:  # [B, H, M, K] tensors handed over transposed, as a multi-head layer may
        leaves = [x.clone().requires_grad_() for x in base]
        args = [x.transpose(1, 2) for x in leaves]
    out = fmha.memory_efficient_attention(*args, op=(fmha.sdpa.FwOp, fmha.sdpa.BwOp))
    g = torch.randn(B, M, H, K, device="cuda", dtype=torch.bfloat16)
    if grad == "bhmk":
        g = g.transpose(1, 2).contiguous().transpose(1, 2)
    elif grad == "expanded":
        g = torch.ones((), device="cuda", dtype=torch.bfloat16).expand(B, M, H, K)
    got = torch.autograd.grad(out, leaves, g)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_args = ref_leaves if inputs == "bmhk" else [x.transpose(1, 2) for x in ref_leaves]
    ref_out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in ref_args)).transpose(1, 2)
    want = torch.autograd.grad(ref_out, ref_leaves, g.double())
    for name, a, b in zip("qkv", got, want):
        err = (a.double() - b).abs().max().item()
        assert err < 2e-2, f"d{name}: max error {err:.3g}"
