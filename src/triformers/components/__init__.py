"""Building blocks: attention zoo, feedforwards, positional embeddings, activations, multi-head dispatch.

Importing this package fills the registries (``ATTENTION_REGISTRY``, ``FEEDFORWARD_REGISTRY``,
``POSITION_EMBEDDING_REGISTRY``) through the explicit imports of its subpackages.
"""

from triformers.components.activations import Activation, build_activation
from triformers.components.attention import (
    ATTENTION_REGISTRY,
    Attention,
    AttentionConfig,
    build_attention,
    register_attention,
)
from triformers.components.feedforward import (
    FEEDFORWARD_REGISTRY,
    Feedforward,
    FeedforwardConfig,
    build_feedforward,
    register_feedforward,
)
from triformers.components.in_proj_container import InputProjection, InputProjectionConfig
from triformers.components.multi_head_dispatch import (
    MultiHeadDispatch,
    MultiHeadDispatchConfig,
    build_multi_head_attention,
)
from triformers.components.patch_embedding import PatchEmbeddingConfig, build_patch_embedding
from triformers.components.positional_embedding import (
    POSITION_EMBEDDING_REGISTRY,
    PositionEmbedding,
    PositionEmbeddingConfig,
    build_positional_embedding,
    register_positional_embedding,
)
from triformers.components.residual import (
    NormalizationType,
    PostNorm,
    PreNorm,
    RequiresWrappedInputs,
    Residual,
    ResidualNormStyle,
)

__all__ = [
    "ATTENTION_REGISTRY",
    "FEEDFORWARD_REGISTRY",
    "POSITION_EMBEDDING_REGISTRY",
    "Activation",
    "Attention",
    "AttentionConfig",
    "Feedforward",
    "FeedforwardConfig",
    "InputProjection",
    "InputProjectionConfig",
    "MultiHeadDispatch",
    "MultiHeadDispatchConfig",
    "NormalizationType",
    "PatchEmbeddingConfig",
    "PositionEmbedding",
    "PositionEmbeddingConfig",
    "PostNorm",
    "PreNorm",
    "RequiresWrappedInputs",
    "Residual",
    "ResidualNormStyle",
    "build_activation",
    "build_attention",
    "build_feedforward",
    "build_multi_head_attention",
    "build_patch_embedding",
    "build_positional_embedding",
    "register_attention",
    "register_feedforward",
    "register_positional_embedding",
]
