"""GAE: Generic Attention-model Explainability (Chefer et al., ICCV 2021), encoder-only rule.

For each text of a pair, with the other text's embedding held fixed: R = I, and per block l
in order Ā_l = mean over heads of (∇A_l ⊙ A_l)⁺ and R ← R + Ā_l R, where A_l are the block's
attention probabilities and ∇A_l the gradient of the explained score with respect to them. A
token's relevance is the readout of R through the model's pooling (the mean of the attended
rows for mean pooling, the first row for CLS pooling). Every pair of a batch is explained by
one forward and one backward pass (``relevance.explained_pass``).
"""
from __future__ import annotations

import torch

from pydantic import Field

from ..encoder import Encoder
from . import relevance
from .base import Explanation, MethodOptions, Normalization, Pair


def rollout(probabilities: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """[B, S, S] R after every block, from per-block A and ∇A of shape [B, heads, S, S]."""
    batch, _, width, _ = probabilities[0].shape
    result = torch.eye(width, dtype=probabilities[0].dtype, device=probabilities[0].device).expand(batch, width, width)
    for attention, gradient in zip(probabilities, gradients):
        weighted = (gradient * attention).clamp(min=0).mean(1)
        result = result + weighted @ result
    return result


def token_relevance(encoder: Encoder, run: relevance.ExplainedPass) -> torch.Tensor:
    """[2n, S] GAE relevance of every token of every explained text."""
    with relevance.gradients():
        probabilities = run.capture.probabilities
        gradients = torch.autograd.grad(run.scores.sum(), probabilities)
    with torch.no_grad():
        result = rollout(probabilities, gradients)
        weights = relevance.readout_weights(encoder, run.token_embeddings, run.batch.attention_mask)
        return (weights.unsqueeze(1) @ result).squeeze(1)


class GAE(relevance.RelevanceMethod):
    """gae: token relevance per side from attention and its gradient; no completeness claim."""

    name = "gae"
    mode = "gae"

    class Options(MethodOptions):
        normalization: Normalization = Field(default="none", description="per-sample normalisation")

    def _attribute(self, pairs: list[Pair], options: "GAE.Options") -> list[Explanation]:
        with relevance.gradients():
            run = relevance.explained_pass(self.encoder, pairs, self.mode)
            token = token_relevance(self.encoder, run)
        return relevance.side_explanations(self.encoder, self.name, run, token, options.normalization)
