"""A whole model from stacks of encoder/decoder block configs (xFormers' ``factory/model_factory.py``)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triformers.components.residual import ResidualNormStyle, get_deepnorm_coefficients
from triformers.components.reversible import ReversibleSequence
from triformers.factory.block_configs import (
    LayerPosition,
    to_dict,
    xFormerBlockConfig,
    xFormerDecoderConfig,
    xFormerEncoderConfig,
)
from triformers.factory.block_factory import _pose_encoding, xFormerDecoderBlock, xFormerEncoderBlock
from triformers.factory.weight_init import get_weight_init_fn, xFormerWeightInit

logger = logging.getLogger(__name__)


def _typed_block_config(config: Any) -> xFormerBlockConfig:
    if isinstance(config, xFormerBlockConfig):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"a stack config must be a dict or an xFormerBlockConfig, got {type(config).__name__}")
    config = to_dict(config)
    block_type = config.get("block_type")
    if block_type == "encoder":
        return xFormerEncoderConfig(**config)
    if block_type == "decoder":
        return xFormerDecoderConfig(**config)
    raise ValueError(f"stack config block_type must be 'encoder' or 'decoder', got {block_type!r}")


@dataclass(init=False)
class xFormerConfig:
    """The stacks of a model and how to initialise it.

    Args:
        stack_configs: list (or dict name -> config) of block config dicts, each with ``block_type``
            ``"encoder"`` or ``"decoder"`` (or typed block configs).
        tie_embedding_weights: share the encoder and decoder positional embeddings (default False).
        weight_init: ``"vit"`` (default), ``"timm"``, ``"moco"`` or ``"small"``.
    """

    stack_configs: list[xFormerBlockConfig] | dict[str, xFormerBlockConfig]
    tie_embedding_weights: bool = False
    weight_init: xFormerWeightInit = xFormerWeightInit.ViT

    def __init__(
        self,
        stack_configs: Sequence[Any] | Mapping[str, Any],
        tie_embedding_weights: bool = False,
        weight_init: xFormerWeightInit | str = xFormerWeightInit.ViT,
    ) -> None:
        if isinstance(stack_configs, Mapping):
            self.stack_configs = {k: _typed_block_config(c) for k, c in stack_configs.items()}
        else:
            self.stack_configs = [_typed_block_config(c) for c in stack_configs]
        self.tie_embedding_weights = tie_embedding_weights
        self.weight_init = xFormerWeightInit(weight_init)


class xFormer(nn.Module):
    """Encoder and/or decoder stacks built from block configs.

    ``forward(src, tgt=None, encoder_input_mask=None, decoder_input_mask=None)``: the encoders map ``src`` to
    a memory (returned when there is no decoder); the decoders map ``tgt`` (default ``src``) attending to it.
    Shapes follow the first block: ``[B, S]`` token ids with a ``vocab`` embedding, else ``[B, S, E]`` (or
    images ``[B, C, H, W]`` with a patch embedding); outputs ``[B, S, E]``.

    Args:
        stack_configs: one block config, a list of them or a dict of them (dicts are accepted too).
        tie_embedding_weights: share the first encoder's positional embedding with the first decoder.
        weight_init: ``xFormerWeightInit`` choice (default ``vit``).

    Raises:
        ValueError: on inconsistent stacks (mixed reversible encoders, DeepNorm on some stacks only,
            decoders without an encoder, reversible layers with DeepNorm or tied embeddings).
    """

    def __init__(
        self,
        stack_configs: Any,
        tie_embedding_weights: bool = False,
        weight_init: xFormerWeightInit | str = xFormerWeightInit.ViT,
    ) -> None:
        super().__init__()
        if isinstance(stack_configs, Mapping) and "block_type" not in stack_configs:
            stack_configs = list(stack_configs.values())
        if not isinstance(stack_configs, (list, tuple)):
            stack_configs = [stack_configs]
        stack_configs = [_typed_block_config(c) for c in stack_configs]
        self._verify_reversible(stack_configs)
        self._verify_deepnorm(stack_configs)
        if any(isinstance(c, xFormerDecoderConfig) for c in stack_configs) and not any(
            isinstance(c, xFormerEncoderConfig) for c in stack_configs
        ):
            raise ValueError(
                "decoder blocks cross-attend to an encoder output but no encoder stack is configured; for a "
                "decoder-only (GPT) model use encoder blocks with causal attention"
            )

        encoders: list[nn.Module] = []
        decoders: list[nn.Module] = []
        self.reversible_encoder = False
        self.rev_enc_pose_encoding = None
        total = sum(c.num_layers for c in stack_configs)
        built = 0
        for config in stack_configs:
            is_encoder = isinstance(config, xFormerEncoderConfig)
            recipient = encoders if is_encoder else decoders
            for i in range(config.num_layers):
                layer_config = copy.copy(config)  # each layer gets its own first/last marks
                layer_config.layer_position = LayerPosition()
                if i > 0 and is_encoder:
                    layer_config.patch_embedding_config = None  # a stack's patch embedding opens it once
                if recipient:
                    layer_config.layer_position.mark_not_first()
                built += 1
                if built < total:
                    layer_config.layer_position.mark_not_last()
                if config.reversible:
                    if layer_config.layer_position.is_first() and layer_config.position_encoding_config is not None:
                        pose, projector = _pose_encoding(layer_config, layer_config.multi_head_config["dim_model"])
                        self.rev_enc_pose_encoding = pose if projector is None else nn.Sequential(pose, projector)
                    self.reversible_encoder = True
                    f, g = xFormerEncoderBlock.get_reversible_layer(layer_config)
                    recipient.append(nn.ModuleList([f, g]))
                else:
                    builder = xFormerEncoderBlock if is_encoder else xFormerDecoderBlock
                    recipient.append(builder.from_config(layer_config))

        if tie_embedding_weights:
            if self.reversible_encoder:
                raise ValueError("tied embeddings are not supported with reversible layers")
            if (
                encoders
                and decoders
                and encoders[0].pose_encoding is not None
                and decoders[0].pose_encoding is not None
            ):
                logger.info("tying encoder and decoder embeddings")
                encoders[0].pose_encoding = decoders[0].pose_encoding
        self.encoders: nn.Module = (
            ReversibleSequence(nn.ModuleList(encoders)) if self.reversible_encoder else nn.ModuleList(encoders)
        )
        self.decoders = nn.ModuleList(decoders)
        use_deepnorm = stack_configs[0].residual_norm_style == ResidualNormStyle.DeepNorm
        if use_deepnorm and self.reversible_encoder:
            raise ValueError("reversible layers and DeepNorm cannot be combined")
        self.init_weights(weight_init=xFormerWeightInit(weight_init), use_deep_norm=use_deepnorm)

    @classmethod
    def from_config(cls, config: xFormerConfig) -> xFormer:
        return cls(config.stack_configs, config.tie_embedding_weights, config.weight_init)

    def _verify_reversible(self, stack_configs: list[xFormerBlockConfig]) -> None:
        reversible = [c.reversible for c in stack_configs if isinstance(c, xFormerEncoderConfig)]
        if len(set(reversible)) > 1:
            raise ValueError("all encoder stacks must share the same `reversible` setting")

    def _verify_deepnorm(self, stack_configs: list[xFormerBlockConfig]) -> None:
        deepnorm = [c.residual_norm_style == ResidualNormStyle.DeepNorm for c in stack_configs]
        if any(deepnorm) and not all(deepnorm):
            raise ValueError("DeepNorm must be used by every stack or by none (its init depends on all of them)")

    def init_weights(self, weight_init: xFormerWeightInit, use_deep_norm: bool) -> None:
        """Initialise every stack; with DeepNorm the gains are each stack's beta."""
        encoder_gain, decoder_gain = 1.0, 1.0
        if use_deep_norm:
            n_enc = len(self.encoders) if isinstance(self.encoders, nn.ModuleList) else len(self.encoders.blocks)
            enc, dec = get_deepnorm_coefficients(encoder_layers=n_enc, decoder_layers=len(self.decoders))
            encoder_gain = enc.beta if enc is not None else 1.0
            decoder_gain = dec.beta if dec is not None else 1.0
        init_fn = get_weight_init_fn(weight_init)
        for name, module in self.encoders.named_children():
            init_fn(module=module, name=name, gain=encoder_gain, deepnorm_style=use_deep_norm)
        for name, module in self.decoders.named_children():
            init_fn(module=module, name=name, gain=decoder_gain, deepnorm_style=use_deep_norm)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor | None = None,
        encoder_input_mask: torch.Tensor | None = None,
        decoder_input_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        memory = src.clone()
        if isinstance(self.encoders, nn.ModuleList):
            for encoder in self.encoders:
                memory = encoder(memory, input_mask=encoder_input_mask)
        elif len(self.encoders.blocks) > 0:
            if self.rev_enc_pose_encoding is not None:
                memory = self.rev_enc_pose_encoding(src)
            x = torch.cat([memory, memory], dim=-1)
            if encoder_input_mask is not None:
                x = x * encoder_input_mask.unsqueeze(-1).to(x.dtype)
            x = self.encoders(x)
            memory = torch.stack(x.chunk(2, dim=-1)).mean(dim=0)
        if not self.decoders:
            return memory
        tgt = src.clone() if tgt is None else tgt
        for decoder in self.decoders:
            tgt = decoder(target=tgt, memory=memory, input_mask=decoder_input_mask)
        return tgt
