"""Input validation: each rule raises ValueError naming the tensor, its shape, what was expected, the fix."""

import pytest
import torch

from triformers.ops import fmha
from triformers.ops.fmha import attn_bias as ab
from triformers.ops.fmha.common import Inputs, bmk2bmhk


def _qkv(B=2, Mq=5, Mkv=7, H=3, K=8, Kv=None, dtype=torch.float32):
    Kv = K if Kv is None else Kv
    return torch.randn(B, Mq, H, K, dtype=dtype), torch.randn(B, Mkv, H, K, dtype=dtype), torch.randn(
        B, Mkv, H, Kv, dtype=dtype
    )


def _raises(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fmha.memory_efficient_attention(*args, **kwargs)
    return str(info.value)


def test_ndim_mismatch():
    q, k, v = _qkv()
    msg = _raises("BMGHK, BMHK, or BMK shape", q, k[0], v)
    assert "key.shape=(7, 3, 8)" in msg and "query.shape=(2, 5, 3, 8)" in msg


def test_dtype_mismatch():
    q, k, v = _qkv()
    msg = _raises("same dtype", q, k.half(), v)
    assert "key torch.float16" in msg and ".to(query.dtype)" in msg
    _raises("float16, bfloat16 or float32", q.int(), k.int(), v.int())


def test_head_mismatch_explains_gqa():
    q, k, v = _qkv()
    msg = _raises("key has heads \\(2,\\) but query has \\(3,\\)", q, k[:, :, :2], v[:, :, :2])
    assert "expand" in msg and "BMGHK" in msg


def test_head_dim_mismatch():
    q, k, v = _qkv()
    msg = _raises("key.shape\\[-1\\]=4 but query.shape\\[-1\\]=8", q, k[..., :4], v)
    assert "value may differ" in msg


def test_batch_and_length_mismatch():
    q, k, v = _qkv()
    _raises("batch sizes differ", q[:1], k, v)
    _raises("key has 7 positions but value has 6", q, k, v[:, :6])


def test_tensor_bias_shape_dtype_device():
    q, k, v = _qkv()
    msg = _raises("Invalid shape for attention bias", q, k, v, torch.randn(2, 3, 7, 5))
    assert "attn_bias.shape=(2, 3, 7, 5)" in msg and "(2, 3, 5, 7)" in msg and ".expand" in msg
    msg = _raises("attn_bias.dtype=torch.float16 but query.dtype=torch.float32", q, k, v,
                  torch.randn(2, 3, 5, 7).half())
    assert "attn_bias.to(query.dtype)" in msg
    _raises("attn_bias._bias.shape", q, k, v, ab.LowerTriangularMask().add_bias(torch.randn(3, 5, 7)))
    # broadcastable shapes with the same ndim are accepted
    out = fmha.memory_efficient_attention(q, k, v, torch.randn(1, 3, 1, 7))
    assert out.shape == (2, 5, 3, 8)


def test_bmk_rejects_structured_biases():
    q, k, v = (x[:, :, 0] for x in _qkv())
    msg = _raises("BMHK format rather than BMK", q, k, v, ab.LowerTriangularFromBottomRightMask())
    assert "unsqueeze(2)" in msg
    assert fmha.memory_efficient_attention(q, k, v, ab.LowerTriangularMask()).shape == (2, 5, 8)


def test_block_diagonal_checks():
    q, k, v = _qkv(B=2, Mq=5, Mkv=5)
    bias = ab.BlockDiagonalMask.from_seqlens([2, 3])
    msg = _raises("Expected batch_size=1 when using block-diagonal bias", q, k, v, bias)
    assert "from_tensor_list" in msg
    q1, k1, v1 = (x[:1] for x in (q, k, v))
    _raises("describes 4 queries in total but query.shape\\[1\\]=5", q1, k1, v1,
            ab.BlockDiagonalMask.from_seqlens([2, 2], [2, 3]))
    _raises("describes 4 key positions in total but key.shape\\[1\\]=5", q1, k1, v1,
            ab.BlockDiagonalMask.from_seqlens([2, 3], [2, 2]))


def test_dropout_and_scale_values():
    q, k, v = _qkv()
    _raises("Invalid dropout probability: p=1.5", q, k, v, p=1.5)
    _raises("Invalid dropout probability: p=-0.1", q, k, v, p=-0.1)
    _raises("scale must be a finite float", q, k, v, scale=float("nan"))


def test_last_dim_stride():
    q, k, v = _qkv(K=8)
    strided = torch.randn(2, 5, 3, 16)[..., ::2]
    msg = _raises("query.stride\\(-1\\)=2", strided, k, v)
    assert "query.contiguous()" in msg


def test_device_mismatch():
    q, k, v = _qkv()
    _raises("same device", q, k.to("meta"), v)


def test_bias_type_errors():
    q, k, v = _qkv()
    _raises("attn_bias must be None, a torch.Tensor or an AttentionBias", q, k, v, "causal")


def test_inputs_helpers():
    q, k, v = _qkv(Kv=4)
    inp = Inputs(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.randn(2, 5, 7))
    assert inp.normalize_bmhk() == (2, 5, 4)
    assert inp.query.shape == (2, 5, 1, 8) and inp.attn_bias.shape == (2, 1, 5, 7)
    assert Inputs(q, k, v).scale_float == 8 ** -0.5 and Inputs(q, k, v, scale=0.5).scale_float == 0.5
    assert [x.shape for x in Inputs(q, k, v).get_qkv_in_bmghk()] == [(2, 5, 1, 3, 8), (2, 7, 1, 3, 8),
                                                                      (2, 7, 1, 3, 4)]
    x = torch.randn(6, 5, 4)  # [B * H, M, K]
    y = bmk2bmhk(x, 3)
    assert y.shape == (2, 5, 3, 4) and torch.equal(y[1, :, 2], x[5])


@pytest.mark.parametrize("shape,readers_dims", [((2, 5, 3, 4, 8), (3,)), ((1, 70, 2, 3), (1,)), ((6, 4, 5), (0, 2))])
def test_grad_for_input_sums_back_through_the_broadcast(shape, readers_dims):
    """Whatever form the gradient of a broadcast input takes (zeros with the sum at the first reader, or the
    divided sum expanded past the size bounds), the broadcast's backward recovers exactly the sum."""
    from triformers.ops.fmha import _layout

    small = tuple(1 if d in readers_dims else n for d, n in enumerate(shape))
    g = torch.randn(small, dtype=torch.float64)
    base = torch.randn(small, dtype=torch.float64, requires_grad=True)
    for max_bytes in (_layout.ZERO_FILL_MAX_BYTES, 0):  # the zero-filled form, then the expanded view
        old = _layout.ZERO_FILL_MAX_BYTES
        _layout.ZERO_FILL_MAX_BYTES = max_bytes
        try:
            out = _layout.grad_for_input(g, torch.Size(shape))
        finally:
            _layout.ZERO_FILL_MAX_BYTES = old
        assert tuple(out.shape) == shape
        (got,) = torch.autograd.grad(base.expand(shape), base, out)
        torch.testing.assert_close(got, g)
