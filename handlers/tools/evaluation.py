"""How well scores agree: with gold similarities (Spearman) and between runtimes (pair scores)."""
from __future__ import annotations

import numpy as np

from handlers.encoder import Encoder, RowEmbedder


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, tied values sharing the mean of their ranks (the gold scores have many ties)."""
    distinct, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (first + (counts - 1) / 2)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation, ties averaged."""
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def pair_scores(
    encoder: Encoder, pairs: list[tuple[str, str, float]], embed_rows: RowEmbedder | None = None
) -> np.ndarray:
    """The encoder's score of each pair, all texts in one batch."""
    embeddings = encoder.encode_batch(encoder.tokenize([t for a, b, _ in pairs for t in (a, b)]), embed_rows)
    return encoder.similarity_of(embeddings[0::2], embeddings[1::2]).numpy()
