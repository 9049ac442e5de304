"""Hierarchical (MetaFormer) configurations: stages that trade tokens for channels."""

import pytest
import torch

from triformers.factory import BasicLayerConfig, get_hierarchical_configuration, xFormer, xFormerConfig


def _stages(attention="scaled_dot_product"):
    return [
        BasicLayerConfig(embedding=16, attention_mechanism=attention, patch_size=3, stride=2, padding=1,
                         seq_len=64, feedforward="MLP", repeat_layer=2),
        BasicLayerConfig(embedding=32, attention_mechanism=attention, patch_size=3, stride=2, padding=1,
                         seq_len=16, feedforward="Conv2DFeedforward"),
    ]  # fmt: skip


def test_configuration_dicts():
    stacks = get_hierarchical_configuration(_stages(), dim_head=8, in_channels=3)
    assert len(stacks) == 3  # stage 1, its repeats, stage 2
    first, repeat, second = stacks
    assert first["patch_embedding_config"] == {"in_channels": 3, "kernel_size": 3, "stride": 2, "padding": 1}
    assert second["patch_embedding_config"]["in_channels"] == 16
    assert "patch_embedding_config" not in repeat and repeat["num_layers"] == 1
    assert first["multi_head_config"]["num_heads"] == 2 and second["multi_head_config"]["num_heads"] == 4
    assert first["residual_norm_style"] == "pre"
    with pytest.raises(ValueError, match="dim_head"):
        get_hierarchical_configuration(_stages(), dim_head=5)


@pytest.mark.parametrize("attention", ["scaled_dot_product", "pooling"])
def test_metaformer_trunk_runs_on_images(attention):
    config = xFormerConfig(get_hierarchical_configuration(_stages(attention), dim_head=8), weight_init="moco")
    trunk = xFormer.from_config(config)
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = trunk(images)
    assert out.shape == (2, 16, 32)  # 16x16 -> 8x8 (64 tokens, 16 ch) -> 4x4 (16 tokens, 32 ch)
    out.sum().backward()
    assert torch.isfinite(images.grad).all()


def test_a_stack_patch_embedding_opens_it_once():
    cfg = {
        "block_type": "encoder", "num_layers": 3, "dim_model": 16, "use_triton": False,
        "patch_embedding_config": {"in_channels": 3, "kernel_size": 4, "stride": 4},
        "multi_head_config": {"num_heads": 2, "attention": {"name": "scaled_dot_product", "dropout": 0.0}},
        "feedforward_config": {"name": "MLP", "dropout": 0.0, "activation": "gelu", "hidden_layer_multiplier": 2},
    }  # fmt: skip
    model = xFormer.from_config(xFormerConfig([cfg]))
    assert [b.patch_emb is not None for b in model.encoders] == [True, False, False]
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 16, 16)
