"""ij's paths: each text and its reference at the attributed layer (the straight path between
them, ``Side``), the function g being integrated along it, and g's values at points of the path
(``PathValues``), which the per-panel identities of the adaptive rule check against."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def context(encoder: Encoder, mask: torch.Tensor):
    dtype = next(encoder.adapter.model.parameters()).dtype
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
            g = embedding(self.encoder, hidden[None], mask, context(self.encoder, mask), self.layer)
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
    explanation whose panels stay wider never pays for the copy (twice the model's weights,
    loaded from its directory, and each pass about twice as slow as float32's on a CPU).

    Its path runs between the same end points (the float32 hidden states at the layer, in
    float64); its values of g are its own, computed in float64."""

    def __init__(self, encoder: Encoder, tasks: list[Task], layer: int):
        self.source, self.source_tasks, self.layer = encoder, tasks, layer
        self._made: tuple[Encoder, list[Task], list[tuple[PathValues, PathValues]]] | None = None

    def _make(self):
        if self._made is None:
            source = self.source
            encoder = Encoder(source.path, reference=source.reference, similarity=source.similarity,
                              max_length=source.max_length, device=source.device)
            encoder.adapter.model.double().set_attn_implementation("eager")  # forward mode needs plain ops
            if encoder.dense is not None:
                encoder.dense.double()
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


def _double(side: Side) -> Side:
    return Side(side.x.double(), side.r.double(), side.g.double(), side.g_ref.double())
