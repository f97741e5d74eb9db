"""ij's paths: each text and its reference at the attributed layer (the straight path between
them, ``Side``), the function g being integrated along it, and g's values at points of the path
(``PathValues``), which the per-panel identities of the adaptive rule check against."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...encoder import Encoder


@dataclass
class Side:
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
class Task:
    """One pair: the short side goes forward-mode, the long side backward (b when equal)."""

    short: Side
    long: Side
    swapped: bool  # the short side is text b

    @classmethod
    def of(cls, side_a: Side, side_b: Side) -> "Task":
        """The pair of texts a and b, the shorter one forward (a when equal)."""
        return cls(side_b, side_a, True) if side_b.length < side_a.length else cls(side_a, side_b, False)


# -- the function being attributed--------------------------------------------------------
def embedding(encoder: Encoder, hidden: torch.Tensor, mask: torch.Tensor, ctx, layer: int) -> torch.Tensor:
    """g of hidden states entering block ``layer`` (without the constant shift)."""
    adapter = encoder.adapter
    out = adapter.finish(adapter.run_blocks(hidden, ctx, layer))
    emb = encoder.head(out, mask)
    return F.normalize(emb, dim=-1) if encoder.scoring.path_normalizes else emb


def context(encoder: Encoder, mask: torch.Tensor, dtype: torch.dtype):
    """The blocks' context (mask, position bias) for hidden states of ``dtype``."""
    probe = torch.zeros(*mask.shape, encoder.adapter.hidden_size, dtype=dtype, device=mask.device)
    return encoder.adapter.context(mask, probe)


# -- end points --------------------------------------------------------------------------------
@torch.no_grad()
def sides_at(encoder: Encoder, texts: list[str], layer: int) -> tuple[list[Side], object]:
    """Every text and its reference at ``layer``, and their final g, in one padded pass."""
    batch = encoder.tokenize(texts)
    refs = encoder.references(batch.lengths)
    ids = torch.cat([batch.input_ids, refs.input_ids])
    mask = torch.cat([batch.attention_mask, refs.attention_mask])
    adapter = encoder.adapter
    hidden = adapter.embed(ids)
    ctx = adapter.context(mask, hidden)
    at_layer = adapter.run_blocks(hidden, ctx, 0, layer)
    g = embedding(encoder, at_layer, mask, ctx, layer).cpu()
    n = len(texts)
    sides = [
        Side(at_layer[i, :length], at_layer[n + i, :length], g[i], g[n + i])
        for i, length in enumerate(batch.lengths)
    ]
    return sides, batch


class PathValues:
    """g along one side's straight path, h(α) = r + α (x − r), at the panel edges the adaptive
    rule asks about: one forward pass of the side's row per new edge, kept (the path's ends,
    g(r) and g(x), come with the side).

    The fundamental theorem of calculus holds on every panel [a, b]: the integrand summed over
    the side's tokens is dg(h(α))/dα, so its integral is g(h(b)) − g(h(a)) exactly. ``residual``
    is how far a panel's estimate misses that, beyond the rounding of the two values (in the side's precision):
    an exact error of the panel (of its token sums), which locates a feature that the panel's
    own nodes do not resolve. ``ends`` takes g(r) and g(x) from the side (a side in another
    precision than its end values computes them too)."""

    def __init__(self, encoder: Encoder, side: Side, layer: int, ends: bool = True):
        self.encoder, self.side, self.layer = encoder, side, layer
        self.values: dict[float, torch.Tensor] = {0.0: side.g_ref.double().cpu(), 1.0: side.g.double().cpu()} if ends else {}
        self.rounding = ROUNDING * float(torch.finfo(side.x.dtype).eps)

    @torch.no_grad()
    def at(self, alpha: float) -> torch.Tensor:
        if alpha not in self.values:
            side = self.side
            hidden = side.r + torch.tensor(alpha, dtype=side.x.dtype, device=side.x.device) * side.delta
            mask = torch.ones(1, side.length, dtype=torch.long, device=side.x.device)
            g = embedding(self.encoder, hidden[None], mask, context(self.encoder, mask, hidden.dtype), self.layer)
            self.values[alpha] = g[0].double().cpu()
        return self.values[alpha]

    def change(self, a: float, b: float) -> tuple[torch.Tensor, float]:
        """g(h(b)) − g(h(a)), and the rounding it may carry."""
        ga, gb = self.at(a), self.at(b)
        return gb - ga, self.rounding * float(ga.norm() + gb.norm())


#: the rounding allowed in the difference of two values of g along the path, in machine epsilons
#: of the side's precision
ROUNDING = 16




class Float64Twin:
    """The tasks' paths on a float64 copy of the model, for the adaptive rule's panels narrower
    than float32 resolves α (``integration.FINE_PANEL``): made on first use, so that an
    explanation whose panels stay wider never pays for it (each pass about twice as slow as
    float32's on a CPU).

    The copy holds in float64 only what the path runs through: the blocks from ``layer`` on
    (and block 0, where some families keep their position bias), the final norm, the pooling's
    Dense; the input embeddings and the other blocks before the layer stay the source's own,
    shared and never run. Its weights (``weights``) count in the call's memory budget: its
    passes get what they leave (``budget``), and the caller uses it only where one float64
    node of each side's passes fits there (``integration.float64_fits``). Its path runs between the same end points (the float32
    hidden states at the layer, in float64); its values of g are its own, computed in float64."""

    def __init__(self, encoder: Encoder, tasks: list[Task], layer: int, budget: int):
        self.source, self.source_tasks, self.layer = encoder, tasks, layer
        self.weights = FLOAT64_BYTES * sum(p.numel() for p in _float64_parameters(encoder, layer))
        self.budget = budget - self.weights
        self._made: tuple[Encoder, list[Task], list[tuple[PathValues, PathValues]]] | None = None

    def _make(self):
        if self._made is None:
            encoder = float64_copy(self.source, self.layer)
            tasks = [Task(_double(t.short), _double(t.long), t.swapped) for t in self.source_tasks]
            paths = [(PathValues(encoder, t.short, self.layer, ends=False), PathValues(encoder, t.long, self.layer, ends=False))
                     for t in tasks]
            self._made = encoder, tasks, paths
        return self._made

    @property
    def encoder(self) -> Encoder:
        return self._make()[0]

    @property
    def tasks(self) -> list[Task]:
        return self._make()[1]

    @property
    def paths(self) -> list[tuple[PathValues, PathValues]]:
        return self._make()[2]

    @property
    def made(self) -> bool:
        return self._made is not None


FLOAT64_BYTES = 8


def _shared_modules(encoder: Encoder, layer: int) -> list[nn.Module]:
    """What a float64 copy for paths from ``layer`` never runs: the input embeddings and the
    blocks before the layer (but block 0: T5 computes its position bias there)."""
    return [encoder.adapter.model.get_input_embeddings(), *list(encoder.adapter.blocks)[1:layer]]


def _float64_parameters(encoder: Encoder, layer: int) -> list[nn.Parameter]:
    """The parameters a float64 copy for paths from ``layer`` holds in float64 (the pooling's
    Dense too)."""
    shared = {id(p) for module in _shared_modules(encoder, layer) for p in module.parameters()}
    own = [p for p in encoder.adapter.model.parameters() if id(p) not in shared]
    return own + (list(encoder.dense.parameters()) if encoder.dense is not None else [])


def float64_copy(encoder: Encoder, layer: int) -> Encoder:
    """An encoder whose passes from block ``layer`` on run in float64: the source's transformer
    copied with the modules of ``_shared_modules`` left shared (float32, never run), the rest in
    float64, without the source's hooks (the relevance rules'), with eager attention (forward
    mode needs plain ops); its cost model counts float64 bytes."""
    source = encoder.adapter
    shared = {id(p): p for module in _shared_modules(encoder, layer) for p in module.parameters()}
    model = copy.deepcopy(source.model, memo=dict(shared))
    for module in model.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in shared:
                parameter.data = parameter.data.double()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.double())
    model.set_attn_implementation("eager")
    twin = copy.copy(encoder)
    twin.adapter = type(source)(model)
    twin.dense = copy.deepcopy(encoder.dense).double() if encoder.dense is not None else None
    twin.cost = dataclasses.replace(encoder.cost, bytes_per_value=FLOAT64_BYTES)
    return twin


def _double(side: Side) -> Side:
    return Side(side.x.double(), side.r.double(), side.g.double(), side.g_ref.double())
