"""Weight initialisations of the factory models (xFormers' ``factory/weight_init.py``).

- ``vit``: ViT's JAX reference: xavier-uniform linears with zero bias, feedforward biases N(0, 1e-6),
  LeCun-normal convolutions.
- ``timm``: timm's ViT: truncated normal (std 0.02) linears, zero bias.
- ``moco``: MoCo v3: xavier-uniform, with q/k/v each initialised as its own matrix.
- ``small``: "Transformers without Tears" small init of the attention linears,
  ``U(+-sqrt(3) * gain * sqrt(2 / (fan_in + 4 fan_out)))``.

``gain`` scales every distribution (DeepNorm's beta); with ``deepnorm_style`` the q and k projections
keep gain 1, as DeepNet prescribes. Modules with an ``init_weights`` method initialise themselves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from enum import Enum

import torch
from torch import nn

logger = logging.getLogger(__name__)


class xFormerWeightInit(str, Enum):
    Timm = "timm"
    ViT = "vit"
    Moco = "moco"
    Small = "small"


def get_weight_init_fn(init_choice: xFormerWeightInit | str) -> Callable:
    """The init function ``fn(module, name="", gain=1.0, deepnorm_style=False)`` for a choice."""
    return {
        xFormerWeightInit.Timm: _init_weights_vit_timm,
        xFormerWeightInit.ViT: _init_weights_vit_jax,
        xFormerWeightInit.Moco: _init_weights_vit_moco,
        xFormerWeightInit.Small: _init_weights_small,
    }[xFormerWeightInit(init_choice)]


def is_ffn(n: str) -> bool:
    return "feedforward" in n or ("wrap_ff" in n and not n.endswith("norm"))


def is_mha_input_projection(n: str) -> bool:
    return "q_proj" in n or "k_proj" in n or "v_proj" in n


def _is_qk(name: str) -> bool:
    parts = name.split(".")
    return "q_proj" in parts or "k_proj" in parts


def _small_init_(tensor: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + 4 * fan_out))
    a = math.sqrt(3.0) * std
    return nn.init.uniform_(tensor, -a, a)


def _lecun_normal(tensor: torch.Tensor, gain: float = 1.0) -> None:
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(tensor)
    # 0.8796... is the std of a standard normal truncated to (-2, 2)
    std = math.sqrt(gain / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


_MATRIX_INITS = (nn.init.xavier_uniform_, _small_init_, _lecun_normal)


def _maybe_init(module: nn.Module, attr: str, distribution_: Callable, **kwargs) -> None:
    t = getattr(module, attr, None)
    if isinstance(t, torch.Tensor) and not (distribution_ in _MATRIX_INITS and t.ndim < 2):
        distribution_(t, **kwargs)


def _init_itself(module: nn.Module, gain: float) -> None:
    try:
        module.init_weights(gain=gain)
    except TypeError:  # an init_weights() without a gain argument
        module.init_weights()


def _maybe_report_no_init(module: nn.Module, name: str) -> None:
    if len(list(module.children())) == 0 and (
        isinstance(getattr(module, "weight", None), torch.Tensor)
        or isinstance(getattr(module, "bias", None), torch.Tensor)
    ):
        if isinstance(module, (nn.LayerNorm, nn.Embedding)):
            return  # norms and embeddings keep their own (valid) init
        logger.debug("weight init: leaving %s (%s) at its default init", name, type(module).__name__)


def _recurse(fn: Callable, module: nn.Module, name: str, gain: float, deepnorm_style: bool) -> None:
    if not hasattr(module, "init_weights"):
        for child_name, child in module.named_children():
            fn(child, f"{name}.{child_name}", gain=gain, deepnorm_style=deepnorm_style)


@torch.no_grad()
def _init_weights_vit_jax(module: nn.Module, name: str = "", gain: float = 1.0, deepnorm_style: bool = False, **_):
    if is_ffn(name):
        _maybe_init(module, "bias", nn.init.normal_, std=1e-6)
        _maybe_init(module, "weight", nn.init.xavier_uniform_, gain=gain)
    elif is_mha_input_projection(name) or isinstance(module, nn.Linear):
        g = 1.0 if deepnorm_style and _is_qk(name) else gain
        _maybe_init(module, "weight", nn.init.xavier_uniform_, gain=g)
        _maybe_init(module, "bias", nn.init.zeros_)
    elif isinstance(module, nn.Conv2d):
        _maybe_init(module, "weight", _lecun_normal, gain=gain)
        _maybe_init(module, "bias", nn.init.zeros_)
    elif hasattr(module, "init_weights"):
        _init_itself(module, gain)
    else:
        _maybe_report_no_init(module, name)
    _recurse(_init_weights_vit_jax, module, name, gain, deepnorm_style)


@torch.no_grad()
def _init_weights_vit_moco(module: nn.Module, name: str = "", gain: float = 1.0, deepnorm_style: bool = False, **_):
    if is_ffn(name):
        _maybe_init(module, "weight", nn.init.xavier_uniform_, gain=gain)
        _maybe_init(module, "bias", nn.init.zeros_)
    elif isinstance(module, nn.Linear):
        g = 1.0 if deepnorm_style and _is_qk(name) else gain
        if is_mha_input_projection(name.split(".")[-1]):
            # q, k and v initialised as separate matrices
            val = math.sqrt(6.0 / float(module.weight.shape[0] + module.weight.shape[1]))
            nn.init.uniform_(module.weight, -val * g, val * g)
        else:
            nn.init.xavier_uniform_(module.weight, gain=g)
        _maybe_init(module, "bias", nn.init.zeros_)
    elif isinstance(module, nn.Conv2d):
        _maybe_init(module, "weight", _lecun_normal, gain=gain)
        _maybe_init(module, "bias", nn.init.zeros_)
    elif hasattr(module, "init_weights"):
        _init_itself(module, gain)
    else:
        _maybe_report_no_init(module, name)
    _recurse(_init_weights_vit_moco, module, name, gain, deepnorm_style)


@torch.no_grad()
def _init_weights_small(module: nn.Module, name: str = "", gain: float = 1.0, deepnorm_style: bool = False, **_):
    if is_ffn(name):
        _maybe_init(module, "weight", nn.init.xavier_uniform_, gain=gain)
        _maybe_init(module, "bias", nn.init.normal_, std=1e-6)
    elif is_mha_input_projection(name) or isinstance(module, nn.Linear):
        # "small init" scales the attention layers only, not the feedforward
        g = 1.0 if deepnorm_style and _is_qk(name) else gain
        _maybe_init(module, "weight", _small_init_, gain=g)
        _maybe_init(module, "bias", nn.init.zeros_)
    elif isinstance(module, nn.Conv2d):
        _maybe_init(module, "weight", _lecun_normal, gain=gain)
        _maybe_init(module, "bias", nn.init.zeros_)
    elif hasattr(module, "init_weights"):
        _init_itself(module, gain)
    else:
        _maybe_report_no_init(module, name)
    _recurse(_init_weights_small, module, name, gain, deepnorm_style)


@torch.no_grad()
def _init_weights_vit_timm(module: nn.Module, name: str = "", gain: float = 1.0, deepnorm_style: bool = False, **_):
    if isinstance(module, nn.Linear):
        g = 1.0 if deepnorm_style and _is_qk(name) else gain
        std = 0.02 * g
        nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
        _maybe_init(module, "bias", nn.init.zeros_)
    elif hasattr(module, "init_weights"):
        _init_itself(module, gain)
    else:
        _maybe_report_no_init(module, name)
    _recurse(_init_weights_vit_timm, module, name, gain, deepnorm_style)
