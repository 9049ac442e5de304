"""SparseCSRTensor against dense masked float64 references: torch's CSR kernels (float32/64), our Triton
SpMM/SDDMM (half precision, Triton's interpreter on the CPU) and the gather path (half precision, no Triton)."""

import copy

import pytest
import torch

from triformers.ops.common import InputError
from triformers.sparse import SparseCSRTensor, masked_matmul

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}
# (backend forced, dtype): which implementation each case reaches
CASES = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float16), ("torch", torch.float16)]
IDS = ["torch-csr-f64", "torch-csr-f32", "triton-f16", "gather-f16"]


@pytest.fixture(params=CASES, ids=IDS)
def dtype(request, monkeypatch):
    backend, dtype = request.param
    monkeypatch.setenv("TRIFORMERS_SPARSE_BACKEND", backend)
    return dtype


def random_mask(m=13, n=37):
    mask = torch.rand(m, n) < 0.3
    mask[4] = False  # an empty row
    mask[:, 5] = False  # an empty column
    mask[7] = True  # a long row (longer than one step of the kernels)
    return mask


def sparse_random(mask, B, dtype):
    x = SparseCSRTensor.from_dense(torch.randn(B, *mask.shape, dtype=dtype) * mask)
    v = x.values().detach().requires_grad_()
    return SparseCSRTensor._wrap(v, x._pattern), v


def test_spmm_dense_sparse_and_grads(dtype):
    B, K = 2, 19
    mask = random_mask()
    x, v = sparse_random(mask, B, dtype)
    d = torch.randn(B, 37, K, dtype=dtype, requires_grad=True)
    e = torch.randn(B, K, 13, dtype=dtype, requires_grad=True)
    dense_ref = x.to_dense().detach().double().requires_grad_()
    d_ref, e_ref = d.detach().double().requires_grad_(), e.detach().double().requires_grad_()
    y, z = x @ d, e @ x
    y_ref, z_ref = dense_ref @ d_ref, e_ref @ dense_ref
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    torch.testing.assert_close(z.double(), z_ref, **TOL[dtype])
    g = [torch.randn_like(y_ref), torch.randn_like(z_ref)]
    gv, gd, ge = torch.autograd.grad([y, z], [v, d, e], [t.to(dtype) for t in g])
    gdense, gd_ref, ge_ref = torch.autograd.grad([y_ref, z_ref], [dense_ref, d_ref, e_ref], g)
    torch.testing.assert_close(gd.double(), gd_ref, **TOL[dtype])
    torch.testing.assert_close(ge.double(), ge_ref, **TOL[dtype])
    torch.testing.assert_close(gv.double(), gdense[:, mask], **TOL[dtype])


def test_masked_matmul_sddmm_and_grads(dtype):
    B, K = 2, 70  # K over one chunk of the SDDMM kernel
    mask = random_mask()
    pattern, _ = sparse_random(mask, B, dtype)
    a = torch.randn(B, 13, K, dtype=dtype, requires_grad=True)
    b = torch.randn(B, K, 37, dtype=dtype, requires_grad=True)
    out = masked_matmul(a, b, pattern)
    assert isinstance(out, SparseCSRTensor)
    a_ref, b_ref = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = (a_ref @ b_ref) * mask
    torch.testing.assert_close(out.to_dense().double(), ref, **TOL[dtype])
    g = torch.randn_like(ref) * mask
    ga, gb = torch.autograd.grad(out.values(), [a, b], g[:, mask].to(dtype))
    ga_ref, gb_ref = torch.autograd.grad(ref, [a_ref, b_ref], g)
    torch.testing.assert_close(ga.double(), ga_ref, **TOL[dtype])
    torch.testing.assert_close(gb.double(), gb_ref, **TOL[dtype])


def test_softmax_and_grad(dtype):
    mask = random_mask()
    x, v = sparse_random(mask, 2, dtype)
    y = torch.softmax(x, dim=-1)
    dense_ref = x.to_dense().detach().double().requires_grad_()
    ref = torch.softmax(dense_ref.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(y.to_dense().double(), ref, **TOL[dtype])
    g = torch.randn_like(ref)
    (gv,) = torch.autograd.grad(y.values(), [v], g[:, mask].to(dtype))
    (gdense,) = torch.autograd.grad(ref, [dense_ref], g)
    torch.testing.assert_close(gv.double(), gdense[:, mask], **TOL[dtype])


def test_gradcheck_float64():
    mask = random_mask(8, 9)
    x, v = sparse_random(mask, 2, torch.float64)
    d = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)

    def f(v, d, a):
        s = SparseCSRTensor._wrap(v, x._pattern)
        att = masked_matmul(a, a.transpose(1, 2) @ s, s).softmax(-1)
        return att @ d, (s.t() @ a).sum(-1)

    assert torch.autograd.gradcheck(f, (v, d, a), fast_mode=True)


def test_pattern_tables_and_transpose():
    mask = random_mask()
    x, _ = sparse_random(mask, 2, torch.float64)
    counts = mask.sum(1)
    order = x._csr_row_indices.long()
    assert torch.equal(counts[order], counts.sort(descending=True).values)  # longest rows first
    assert x._csr_row_offsets.dtype == torch.int32
    torch.testing.assert_close(x.transpose(1, 2).to_dense(), x.to_dense().transpose(1, 2))
    torch.testing.assert_close(x.t().t().values(), x.values())
    row_indices_t, row_offsets_t, column_indices_t, perm = x._csr_transp_info
    assert row_offsets_t.numel() == 38 and perm.numel() == int(mask.sum())


def test_binary_ops_dropout_copy():
    mask = random_mask()
    x, _ = sparse_random(mask, 2, torch.float64)
    y = SparseCSRTensor.from_dense(torch.randn(2, 13, 37, dtype=torch.float64) * mask)
    torch.testing.assert_close((x + y).to_dense(), x.to_dense() + y.to_dense())
    torch.testing.assert_close((x * y).to_dense(), x.to_dense() * y.to_dense())
    torch.testing.assert_close((x * 3).to_dense(), x.to_dense() * 3)
    assert torch.equal((x & y).to_dense(), (x.to_dense() != 0) & (y.to_dense() != 0))
    other = SparseCSRTensor.from_dense(torch.randn(2, 13, 37, dtype=torch.float64) * random_mask())
    with pytest.raises(InputError, match="sparsity patterns"):
        x + other
    d = torch.nn.functional.dropout(x, 0.5)
    kept = d.values() != 0
    torch.testing.assert_close(d.values()[kept], 2 * x.values()[kept])
    assert torch.equal(copy.deepcopy(x.detach()), x.detach())
    module = torch.nn.Module()
    module.register_buffer("mask", x.detach())
    other_module = torch.nn.Module()
    other_module.register_buffer("mask", SparseCSRTensor._wrap(torch.zeros_like(x.values()), x._pattern))
    other_module.load_state_dict(module.state_dict())
    assert torch.equal(other_module.mask.values(), x.values())


def test_constructor_and_errors():
    mask = random_mask()
    x, _ = sparse_random(mask, 2, torch.float64)
    y = SparseCSRTensor(x._csr_row_offsets, x._csr_column_indices, x.values().detach(), (2, 13, 37))
    assert torch.equal(y.to_dense(), x.to_dense().detach())
    with pytest.raises(InputError, match="3-D"):
        SparseCSRTensor(x._csr_row_offsets, x._csr_column_indices, x.values(), (13, 37))
    with pytest.raises(InputError, match="do not describe"):
        SparseCSRTensor(x._csr_row_offsets, x._csr_column_indices, x.values(), (2, 12, 37))
    with pytest.raises(InputError, match="column_indices must lie"):
        SparseCSRTensor(x._csr_row_offsets, x._csr_column_indices, x.values(), (2, 13, 20))
    with pytest.raises(ValueError, match="same sparsity pattern"):
        SparseCSRTensor.from_dense(torch.randn(2, 4, 4) * (torch.rand(2, 4, 4) > 0.5))
    with pytest.raises(InputError, match="does not fit"):
        x @ torch.randn(2, 36, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="do not fit the mask"):
        masked_matmul(torch.randn(2, 13, 4, dtype=torch.float64), torch.randn(2, 4, 36, dtype=torch.float64), x)


def test_grad_property_of_a_leaf():
    mask = random_mask()
    x = SparseCSRTensor.from_dense(torch.randn(2, 13, 37, dtype=torch.float64) * mask).requires_grad_()
    d = torch.randn(2, 37, 3, dtype=torch.float64)
    (x @ d).sum().backward()
    assert isinstance(x.grad, SparseCSRTensor)
    want = torch.ones(2, 13, 3, dtype=torch.float64) @ d.transpose(1, 2)
    torch.testing.assert_close(x.grad.to_dense(), want * mask)
