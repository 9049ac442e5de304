"""Reversible residual layers (RevNet / Reformer): activations are recomputed in the backward pass.

``y1 = x1 + f(x2); y2 = x2 + g(y1)`` on the two halves of the last dim. The forward keeps no
activations; the backward rebuilds each block's inputs from its outputs, replaying the RNG state so that
dropout draws the same masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import Function
from torch.utils.checkpoint import get_device_states, set_device_states


class Deterministic(nn.Module):
    """Runs ``net`` and can replay it with the RNG state recorded on an earlier call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.cpu_state: torch.Tensor | None = None
        self.cuda_in_fwd: bool | None = None
        self.gpu_devices: list[int] | None = None
        self.gpu_states: list[torch.Tensor] | None = None

    def record_rng(self, *args: Any) -> None:
        self.cpu_state = torch.get_rng_state()
        if torch.cuda._initialized:
            self.cuda_in_fwd = True
            self.gpu_devices, self.gpu_states = get_device_states(*args)

    def forward(self, *args: Any, record_rng: bool = False, set_rng: bool = False, **kwargs: Any):
        if record_rng:
            self.record_rng(*args)
        if not set_rng:
            return self.net(*args, **kwargs)
        rng_devices = self.gpu_devices if self.cuda_in_fwd else []
        with torch.random.fork_rng(devices=rng_devices, enabled=True):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_in_fwd:
                set_device_states(self.gpu_devices, self.gpu_states)
            return self.net(*args, **kwargs)


class ReversibleBlock(nn.Module):
    """One reversible block ``(f, g)``; inputs ``[..., 2E]`` -> outputs ``[..., 2E]``."""

    def __init__(self, f: nn.Module, g: nn.Module, split_dim: int = -1) -> None:
        super().__init__()
        self.f = Deterministic(f)
        self.g = Deterministic(g)
        self.split_dim = split_dim

    def forward(
        self, x: torch.Tensor, f_args: dict | None = None, g_args: dict | None = None
    ) -> torch.Tensor:
        f_args, g_args = f_args or {}, g_args or {}
        x1, x2 = torch.chunk(x, 2, dim=self.split_dim)
        with torch.no_grad():
            y1 = x1 + self.f(x2, record_rng=self.training, **f_args)
            y2 = x2 + self.g(y1, record_rng=self.training, **g_args)
        return torch.cat([y1, y2], dim=self.split_dim)

    def backward_pass(
        self, y: torch.Tensor, dy: torch.Tensor, f_args: dict | None = None, g_args: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild the inputs from ``y`` and backpropagate ``dy``; returns ``(x, dx)``."""
        f_args, g_args = f_args or {}, g_args or {}
        y1, y2 = torch.chunk(y, 2, dim=self.split_dim)
        dy1, dy2 = torch.chunk(dy, 2, dim=self.split_dim)
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_(True)
            gy1 = self.g(y1, set_rng=True, **g_args)
            torch.autograd.backward(gy1, dy2)
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + y1.grad
            y1.grad = None
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_(True)
            fx2 = self.f(x2, set_rng=True, **f_args)
            torch.autograd.backward(fx2, dx1)
        with torch.no_grad():
            x1 = y1 - fx2
            dx2 = dy2 + x2.grad
            x2.grad = None
            x = torch.cat([x1, x2.detach()], dim=self.split_dim)
            dx = torch.cat([dx1, dx2], dim=self.split_dim)
        return x, dx


class _ReversibleFunction(Function):
    @staticmethod
    def forward(ctx, x, blocks, kwargs):
        ctx.kwargs = kwargs
        for block in blocks:
            x = block(x, **kwargs)
        ctx.y = x.detach()
        ctx.blocks = blocks
        return x

    @staticmethod
    def backward(ctx, dy):
        y = ctx.y
        for block in ctx.blocks[::-1]:
            y, dy = block.backward_pass(y, dy, **ctx.kwargs)
        return dy, None, None


class ReversibleSequence(nn.Module):
    """A stack of reversible blocks built from ``(f, g)`` pairs.

    Args:
        blocks: ``nn.ModuleList`` of 2-element ``nn.ModuleList`` ``[f, g]``.

    ``forward(x, arg_route=(True, False), **kwargs)``: the keyword arguments go to f and/or g as routed.
    """

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ReversibleBlock(f, g) for f, g in blocks])

    def forward(
        self, x: torch.Tensor, arg_route: tuple[bool, bool] = (True, False), **kwargs: Any
    ) -> torch.Tensor:
        f_args, g_args = (kwargs if route else {} for route in arg_route)
        return _ReversibleFunction.apply(x, self.blocks, {"f_args": f_args, "g_args": g_args})
