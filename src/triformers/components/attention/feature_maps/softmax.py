"""Positive random features for the softmax kernel (Choromanski et al., "Rethinking Attention with
Performers").

With ``x`` scaled by ``D^-1/4`` (so that ``q.k`` becomes ``q.k / sqrt(D)``) and ``w_1..w_m`` random
directions, ``exp(q.k) = E_w[phi(q) phi(k)]`` for

- ``SMOrf``: ``phi(x) = exp(w.x - |x|²/2) / sqrt(m)``, w Gaussian-norm orthogonal blocks (Lemma 1, SM+ort);
- ``SMHyperbolic``: ``[exp(w.x), exp(-w.x)] * exp(-|x|²/2) / sqrt(m)`` with m/2 directions (SM-hyp+);
- ``SMReg``: as SMHyperbolic with directions of norm exactly sqrt(D) (regularised softmax kernel).

The projection is ``[D, m']``: ``ceil(m' / D)`` blocks of ``D`` orthogonal directions (Performer's ORF).
"""

from __future__ import annotations

import math
from enum import Enum, auto

import torch

from triformers.components.attention.feature_maps.base import FeatureMap


class NormDistribution(Enum):
    Xi = auto()
    Uniform = auto()


class SoftMaxPositiveEstimators(FeatureMap):
    """Shared scaling of the softmax estimators.

    Args:
        dim_features: number of features m.
        iter_before_redraw: see :class:`FeatureMap`.
        normalize_inputs: subtract the batch maximum of the exponent (cancels in the attention ratio).
        epsilon: kept for xFormers compatibility.
        softmax_temp: input scale; negative means ``D^-1/4`` (default -1).
    """

    def __init__(
        self,
        dim_features: int,
        iter_before_redraw: int | None = None,
        normalize_inputs: bool = False,
        epsilon: float = 1e-6,
        softmax_temp: float = -1,
    ) -> None:
        super().__init__(dim_features, iter_before_redraw, normalize_inputs, epsilon)
        self.softmax_temp = softmax_temp
        self.h_scale = math.log(math.sqrt(self.dim_features))  # the 1/sqrt(m) factor, applied in log space

    def pre_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Redraw the projection if due, scale x and set ``self.offset = -|x|²/2 - log sqrt(m)``."""
        redraw = self.features is None or self.features.device != x.device or self.features.shape[0] != x.shape[-1]
        if self.training and self.iter_before_redraw is not None:
            redraw = redraw or self._iter_counter >= self.iter_before_redraw
            self._iter_counter += 1
        if redraw:
            self._iter_counter = 1 if self.training else 0
            self.features = self._get_feature_map(x.shape[-1], self.dim_feature_map, x.device)
        temp = self.softmax_temp if self.softmax_temp >= 0 else x.shape[-1] ** -0.25
        x_scaled = x * temp
        self.offset = -0.5 * (x_scaled * x_scaled).sum(-1, keepdim=True) - self.h_scale
        return x_scaled

    def _stabilise(self, arg: torch.Tensor) -> torch.Tensor:
        if self.normalize_inputs:
            # one constant per batch entry: it cancels between the numerator and the normaliser
            arg = arg - arg.detach().amax(dim=(-2, -1), keepdim=True)
        return arg

    @staticmethod
    @torch.no_grad()
    def _get_random_ortho_matrix(
        blocks: int,
        dim: int,
        device: torch.device,
        norm_distribution: NormDistribution = NormDistribution.Uniform,
    ) -> torch.Tensor:
        """``[blocks, dim, dim]``: Haar-random orthogonal matrices (QR with sign fix, Mezzadri 2007), rows
        rescaled to chi(dim)-distributed norms (Xi, as Gaussian vectors) or kept unit norm (Uniform)."""
        H = torch.randn((blocks, dim, dim), device=device)
        Q, R = torch.linalg.qr(H)
        Q = torch.diag_embed(torch.sign(torch.diagonal(R, dim1=1, dim2=2))) @ Q
        if norm_distribution == NormDistribution.Xi:
            norms = torch.randn((blocks, dim, dim), device=device).norm(dim=-1)
            return norms.unsqueeze(-1) * Q
        return Q

    def _orthogonal_directions(self, dim_input: int, dim_features: int, device, norm: NormDistribution):
        blocks = math.ceil(dim_features / dim_input)
        w = self._get_random_ortho_matrix(blocks, dim_input, device, norm)  # rows are directions
        return w.flatten(0, 1)[:dim_features].t().contiguous()  # [D, m']


class SMOrf(SoftMaxPositiveEstimators):
    """Positive orthogonal random features (SM+ort), Performer Lemma 1."""

    @torch.no_grad()
    def _get_feature_map(self, dim_input: int, dim_features: int, device: torch.device) -> torch.Tensor:
        return self._orthogonal_directions(dim_input, dim_features, device, NormDistribution.Xi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_scaled = self.pre_scale(x)
        return torch.exp(self._stabilise(x_scaled @ self.features.to(x.dtype) + self.offset))


class _PlusMinus(SoftMaxPositiveEstimators):
    def __init__(self, dim_features: int, *args, **kwargs) -> None:
        super().__init__(dim_features, *args, **kwargs)
        if dim_features % 2:
            raise ValueError(
                f"{type(self).__name__} concatenates +/- features: dim_features must be even, got {dim_features}"
            )
        self.dim_feature_map = dim_features // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_scaled = self.pre_scale(x)
        proj = x_scaled @ self.features.to(x.dtype)
        arg = torch.cat([proj + self.offset, -proj + self.offset], dim=-1)
        return torch.exp(self._stabilise(arg))


class SMHyperbolic(_PlusMinus):
    """Hyperbolic positive random features (SM-hyp+): ``cosh`` representation of the softmax kernel."""

    @torch.no_grad()
    def _get_feature_map(self, dim_input: int, dim_features: int, device: torch.device) -> torch.Tensor:
        return self._orthogonal_directions(dim_input, dim_features, device, NormDistribution.Xi)


class SMReg(_PlusMinus):
    """Regularised softmax kernel (SMREG+): hyperbolic features with directions of norm sqrt(D)."""

    @torch.no_grad()
    def _get_feature_map(self, dim_input: int, dim_features: int, device: torch.device) -> torch.Tensor:
        w = self._orthogonal_directions(dim_input, dim_features, device, NormDistribution.Uniform)
        return w * math.sqrt(dim_input)
