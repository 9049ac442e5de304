"""diffusers through ``import triformers.as_xformers``: its xFormers attention paths give what its default
attention gives (forward and every gradient, float32 on the CPU), on tiny models built from configurations
with random weights (nothing is downloaded).

diffusers decides whether xFormers is available when it is imported, so the alias is installed before
diffusers is first imported in this process (the fixture below) and removed afterwards.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed (test extra)"),
    pytest.mark.usefixtures("no_real_xformers"),  # and `diffusers` (conftest.py): imported after the alias
]

# float32 on the CPU: SDPA (the default attention) and our operators sum in different orders
ATOL = RTOL = 1e-4


@pytest.fixture(params=["auto", "chunked"])
def operator(request, monkeypatch):
    """``auto``: the operator our dispatcher picks (SDPA on the CPU, as diffusers' default attention);
    ``chunked``: our pure-PyTorch operator, forced, so that the comparison is between two implementations."""
    if request.param != "auto":
        monkeypatch.setenv("TRIFORMERS_FMHA_OP", request.param)
    return request.param


def _run(model, forward, inputs):
    """Output and the gradients of every parameter and input, for a random output cotangent."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    out = forward(**inputs)
    torch.manual_seed(7)
    out.backward(torch.randn_like(out))
    grads = {f"param {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input {k}": v.grad for k, v in inputs.items() if v.grad is not None})
    return out.detach(), grads


def _assert_same(expected, actual):
    out, grads = expected
    torch.testing.assert_close(actual[0], out, atol=ATOL * out.abs().max().item(), rtol=RTOL)
    assert actual[1].keys() == grads.keys()
    assert len(grads) > 10  # the models' parameters received gradients through attention
    largest = max(grad.abs().max().item() for grad in grads.values())
    for name, grad in grads.items():
        # gradients of different layers differ by orders of magnitude, and some are 0 in exact arithmetic (a
        # key projection's bias: softmax does not see a shift common to all keys), rounding noise here
        scale = max(grad.abs().max().item(), 1e-3 * largest)
        message = lambda m, n=name: f"{n}: {m}"  # noqa: E731
        torch.testing.assert_close(actual[1][name], grad, atol=ATOL * scale, rtol=RTOL, msg=message)


def _set_processor(model, processor) -> int:
    """Sets ``processor`` on every attention module (models without ``set_attn_processor`` too); their count."""
    from diffusers.models.attention_processor import Attention

    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for module in modules:
        module.set_processor(processor)
    return len(modules)


def _compare_processors(model, forward, inputs, processor_class, op=None):
    model.eval()  # no dropout (DiT's class-label dropout included): both runs see the same model
    expected = _run(model, forward, inputs)
    assert _set_processor(model, processor_class(attention_op=op)) > 0
    _assert_same(expected, _run(model, forward, inputs))


def test_unet2d_condition_with_encoder_mask(diffusers, operator):
    from diffusers.models.attention_processor import XFormersAttnProcessor

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0  # padded prompt tokens: diffusers turns the mask into a stride-0 additive bias
    mask[1, 6:] = 0
    inputs = {"sample": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 7, 16)}

    def forward(sample, encoder_hidden_states):
        return unet(sample, 3, encoder_hidden_states, encoder_attention_mask=mask).sample

    _compare_processors(unet, forward, inputs, XFormersAttnProcessor)


def test_autoencoder_kl(diffusers, operator):
    from diffusers.models.attention_processor import XFormersAttnProcessor

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=12,
    )
    _compare_processors(vae, lambda sample: vae(sample).sample, {"sample": torch.randn(2, 3, 12, 12)},
                        XFormersAttnProcessor)  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput:FutureWarning")  # diffusers' own import
def test_transformer2d_cross_attention(diffusers, operator):
    from diffusers.models.attention_processor import XFormersAttnProcessor

    torch.manual_seed(0)
    model = diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=8, norm_num_groups=4, cross_attention_dim=16,
        num_layers=1,
    )  # fmt: skip
    inputs = {"hidden_states": torch.randn(2, 8, 5, 7), "encoder_hidden_states": torch.randn(2, 6, 16)}
    _compare_processors(model, lambda **x: model(**x).sample, inputs, XFormersAttnProcessor)


def test_dit(diffusers, operator):
    from diffusers.models.attention_processor import XFormersAttnProcessor

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=6,
        patch_size=2, norm_num_groups=4,
    )  # fmt: skip

    def forward(hidden_states):
        return model(hidden_states, timestep=torch.tensor([3, 5]), class_labels=torch.tensor([1, 2])).sample

    _compare_processors(model, forward, {"hidden_states": torch.randn(2, 4, 6, 6)}, XFormersAttnProcessor)


def test_sd3_joint_attention(diffusers, operator):
    from diffusers.models.attention_processor import XFormersJointAttnProcessor

    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=6, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8,
    )  # fmt: skip
    inputs = {
        "hidden_states": torch.randn(2, 4, 6, 6),
        "encoder_hidden_states": torch.randn(2, 5, 16),
        "pooled_projections": torch.randn(2, 16),
    }
    _compare_processors(model, lambda **x: model(**x, timestep=torch.tensor([3, 5])).sample, inputs,
                        XFormersJointAttnProcessor)  # fmt: skip


def test_flux_attention_backend(diffusers, operator):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()  # fmt: skip
    pixels = torch.arange(12)
    img_ids = torch.stack([torch.zeros(12), pixels // 4, pixels % 4], -1).float()
    inputs = {
        "hidden_states": torch.randn(2, 12, 4),
        "encoder_hidden_states": torch.randn(2, 5, 32),
        "pooled_projections": torch.randn(2, 32),
    }

    def forward(**x):
        return model(**x, timestep=torch.tensor([0.3, 0.5]), img_ids=img_ids, txt_ids=torch.zeros(5, 3)).sample

    active = _AttentionBackendRegistry._active_backend
    expected = _run(model, forward, inputs)
    try:
        model.set_attention_backend("xformers")
        _assert_same(expected, _run(model, forward, inputs))
    finally:  # set_attention_backend also changes diffusers' process-wide default
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)


def test_diffusers_sees_xformers_after_the_alias(child_env):
    """In a fresh interpreter, as a user runs it: the alias, then diffusers."""
    code = """
    import json
    import triformers.as_xformers
    import diffusers
    from diffusers.models import attention_dispatch
    from diffusers.utils import is_xformers_available, is_xformers_version
    from xformers.ops import MemoryEfficientAttentionFlashAttentionOp
    print(json.dumps([is_xformers_available(), is_xformers_version(">=", "0.0.29"),
                      attention_dispatch._CAN_USE_XFORMERS_ATTN, len(MemoryEfficientAttentionFlashAttentionOp)]))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=child_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, True, True, 2]
