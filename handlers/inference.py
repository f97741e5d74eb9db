"""Similarity predictions for the items of a whole TorchServe batch, in one padded pass.

The distinct texts of all items are encoded together (sorted by length, in chunks that bound
memory), then each item takes its embeddings back: a pair gets its score, a query its
candidates' scores and their ranking. ``embed_rows`` runs the token rows (torch's ``embed_ids`` by
default, ``handlers.onnx_runtime.OnnxRows`` for archives with ``runtime: onnx``).
"""
from __future__ import annotations

import torch

from .encoder import Encoder, RowEmbedder
from .protocol import PairItem, RankItem

ROWS_PER_PASS = 256


def encode_texts(
    encoder: Encoder, texts: list[str], embed_rows: RowEmbedder | None = None
) -> tuple[torch.Tensor, list[bool]]:
    """Embeddings of ``texts`` (rows in the given order) and whether each was truncated."""
    batch = encoder.tokenize(texts)
    order = sorted(range(len(texts)), key=lambda i: batch.lengths[i])
    embeddings: list[torch.Tensor | None] = [None] * len(texts)
    for start in range(0, len(order), ROWS_PER_PASS):
        rows = order[start : start + ROWS_PER_PASS]
        for i, emb in zip(rows, encoder.encode_batch(batch.subset(rows), embed_rows)):
            embeddings[i] = emb
    return torch.stack(embeddings), batch.truncated  # type: ignore[arg-type]


def predict_items(
    encoder: Encoder, items: list[PairItem | RankItem], embed_rows: RowEmbedder | None = None
) -> list[dict]:
    texts = list(dict.fromkeys(t for item in items for t in item.texts()))
    if not texts:
        return []
    embeddings, truncated = encode_texts(encoder, texts, embed_rows)
    row = {t: i for i, t in enumerate(texts)}
    answers = []
    for item in items:
        if isinstance(item, PairItem):
            a, b = embeddings[row[item.text_a]], embeddings[row[item.text_b]]
            answer = {"score": float(encoder.similarity_of(a[None], b[None])[0])}
            fields = {"text_a": item.text_a, "text_b": item.text_b}
        else:
            query = embeddings[row[item.query]][None]
            cands = embeddings[[row[c] for c in item.candidates]]
            scores = encoder.similarity_of(query.expand_as(cands), cands).tolist()
            ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
            answer = {"scores": scores, "ranking": ranking}
            fields = {"query": item.query, **{f"candidates.{i}": c for i, c in enumerate(item.candidates)}}
        answer.update(
            similarity=encoder.similarity,
            reference=encoder.reference,
            truncated=[name for name, text in fields.items() if truncated[row[text]]],
        )
        answers.append(answer)
    return answers
