"""Similarity predictions for the items of a whole TorchServe batch, in few padded passes.

The distinct texts of all items are tokenized together, sorted by length and encoded in the
passes that waste the least padding (``passes``), then each item takes its embeddings back: a
pair gets its score, a query its candidates' scores and their ranking; an item with a text
that has no content is refused (``admission.content_refusal``). ``embed_rows`` runs the token
rows (torch's ``embed_ids`` by default, ``handlers.onnx_runtime.OnnxRows`` for archives with
``runtime: onnx``).
"""
from __future__ import annotations

import math

import torch

from .admission import content_refusal, text_fields
from .encoder import Encoder, RowEmbedder, TokenBatch
from .protocol import PairItem, RankItem, RequestError

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


def predict_items(
    encoder: Encoder, items: list[PairItem | RankItem], embed_rows: RowEmbedder | None = None
) -> list[dict | RequestError]:
    """One answer per item, or the item's refusal when one of its texts has no content."""
    texts = list(dict.fromkeys(t for item in items for t in item.texts()))
    if not texts:
        return []
    embeddings, batch = encode_texts(encoder, texts, embed_rows)
    row = {t: i for i, t in enumerate(texts)}
    answers: list[dict | RequestError] = []
    for item in items:
        fields = dict(text_fields(item))
        refusal = content_refusal(encoder, [(name, batch.lengths[row[text]]) for name, text in fields.items()])
        if refusal is not None:
            answers.append(refusal)
            continue
        if isinstance(item, PairItem):
            a, b = embeddings[row[item.text_a]], embeddings[row[item.text_b]]
            answer = {"score": float(encoder.similarity_of(a[None], b[None])[0])}
        else:
            query = embeddings[row[item.query]][None]
            cands = embeddings[[row[c] for c in item.candidates]]
            scores = encoder.similarity_of(query.expand_as(cands), cands).tolist()
            ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
            answer = {"scores": scores, "ranking": ranking}
        answer.update(
            similarity=encoder.similarity,
            reference=encoder.reference,
            truncated=[name for name, text in fields.items() if batch.truncated[row[text]]],
        )
        answers.append(answer)
    return answers
