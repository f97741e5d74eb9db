"""Conservative LRP for transformers (Ali et al., ICML 2022), and its token×token form (BiLRP).

Relevance is gradient×input at the hidden state entering block 0, through the model with the
LRP rules switched in (``relevance.RelevanceRules``: attention softmax and norm scales
constant, identity rule for activations, half the gradient through each factor of a gated
product). The forward value is the model's own. For text a, R_i = Σ_h x_ih ∂f/∂x_ih with f the
score with text b's embedding and both norms held constant, so that Σ_i R_i is the score up to
what biases and the constant reference take: ``conservation_error`` = max over the two sides
of |Σ R − score| (on the raw relevance, before normalisation).

Pairwise (``"pairwise": true``): with V_a[i] = x_i · ∂e(a)/∂x_i (the relevance of token i for
every embedding dimension), A_ij = V_a[i] · V_b[j] / (‖e(a)‖ ‖e(b)‖ for a cosine). V comes from
forward-mode products, one tangent per token, never one backward pass per embedding dimension.
"""
from __future__ import annotations

import torch

from ..config import ExplanationSettings
from ..encoder import Encoder
from ..protocol import ExplainItem
from . import relevance

FLOAT_BYTES = 4


def prepare(encoder: Encoder) -> None:
    relevance.rules_of(encoder)


def token_relevance(run: relevance.ExplainedPass) -> torch.Tensor:
    """[2n, S] gradient×input of every token of every explained text (the rules were on)."""
    with relevance.gradients():
        (gradient,) = torch.autograd.grad(run.scores.sum(), run.inputs)
    return (gradient * run.inputs).sum(-1).detach()


def tangent_rows_per_pass(encoder: Encoder, width: int, budget_bytes: int) -> int:
    """How many forward-mode rows of ``width`` tokens fit the memory budget at once."""
    config = encoder.adapter.model.config
    heads = int(getattr(config, "num_attention_heads", None) or config.num_heads)
    inner = int(getattr(config, "intermediate_size", None) or 2 * config.d_ff)
    per_token = 2 * heads * width + 8 * encoder.adapter.hidden_size + 2 * inner  # primal and tangent
    return max(1, budget_bytes // (2 * FLOAT_BYTES * width * per_token))


def token_vectors(encoder: Encoder, run: relevance.ExplainedPass, row: int, budget_bytes: int) -> torch.Tensor:
    """[S, D] V[i] = x_i · ∂e/∂x_i of one explained text: one forward-mode tangent per token.

    The tangents are vmapped over one primal pass, so the text itself goes through the model once.
    """
    adapter = encoder.adapter
    length = run.batch.lengths[row]
    x = run.inputs[row : row + 1, :length].detach()
    reference = run.references[row : row + 1] if run.references is not None else None
    mask = torch.ones(1, length, dtype=torch.long, device=x.device)
    tokens = torch.arange(length, device=x.device)
    tangents = torch.zeros(length, *x.shape, dtype=x.dtype, device=x.device)
    tangents[tokens, 0, tokens] = x[0]

    def embedding(hidden: torch.Tensor) -> torch.Tensor:
        out = adapter.finish(adapter.run_blocks(hidden, adapter.context(mask, hidden)))
        return relevance.final_embeddings(encoder, encoder.head(out, mask), reference)

    def product(tangent: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(embedding, (x,), (tangent,))[1]

    chunk = tangent_rows_per_pass(encoder, length, budget_bytes)
    with relevance.rules_of(encoder).active("lrp"), torch.no_grad():
        return torch.func.vmap(product, chunk_size=chunk)(tangents)[:, 0]


def pairwise(encoder: Encoder, run: relevance.ExplainedPass, item: int, budget_bytes: int) -> torch.Tensor:
    """[S_a, S_b] BiLRP token×token relevance of one pair of the pass."""
    a, b = run.side_rows(item)
    matrix = token_vectors(encoder, run, a, budget_bytes) @ token_vectors(encoder, run, b, budget_bytes).T
    return matrix / run.norms()[item] if encoder.similarity == "cos" else matrix


def explain_batch(encoder: Encoder, items: list[ExplainItem], settings: ExplanationSettings) -> list[dict]:
    budget = settings.memory_budget_mb * 2**20
    with relevance.gradients():
        run = relevance.explained_pass(encoder, items, "lrp")
        relevance_rows = token_relevance(run)
    answers = relevance.side_answers(encoder, items, run, relevance_rows)
    for k, (item, answer) in enumerate(zip(items, answers)):
        score = run.scores[k].detach().double()
        sums = [relevance_rows[row, : run.batch.lengths[row]].double().sum() for row in run.side_rows(k)]
        answer["conservation_error"] = max(float((s - score).abs()) for s in sums)
        if item.pairwise:
            matrix = pairwise(encoder, run, k, budget).double()
            answer["attributions"] = relevance.normalise(matrix, item.normalization).tolist()
    return answers
