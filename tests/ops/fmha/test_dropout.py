"""Attention dropout: reproducible under torch.manual_seed, the documented keep rule, keep rate,
unbiasedness, and a backward that applies the forward's mask. The Philox stream matches Triton's."""

import math

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import _rng
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha.reference import ref_attention

CHUNKED = fmha.MemoryEfficientAttentionChunkedOp


def _inputs(B=2, Mq=23, Mkv=31, H=3, K=8, requires_grad=False):
    return [torch.randn(B, m, H, K, requires_grad=requires_grad) for m in (Mq, Mkv, Mkv)]


def _mask_for(seed, p, B, H, Mq, Mkv):
    """Keep mask [B, H, Mq, Mkv] by the documented rule: Philox(seed; j, i, b * H + h) >= p."""
    rows = torch.arange(Mq).view(1, 1, -1, 1)
    cols = torch.arange(Mkv).view(1, 1, 1, -1)
    heads = torch.arange(B * H).view(B, H, 1, 1)
    return _rng.keep_mask(seed, p, rows, cols, heads)


def test_same_seed_same_output():
    q, k, v = _inputs()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(fmha.memory_efficient_attention(q, k, v, p=0.3, op=CHUNKED))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("p", [0.3, 0.7])
@pytest.mark.parametrize("bias", [None, ab.LowerTriangularMask()], ids=["none", "causal"])
def test_matches_reference_with_documented_mask(p, bias):
    q, k, v = _inputs(requires_grad=True)
    B, Mq, H, _ = q.shape
    Mkv = k.shape[1]
    torch.manual_seed(42)
    seed = int(_rng.draw_seed()[0])
    torch.manual_seed(42)
    out = fmha.memory_efficient_attention(q, k, v, bias, p=p, op=CHUNKED)
    keep = _mask_for(seed, p, B, H, Mq, Mkv)
    ref, _ = ref_attention(q, k, v, bias, p=p, drop_mask=keep)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    # the backward applies the same mask
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_keep_rate_binomial():
    """Kept fraction within 5 standard deviations of 1 - p (a 1-in-3.5-million false alarm)."""
    for p in (0.1, 0.5, 0.9):
        keep = _mask_for(seed=1234, p=p, B=2, H=4, Mq=64, Mkv=96)
        n = keep.numel()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(keep.sum().item() - n * (1 - p)) < 5 * sigma, p
    # no structure along rows/columns: each row's kept count stays binomial too
    keep = _mask_for(seed=7, p=0.5, B=1, H=1, Mq=256, Mkv=400)[0, 0]
    per_row = keep.sum(-1).double()
    assert abs(per_row.mean().item() - 200) < 5 * math.sqrt(400 * 0.25 / 256)
    assert per_row.std().item() < 2 * math.sqrt(400 * 0.25)


def test_unbiased():
    """E[dropout attention] equals attention without dropout (z-test over independent seeds)."""
    q, k, v = _inputs(B=1, Mq=5, Mkv=9, H=2, K=4)
    clean = fmha.memory_efficient_attention(q, k, v, op=CHUNKED).double()
    runs = torch.stack([fmha.memory_efficient_attention(q, k, v, p=0.5, op=CHUNKED).double() for _ in range(400)])
    mean, sem = runs.mean(0), runs.std(0) / math.sqrt(runs.shape[0])
    z = ((mean - clean) / sem.clamp_min(1e-9)).abs()
    assert z.max().item() < 5.5  # 90 values: max |z| > 5.5 has probability < 4e-6


def test_p_extremes():
    q, k, v = _inputs()
    out = fmha.memory_efficient_attention(q, k, v, p=1.0, op=CHUNKED)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(
        fmha.memory_efficient_attention(q, k, v, p=0.0, op=CHUNKED), fmha.memory_efficient_attention(q, k, v)
    )


def test_seed_drawn_from_torch_generator():
    torch.manual_seed(5)
    a = _rng.draw_seed()
    torch.manual_seed(5)
    assert torch.equal(a, _rng.draw_seed())
    assert 0 <= int(a[0]) < 2**62


def test_philox_matches_triton():
    """Our PyTorch Philox is bit-identical to Triton's tl.random.philox (run by Triton's interpreter on
    the CPU, or on the GPU)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from triformers._triton import can_run_triton

    @triton.jit
    def _kernel(out_ptr, seed, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        r0, _, _, _ = tl.random.philox(seed, cols, row + tl.zeros_like(cols), 7 + tl.zeros_like(cols),
                                       tl.zeros_like(cols))
        u = tl.random.uint_to_uniform_float(r0)
        tl.store(out_ptr + row * n_cols + cols, u, mask=cols < n_cols)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(5, 64, device=device)
    assert can_run_triton(out), "the CPU suite runs with TRITON_INTERPRET=1"
    for seed in (0, 1, 2**40 + 12345, 2**62 - 1):
        _kernel[(5,)](out, seed, 64, BLOCK=64)
        expected = _rng.philox_uniform(seed, torch.arange(64).view(1, -1), torch.arange(5).view(-1, 1),
                                       torch.tensor(7))
        assert torch.equal(out.cpu(), expected), seed
