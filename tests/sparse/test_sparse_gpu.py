"""The sparse kernels on a CUDA GPU: every block size and dtype against float64 references; 2:4 GEMMs on sm80+."""

import pytest
import torch
import torch.nn.functional as F

from triformers.sparse import BlockSparseTensor, SparseCSRTensor, masked_matmul

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

# relative to the reference's max magnitude; float32 inputs go through TF32 only when torch allows it (off here)
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def close(got, want, dtype):
    got, want = got.detach(), want.detach()
    err = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-6))
    assert err < TOL[dtype], f"max relative error {err:.3g} >= {TOL[dtype]}"


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("TRIFORMERS_SPARSE_BACKEND", "triton")
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_blocksparse_ops_and_grads(bs, dtype, causal):
    B, C, h, K = 2, 3, 5, 72  # K not a multiple of the sdd K step
    layout = (torch.rand(C, h, h) < 0.4).long()
    layout[0, 1] = 0  # an empty block-row
    layout[:, 0, 0] = 1
    layout = layout.cuda()
    keep = layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2).bool()
    a = torch.randn(B, C, h * bs, K, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(B, C, K, h * bs, device="cuda", dtype=dtype, requires_grad=True)
    d = torch.randn(B, C, h * bs, K, device="cuda", dtype=dtype, requires_grad=True)
    e = torch.randn(B, C, K, h * bs, device="cuda", dtype=dtype, requires_grad=True)
    mask = BlockSparseTensor(torch.empty(B, int(layout.sum()), bs, bs, device="cuda", dtype=dtype), layout)
    att = masked_matmul(a, b, mask).softmax(-1, causal=causal, scale=K**-0.5)
    y, z = att @ d, e @ att
    refs = [t.detach().double().requires_grad_() for t in (a, b, d, e)]
    ra, rb, rd, re = refs
    if causal:
        keep = keep & torch.ones(h * bs, h * bs, device="cuda").tril().bool()
    ratt = torch.softmax(((ra @ rb) * K**-0.5).masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    ry, rz = ratt @ rd, re @ ratt
    close(y, ry, dtype)
    close(z, rz, dtype)
    gy, gz = torch.randn_like(ry), torch.randn_like(rz)
    grads = torch.autograd.grad([y, z], [a, b, d, e], [gy.to(dtype), gz.to(dtype)])
    rgrads = torch.autograd.grad([ry, rz], refs, [gy, gz])
    for g, r in zip(grads, rgrads):
        close(g, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_csr_ops_and_grads(dtype):
    B, m, n, K = 3, 300, 257, 40
    pattern = torch.rand(m, n, device="cuda") < 0.1
    pattern[5] = False
    pattern[7] = True
    x = SparseCSRTensor.from_dense(torch.randn(B, m, n, device="cuda", dtype=dtype) * pattern)
    v = x.values().detach().requires_grad_()
    x = SparseCSRTensor._wrap(v, x._pattern)
    # logits of order 1 (as attention scales them): bf16's rounding of larger ones would swamp the comparison
    a = (torch.randn(B, m, K, device="cuda") * K**-0.5).to(dtype).requires_grad_()
    b = torch.randn(B, K, n, device="cuda", dtype=dtype, requires_grad=True)
    d = torch.randn(B, n, K, device="cuda", dtype=dtype, requires_grad=True)
    out = (masked_matmul(a, b, x) * x).softmax(-1) @ d
    refs = [t.detach().double().requires_grad_() for t in (v, a, b, d)]
    rv, ra, rb, rd = refs
    dense_x = torch.zeros(B, m, n, device="cuda", dtype=torch.float64)
    dense_x[:, pattern] = rv
    att = ((ra @ rb) * dense_x).masked_fill(~pattern, float("-inf"))
    ref = torch.softmax(att, -1).nan_to_num(0.0) @ rd
    close(out, ref, dtype)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, [v, a, b, d], g.to(dtype)), torch.autograd.grad(ref, refs, g)):
        close(got, want, dtype)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0), reason="sm80+")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sp24_linear_on_the_sparse_kernels(dtype, recwarn):
    from triformers.ops.sp24 import sparsify24

    w = torch.randn(256, 512, device="cuda", dtype=dtype, requires_grad=True)
    x = torch.randn(3, 40, 512, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(256, device="cuda", dtype=dtype)
    w24 = sparsify24(w, gradient="24dense")
    y = F.linear(x, w24, bias)
    assert not [r for r in recwarn if "sp24" in str(r.message)], "the 2:4 kernels did not run"
    rw, rx = w.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    masked = rw * w24.threads_masks
    ref = F.linear(rx, masked, bias.double())
    close(y, ref, dtype)
    g = torch.randn_like(ref)
    gw, gx = torch.autograd.grad(y, [w, x], g.to(dtype))
    rgw, rgx = torch.autograd.grad(ref, [masked, rx], g)
    close(gw, rgw * w24.threads_masks, dtype)
    close(gx, rgx, dtype)
