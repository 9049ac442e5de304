"""tiled_matmul / tiled_matmul_out against the float64 matmul of the concatenated tiles: outputs and the gradient
of every tile, grids of 1 to 3 tiles per dim with odd, unequal tile sizes and tiles of differing strides."""

import pytest
import torch

from triformers.ops.tiled_matmul import tiled_matmul, tiled_matmul_out

# (atol, rtol) against float64 on the same inputs; sums of up to ~60 products of N(0, 1) values
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (1.5e-1, 2e-2),
}
GRIDS = {  # tile sizes ms, ns, ks
    "1x1x1": ([17], [3], [5]),
    "3x3x3": ([1, 17, 3], [3, 1, 17], [17, 3, 1]),
    "2x1x3": ([3, 1], [17], [1, 3, 17]),
}


def make_grid(rows, cols, dtype, transposed_every=0):
    """Random tiles; every `transposed_every`-th one is a column-major view (different strides)."""
    grid, n = [], 0
    for r in rows:
        row = []
        for c in cols:
            n += 1
            if transposed_every and n % transposed_every == 0:
                t = torch.randn(c, r, dtype=dtype).t()
            else:
                t = torch.randn(r, c, dtype=dtype)
            row.append(t.requires_grad_())
        grid.append(row)
    return grid


def dense(grid):
    return torch.cat([torch.cat(row, 1) for row in grid], 0)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("grid", list(GRIDS))
def test_forward_backward(grid, dtype):
    ms, ns, ks = GRIDS[grid]
    a, b = make_grid(ms, ks, dtype, transposed_every=2), make_grid(ks, ns, dtype, transposed_every=3)
    out = tiled_matmul(a, b)
    a_ref = dense(a).detach().double().requires_grad_()
    b_ref = dense(b).detach().double().requires_grad_()
    out_ref = a_ref @ b_ref
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(dense(out).double(), out_ref, atol=atol, rtol=rtol)
    assert all(t.dtype == dtype for row in out for t in row)

    grads = [[torch.randn_like(t) for t in row] for row in out]
    torch.autograd.backward([t for row in out for t in row], [g for row in grads for g in row])
    out_ref.backward(dense(grads).double())
    torch.testing.assert_close(dense([[t.grad for t in row] for row in a]).double(), a_ref.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(dense([[t.grad for t in row] for row in b]).double(), b_ref.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_out(grid):
    ms, ns, ks = GRIDS[grid]
    a, b = make_grid(ms, ks, torch.float32, 2), make_grid(ks, ns, torch.float32)
    out = [[torch.full((m, n), float("nan")) for n in ns] for m in ms]
    with torch.no_grad():
        tiled_matmul_out(a, b, out)
    torch.testing.assert_close(dense(out).double(), dense(a).double() @ dense(b).double(), atol=1e-4, rtol=1e-5)


def test_compile():
    a, b = make_grid([3, 5], [7], torch.float32), make_grid([7], [2, 3], torch.float32)
    got = torch.compile(tiled_matmul, backend="aot_eager", fullgraph=True)(a, b)
    torch.testing.assert_close(dense(got), dense(a) @ dense(b))


def test_errors():
    x = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"a is not a regular grid: its rows hold \[2, 1\] tiles"):
        tiled_matmul([[x, x], [x]], [[x.t()], [x.t()]])
    with pytest.raises(ValueError, match=r"a is a 1x2 grid of tiles and b a 1x1 grid"):
        tiled_matmul([[x, x]], [[x.t()]])
    with pytest.raises(ValueError, match=r"b\[0\]\[0\].shape=\(3, 3\) but its row and column of tiles need \(4, 3\)"):
        tiled_matmul([[x]], [[torch.ones(3, 3)]])
    with pytest.raises(ValueError, match=r"a\[0\]\[0\] must be a 2-D tensor, got shape=\(3,\)"):
        tiled_matmul([[torch.ones(3)]], [[x]])
    with pytest.raises(ValueError, match=r"b\[0\]\[0\] is torch.float16 on cpu but the first tile is torch.float32"):
        tiled_matmul([[x]], [[torch.ones(4, 2, dtype=torch.float16)]])
    with pytest.raises(ValueError, match=r"out\[0\]\[0\] is shape=\(3, 3\) torch.float32 on cpu; it must be \(3, 2\)"):
        tiled_matmul_out([[x]], [[torch.ones(4, 2)]], [[torch.empty(3, 3)]])
    with pytest.raises(ValueError, match=r"out must be a 1x1 grid"):
        tiled_matmul_out([[x]], [[torch.ones(4, 2)]], [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu(dtype):
    """Sequence-parallel sizes on the GPU: a 1x4 by 4x2 grid (the shards of a backward), against float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = [[torch.randn(4096, k, device="cuda", dtype=dtype) for k in (1000, 1024, 1000, 1024)]]
    b = [[torch.randn(k, n, device="cuda", dtype=dtype) * k**-0.5 for n in (2048, 1000)] for k in (1000, 1024) * 2]
    for row in a + b:
        for t in row:
            t.requires_grad_()
    out = tiled_matmul(a, b)
    ref = dense(a).float() @ dense(b).float()
    torch.testing.assert_close(dense(out).float(), ref, atol=0.25, rtol=2e-2)  # sums of 4048 bf16 products
    grads = [[torch.randn_like(t) for t in row] for row in out]
    torch.autograd.backward([t for row in out for t in row], [g for row in grads for g in row])
    ga_ref = dense(grads).float() @ dense(b).float().t()
    torch.testing.assert_close(dense([[t.grad for t in row] for row in a]).float(), ga_ref, atol=0.25, rtol=2e-2)
