"""LRP rules as forward replacements: the module's own value, with the gradient LRP needs.

Each rule is called as a forward hook would be, ``rule(module, args, output)``, and returns the
replacement output. The families map their modules to these rules
(``architectures.Adapter.lrp_rules``); ``attribution.relevance`` switches them in per pass.

- ``layernorm``: the scale 1/std held constant (the centring stays).
- ``rmsnorm``: 1/rms held constant.
- ``identity``: x · (act(x) / x) held constant, for element-wise activations.
- ``half``: half of the gradient through each factor of a gated product, so that the
  product's gradient×input is the product once, not twice.
- ``switched_bias``: not a rule of the map but what follows one on a biased module in an lrp
  pass: adds (s − 1)·b to the output, with s the bias switch of each row (1: no value changes),
  so that ∂f/∂s of a row is the bias terms b·∂f/∂y of that row.

With these rules the network is jointly linear in its input and its biases.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Rule = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]


def layernorm(module: nn.LayerNorm, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    y = centred * scale
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


def switched_bias(module: nn.Module, output: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``output`` + offset·b, with ``offset`` = s − 1 (zero, carrying a gradient or a tangent) on
    the rows the module adds its bias ``b`` to: [B, S, 1] on token rows, [B, 1] on sentence rows."""
    return torch.addcmul(output, offset, module.bias)
