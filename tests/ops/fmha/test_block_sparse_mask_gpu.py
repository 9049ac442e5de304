"""BlockSparseMask on the GPU: our Triton kernels (fp16, bf16, fp32) at sizes with many tiles against a float64
dense reference (output, lse, every gradient): block sizes finer and coarser than the kernel tiles, odd lengths,
per-head and shared layouts, BMGHK with shared K/V heads, causal, empty rows; the blocksparse component and a
sparsity config on CUDA; torch.compile."""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TRITON = (fmha.triton.FwOp, fmha.triton.BwOp)
# errors against float64, scaled by the largest reference value; fp32 runs with TF32 off (IEEE products)
ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_ATOL = {torch.float32: 5e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


def reference(q, k, v, mask):
    qd, kd, vd = (x.double().movedim(1, -2) for x in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    ok = mask.materialize(s.shape, dtype=torch.float64, device=q.device) == 0
    p = torch.softmax(torch.where(ok, s, -1e300), dim=-1) * ok
    lse = torch.logsumexp(torch.where(ok, s, -math.inf), dim=-1)
    return (p @ vd).movedim(-2, 1), lse


def _assert_close(got, want, atol):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=0)


CASES = [  # (block_size, Mq, Mkv, per-head layout, causal, BMGHK, gqa)
    (16, 1000, 777, True, False, False, False),
    (48, 517, 1029, False, True, False, False),
    (64, 1029, 1029, True, True, True, True),
    (128, 2048 + 77, 1500, True, False, False, False),
    ((16, 64), 700, 1100, False, True, True, False),
    ((128, 32), 1300, 901, True, True, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_dense_reference(head_dim, dtype, case):
    block, Mq, Mkv, per_head, causal, bmghk, gqa = case
    torch.manual_seed(0)
    B, G, H = 2, 2, 3
    heads = (G, H) if bmghk else (G * H,)
    q = torch.randn(B, Mq, *heads, head_dim, device="cuda", dtype=dtype)
    kv_heads = (G, 1) if gqa else heads
    k, v = (torch.randn(B, Mkv, *kv_heads, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    if gqa:
        k, v = k.expand(B, Mkv, G, H, head_dim), v.expand(B, Mkv, G, H, head_dim)
    leaves = [q.requires_grad_(), *(x if x.is_leaf else x._base for x in (k, v))]
    for x in leaves[1:]:
        x.requires_grad_()
    bq, bk = (block, block) if isinstance(block, int) else block
    layout = torch.rand(G * H if per_head else 1, -(-Mq // bq), -(-Mkv // bk), device="cuda") < 0.4
    layout[0, 2] = False  # a query block that sees nothing
    mask = ab.BlockSparseMask(layout, block, causal=causal)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, lse = fmha.memory_efficient_attention_partial(q, k, v, mask, op=TRITON, output_dtype=dtype)
        ref, ref_lse = reference(q, k, v, mask)
        _assert_close(out, ref, ATOL[dtype])
        torch.testing.assert_close(lse.double(), ref_lse.reshape(lse.shape), atol=1e-3, rtol=1e-3)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, g)
        ref_grads = torch.autograd.grad(ref, leaves, g.double())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        _assert_close(a, b, GRAD_ATOL[dtype])


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=["per-head", "per-head-gqa", "shared"])
def test_chunked_operator_on_cuda(case):
    """The pure-PyTorch operator's block-sparse paths (per-head gathers, shared-layout gathers) on CUDA tensors,
    float32, every gradient."""
    block, Mq, Mkv, per_head, causal, bmghk, gqa = case
    torch.manual_seed(1)
    B, G, H, D = 1, 2, 3, 64
    heads = (G, H) if bmghk else (G * H,)
    q = torch.randn(B, Mq, *heads, D, device="cuda", requires_grad=True)
    kv_heads = (G, 1) if gqa else heads
    kb, vb = (torch.randn(B, Mkv, *kv_heads, D, device="cuda", requires_grad=True) for _ in range(2))
    k, v = (x.expand(B, Mkv, G, H, D) for x in (kb, vb)) if gqa else (kb, vb)
    bq, bk = (block, block) if isinstance(block, int) else block
    layout = torch.rand(G * H if per_head else 1, -(-Mq // bq), -(-Mkv // bk), device="cuda") < 0.4
    mask = ab.BlockSparseMask(layout, block, causal=causal)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = fmha.memory_efficient_attention(q, k, v, mask, op=(fmha.chunked.FwOp, fmha.chunked.BwOp))
        ref, _ = reference(q, k, v, mask)
        _assert_close(out, ref, ATOL[torch.float32])
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, kb, vb), g)
        ref_grads = torch.autograd.grad(ref, (q, kb, vb), g.double())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for a, b in zip(grads, ref_grads):
        _assert_close(a, b, GRAD_ATOL[torch.float32])


def test_empty_layout_gives_zeros():
    q, k, v = (torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = ab.BlockSparseMask(torch.zeros(1, 3, 3, dtype=torch.bool, device="cuda"), 128)
    out, lse = fmha.memory_efficient_attention_partial(q, k, v, mask, op=TRITON, output_dtype=torch.bfloat16)
    assert (out == 0).all() and torch.isneginf(lse).all()
    for g in torch.autograd.grad(out, (q, k, v), torch.randn_like(out)):
        assert (g == 0).all()


def test_component_and_sparsity_config_on_cuda():
    from triformers.components.attention import build_attention
    from triformers.components.attention import sparsity_config as sc

    layout = sc.BigBirdSparsityConfig(8, 64, different_layout_per_head=True).make_layout(1024)
    att = build_attention({"name": "blocksparse", "dropout": 0.0, "layout": layout, "block_size": 64}).cuda()
    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = att(q, k, v)
    ref, _ = reference(*(x.transpose(1, 2) for x in (q, k, v)), att.mask)
    _assert_close(out, ref.transpose(1, 2), ATOL[torch.float16])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref.transpose(1, 2), (q, k, v), g)):
        _assert_close(a, b, GRAD_ATOL[torch.float16])


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 512, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = ab.BlockSparseMask(torch.rand(4, 4, 4, device="cuda") < 0.5, 128, causal=True)

    def f(q, k, v):
        return fmha.memory_efficient_attention(q, k, v, mask, op=TRITON)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(compiled, (q, k, v), g), torch.autograd.grad(eager, (q, k, v), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("head_dim, gqa", [(128, False), (64, True)], ids=["D128", "D64-gqa"])
def test_heavy_first_order_on_cuda(monkeypatch, head_dim, gqa):
    """A BigBird layout (global blocks: heavy rows and columns): forward, dQ and dK/dV launch heavy programs
    first; outputs and gradients equal those of the natural order bit for bit and match the reference."""
    from triformers.components.attention import sparsity_config as sc
    from triformers.ops.fmha._triton import launch

    used = []
    heavy_first = launch.heavy_first
    monkeypatch.setattr(launch, "heavy_first", lambda *a: used.append((a[6], heavy_first(*a))) or used[-1][1])
    torch.manual_seed(0)
    B, N, G, H = 2, 2048, 2, 2
    layout = sc.BigBirdSparsityConfig(G * H, 128, different_layout_per_head=True).make_layout(N).cuda()
    q = torch.randn(B, N, G, H, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = (G, 1) if gqa else (G, H)
    kb, vb = (torch.randn(B, N, *kv, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(2))
    k, v = (x.expand(B, N, G, H, head_dim) for x in (kb, vb))
    mask = ab.BlockSparseMask(layout, 128)
    g = torch.randn_like(q)
    results = []
    for on in (True, False):
        monkeypatch.setattr(launch, "HEAVY_FIRST", on)
        out = fmha.memory_efficient_attention(q, k, v, mask, op=TRITON)
        results.append((out, *torch.autograd.grad(out, (q, kb, vb), g)))
    assert {t for t, order in used if order is not None} == {False, True}
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref, _ = reference(q, k, v, mask)
    _assert_close(results[0][0], ref, ATOL[torch.bfloat16])
    for a, b in zip(results[0][1:], torch.autograd.grad(ref, (q, kb, vb), g.double())):
        _assert_close(a, b, GRAD_ATOL[torch.bfloat16])
