"""Orthoformer (Patrick et al., 2021, "Keeping your eye on the ball"): attention through landmark queries."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from triformers.components.attention._registry import register_attention
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.base import Attention, AttentionConfig
from triformers.components.attention.core import scaled_dot_product_attention, scaled_query_key_softmax
from triformers.components.attention.utils import bool_mask_to_additive


class LandmarkSelection(str, Enum):
    Orthogonal = "orthogonal"
    KMeans = "kmeans"
    KMeans_Spherical = "kmeans_spherical"
    Random = "random"


@dataclass
class OrthoformerAttentionConfig(AttentionConfig):
    num_landmarks: int | None
    subsample_fraction: float | None
    landmark_selection: LandmarkSelection | None


@register_attention("orthoformer", OrthoformerAttentionConfig)
class OrthoFormerAttention(Attention):
    r"""``softmax(q L^T / sqrt(D)) softmax(L k^T / sqrt(D)) v`` with landmarks L chosen among the queries.

    Exact softmax attention when ``num_landmarks >= S``. With fewer landmarks, a mask is honoured when it
    masks keys (the same pattern for every query: a padding mask), in the landmark-to-key softmax; a
    query-dependent mask cannot be, and raises.

    Shapes: q, k ``[N, S, D]``, v ``[N, S, Dv]`` -> ``[N, S, Dv]``.

    Args:
        dropout: dropout on the output.
        num_landmarks: landmarks (default 32).
        subsample_fraction: pick landmarks among this fraction of the queries (default 1.0).
        landmark_selection: ``orthogonal`` (greedy, most orthogonal query next; starts from the query of
            largest norm, so results do not depend on the batch order), ``kmeans``, ``kmeans_spherical`` or
            ``random`` (default orthogonal).
    """

    def __init__(
        self,
        dropout: float,
        num_landmarks: int = 32,
        subsample_fraction: float = 1.0,
        landmark_selection: LandmarkSelection | str = LandmarkSelection.Orthogonal,
        *args,
        **kwargs,
    ) -> None:
        super().__init__()
        self.attn_drop = nn.Dropout(dropout)
        self.num_landmarks = num_landmarks
        self.subsample_fraction = subsample_fraction
        self.landmark_selection = LandmarkSelection(landmark_selection)

    def _samples(self, q: torch.Tensor) -> torch.Tensor:
        if self.subsample_fraction >= 1.0:
            return q
        num_samples = max(int(self.subsample_fraction * q.size(-2)), self.num_landmarks)
        return q[:, torch.randperm(q.size(-2), device=q.device)[:num_samples]]

    @torch.no_grad()
    def _compute_orthogonal_landmarks(self, q: torch.Tensor) -> torch.Tensor:
        """Greedy: start from the largest-norm query, then add the query whose largest absolute cosine
        similarity to the chosen ones is smallest. ``[N, M, D]``."""
        x = self._samples(q)
        N, S, D = x.shape
        xn = F.normalize(x.float(), p=2, dim=-1)  # float32 similarities: fewer spurious ties in half precision
        rows = torch.arange(N, device=x.device)
        idx = x.float().norm(dim=-1).argmax(-1)  # [N]
        chosen = torch.zeros(N, S, dtype=torch.bool, device=x.device)
        chosen[rows, idx] = True
        max_sim = torch.zeros(N, S, dtype=torch.float32, device=x.device)
        picks = [idx]
        for _ in range(1, self.num_landmarks):
            sim = (xn @ xn[rows, idx].unsqueeze(-1)).squeeze(-1).abs()  # [N, S]
            max_sim = torch.maximum(max_sim, sim)
            idx = max_sim.masked_fill(chosen, float("inf")).argmin(-1)
            chosen[rows, idx] = True
            picks.append(idx)
        return x[rows[:, None], torch.stack(picks, dim=1)]

    @torch.no_grad()
    def _cluster_landmarks(self, q: torch.Tensor, spherical: bool = False, num_iters: int = 6) -> torch.Tensor:
        x = self._samples(q)
        if spherical:
            x = F.normalize(x, p=2, dim=-1)
        N, S, D = x.shape
        K = min(self.num_landmarks, S)
        c = x[:, torch.randperm(S, device=x.device)[:K]].clone()
        ones = x.new_ones((N, S))
        for _ in range(num_iters):
            if spherical:
                cl = (x @ c.transpose(1, 2)).argmax(dim=-1)  # [N, S]
            else:
                cl = torch.cdist(x, c).argmin(dim=-1)
            sums = torch.zeros_like(c).scatter_add_(1, cl.unsqueeze(-1).expand(-1, -1, D), x)
            counts = x.new_zeros(N, K).scatter_add_(1, cl, ones)
            empty = counts == 0
            c = torch.where(empty.unsqueeze(-1), c, sums / counts.clamp_min(1).unsqueeze(-1))
            if spherical:
                c = F.normalize(c, p=2, dim=-1)
        return c

    def _landmarks(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.landmark_selection == LandmarkSelection.Orthogonal:
            return self._compute_orthogonal_landmarks(q)
        if self.landmark_selection == LandmarkSelection.Random:
            half = self.num_landmarks // 2
            with torch.no_grad():
                lq = q[:, torch.randperm(q.size(1), device=q.device)[:half]]
                lk = k[:, torch.randperm(k.size(1), device=k.device)[: self.num_landmarks - half]]
            return torch.cat((lq, lk), dim=-2)
        return self._cluster_landmarks(q, spherical=self.landmark_selection == LandmarkSelection.KMeans_Spherical)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        att_mask: torch.Tensor | AttentionMask | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        S = k.shape[-2]
        if self.num_landmarks >= S:
            return self.attn_drop(scaled_dot_product_attention(q, k, v, att_mask))
        key_mask = None
        if att_mask is not None:
            values = att_mask.values if isinstance(att_mask, AttentionMask) else att_mask
            if values.is_sparse:
                values = values.to_dense()
            values = values[..., : q.shape[-2], :S]
            if values.dtype == torch.bool:
                values = bool_mask_to_additive(values, q.dtype)
            if not bool((values == values[..., :1, :]).all()):
                raise ValueError(
                    f"orthoformer with num_landmarks={self.num_landmarks} < sequence length {S} can only "
                    "apply a mask "
                    "that is the same for every query (a key padding mask); set num_landmarks >= the "
                    "sequence "
                    "length for exact masked attention"
                )
            key_mask = values[..., :1, :]  # [b | 1, 1, S]
        landmarks = self._landmarks(q, k)
        kernel_1 = scaled_query_key_softmax(q, landmarks, None)
        if key_mask is not None:
            key_mask = key_mask.expand(*key_mask.shape[:-2], landmarks.shape[1], S)
        kernel_2 = scaled_query_key_softmax(landmarks, k, key_mask)
        return self.attn_drop(kernel_1 @ (kernel_2 @ v))
