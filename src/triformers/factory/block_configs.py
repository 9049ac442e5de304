"""Typed configs of the encoder and decoder blocks (xFormers' ``factory/block_configs.py``).

Sub-configs are plain dicts (or Hydra DictConfigs): the block builders look the named components up in
the registries. The encoder/decoder configs fill ``dim_model`` into the sub-configs that lack it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from triformers.components._registry import generate_matching_config
from triformers.components.feedforward import FEEDFORWARD_REGISTRY, FeedforwardConfig
from triformers.components.positional_embedding import POSITION_EMBEDDING_REGISTRY, PositionEmbeddingConfig
from triformers.components.residual import NormalizationType, ResidualNormStyle


class LayerPositionBitmask(int, Enum):
    First = 0b01
    Last = 0b10
    Default = 0b11


class LayerPosition:
    """Marks a layer as first and/or last of the model (pose encoding on the first, final norm on the last)."""

    def __init__(self) -> None:
        self.bitmask = int(LayerPositionBitmask.Default)

    def is_first(self) -> bool:
        return bool(self.bitmask & LayerPositionBitmask.First)

    def is_last(self) -> bool:
        return bool(self.bitmask & LayerPositionBitmask.Last)

    def mark_not_first(self) -> None:
        self.bitmask &= ~LayerPositionBitmask.First

    def mark_not_last(self) -> None:
        self.bitmask &= ~LayerPositionBitmask.Last


class BlockType(str, Enum):
    Encoder = "encoder"
    Decoder = "decoder"


def to_dict(x: Any) -> Any:
    """Mappings (dicts, Hydra DictConfigs) to plain dicts, recursively; anything else unchanged."""
    if isinstance(x, Mapping):
        return {k: to_dict(v) for k, v in x.items()}
    return x


def _typed(config: Any, registry: dict, kind: str) -> Any:
    if config is None or not isinstance(config, Mapping):
        return config
    name = config.get("name")
    if name not in registry:
        raise KeyError(f"{kind} {name!r} is not registered (known: {', '.join(sorted(registry))})")
    return generate_matching_config(config, registry[name].config)


@dataclass(init=False)
class xFormerBlockConfig:
    """What every block config holds.

    Attributes:
        dim_model: model dimension.
        feedforward_config: typed feedforward config (from a dict with a registered ``name``).
        position_encoding_config: typed positional embedding config, or None.
        block_type: encoder or decoder.
        residual_norm_style: ``pre``, ``post`` or ``deepnorm``.
        normalization: ``layernorm`` or ``skip``.
        layer_position: first/last marks (set by the model).
        use_triton: use the fused LayerNorm when installed.
        reversible: build reversible layers (encoders only).
        num_layers: layers built from this config.
    """

    dim_model: int
    feedforward_config: FeedforwardConfig
    position_encoding_config: PositionEmbeddingConfig | None
    block_type: BlockType
    residual_norm_style: ResidualNormStyle
    normalization: NormalizationType
    layer_position: LayerPosition
    use_triton: bool
    reversible: bool
    num_layers: int

    def __init__(
        self,
        dim_model: int,
        feedforward_config: dict[str, Any],
        position_encoding_config: dict[str, Any] | None,
        block_type: BlockType | str,
        residual_norm_style: ResidualNormStyle | str = ResidualNormStyle.Post,
        normalization: NormalizationType | str = NormalizationType.LayerNorm,
        reversible: bool = False,
        num_layers: int = 1,
        layer_position: LayerPosition | None = None,
        use_triton: bool = True,
    ) -> None:
        self.dim_model = dim_model
        self.block_type = BlockType(block_type)
        self.residual_norm_style = ResidualNormStyle(residual_norm_style)
        self.normalization = NormalizationType(normalization)
        self.reversible = reversible
        self.num_layers = num_layers
        self.use_triton = use_triton
        self.feedforward_config = _typed(feedforward_config, FEEDFORWARD_REGISTRY, "feedforward")
        self.position_encoding_config = _typed(
            position_encoding_config, POSITION_EMBEDDING_REGISTRY, "positional embedding"
        )
        self.layer_position = layer_position if layer_position is not None else LayerPosition()


def _fill(config: Any, key: str, value: Any) -> Any:
    if isinstance(config, Mapping):
        config = to_dict(config)
        config.setdefault(key, value)
    return config


@dataclass(init=False)
class xFormerEncoderConfig(xFormerBlockConfig):
    """An encoder block: self-attention then feedforward, each in a residual path.

    Args:
        dim_model: model dimension.
        feedforward_config: dict with a registered feedforward ``name``.
        multi_head_config: MultiHeadDispatch dict (``num_heads``, ``attention`` dict, ...).
        position_encoding_config: dict with a registered positional embedding ``name`` (default None).
        residual_norm_style: ``"pre"``, ``"post"`` (default) or ``"deepnorm"``.
        normalization: ``"layernorm"`` (default) or ``"skip"``.
        use_triton: fused LayerNorm when installed (default True).
        simplicial_embeddings: ``{"L": ..., "temperature": ...}`` for the last layer (default None).
        patch_embedding_config: PatchEmbeddingConfig dict, ``out_channels`` defaults to dim_model; applied by
            the first layer of the stack.
        **kwargs: ``reversible``, ``num_layers``, ``layer_position``, ``block_type`` (must be "encoder").
    """

    multi_head_config: dict[str, Any]
    simplicial_embeddings: dict[str, Any] | None
    patch_embedding_config: dict[str, Any] | None

    def __init__(
        self,
        dim_model: int,
        feedforward_config: dict[str, Any],
        multi_head_config: dict[str, Any],
        position_encoding_config: dict[str, Any] | None = None,
        residual_norm_style: str = "post",
        normalization: NormalizationType | str = NormalizationType.LayerNorm,
        use_triton: bool = True,
        simplicial_embeddings: dict[str, Any] | None = None,
        patch_embedding_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        multi_head_config = _fill(multi_head_config, "dim_model", dim_model)
        feedforward_config = _fill(feedforward_config, "dim_model", dim_model)
        position_encoding_config = _fill(position_encoding_config, "dim_model", dim_model)
        patch_embedding_config = _fill(patch_embedding_config, "out_channels", dim_model)
        block_type = kwargs.pop("block_type", "encoder")
        if BlockType(block_type) != BlockType.Encoder:
            raise ValueError(f"xFormerEncoderConfig got block_type={block_type!r}; use xFormerDecoderConfig")
        super().__init__(
            dim_model=dim_model,
            feedforward_config=feedforward_config,
            position_encoding_config=position_encoding_config,
            block_type=BlockType.Encoder,
            residual_norm_style=residual_norm_style,
            normalization=normalization,
            use_triton=use_triton,
            **kwargs,
        )
        self.multi_head_config = multi_head_config
        self.simplicial_embeddings = to_dict(simplicial_embeddings)
        self.patch_embedding_config = patch_embedding_config


@dataclass(init=False)
class xFormerDecoderConfig(xFormerBlockConfig):
    """A decoder block: masked self-attention, cross-attention on the encoder output, feedforward.

    Args:
        dim_model: model dimension.
        feedforward_config: dict with a registered feedforward ``name``.
        multi_head_config_masked: MultiHeadDispatch dict of the self-attention.
        multi_head_config_cross: MultiHeadDispatch dict of the cross-attention.
        position_encoding_config: dict with a registered positional embedding ``name`` (default None).
        residual_norm_style, normalization, use_triton: as for the encoder.
        **kwargs: ``reversible`` (must be False), ``num_layers``, ``layer_position``, ``block_type``.
    """

    multi_head_config_masked: dict[str, Any]
    multi_head_config_cross: dict[str, Any]

    def __init__(
        self,
        dim_model: int,
        feedforward_config: dict[str, Any],
        multi_head_config_masked: dict[str, Any],
        multi_head_config_cross: dict[str, Any],
        position_encoding_config: dict[str, Any] | None = None,
        residual_norm_style: str = "post",
        normalization: NormalizationType | str = NormalizationType.LayerNorm,
        use_triton: bool = True,
        **kwargs: Any,
    ) -> None:
        multi_head_config_masked = _fill(multi_head_config_masked, "dim_model", dim_model)
        multi_head_config_cross = _fill(multi_head_config_cross, "dim_model", dim_model)
        feedforward_config = _fill(feedforward_config, "dim_model", dim_model)
        position_encoding_config = _fill(position_encoding_config, "dim_model", dim_model)
        block_type = kwargs.pop("block_type", "decoder")
        if BlockType(block_type) != BlockType.Decoder:
            raise ValueError(f"xFormerDecoderConfig got block_type={block_type!r}; use xFormerEncoderConfig")
        if kwargs.get("reversible"):
            raise ValueError("decoder blocks cannot be reversible; set reversible=False on decoder stacks")
        super().__init__(
            dim_model=dim_model,
            feedforward_config=feedforward_config,
            position_encoding_config=position_encoding_config,
            block_type=BlockType.Decoder,
            residual_norm_style=residual_norm_style,
            normalization=normalization,
            use_triton=use_triton,
            **kwargs,
        )
        self.multi_head_config_masked = multi_head_config_masked
        self.multi_head_config_cross = multi_head_config_cross
