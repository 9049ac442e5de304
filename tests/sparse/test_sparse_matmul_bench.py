"""The sparse matmul benchmark's records at tiny CPU sizes (no timings asserted)."""

from types import SimpleNamespace

from triformers.benchmarks import sparse_matmul


def test_records_have_the_agreed_keys_and_pass_their_checks():
    args = SimpleNamespace(heads=2, seq=64, head_dim=16, block=16, dtype="float32", sparsities=(0.5, 0.9),
                           ops=("sdd", "dsd", "dds"), providers=("torch", "dense"), sp24_shapes=((8, 32, 16),))
    records = sparse_matmul.run(args)
    assert len(records) == 3 * 2 * 2 + 2
    for r in records:
        assert "error" not in r, r
        assert {"op", "sparsity", "provider", "ms", "tflops", "speedup"} <= set(r)
        if r["op"] != "linear24":  # interleaved rounds, ms their median
            assert len(r["ms_rounds"]) == 3 and abs(r["ms"] - sorted(r["ms_rounds"])[1]) <= 1e-5
    sparse = [r for r in records if r["provider"] == "torch"]
    assert all(r["max_rel_err"] < sparse_matmul.CHECK_TOL for r in sparse)
    nnz = {r["sparsity"]: r["nnz_blocks"] for r in sparse if r["op"] == "sdd"}
    assert nnz == {0.5: 16, 0.9: 4}  # 2 heads x 4 x 4 blocks, 50 % and 90 % dropped (at least one block kept)


def test_random_layout_density():
    import torch

    layout = sparse_matmul.random_layout(3, 10, 0.75, torch.Generator().manual_seed(1))
    assert layout.shape == (3, 10, 10) and layout.sum((1, 2)).tolist() == [25, 25, 25]


def test_errors_are_against_a_float32_reference():
    # fp16 outputs round: against a float32 matmul of the same inputs every provider, dense included, shows a
    # small non-zero error (an fp16 reference would let identical roundings read as 0)
    args = SimpleNamespace(heads=2, seq=64, head_dim=16, block=16, dtype="float16", sparsities=(0.5,),
                           ops=("sdd", "dsd", "dds"), providers=("torch", "dense"), sp24_shapes=())
    records = [r for r in sparse_matmul.run(args) if r["op"] != "linear24"]
    assert len(records) == 6
    for r in records:
        assert "error" not in r, r
        assert 0 < r["max_rel_err"] < 5e-3, r
