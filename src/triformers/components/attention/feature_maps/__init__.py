"""Random feature maps approximating the softmax kernel (Performer / FAVOR+)."""

from triformers.components.attention.feature_maps.base import FeatureMap, FeatureMapConfig, FeatureMapType
from triformers.components.attention.feature_maps.softmax import (
    NormDistribution,
    SMHyperbolic,
    SMOrf,
    SMReg,
    SoftMaxPositiveEstimators,
)

__all__ = [
    "FeatureMap",
    "FeatureMapConfig",
    "FeatureMapType",
    "NormDistribution",
    "SMHyperbolic",
    "SMOrf",
    "SMReg",
    "SoftMaxPositiveEstimators",
]
