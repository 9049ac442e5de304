"""``@triton.jit`` kernels and launchers of the fused operators.

``rms_norm`` shares the LayerNorm kernels of ``triformers.triton._kernels.norm``.
"""
