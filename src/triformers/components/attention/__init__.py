"""The attention zoo: a registry of attention mechanisms, each tied to a config dataclass.

Register a new attention in a module of this package (``register_attention`` comes from ``._registry``,
which the modules import so as not to import this package) and import the module below::

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

from triformers.components.attention._registry import (  # noqa: F401  (the registry's names)
    ATTENTION_CLASS_NAMES,
    ATTENTION_REGISTRY,
    build_attention,
    register_attention,
)
from triformers.components.attention.attention_mask import AttentionMask
from triformers.components.attention.base import Attention, AttentionConfig

# isort: split
# Registration: one explicit import per attention module (order = registry order).
from triformers.components.attention import (  # noqa: F401, I001
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
from triformers.components.attention.blocksparse import BlockSparseAttention
from triformers.components.attention.compositional import CompositionalAttention
from triformers.components.attention.core import maybe_sparsify, sparsify
from triformers.components.attention.favor import FavorAttention
from triformers.components.attention.fourier_mix import FourierMix
from triformers.components.attention.global_tokens import GlobalAttention
from triformers.components.attention.lambda_layer import LambdaLayer
from triformers.components.attention.linformer import LinformerAttention
from triformers.components.attention.local import LocalAttention
from triformers.components.attention.nystrom import NystromAttention
from triformers.components.attention.ortho import OrthoFormerAttention
from triformers.components.attention.pooling import Pooling
from triformers.components.attention.random import RandomAttention
from triformers.components.attention.scaled_dot_product import ScaledDotProduct
from triformers.components.attention.visual import Visual

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
