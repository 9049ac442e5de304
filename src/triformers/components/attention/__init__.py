"""The attention zoo: a registry of attention mechanisms, each tied to a config dataclass.

Register a new attention in a module of this package and import it below::

    @dataclass
    class MyAttentionConfig(AttentionConfig):
        window: int | None

    @register_attention("my_attention", MyAttentionConfig)
    class MyAttention(Attention):
        def __init__(self, dropout: float, window: int = 4, *args, **kwargs): ...
        def forward(self, q, k, v, *args, **kwargs): ...

The generic tests (``pytest -k my_attention``) and the attention benchmark then include it.
"""

from __future__ import annotations

from typing import Any

from triformers.components._registry import build_from_registry, get_registry_decorator
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.base import Attention, AttentionConfig

ATTENTION_REGISTRY: dict = {}
ATTENTION_CLASS_NAMES: set[str] = set()

register_attention = get_registry_decorator(ATTENTION_REGISTRY, ATTENTION_CLASS_NAMES, Attention, AttentionConfig)


def build_attention(config: dict[str, Any] | AttentionConfig) -> Attention:
    """Build a registered attention from a dict (or config) with a ``name``.

    Fields the attention's config does not declare are ignored; missing ones take the constructor's
    defaults. For instance ``build_attention({"name": "local", "dropout": 0.1, "window_size": 7})``.

    Raises:
        KeyError: if the name is not registered (the message lists the registered names).
    """
    return build_from_registry(config, ATTENTION_REGISTRY, "attention")


# Registration: one explicit import per attention module (order = registry order).
from triformers.components.attention import (  # noqa: E402, F401, I001
    scaled_dot_product,
    blocksparse,
    compositional,
    favor,
    fourier_mix,
    global_tokens,
    lambda_layer,
    linformer,
    local,
    nystrom,
    ortho,
    pooling,
    random,
    visual,
)

# the attention classes under this package, as xFormers exports them (``from ...attention import ScaledDotProduct``)
from triformers.components.attention.blocksparse import BlockSparseAttention  # noqa: E402
from triformers.components.attention.compositional import CompositionalAttention  # noqa: E402
from triformers.components.attention.core import maybe_sparsify, sparsify  # noqa: E402
from triformers.components.attention.favor import FavorAttention  # noqa: E402
from triformers.components.attention.fourier_mix import FourierMix  # noqa: E402
from triformers.components.attention.global_tokens import GlobalAttention  # noqa: E402
from triformers.components.attention.lambda_layer import LambdaLayer  # noqa: E402
from triformers.components.attention.linformer import LinformerAttention  # noqa: E402
from triformers.components.attention.local import LocalAttention  # noqa: E402
from triformers.components.attention.nystrom import NystromAttention  # noqa: E402
from triformers.components.attention.ortho import OrthoFormerAttention  # noqa: E402
from triformers.components.attention.pooling import Pooling  # noqa: E402
from triformers.components.attention.random import RandomAttention  # noqa: E402
from triformers.components.attention.scaled_dot_product import ScaledDotProduct  # noqa: E402
from triformers.components.attention.visual import Visual  # noqa: E402

__all__ = [
    "ATTENTION_REGISTRY",
    "Attention",
    "AttentionConfig",
    "AttentionMask",
    "BlockSparseAttention",
    "CompositionalAttention",
    "FavorAttention",
    "FourierMix",
    "GlobalAttention",
    "LambdaLayer",
    "LinformerAttention",
    "LocalAttention",
    "NystromAttention",
    "OrthoFormerAttention",
    "Pooling",
    "RandomAttention",
    "ScaledDotProduct",
    "Visual",
    "build_attention",
    "maybe_sparsify",
    "register_attention",
    "sparsify",
]
