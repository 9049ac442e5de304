"""Encoder and decoder blocks built from their configs (xFormers' ``factory/block_factory.py``)."""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from torch import nn

from triformers.components.feedforward import build_feedforward
from triformers.components.multi_head_dispatch import build_multi_head_attention
from triformers.components.patch_embedding import PatchEmbeddingConfig, build_patch_embedding
from triformers.components.positional_embedding import build_positional_embedding
from triformers.components.residual import (
    NormalizationType,
    PostNorm,
    PreNorm,
    RequiresWrappedInputs,
    Residual,
    ResidualNormStyle,
    get_deepnorm_coefficients,
)
from triformers.components.simplicial_embedding import SimplicialEmbedding
from triformers.factory.block_configs import (  # noqa: F401  (re-exported: Hydra targets name this module)
    BlockType,
    LayerPosition,
    xFormerBlockConfig,
    xFormerDecoderConfig,
    xFormerEncoderConfig,
)

logger = logging.getLogger(__name__)


def _get_ln_factory(
    d_model: int,
    residual_norm_style: ResidualNormStyle,
    use_triton: bool,
    residual: bool,
    normalization: NormalizationType = NormalizationType.LayerNorm,
    residual_scale: float = 1.0,
):
    """A function wrapping a sublayer in its norm and residual path.

    pre: ``Residual(PreNorm(f))`` = x + f(norm(x)); post: ``PostNorm(Residual(f))`` = norm(x + f(x));
    deepnorm: ``PostNorm(Residual(f, alpha))`` = norm(alpha x + f(x)). Without ``residual``: the norm only.
    """

    def ln_factory(sublayer: nn.Module) -> nn.Module:
        if residual:
            if residual_norm_style == ResidualNormStyle.Pre:
                return Residual(layer=PreNorm(d_model, sublayer, normalization, use_triton), scale=None)
            if residual_norm_style == ResidualNormStyle.Post:
                return PostNorm(d_model, Residual(layer=sublayer, scale=None), normalization, use_triton)
            if residual_norm_style == ResidualNormStyle.DeepNorm:
                return PostNorm(d_model, Residual(layer=sublayer, scale=residual_scale), normalization, use_triton)
            raise ValueError(f"unknown residual_norm_style {residual_norm_style!r}")
        if residual_norm_style == ResidualNormStyle.Pre:
            return PreNorm(d_model, sublayer, normalization, use_triton)
        return PostNorm(d_model, sublayer, normalization, use_triton)

    return ln_factory


class _ReversibleBranch(nn.Module):
    """Adapts a wrapped sublayer to the ``f(x, **kwargs)`` calls of a reversible block."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if isinstance(self.layer, RequiresWrappedInputs):
            return self.layer(inputs=[x], **kwargs)
        return self.layer(x, **kwargs)


def _pose_encoding(config: xFormerBlockConfig, mha_dim: int) -> tuple[nn.Module | None, nn.Module | None]:
    if config.position_encoding_config is None or not config.layer_position.is_first():
        return None, None
    pose = build_positional_embedding(asdict(config.position_encoding_config))
    pos_dim = config.position_encoding_config.dim_model
    projector = None
    if pos_dim != mha_dim:
        logger.info("embedding dim %d != model dim %d: adding a projection", pos_dim, mha_dim)
        projector = nn.Linear(pos_dim, mha_dim)
    return pose, projector


class xFormerEncoderBlock(nn.Module):
    """Encoder block: ``[patch embedding] -> [positions] -> self-attention -> feedforward -> [simplicial]``.

    ``forward(x, att_mask=None, input_mask=None)``: ``input_mask`` ``[B, S]`` (1 keep, 0 drop) zeroes the
    dropped tokens in the keys and values.
    """

    def __init__(self, config: xFormerEncoderConfig, **kwargs) -> None:
        super().__init__()
        self.residual_norm_style = config.residual_norm_style
        self.dim_model = config.dim_model
        self.pose_encoding, projector = _pose_encoding(config, config.multi_head_config["dim_model"])
        if projector is not None:
            self.embedding_projector = projector
        residual_scale = 1.0
        if config.residual_norm_style == ResidualNormStyle.DeepNorm:
            # the DeepNorm init gain is applied by the model, which knows every stack
            coefficients, _ = get_deepnorm_coefficients(encoder_layers=config.num_layers, decoder_layers=0)
            residual_scale = coefficients.alpha
        ln_factory = _get_ln_factory(
            config.dim_model,
            config.residual_norm_style,
            use_triton=config.use_triton,
            residual=True,
            residual_scale=residual_scale,
            normalization=config.normalization,
        )
        mha = build_multi_head_attention(config.multi_head_config)
        feedforward = build_feedforward(asdict(config.feedforward_config))
        self.supports_attention_mask = mha.attention.supports_attention_mask
        self.requires_same_k_q_dimensions = mha.attention.requires_same_k_q_dimensions
        self.causal = getattr(mha.attention, "causal", False)
        self.wrap_att = ln_factory(mha)
        self.wrap_ff = ln_factory(feedforward)
        if config.residual_norm_style == ResidualNormStyle.Pre and config.layer_position.is_last():
            self.wrap_ff = PostNorm(config.dim_model, self.wrap_ff, config.normalization, config.use_triton)
        self.simplicial_embedding = None
        if config.simplicial_embeddings is not None and config.layer_position.is_last():
            self.simplicial_embedding = SimplicialEmbedding(**config.simplicial_embeddings)
        self.patch_emb = None
        if config.patch_embedding_config is not None:
            self.patch_emb = build_patch_embedding(PatchEmbeddingConfig(**config.patch_embedding_config))

    @classmethod
    def from_config(cls, config: xFormerEncoderConfig) -> xFormerEncoderBlock:
        return cls(config)

    @staticmethod
    def get_reversible_layer(config: xFormerEncoderConfig) -> tuple[nn.Module, nn.Module]:
        """The ``(f, g)`` pair of a reversible layer: norm-wrapped attention and feedforward, no residual."""
        ln_factory = _get_ln_factory(
            config.dim_model,
            config.residual_norm_style,
            residual=False,
            use_triton=config.use_triton,
            normalization=config.normalization,
        )
        mha = build_multi_head_attention(config.multi_head_config)
        feedforward = build_feedforward(asdict(config.feedforward_config))
        return _ReversibleBranch(ln_factory(mha)), _ReversibleBranch(ln_factory(feedforward))

    def forward(
        self, x: torch.Tensor, att_mask: torch.Tensor | None = None, input_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.patch_emb is not None:
            x = self.patch_emb(x)
        if self.pose_encoding is not None:
            x = self.pose_encoding(x)
            if hasattr(self, "embedding_projector"):
                x = self.embedding_projector(x)
        if input_mask is not None:
            q, k = x, x * input_mask.unsqueeze(-1).to(x.dtype)
            v = k
        else:
            q = k = v = x
        x = self.wrap_att(inputs=[q, k, v], att_mask=att_mask)
        x = self.wrap_ff(inputs=[x])
        if self.simplicial_embedding is not None:
            x = self.simplicial_embedding(x)
        return x


class xFormerDecoderBlock(nn.Module):
    """Decoder block: ``[positions] -> masked self-attention -> cross-attention(memory) -> feedforward``.

    ``forward(target, memory, encoder_att_mask=None, decoder_att_mask=None, input_mask=None)``.
    """

    def __init__(self, config: xFormerDecoderConfig, **kwargs) -> None:
        super().__init__()
        self.pose_encoding, projector = _pose_encoding(config, config.multi_head_config_masked["dim_model"])
        if projector is not None:
            self.embedding_projector = projector
        residual_scale = 1.0
        if config.residual_norm_style == ResidualNormStyle.DeepNorm:
            _, coefficients = get_deepnorm_coefficients(encoder_layers=0, decoder_layers=config.num_layers)
            residual_scale = coefficients.alpha
        ln_factory = _get_ln_factory(
            config.dim_model,
            config.residual_norm_style,
            use_triton=config.use_triton,
            residual=True,
            residual_scale=residual_scale,
            normalization=config.normalization,
        )
        mha = build_multi_head_attention(config.multi_head_config_masked)
        cross_mha = build_multi_head_attention(config.multi_head_config_cross)
        feedforward = build_feedforward(asdict(config.feedforward_config))
        self.supports_attention_mask = mha.attention.supports_attention_mask
        self.requires_same_k_q_dimensions = mha.attention.requires_same_k_q_dimensions
        self.requires_squared_context = mha.attention.requires_squared_context
        self.causal_attention = getattr(mha.attention, "causal", False)
        self.wrap_att = ln_factory(mha)
        self.wrap_cross = ln_factory(cross_mha)
        self.wrap_ff = ln_factory(feedforward)
        if config.residual_norm_style == ResidualNormStyle.Pre and config.layer_position.is_last():
            self.wrap_ff = PostNorm(config.dim_model, self.wrap_ff, config.normalization, config.use_triton)

    @classmethod
    def from_config(cls, config: xFormerDecoderConfig) -> xFormerDecoderBlock:
        return cls(config)

    def forward(
        self,
        target: torch.Tensor,
        memory: torch.Tensor,
        encoder_att_mask: torch.Tensor | None = None,
        decoder_att_mask: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.pose_encoding is not None:
            target = self.pose_encoding(target)
            if hasattr(self, "embedding_projector"):
                target = self.embedding_projector(target)
        if input_mask is not None:
            target_q, target_k = target, target * input_mask.unsqueeze(-1).to(target.dtype)
            target_v = target_k
        else:
            target_q = target_k = target_v = target
        x = self.wrap_att(inputs=[target_q, target_k, target_v], att_mask=decoder_att_mask)
        x = self.wrap_cross(inputs=[x, memory, memory], att_mask=encoder_att_mask)
        return self.wrap_ff(inputs=[x])
