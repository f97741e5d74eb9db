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
its gradient×input plus the bias terms of row i. In shift mode the score is that of e(x) − e(r),
with e(r) a constant of the pass: R_i = R_i(x) − R_i(r), with R_i(r) the reference token's
gradient×input and bias terms under the same ∂f/∂e', so Σ_i R_i(r) = e(r)·∂f/∂e' and the
reference is taken out position by position. R(r) is one backward pass, at ∂f/∂e', through the
reference's own rule-switched forward, kept with its graph per length (``ReferenceGraphs``,
bounded in bytes): a length seen for the first time costs one forward of its reference more,
never a decomposition. So Σ_i R_i = score up to float rounding, in both reference modes, for
cos and dot: ``delta`` and ``conservation_error`` (max over the two sides of |Σ R − score|, on
the raw relevance) report that rounding. ``bias_share_a`` / ``bias_share_b``:
Σ_i |bias terms of i| / (Σ_i |gradient×input of i| + Σ_i |bias terms of i|), per side (how much
of the answer the biases carry).

Pairwise (``"pairwise": true``): V[i] = the part of the compared embedding e' that token i
carries (gradient×input and bias terms of row i, less the reference token's in shift mode), so
Σ_i V[i] = e'. A_ij = V_a[i] · V_b[j] (/ ‖e'(a)‖ ‖e'(b)‖ for a cosine), Σ_ij A_ij = score and
Σ_j A_ij = R_a[i]. V comes from forward-mode products, one tangent per token (x_i on row i, 1 on
row i's bias switch and the pooling's readout weight of i on the sentence row's, which shares
the Dense head's bias among the tokens; in shift mode on the text's and its reference's rows at
once), never one backward pass per embedding dimension.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from pydantic import Field

from ..encoder import Encoder
from . import relevance
from .base import MEMORY_BUDGET_MB, Explanation, MethodOptions, Normalization, Pair

DEFAULT_BUDGET_BYTES = MEMORY_BUDGET_MB * 2**20
#: the forwards' worth of one token's tangent on its rows (primal and tangent, vmapped in
#: chunks): 3 by the multiply-adds; 6 is what ``scripts/bench/lengths.py`` measured at 8-128 tokens
PAIRWISE_PASSES = 6
#: what the kept reference graphs may hold at once (their activations, by the cost model)
REFERENCE_GRAPH_BYTES = 256 * 2**20


def bias_share(inputs: torch.Tensor, bias: torch.Tensor) -> float:
    """The share of Σ|relevance| that the bias terms carry (0 without biases)."""
    total = float(inputs.abs().sum() + bias.abs().sum())
    return float(bias.abs().sum()) / total if total > 0 else 0.0


def tangent_rows_per_pass(encoder: Encoder, width: int, budget_bytes: int) -> int:
    """How many forward-mode rows of ``width`` tokens (primal and tangent) fit the budget at once."""
    return max(1, budget_bytes // (2 * encoder.cost.block_bytes(width)))


def decompose(encoder: Encoder, rows: torch.Tensor, weights: torch.Tensor, budget_bytes: int) -> torch.Tensor:
    """[S, D] per token i of one explained text: the part of its compared embedding e' that the
    token carries through the rule-switched model, its gradient×input plus the bias terms of its
    row (the sentence row's biases shared out by the readout ``weights``).

    ``rows`` [1, S, H] is the text alone: e' is ``Reference.explained`` (none mode); [2, S, H] is
    the text and its reference (shift mode): e' = e(x) − e(r), and token i's tangent runs on both
    rows at once, so V[i] is the text's share less the reference's. ``weights`` [k, S] are the
    rows' readout weights. One primal pass, the tangents vmapped over it in chunks.
    """
    adapter, scoring, rules = encoder.adapter, encoder.scoring, relevance.rules_of(encoder)
    count, length = rows.shape[:2]
    mask = torch.ones(count, length, dtype=torch.long, device=rows.device)
    on = dict(dtype=rows.dtype, device=rows.device)
    primals = (rows, torch.ones(count, length, **on), torch.ones(count, **on))

    def embedding(hidden: torch.Tensor, switches: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        with rules.bias_switches(switches, sentence):
            pooled = encoder.head(adapter.finish(adapter.run_blocks(hidden, adapter.context(mask, hidden))), mask)
        return pooled[0] - pooled[1] if count == 2 else scoring.explained(pooled, None)[0]

    def token(selector: torch.Tensor) -> torch.Tensor:
        """The tangent of token i (``selector`` [S] one-hot) on every row: x on its row, its
        row's switch and its readout weight on the sentence switch."""
        tangents = (selector[None, :, None] * rows, selector.expand(count, length), weights @ selector)
        return torch.func.jvp(embedding, primals, tangents)[1]

    chunk = tangent_rows_per_pass(encoder, length, budget_bytes // count)
    with rules.active("lrp"), torch.inference_mode(False), torch.no_grad():
        return torch.func.vmap(token, chunk_size=chunk)(torch.eye(length, **on))


@dataclass
class ReferenceGraph:
    """The lrp forward of one reference r (one row), kept with its autograd graph."""

    inputs: torch.Tensor  # [1, S, H] the hidden state entering block 0 (a leaf)
    switches: tuple[torch.Tensor, torch.Tensor]  # its bias switches, [1, S] and [1] (leaves)
    embedding: torch.Tensor  # [1, D] the un-shifted e(r) through the rules, with its graph
    weights: torch.Tensor  # [S] the pooling's readout weights of its tokens
    nbytes: int  # what it holds, by the cost model


class ReferenceGraphs:
    """Per reference length, its ``ReferenceGraph``, so that the reference's share of an lrp
    request is one backward pass through it (``shares``), with no forward of its own.

    A length seen for the first time costs one forward of its reference row; the least recently
    used graphs go when they hold more than ``max_bytes``, and all go when the weights change.
    A lock serialises the backward passes through a kept graph.
    """

    def __init__(self, encoder: Encoder, max_bytes: int = REFERENCE_GRAPH_BYTES):
        self.encoder, self.max_bytes = encoder, max_bytes
        self._graphs: OrderedDict[int, ReferenceGraph] = OrderedDict()
        self._version = -1
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._graphs)

    def graph(self, length: int) -> ReferenceGraph:
        encoder, adapter = self.encoder, self.encoder.adapter
        with self._lock:
            version = encoder.weights_version()
            if version != self._version:
                self._graphs.clear()
                self._version = version
            if length in self._graphs:
                self._graphs.move_to_end(length)
                return self._graphs[length]
            references = encoder.references([length])
            mask, rules = references.attention_mask, relevance.rules_of(encoder)
            with relevance.gradients():
                with torch.no_grad():
                    x = adapter.embed(references.input_ids)
                x.requires_grad_(True)
                on = dict(dtype=x.dtype, device=x.device, requires_grad=True)
                switches = (torch.ones(1, length, **on), torch.ones(1, **on))
                with rules.active("lrp"), rules.bias_switches(*switches):
                    tokens = adapter.finish(adapter.run_blocks(x, adapter.context(mask, x)))
                    embedding = encoder.head(tokens, mask)
            weights = relevance.readout_weights(encoder, tokens, mask)[0]
            graph = ReferenceGraph(x, switches, embedding, weights, encoder.cost.pass_bytes(1, length))
            self._graphs[length] = graph
            held = sum(g.nbytes for g in self._graphs.values())
            while held > self.max_bytes and len(self._graphs) > 1:
                held -= self._graphs.popitem(last=False)[1].nbytes
            return graph

    def embeddings(self, lengths: list[int]) -> torch.Tensor:
        """[len(lengths), D] e(r) of each length from its kept graph (the model's value, through
        the rules), so that a new length costs one forward of its reference, not two."""
        with self._lock:
            return torch.cat([self.graph(n).embedding.detach() for n in lengths])

    def shares(self, length: int, cotangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[k, S] twice: the gradient×input and the bias terms of the reference's tokens at each
        ∂f/∂e(r) of ``cotangents`` [k, D], in one batched backward pass; each row sums to
        e(r)·cotangent."""
        with self._lock, relevance.gradients():
            graph = self.graph(length)
            gradient, rows, sentence = torch.autograd.grad(
                graph.embedding, (graph.inputs, *graph.switches), grad_outputs=cotangents[:, None].detach(),
                retain_graph=True, allow_unused=True, is_grads_batched=True,
            )
        inputs = (gradient * graph.inputs).sum(-1)[:, 0].detach()
        bias = torch.zeros_like(inputs) if rows is None else rows[:, 0].detach()
        if sentence is not None:
            bias = bias + graph.weights[None] * sentence.detach()[:, 0, None]
        return inputs, bias


class LRP(relevance.RelevanceMethod):
    """lrp: conservative relevance per side, and the token×token matrix when ``pairwise``."""

    name = "lrp"
    mode = "lrp"
    work_option = "pairwise"

    class Options(MethodOptions):
        normalization: Normalization = Field(default="none", description="per-sample normalisation")
        pairwise: bool = Field(default=False, description="also the token×token matrix (BiLRP)")
        memory_budget_mb: int = Field(default=MEMORY_BUDGET_MB, ge=16, description="peak extra memory of the pairwise tangents")

    def __init__(self, encoder: Encoder):
        super().__init__(encoder)
        self.references = ReferenceGraphs(encoder)

    def work(self, lengths: tuple[int, int], options: "LRP.Options") -> float:
        total = super().work(lengths, options)
        if options.pairwise:  # one forward-mode tangent per token on its rows, primal and tangent
            rows = self.encoder.scoring.rows_per_text
            total += PAIRWISE_PASSES * sum(self.encoder.cost.pass_macs(rows * n, n) for n in lengths)
        return total

    # -- one backward pass: relevance per side ------------------------------------------------------
    def relevance_parts(self, run: relevance.ExplainedPass) -> tuple[torch.Tensor, torch.Tensor]:
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
        if run.references is not None:  # per length, every text of it in one backward pass
            rows_of: dict[int, list[int]] = {}
            for row, length in enumerate(run.batch.lengths):
                if run.own_reference is None or not bool(run.own_reference[row]):  # e' = 0: nothing to take
                    rows_of.setdefault(length, []).append(row)
            for length, rows in rows_of.items():
                reference_inputs, reference_bias = self.references.shares(length, outer[rows])
                inputs[rows, :length] -= reference_inputs
                bias[rows, :length] -= reference_bias
        return inputs, bias

    # -- forward mode: the token×token matrix -----------------------------------------------------
    def token_vectors(self, run: relevance.ExplainedPass, row: int, budget_bytes: int) -> torch.Tensor:
        """[S, D] V[i] of one explained text: the part of its compared embedding e' token i carries
        (gradient×input and bias terms of row i, less the reference token's in shift mode)."""
        length = run.batch.lengths[row]
        x = run.inputs[row : row + 1, :length].detach()
        if run.own_reference is not None and bool(run.own_reference[row]):
            return torch.zeros(length, run.embeddings.shape[-1], dtype=x.dtype, device=x.device)
        mask = run.batch.attention_mask[row : row + 1, :length]
        weights = relevance.readout_weights(self.encoder, run.token_embeddings[row : row + 1, :length], mask)
        if run.references is not None:  # the text and its reference, tangents on both at once
            graph = self.references.graph(length)
            x, weights = torch.cat([x, graph.inputs.detach()]), torch.cat([weights, graph.weights[None]])
        return decompose(self.encoder, x, weights, budget_bytes)

    def pairwise(self, run: relevance.ExplainedPass, item: int, budget_bytes: int) -> torch.Tensor:
        """[S_a, S_b] BiLRP token×token relevance of one pair of the pass."""
        a, b = run.side_rows(item)
        matrix = self.token_vectors(run, a, budget_bytes) @ self.token_vectors(run, b, budget_bytes).T
        return matrix / run.norms(self.encoder)[item]

    def _attribute(self, pairs: list[Pair], options: "LRP.Options") -> list[Explanation]:
        encoder, budget = self.encoder, options.memory_budget_mb * 2**20
        with relevance.gradients():
            run = relevance.explained_pass(encoder, pairs, self.mode, self.references.embeddings)
            inputs, bias = self.relevance_parts(run)
        results = relevance.side_explanations(encoder, self.name, run, inputs + bias, options.normalization)
        for k, result in enumerate(results):
            score = run.scores[k].detach().double()
            errors = []
            for side, row in zip("ab", run.side_rows(k)):
                length = run.batch.lengths[row]
                side_inputs, side_bias = inputs[row, :length], bias[row, :length]
                errors.append(float(((side_inputs + side_bias).double().sum() - score).abs()))
                result.extras[f"bias_share_{side}"] = bias_share(side_inputs, side_bias)
                # raw, whatever the normalization: relevance − this is the gradient×input part
                result.extras[f"bias_relevance_{side}"] = side_bias.double().tolist()
            result.delta = max(errors)
            result.extras["conservation_error"] = result.delta
            if options.pairwise:
                matrix = self.pairwise(run, k, budget).double()
                result.attributions = relevance.normalise(matrix, options.normalization)
        return results
