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

from dataclasses import dataclass
from itertools import groupby

import torch
import torch.nn.functional as F

from ..config import ExplanationSettings
from ..encoder import Encoder
from ..protocol import ExplainItem, RequestError
from .quadrature import nodes

FLOAT_BYTES = 4
TEXT_FIELDS = ("text_a", "text_b")


@dataclass
class Attribution:
    """The ij explanation of one pair (A in float64, rows: tokens of a, columns: tokens of b)."""

    attributions: torch.Tensor
    score: float
    reference_terms: dict[str, float]
    tokens_a: list[str]
    tokens_b: list[str]
    truncated: list[str]

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
def _normalizes(encoder: Encoder) -> bool:
    return encoder.reference == "none" and (encoder.similarity == "cos" or encoder.normalize)


def _embedding(encoder: Encoder, hidden: torch.Tensor, mask: torch.Tensor, ctx, layer: int) -> torch.Tensor:
    """g of hidden states entering block ``layer`` (without the constant shift)."""
    adapter = encoder.adapter
    out = adapter.finish(adapter.run_blocks(hidden, ctx, layer))
    emb = encoder.head(out, mask)
    return F.normalize(emb, dim=-1) if _normalizes(encoder) else emb


def _context(encoder: Encoder, mask: torch.Tensor):
    probe = torch.zeros(*mask.shape, encoder.adapter.hidden_size, device=mask.device)
    return encoder.adapter.context(mask, probe)


# -- memory ------------------------------------------------------------------------------------
def block_bytes(encoder: Encoder, width: int) -> int:
    """Estimated bytes of the temporaries of one block for one row of ``width`` tokens."""
    config = encoder.adapter.model.config
    heads = int(getattr(config, "num_attention_heads", None) or config.num_heads)
    hidden = encoder.adapter.hidden_size
    inner = int(getattr(config, "intermediate_size", None) or 2 * config.d_ff)
    return FLOAT_BYTES * (4 * heads * width * width + 12 * width * hidden + 3 * width * inner)


def row_cost(encoder: Encoder, width: int, layer: int, mode: str) -> tuple[int, int]:
    """Bytes of one path row: (fixed, per tangent or cotangent carried with it).

    Forward mode keeps one block's primal and tangents at a time; backward mode keeps the
    activations of every block from ``layer`` on, and the cotangents' temporaries of one block.
    """
    block = block_bytes(encoder, width)
    fixed = block if mode == "jvp" else (encoder.num_layers - layer + 1) * block
    return fixed, 2 * block


def _check_budget(encoder: Encoder, item: ExplainItem, budget: int) -> None:
    lengths = [len(encoder.tokenize([t]).input_ids[0]) for t in item.texts()]
    short = 1 if lengths[1] < lengths[0] else 0
    for side, mode in ((short, "jvp"), (1 - short, "vjp")):
        need = sum(row_cost(encoder, lengths[side], item.layer, mode))
        if need > budget:
            field = TEXT_FIELDS[side]
            raise RequestError(
                f"{field}: {lengths[side]} tokens attributed to layer {item.layer} need about "
                f"{need / 2**20:.0f} MB per path node; the memory budget is {budget / 2**20:.0f} MB "
                "(a shorter text or a later layer fits)",
                field,
                413,
            )


# -- path rows ---------------------------------------------------------------------------------
@dataclass
class _Chunk:
    """Path rows computed in one pass; row r carries the tangents (or cotangents) of the
    short-side tokens start[r] … start[r] + T − 1 (those past the text's end are zero)."""

    task: torch.Tensor  # [R]
    node: torch.Tensor  # [R]
    start: torch.Tensor  # [R]
    tangents: int  # T

    def path(self, sides: list[_Side], alphas: torch.Tensor):
        """Padded hidden states h(α) [R, W, H] and attention masks [R, W] of the rows."""
        width = max(sides[t].length for t in self.task.tolist())
        x = sides[0].x
        hidden = torch.zeros(len(self.task), width, x.shape[-1], dtype=x.dtype, device=x.device)
        mask = torch.zeros(len(self.task), width, dtype=torch.long, device=x.device)
        for t, rows in self.by_task():
            side = sides[t]
            a = alphas[self.node[rows]].to(x.dtype).to(x.device)[:, None, None]
            hidden[rows, : side.length] = side.r + a * side.delta
            mask[rows, : side.length] = 1
        return hidden, mask

    def by_task(self):
        for t in torch.unique(self.task).tolist():
            yield t, (self.task == t).nonzero().squeeze(1)

    def tokens(self, offsets: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global short-side token index [T, R] of each (tangent, row), and whether it exists."""
        local = self.start[None, :] + torch.arange(self.tangents)[:, None]
        valid = local < lengths[self.task][None, :]
        return offsets[self.task][None, :] + local, valid


def _plan(tasks: list[_Task], steps: int, cost, budget: int) -> list[_Chunk]:
    """Rows (task, node, token range) packed into chunks whose estimated bytes fit ``budget``.

    ``cost(task) -> (fixed, per)`` gives one row's bytes; a chunk of R rows carrying T tangents
    costs R · (fixed + T · per) at its widest row. Tasks are taken shortest first.
    """
    units = []  # (task, node, start, count)
    for t in sorted(range(len(tasks)), key=lambda t: (tasks[t].long.length, tasks[t].short.length)):
        fixed, per = cost(tasks[t])
        piece = max(1, min(tasks[t].short.length, (budget - fixed) // per))
        for start in range(0, tasks[t].short.length, piece):
            count = min(piece, tasks[t].short.length - start)
            units += [(t, k, start, count) for k in range(steps)]
    chunks, current, worst = [], [], (0, 0, 0)
    for unit in units:
        fixed, per = cost(tasks[unit[0]])
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
    task, node, start, count = (torch.tensor(column) for column in zip(*units))
    return _Chunk(task, node, start, int(count.max()))


def _token_layout(tasks: list[_Task]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([task.short.length for task in tasks])
    return torch.cumsum(lengths, 0) - lengths, lengths


@torch.no_grad()
def _short_vectors(encoder, tasks: list[_Task], steps, layer, alphas, weights, budget) -> torch.Tensor:
    """v_i of every task's short-side tokens, stacked [Σ S_short, D]: forward-mode products,
    the primal of each node computed once and its tangents (one per token) vmapped.

    Forward mode needs no autograd graph, and one must not be recorded: the model's parameters
    require grad, so with grad mode on (TorchServe's ``handle`` runs with it) every chunk's
    products would keep their saved tensors, chained through ``vectors``, until the end of the
    call — memory growing with pairs × steps whatever the budget."""
    sides = [t.short for t in tasks]
    offsets, lengths = _token_layout(tasks)
    vectors = torch.zeros(int(lengths.sum()), sides[0].g.shape[-1], dtype=torch.float64)
    cost = lambda task: row_cost(encoder, task.short.length, layer, "jvp")  # noqa: E731
    for chunk in _plan(tasks, steps, cost, budget):
        hidden, mask = chunk.path(sides, alphas)
        ctx = _context(encoder, mask)
        index, valid = chunk.tokens(offsets, lengths)
        tangents = torch.zeros(chunk.tangents, *hidden.shape, dtype=hidden.dtype, device=hidden.device)
        for t, rows in chunk.by_task():
            tangent, row = valid[:, rows].nonzero(as_tuple=True)
            token = chunk.start[rows][row] + tangent
            tangents[tangent, rows[row], token] = sides[t].delta[token]

        def tangent_out(tangent: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda h: _embedding(encoder, h, mask, ctx, layer), (hidden,), (tangent,))[1]

        out = torch.func.vmap(tangent_out)(tangents).double().cpu()  # [T, R, D]
        out = out * weights[chunk.node][None, :, None]
        vectors.index_add_(0, index[valid], out[valid])
    return vectors


def _long_rows(encoder, tasks: list[_Task], vectors, steps, layer, alphas, weights, budget) -> torch.Tensor:
    """A oriented short × long, stacked [Σ S_short, max S_long]: vector-Jacobian products of
    each node's forward pass with the cotangents w_k v_i (one per short-side token, batched)."""
    sides = [t.long for t in tasks]
    offsets, lengths = _token_layout(tasks)
    rows_out = torch.zeros(vectors.shape[0], max(s.length for s in sides), dtype=torch.float64)
    cost = lambda task: row_cost(encoder, task.long.length, layer, "vjp")  # noqa: E731
    for chunk in _plan(tasks, steps, cost, budget):
        hidden, mask = chunk.path(sides, alphas)
        ctx = _context(encoder, mask)
        index, valid = chunk.tokens(offsets, lengths)
        safe = index.clamp(max=vectors.shape[0] - 1)
        cotangents = vectors[safe] * (valid[..., None] * weights[chunk.node][None, :, None])
        with torch.enable_grad():
            hidden.requires_grad_(True)
            out = _embedding(encoder, hidden, mask, ctx, layer)
            (grad,) = torch.autograd.grad(
                out, hidden, cotangents.to(out.dtype).to(out.device), is_grads_batched=True
            )  # [T, R, W, H]
        deltas = torch.zeros_like(hidden, requires_grad=False)
        for t, rows in chunk.by_task():
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


def _similarity(encoder: Encoder, a: torch.Tensor, b: torch.Tensor) -> float:
    if _normalizes(encoder) or encoder.similarity == "dot":
        return float(a.double() @ b.double())
    return float(F.cosine_similarity(a.double()[None], b.double()[None], eps=1e-12)[0])


def attribute_pairs(
    encoder: Encoder,
    pairs: list[tuple[str, str]],
    layer: int,
    steps: int,
    rule: str = "right",
    memory_budget_mb: int = 1024,
) -> list[Attribution]:
    """Integrated-Jacobian attributions of several pairs at one (layer, steps), computed together."""
    if not 0 <= layer < encoder.num_layers:
        raise ValueError(f"layer must be in [0, {encoder.num_layers - 1}], not {layer}")
    budget = memory_budget_mb * 2**20
    alphas, weights = nodes(rule, steps)
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    with encoder.adapter.attention("eager"):  # forward-mode products need attention in plain ops
        sides, batch = _sides(encoder, texts, layer)
        row_of = {t: i for i, t in enumerate(texts)}
        tasks = []
        for a, b in pairs:
            side_a, side_b = sides[row_of[a]], sides[row_of[b]]
            swapped = side_b.length < side_a.length
            tasks.append(_Task(side_b, side_a, True) if swapped else _Task(side_a, side_b, False))
        vectors = _short_vectors(encoder, tasks, steps, layer, alphas, weights, budget)
        stacked = _long_rows(encoder, tasks, vectors, steps, layer, alphas, weights, budget)
    offsets, lengths = _token_layout(tasks)

    results = []
    for (a, b), task, offset, length in zip(pairs, tasks, offsets.tolist(), lengths.tolist()):
        side_a, side_b = sides[row_of[a]], sides[row_of[b]]
        matrix = stacked[offset : offset + length, : task.long.length]
        matrix = matrix.T if task.swapped else matrix
        if encoder.reference == "shift":
            ea, eb = side_a.g - side_a.g_ref, side_b.g - side_b.g_ref
            if encoder.similarity == "cos":
                matrix = matrix / (ea.double().norm() * eb.double().norm())
            terms = {"ra": 0.0, "rb": 0.0, "rr": 0.0}
        else:
            ea, eb = side_a.g, side_b.g
            terms = {
                "ra": _similarity(encoder, side_a.g, side_b.g_ref),
                "rb": _similarity(encoder, side_a.g_ref, side_b.g),
                "rr": _similarity(encoder, side_a.g_ref, side_b.g_ref),
            }
        results.append(
            Attribution(
                attributions=matrix.contiguous(),
                score=_similarity(encoder, ea, eb),
                reference_terms=terms,
                tokens_a=batch.tokens(encoder.tokenizer, row_of[a]),
                tokens_b=batch.tokens(encoder.tokenizer, row_of[b]),
                truncated=[f for f, t in zip(TEXT_FIELDS, (a, b)) if batch.truncated[row_of[t]]],
            )
        )
    return results


# -- the method module's interface -------------------------------------------------------------
def _answer(result: Attribution, item: ExplainItem, rule: str) -> dict:
    return {
        "score": result.score,
        "attributions": result.attributions.tolist(),
        "attribution_sum": result.attribution_sum,
        "attribution_error": result.attribution_error,
        "reference_terms": result.reference_terms,
        "layer": item.layer,
        "steps": item.steps,
        "quadrature": rule,
        "tokens_a": result.tokens_a,
        "tokens_b": result.tokens_b,
        "truncated": result.truncated,
    }


def explain_batch(encoder: Encoder, items: list[ExplainItem], settings: ExplanationSettings) -> list[dict | RequestError]:
    """Answer resolved ij items; those sharing (layer, steps) are computed together."""
    budget = settings.memory_budget_mb * 2**20
    answers: list[dict | RequestError | None] = [None] * len(items)
    runnable = []
    for index, item in enumerate(items):
        try:
            _check_budget(encoder, item, budget)
            runnable.append(index)
        except RequestError as error:
            answers[index] = error
    key = lambda i: (items[i].layer, items[i].steps)  # noqa: E731
    for (layer, steps), group in groupby(sorted(runnable, key=key), key=key):
        indexes = list(group)
        pairs = [(items[i].text_a, items[i].text_b) for i in indexes]
        results = attribute_pairs(encoder, pairs, layer, steps, settings.quadrature, settings.memory_budget_mb)
        for i, result in zip(indexes, results):
            answers[i] = _answer(result, items[i], settings.quadrature)
    return answers  # type: ignore[return-value]
