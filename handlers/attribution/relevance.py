"""What GAE and conservative LRP share: the rules switched into the model, one explained pass
over every pair of a batch, the readout of the pooling, and the per-sample normalisation.

Rules (``RelevanceRules``, installed once per encoder by ``rules_of``, switched per pass):

- Attention probabilities are reached where each family computes them (the adapter's
  ``attention_probabilities``): for BERT, XLM-R and T5, transformers runs attention through the
  function its config names, so ``relevance_attention`` is registered in transformers'
  ``AttentionInterface`` and named by the model for the passes of ``active`` (predictions
  keep the fused sdpa kernel); it is eager attention with the probabilities
  passed through the block's tap before the value product. MPNet computes them inline and
  applies its own ``nn.Dropout`` module to them, where a forward hook taps them. The tap keeps
  them (``gae``: probabilities and, through autograd, their gradients) or detaches them
  (``lrp``: the softmax is a constant in the value product).
- ``lrp`` only (Ali et al. 2022): LayerNorm with only the scale 1/std detached (the centring
  stays), RMSNorm with 1/rms detached, the identity rule x·(act(x)/x).detach() for element-wise
  activations (GELU, gelu_new, ReLU, the Dense head's activation) and, for gated feed-forward
  parts (T5's gated GELU), half of the gradient through each factor of the product, so that the
  product's gradient×input is the product once, not twice.

With the rules off every hook returns its module's own output unchanged.

The explained function (``explained_pass``): the rows of text_a and text_b of every item go
through the model together; the embeddings compared are e(x) − e(r) with e(r) a constant in
shift mode (``Encoder.reference_embeddings``: the model's embedding of the reference of that
length, computed once per length, a constant of the model), and, for a cosine, the
score is taken with both norms held constant, so that gradient×input can add up to the score.
The gradient of that score with respect to text a's rows is the one with text b's embedding
held fixed (the score is bilinear in the two embeddings), so one backward pass serves both sides.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface

from ..encoder import Encoder, TokenBatch, pool
from ..protocol import ExplainItem

Mode = Literal["off", "gae", "lrp"]
Normalization = Literal["none", "min-max", "l2"]
ATTENTION_FUNCTION = "relevance_eager"
TAP_ATTRIBUTE = "relevance_tap"
TEXT_FIELDS = ("text_a", "text_b")


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
        for layer, module in enumerate(adapter.attention_modules()):
            self._install_tap(module, self._tap(layer))
        if adapter.attention_probabilities == "interface":
            AttentionInterface.register(ATTENTION_FUNCTION, relevance_attention)
        norm_rule = {"layernorm": self._layernorm_rule, "rmsnorm": self._rmsnorm_rule}[adapter.norm_kind]
        for norm in adapter.norm_modules():
            self.handles.append(norm.register_forward_hook(norm_rule))
        for activation in adapter.activation_modules() + self._head_activations():
            if not isinstance(activation, nn.Module):
                raise ValueError(f"{adapter.family}: activation {activation!r} is not a module; LRP cannot reach it")
            self.handles.append(activation.register_forward_hook(self._identity_rule))
        for factors in adapter.gate_modules():
            for factor in factors:
                self.handles.append(factor.register_forward_hook(self._half_rule))

    def _install_tap(self, attention: nn.Module, tap: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.encoder.adapter.attention_probabilities == "dropout":
            hook = attention.dropout.register_forward_hook(lambda module, args, output: tap(output))
            self.handles.append(hook)
        else:
            setattr(attention, TAP_ATTRIBUTE, tap)

    def _head_activations(self) -> list[nn.Module]:
        dense = self.encoder.dense
        kinds = (nn.Tanh, nn.ReLU, nn.GELU, nn.Sigmoid)
        return [m for m in dense.modules() if isinstance(m, kinds)] if dense is not None else []

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

    # -- LRP rules (forward hooks: same value, modified gradient) ------------------------------
    def _layernorm_rule(self, module: nn.LayerNorm, args, output: torch.Tensor):
        if self.mode != "lrp":
            return None
        x = args[0]
        centred = x - x.mean(-1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps).detach()
        y = centred * scale
        if module.weight is not None:
            y = y * module.weight
        return y + module.bias if module.bias is not None else y

    def _rmsnorm_rule(self, module: nn.Module, args, output: torch.Tensor):
        if self.mode != "lrp":
            return None
        x = args[0]
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + module.variance_epsilon).detach()
        return (module.weight * (x * scale).to(output.dtype)).to(output.dtype)

    def _identity_rule(self, module: nn.Module, args, output: torch.Tensor):
        if self.mode != "lrp":
            return None
        x = args[0]
        return x * (output / torch.where(x == 0, torch.ones_like(x), x)).detach()

    def _half_rule(self, module: nn.Module, args, output: torch.Tensor):
        if self.mode != "lrp":
            return None
        return 0.5 * output + 0.5 * output.detach()


def rules_of(encoder: Encoder) -> RelevanceRules:
    """The encoder's relevance rules, installed on first use (``prepare`` does it in initialize)."""
    rules = getattr(encoder, "relevance_rules", None)
    if rules is None:
        rules = RelevanceRules(encoder)
        encoder.relevance_rules = rules
    return rules


# -- the explained function --------------------------------------------------------------------
@dataclass
class ExplainedPass:
    """One pass over the pairs of a batch: rows 0…n−1 are text_a of each item, n…2n−1 text_b."""

    batch: TokenBatch
    inputs: torch.Tensor  # [2n, S, H] hidden state entering block 0 (requires grad)
    token_embeddings: torch.Tensor  # [2n, S, H] last layer
    embeddings: torch.Tensor  # [2n, D] the compared embeddings (shifted / normalised)
    references: torch.Tensor | None  # [2n, D] e(r) of each row in shift mode
    scores: torch.Tensor  # [n] the explained score
    capture: Capture

    @property
    def pairs(self) -> int:
        return self.scores.shape[0]

    def side_rows(self, item: int) -> tuple[int, int]:
        return item, self.pairs + item

    def norms(self) -> torch.Tensor:
        """[n] the product of the two embedding norms a cosine divides by (1 for dot)."""
        a, b = self.embeddings[: self.pairs], self.embeddings[self.pairs :]
        return (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12).detach()


def final_embeddings(encoder: Encoder, embeddings: torch.Tensor, references: torch.Tensor | None) -> torch.Tensor:
    """The compared embeddings: e − e(r) with e(r) constant, or the model's Normalize with the norm constant."""
    if references is not None:
        return embeddings - references.detach()
    if encoder.normalize:
        return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12).detach()
    return embeddings


def explained_scores(encoder: Encoder, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The similarity of rows of ``a`` and ``b``; a cosine with both norms held constant."""
    dot = (a * b).sum(-1)
    if encoder.similarity == "dot":
        return dot
    return dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12).detach()


def explained_pass(encoder: Encoder, items: list[ExplainItem], mode: Mode) -> ExplainedPass:
    """The explained forward pass of every pair of ``items`` together, under the rules of ``mode``.

    Call it with gradients enabled (``gradients()``).
    """
    rules = rules_of(encoder)
    adapter = encoder.adapter
    batch = encoder.tokenize([item.text_a for item in items] + [item.text_b for item in items])
    references = encoder.reference_embeddings(batch.lengths) if encoder.reference == "shift" else None
    with rules.active(mode) as capture:
        inputs = adapter.embed(batch.input_ids).detach().requires_grad_(True)
        tokens = adapter.finish(adapter.run_blocks(inputs, adapter.context(batch.attention_mask, inputs)))
        embeddings = final_embeddings(encoder, encoder.head(tokens, batch.attention_mask), references)
    n = len(items)
    return ExplainedPass(
        batch=batch,
        inputs=inputs,
        token_embeddings=tokens,
        embeddings=embeddings,
        references=references,
        scores=explained_scores(encoder, embeddings[:n], embeddings[n:]),
        capture=capture,
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


def side_answers(encoder: Encoder, items: list[ExplainItem], run: ExplainedPass, relevance: torch.Tensor) -> list[dict]:
    """The fields every gae / lrp answer has, from per-row token relevance [2n, S] (raw)."""
    answers = []
    lengths = run.batch.lengths
    for k, item in enumerate(items):
        a, b = run.side_rows(k)
        answers.append(
            {
                "score": float(run.scores[k].detach()),
                "tokens_a": run.batch.tokens(encoder.tokenizer, a),
                "tokens_b": run.batch.tokens(encoder.tokenizer, b),
                "relevance_a": normalise(relevance[a, : lengths[a]].double(), item.normalization).tolist(),
                "relevance_b": normalise(relevance[b, : lengths[b]].double(), item.normalization).tolist(),
                "normalization": item.normalization,
                "truncated": [f for f, row in zip(TEXT_FIELDS, (a, b)) if run.batch.truncated[row]],
            }
        )
    return answers
