"""One adapter per model family: where the embeddings, blocks, attention and norms are.

Every family runs the same way: ``embed`` gives the hidden state entering block 0,
``context`` prepares what the blocks need besides the hidden state (additive attention mask,
relative position bias), ``run_blocks`` applies blocks ``start … end-1`` and ``finish`` the
part after the last block (T5's final RMSNorm). The encoder's forward pass and every
attribution method go through these four calls, so a family is supported in one place.

A family also owns its sizes (``num_heads``, ``intermediate_size``, what the cost model reads),
its model class and position offset, where its attention probabilities can be tapped
(``tap_attention``), its LRP rule map (``lrp_rules``: module -> rule of ``handlers.rules``) and
the modules whose biases LRP assigns to token rows (``bias_modules``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel, T5EncoderModel

from . import rules
from .rules import Rule

#: the attribute of an attention module that transformers' attention function calls on the
#: probabilities (``attribution.relevance.relevance_attention``)
TAP_ATTRIBUTE = "relevance_tap"
Tap = Callable[[torch.Tensor], torch.Tensor]


class UnsupportedArchitecture(ValueError):
    """The model directory holds a transformer family this project has no adapter for."""


@dataclass
class BlockContext:
    """What the blocks need besides the hidden state, computed once per padded batch."""

    additive_mask: torch.Tensor  # [B, 1, 1, S], 0 where attended, a large negative where not
    extra: dict[str, Any] = field(default_factory=dict)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class Adapter:
    """Base adapter: BERT-like encoders (BERT, MiniLM, RoBERTa, XLM-R)."""

    family = "bert"
    model_types: tuple[str, ...] = ("bert",)
    model_class: type = AutoModel
    norm_type = nn.LayerNorm
    norm_rule: Rule = staticmethod(rules.layernorm)
    #: position ids start after this many reserved positions (RoBERTa: the padding index)
    position_offset = 0
    #: the attention transformers runs for predictions; the family's attention goes through
    #: transformers' attention functions, so explanations can switch it per pass
    prediction_attention = "sdpa"

    def __init__(self, model: PreTrainedModel):
        self.model = model

    @contextmanager
    def attention(self, implementation: str) -> Iterator[None]:
        """Run the passes inside with another of transformers' attention functions.

        Predictions run the fused ``sdpa`` kernel (what ``load_transformer`` sets); explanations
        switch to ``eager`` attention or to a tapped version of it for their passes.
        """
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(implementation)
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)

    # -- structure -------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    #: the model config's names of the block sizes
    size_keys = {"hidden": "hidden_size", "heads": "num_attention_heads", "inner": "intermediate_size"}

    def _size(self, key: str) -> int:
        return int(getattr(self.model.config, self.size_keys[key]))

    @property
    def hidden_size(self) -> int:
        return self._size("hidden")

    @property
    def num_heads(self) -> int:
        return self._size("heads")

    @property
    def intermediate_size(self) -> int:
        """The feed-forward part's inner width, summed over its input projections (two when gated)."""
        return self._size("inner") * (2 if self.gate_modules() else 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_positions(self) -> int | None:
        """How many tokens a text may have, as the position embeddings allow."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return positions - self.position_offset if positions else None

    def tap_attention(self, layer: int, tap: Tap) -> RemovableHandle | None:
        """Make block ``layer``'s attention probabilities pass through ``tap`` (before the
        value product). Here transformers' attention function calls it (``TAP_ATTRIBUTE``)."""
        setattr(self.attention_modules()[layer], TAP_ATTRIBUTE, tap)
        return None

    def lrp_rules(self) -> list[tuple[nn.Module, Rule]]:
        """The family's LRP rule map: which module's output each rule replaces."""
        mapped = [(norm, self.norm_rule) for norm in self.norm_modules()]
        mapped += [(act, rules.identity) for act in self.activation_modules()]
        mapped += [(factor, rules.half) for pair in self.gate_modules() for factor in pair]
        return mapped

    def bias_modules(self) -> list[nn.Module]:
        """The modules after the input (the hidden state entering block 0) that add a bias to the
        token rows of their output: every Linear or norm with a bias in the blocks, and the norms
        after them (``final_norms``). The embedding layer comes before the input: its biases are
        part of it. The query and key projections (``score_projections``) reach the output only
        through the softmax, a constant under the rules: their biases carry nothing."""
        scores_only = {id(m) for m in self.score_projections()}
        kinds = (nn.Linear, self.norm_type)
        return [
            m for m in [*self.blocks.modules(), *self.final_norms()]
            if isinstance(m, kinds) and isinstance(getattr(m, "bias", None), torch.Tensor) and id(m) not in scores_only
        ]

    def final_norms(self) -> list[nn.Module]:
        """The norms ``finish`` applies after the last block."""
        return []

    def attention_modules(self) -> list[nn.Module]:
        """The self-attention modules, one per block, in order."""
        return [block.attention.self for block in self.blocks]

    #: the attention module's query and key projections, by attribute name
    score_projection_names = ("query", "key")

    def score_projections(self) -> list[nn.Module]:
        """The query and key projections of every block: they feed the attention scores only."""
        names = self.score_projection_names
        return [getattr(attention, name) for attention in self.attention_modules() for name in names]

    def norm_modules(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, self.norm_type)]

    def activation_modules(self) -> list[nn.Module]:
        """The element-wise activation modules of the feed-forward parts, one per block."""
        return [block.intermediate.intermediate_act_fn for block in self.blocks]

    def gate_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        """Per gated feed-forward part, the two modules whose outputs are multiplied."""
        return []

    # -- forward pieces --------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids=input_ids)

    def context(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> BlockContext:
        return BlockContext(additive_mask(attention_mask, hidden.dtype))

    def run_block(self, index: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        out = self.blocks[index](hidden, ctx.additive_mask)
        return out[0] if isinstance(out, tuple) else out

    def run_blocks(
        self, hidden: torch.Tensor, ctx: BlockContext, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        end = self.num_layers if end is None else end
        for index in range(start, end):
            hidden = self.run_block(index, hidden, ctx)
        return hidden

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings of the last layer, [B, S, H]."""
        hidden = self.embed(input_ids)
        ctx = self.context(attention_mask, hidden)
        return self.finish(self.run_blocks(hidden, ctx))


class RobertaAdapter(Adapter):
    family = "roberta"
    model_types = ("roberta", "xlm-roberta", "camembert")
    position_offset = 2


class MPNetAdapter(Adapter):
    """MPNet: BERT-like blocks plus a relative position bias shared by all blocks."""

    family = "mpnet"
    model_types = ("mpnet",)
    prediction_attention = "eager"  # computed inline, not through transformers' functions
    score_projection_names = ("q", "k")

    @contextmanager
    def attention(self, implementation: str) -> Iterator[None]:
        yield

    def attention_modules(self) -> list[nn.Module]:
        return [block.attention.attn for block in self.blocks]

    def tap_attention(self, layer: int, tap: Tap) -> RemovableHandle | None:
        """MPNet computes the probabilities inline and passes them through its own dropout module."""
        dropout = self.attention_modules()[layer].dropout
        return dropout.register_forward_hook(lambda module, args, output: tap(output))

    def context(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> BlockContext:
        bias = self.model.encoder.compute_position_bias(hidden)
        return BlockContext(additive_mask(attention_mask, hidden.dtype), {"position_bias": bias})

    def run_block(self, index: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        out = self.blocks[index](hidden, ctx.additive_mask, ctx.extra["position_bias"])
        return out[0] if isinstance(out, tuple) else out


class T5Adapter(Adapter):
    """T5 encoder stack: pre-norm blocks with RMSNorm, bias from block 0, final RMSNorm."""

    family = "t5"
    model_types = ("t5", "mt5", "umt5")
    model_class = T5EncoderModel
    norm_rule = staticmethod(rules.rmsnorm)
    size_keys = {"hidden": "d_model", "heads": "num_heads", "inner": "d_ff"}
    score_projection_names = ("q", "k")

    @property
    def norm_type(self):  # type: ignore[override]
        return type(self.model.encoder.final_layer_norm)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.block


    def attention_modules(self) -> list[nn.Module]:
        return [block.layer[0].SelfAttention for block in self.blocks]

    def final_norms(self) -> list[nn.Module]:
        return [self.model.encoder.final_layer_norm]

    def _feed_forwards(self) -> list[nn.Module]:
        return [block.layer[-1].DenseReluDense for block in self.blocks]

    def activation_modules(self) -> list[nn.Module]:
        return [ff.act for ff in self._feed_forwards()]

    def gate_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        """Gated-GELU feed-forward (T5 v1.1, GTR): act(wi_0 h) * wi_1 h."""
        return [(ff.act, ff.wi_1) for ff in self._feed_forwards() if hasattr(ff, "wi_1")]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.embed_tokens(input_ids)

    def context(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> BlockContext:
        length = hidden.shape[1]
        attention = self.blocks[0].layer[0].SelfAttention
        bias = attention.compute_bias(length, length, device=hidden.device)
        mask = additive_mask(attention_mask, hidden.dtype)
        return BlockContext(mask, {"position_bias": (bias + mask).to(hidden.dtype)})

    def run_block(self, index: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        # The mask is folded into the position bias, as T5Stack does on its first block.
        out = self.blocks[index](hidden, None, ctx.extra["position_bias"])
        return out[0] if isinstance(out, tuple) else out

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.final_layer_norm(hidden)


ADAPTERS: tuple[type[Adapter], ...] = (Adapter, RobertaAdapter, MPNetAdapter, T5Adapter)


def adapter_class(config: PretrainedConfig) -> type[Adapter]:
    for cls in ADAPTERS:
        if config.model_type in cls.model_types:
            return cls
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedArchitecture(
        f"unsupported architecture {config.model_type!r} "
        f"({', '.join(config.architectures or [])}); supported model types: {', '.join(known)}"
    )


def load_transformer(path: str, dtype: torch.dtype = torch.float32) -> Adapter:
    """Load the transformer of a local model directory, from safetensors only, in eval mode.

    Attention runs through PyTorch's fused ``scaled_dot_product_attention`` where the family
    calls transformers' attention functions (``Adapter.attention`` switches it per pass).
    """
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = adapter_class(config)
    model = cls.model_class.from_pretrained(
        path,
        config=config,
        local_files_only=True,
        use_safetensors=True,
        attn_implementation=cls.prediction_attention,
        dtype=dtype,
    )
    model.eval()
    return cls(model)
