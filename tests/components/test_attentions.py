"""Generic tests over every registered attention, run through MultiHeadDispatch.

The parametrization is read from ATTENTION_REGISTRY at collection time: an attention registered with
``@register_attention`` (and imported by the package) is covered here, ``pytest -k <name>`` selects it.
"""

import pytest
import torch

from triformers.components import ATTENTION_REGISTRY, build_multi_head_attention
from triformers.components.attention import AttentionMask
from triformers.components.attention._generic import generic_attention_config

B, S, D, H = 3, 36, 30, 3  # S is a square (6 x 6 grid) for the 2-D token mixers
ATOL, RTOL = 2e-5, 2e-5  # float32, reordered reductions

NAMES = sorted(ATTENTION_REGISTRY)


def _mha(name, causal=False, dropout=0.0):
    config = generic_attention_config(name, seq_len=S, dim_model=D, num_heads=H, causal=causal, dropout=dropout)
    return build_multi_head_attention({"dim_model": D, "num_heads": H, "residual_dropout": 0.0, "attention": config})


def _select(predicate):
    torch.manual_seed(0)
    return [n for n in NAMES if predicate(n)]


CAUSAL = _select(lambda n: bool(getattr(_mha(n, causal=True).attention, "causal", False)))
ATT_MASK = _select(lambda n: _mha(n).attention.supports_attention_mask)
KEY_PADDING = _select(
    lambda n: _mha(n).attention.supports_attention_mask or _mha(n).attention.supports_key_padding_mask
)
NO_ATT_MASK = [n for n in NAMES if n not in ATT_MASK]


def test_the_zoo_is_registered():
    expected = {
        "scaled_dot_product", "blocksparse", "compositional", "favor", "fourier_mix", "global", "lambda",
        "linformer", "local", "nystrom", "orthoformer", "pooling", "random", "visual",
    }  # fmt: skip
    assert expected <= set(NAMES)
    assert {
        "scaled_dot_product",
        "favor",
        "local",
        "random",
        "global",
        "compositional",
        "blocksparse",
    } <= set(CAUSAL)


@pytest.mark.parametrize("causal,dropout", [(False, 0.0), (True, 0.3)], ids=["plain", "causal-dropout"])
@pytest.mark.parametrize("name", NAMES)
def test_shape_and_finite_gradients(name, causal, dropout):
    mha = _mha(name, causal=causal, dropout=dropout).train()
    x = torch.randn(B, S, D, requires_grad=True)
    y = mha(x)
    assert y.shape == (B, S, D)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in mha.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_batch_order_invariance(name):
    mha = _mha(name).eval()
    x = torch.randn(B, S, D)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        y = mha(x)
        y_perm = mha(x[perm])
    torch.testing.assert_close(y_perm, y[perm], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", CAUSAL)
def test_no_look_ahead(name):
    mha = _mha(name, causal=True).eval()
    t = S // 2 + 1
    x = torch.randn(B, S, D)
    x2 = x.clone()
    x2[:, t:] = torch.randn(B, S - t, D)
    with torch.no_grad():
        y, y2 = mha(x), mha(x2)
    torch.testing.assert_close(y2[:, :t], y[:, :t], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(y2[:, t:], y[:, t:], atol=1e-3)  # the perturbation is visible downstream


def _key_mask(masked_keys):
    mask = torch.ones(S, S, dtype=torch.bool)
    mask[:, masked_keys] = False
    return mask


@pytest.mark.parametrize("form", ["bool", "additive", "AttentionMask"])
@pytest.mark.parametrize("name", ATT_MASK)
def test_masked_keys_are_ignored(name, form):
    """Keys masked for every query (a padding pattern) cannot influence any output."""
    mha = _mha(name).eval()
    masked = torch.tensor([1, 7, 20, 33])
    bool_mask = _key_mask(masked)
    additive = torch.zeros(S, S).masked_fill(~bool_mask, float("-inf"))
    mask = {"bool": bool_mask, "additive": additive, "AttentionMask": AttentionMask(additive)}[form]
    x, y = torch.randn(B, S, D), torch.randn(B, S, D)
    y2 = y.clone()
    y2[:, masked] = 10 * torch.randn(B, len(masked), D)
    with torch.no_grad():
        out = mha(x, y, y, att_mask=mask)
        out2 = mha(x, y2, y2, att_mask=mask)
        unmasked = mha(x, y2, y2)
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(unmasked, out2, atol=1e-3)  # without the mask the keys do matter


@pytest.mark.parametrize("name", ATT_MASK)
def test_query_dependent_mask_honoured_or_refused(name):
    """Per-query masks are applied exactly, or refused with a ValueError; never silently dropped."""
    mha = _mha(name).eval()
    mask = (torch.rand(S, S) > 0.4) | torch.eye(S, dtype=torch.bool)
    row = 4
    hidden = (~mask[row]).nonzero().flatten()  # keys query `row` must not see
    x, y = torch.randn(B, S, D), torch.randn(B, S, D)
    y2 = y.clone()
    y2[:, hidden] = 10 * torch.randn(B, len(hidden), D)
    with torch.no_grad():
        try:
            out = mha(x, y, y, att_mask=mask)
        except ValueError as e:
            assert "mask" in str(e)
            return
        out2 = mha(x, y2, y2, att_mask=mask)
    torch.testing.assert_close(out2[:, row], out[:, row], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(out2, out, atol=1e-3)


@pytest.mark.parametrize("name", KEY_PADDING)
def test_key_padding_mask(name):
    mha = _mha(name).eval()
    keep = torch.rand(B, S) > 0.3
    keep[:, 0] = True
    x, y = torch.randn(B, S, D), torch.randn(B, S, D)
    y2 = torch.where(keep[..., None], y, 10 * torch.randn(B, S, D))
    with torch.no_grad():
        out = mha(x, y, y, key_padding_mask=keep)
        out2 = mha(x, y2, y2, key_padding_mask=keep)
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", NO_ATT_MASK)
def test_unsupported_att_mask_raises(name):
    mha = _mha(name)
    with pytest.raises(ValueError, match="mask"):
        mha(torch.randn(B, S, D), att_mask=torch.ones(S, S, dtype=torch.bool))
