"""LRP rules as forward replacements: the module's own value, with the gradient LRP needs.

Each rule is called as a forward hook would be, ``rule(module, args, output)``, and returns the
replacement output. The families map their modules to these rules
(``architectures.Adapter.lrp_rules``); ``attribution.relevance`` switches them in per pass.

- ``layernorm``: the scale 1/std held constant (the centring stays).
- ``rmsnorm``: 1/rms held constant.
- ``identity``: x · (act(x) / x) held constant, for element-wise activations.
- ``half``: half of the gradient through each factor of a gated product, so that the
  product's gradient×input is the product once, not twice.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Rule = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]


def layernorm(module: nn.LayerNorm, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps).detach()
    y = centred * scale
    if module.weight is not None:
        y = y * module.weight
    return y + module.bias if module.bias is not None else y


def rmsnorm(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + module.variance_epsilon).detach()
    return (module.weight * (x * scale).to(output.dtype)).to(output.dtype)


def identity(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    return x * (output / torch.where(x == 0, torch.ones_like(x), x)).detach()


def half(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return 0.5 * output + 0.5 * output.detach()
