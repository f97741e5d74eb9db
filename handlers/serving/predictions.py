"""Similarity predictions for the items of a whole batch (either engine), in few padded passes.

The distinct texts of all items are encoded together (``inference.encode_texts``), then each
item takes its embeddings back: a pair gets its score, a query its candidates' scores and their
ranking, an embeddings request the embeddings themselves (``embeddings_of``); an item with a
text that has no content is refused (``inference.no_content``), on the tokenization of the
prediction pass itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..encoder import Encoder, RowEmbedder
from ..inference import encode_texts, no_content

from .protocol import EmbedItem, PairItem, RankItem, RequestError


def embeddings_of(encoder: Encoder, compared: torch.Tensor) -> torch.Tensor:
    """The served embeddings: the ones the score compares (e(x) − e(r) in shift mode), L2-normalised
    where the similarity is a cosine, so that their dot product is the served score."""
    compared = compared.float()
    return F.normalize(compared, dim=-1) if encoder.similarity == "cos" else compared


def predict_items(
    encoder: Encoder, items: list[PairItem | RankItem | EmbedItem], embed_rows: RowEmbedder | None = None
) -> list[dict | RequestError]:
    """One answer per item, or the item's refusal when one of its texts has no content."""
    texts = list(dict.fromkeys(t for item in items for t in item.all_texts()))
    if not texts:
        return []
    embeddings, batch = encode_texts(encoder, texts, embed_rows)
    row = {t: i for i, t in enumerate(texts)}
    answers: list[dict | RequestError] = []
    for item in items:
        fields = dict(item.named_texts())
        refusal = no_content(encoder, [(name, batch.lengths[row[text]]) for name, text in fields.items()])
        if refusal is not None:
            answers.append(RequestError.of(refusal))
            continue
        if isinstance(item, PairItem):
            a, b = embeddings[row[item.text_a]], embeddings[row[item.text_b]]
            answer = {"score": float(encoder.similarity_of(a[None], b[None])[0])}
        elif isinstance(item, EmbedItem):
            rows = [row[text] for text in item.texts]
            answer = {"embeddings": embeddings_of(encoder, embeddings[rows]).tolist(),
                      "tokens": [batch.lengths[r] for r in rows]}
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
