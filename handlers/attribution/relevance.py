"""What GAE and conservative LRP share: the rules switched into the model, one explained pass
over every pair of a batch, the readout of the pooling, and the per-sample normalisation.

Rules (``RelevanceRules``, installed once per encoder by ``rules_of``, switched per pass):

- Attention probabilities are reached where each family computes them
  (``Adapter.tap_attention``): for BERT, XLM-R and T5, transformers runs attention through the
  function its config names, so ``relevance_attention`` is registered in transformers'
  ``AttentionInterface`` and named by the model for the passes of ``active`` (predictions
  keep the fused sdpa kernel); it is eager attention with the probabilities
  passed through the block's tap before the value product. MPNet computes them inline and
  applies its own ``nn.Dropout`` module to them, where a forward hook taps them. The tap keeps
  them (``gae``: probabilities and, through autograd, their gradients) or detaches them
  (``lrp``: the softmax is a constant in the value product).
- ``lrp`` only (Ali et al. 2022): the family's rule map (``Adapter.lrp_rules``, rules in
  ``handlers.rules``): norms with their scale held constant, the identity rule for element-wise
  activations (and the Dense head's), half of the gradient through each factor of a gated
  product.
- ``lrp`` bias terms. With those rules the network is jointly linear in its input and its
  biases, so by Euler's theorem f = Σ_i x_i·∂f/∂x_i + Σ_b b·∂f/∂b exactly. A bias b added to
  row i of a module's output y contributes b·∂f/∂y_i to token i; a bias added to the sentence
  row (the Dense head, after pooling) is shared among the tokens by the pooling's readout
  weights, which sum to 1. Every biased module after the input (``Adapter.bias_modules`` on
  token rows, the Dense head's Linear on the sentence row) carries a bias switch
  (``rules.switched_bias``), installed after the norm rules (which recompute the output) and
  before the activation and gate rules (so that a gate factor's bias sees the halved
  gradient). Inside ``bias_switches(s_rows, s_sentences)`` it adds (s − 1)·b with s = 1: no
  value changes, and ∂f/∂s_i is the bias terms of row i, from the same backward pass as the
  input's gradient (an lrp ``explained_pass`` makes s a leaf); in forward mode a tangent
  ṡ = one-hot i picks the bias terms of row i (BiLRP). Attention scores (relative position
  biases, the mask) reach the output only through the softmax, a constant under the rules:
  they carry no relevance.

With the rules off every hook returns its module's own output unchanged.

The explained function (``explained_pass``): the rows of text_a and text_b of every pair go
through the model together; the embeddings and the score are the encoder's
``Reference.explained`` and ``explained_score``: e(x) − e(r) with e(r) a constant in shift mode,
and, for a cosine, the score taken with both norms held constant, so that gradient×input can add
up to the score. The gradient of that score with respect to text a's rows is the one with text
b's embedding held fixed (the score is bilinear in the two embeddings), so one backward pass
serves both sides. The reference rows do not join the pass: under the rules e(r) is linear in
its own rows and biases, so lrp takes the reference's share by a backward pass through the
reference's own graph at ∂f/∂e' (``lrp.ReferenceGraphs``). In an lrp pass a text that is its own
reference compares e' = 0 exactly, as predictions have it.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface

from .. import rules
from ..architectures import TAP_ATTRIBUTE
from ..encoder import Encoder, TokenBatch, pool
from .base import TEXT_FIELDS, Explanation, Method, Normalization, Pair

Mode = Literal["off", "gae", "lrp"]
ATTENTION_FUNCTION = "relevance_eager"


def relevance_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (BERT, XLM-R, T5), with the block's tap on the probabilities."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = F.dropout(F.softmax(scores, dim=-1), p=dropout, training=module.training)
    tap = getattr(module, TAP_ATTRIBUTE, None)
    if tap is not None:
        probabilities = tap(probabilities)
    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, probabilities


@dataclass
class Capture:
    """What the taps saw during one pass: per block, how often they fired and (gae) the probabilities."""

    fired: list[int]
    probabilities: list[torch.Tensor | None] = field(default_factory=list)


class RelevanceRules:
    """The attention taps and LRP rules of one encoder: installed once, switched per pass."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.mode: Mode = "off"
        self.capture = Capture([])
        adapter = encoder.adapter
        self.num_layers = adapter.num_layers
        self.handles: list[RemovableHandle] = []
        for layer in range(self.num_layers):
            handle = adapter.tap_attention(layer, self._tap(layer))
            if handle is not None:
                self.handles.append(handle)
        AttentionInterface.register(ATTENTION_FUNCTION, relevance_attention)
        mapped = adapter.lrp_rules() + [(act, rules.identity) for act in self._head_activations()]
        for module, _ in mapped:
            if not isinstance(module, nn.Module):
                raise ValueError(f"{adapter.family}: {module!r} is not a module; LRP cannot reach it")
        # the bias switches of the pass (``bias_switches``): s − 1 on token rows [B, S, 1] and on
        # sentence rows [B, 1]; None outside an lrp pass
        self.switch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sentence_biased = self._head_biased()
        norms = [(m, rule) for m, rule in mapped if isinstance(m, adapter.norm_type)]
        others = [(m, rule) for m, rule in mapped if not isinstance(m, adapter.norm_type)]
        for module, rule in norms:  # they recompute the output: the bias switches follow them
            self.handles.append(module.register_forward_hook(self._when_lrp(rule)))
        for modules, row in ((adapter.bias_modules(), 0), (self.sentence_biased, 1)):
            for module in modules:
                self.handles.append(module.register_forward_hook(self._bias_switch(row)))
        for module, rule in others:
            self.handles.append(module.register_forward_hook(self._when_lrp(rule)))

    def _head_activations(self) -> list[nn.Module]:
        dense = self.encoder.dense
        kinds = (nn.Tanh, nn.ReLU, nn.GELU, nn.Sigmoid)
        return [m for m in dense.modules() if isinstance(m, kinds)] if dense is not None else []

    def _head_biased(self) -> list[nn.Module]:
        """The Dense head's biased Linear layers: they add their bias to the sentence row."""
        dense = self.encoder.dense
        modules = dense.modules() if dense is not None else []
        return [m for m in modules if isinstance(m, nn.Linear) and m.bias is not None]

    # -- switching ----------------------------------------------------------------------------
    @contextmanager
    def active(self, mode: Mode) -> Iterator[Capture]:
        """Switch the rules to ``mode`` for the passes inside the block; yields what the taps see."""
        capture = Capture([0] * self.num_layers, [None] * self.num_layers)
        self.mode, self.capture = mode, capture
        try:
            with self.encoder.adapter.attention(ATTENTION_FUNCTION):
                yield capture
        finally:
            self.mode, self.capture = "off", Capture([])

    def _tap(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def tap(probabilities: torch.Tensor) -> torch.Tensor:
            if self.mode == "off":
                return probabilities
            self.capture.fired[layer] += 1
            if self.mode == "gae":
                self.capture.probabilities[layer] = probabilities
                return probabilities
            return probabilities.detach()

        return tap

    def _when_lrp(self, rule: rules.Rule) -> Callable:
        """A forward hook that applies ``rule`` in lrp passes and leaves other passes alone."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            return rule(module, args, output) if self.mode == "lrp" else None

        return hook

    def _bias_switch(self, row: int) -> Callable:
        """A forward hook that adds (s − 1)·b inside ``bias_switches`` (``row`` 0: the token rows'
        switch, 1: the sentence rows')."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if self.mode != "lrp" or self.switch is None:
                return None
            return rules.switched_bias(module, output, self.switch[row])

        return hook

    @contextmanager
    def bias_switches(self, rows: torch.Tensor, sentences: torch.Tensor) -> Iterator[None]:
        """Inside, every biased module adds (s − 1)·b to its output, with s = ``rows`` [B, S] on
        token rows and ``sentences`` [B] on sentence rows, both 1: no value changes, and ∂f/∂s
        (reverse mode) or the tangent of f for a tangent ṡ (forward mode) is the bias terms of the rows."""
        previous = self.switch
        self.switch = ((rows - 1).unsqueeze(-1), (sentences - 1).unsqueeze(-1))
        try:
            yield
        finally:
            self.switch = previous


def rules_of(encoder: Encoder) -> RelevanceRules:
    """The encoder's relevance rules, installed on first use (a server's calibration at load sets
    every method up, and so installs them before any request)."""
    if encoder.relevance_rules is None:
        encoder.relevance_rules = RelevanceRules(encoder)
    return encoder.relevance_rules


# -- the explained function --------------------------------------------------------------------
@dataclass
class ExplainedPass:
    """One pass over the pairs of a batch: rows 0…n−1 are text_a of each item, n…2n−1 text_b."""

    batch: TokenBatch
    inputs: torch.Tensor  # [2n, S, H] hidden state entering block 0 (requires grad)
    token_embeddings: torch.Tensor  # [2n, S, H] last layer
    embeddings: torch.Tensor  # [2n, D] the compared embeddings (shifted / normalised)
    references: torch.Tensor | None  # [2n, D] e(r) of each row in shift mode, a constant
    scores: torch.Tensor  # [n] the explained score
    capture: Capture
    #: lrp: the bias switches s of the pass ([2n, S] token rows, [2n] sentence rows, all 1,
    #: requiring grad): ∂f/∂s is the bias terms of each row (``RelevanceRules.bias_switches``)
    switches: tuple[torch.Tensor, torch.Tensor] | None = None
    #: lrp in shift mode: [2n] bool, the rows that are their own reference (e' = 0, no relevance)
    own_reference: torch.Tensor | None = None

    @property
    def pairs(self) -> int:
        return self.scores.shape[0]

    def side_rows(self, item: int) -> tuple[int, int]:
        return item, self.pairs + item

    def norms(self, encoder: Encoder) -> torch.Tensor:
        """[n] what a cosine divides the dot product by, held constant (1 for dot)."""
        return encoder.scoring.norms(self.embeddings[: self.pairs], self.embeddings[self.pairs :])


def explained_pass(
    encoder: Encoder, pairs: list[Pair], mode: Mode, reference_embeddings: Callable[[list[int]], torch.Tensor] | None = None
) -> ExplainedPass:
    """The explained forward pass of every pair together, under the rules of ``mode``.

    In shift mode e(r) of each row comes from ``reference_embeddings`` (lengths → [k, D]; by
    default the encoder's, ``Encoder.reference_embeddings``). Call it with gradients enabled
    (``gradients()``).
    """
    rules = rules_of(encoder)
    adapter, scoring = encoder.adapter, encoder.scoring
    batch = encoder.tokenize([a for a, _ in pairs] + [b for _, b in pairs])
    references = (reference_embeddings or encoder.reference_embeddings)(batch.lengths) if scoring.shifted else None
    with torch.no_grad():
        inputs = adapter.embed(batch.input_ids).requires_grad_(True)
    switches = own_reference = None
    if mode == "lrp":
        ones = dict(dtype=inputs.dtype, device=inputs.device, requires_grad=True)
        switches = (torch.ones(batch.input_ids.shape, **ones), torch.ones(len(batch.lengths), **ones))
    with rules.active(mode) as capture, rules.bias_switches(*switches) if switches else nullcontext():
        tokens = adapter.finish(adapter.run_blocks(inputs, adapter.context(batch.attention_mask, inputs)))
        embeddings = scoring.explained(encoder.head(tokens, batch.attention_mask), references)
    if mode == "lrp" and references is not None:  # e' = 0 exactly, as predictions have it
        own_reference = encoder.is_reference(batch)
        embeddings = embeddings.masked_fill(own_reference[:, None], 0.0)
    return ExplainedPass(
        batch=batch,
        inputs=inputs,
        token_embeddings=tokens,
        embeddings=embeddings,
        references=references,
        scores=scoring.explained_score(embeddings[: len(pairs)], embeddings[len(pairs) :]),
        capture=capture,
        switches=switches,
        own_reference=own_reference,
    )


@contextmanager
def gradients() -> Iterator[None]:
    """Autograd on, whatever the caller's mode (TorchServe, inference_mode, no_grad)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def readout_weights(encoder: Encoder, token_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S] how much each token's last-layer row enters the pooled embedding, from the pooling itself.

    Mean pooling: 1/n on the attended tokens; CLS: the first token; last token: the last;
    max: the share of dimensions each token wins.
    """
    with gradients():
        rows = token_embeddings.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(pool(rows, mask, encoder.pooling_mode).sum(), rows)
    return grad.sum(-1) / rows.shape[-1]


def normalise(values: torch.Tensor, how: Normalization) -> torch.Tensor:
    """Per-sample normalisation of one relevance vector or matrix."""
    if how == "min-max":
        low, span = values.min(), values.max() - values.min()
        return (values - low) / span if span > 0 else torch.zeros_like(values)
    if how == "l2":
        norm = values.norm()
        return values / norm if norm > 0 else values
    return values


def side_explanations(
    encoder: Encoder, method: str, run: ExplainedPass, relevance: torch.Tensor, normalization: Normalization
) -> list[Explanation]:
    """One explanation per pair of the pass, from per-row token relevance [2n, S] (raw)."""
    results = []
    lengths = run.batch.lengths
    for k in range(run.pairs):
        a, b = run.side_rows(k)
        results.append(
            Explanation(
                method=method,
                score=float(run.scores[k].detach()),
                tokens_a=run.batch.tokens(encoder.tokenizer, a),
                tokens_b=run.batch.tokens(encoder.tokenizer, b),
                truncated=[f for f, row in zip(TEXT_FIELDS, (a, b)) if run.batch.truncated[row]],
                relevance_a=normalise(relevance[a, : lengths[a]].double(), normalization),
                relevance_b=normalise(relevance[b, : lengths[b]].double(), normalization),
                extras={"normalization": normalization},
            )
        )
    return results


class RelevanceMethod(Method):
    """A method that explains with one autograd pass under the rules (gae, lrp)."""

    #: the rules of its pass
    mode: Mode

    def __init__(self, encoder: Encoder):
        super().__init__(encoder)
        rules_of(encoder)

    @property
    def rows(self) -> int:
        """Rows one pair's autograd passes hold: both texts (lrp in shift mode: and their references)."""
        return 4 if self.mode == "lrp" and self.encoder.scoring.shifted else 2

    def memory(self, lengths: tuple[int, int], options) -> list[tuple[str, int]]:
        """The autograd pass of one pair: its rows through every block, at the longer text's width."""
        need = self.encoder.cost.pass_bytes(self.rows, max(lengths))
        return [(TEXT_FIELDS[0] if lengths[0] >= lengths[1] else TEXT_FIELDS[1], need)]

    def work(self, lengths: tuple[int, int], options) -> float:
        """One forward and one backward pass (three forwards' worth) of the pair's rows."""
        return 3 * self.encoder.cost.pass_macs(self.rows, max(lengths))
