"""Explaining in-process as a server does: several pairs in one call of a method."""
from __future__ import annotations

import torch

from handlers.attribution import Explanation, IntegratedJacobians, method_of, options_for
from handlers.encoder import Encoder

PAIRS = [
    ("a man is playing a guitar", "someone plays music"),
    ("the cat sleeps on the sofa", "hi"),
    ("the quick brown fox jumps over the lazy dog", "a dog sleeps"),
]


def explain_all(encoder: Encoder, pairs, method: str, **options) -> list[dict]:
    """The answers of ``pairs`` explained together, as a server computes a batch."""
    results = method_of(encoder, method).attribute(pairs, options_for(method, options))
    return [result.to_answer() for result in results]


def as_tensor(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ij_explain(encoder: Encoder, pairs, layer: int, steps: int | None = None, quadrature: str = "gauss",
               **options) -> list[Explanation]:
    """ij's explanations of ``pairs`` at ``layer``, computed together: a fixed ``quadrature`` of
    ``steps`` nodes (any number of them), or ``quadrature="adaptive"`` with its own options."""
    if steps is not None:
        options.update(steps=steps, max_steps=max(steps, IntegratedJacobians.Options().max_steps))
    return method_of(encoder, "ij").attribute(pairs, IntegratedJacobians.Options(layer=layer, quadrature=quadrature,
                                                                                  **options))
