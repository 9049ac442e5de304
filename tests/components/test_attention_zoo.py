"""Each attention against an independent formula written here (dense softmax with the attention's pattern,
explicit sums), on folded-head inputs ``[N, S, D]``."""

import math

import pytest
import torch

from triformers.components import build_attention
from triformers.components.attention.core import scaled_dot_product_attention, sparse_attention, sparsify
from triformers.components.attention.utils import iterative_pinv

ATOL, RTOL = 2e-5, 2e-5  # float32


def dense_attention(q, k, v, keep=None, causal=False):
    """softmax(q k^T / sqrt(d)) v with a bool pattern (True = attend); empty rows give zeros."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool) if keep is None else keep
    if causal:
        allowed = allowed & torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    s = s.masked_fill(~allowed, float("-inf"))
    w = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return w @ v


def qkv(n=4, s=23, d=8, dv=None):
    return torch.randn(n, s, d), torch.randn(n, s, d), torch.randn(n, s, dv or d)


def test_sparse_attention_matches_dense_and_zeroes_empty_rows():
    q, k, v = qkv(s=17)
    keep = torch.rand(17, 17) > 0.7
    keep[3] = False  # a query with no key
    out = sparse_attention(q, k, v, sparsify(keep))
    torch.testing.assert_close(out, dense_attention(q, k, v, keep), atol=ATOL, rtol=RTOL)
    assert (out[:, 3] == 0).all()


def test_core_per_sample_masks_map_to_heads():
    """A [b, S, S] mask applies to rows n of the folded batch with n // (N / b) == sample."""
    q, k, v = qkv(n=6, s=9)
    keep = (torch.rand(2, 9, 9) > 0.5) | torch.eye(9, dtype=torch.bool)
    out = scaled_dot_product_attention(q, k, v, att_mask=keep)
    ref = torch.cat(
        [
            dense_attention(q[i * 3 : (i + 1) * 3], k[i * 3 : (i + 1) * 3], v[i * 3 : (i + 1) * 3], keep[i])
            for i in range(2)
        ]
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("causal,window", [(False, 5), (False, 1), (True, 3)])
@pytest.mark.parametrize("force_sparsity", [False, True])
def test_local(causal, window, force_sparsity):
    att = build_attention(
        {"name": "local", "dropout": 0.0, "causal": causal, "window_size": window, "force_sparsity": force_sparsity}
    )
    q, k, v = qkv(s=29)
    i, j = torch.arange(29)[:, None], torch.arange(29)[None, :]
    keep = (j <= i) & (j >= i - window) if causal else (i - j).abs() <= window // 2
    torch.testing.assert_close(att(q, k, v), dense_attention(q, k, v, keep), atol=ATOL, rtol=RTOL)


def test_local_rejects_even_windows():
    with pytest.raises(ValueError, match="odd"):
        build_attention({"name": "local", "dropout": 0.0, "window_size": 4})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r", [0.1, 0.6])
def test_random(causal, r):
    att = build_attention({"name": "random", "dropout": 0.0, "r": r, "causal": causal})
    q, k, v = qkv(s=31)
    out = att(q, k, v)
    pattern = att.rand_attention_mask
    keep = pattern.to_dense() if isinstance(pattern, torch.Tensor) else pattern.to_bool()[0]
    assert keep.diagonal().all()
    if causal:
        assert not keep.triu(1).any()
    density = keep.float().mean().item()
    expected = r * (0.5 if causal else 1.0)
    assert abs(density - expected) < 0.15
    torch.testing.assert_close(out, dense_attention(q, k, v, keep), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(att(q, k, v), out)  # constant masking: same pattern next call


@pytest.mark.parametrize("causal", [False, True])
def test_global(causal):
    m = torch.zeros(40, 1, dtype=torch.bool)
    m[[3, 17]] = True
    att = build_attention({"name": "global", "dropout": 0.0, "attention_query_mask": m, "causal": causal})
    q, k, v = qkv(s=33)  # shorter than the mask: top-left corner
    g = m[:33, 0]
    keep = g[:, None] | g[None, :] | torch.eye(33, dtype=torch.bool)
    torch.testing.assert_close(att(q, k, v), dense_attention(q, k, v, keep, causal), atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="exceeds"):
        att(*qkv(s=41))


@pytest.mark.parametrize("rows_per_chunk", [64, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_blocksparse(causal, rows_per_chunk):
    bs, nb, heads = 4, 5, 3
    layout = torch.rand(heads, nb, nb) > 0.5
    layout[1, 2] = False  # query block 2 of head 1 attends nothing
    layout[0].fill_diagonal_(True)
    att = build_attention({"name": "blocksparse", "dropout": 0.0, "layout": layout, "block_size": bs, "causal": causal})
    att.ROWS_PER_CHUNK = rows_per_chunk  # 2: rows of several widths spread over several chunks
    q, k, v = (torch.randn(2, heads, nb * bs, 8) for _ in range(3))
    keep = torch.kron(layout.long(), torch.ones(bs, bs, dtype=torch.long)).bool()  # [H, S, S]
    ref = torch.stack([dense_attention(q[:, h], k[:, h], v[:, h], keep[h], causal) for h in range(heads)], 1)
    out = att(q, k, v)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert (out[:, 1, 2 * bs : 3 * bs] == 0).all()
    with pytest.raises(ValueError, match="layout"):
        att(*(torch.randn(2, heads, nb * bs + 1, 8) for _ in range(3)))


def test_blocksparse_mask_is_built_with_the_module_and_compiles_once():
    """The kernels' mask is built by the constructor (not by a first forward, which under torch.compile made the
    second call recompile) and kept by a .to() that leaves the layout's device (a device move: the GPU tests)."""
    layout = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    att = build_attention({"name": "blocksparse", "dropout": 0.0, "layout": layout, "block_size": 16, "num_heads": 2})
    built = att._mask
    assert built is not None
    att.to(torch.float64)
    assert att._mask is built and att.mask is built
    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(att, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        first, second = compiled(q, k, v), compiled(q, k, v)
    keep = torch.kron(layout.long(), torch.ones(16, 16, dtype=torch.long)).bool()
    ref = torch.stack([dense_attention(q[:, h], k[:, h], v[:, h], keep) for h in range(2)], 1)
    torch.testing.assert_close(first, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(second, ref, atol=ATOL, rtol=RTOL)


def test_iterative_pinv_approximates_the_pseudo_inverse():
    k = torch.softmax(torch.randn(5, 7, 7, dtype=torch.float64), -1)
    pinv = iterative_pinv(k, n_iter=30)
    torch.testing.assert_close(pinv, torch.linalg.pinv(k), atol=1e-6, rtol=1e-6)


def test_nystrom_is_exact_with_enough_landmarks():
    att = build_attention({"name": "nystrom", "dropout": 0.0, "num_heads": 2, "num_landmarks": 30})
    q, k, v = qkv(s=23)
    torch.testing.assert_close(att(q, k, v), dense_attention(q, k, v), atol=ATOL, rtol=RTOL)


def test_nystrom_approximation_matches_its_formula():
    att = build_attention(
        {"name": "nystrom", "dropout": 0.0, "num_heads": 2, "num_landmarks": 5, "use_razavi_pinverse": False}
    )
    q, k, v = (t.double() for t in qkv(s=20))
    seg = lambda x: x.view(x.shape[0], 5, 4, -1).mean(2)  # noqa: E731
    sm = lambda a, b: torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(a.shape[-1]), -1)  # noqa: E731
    ref = sm(q, seg(k)) @ torch.linalg.pinv(sm(seg(q), seg(k))) @ (sm(seg(q), k) @ v)
    torch.testing.assert_close(att(q, k, v), ref, atol=1e-10, rtol=1e-10)


def test_nystrom_causal_is_exact():
    att = build_attention({"name": "nystrom", "dropout": 0.0, "num_heads": 2, "num_landmarks": 4, "causal": True})
    q, k, v = qkv(s=16)
    torch.testing.assert_close(att(q, k, v), dense_attention(q, k, v, causal=True), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("selection", ["orthogonal", "kmeans", "kmeans_spherical", "random"])
def test_orthoformer_approximation_matches_its_formula(selection):
    att = build_attention({"name": "orthoformer", "dropout": 0.0, "num_landmarks": 6, "landmark_selection": selection})
    q, k, v = qkv(s=25)
    torch.manual_seed(1)
    out = att(q, k, v)
    torch.manual_seed(1)
    lm = att._landmarks(q, k)
    assert lm.shape == (4, 6, 8)
    sm = lambda a, b: torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(8), -1)  # noqa: E731
    torch.testing.assert_close(out, sm(q, lm) @ (sm(lm, k) @ v), atol=ATOL, rtol=RTOL)


def test_orthogonal_landmarks_are_distinct_queries():
    att = build_attention({"name": "orthoformer", "dropout": 0.0, "num_landmarks": 5})
    q = torch.randn(3, 19, 8)
    lm = att._compute_orthogonal_landmarks(q)
    for n in range(3):
        idx = [int((q[n] == row).all(-1).nonzero()) for row in lm[n]]
        assert len(set(idx)) == 5
        assert idx[0] == int(q[n].norm(dim=-1).argmax())


def test_orthoformer_exact_with_full_landmarks():
    att = build_attention({"name": "orthoformer", "dropout": 0.0, "num_landmarks": 23})
    q, k, v = qkv(s=23)
    keep = torch.rand(23, 23) > 0.3
    keep.fill_diagonal_(True)
    torch.testing.assert_close(att(q, k, v, att_mask=keep), dense_attention(q, k, v, keep), atol=ATOL, rtol=RTOL)


def test_linformer_matches_its_formula():
    att = build_attention({"name": "linformer", "dropout": 0.0, "seq_len": 30, "k": 7})
    q, k, v = qkv(s=26)
    e, f = att.E.weight[:, :26], att.F.weight[:, :26]
    ref = torch.softmax(q @ (e @ k).transpose(-1, -2) / math.sqrt(8), -1) @ (f @ v)
    torch.testing.assert_close(att(q, k, v), ref, atol=ATOL, rtol=RTOL)


def test_lambda_matches_explicit_sums():
    att = build_attention({"name": "lambda", "dropout": 0.0, "seq_len": 12, "dim_head": 6})
    q, k, v = qkv(n=2, s=9, d=6, dv=5)
    out = att(q, k, v)
    E = att.rel_pos_emb
    ref = torch.zeros(2, 9, 5)
    for b in range(2):
        content = torch.softmax(k[b], dim=0).T @ v[b]  # [6, 5]
        for n in range(9):
            pos = sum(torch.outer(E[m - n + 11], v[b, m]) for m in range(9))  # [6, 5]
            ref[b, n] = q[b, n] @ (content + pos)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_fourier_mix_is_the_real_part_of_the_2d_dft():
    att = build_attention({"name": "fourier_mix", "dropout": 0.0})
    x = torch.randn(3, 7, 5, dtype=torch.float64)

    def dft(n):
        idx = torch.arange(n, dtype=torch.float64)
        ang = -2 * math.pi * torch.outer(idx, idx) / n
        return torch.complex(torch.cos(ang), torch.sin(ang))

    ref = (dft(7) @ x.to(torch.complex128) @ dft(5)).real
    torch.testing.assert_close(att(x, x, x), ref)


def test_pooling_is_the_neighbourhood_mean_minus_the_token():
    att = build_attention({"name": "pooling", "dropout": 0.0, "pool_size": 3})
    x = torch.randn(2, 25, 4)
    grid = x.view(2, 5, 5, 4)
    ref = torch.empty_like(grid)
    for i in range(5):
        for j in range(5):
            nb = grid[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].reshape(2, -1, 4)
            ref[:, i, j] = nb.mean(1) - grid[:, i, j]
    torch.testing.assert_close(att(x), ref.view(2, 25, 4), atol=ATOL, rtol=RTOL)


def test_compositional_with_one_rule_is_multi_head_attention():
    """With a single retrieval rule the selection softmax is 1: plain attention per search head."""
    E, H = 12, 3
    att = build_attention(
        {
            "name": "compositional",
            "dropout": 0.0,
            "dim_model": E,
            "num_heads": H,
            "num_rules": 1,
            "use_separate_proj_weight": True,
        }
    )
    x = torch.randn(2, 7, E)
    ip = att.in_proj_container
    q, k, v = ip.q_proj(x), ip.k_proj(x), ip.v_proj(x)
    heads = [dense_attention(q[..., h * 4 : (h + 1) * 4], k[..., h * 4 : (h + 1) * 4], v) for h in range(H)]
    torch.testing.assert_close(att(x, x, x), att.out_proj(torch.cat(heads, -1)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("qk_rule,nonlinear,q_compose", [(True, False, False), (False, True, True)])
def test_compositional_variants_run(qk_rule, nonlinear, q_compose):
    att = build_attention(
        {
            "name": "compositional",
            "dropout": 0.0,
            "dim_model": 12,
            "num_heads": 3,
            "num_rules": 2,
            "qk_rule": qk_rule,
            "nonlinear": nonlinear,
            "q_compose": q_compose,
        }
    )
    x = torch.randn(2, 7, 12, requires_grad=True)
    y = att(x, x, x)
    y.sum().backward()
    assert y.shape == (2, 7, 12) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("causal", [False, True])
def test_local_window_runs_as_a_kernel_mask(monkeypatch, causal):
    import triformers.ops
    from triformers.ops.fmha import attn_bias

    calls = []
    mea = triformers.ops.memory_efficient_attention

    def spy(q, k, v, bias=None, **kw):
        calls.append(bias)
        return mea(q, k, v, bias, **kw)

    monkeypatch.setattr(triformers.ops, "memory_efficient_attention", spy)
    att = build_attention({"name": "local", "dropout": 0.0, "causal": causal, "window_size": 5})
    att(*qkv())
    expected = (
        attn_bias.LowerTriangularFromBottomRightLocalAttentionMask
        if causal
        else attn_bias.LocalAttentionFromBottomRightMask
    )
    assert len(calls) == 1 and isinstance(calls[0], expected)
