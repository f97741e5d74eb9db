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

from pydantic import Field

from ..encoder import Encoder
from . import relevance
from .base import MEMORY_BUDGET_MB, Explanation, MethodOptions, Normalization, Pair


def token_relevance(run: relevance.ExplainedPass) -> torch.Tensor:
    """[2n, S] gradient×input of every token of every explained text (the rules were on)."""
    with relevance.gradients():
        (gradient,) = torch.autograd.grad(run.scores.sum(), run.inputs)
    return (gradient * run.inputs).sum(-1).detach()


def tangent_rows_per_pass(encoder: Encoder, width: int, budget_bytes: int) -> int:
    """How many forward-mode rows of ``width`` tokens (primal and tangent) fit the budget at once."""
    return max(1, budget_bytes // (2 * encoder.cost.block_bytes(width)))


def token_vectors(encoder: Encoder, run: relevance.ExplainedPass, row: int, budget_bytes: int) -> torch.Tensor:
    """[S, D] V[i] = x_i · ∂e/∂x_i of one explained text: one forward-mode tangent per token.

    The tangents are vmapped over one primal pass, so the text itself goes through the model once.
    """
    adapter = encoder.adapter
    length = run.batch.lengths[row]
    x = run.inputs[row : row + 1, :length].detach()
    reference = run.references[row : row + 1] if run.references is not None else None
    scoring = encoder.scoring
    mask = torch.ones(1, length, dtype=torch.long, device=x.device)
    tokens = torch.arange(length, device=x.device)
    tangents = torch.zeros(length, *x.shape, dtype=x.dtype, device=x.device)
    tangents[tokens, 0, tokens] = x[0]

    def embedding(hidden: torch.Tensor) -> torch.Tensor:
        out = adapter.finish(adapter.run_blocks(hidden, adapter.context(mask, hidden)))
        return scoring.explained(encoder.head(out, mask), reference)

    def product(tangent: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(embedding, (x,), (tangent,))[1]

    chunk = tangent_rows_per_pass(encoder, length, budget_bytes)
    with relevance.rules_of(encoder).active("lrp"), torch.no_grad():
        return torch.func.vmap(product, chunk_size=chunk)(tangents)[:, 0]


def pairwise(encoder: Encoder, run: relevance.ExplainedPass, item: int, budget_bytes: int) -> torch.Tensor:
    """[S_a, S_b] BiLRP token×token relevance of one pair of the pass."""
    a, b = run.side_rows(item)
    matrix = token_vectors(encoder, run, a, budget_bytes) @ token_vectors(encoder, run, b, budget_bytes).T
    return matrix / run.norms(encoder)[item]


class LRP(relevance.RelevanceMethod):
    """lrp: conservative relevance per side, and the token×token matrix when ``pairwise``."""

    name = "lrp"
    work_option = "pairwise"

    class Options(MethodOptions):
        normalization: Normalization = Field(default="none", description="per-sample normalisation")
        pairwise: bool = Field(default=False, description="also the token×token matrix (BiLRP)")
        memory_budget_mb: int = Field(default=MEMORY_BUDGET_MB, ge=16, description="peak extra memory of the pairwise tangents")

    def work(self, lengths: tuple[int, int], options: "LRP.Options") -> float:
        total = super().work(lengths, options)
        if options.pairwise:  # one forward-mode tangent per token, primal and tangent
            total += 3 * sum(self.encoder.cost.pass_macs(n, n) for n in lengths)
        return total

    def _attribute(self, pairs: list[Pair], options: "LRP.Options") -> list[Explanation]:
        encoder, budget = self.encoder, options.memory_budget_mb * 2**20
        with relevance.gradients():
            run = relevance.explained_pass(encoder, pairs, "lrp")
            rows = token_relevance(run)
        results = relevance.side_explanations(encoder, self.name, run, rows, options.normalization)
        for k, result in enumerate(results):
            score = run.scores[k].detach().double()
            sums = [rows[row, : run.batch.lengths[row]].double().sum() for row in run.side_rows(k)]
            result.delta = max(float((s - score).abs()) for s in sums)
            result.extras["conservation_error"] = result.delta
            if options.pairwise:
                matrix = pairwise(encoder, run, k, budget).double()
                result.attributions = relevance.normalise(matrix, options.normalization)
        return results
