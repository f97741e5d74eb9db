"""The original ij algorithm, written plainly: the oracle the fast method must equal.

``per_dimension_attributions`` is the original ij algorithm (lucasmllr/xsbert,
``explain_similarity``), written against this project's adapters: a forward pre-hook on block
``layer`` replaces the hidden state by the path r + α (x − r), α = 1, 1 − 1/N, …, 1/N, plus
the reference row; the token embeddings are shifted by the reference row, pooled, and the
Jacobian is taken with one backward pass per embedding dimension. The tests compare with it,
and ``scripts/bench/ij.py`` times it as the baseline.
"""
from __future__ import annotations

import torch

from handlers.encoder import Encoder


class _Interpolation:
    """Forward pre-hook of block ``layer``: batch [x, r] -> [r + α_k (x − r) for k] + [r]."""

    def __init__(self, steps: int):
        self.steps = steps
        self.path: torch.Tensor | None = None

    def __call__(self, module, args):
        hidden = args[0]
        x, r = hidden[0], hidden[1:2]
        alphas = torch.arange(self.steps, 0, -1, dtype=hidden.dtype) / self.steps
        path = torch.cat([r + alphas[:, None, None] * (x - r), r]).detach().requires_grad_(True)
        self.path = path
        return (path, *_broadcast_rows(args[1:]))


def _broadcast_rows(args: tuple) -> tuple:
    """Mask and position-bias rows of x and r are equal (same length, all attended): keep one."""
    return tuple(a[:1] if isinstance(a, torch.Tensor) and a.shape[0] == 2 else a for a in args)


def _reshape_hook(module, args):
    """Later blocks get the batch-2 mask / bias with the path's batch: broadcast them."""
    return (args[0], *_broadcast_rows(args[1:]))


def _vectors(encoder: Encoder, text: str, layer: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v_i (per token, [S, D]) and the shifted embedding e'(x), by D backward passes."""
    batch = encoder.tokenize([text])
    ids = torch.cat([batch.input_ids, encoder.references(batch.lengths).input_ids])
    mask = torch.ones_like(ids)
    hook = _Interpolation(steps)
    blocks = encoder.adapter.blocks
    handles = [blocks[layer].register_forward_pre_hook(hook)]
    handles += [block.register_forward_pre_hook(_reshape_hook) for block in list(blocks)[layer + 1 :]]
    try:
        with torch.enable_grad():
            tokens = encoder.adapter.forward(ids, mask)
            tokens = tokens - tokens[-1]  # the shift, on token embeddings as the original does
            emb = encoder.head(tokens, mask[:1].expand(tokens.shape[0], -1))[:-1]
            jacobian = []
            for d in range(emb.shape[1]):
                (grad,) = torch.autograd.grad(emb[:, d].sum(), hook.path, retain_graph=d < emb.shape[1] - 1)
                jacobian.append(grad[:-1].sum(0) / steps)
    finally:
        for handle in handles:
            handle.remove()
    delta = (hook.path[0] - hook.path[-1]).detach()
    J = torch.stack(jacobian)  # [D, S, H]
    return torch.einsum("dsh,sh->sd", J, delta).double(), emb[0].detach().double()


def per_dimension_attributions(encoder: Encoder, text_a: str, text_b: str, layer: int, steps: int) -> torch.Tensor:
    """A of the original algorithm (shift mode, its right Riemann sum), [S_a, S_b] float64."""
    va, ea = _vectors(encoder, text_a, layer, steps)
    vb, eb = _vectors(encoder, text_b, layer, steps)
    A = va @ vb.T
    if encoder.similarity == "cos":
        A = A / ea.norm() / eb.norm()
    return A


def relative_difference(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A - B).abs().max() / B.abs().max())
