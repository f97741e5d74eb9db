"""Conservative LRP for transformers (Ali et al., ICML 2022), and its token×token form (BiLRP).

Relevance is taken through the model with the LRP rules switched in (``relevance.RelevanceRules``:
attention softmax and norm scales constant, identity rule for activations, half the gradient
through each factor of a gated product). The forward value is the model's own. With those
constants the network is jointly linear in its input x (the hidden state entering block 0) and
its biases, so by Euler's theorem the score f (text b's embedding and both norms held constant
for text a, and the other way round) is exactly

    f = Σ_i x_i·∂f/∂x_i + Σ_i Σ_b b·∂f/∂y_i(b)

with y_i(b) the row i of the output a bias b is added to (the bias switches s of
``RelevanceRules``: ∂f/∂s_i, from the same backward pass as ∂f/∂x). Token i's relevance R_i is
its gradient×input plus the bias terms of row i. In shift mode the score is that of
e(x) − e(r): R_i = R_i(x) − V_r[i]·∂f/∂e', with V_r the decomposition of e(r) (below), a
constant of the model per reference length (``LRP.reference_vectors``, computed once per length
and weights version, as e(r) itself). So Σ_i R_i = score up to float rounding, in both reference
modes, for cos and dot: ``delta`` and ``conservation_error`` (max over the two sides of
|Σ R − score|, on the raw relevance) report that rounding. ``bias_share_a`` / ``bias_share_b``:
Σ_i |bias terms of i| / (Σ_i |gradient×input of i| + Σ_i |bias terms of i|), per side (how much
of the answer the biases carry).

Pairwise (``"pairwise": true``): V[i] = the part of the compared embedding e' that token i
carries (gradient×input and bias terms of row i, less the reference's V_r[i] in shift mode), so
Σ_i V[i] = e'. A_ij = V_a[i] · V_b[j] (/ ‖e'(a)‖ ‖e'(b)‖ for a cosine), Σ_ij A_ij = score and
Σ_j A_ij = R_a[i]. V comes from forward-mode products, one tangent per token (x_i on row i, 1 on
row i's bias switch and the pooling's readout weight of i on the sentence row's, which shares
the Dense head's bias among the tokens), never one backward pass per embedding dimension.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from pydantic import Field

from ..encoder import Encoder
from . import relevance
from .base import MEMORY_BUDGET_MB, Explanation, MethodOptions, Normalization, Pair

#: what the per-length reference decompositions (2·S·D values each) may hold at most
REFERENCE_CACHE_BYTES = 128 * 2**20
DEFAULT_BUDGET_BYTES = MEMORY_BUDGET_MB * 2**20


def bias_share(inputs: torch.Tensor, bias: torch.Tensor) -> float:
    """The share of Σ|relevance| that the bias terms carry (0 without biases)."""
    total = float(inputs.abs().sum() + bias.abs().sum())
    return float(bias.abs().sum()) / total if total > 0 else 0.0


def tangent_rows_per_pass(encoder: Encoder, width: int, budget_bytes: int) -> int:
    """How many forward-mode rows of ``width`` tokens (primal and tangent) fit the budget at once."""
    return max(1, budget_bytes // (2 * encoder.cost.block_bytes(width)))


def decompose(
    encoder: Encoder, x: torch.Tensor, weights: torch.Tensor, budget_bytes: int, split: bool = False
) -> torch.Tensor:
    """[S, D] per token of one text x [1, S, H]: the part of its explained embedding that the token
    carries through the rule-switched model, its gradient×input plus the bias terms of its row (the
    sentence row's biases shared out by the readout ``weights`` [S]); with ``split``, [2, S, D]:
    the gradient×input and the bias terms apart (twice the tangents).

    The explained embedding is the un-shifted e in shift mode (e(r) is a constant there), and
    ``Reference.explained`` otherwise (a Normalize with its norm held constant). One primal pass,
    the tangents vmapped over it in chunks.
    """
    adapter, scoring, rules = encoder.adapter, encoder.scoring, relevance.rules_of(encoder)
    length = x.shape[1]
    mask = torch.ones(1, length, dtype=torch.long, device=x.device)
    on = dict(dtype=x.dtype, device=x.device)
    primals = (x, torch.ones(1, length, **on), torch.ones(1, **on))

    def embedding(hidden: torch.Tensor, rows: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        with rules.bias_switches(rows, sentence):
            pooled = encoder.head(adapter.finish(adapter.run_blocks(hidden, adapter.context(mask, hidden))), mask)
        return pooled if scoring.shifted else scoring.explained(pooled, None)

    def token(selector: torch.Tensor, on_inputs: torch.Tensor, on_bias: torch.Tensor) -> torch.Tensor:
        """The tangent of one token (``selector`` [S] one-hot): x on its row, its row's switch and
        its readout weight on the sentence switch, each part as ``on_inputs`` / ``on_bias`` say."""
        tangents = (
            (selector * on_inputs)[None, :, None] * x,
            (selector * on_bias)[None],
            (selector @ weights * on_bias)[None],
        )
        return torch.func.jvp(embedding, primals, tangents)[1][0]

    eye = torch.eye(length, **on)
    ones, zeros = torch.ones(length, **on), torch.zeros(length, **on)
    if split:  # S tangents of the input alone, then S of the biases alone
        selectors, on_inputs, on_bias = torch.cat([eye, eye]), torch.cat([ones, zeros]), torch.cat([zeros, ones])
    else:
        selectors, on_inputs, on_bias = eye, ones, ones
    chunk = tangent_rows_per_pass(encoder, length, budget_bytes)
    with rules.active("lrp"), torch.inference_mode(False), torch.no_grad():
        vectors = torch.func.vmap(token, chunk_size=chunk)(selectors, on_inputs, on_bias)
    return vectors.view(2, length, -1) if split else vectors


class LRP(relevance.RelevanceMethod):
    """lrp: conservative relevance per side, and the token×token matrix when ``pairwise``."""

    name = "lrp"
    work_option = "pairwise"

    class Options(MethodOptions):
        normalization: Normalization = Field(default="none", description="per-sample normalisation")
        pairwise: bool = Field(default=False, description="also the token×token matrix (BiLRP)")
        memory_budget_mb: int = Field(default=MEMORY_BUDGET_MB, ge=16, description="peak extra memory of the pairwise tangents")

    def __init__(self, encoder: Encoder):
        super().__init__(encoder)
        # per reference length, its decomposition; valid for the weights version it was computed at
        self._references: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._references_version = -1

    def work(self, lengths: tuple[int, int], options: "LRP.Options") -> float:
        total = super().work(lengths, options)
        if options.pairwise:  # one forward-mode tangent per token, primal and tangent
            total += 3 * sum(self.encoder.cost.pass_macs(n, n) for n in lengths)
        return total

    # -- the reference's decomposition ----------------------------------------------------------
    def reference_vectors(self, length: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, D] twice: the decomposition V_r of the un-shifted reference embedding e(r_S) into its
        tokens' gradient×input and bias terms; Σ over both = e(r). A constant of the model: 2S
        forward-mode tangents once per length, again after the weights change (as
        ``Encoder.reference_embeddings``); the least recently used lengths go when the cache holds
        more than ``REFERENCE_CACHE_BYTES``."""
        encoder, cache = self.encoder, self._references
        version = encoder.weights_version()
        if version != self._references_version:
            cache.clear()
            self._references_version = version
        if length in cache:
            cache.move_to_end(length)
            return cache[length]
        references = encoder.references([length])
        with torch.inference_mode(False), torch.no_grad():
            x = encoder.adapter.embed(references.input_ids)
            tokens = encoder.adapter.forward(references.input_ids, references.attention_mask)
        weights = relevance.readout_weights(encoder, tokens, references.attention_mask)[0]
        inputs, bias = decompose(encoder, x, weights, budget_bytes, split=True)
        cache[length] = (inputs, bias)
        held = sum(t.nbytes for entry in cache.values() for t in entry)
        while held > REFERENCE_CACHE_BYTES and len(cache) > 1:
            held -= sum(t.nbytes for t in cache.popitem(last=False)[1])
        return inputs, bias

    # -- one backward pass: relevance per side ------------------------------------------------------
    def relevance_parts(
        self, run: relevance.ExplainedPass, budget_bytes: int = DEFAULT_BUDGET_BYTES
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[2n, S] twice: the gradient×input and the bias terms of every token of every explained
        text (an lrp pass); in shift mode, less the reference's, position by position."""
        assert run.switches is not None, "an lrp pass has bias switches"
        with relevance.gradients():
            gradient, outer, bias, sentence_bias = torch.autograd.grad(
                run.scores.sum(), (run.inputs, run.embeddings, *run.switches), allow_unused=True
            )
        inputs = (gradient * run.inputs).sum(-1).detach()
        bias = torch.zeros_like(inputs) if bias is None else bias.detach()
        if sentence_bias is not None:
            weights = relevance.readout_weights(self.encoder, run.token_embeddings, run.batch.attention_mask)
            bias = bias + weights * sentence_bias.detach()[:, None]
        if run.references is not None:
            if run.own_reference is not None:  # e' = 0 there: nothing to take from e(r) either
                outer = outer.masked_fill(run.own_reference[:, None], 0.0)
            for row, length in enumerate(run.batch.lengths):
                reference_inputs, reference_bias = self.reference_vectors(length, budget_bytes)
                inputs[row, :length] -= reference_inputs @ outer[row]
                bias[row, :length] -= reference_bias @ outer[row]
        return inputs, bias

    # -- forward mode: the token×token matrix -----------------------------------------------------
    def token_vectors(self, run: relevance.ExplainedPass, row: int, budget_bytes: int) -> torch.Tensor:
        """[S, D] V[i] of one explained text: the part of its compared embedding e' token i carries
        (gradient×input and bias terms of row i, less the reference's V_r[i] in shift mode)."""
        encoder, length = self.encoder, run.batch.lengths[row]
        x = run.inputs[row : row + 1, :length].detach()
        if run.own_reference is not None and bool(run.own_reference[row]):
            return torch.zeros(length, run.embeddings.shape[-1], dtype=x.dtype, device=x.device)
        mask = run.batch.attention_mask[row : row + 1, :length]
        weights = relevance.readout_weights(encoder, run.token_embeddings[row : row + 1, :length], mask)[0]
        vectors = decompose(encoder, x, weights, budget_bytes)
        if run.references is not None:
            reference_inputs, reference_bias = self.reference_vectors(length, budget_bytes)
            vectors = vectors - reference_inputs - reference_bias
        return vectors

    def pairwise(self, run: relevance.ExplainedPass, item: int, budget_bytes: int) -> torch.Tensor:
        """[S_a, S_b] BiLRP token×token relevance of one pair of the pass."""
        a, b = run.side_rows(item)
        matrix = self.token_vectors(run, a, budget_bytes) @ self.token_vectors(run, b, budget_bytes).T
        return matrix / run.norms(self.encoder)[item]

    def _attribute(self, pairs: list[Pair], options: "LRP.Options") -> list[Explanation]:
        encoder, budget = self.encoder, options.memory_budget_mb * 2**20
        with relevance.gradients():
            run = relevance.explained_pass(encoder, pairs, "lrp")
            inputs, bias = self.relevance_parts(run, budget)
        results = relevance.side_explanations(encoder, self.name, run, inputs + bias, options.normalization)
        for k, result in enumerate(results):
            score = run.scores[k].detach().double()
            errors = []
            for side, row in zip("ab", run.side_rows(k)):
                length = run.batch.lengths[row]
                side_inputs, side_bias = inputs[row, :length], bias[row, :length]
                errors.append(float(((side_inputs + side_bias).double().sum() - score).abs()))
                result.extras[f"bias_share_{side}"] = bias_share(side_inputs, side_bias)
            result.delta = max(errors)
            result.extras["conservation_error"] = result.delta
            if options.pairwise:
                matrix = self.pairwise(run, k, budget).double()
                result.attributions = relevance.normalise(matrix, options.normalization)
        return results
