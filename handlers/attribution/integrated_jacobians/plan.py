"""ij's planner: the path nodes to evaluate (``Nodes``), and their rows packed into chunks
whose estimated bytes fit the memory budget (``plan``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...encoder import Encoder
from .paths import Side, Task


# -- memory ------------------------------------------------------------------------------------
def row_cost(encoder: Encoder, width: int, layer: int, mode: str) -> tuple[int, int]:
    """Bytes of one path row: (fixed, per tangent or cotangent carried with it).

    Forward mode keeps one block's primal and tangents at a time; backward mode keeps the
    activations of every block from ``layer`` on, and the cotangents' temporaries of one block.
    """
    block = encoder.cost.block_bytes(width)
    fixed = block if mode == "jvp" else (encoder.num_layers - layer + 1) * block
    return fixed, 2 * block


# -- path nodes ----------------------------------------------------------------------------------
@dataclass
class Nodes:
    """Path nodes to evaluate: node n is on task[n]'s path at alpha[n]; its values, times
    weight[n], add into accumulator target[n] (a fixed rule sums a task's nodes into one; the
    adaptive rule keeps every node apart)."""

    task: torch.Tensor  # [N] long
    alpha: torch.Tensor  # [N] float64
    weight: torch.Tensor  # [N] float64
    target: torch.Tensor  # [N] long
    target_task: torch.Tensor  # [M] long: the task of each accumulator

    @classmethod
    def fixed(cls, tasks: int, alphas: torch.Tensor, weights: torch.Tensor) -> "Nodes":
        task = torch.arange(tasks).repeat_interleave(len(alphas))
        return cls(task, alphas.repeat(tasks), weights.repeat(tasks), task.clone(), torch.arange(tasks))

    @classmethod
    def each(cls, requests: list[tuple[int, torch.Tensor]]) -> "Nodes":
        """Every node of every (task, alphas) request apart, weight 1, in request order."""
        task = torch.cat([torch.full((len(alphas),), t) for t, alphas in requests])
        alpha = torch.cat([alphas for _, alphas in requests]).double()
        return cls(task, alpha, torch.ones_like(alpha), torch.arange(len(task)), task.clone())

    def layout(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row offset and row count of each accumulator, when task t has ``lengths[t]`` rows."""
        counts = lengths[self.target_task]
        return torch.cumsum(counts, 0) - counts, counts


@dataclass
class Chunk:
    """Path rows computed in one pass; row r is node node[r] and carries the tangents (or
    cotangents) of the short-side tokens start[r] … start[r] + T − 1 (those past the text's end
    are zero)."""

    node: torch.Tensor  # [R]
    start: torch.Tensor  # [R]
    tangents: int  # T

    def path(self, sides: list[Side], nodes: Nodes):
        """Padded hidden states h(α) [R, W, H] and attention masks [R, W] of the rows."""
        task = nodes.task[self.node]
        width = max(sides[t].length for t in task.tolist())
        x = sides[0].x
        hidden = torch.zeros(len(self.node), width, x.shape[-1], dtype=x.dtype, device=x.device)
        mask = torch.zeros(len(self.node), width, dtype=torch.long, device=x.device)
        for t, rows in self.by_task(nodes):
            side = sides[t]
            a = nodes.alpha[self.node[rows]].to(x.dtype).to(x.device)[:, None, None]
            hidden[rows, : side.length] = side.r + a * side.delta
            mask[rows, : side.length] = 1
        return hidden, mask

    def by_task(self, nodes: Nodes):
        task = nodes.task[self.node]
        for t in torch.unique(task).tolist():
            yield t, (task == t).nonzero().squeeze(1)

    def tokens(self, nodes: Nodes, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (tangent, row) [T, R]: the accumulator row it adds into, the task's own token
        row (for per-task inputs), and whether the token exists."""
        task = nodes.task[self.node]
        offsets, _ = nodes.layout(lengths)
        task_offsets = torch.cumsum(lengths, 0) - lengths
        local = self.start[None, :] + torch.arange(self.tangents)[:, None]
        valid = local < lengths[task][None, :]
        return offsets[nodes.target[self.node]][None, :] + local, task_offsets[task][None, :] + local, valid


def plan(tasks: list[Task], nodes: Nodes, cost, budget: int) -> list[Chunk]:
    """Rows (node, token range) packed into chunks whose estimated bytes fit ``budget``.

    ``cost(task) -> (fixed, per)`` gives one row's bytes; a chunk of R rows carrying T tangents
    costs R · (fixed + T · per) at its widest row. Tasks are taken shortest first.
    """
    units = []  # (node, task, start, count)
    for t in sorted(range(len(tasks)), key=lambda t: (tasks[t].long.length, tasks[t].short.length)):
        fixed, per = cost(tasks[t])
        piece = max(1, min(tasks[t].short.length, (budget - fixed) // per))
        own = (nodes.task == t).nonzero().squeeze(1).tolist()
        for start in range(0, tasks[t].short.length, piece):
            count = min(piece, tasks[t].short.length - start)
            units += [(n, t, start, count) for n in own]
    chunks, current, worst = [], [], (0, 0, 0)
    for unit in units:
        fixed, per = cost(tasks[unit[1]])
        candidate = (max(worst[0], fixed), max(worst[1], per), max(worst[2], unit[3]))
        if current and (len(current) + 1) * (candidate[0] + candidate[2] * candidate[1]) > budget:
            chunks.append(_chunk(current))
            current, candidate = [], (fixed, per, unit[3])
        current.append(unit)
        worst = candidate
    if current:
        chunks.append(_chunk(current))
    return chunks


def _chunk(units: list[tuple[int, int, int, int]]) -> Chunk:
    node, _, start, count = (torch.tensor(column) for column in zip(*units))
    return Chunk(node, start, int(count.max()))


def short_lengths(tasks: list[Task]) -> torch.Tensor:
    return torch.tensor([task.short.length for task in tasks])


def per_request(stacked: torch.Tensor, lengths: torch.Tensor, requests, widths=None) -> list[torch.Tensor]:
    """Split accumulator rows (one accumulator per node, in request order) back into each
    request's values [n, S_short, …] (the long side's cut to the task's width)."""
    out, row = [], 0
    for t, alphas in requests:
        n, size = len(alphas), int(lengths[t])
        block = stacked[row : row + n * size].reshape(n, size, -1)
        out.append(block[..., : widths[t]] if widths is not None else block)
        row += n * size
    return out


