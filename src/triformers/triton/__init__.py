"""Fused Triton layers (xFormers' ``xformers.triton``).

softmax, LayerNorm, dropout + bias + activation, linear + activation.

Every layer trains (gradients for all its tensor inputs), takes float16/bfloat16/float32 and any leading
shape, and runs its Triton kernels on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``;
other CPU tensors take a pure-torch path with the same semantics. Importing this package compiles
nothing: kernels are compiled on first use.
"""

from triformers.triton.dropout import FusedDropoutBias, dropout
from triformers.triton.fused_linear import FusedLinear
from triformers.triton.layer_norm import FusedLayerNorm, layer_norm
from triformers.triton.softmax import log_softmax, softmax

__all__ = [
    "dropout",
    "softmax",
    "log_softmax",
    "FusedDropoutBias",
    "FusedLinear",
    "FusedLayerNorm",
    "layer_norm",
]
