"""Embeddings of many texts in few padded passes, and the refusal of texts without content.

The texts are tokenized together, sorted by length and encoded in the passes that waste the
least padding (``passes``). ``embed_rows`` runs the token rows (torch's ``embed_ids`` by
default, ``serving.onnx_rows.OnnxRows`` for archives with ``runtime: onnx``).
"""
from __future__ import annotations

import math

import torch

from .encoder import Encoder, RowEmbedder, TokenBatch
from .errors import NoContent

ROWS_PER_PASS = 256
#: The fixed cost of one forward pass (module calls, kernel launches), in padded tokens: sorted
#: rows are split into several passes where the padding that saves outweighs it. 32 was the best
#: of 8, 16, 32 and 64 for minilm on one CPU thread (+20 % over one pass for 8-pair batches).
PASS_COST_TOKENS = 32


def passes(lengths: list[int], pass_cost: float = PASS_COST_TOKENS, max_rows: int = ROWS_PER_PASS) -> list[range]:
    """Split rows sorted by length into consecutive passes with the least padded tokens plus
    ``pass_cost`` per pass (a pass pads its rows to its last, longest); a pass of more than
    ``max_rows`` rows (a memory bound, rarely reached) is then cut into pieces of ``max_rows``.

    Rows of equal length never gain from being apart, so the search runs over the distinct
    lengths, at most ``max_length`` of them.
    """
    bounds = [0] + [i + 1 for i in range(len(lengths)) if i + 1 == len(lengths) or lengths[i + 1] != lengths[i]]
    best = [0.0] + [math.inf] * (len(bounds) - 1)
    start_of = [0] * len(bounds)
    for j in range(1, len(bounds)):
        end = bounds[j]
        for i in range(j):
            rows = end - bounds[i]
            cost = best[i] + rows * lengths[end - 1] + pass_cost * math.ceil(rows / max_rows)
            if cost < best[j]:
                best[j], start_of[j] = cost, i
    parts, j = [], len(bounds) - 1
    while j > 0:
        start, end = bounds[start_of[j]], bounds[j]
        parts[:0] = [range(k, min(k + max_rows, end)) for k in range(start, end, max_rows)]
        j = start_of[j]
    return parts


def encode_texts(
    encoder: Encoder, texts: list[str], embed_rows: RowEmbedder | None = None
) -> tuple[torch.Tensor, TokenBatch]:
    """Embeddings of ``texts`` (rows in the given order) and their tokens."""
    batch = encoder.tokenize(texts)
    order = sorted(range(len(texts)), key=lambda i: batch.lengths[i])
    embeddings: list[torch.Tensor | None] = [None] * len(texts)
    for part in passes([batch.lengths[i] for i in order]):
        rows = [order[k] for k in part]
        for i, emb in zip(rows, encoder.encode_batch(batch.subset(rows), embed_rows)):
            embeddings[i] = emb
    return torch.stack(embeddings), batch  # type: ignore[arg-type]


def no_content(encoder: Encoder, lengths: list[tuple[str, int]]) -> NoContent | None:
    """The refusal of texts (field name, token count) one of which has only special tokens: it
    is its own reference, its shifted embedding is 0 and its cosine undefined."""
    specials = len(encoder.reference_ids(0))
    for name, length in lengths:
        if length <= specials:
            return NoContent(name, "has no tokens but the special ones (only zero-width, control or "
                                   "combining characters)")
    return None
