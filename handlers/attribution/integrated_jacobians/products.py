"""ij's Jacobian products along the path: forward mode on the shorter text (its per-token
vectors v_i), backward mode on the longer (the rows of A), chunk by chunk as ``plan`` packs them."""
from __future__ import annotations

import torch

from .paths import context, embedding
from .plan import Nodes, Task, plan, row_cost, short_lengths


@torch.no_grad()
def short_vectors(encoder, tasks: list[Task], nodes: Nodes, layer: int, budget: int) -> torch.Tensor:
    """Σ weight · J(h(α)) δ_i over each accumulator's nodes, for every short-side token i, stacked
    [Σ accumulators S_short, D]: forward-mode products, the primal of each node computed once
    and its tangents (one per token) vmapped.

    Forward mode needs no autograd graph, and one must not be recorded: the model's parameters
    require grad, so with grad mode on (TorchServe's ``handle`` runs with it) every chunk's
    products would keep their saved tensors, chained through ``vectors``, until the end of the
    call — memory growing with pairs × nodes whatever the budget."""
    sides = [t.short for t in tasks]
    lengths = short_lengths(tasks)
    _, counts = nodes.layout(lengths)
    vectors = torch.zeros(int(counts.sum()), sides[0].g.shape[-1], dtype=torch.float64)
    cost = lambda task: row_cost(encoder, task.short.length, layer, "jvp")  # noqa: E731
    for chunk in plan(tasks, nodes, cost, budget):
        hidden, mask = chunk.path(sides, nodes)
        ctx = context(encoder, mask, hidden.dtype)
        index, _, valid = chunk.tokens(nodes, lengths)
        tangents = torch.zeros(chunk.tangents, *hidden.shape, dtype=hidden.dtype, device=hidden.device)
        for t, rows in chunk.by_task(nodes):
            tangent, row = valid[:, rows].nonzero(as_tuple=True)
            token = chunk.start[rows][row] + tangent
            tangents[tangent, rows[row], token] = sides[t].delta[token]

        def tangent_out(tangent: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda h: embedding(encoder, h, mask, ctx, layer), (hidden,), (tangent,))[1]

        out = torch.func.vmap(tangent_out)(tangents).double().cpu()  # [T, R, D]
        out = out * nodes.weight[chunk.node][None, :, None]
        vectors.index_add_(0, index[valid], out[valid])
    return vectors


def long_rows(encoder, tasks: list[Task], vectors, nodes: Nodes, layer: int, budget: int) -> torch.Tensor:
    """A oriented short × long, summed per accumulator, stacked [Σ accumulators S_short, max
    S_long]: vector-Jacobian products of each node's forward pass with the cotangents weight · v_i
    (``vectors``: each task's short-side v, stacked [Σ tasks S_short, D]; one per token, batched)."""
    sides = [t.long for t in tasks]
    lengths = short_lengths(tasks)
    _, counts = nodes.layout(lengths)
    rows_out = torch.zeros(int(counts.sum()), max(s.length for s in sides), dtype=torch.float64)
    cost = lambda task: row_cost(encoder, task.long.length, layer, "vjp")  # noqa: E731
    for chunk in plan(tasks, nodes, cost, budget):
        hidden, mask = chunk.path(sides, nodes)
        ctx = context(encoder, mask, hidden.dtype)
        index, own, valid = chunk.tokens(nodes, lengths)
        safe = own.clamp(max=vectors.shape[0] - 1)
        cotangents = vectors[safe] * (valid[..., None] * nodes.weight[chunk.node][None, :, None])
        with torch.enable_grad():
            hidden.requires_grad_(True)
            out = embedding(encoder, hidden, mask, ctx, layer)
            (grad,) = torch.autograd.grad(
                out, hidden, cotangents.to(out.dtype).to(out.device), is_grads_batched=True
            )  # [T, R, W, H]
        deltas = torch.zeros_like(hidden, requires_grad=False)
        for t, rows in chunk.by_task(nodes):
            deltas[rows, : sides[t].length] = sides[t].delta
        contribution = (grad * deltas[None]).sum(-1).double().cpu()  # [T, R, W]
        rows_out[:, : contribution.shape[-1]].index_add_(0, index[valid], contribution[valid])
    return rows_out


