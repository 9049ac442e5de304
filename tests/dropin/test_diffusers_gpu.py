"""diffusers on the GPU through ``import triformers.as_xformers``, as its documentation says to use xFormers:
``enable_xformers_memory_efficient_attention()``, with and without
``attention_op=MemoryEfficientAttentionFlashAttentionOp``, in bfloat16, forward and every gradient.

A bf16 model never equals its float32 original; the check is that our attention adds no error of its own:
against the float32 model with diffusers' default attention, the bf16 model with xFormers attention is as close
as the bf16 model with diffusers' default attention (within a factor).
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed (test extra)"),
    pytest.mark.usefixtures("no_real_xformers"),
]

DEV = "cuda"
# xFormers attention in bf16 may be this much further from the float32 model than diffusers' own bf16 attention
# (both round Q, K, V and P to bf16; summation orders differ), plus a floor for gradients that are ~0 exactly
ERROR_FACTOR = 2.0
ERROR_FLOOR = 1e-3


def _run(model, forward, inputs, dtype):
    model.zero_grad(set_to_none=True)
    inputs = {k: v.to(dtype).detach().requires_grad_() for k, v in inputs.items()}
    out = forward(**inputs)
    g = torch.Generator(device=DEV).manual_seed(7)
    out.backward(torch.randn(out.shape, device=DEV, generator=g).to(out.dtype))
    grads = {f"param {n}": p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input {k}": v.grad.float() for k, v in inputs.items()})
    return {"output": out.detach().float(), **grads}


def _relative_errors(results, reference):
    return {k: ((results[k] - ref).norm() / ref.norm().clamp_min(1e-12)).item() for k, ref in reference.items()}


def _check(build, forward, inputs, attention_op):
    torch.manual_seed(0)
    model = build().to(DEV).eval()
    reference = _run(model, lambda **x: forward(model, **x), inputs, torch.float32)
    model = model.to(torch.bfloat16)
    baseline = _relative_errors(_run(model, lambda **x: forward(model, **x), inputs, torch.bfloat16), reference)
    model.enable_xformers_memory_efficient_attention(attention_op=attention_op)
    ours = _relative_errors(_run(model, lambda **x: forward(model, **x), inputs, torch.bfloat16), reference)
    assert ours.keys() == baseline.keys() and len(ours) > 10
    worse = {k: (ours[k], baseline[k]) for k in ours if ours[k] > ERROR_FACTOR * baseline[k] + ERROR_FLOOR}
    assert not worse, worse
    model.disable_xformers_memory_efficient_attention()


@pytest.fixture(params=["default op", "MemoryEfficientAttentionFlashAttentionOp"])
def attention_op(request, diffusers):
    if request.param == "default op":
        return None
    from xformers.ops import MemoryEfficientAttentionFlashAttentionOp  # diffusers' documented example

    return MemoryEfficientAttentionFlashAttentionOp


def test_unet2d_condition_bf16(diffusers, attention_op):
    mask = torch.ones(2, 77, device=DEV)
    mask[0, 20:] = 0
    mask[1, 50:] = 0

    def build():
        return diffusers.UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=96, attention_head_dim=8,
        )  # fmt: skip

    def forward(model, sample, encoder_hidden_states):
        return model(sample, 3, encoder_hidden_states, encoder_attention_mask=mask).sample

    inputs = {
        "sample": torch.randn(2, 4, 32, 32, device=DEV),
        "encoder_hidden_states": torch.randn(2, 77, 96, device=DEV),
    }
    _check(build, forward, inputs, attention_op)


def test_autoencoder_kl_bf16(diffusers, attention_op):
    def build():
        return diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(64, 128), latent_channels=4, sample_size=64,
        )  # fmt: skip

    _check(build, lambda model, sample: model(sample).sample, {"sample": torch.randn(2, 3, 64, 64, device=DEV)},
           attention_op)  # fmt: skip


def test_sd3_bf16(diffusers, attention_op):
    def build():
        return diffusers.SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64,
            num_attention_heads=4, caption_projection_dim=256, joint_attention_dim=96, pooled_projection_dim=64,
            pos_embed_max_size=16,
        )  # fmt: skip

    inputs = {
        "hidden_states": torch.randn(2, 4, 16, 16, device=DEV),
        "encoder_hidden_states": torch.randn(2, 33, 96, device=DEV),
        "pooled_projections": torch.randn(2, 64, device=DEV),
    }
    timestep = torch.tensor([3, 500], device=DEV)
    _check(build, lambda model, **x: model(**x, timestep=timestep).sample, inputs, attention_op)


def test_flux_bf16(diffusers, attention_op):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    def build():
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=96, pooled_projection_dim=64, axes_dims_rope=[16, 24, 24],
        )  # fmt: skip

    side = 16
    pixels = torch.arange(side * side, device=DEV)
    img_ids = torch.stack([torch.zeros_like(pixels), pixels // side, pixels % side], -1).float()
    txt_ids = torch.zeros(33, 3, device=DEV)
    inputs = {
        "hidden_states": torch.randn(2, side * side, 16, device=DEV),
        "encoder_hidden_states": torch.randn(2, 33, 96, device=DEV),
        "pooled_projections": torch.randn(2, 64, device=DEV),
    }

    def forward(model, **x):
        timestep = torch.tensor([0.3, 0.5], device=DEV, dtype=x["hidden_states"].dtype)
        return model(**x, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids).sample

    active = _AttentionBackendRegistry._active_backend
    try:
        _check(build, forward, inputs, attention_op)
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
