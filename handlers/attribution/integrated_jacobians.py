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
    """One pair: which side goes forward-mode (the shorter), and what accumulates."""

    short: _Side
    long: _Side
    swapped: bool  # the short side is text b
    v: torch.Tensor | None = None  # [S_short, D] per-token vectors of the short side
    rows: torch.Tensor | None = None  # [S_short, S_long] A oriented short × long


# -- the function being attributed ---------------------------------------------------------------
def _normalizes(encoder: Encoder) -> bool:
    return encoder.reference == "none" and (encoder.similarity == "cos" or encoder.normalize)


def _embedding(encoder: Encoder, hidden: torch.Tensor, mask: torch.Tensor, ctx, layer: int) -> torch.Tensor:
    """g of hidden states entering block ``layer`` (without the constant shift)."""
    adapter = encoder.adapter
    out = adapter.finish(adapter.run_blocks(hidden, ctx, layer))
    emb = encoder.head(out, mask)
    return F.normalize(emb, dim=-1) if _normalizes(encoder) else emb


def _context(encoder: Encoder, mask: torch.Tensor, width: int):
    probe = torch.zeros(mask.shape[0], width, encoder.adapter.hidden_size, device=mask.device)
    return encoder.adapter.context(mask, probe)


# -- memory ------------------------------------------------------------------------------------
def row_bytes(encoder: Encoder, width: int, layer: int, mode: str) -> int:
    """Estimated peak bytes of one path row of ``width`` tokens ("jvp" or "vjp")."""
    config = encoder.adapter.model.config
    heads = int(getattr(config, "num_attention_heads", None) or config.num_heads)
    hidden = encoder.adapter.hidden_size
    inner = int(getattr(config, "intermediate_size", None) or 2 * config.d_ff)
    block = FLOAT_BYTES * (4 * heads * width * width + 12 * width * hidden + 3 * width * inner)
    if mode == "vjp":  # activations of every block kept for the backward pass
        return (encoder.num_layers - layer) * block + block
    return 3 * block  # forward mode keeps primal and tangent of one block at a time


def _check_budget(encoder: Encoder, item: ExplainItem, budget: int) -> None:
    lengths = [len(encoder.tokenize([t]).input_ids[0]) for t in item.texts()]
    short = min(range(2), key=lambda s: (lengths[s], s))
    for side, mode in ((short, "jvp"), (1 - short, "vjp")):
        need = row_bytes(encoder, lengths[side], item.layer, mode)
        if need > budget:
            field = TEXT_FIELDS[side]
            raise RequestError(
                f"{field}: {lengths[side]} tokens attributed to layer {item.layer} need about "
                f"{need / 2**20:.0f} MB per path node; the memory budget is {budget / 2**20:.0f} MB "
                "(a shorter text or a later layer fits)",
                field,
                413,
            )


def _chunks(widths: list[int], cost, budget: int) -> list[list[int]]:
    """Consecutive index runs (rows sorted by width) whose summed cost stays within budget."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and cost(widths[i]) * (len(current) + 1) > budget:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


# -- path rows ---------------------------------------------------------------------------------
@dataclass
class _Rows:
    """Path rows: (task, node, short-side token) triples, flattened over a group of tasks."""

    task: torch.Tensor
    node: torch.Tensor
    token: torch.Tensor

    @classmethod
    def of(cls, tasks: list[_Task], steps: int) -> "_Rows":
        parts = [
            torch.cartesian_prod(torch.tensor([t]), torch.arange(steps), torch.arange(task.short.length))
            for t, task in enumerate(tasks)
        ]
        rows = torch.cat(parts)
        return cls(rows[:, 0], rows[:, 1], rows[:, 2])

    def path(self, sides: list[_Side], chunk: list[int], alphas: torch.Tensor):
        """Padded hidden states h(α) and attention masks of the rows in ``chunk``."""
        width = max(sides[int(self.task[i])].length for i in chunk)
        size = sides[0].x.shape[-1]
        hidden = torch.zeros(len(chunk), width, size, dtype=sides[0].x.dtype)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        index = torch.tensor(chunk)
        for t, positions in self.by_task(index):
            side = sides[t]
            a = alphas[self.node[index[positions]]].to(side.x.dtype)[:, None, None]
            hidden[positions, : side.length] = side.r + a * side.delta
            mask[positions, : side.length] = 1
        return hidden.to(sides[0].x.device), mask.to(sides[0].x.device), index

    def by_task(self, index: torch.Tensor):
        tasks = self.task[index]
        for t in torch.unique(tasks).tolist():
            yield t, (tasks == t).nonzero().squeeze(1)


def _short_vectors(encoder, tasks: list[_Task], rows: _Rows, layer, alphas, weights, budget) -> None:
    """v_i of every task's short side: forward-mode products, one tangent per token and node."""
    sides = [t.short for t in tasks]
    for task in tasks:
        task.v = torch.zeros(task.short.length, task.short.g.shape[-1], dtype=torch.float64)
    widths = [sides[int(t)].length for t in rows.task]
    for chunk in _chunks(widths, lambda w: row_bytes(encoder, w, layer, "jvp"), budget):
        hidden, mask, index = rows.path(sides, chunk, alphas)
        tangent = torch.zeros_like(hidden)
        for t, positions in rows.by_task(index):
            tokens = rows.token[index[positions]]
            tangent[positions, tokens] = sides[t].delta[tokens]
        ctx = _context(encoder, mask, hidden.shape[1])
        _, out = torch.func.jvp(lambda h: _embedding(encoder, h, mask, ctx, layer), (hidden,), (tangent,))
        weighted = out.double() * weights[rows.node[index]][:, None]
        for t, positions in rows.by_task(index):
            tasks[t].v.index_add_(0, rows.token[index[positions]], weighted[positions])


def _long_rows(encoder, tasks: list[_Task], rows: _Rows, layer, alphas, weights, budget) -> None:
    """A on the long side: vector-Jacobian products with cotangents w_k v_i, one per row."""
    sides = [t.long for t in tasks]
    for task in tasks:
        task.rows = torch.zeros(task.short.length, task.long.length, dtype=torch.float64)
    widths = [sides[int(t)].length for t in rows.task]
    for chunk in _chunks(widths, lambda w: row_bytes(encoder, w, layer, "vjp"), budget):
        hidden, mask, index = rows.path(sides, chunk, alphas)
        cotangent = torch.empty(len(chunk), tasks[0].v.shape[-1], dtype=torch.float64)
        for t, positions in rows.by_task(index):
            cotangent[positions] = tasks[t].v[rows.token[index[positions]]]
        cotangent *= weights[rows.node[index]][:, None]
        ctx = _context(encoder, mask, hidden.shape[1])
        with torch.enable_grad():
            hidden.requires_grad_(True)
            out = _embedding(encoder, hidden, mask, ctx, layer)
            (grad,) = torch.autograd.grad(out, hidden, cotangent.to(out.dtype).to(out.device))
        for t, positions in rows.by_task(index):
            side = sides[t]
            contribution = (grad[positions, : side.length] * side.delta).sum(-1).double().cpu()
            tasks[t].rows.index_add_(0, rows.token[index[positions]], contribution)


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
    sides, batch = _sides(encoder, texts, layer)
    row_of = {t: i for i, t in enumerate(texts)}
    tasks = []
    for a, b in pairs:
        side_a, side_b = sides[row_of[a]], sides[row_of[b]]
        swapped = side_b.length < side_a.length
        tasks.append(_Task(side_b, side_a, True) if swapped else _Task(side_a, side_b, False))
    rows = _Rows.of(tasks, steps)
    _short_vectors(encoder, tasks, rows, layer, alphas, weights, budget)
    _long_rows(encoder, tasks, rows, layer, alphas, weights, budget)

    results = []
    for (a, b), task in zip(pairs, tasks):
        side_a, side_b = sides[row_of[a]], sides[row_of[b]]
        matrix = task.rows.T if task.swapped else task.rows
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
