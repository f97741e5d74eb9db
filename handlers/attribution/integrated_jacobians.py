"""Integrated Jacobians (ij): the token×token attribution matrix of a bi-encoder's score.

Moeller et al., EMNLP 2023, and the cosine / off-the-shelf variants of the EACL 2024 follow-up.
For a text x let x_l be the hidden state entering block ``layer`` and r_l that of its reference
(``Encoder.reference_ids``); along the path h(α) = r_l + α (x_l − r_l) the sentence embedding
g(h) has the per-token vectors

    v_i(x) = ∫₀¹ J_g(h(α))[:, i, :] (x_l − r_l)_i dα        (one D-vector per token i)

and A_ij = v_i(a) · v_j(b). The original computes J with one backward pass per embedding
dimension. Here the two integrals are taken apart: the shorter text's v_i come from
forward-mode products (one tangent per token and node), the rows of A on the longer text from
vector-Jacobian products whose cotangents are those v_i (one per short-side token and node).
Both run only through blocks ``layer`` … L−1, in chunks sized to the memory budget, with the
rows of every explanation of a TorchServe batch that share ``layer`` and ``steps`` packed
together.

g is the shifted embedding e(x) − e(r) in shift mode (a constant shift, no Normalize; for
``cos`` A is divided by the norms of the shifted embeddings, as the EACL version does); in
``none`` mode it is the model's own embedding, L2-normalised when the score is a cosine or the
model ends in Normalize, so that sum(A) ≈ f(a, b) − f(a, r_b) − f(r_a, b) + f(r_a, r_b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..encoder import Encoder
from ..errors import InvalidOption
from .base import MEMORY_BUDGET_MB, TEXT_FIELDS, Explanation, Method, MethodOptions, Pair
from .adaptive import G10K21, AdaptiveIntegral
from .quadrature import Quadrature, nodes


@dataclass
class Attribution:
    """The ij explanation of one pair (A in float64, rows: tokens of a, columns: tokens of b)."""

    attributions: torch.Tensor
    score: float
    reference_terms: dict[str, float]
    tokens_a: list[str]
    tokens_b: list[str]
    truncated: list[str]
    quadrature: str = "right"
    nodes: tuple[int, int] = (0, 0)  # path nodes evaluated for text a and for text b
    tolerance: float | None = None
    converged: bool | None = None  # None: not known (a fixed rule without the shifted reference)
    error_estimate: float | None = None  # the adaptive rule's estimate, relative to |score|
    panels: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])  # adaptive: per side

    @property
    def attribution_sum(self) -> float:
        return float(self.attributions.sum())

    @property
    def attribution_error(self) -> float:
        return abs(self.attribution_sum - self.score)


@dataclass
class _Side:
    """One text at the attributed layer: its path end points and its final embedding."""

    x: torch.Tensor  # [S, H] hidden state entering the block
    r: torch.Tensor  # [S, H] the same for the reference
    g: torch.Tensor  # [D] g(x)
    g_ref: torch.Tensor  # [D] g(r)

    @property
    def length(self) -> int:
        return self.x.shape[0]

    @property
    def delta(self) -> torch.Tensor:
        return self.x - self.r


@dataclass
class _Task:
    """One pair: the short side goes forward-mode, the long side backward (b when equal)."""

    short: _Side
    long: _Side
    swapped: bool  # the short side is text b


# -- the function being attributed ---------------------------------------------------------------
def _embedding(encoder: Encoder, hidden: torch.Tensor, mask: torch.Tensor, ctx, layer: int) -> torch.Tensor:
    """g of hidden states entering block ``layer`` (without the constant shift)."""
    adapter = encoder.adapter
    out = adapter.finish(adapter.run_blocks(hidden, ctx, layer))
    emb = encoder.head(out, mask)
    return F.normalize(emb, dim=-1) if encoder.scoring.path_normalizes else emb


def _context(encoder: Encoder, mask: torch.Tensor):
    probe = torch.zeros(*mask.shape, encoder.adapter.hidden_size, device=mask.device)
    return encoder.adapter.context(mask, probe)


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
class _Nodes:
    """Path nodes to evaluate: node n is on task[n]'s path at alpha[n]; its values, times
    weight[n], add into accumulator target[n] (a fixed rule sums a task's nodes into one; the
    adaptive rule keeps every node apart)."""

    task: torch.Tensor  # [N] long
    alpha: torch.Tensor  # [N] float64
    weight: torch.Tensor  # [N] float64
    target: torch.Tensor  # [N] long
    target_task: torch.Tensor  # [M] long: the task of each accumulator

    @classmethod
    def fixed(cls, tasks: int, alphas: torch.Tensor, weights: torch.Tensor) -> "_Nodes":
        task = torch.arange(tasks).repeat_interleave(len(alphas))
        return cls(task, alphas.repeat(tasks), weights.repeat(tasks), task.clone(), torch.arange(tasks))

    @classmethod
    def each(cls, requests: list[tuple[int, torch.Tensor]]) -> "_Nodes":
        """Every node of every (task, alphas) request apart, weight 1, in request order."""
        task = torch.cat([torch.full((len(alphas),), t) for t, alphas in requests])
        alpha = torch.cat([alphas for _, alphas in requests]).double()
        return cls(task, alpha, torch.ones_like(alpha), torch.arange(len(task)), task.clone())

    def layout(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row offset and row count of each accumulator, when task t has ``lengths[t]`` rows."""
        counts = lengths[self.target_task]
        return torch.cumsum(counts, 0) - counts, counts


@dataclass
class _Chunk:
    """Path rows computed in one pass; row r is node node[r] and carries the tangents (or
    cotangents) of the short-side tokens start[r] … start[r] + T − 1 (those past the text's end
    are zero)."""

    node: torch.Tensor  # [R]
    start: torch.Tensor  # [R]
    tangents: int  # T

    def path(self, sides: list[_Side], nodes: _Nodes):
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

    def by_task(self, nodes: _Nodes):
        task = nodes.task[self.node]
        for t in torch.unique(task).tolist():
            yield t, (task == t).nonzero().squeeze(1)

    def tokens(self, nodes: _Nodes, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (tangent, row) [T, R]: the accumulator row it adds into, the task's own token
        row (for per-task inputs), and whether the token exists."""
        task = nodes.task[self.node]
        offsets, _ = nodes.layout(lengths)
        task_offsets = torch.cumsum(lengths, 0) - lengths
        local = self.start[None, :] + torch.arange(self.tangents)[:, None]
        valid = local < lengths[task][None, :]
        return offsets[nodes.target[self.node]][None, :] + local, task_offsets[task][None, :] + local, valid


def _plan(tasks: list[_Task], nodes: _Nodes, cost, budget: int) -> list[_Chunk]:
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


def _chunk(units: list[tuple[int, int, int, int]]) -> _Chunk:
    node, _, start, count = (torch.tensor(column) for column in zip(*units))
    return _Chunk(node, start, int(count.max()))


def _short_lengths(tasks: list[_Task]) -> torch.Tensor:
    return torch.tensor([task.short.length for task in tasks])


@torch.no_grad()
def _short_vectors(encoder, tasks: list[_Task], nodes: _Nodes, layer: int, budget: int) -> torch.Tensor:
    """Σ weight · J(h(α)) δ_i over each accumulator's nodes, for every short-side token i, stacked
    [Σ accumulators S_short, D]: forward-mode products, the primal of each node computed once
    and its tangents (one per token) vmapped.

    Forward mode needs no autograd graph, and one must not be recorded: the model's parameters
    require grad, so with grad mode on (TorchServe's ``handle`` runs with it) every chunk's
    products would keep their saved tensors, chained through ``vectors``, until the end of the
    call — memory growing with pairs × nodes whatever the budget."""
    sides = [t.short for t in tasks]
    lengths = _short_lengths(tasks)
    _, counts = nodes.layout(lengths)
    vectors = torch.zeros(int(counts.sum()), sides[0].g.shape[-1], dtype=torch.float64)
    cost = lambda task: row_cost(encoder, task.short.length, layer, "jvp")  # noqa: E731
    for chunk in _plan(tasks, nodes, cost, budget):
        hidden, mask = chunk.path(sides, nodes)
        ctx = _context(encoder, mask)
        index, _, valid = chunk.tokens(nodes, lengths)
        tangents = torch.zeros(chunk.tangents, *hidden.shape, dtype=hidden.dtype, device=hidden.device)
        for t, rows in chunk.by_task(nodes):
            tangent, row = valid[:, rows].nonzero(as_tuple=True)
            token = chunk.start[rows][row] + tangent
            tangents[tangent, rows[row], token] = sides[t].delta[token]

        def tangent_out(tangent: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda h: _embedding(encoder, h, mask, ctx, layer), (hidden,), (tangent,))[1]

        out = torch.func.vmap(tangent_out)(tangents).double().cpu()  # [T, R, D]
        out = out * nodes.weight[chunk.node][None, :, None]
        vectors.index_add_(0, index[valid], out[valid])
    return vectors


def _long_rows(encoder, tasks: list[_Task], vectors, nodes: _Nodes, layer: int, budget: int) -> torch.Tensor:
    """A oriented short × long, summed per accumulator, stacked [Σ accumulators S_short, max
    S_long]: vector-Jacobian products of each node's forward pass with the cotangents weight · v_i
    (``vectors``: each task's short-side v, stacked [Σ tasks S_short, D]; one per token, batched)."""
    sides = [t.long for t in tasks]
    lengths = _short_lengths(tasks)
    _, counts = nodes.layout(lengths)
    rows_out = torch.zeros(int(counts.sum()), max(s.length for s in sides), dtype=torch.float64)
    cost = lambda task: row_cost(encoder, task.long.length, layer, "vjp")  # noqa: E731
    for chunk in _plan(tasks, nodes, cost, budget):
        hidden, mask = chunk.path(sides, nodes)
        ctx = _context(encoder, mask)
        index, own, valid = chunk.tokens(nodes, lengths)
        safe = own.clamp(max=vectors.shape[0] - 1)
        cotangents = vectors[safe] * (valid[..., None] * nodes.weight[chunk.node][None, :, None])
        with torch.enable_grad():
            hidden.requires_grad_(True)
            out = _embedding(encoder, hidden, mask, ctx, layer)
            (grad,) = torch.autograd.grad(
                out, hidden, cotangents.to(out.dtype).to(out.device), is_grads_batched=True
            )  # [T, R, W, H]
        deltas = torch.zeros_like(hidden, requires_grad=False)
        for t, rows in chunk.by_task(nodes):
            deltas[rows, : sides[t].length] = sides[t].delta
        contribution = (grad * deltas[None]).sum(-1).double().cpu()  # [T, R, W]
        rows_out[:, : contribution.shape[-1]].index_add_(0, index[valid], contribution[valid])
    return rows_out


# -- end points --------------------------------------------------------------------------------
@torch.no_grad()
def _sides(encoder: Encoder, texts: list[str], layer: int) -> tuple[list[_Side], object]:
    """Every text and its reference at ``layer``, and their final g, in one padded pass."""
    batch = encoder.tokenize(texts)
    refs = encoder.references(batch.lengths)
    ids = torch.cat([batch.input_ids, refs.input_ids])
    mask = torch.cat([batch.attention_mask, refs.attention_mask])
    adapter = encoder.adapter
    hidden = adapter.embed(ids)
    ctx = adapter.context(mask, hidden)
    at_layer = adapter.run_blocks(hidden, ctx, 0, layer)
    g = _embedding(encoder, at_layer, mask, ctx, layer).cpu()
    n = len(texts)
    sides = [
        _Side(at_layer[i, :length], at_layer[n + i, :length], g[i], g[n + i])
        for i, length in enumerate(batch.lengths)
    ]
    return sides, batch


# -- the integrals -----------------------------------------------------------------------------
def _fixed(encoder, tasks: list[_Task], layer: int, rule: str, steps: int, budget: int):
    """v and A of every task with one fixed rule: each task's nodes summed as they are computed."""
    alphas, weights = nodes(rule, steps)
    path = _Nodes.fixed(len(tasks), alphas, weights)
    vectors = _short_vectors(encoder, tasks, path, layer, budget)
    stacked = _long_rows(encoder, tasks, vectors, path, layer, budget)
    lengths = _short_lengths(tasks)
    offsets = (torch.cumsum(lengths, 0) - lengths).tolist()
    return [stacked[o : o + n, : t.long.length] for o, n, t in zip(offsets, lengths.tolist(), tasks)]


def _drive(integrals: list[AdaptiveIntegral], evaluate, exact: Callable[[int, torch.Tensor], bool]) -> None:
    """Round after round, every unfinished integral's nodes in one ``evaluate`` call (the passes
    of all pairs together). An integral whose local estimate is met but whose ``exact`` check
    fails (a feature too narrow for its panels was missed) is refined everywhere, within its
    budget; if nothing is left to refine it ends unconverged."""
    while True:
        requests = [(t, q.pending()) for t, q in enumerate(integrals) if not q.done]
        if requests:
            for (t, _), values in zip(requests, evaluate(requests)):
                integrals[t].feed(values)
            continue
        reopened = [q.refine_everywhere() for t, q in enumerate(integrals) if q.converged and not exact(t, q.estimate)]
        if not any(reopened):
            return


def _integral(tol_abs: float, max_nodes: int, known_error) -> AdaptiveIntegral:
    """One side's path integral: G10/K21 panels (one panel often suffices on a smooth
    integrand), each panel's error the larger of |K − G| and its identity's residual
    (``known_error``, from ``_PathValues``)."""
    return AdaptiveIntegral(tol_abs, max_nodes, rule=G10K21, estimator="kronrod-gauss", known_error=known_error,
                            min_width=NARROWEST_PANEL)


#: panels narrower than this are not bisected: the model runs in float32, and the outer Kronrod
#: nodes of a narrower panel are closer than two float32 steps of α (features narrower than this,
#: as at mpnet's layer 0, are answered ``converged: false`` with their residuals in the estimate)
NARROWEST_PANEL = 2.0**-14


class _PathValues:
    """g along one side's straight path, h(α) = r + α (x − r), at the panel edges the adaptive
    rule asks about: one forward pass of the side's row per new edge, kept.

    The fundamental theorem of calculus holds on every panel [a, b]: the integrand summed over
    the side's tokens is dg(h(α))/dα, so its integral is g(h(b)) − g(h(a)) exactly. ``residual``
    is how far a panel's estimate misses that, beyond the float32 rounding of the two values:
    an exact error of the panel (of its token sums), which locates a feature that the panel's
    own nodes do not resolve."""

    def __init__(self, encoder: Encoder, side: _Side, layer: int):
        self.encoder, self.side, self.layer = encoder, side, layer
        self.values: dict[float, torch.Tensor] = {}

    @torch.no_grad()
    def at(self, alpha: float) -> torch.Tensor:
        if alpha not in self.values:
            side = self.side
            hidden = side.r + torch.tensor(alpha, dtype=side.x.dtype, device=side.x.device) * side.delta
            mask = torch.ones(1, side.length, dtype=torch.long, device=side.x.device)
            g = _embedding(self.encoder, hidden[None], mask, _context(self.encoder, mask), self.layer)
            self.values[alpha] = g[0].double().cpu()
        return self.values[alpha]

    def change(self, a: float, b: float) -> tuple[torch.Tensor, float]:
        """g(h(b)) − g(h(a)), and the rounding it may carry."""
        ga, gb = self.at(a), self.at(b)
        return gb - ga, ROUNDING * float(ga.norm() + gb.norm())


#: the float32 rounding allowed in the difference of two values of g along the path
ROUNDING = 16 * torch.finfo(torch.float32).eps


def _adaptive(encoder, tasks: list[_Task], layer: int, tolerance: float, max_nodes: int, budget: int, scales):
    """v and A of every task to ``tolerance`` × scale (the |score| in path units) in Frobenius
    norm, by adaptive Gauss–Kronrod panels on each side's path.

    The short side goes first (its v are the long side's cotangents); half of the tolerance is
    its own: an error Δv reaches A as Δv · V_lᵀ, through the long side's per-token vectors V_l,
    so its target is tol / (2 ‖V_l‖), with ‖V_l‖_F estimated beforehand (``_long_norms``) and
    never below |g_l − g_l(r)| = |Σ_j V_l[j]|. Tokens whose vectors cancel in the sum make
    ‖V_l‖ far larger than the sum's norm (mpnet's middle layers).
    Both sides are checked against exact identities of the path integral (the fundamental
    theorem of calculus along the straight path), panel by panel (``_PathValues``): Σ_i v_i =
    g(x) − g(r) on the short side, and the row sums of A equal v_i · (g_l − g_l(r)) on the long
    side, and so on every panel [a, b] with g at its edges; and once more on the whole path.
    """
    lengths = _short_lengths(tasks)
    ends = [(t.short.g - t.short.g_ref).double() for t in tasks], [(t.long.g - t.long.g_ref).double() for t in tasks]
    tol = [tolerance * s for s in scales]
    reach = [max(PROBE_SAFETY * n, float(end.norm())) for n, end in zip(_long_norms(encoder, tasks, layer, budget), ends[1])]
    paths = [(_PathValues(encoder, t.short, layer), _PathValues(encoder, t.long, layer)) for t in tasks]

    def short_residual(t: int):
        def residual(a: float, b: float, panel: torch.Tensor) -> float:
            change, rounding = paths[t][0].change(a, b)
            return max(0.0, float((panel.sum(0) - change).norm()) - rounding)
        return residual

    short = [_integral(tol[t] / (2 * reach[t] + 1e-30), max_nodes, short_residual(t)) for t in range(len(tasks))]

    def short_values(requests):
        vectors = _short_vectors(encoder, tasks, _Nodes.each(requests), layer, budget)
        return _per_request(vectors, lengths, requests)

    def short_exact(t: int, v: torch.Tensor) -> bool:
        return float((v.sum(0) - ends[0][t]).norm() * ends[1][t].norm()) <= tol[t] / 2

    _drive(short, short_values, short_exact)
    vectors = torch.cat([q.estimate for q in short])

    def long_residual(t: int):
        v = short[t].estimate
        def residual(a: float, b: float, panel: torch.Tensor) -> float:
            change, rounding = paths[t][1].change(a, b)
            return max(0.0, float((panel.sum(1) - v @ change).norm()) - rounding * float(v.norm()))
        return residual

    long = [_integral(tol[t] / 2, max_nodes, long_residual(t)) for t in range(len(tasks))]
    widths = [t.long.length for t in tasks]

    def long_values(requests):
        rows = _long_rows(encoder, tasks, vectors, _Nodes.each(requests), layer, budget)
        return _per_request(rows, lengths, requests, widths)

    def long_exact(t: int, matrix: torch.Tensor) -> bool:
        return float((matrix.sum(1) - short[t].estimate @ ends[1][t]).norm()) <= tol[t] / 2

    _drive(long, long_values, long_exact)
    return short, long, reach


#: random cotangents per task that estimate ‖V_l‖_F, and the margin put on the estimate
PROBES, PROBE_SAFETY = 4, 1.5


def _long_norms(encoder, tasks: list[_Task], layer: int, budget: int) -> list[float]:
    """‖V_l‖_F of each task's long side, estimated on one G10/K21 panel with random cotangents
    z ~ N(0, I): E (z · V[j])² = |V[j]|², so the mean over probes of Σ_j (z · V[j])² is ‖V‖_F².
    The probes ride the long side's own backward passes as a short side of ``PROBES`` tokens."""
    generator = torch.Generator().manual_seed(0)
    empty = torch.empty(PROBES, 0)
    probes = [_Task(_Side(empty, empty, t.long.g, t.long.g_ref), t.long, t.swapped) for t in tasks]
    z = torch.randn(len(tasks) * PROBES, tasks[0].long.g.shape[-1], generator=generator, dtype=torch.float64)
    path = _Nodes.fixed(len(tasks), torch.from_numpy(G10K21.nodes), torch.from_numpy(G10K21.kronrod_weights))
    rows = _long_rows(encoder, probes, z, path, layer, budget)  # [Σ PROBES, max S_long]
    return [float(rows[k * PROBES : (k + 1) * PROBES].pow(2).sum(1).mean().sqrt()) for k in range(len(tasks))]


def _per_request(stacked: torch.Tensor, lengths: torch.Tensor, requests, widths=None) -> list[torch.Tensor]:
    """Split accumulator rows (one accumulator per node, in request order) back into each
    request's values [n, S_short, …] (the long side's cut to the task's width)."""
    out, row = [], 0
    for t, alphas in requests:
        n, size = len(alphas), int(lengths[t])
        block = stacked[row : row + n * size].reshape(n, size, -1)
        out.append(block[..., : widths[t]] if widths is not None else block)
        row += n * size
    return out


def attribute_pairs(
    encoder: Encoder,
    pairs: list[tuple[str, str]],
    layer: int,
    steps: int = 50,
    rule: str = "right",
    memory_budget_mb: int = MEMORY_BUDGET_MB,
    tolerance: float = 1e-3,
    max_steps: int = 1000,
) -> list[Attribution]:
    """Integrated-Jacobian attributions of several pairs at one layer, computed together: with a
    fixed ``rule`` of ``steps`` nodes, or ``rule="adaptive"`` to ``tolerance`` (relative to
    |score|, whole matrix) within ``max_steps`` nodes per side."""
    if not 0 <= layer < encoder.num_layers:
        raise ValueError(f"layer must be in [0, {encoder.num_layers - 1}], not {layer}")
    budget = memory_budget_mb * 2**20
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    scoring = encoder.scoring
    with encoder.adapter.attention("eager"):  # forward-mode products need attention in plain ops
        sides, batch = _sides(encoder, texts, layer)
        row_of = {t: i for i, t in enumerate(texts)}
        tasks = []
        for a, b in pairs:
            side_a, side_b = sides[row_of[a]], sides[row_of[b]]
            swapped = side_b.length < side_a.length
            tasks.append(_Task(side_b, side_a, True) if swapped else _Task(side_a, side_b, False))
        compared = [(_compared(scoring, t.short), _compared(scoring, t.long)) for t in tasks]
        scales = [_scale(ea, eb) for ea, eb in compared]
        if rule == "adaptive":
            short, long, reach = _adaptive(encoder, tasks, layer, tolerance, max_steps, budget, scales)
            matrices = [q.estimate for q in long]
        else:
            matrices = _fixed(encoder, tasks, layer, rule, steps, budget)

    results = []
    for k, ((a, b), task, raw) in enumerate(zip(pairs, tasks, matrices)):
        side_a, side_b = sides[row_of[a]], sides[row_of[b]]
        ea, eb = _compared(scoring, side_a), _compared(scoring, side_b)
        norm = float(ea.double().norm() * eb.double().norm()) if scoring.shifted and scoring.similarity == "cos" else 1.0
        matrix = (raw.T if task.swapped else raw) / norm
        if scoring.shifted:
            terms = {"ra": 0.0, "rb": 0.0, "rr": 0.0}
        else:
            terms = {
                "ra": scoring.path_score(side_a.g, side_b.g_ref),
                "rb": scoring.path_score(side_a.g_ref, side_b.g),
                "rr": scoring.path_score(side_a.g_ref, side_b.g_ref),
            }
        result = Attribution(
            attributions=matrix.contiguous(),
            score=scoring.path_score(ea, eb),
            reference_terms=terms,
            tokens_a=batch.tokens(encoder.tokenizer, row_of[a]),
            tokens_b=batch.tokens(encoder.tokenizer, row_of[b]),
            truncated=[f for f, t in zip(TEXT_FIELDS, (a, b)) if batch.truncated[row_of[t]]],
            quadrature=rule,
            tolerance=tolerance,
        )
        bound = tolerance * scales[k] / norm  # the tolerance in the answer's units
        exact = result.attribution_error <= bound if scoring.shifted else None
        if rule == "adaptive":
            used = (short[k].nodes_used, long[k].nodes_used)
            panels = ([(q.a, q.b) for q in short[k].panels], [(q.a, q.b) for q in long[k].panels])
            result.nodes = used[::-1] if task.swapped else used
            result.panels = panels[::-1] if task.swapped else panels
            estimate = short[k].error * reach[k] + long[k].error
            result.error_estimate = estimate / scales[k]
            result.converged = short[k].converged and long[k].converged and exact is not False
        else:
            result.nodes, result.converged = (steps, steps), exact
        results.append(result)
    return results


def _compared(scoring, side: _Side) -> torch.Tensor:
    """The embedding the score compares, in the units of the path function g."""
    return side.g - side.g_ref if scoring.shifted else side.g


def _scale(ea: torch.Tensor, eb: torch.Tensor) -> float:
    """|score| in the path function's units, at least 1e-3 of |ea| |eb| (a score near 0 must not
    ask for an absolute error near 0)."""
    ea, eb = ea.double(), eb.double()
    return max(abs(float(ea @ eb)), 1e-3 * float(ea.norm() * eb.norm()), 1e-30)


# -- the method ---------------------------------------------------------------------------------
class IntegratedJacobians(Method):
    """ij: the token×token matrix A with sum(A) = score up to the quadrature's error."""

    name = "ij"
    _budget_hint = " per path node; a later layer fits too"
    #: path nodes per side that an adaptive explanation typically takes, for the time estimate
    #: until served requests say otherwise (two G10/K21 panels; docs/ij.md: "Quadrature")
    TYPICAL_ADAPTIVE_NODES = 63
    #: share of the latest request in the moving average of adaptive node counts
    NODES_WEIGHT = 0.3

    def __init__(self, encoder: Encoder):
        super().__init__(encoder)
        #: per (layer, tolerance): the moving averages (geometric) of the nodes adaptive requests
        #: took on the shorter side and on the longer
        self.nodes_seen: dict[tuple[int, float], tuple[float, float]] = {}

    class Options(MethodOptions):
        layer: int | None = Field(default=None, description="the attributed layer; None: the last block but one")
        quadrature: Quadrature = Field(default="adaptive", description="adaptive to tolerance, or a fixed rule "
                                       "of steps nodes (right: the original's)")
        steps: int = Field(default=50, ge=1, description="path nodes per side of a fixed rule")
        tolerance: float = Field(default=1e-3, ge=1e-6, le=0.5, description="adaptive: the error of the whole "
                                 "matrix relative to |score|")
        max_steps: int = Field(default=1000, ge=21, description="the node budget per side")
        memory_budget_mb: int = Field(default=MEMORY_BUDGET_MB, ge=16, description="peak extra memory of one call")

        @model_validator(mode="after")
        def _steps_within_budget(self):
            if self.quadrature != "adaptive" and self.steps > self.max_steps:
                raise ValueError(f"steps ({self.steps}) exceeds max_steps ({self.max_steps})")
            return self

    @classmethod
    def completed(cls, given: dict) -> dict:
        """``steps`` without ``quadrature`` asks for a fixed rule: Gauss, the best fixed one."""
        if "steps" in given and "quadrature" not in given:
            return {**given, "quadrature": "gauss"}
        return given

    def nodes_per_side(self, options: "IntegratedJacobians.Options") -> tuple[int, int]:
        """Nodes on the shorter side and on the longer: a fixed rule's steps; for the adaptive
        rule, what requests at this layer and tolerance took so far (``observe``), within the budget."""
        if options.quadrature != "adaptive":
            return options.steps, options.steps
        typical = (self.TYPICAL_ADAPTIVE_NODES, self.TYPICAL_ADAPTIVE_NODES)
        seen = self.nodes_seen.get((self.layer(options), options.tolerance), typical)
        return tuple(min(options.max_steps, max(1, round(n))) for n in seen)  # type: ignore[return-value]

    def observe(self, options: "IntegratedJacobians.Options", results: list[Explanation]) -> None:
        """Learn the adaptive rule's node counts at this layer and tolerance from served answers.
        The counts come in whole panels (21, 63, 105, …), so their average is taken in log space:
        a layer whose pairs take 21 or 63 nodes is estimated at about 36, within 2× of either."""
        if options.quadrature != "adaptive":
            return
        key = (self.layer(options), options.tolerance)
        for result in results:
            taken = self._short_long(result)
            seen = self.nodes_seen.get(key, taken)
            self.nodes_seen[key] = tuple(  # type: ignore[assignment]
                math.exp(math.log(s) + self.NODES_WEIGHT * (math.log(t) - math.log(s))) for s, t in zip(seen, taken)
            )

    @staticmethod
    def _short_long(result: Explanation) -> tuple[int, int]:
        """An answer's nodes on its shorter side and on its longer (the shorter is text_a on a tie)."""
        nodes_a, nodes_b = result.extras["nodes"]
        return (nodes_b, nodes_a) if len(result.tokens_b) < len(result.tokens_a) else (nodes_a, nodes_b)

    def work_done(self, result: Explanation, options: "IntegratedJacobians.Options") -> float:
        return self._work((len(result.tokens_a), len(result.tokens_b)), options, self._short_long(result))

    def work_field(self, options: "IntegratedJacobians.Options") -> str:
        return "tolerance" if options.quadrature == "adaptive" else "steps"

    @staticmethod
    def default_layer(num_layers: int) -> int:
        """The last block but one: late enough to be cheap, early enough to see the tokens interact."""
        return max(0, num_layers - 2)

    def layer(self, options: "IntegratedJacobians.Options") -> int:
        layers = self.encoder.num_layers
        layer = options.layer if options.layer is not None else self.default_layer(layers)
        if not 0 <= layer < layers:
            raise InvalidOption(f"layer: must be an integer in [0, {layers - 1}]", "layer")
        return layer

    def memory(self, lengths: tuple[int, int], options: "IntegratedJacobians.Options") -> list[tuple[str, int]]:
        """One path node of each side (more nodes are chunked): forward mode on the shorter
        text, backward on the longer."""
        layer = self.layer(options)
        short = 1 if lengths[1] < lengths[0] else 0
        return [
            (TEXT_FIELDS[side], sum(row_cost(self.encoder, lengths[side], layer, mode)))
            for side, mode in ((short, "jvp"), (1 - short, "vjp"))
        ]

    def work(self, lengths: tuple[int, int], options: "IntegratedJacobians.Options") -> float:
        return self._work(lengths, options, self.nodes_per_side(options))

    def _work(self, lengths: tuple[int, int], options: "IntegratedJacobians.Options", nodes: tuple[int, int]) -> float:
        """Per node, the shorter side's primal and one tangent per token through the blocks after
        the layer, and the longer side's forward and one cotangent per shorter-side token."""
        cost, blocks = self.encoder.cost, self.encoder.num_layers - self.layer(options)
        short, long = sorted(lengths)
        return blocks * (1 + short) * (nodes[0] * cost.block_macs(short) + nodes[1] * cost.block_macs(long))

    def _attribute(self, pairs: list[Pair], options: "IntegratedJacobians.Options") -> list[Explanation]:
        layer = self.layer(options)
        results = attribute_pairs(self.encoder, pairs, layer, options.steps, options.quadrature,
                                  options.memory_budget_mb, options.tolerance, options.max_steps)
        return [
            Explanation(
                method=self.name,
                score=result.score,
                tokens_a=result.tokens_a,
                tokens_b=result.tokens_b,
                truncated=result.truncated,
                delta=result.attribution_error,
                attributions=result.attributions,
                extras={
                    "attribution_sum": result.attribution_sum,
                    "attribution_error": result.attribution_error,
                    "reference_terms": result.reference_terms,
                    "layer": layer,
                    "quadrature": result.quadrature,
                    "steps": max(result.nodes),
                    "nodes": list(result.nodes),
                    "tolerance": result.tolerance,
                    "converged": result.converged,
                    "error_estimate": result.error_estimate,
                },
            )
            for result in results
        ]
