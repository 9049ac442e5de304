"""Models from configuration: block configs, block factory, the ``xFormer`` model and weight inits."""

from triformers.components.attention import AttentionConfig
from triformers.components.feedforward import FeedforwardConfig
from triformers.components.multi_head_dispatch import MultiHeadDispatchConfig
from triformers.components.positional_embedding import PositionEmbeddingConfig
from triformers.factory.block_configs import (
    BlockType,
    LayerPosition,
    LayerPositionBitmask,
    xFormerBlockConfig,
    xFormerDecoderConfig,
    xFormerEncoderConfig,
)
from triformers.factory.block_factory import xFormerDecoderBlock, xFormerEncoderBlock
from triformers.factory.hierarchical_configs import BasicLayerConfig, get_hierarchical_configuration
from triformers.factory.model_factory import xFormer, xFormerConfig
from triformers.factory.weight_init import xFormerWeightInit

__all__ = [
    "AttentionConfig",
    "BasicLayerConfig",
    "BlockType",
    "FeedforwardConfig",
    "LayerPosition",
    "LayerPositionBitmask",
    "MultiHeadDispatchConfig",
    "PositionEmbeddingConfig",
    "get_hierarchical_configuration",
    "xFormer",
    "xFormerBlockConfig",
    "xFormerConfig",
    "xFormerDecoderBlock",
    "xFormerDecoderConfig",
    "xFormerEncoderBlock",
    "xFormerEncoderConfig",
    "xFormerWeightInit",
]
