"""AttentionMask: conversions, causal construction, cropping, combination, device/dtype moves."""

import pytest
import torch

from triformers.components.attention import AttentionMask


def test_from_bool_round_trip():
    keep = torch.rand(2, 7, 9) > 0.5
    m = AttentionMask.from_bool(keep)
    assert m.dtype == torch.float32 and m.shape == (2, 7, 9)
    assert torch.equal(m.to_bool(), keep)
    assert (m.values[keep] == 0).all() and (m.values[~keep] == float("-inf")).all()


def test_from_multiplicative():
    mult = (torch.rand(5, 6) > 0.5).float()
    m = AttentionMask.from_multiplicative(mult)
    assert m.shape == (1, 5, 6)
    assert torch.equal(m.to_bool()[0], mult.bool())


@pytest.mark.parametrize("seq_len,to_seq_len", [(13, None), (13, 7)])
def test_make_causal_is_lower_triangular(seq_len, to_seq_len):
    m = AttentionMask.make_causal(seq_len, to_seq_len)
    cols = to_seq_len or seq_len
    assert m.is_causal and m.shape == (1, seq_len, cols)
    i, j = torch.arange(seq_len)[:, None], torch.arange(cols)[None, :]
    assert torch.equal(m.to_bool()[0], j <= i)
    assert m.seq_len == seq_len and m.to_seq_len == cols


def test_crop_is_a_view_and_keeps_causality():
    m = AttentionMask.make_causal(16)
    c = m.make_crop(5, 9)
    assert c.shape == (1, 5, 9) and c.is_causal
    assert c.values.data_ptr() == m.values.data_ptr()


def test_add_is_logical_and():
    a, b = torch.rand(6, 6) > 0.5, torch.rand(6, 6) > 0.5
    s = AttentionMask.from_bool(a) + AttentionMask.from_bool(b)
    assert torch.equal(s.to_bool()[0], a & b)
    assert not (AttentionMask.make_causal(6) + AttentionMask.make_causal(6)).is_causal


def test_to_keeps_causality_and_is_a_no_op_when_unchanged():
    m = AttentionMask.make_causal(4)
    assert m.to(torch.device("cpu")) is m
    h = m.to(dtype=torch.float64)
    assert h.dtype == torch.float64 and h.is_causal


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="from_bool"):
        AttentionMask(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="grad"):
        AttentionMask(torch.zeros(3, 3, requires_grad=True))
    with pytest.raises(ValueError, match="S_q, S_k"):
        AttentionMask(torch.zeros(3))
