"""One model of what an explanation costs: the bytes it holds and the work it does.

Every estimate is built from one block of the encoder over one row of ``width`` tokens:

- ``block_macs``: multiply-adds (projections, feed-forward, attention);
- ``block_bytes``: the activations and temporaries the block holds, in the model's dtype
  (attention scores and probabilities per head, a dozen hidden-size rows, the feed-forward's
  inner rows).

The methods state their needs in these units (``Method.memory`` and ``Method.work``), and both
the serving layer's admission and the methods' own chunking read them, so a refusal and a
chunk size never disagree. The sizes come from the family adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .architectures import Adapter


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class CostModel:
    """Block-level costs of one encoder's transformer."""

    hidden: int
    inner: int
    heads: int
    layers: int
    bytes_per_value: int

    @classmethod
    def of(cls, adapter: Adapter) -> "CostModel":
        return cls(adapter.hidden_size, adapter.intermediate_size, adapter.num_heads, adapter.num_layers,
                   dtype_bytes(adapter.dtype))

    def block_macs(self, width: int) -> float:
        """Multiply-adds of one block over one row of ``width`` tokens."""
        return width * (4 * self.hidden * self.hidden + 2 * self.hidden * self.inner) + 2 * width * width * self.hidden

    def block_bytes(self, width: int) -> int:
        """Bytes one block holds for one row of ``width`` tokens (activations and temporaries)."""
        return self.bytes_per_value * (
            4 * self.heads * width * width + 12 * width * self.hidden + 3 * width * self.inner
        )

    def pass_bytes(self, rows: int, width: int, blocks: int | None = None) -> int:
        """Bytes an autograd pass of ``rows`` rows through ``blocks`` blocks keeps for backward."""
        return rows * (self.layers if blocks is None else blocks) * self.block_bytes(width)

    def pass_macs(self, rows: int, width: int, blocks: int | None = None) -> float:
        """Multiply-adds of a forward pass of ``rows`` rows through ``blocks`` blocks."""
        return rows * (self.layers if blocks is None else blocks) * self.block_macs(width)
