"""The ``@triton.jit`` kernels of ``fmha.triton`` and their launchers (no autograd here)."""
