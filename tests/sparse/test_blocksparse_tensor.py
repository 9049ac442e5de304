"""BlockSparseTensor against dense masked float64 references, on the torch path and on the Triton kernels
(Triton's interpreter on the CPU)."""

import copy

import pytest
import torch

from triformers.ops.common import InputError
from triformers.sparse import BlockSparseTensor, masked_matmul

# torch path in float64: exact up to summation order; Triton kernels in float32 / float16 (fp32 accumulation)
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=2e-2, rtol=2e-2)}
# (backend, dtype, block size): the interpreter is slow, so each Triton case runs one block size
CASES = [("torch", torch.float64, 16), ("torch", torch.float64, 32), ("triton", torch.float32, 16),
         ("triton", torch.float16, 32)]


@pytest.fixture(params=CASES, ids=[f"{p}-{str(d)[6:]}-bs{bs}" for p, d, bs in CASES])
def path(request, monkeypatch):
    backend, dtype, bs = request.param
    monkeypatch.setenv("TRIFORMERS_SPARSE_BACKEND", backend)
    return dtype, bs


def odd_layout(C=2, h=3, w=5, density=0.5):
    """Random 0/1 layout with an empty block-row and an empty block-column in channel 0."""
    layout = (torch.rand(C, h, w) < density).long()
    layout[0, 1, :] = 0
    layout[0, :, 2] = 0
    layout[-1, 0, 0] = 1
    return layout


def expand(layout, bs):
    return layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2).bool()  # [C, M, N]


def nan_padded(shape, dtype, pad=3):
    """A tensor of ``shape`` viewed out of a NaN-filled buffer with ``pad`` extra columns (never to be read)."""
    buf = torch.full((*shape[:-1], shape[-1] + pad), float("nan"), dtype=dtype)
    view = buf[..., : shape[-1]]
    view.copy_(torch.randn(shape, dtype=dtype))
    return view


def sparse_random(layout, bs, B, dtype):
    v = torch.randn(B, int(layout.sum()), bs, bs, dtype=dtype, requires_grad=True)
    return BlockSparseTensor(v, layout), v


def dense_masked_softmax(x, keep):
    s = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
    return s.nan_to_num(0.0)


def check_grads(outs, refs, inputs, ref_inputs, tol):
    g = [torch.randn_like(r) for r in refs]
    got = torch.autograd.grad(outs, inputs, g)
    want = torch.autograd.grad(refs, ref_inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **tol)


def test_dsd_dds_and_grads(path):
    dtype, bs = path
    B, K = 2, 17
    layout = odd_layout()
    x, v = sparse_random(layout, bs, B, dtype)
    d = nan_padded((B, 2, 5 * bs, K), dtype).requires_grad_()
    e = nan_padded((B, 2, K, 3 * bs), dtype).requires_grad_()
    dense_ref = x.to_dense().detach().double().requires_grad_()
    d_ref, e_ref = d.detach().double().requires_grad_(), e.detach().double().requires_grad_()
    y, z = x @ d, e @ x
    y_ref, z_ref = dense_ref @ d_ref, e_ref @ dense_ref
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(z.double(), z_ref, **tol)
    g = [torch.randn_like(y_ref), torch.randn_like(z_ref)]
    gv, gd, ge = torch.autograd.grad([y, z], [v, d, e], [t.to(dtype) for t in g])
    gdense, gd_ref, ge_ref = torch.autograd.grad([y_ref, z_ref], [dense_ref, d_ref, e_ref], g)
    torch.testing.assert_close(gd.double(), gd_ref, **tol)
    torch.testing.assert_close(ge.double(), ge_ref, **tol)
    gv_ref = BlockSparseTensor.from_dense(gdense, layout).values()  # the gradient lives on the stored blocks only
    torch.testing.assert_close(gv.double(), gv_ref, **tol)


def test_masked_matmul_sdd_and_grads(path):
    dtype, bs = path
    B, K = 2, 20
    layout = odd_layout()
    mask = BlockSparseTensor(torch.zeros(B, int(layout.sum()), bs, bs, dtype=dtype), layout)
    a = nan_padded((B, 2, 3 * bs, K), dtype).requires_grad_()
    b = torch.randn(B, 2, K, 5 * bs, dtype=dtype).requires_grad_()
    out = masked_matmul(a, b, mask)
    assert isinstance(out, BlockSparseTensor)
    a_ref, b_ref = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    keep = expand(layout, bs)
    ref = (a_ref @ b_ref) * keep
    torch.testing.assert_close(out.to_dense().double(), ref, **TOL[dtype])
    g = torch.randn_like(ref) * keep
    ga, gb = torch.autograd.grad(out.values(), [a, b], BlockSparseTensor.from_dense(g.to(dtype), layout).values())
    ga_ref, gb_ref = torch.autograd.grad(ref, [a_ref, b_ref], g)
    torch.testing.assert_close(ga.double(), ga_ref, **TOL[dtype])
    torch.testing.assert_close(gb.double(), gb_ref, **TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_and_grad(path, causal):
    dtype, bs = path
    B = 2
    layout = odd_layout(h=4, w=4)
    layout[1, 2, :3] = 0  # a row whose only blocks lie above the diagonal: nothing visible when causal
    layout[1, 2, 3] = 1
    x, v = sparse_random(layout, bs, B, dtype)
    scale = 0.7
    y = x.softmax(-1, causal=causal, scale=scale)
    dense_ref = x.to_dense().detach().double().requires_grad_()
    keep = expand(layout, bs)
    if causal:
        keep = keep & torch.ones(4 * bs, 4 * bs).tril().bool()
    ref = dense_masked_softmax(dense_ref * scale, keep)
    torch.testing.assert_close(y.to_dense().double(), ref, **TOL[dtype])
    g = torch.randn_like(ref)
    (gv,) = torch.autograd.grad(y.values(), [v], BlockSparseTensor.from_dense(g.to(dtype), layout).values())
    (gdense,) = torch.autograd.grad(ref, [dense_ref], g)
    torch.testing.assert_close(gv.double(), BlockSparseTensor.from_dense(gdense, layout).values(), **TOL[dtype])


def test_torch_softmax_entry_points(monkeypatch):
    monkeypatch.setenv("TRIFORMERS_SPARSE_BACKEND", "torch")
    x, _ = sparse_random(odd_layout(), 16, 2, torch.float64)
    for y in (torch.softmax(x, -1), torch.nn.functional.softmax(x, dim=-1), x.softmax(dim=-1)):
        assert isinstance(y, BlockSparseTensor)
        torch.testing.assert_close(y.values(), x.softmax(-1).values())


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_kernels_every_block_size(bs, monkeypatch):
    monkeypatch.setenv("TRIFORMERS_SPARSE_BACKEND", "triton")
    layout = torch.tensor([[[1, 0], [1, 1]]])
    x, _ = sparse_random(layout, bs, 1, torch.float32)
    d = torch.randn(1, 1, 2 * bs, 16)
    dense = x.to_dense().detach().double()
    torch.testing.assert_close((x @ d).double(), dense @ d.double(), **TOL[torch.float32])
    a, b = torch.randn(1, 1, 2 * bs, 16), torch.randn(1, 1, 16, 2 * bs)
    got = masked_matmul(a, b, x).to_dense().double()
    torch.testing.assert_close(got, (a.double() @ b.double()) * expand(layout, bs), **TOL[torch.float32])
    keep = expand(layout, bs) & torch.ones(2 * bs, 2 * bs).tril().bool()
    ref = dense_masked_softmax(dense, keep)
    torch.testing.assert_close(x.softmax(-1, causal=True).to_dense().double(), ref, **TOL[torch.float32])


def test_gradcheck_torch_path(monkeypatch):
    monkeypatch.setenv("TRIFORMERS_SPARSE_BACKEND", "torch")
    layout = torch.tensor([[[1, 0], [1, 1]]])
    v = torch.randn(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    d = torch.randn(1, 1, 32, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(1, 1, 3, 32, dtype=torch.float64, requires_grad=True)

    def f(v, d, e):
        x = BlockSparseTensor(v, layout)
        s = masked_matmul(e.transpose(-2, -1), d.transpose(-2, -1), x).softmax(-1, causal=True, scale=0.5)
        return (s @ d, e @ x, x.transpose(-2, -1).to_dense())

    assert torch.autograd.gradcheck(f, (v, d, e), fast_mode=True)


def test_transpose_scale_add_dropout_roundtrip():
    layout = odd_layout()
    x, v = sparse_random(layout, 16, 2, torch.float64)
    dense = x.to_dense()
    torch.testing.assert_close(x.transpose(-2, -1).to_dense(), dense.transpose(-2, -1))
    torch.testing.assert_close(x.t().t().values(), x.values())
    torch.testing.assert_close((x * 3).to_dense(), 3 * dense)
    torch.testing.assert_close((2 * x).to_dense(), 2 * dense)
    torch.testing.assert_close((x / 4).to_dense(), dense / 4)
    torch.testing.assert_close((x + x * 2).to_dense(), 3 * dense)
    d = torch.randn(dense.shape, dtype=torch.float64, requires_grad=True)
    prod = d * x  # a dense factor is read at the stored entries: the masked elementwise product
    assert isinstance(prod, BlockSparseTensor)
    torch.testing.assert_close(prod.to_dense(), dense * d.detach())
    g = torch.randn(prod.values().shape, dtype=torch.float64)
    (gd,) = torch.autograd.grad(prod.values(), d, g)
    torch.testing.assert_close(gd, BlockSparseTensor(g, layout).to_dense() * dense)
    torch.testing.assert_close(BlockSparseTensor.from_dense(dense, layout).values(), x.values())
    y = torch.nn.functional.dropout(x, p=0.5, training=True)
    kept = y.values() != 0
    torch.testing.assert_close(y.values()[kept], 2 * x.values()[kept])
    assert 0.3 < kept.double().mean() < 0.7
    assert torch.equal(torch.nn.functional.dropout(x, p=0.5, training=False).values(), x.values())


def test_copy_deepcopy_module_buffer_state_dict():
    layout = odd_layout()
    x, _ = sparse_random(layout, 16, 2, torch.float64)
    x = x.detach()
    assert torch.equal(copy.deepcopy(x), x)
    module = torch.nn.Module()
    module.register_buffer("mask", x)
    module = module.to(torch.device("cpu"))
    state = module.state_dict()
    other = torch.nn.Module()
    other.register_buffer("mask", BlockSparseTensor(torch.zeros_like(x.values()), layout))
    other.load_state_dict(state)
    assert torch.equal(other.mask.values(), x.values())


def test_errors():
    layout = odd_layout()
    nnz = int(layout.sum())
    with pytest.raises(InputError, match="stored blocks"):
        BlockSparseTensor(torch.randn(1, nnz + 1, 16, 16), layout)
    with pytest.raises(InputError, match="Minimum|minimum"):
        BlockSparseTensor(torch.randn(1, nnz, 8, 8), layout)
    with pytest.raises(InputError, match="0/1|0 and 1"):
        BlockSparseTensor(torch.randn(1, nnz, 16, 16), layout * 2)
    with pytest.raises(InputError, match="block size"):
        BlockSparseTensor.from_dense(torch.randn(1, 2, 50, 80), layout)  # 50 / 3 rows: no block size fits
    with pytest.raises(InputError, match="does not match layout"):
        BlockSparseTensor.from_dense(torch.randn(1, 2, 48, 64), layout)  # 48/3 = 16 but 64/5 is not
    x, _ = sparse_random(layout, 16, 2, torch.float32)
    with pytest.raises(InputError, match="K=80"):
        x @ torch.randn(2, 2, 64, 4)
    with pytest.raises(InputError, match="float64"):
        x @ torch.randn(2, 2, 80, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="does not fit the mask"):
        masked_matmul(torch.randn(2, 2, 40, 4), torch.randn(2, 2, 4, 80), x)
    with pytest.raises(InputError, match="dim=-1"):
        x.softmax(dim=2)
    with pytest.raises(NotImplementedError, match="to_dense"):
        torch.exp(x)


def test_grad_property_of_a_leaf(monkeypatch):
    monkeypatch.setenv("TRIFORMERS_SPARSE_BACKEND", "torch")
    layout = odd_layout()
    x = BlockSparseTensor(torch.randn(2, int(layout.sum()), 16, 16, dtype=torch.float64), layout).requires_grad_()
    d = torch.randn(2, 2, 80, 3, dtype=torch.float64)
    (x @ d).sum().backward()
    assert isinstance(x.grad, BlockSparseTensor)
    want = torch.ones(2, 2, 48, 3, dtype=torch.float64) @ d.transpose(-2, -1)  # d sum(S @ d) / dS = 1 @ dᵀ
    torch.testing.assert_close(x.grad.to_dense(), want * expand(layout, 16))
