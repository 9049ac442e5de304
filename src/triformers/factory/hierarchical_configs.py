"""Hierarchical (MetaFormer / PoolFormer / Swin-like) model configs: each stage trades tokens for width."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from triformers.components.residual import ResidualNormStyle


@dataclass
class BasicLayerConfig:
    """One stage: a patch embedding to ``embedding`` channels, then ``repeat_layer`` encoder layers.

    Attributes:
        embedding: channels of the stage.
        attention_mechanism: registered attention name.
        patch_size, stride, padding: the patch-embedding convolution.
        seq_len: tokens after the patch embedding.
        feedforward: registered feedforward name.
        normalization: ``"layernorm"`` or ``"skip"``.
        repeat_layer: encoder layers in the stage.
    """

    embedding: int
    attention_mechanism: str
    patch_size: int
    stride: int
    padding: int
    seq_len: int
    feedforward: str
    normalization: str = "layernorm"
    repeat_layer: int = 1


def get_hierarchical_configuration(
    layer_base_configs: list[BasicLayerConfig],
    residual_norm_style: ResidualNormStyle | str = ResidualNormStyle.Pre,
    use_rotary_embeddings: bool = True,
    mlp_multiplier: int = 4,
    in_channels: int = 3,
    dim_head: int | None = None,
) -> list[dict[str, Any]]:
    """The encoder stack dicts of a hierarchical model (for ``xFormerConfig``).

    Args:
        layer_base_configs: the stages, in order.
        residual_norm_style: residual/norm placement (default pre-norm).
        use_rotary_embeddings: rotary embeddings in the attentions (default True).
        mlp_multiplier: feedforward hidden multiplier (default 4).
        in_channels: input image channels (default 3).
        dim_head: per-head dimension; heads = embedding / dim_head (default None: one head).

    Raises:
        ValueError: if a stage's embedding is not a multiple of ``dim_head``.
    """
    base_config: dict[str, Any] = {
        "block_type": "encoder",
        "dim_model": 0,
        "use_triton": False,
        "residual_norm_style": ResidualNormStyle(residual_norm_style).value,
        "multi_head_config": {
            "num_heads": 1,
            "use_rotary_embeddings": use_rotary_embeddings,
            "attention": {"name": "TBD"},
        },
        "feedforward_config": {
            "name": "TBD",
            "activation": "gelu",
            "hidden_layer_multiplier": mlp_multiplier,
            "dropout": 0.0,
        },
        "position_encoding_config": {"name": "learnable", "seq_len": 0, "add_class_token": False},
        "patch_embedding_config": {"in_channels": in_channels, "kernel_size": 0, "stride": 0, "padding": 0},
    }
    stacks = []
    for stage in layer_base_configs:
        lc = copy.deepcopy(base_config)
        lc["normalization"] = stage.normalization
        lc["dim_model"] = stage.embedding
        lc["patch_embedding_config"] = {
            "in_channels": in_channels,
            "kernel_size": stage.patch_size,
            "stride": stage.stride,
            "padding": stage.padding,
        }
        in_channels = stage.embedding
        lc["position_encoding_config"]["seq_len"] = stage.seq_len
        if dim_head is not None:
            if stage.embedding % dim_head:
                raise ValueError(f"stage embedding {stage.embedding} is not a multiple of dim_head={dim_head}")
            lc["multi_head_config"]["num_heads"] = stage.embedding // dim_head
        lc["multi_head_config"]["attention"]["name"] = stage.attention_mechanism
        lc["feedforward_config"]["name"] = stage.feedforward
        stacks.append(lc)
        if stage.repeat_layer > 1:
            repeat = copy.deepcopy(lc)
            repeat.pop("patch_embedding_config")
            repeat.pop("position_encoding_config")
            repeat["num_layers"] = stage.repeat_layer - 1
            stacks.append(repeat)
    return stacks
