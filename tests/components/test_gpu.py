"""The zoo on a GPU in half precision: every registered attention against its own float32 result, and
scaled_dot_product through memory_efficient_attention's CUDA kernels against a dense reference.

Run on a GPU machine with ``pytest -m gpu tests/components/test_gpu.py``.
"""

import math

import pytest
import torch

import triformers.ops
from triformers.components import ATTENTION_REGISTRY, build_multi_head_attention
from triformers.components.attention._generic import generic_attention_config

pytestmark = pytest.mark.gpu

B, S, D, H = 2, 256, 128, 4  # S = 16 x 16 for the 2-D token mixers
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2}  # relative to the output scale; bf16 has 8 mantissa bits


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("this GPU test needs CUDA (select it with -m gpu on a GPU machine only)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_half_precision_matches_float32(name, causal, dtype):
    torch.manual_seed(0)
    config = generic_attention_config(name, S, D, H, causal=causal)
    mha = build_multi_head_attention({"dim_model": D, "num_heads": H, "attention": config}).cuda().eval()
    x = torch.randn(B, S, D, device="cuda")
    with torch.no_grad():
        ref = mha(x)
        out = mha.to(dtype)(x.to(dtype)).float()
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < HALF_TOL[dtype], f"{name}: relative error {err:.3g}"
    x = x.to(dtype).requires_grad_()
    mha.train()(x).float().square().mean().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive-per-sample"])
def test_scaled_dot_product_runs_the_cuda_kernels(monkeypatch, mask):
    calls = []
    mea = triformers.ops.memory_efficient_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return mea(*args, **kwargs)

    monkeypatch.setattr(triformers.ops, "memory_efficient_attention", spy)
    torch.manual_seed(0)
    cfg = {"name": "scaled_dot_product", "dropout": 0.0, "causal": mask == "causal"}
    mha = build_multi_head_attention({"dim_model": D, "num_heads": H, "attention": cfg}).cuda().half().eval()
    x = torch.randn(B, 200, D, device="cuda", dtype=torch.float16)
    keep = (torch.rand(B, 200, 200, device="cuda") > 0.3) | torch.eye(200, dtype=torch.bool, device="cuda")
    att_mask = {
        "none": None,
        "causal": None,
        "bool": keep[0],
        "additive-per-sample": torch.randn(B, 200, 200, device="cuda").masked_fill(~keep, -math.inf),
    }[mask]
    with torch.no_grad():
        out = mha(x, att_mask=att_mask)
    assert calls == [1]
    ip = mha.in_proj_container
    q, k, v = (p(x).float().view(B, 200, H, -1).transpose(1, 2) for p in (ip.q_proj, ip.k_proj, ip.v_proj))
    s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    if mask == "causal":
        s = s.masked_fill(torch.ones(200, 200, dtype=torch.bool, device="cuda").triu(1), -math.inf)
    elif mask == "bool":
        s = s.masked_fill(~keep[0], -math.inf)
    elif mask == "additive-per-sample":
        s = s + att_mask[:, None]
    ref = mha.proj((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, 200, D).half()).float()
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-2)
