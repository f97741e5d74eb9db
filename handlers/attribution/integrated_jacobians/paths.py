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
    probe = torch.zeros(*mask.shape, encoder.adapter.hidden_size, device=mask.device)
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
    is how far a panel's estimate misses that, beyond the float32 rounding of the two values:
    an exact error of the panel (of its token sums), which locates a feature that the panel's
    own nodes do not resolve."""

    def __init__(self, encoder: Encoder, side: Side, layer: int):
        self.encoder, self.side, self.layer = encoder, side, layer
        self.values: dict[float, torch.Tensor] = {0.0: side.g_ref.double().cpu(), 1.0: side.g.double().cpu()}

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
        return gb - ga, ROUNDING * float(ga.norm() + gb.norm())


#: the float32 rounding allowed in the difference of two values of g along the path
ROUNDING = 16 * torch.finfo(torch.float32).eps


