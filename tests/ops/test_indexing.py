"""scaled_index_add / index_select_cat against float64 references: outputs and every gradient."""

import importlib

import pytest
import torch

from triformers._triton import can_run_triton
from triformers.ops import index_select_cat, scaled_index_add
from triformers.ops.indexing import index_select_cat_reference, scaled_index_add_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 2e-2)}
# grad_scaling sums over Bi x M products in float32, then rounds once
SCALING_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-2, 4e-3), torch.bfloat16: (4e-1, 2e-2)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
idx_mod = importlib.import_module("triformers.ops.indexing")


@pytest.fixture(autouse=True)
def _no_torch_path(monkeypatch, request):
    if request.node.name.startswith("test_torch_path"):
        return

    def fail(*args, **kwargs):
        raise AssertionError("took the pure-torch path")

    monkeypatch.setattr(idx_mod, "scaled_index_add_reference", fail)
    monkeypatch.setattr(idx_mod, "index_select_cat_reference", fail)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 1, 1), (7, 3, 17), (9, 17, 129), (5, 2, 1000)])
@pytest.mark.parametrize("with_scaling", [True, False])
def test_scaled_index_add(device, dtype, shape, with_scaling):
    B, M, D = shape
    index = torch.randperm(B, device=device)[: B // 2 + 1]
    inp0 = torch.randn(B, M, D, device=device).to(dtype)
    src = torch.randn(len(index), M, D, device=device).to(dtype).requires_grad_()
    scaling = torch.randn(D, device=device).to(dtype).requires_grad_() if with_scaling else None
    leaf = inp0.clone().requires_grad_()
    work = leaf * 1  # updated in place
    assert can_run_triton(work)
    out = scaled_index_add(work, index, src, scaling, alpha=0.73)
    assert out is work
    dy = torch.randn_like(out)
    wants = [leaf, src] + ([scaling] if with_scaling else [])
    grads = torch.autograd.grad(out, wants, dy)
    ref = [t.detach().double().requires_grad_() for t in wants]
    work_ref = ref[0] * 1
    out_ref = ref_sia(work_ref, index, ref[1], ref[2] if with_scaling else None, alpha=0.73)
    grads_ref = torch.autograd.grad(out_ref, ref, dy.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), out_ref, atol=atol, rtol=rtol)
    for k, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        tol = SCALING_TOL[dtype] if k == 2 else TOL[dtype]
        torch.testing.assert_close(g.double(), g_ref, atol=tol[0] * max(1, M**0.5), rtol=tol[1])


ref_sia = scaled_index_add_reference
ref_isc = index_select_cat_reference


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_index_add_strided_inputs_and_inference(device):
    inp = torch.randn(5, 9, 40, device=device).transpose(1, 2)  # [5, 40, 9], non-contiguous
    src = torch.randn(2, 9, 40, device=device).transpose(1, 2)
    index = torch.tensor([4, 1], device=device, dtype=torch.int32)
    expected = inp.clone().index_add_(0, index, src, alpha=2.0)
    with torch.no_grad():
        scaled_index_add(inp, index, src, None, alpha=2.0)
    torch.testing.assert_close(inp, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_select_cat(device, dtype):
    sources = [
        torch.randn(10, 17, device=device).to(dtype).requires_grad_(),
        torch.randn(6, 3, 43, device=device).to(dtype).requires_grad_(),  # trailing dims flattened
        torch.randn(200, 129, device=device).to(dtype)[:, ::2].detach().requires_grad_(),  # strided
    ]
    indices = [
        torch.tensor([9, 0, 3, 3], device=device),  # repeats allowed
        torch.tensor([5], device=device, dtype=torch.int32),
        torch.randperm(200, device=device)[:37],
    ]
    out = index_select_cat(sources, indices)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, sources, dy)
    ref = [s.detach().double().requires_grad_() for s in sources]
    out_ref = ref_isc(ref, indices)
    grads_ref = torch.autograd.grad(out_ref, ref, dy.double())
    torch.testing.assert_close(out.double(), out_ref, atol=0, rtol=0)  # a gather is exact
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=TOL[dtype][0] * 2, rtol=TOL[dtype][1])


def test_bad_arguments():
    inp, src = torch.randn(4, 3, 8), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="3-D"):
        scaled_index_add(inp[0], torch.tensor([0, 1]), src)
    with pytest.raises(ValueError, match="dims 1 and 2"):
        scaled_index_add(inp, torch.tensor([0, 1]), torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="entries"):
        scaled_index_add(inp, torch.tensor([0, 1, 2]), src)
    with pytest.raises(ValueError, match="int32/int64"):
        scaled_index_add(inp, torch.tensor([0.0, 1.0]), src)
    with pytest.raises(ValueError, match=r"scaling.shape=\(7,\)"):
        scaled_index_add(inp, torch.tensor([0, 1]), src, torch.randn(7))
    with pytest.raises(ValueError, match="more rows"):
        scaled_index_add(inp[:1], torch.tensor([0, 1]), src)
    with pytest.raises(ValueError, match="one index per source"):
        index_select_cat([torch.randn(3, 2)], [])


def test_torch_path_without_interpreter(monkeypatch):
    import triformers.triton._common as common

    monkeypatch.setattr(
        common,
        "triton_unavailable_reason",
        lambda *t: "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 ...)",
    )
    inp, src = torch.randn(4, 3, 8), torch.randn(2, 3, 8)
    index = torch.tensor([3, 3])  # repeats: fine on the torch path
    expected = inp.clone().index_add_(0, index, src * 2)
    torch.testing.assert_close(scaled_index_add(inp, index, src, torch.full((8,), 2.0)), expected)
    s = torch.randn(5, 4)
    torch.testing.assert_close(index_select_cat([s], [torch.tensor([1, 4])]), s[[1, 4]].flatten())
