"""Residual paths and normalisation placements: pre-norm, post-norm and DeepNorm."""

from __future__ import annotations

from collections import namedtuple
from enum import Enum

import torch
from torch import nn


class ResidualNormStyle(str, Enum):
    """Where the norm goes: ``pre`` (x + f(norm(x))), ``post`` (norm(x + f(x))), ``deepnorm``
    (norm(alpha x + f(x)), Wang et al. 2022)."""

    Pre = "pre"
    Post = "post"
    DeepNorm = "deepnorm"


class NormalizationType(str, Enum):
    LayerNorm = "layernorm"
    Skip = "skip"


class _Skip(nn.Module):
    """Identity normalisation."""

    def __init__(self, *_, **__) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        return x


def fused_layer_norm_class() -> type[nn.Module] | None:
    """``triformers.triton.FusedLayerNorm`` if it can be imported, else None."""
    try:
        from triformers.triton import FusedLayerNorm
    except ImportError:
        return None
    return FusedLayerNorm


def get_normalization_layer(normalization_type: NormalizationType | str) -> type[nn.Module]:
    """The module class for a normalisation type (``nn.LayerNorm`` or an identity)."""
    return {NormalizationType.LayerNorm: nn.LayerNorm, NormalizationType.Skip: _Skip}[
        NormalizationType(normalization_type)
    ]


def _make_norm(d_norm: int, normalization, use_triton: bool) -> nn.Module:
    normalization = NormalizationType(normalization)
    fused = fused_layer_norm_class() if use_triton else None
    if fused is not None and normalization == NormalizationType.LayerNorm:
        return fused(d_norm)
    return get_normalization_layer(normalization)(d_norm)


class RequiresWrappedInputs:
    """Marks modules whose ``forward`` takes its tensors as one list: ``forward(inputs=[...], **kwargs)``."""


def _call(layer: nn.Module, wrap: bool, inputs: list[torch.Tensor], **kwargs) -> torch.Tensor:
    return layer(inputs=inputs, **kwargs) if wrap else layer(*inputs, **kwargs)


class Residual(nn.Module, RequiresWrappedInputs):
    """``inputs[0] * scale + layer(*inputs)`` (scale None means 1).

    Args:
        layer: the sublayer.
        scale: residual scale, DeepNorm's alpha (default None).
    """

    def __init__(self, layer: nn.Module, scale: float | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.scale = scale
        self.wrap_inputs = isinstance(layer, RequiresWrappedInputs)

    def forward(self, inputs: list[torch.Tensor], **kwargs) -> torch.Tensor:
        residue = inputs[0] * self.scale if self.scale is not None else inputs[0]
        return residue + _call(self.layer, self.wrap_inputs, inputs, **kwargs)


class PreNorm(nn.Module, RequiresWrappedInputs):
    """``sublayer(*[norm(x) for x in inputs])``; one tensor passed several times is normalised once.

    Args:
        d_norm: normalised features.
        sublayer: the wrapped layer.
        normalization: ``"layernorm"`` or ``"skip"``.
        use_triton: use ``triformers.triton.FusedLayerNorm`` when it is installed (default True).
    """

    def __init__(
        self, d_norm: int, sublayer: nn.Module, normalization="layernorm", use_triton: bool = True
    ) -> None:
        super().__init__()
        self.norm = _make_norm(d_norm, normalization, use_triton)
        self.sublayer = sublayer
        self.wrap_inputs = isinstance(sublayer, RequiresWrappedInputs)

    def forward(self, inputs: list[torch.Tensor], **kwargs) -> torch.Tensor:
        if not inputs:
            raise ValueError("PreNorm needs at least one input tensor")
        normed: dict[int, torch.Tensor] = {}
        inputs_normed = []
        for x in inputs:
            if id(x) not in normed:
                normed[id(x)] = self.norm(x)
            inputs_normed.append(normed[id(x)])
        return _call(self.sublayer, self.wrap_inputs, inputs_normed, **kwargs)


class PostNorm(nn.Module, RequiresWrappedInputs):
    """``norm(sublayer(*inputs))``; same arguments as :class:`PreNorm`."""

    def __init__(
        self, d_norm: int, sublayer: nn.Module, normalization="layernorm", use_triton: bool = True
    ) -> None:
        super().__init__()
        self.norm = _make_norm(d_norm, normalization, use_triton)
        self.sublayer = sublayer
        self.wrap_inputs = isinstance(sublayer, RequiresWrappedInputs)

    def forward(self, inputs: list[torch.Tensor], **kwargs) -> torch.Tensor:
        return self.norm(_call(self.sublayer, self.wrap_inputs, inputs, **kwargs))


DeepNormCoefficients = namedtuple("DeepNormCoefficients", ["alpha", "beta"])


def get_deepnorm_coefficients(
    encoder_layers: int, decoder_layers: int
) -> tuple[DeepNormCoefficients | None, DeepNormCoefficients | None]:
    """DeepNet's residual scale alpha and init gain beta for an (N encoder, M decoder) model.

    Encoder-only: ``alpha = (2N)^1/4, beta = (8N)^-1/4``; decoder-only: same with M. Encoder-decoder:
    encoder ``alpha = 0.81 (N^4 M)^1/16, beta = 0.87 (N^4 M)^-1/16``; decoder ``alpha = (3M)^1/4,
    beta = (12M)^-1/4``. Returns ``(encoder, decoder)``, None for an absent stack.
    """
    N, M = encoder_layers, decoder_layers
    encoder_coeffs, decoder_coeffs = None, None
    if M == 0:
        if N > 0:
            encoder_coeffs = DeepNormCoefficients(alpha=(2 * N) ** 0.25, beta=(8 * N) ** -0.25)
    elif N == 0:
        decoder_coeffs = DeepNormCoefficients(alpha=(2 * M) ** 0.25, beta=(8 * M) ** -0.25)
    else:
        encoder_coeffs = DeepNormCoefficients(
            alpha=0.81 * ((N**4) * M) ** 0.0625, beta=0.87 * ((N**4) * M) ** -0.0625
        )
        decoder_coeffs = DeepNormCoefficients(alpha=(3 * M) ** 0.25, beta=(12 * M) ** -0.25)
    return encoder_coeffs, decoder_coeffs
