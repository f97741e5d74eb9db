"""The reference and the similarity: what a score compares, in one place.

``Reference(mode, similarity, model_normalizes)`` is the one object every path uses, the
encoder's predictions, each explanation method and the cost model:

- ``shift`` (exact): the compared embedding is e'(x) = e(x) − e(r_len(x)), so f(r, ·) = 0; the
  model's Normalize module is not applied before the shift.
- ``none`` (approximate): the off-the-shelf model, its Normalize applied where it has one.

The similarity is ``cos`` or ``dot``. Explanations see the same score through
``explained_score``: a cosine with both norms held constant, so that the score is bilinear in
the two embeddings and gradient×input can add up to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

Mode = Literal["shift", "none"]
Similarity = Literal["cos", "dot"]
MODES: tuple[str, ...] = get_args(Mode)
SIMILARITIES: tuple[str, ...] = get_args(Similarity)


@dataclass(frozen=True)
class Reference:
    """The reference mode and the similarity of one encoder."""

    mode: Mode = "shift"
    similarity: Similarity = "cos"
    model_normalizes: bool = False  # the model ends in a Normalize module

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"reference must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, not {self.similarity!r}")

    @property
    def shifted(self) -> bool:
        return self.mode == "shift"

    @property
    def rows_per_text(self) -> int:
        """Rows one explained text takes in a pass: itself and, when shifted, its reference."""
        return 2 if self.shifted else 1

    @property
    def path_normalizes(self) -> bool:
        """ij in none mode integrates the normalised embedding when the score is a cosine
        (or the model normalises): then its dot product is the score."""
        return not self.shifted and (self.similarity == "cos" or self.model_normalizes)

    def compared(self, embeddings: torch.Tensor, references: torch.Tensor | None) -> torch.Tensor:
        """The embeddings a score compares, from the model's own and (shift) the references' e(r)."""
        if self.shifted:
            if references is None:
                raise ValueError("shift mode needs the reference embeddings")
            return embeddings - references
        return F.normalize(embeddings, dim=-1) if self.model_normalizes else embeddings

    def explained(self, embeddings: torch.Tensor, references: torch.Tensor | None) -> torch.Tensor:
        """``compared`` with e(r) and a Normalize's norm held constant (for gradient×input)."""
        if self.shifted:
            return embeddings - references.detach()  # type: ignore[union-attr]
        if self.model_normalizes:
            return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12).detach()
        return embeddings

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise similarity of two [N, D] tensors of compared embeddings."""
        if self.similarity == "cos":
            return F.cosine_similarity(a, b, dim=-1, eps=1e-12)
        return (a * b).sum(-1)

    def explained_score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``score`` with a cosine's norms held constant: bilinear in ``a`` and ``b``."""
        dot = (a * b).sum(-1)
        return dot if self.similarity == "dot" else dot / self.norms(a, b)

    def norms(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """What a cosine divides the dot product by, held constant (1 for dot)."""
        if self.similarity == "dot":
            return torch.ones(a.shape[:-1], dtype=a.dtype, device=a.device)
        return (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12).detach()

    def path_score(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """ij's score of two path-end embeddings [D], in float64: a dot product where the path
        embedding is normalised already (``path_normalizes``), else ``score``."""
        a, b = a.double(), b.double()
        if self.path_normalizes or self.similarity == "dot":
            return float(a @ b)
        return float(F.cosine_similarity(a[None], b[None], eps=1e-12)[0])
