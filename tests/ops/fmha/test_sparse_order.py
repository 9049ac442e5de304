"""Block-sparse launch order (heavy programs first): the permutation against a direct construction, and the
kernels under it against the float64 reference and against the natural order."""

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha import triton as triton_op
from triformers.ops.fmha._triton import launch
from triformers.ops.fmha._triton.sparse_order import HEAVY, _order

from .test_block_sparse_mask import TRITON, _inputs, _leaves, reference


def _expected(lens: torch.Tensor, Z: int, num_heads: int, group: int) -> list[int] | None:
    """The order written out: per program its work (its heads' rows summed), heavy ones (>= HEAVY x the mean)
    longest first with every batch element in turn, then every program not heavy in grid order."""
    Hl, rows = lens.shape
    work = []
    for hg in range(num_heads // group):
        for r in range(rows):
            work.append(sum(int(lens[0 if Hl == 1 else hg * group + j, r]) for j in range(group)))
    mean = sum(work) / len(work)
    heavy = [p for p, w in enumerate(work) if w > 0 and w >= HEAVY * mean]
    if not heavy:
        return None
    heavy.sort(key=lambda p: -work[p])  # stable: ties keep grid order
    P = len(work)
    first = [z * P + p for p in heavy for z in range(Z)]
    return first + [z * P + p for z in range(Z) for p in range(P) if p not in heavy]


@pytest.mark.parametrize("Hl, num_heads, group, Z", [(1, 3, 1, 2), (4, 4, 1, 3), (4, 4, 2, 2), (6, 6, 3, 1)])
def test_order_against_direct_construction(Hl, num_heads, group, Z):
    torch.manual_seed(Hl + group)
    rows = 7
    lens = torch.randint(0, 4, (Hl, rows), dtype=torch.int32)
    lens[0, 2] = 40  # a global row in head 0
    lens[-1, 5] = 25
    offsets = torch.nn.functional.pad(lens.flatten().cumsum(0, dtype=torch.int32), (1, 0))
    offsets = offsets.as_strided((Hl, rows + 1), (rows, 1)).contiguous()  # the tile table's layout
    got = _order(offsets, Z, num_heads, group)
    want = _expected(lens, Z, num_heads, group)
    assert got is not None and got.dtype == torch.int32
    assert got.tolist() == want
    assert sorted(got.tolist()) == list(range(Z * num_heads // group * rows))


def test_uniform_rows_keep_the_natural_order():
    offsets = (torch.arange(9, dtype=torch.int32) * 3)[None]  # 8 rows of 3 tiles each
    assert _order(offsets, 2, 2, 1) is None


@pytest.mark.skipif(not triton_op.FwOp.is_available(), reason="triton is not installed")
@pytest.mark.parametrize("fmt, gqa", [("BMHK", False), ("BMGHK", True)], ids=["per-head", "gqa"])
def test_kernels_run_heavy_first_and_match(monkeypatch, fmt, gqa):
    """A BigBird-like layout (a global block row and column, the diagonal): the forward, dQ and dK/dV launches
    all run in heavy-first order, outputs and gradients match the float64 reference and equal, bit for bit,
    those of the natural order (each program computes the same tile either way)."""
    used = []

    def spy(*args):
        order = launch_heavy_first(*args)
        used.append((args[6], order is not None))  # (transposed, ordered)
        return order

    launch_heavy_first = launch.heavy_first
    monkeypatch.setattr(launch, "heavy_first", spy)
    torch.manual_seed(0)
    M, block = 256, 32
    q, k, v = _inputs(fmt, 2, M, M, 1, 2, 16, 16, torch.float32, gqa=gqa)
    n = M // block
    layout = torch.eye(n, dtype=torch.bool)[None].repeat(2, 1, 1)
    layout[:, 0, :] = True
    layout[:, :, 0] = True
    layout[1, 3, 5] = True
    mask = ab.BlockSparseMask(layout, block)
    g = torch.randn(q.shape)
    leaves = _leaves((q, k, v))
    results = []
    for heavy_first in (True, False):
        monkeypatch.setattr(launch, "HEAVY_FIRST", heavy_first)
        out = fmha.memory_efficient_attention(q, k, v, mask, op=TRITON)
        results.append((out, *torch.autograd.grad(out, leaves, g)))
    assert {t for t, ordered in used if ordered} == {False, True}  # forward/dQ and dK/dV
    assert sum(1 for t, ordered in used if ordered and not t) >= 2  # forward and dQ
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref = reference(q, k, v, mask)[0]
    torch.testing.assert_close(results[0][0].double(), ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(results[0][1:], torch.autograd.grad(ref, leaves, g.double())):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)
