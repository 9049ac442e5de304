"""The ring's plan, without processes: over all steps, each rank's calls cover exactly the (query, key) pairs the
global mask allows for its queries, each pair once, and causal masks skip what they hide (zigzag: every rank
computes the same number of pairs)."""

import random

import pytest
import torch

from triformers.distributed.ring_plan import BlockCall, GlobalMask, global_mask, ring_plan
from triformers.distributed.sharding import LOAD_BALANCES, num_chunks, rank_ranges
from triformers.ops.fmha import attn_bias as ab

CPU = torch.device("cpu")


def _positions(rank, world, load_balance, seq_len):
    return torch.cat([torch.arange(a, b) for a, b in rank_ranges(rank, world, load_balance, seq_len)])


def _global_allowed(mask: GlobalMask, seq_len: int) -> torch.Tensor:
    """Allowed pairs ``[S, S]`` computed from the definition (not from the bias classes)."""
    i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if mask.docs is not None:
        doc = torch.bucketize(torch.arange(seq_len), torch.tensor(mask.docs[1:]), right=True)
        allowed &= doc[:, None] == doc[None, :]
    if mask.causal:
        allowed &= j <= i
    return allowed


def _coverage(mask, seq_len, world, rank, load_balance):
    """How many times each (local query, global key) pair is computed, and the number of pairs computed."""
    q_pos = _positions(rank, world, load_balance, seq_len)
    cover = torch.zeros(len(q_pos), seq_len, dtype=torch.int64)
    work = 0
    plan = ring_plan(mask, seq_len, world, rank, load_balance, CPU)
    assert plan[0] is not None and plan[0].q == slice(0, len(q_pos))
    for step, call in enumerate(plan):
        if call is None:
            continue
        k_pos = _positions((rank - step) % world, world, load_balance, seq_len)[call.k]
        rows = torch.arange(len(q_pos))[call.q]
        nq, nk = len(rows), len(k_pos)
        if call.bias is None:
            ok = torch.ones(nq, nk, dtype=torch.bool)
        else:
            ok = call.bias.materialize((nq, nk)).isfinite()
        work += nq * nk
        cover[rows[:, None], k_pos[None, :]] += ok.long()
    return cover, work, plan


def _random_docs(seq_len: int, rng: random.Random) -> list[int]:
    """Document lengths: some of one token, some longer than a rank's share."""
    lens, total = [], 0
    while total < seq_len:
        n = min(seq_len - total, rng.choice([1, 2, 5, seq_len // 3 + 1]))
        lens.append(n)
        total += n
    return lens


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("load_balance", LOAD_BALANCES)
@pytest.mark.parametrize("kind", ["none", "causal", "docs", "causal_docs"])
def test_plan_covers_the_mask_exactly(world, load_balance, kind):
    rng = random.Random(world * 10 + len(kind))
    for chunk in (1, 3, 5):
        seq_len = num_chunks(world, load_balance) * chunk
        docs = None
        if "docs" in kind:
            lens = _random_docs(seq_len, rng)
            docs = tuple(torch.tensor([0, *lens]).cumsum(0).tolist())
        mask = GlobalMask(causal="causal" in kind, docs=docs)
        expected = _global_allowed(mask, seq_len)
        works = []
        for rank in range(world):
            cover, work, _ = _coverage(mask, seq_len, world, rank, load_balance)
            q_pos = _positions(rank, world, load_balance, seq_len)
            torch.testing.assert_close(cover, expected[q_pos].long(), atol=0, rtol=0)
            works.append(work)
        if kind == "causal" and world > 1:
            if load_balance == "zigzag":
                assert len(set(works)) == 1, works  # every rank computes as many pairs
            else:
                assert works == sorted(works) and works[0] < works[-1], works


@pytest.mark.parametrize("world", [2, 4])
def test_causal_hidden_blocks_are_skipped(world):
    mask = GlobalMask(causal=True, docs=None)
    seq_len = 2 * world * 3
    for rank in range(world):
        plan = ring_plan(mask, seq_len, world, rank, "contiguous", CPU)
        # block of rank (rank - i): visible iff it comes earlier
        assert [call is not None for call in plan[1:]] == [(rank - i) % world < rank for i in range(1, world)]
        plan = ring_plan(mask, seq_len, world, rank, "zigzag", CPU)
        assert all(call is not None and call.bias is None for call in plan[1:])  # dense, no mask to apply
        assert isinstance(plan[0].bias, ab.LowerTriangularMask)


def test_documents_crossing_ranks_become_gappy_keys():
    world, seq_len = 2, 12
    # a document over chunks 0-1 (rank 0's early chunk and rank 1's), one over chunks 1-3
    mask = global_mask(ab.BlockDiagonalMask.from_seqlens([4, 8], device="cpu").make_causal(), seq_len, 1)
    assert mask == GlobalMask(causal=True, docs=(0, 4, 12))
    plan = ring_plan(mask, seq_len, world, 1, "zigzag", CPU)  # rank 1: chunks 1 and 2, positions 3..8
    assert isinstance(plan[0].bias, ab.BlockDiagonalCausalMask)
    assert plan[0].bias.q_seqinfo.seqstart_py == [0, 1, 6]  # the document pieces among its rows
    # rank 0's block holds positions 0..2 and 9..11: causal, only position 3 sees keys there (0..2): dense
    assert plan[1] == BlockCall(slice(0, 1), slice(0, 3), None)
    # not causal, position 3 sees keys 0..2 and positions 4..8 keys 9..11: one run of keys each
    mask = GlobalMask(causal=False, docs=(0, 4, 12))
    call = ring_plan(mask, seq_len, world, 1, "zigzag", CPU)[1]
    assert isinstance(call.bias, ab.BlockDiagonalGappyKeysMask) and call.q == slice(0, 6)
    assert call.bias.k_seqinfo.seqstart_py == [0, 3, 6] and call.bias.k_seqinfo.seqlen_py == [3, 3]


def test_bad_masks_are_refused():
    for bias, match in [
        (ab.BlockDiagonalMask.from_seqlens([3, 4], device="cpu"), "describes 7 tokens but the global sequence has 8"),
        (ab.BlockDiagonalMask.from_seqlens([4, 4], [2, 6], device="cpu"), "not self-attention"),
        (ab.LowerTriangularMaskWithTensorBias(torch.zeros(1, 1, 8, 8)), "context parallelism can cut"),
        (ab.LocalAttentionFromBottomRightMask(2, 0), "context parallelism can cut"),
        (torch.zeros(8, 8), "context parallelism can cut"),
    ]:
        with pytest.raises(ValueError, match=match):
            global_mask(bias, 8, 1)
    with pytest.raises(ValueError, match=r"\(batch 1\), but the batch is 2"):
        global_mask(ab.BlockDiagonalMask.from_seqlens([3, 5], device="cpu"), 8, 2)
    for bias in (ab.LowerTriangularFromBottomRightMask(), ab.BlockDiagonalCausalFromBottomRightMask.from_seqlens(
            [3, 5], device="cpu")):  # fmt: skip
        assert global_mask(bias, 8, 1).causal  # bottom-right on a square: causal
