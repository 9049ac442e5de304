"""The `@triton.jit` kernels and their launchers (no autograd): one module per kernel family."""
