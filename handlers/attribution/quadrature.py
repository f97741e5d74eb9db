"""Quadrature rules on [0, 1] for the path integral of the integrated Jacobians.

Every rule uses exactly ``n`` evaluations of the integrand, so that rules compare at equal
cost. ``right`` is the rule of the original method: α = 1, 1 − 1/n, …, 1/n, each weighted 1/n.
"""
from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

Rule = Literal["right", "left", "midpoint", "trapezoid", "gauss"]
RULES: tuple[str, ...] = get_args(Rule)
#: what an ij request may ask for: the adaptive rule (``adaptive.py``) or a fixed rule
Quadrature = Literal["adaptive", "right", "left", "midpoint", "trapezoid", "gauss"]
QUADRATURES: tuple[str, ...] = get_args(Quadrature)
assert QUADRATURES[1:] == RULES


def nodes(rule: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes α_k and weights w_k (float64) with ∫₀¹ f(α) dα ≈ Σ_k w_k f(α_k), n evaluations."""
    if n < 1:
        raise ValueError(f"a quadrature needs at least one node, not {n}")
    k = np.arange(n, dtype=np.float64)
    weights = np.full(n, 1.0 / n)
    if rule == "right":
        alphas = 1.0 - k / n
    elif rule == "left":
        alphas = k / n
    elif rule == "midpoint" or (rule == "trapezoid" and n == 1):
        alphas = (k + 0.5) / n
    elif rule == "trapezoid":
        alphas = k / (n - 1)
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2.0
    elif rule == "gauss":
        points, gauss_weights = np.polynomial.legendre.leggauss(n)
        alphas, weights = (points + 1.0) / 2.0, gauss_weights / 2.0
    else:
        raise ValueError(f"unknown quadrature rule {rule!r}; one of {', '.join(RULES)}")
    return torch.from_numpy(alphas), torch.from_numpy(weights)
