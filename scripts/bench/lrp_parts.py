"""Faithfulness of lrp's two parts: the gradient×input terms and the bias terms, ranked apart.

    python -m scripts.bench.lrp_parts mpnet --limit 30
    python -m scripts.bench.lrp_parts minilm --limit 60

lrp's relevance of a token is the sum of its gradient×input terms and its share of the model's
biases (``LRP.relevance_parts``, in shift mode less the reference's, position by position); the
two add up to the score exactly. For the first ``--limit`` pairs of data/sts_pairs.tsv (shift,
cos) this ranks each side's tokens by the sum, by the gradient×input part alone and by the bias
part alone, and prints the AOPC comprehensiveness and sufficiency of each ranking as
``siamese-faithfulness`` measures them (both sides, grid 10–50 %).
"""
from __future__ import annotations

import argparse

from handlers.attribution import LRP, method_of, relevance
from handlers.encoder import load_encoder
from handlers.tools.faithfulness import MethodResult, RowScores, side_curves, side_of
from handlers.tools.sources import model_dir, sts_pairs

PARTS = ("sum (the answer)", "gradient×input part", "bias part")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="minilm, mpnet or a local directory")
    p.add_argument("--limit", type=int, default=30, help="the first N pairs")
    args = p.parse_args(argv)
    encoder = load_encoder(model_dir(args.model), reference="shift", similarity="cos")
    lrp: LRP = method_of(encoder, "lrp")  # type: ignore[assignment]
    scores = RowScores(encoder)
    results = {part: MethodResult.empty() for part in PARTS}
    for a, b, _ in sts_pairs()[: args.limit]:
        with relevance.gradients():
            run = relevance.explained_pass(encoder, [(a, b)], lrp.mode, lrp.references.embeddings)
            inputs, bias = lrp.relevance_parts(run)
        sides = (side_of(encoder, a), side_of(encoder, b))
        for which, row in enumerate(run.side_rows(0)):
            length = run.batch.lengths[row]
            x, s = inputs[row, :length].double().numpy(), bias[row, :length].double().numpy()
            side, partner = sides[which], sides[1 - which]
            for part, ranked in zip(PARTS, (x + s, x, s)):
                results[part].add(side_curves(scores, side, partner, ranked))
    print(f"| {args.model}, {args.limit} pairs | AOPC comprehensiveness ↑ | AOPC sufficiency ↓ | sides |")
    print("|---|---:|---:|---:|")
    for part, result in results.items():
        s = result.summary()
        print(f"| {part} | {s['aopc_comprehensiveness']:.4f} | {s['aopc_sufficiency']:.4f} | {s['sides']} |")


if __name__ == "__main__":
    main()
