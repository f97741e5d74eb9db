"""How exactly lrp relevance adds up to the score, and how much of it the biases carry.

    python -m scripts.bench.lrp_conservation --model minilm --reference shift --similarity cos

For every pair of data/sts_pairs.tsv (or the first ``--pairs``) it explains the pair with
lrp (both sides, and the token×token matrix with ``--pairwise``) and prints the median and max of
``conservation_error`` (absolute and relative to |score|), of ``bias_share_a`` / ``bias_share_b``
and, pairwise, of |Σ A − score|.
"""
from __future__ import annotations

import argparse
import os
import statistics

from handlers.attribution import LRP
from handlers.encoder import Encoder, load_encoder
from handlers.tools.sources import model_dir, sts_pairs


def measure(encoder: Encoder, pairs: list[tuple[str, str]], pairwise: bool, batch: int = 8) -> dict[str, list[float]]:
    method, options = LRP(encoder), LRP.Options(pairwise=pairwise)
    values: dict[str, list[float]] = {}
    for start in range(0, len(pairs), batch):
        for result in method.attribute(pairs[start : start + batch], options):
            values.setdefault("conservation_error", []).append(result.delta)
            values.setdefault("relative error", []).append(result.delta / max(abs(result.score), 1e-12))
            values.setdefault("bias_share", []).extend([result.extras["bias_share_a"], result.extras["bias_share_b"]])
            if pairwise:
                values.setdefault("|sum A - score|", []).append(abs(float(result.attributions.sum()) - result.score))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--reference", default="shift", choices=["shift", "none"])
    parser.add_argument("--similarity", default="cos", choices=["cos", "dot"])
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--pairwise", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = load_encoder(model_dir(args.model), reference=args.reference, similarity=args.similarity)
    pairs = [(a, b) for a, b, _ in sts_pairs()][: args.pairs]
    values = measure(encoder, pairs, args.pairwise)
    print(f"{args.model}, reference {args.reference}, {args.similarity}, {len(pairs)} pairs\n")
    print("| quantity | median | max |\n|---|---|---|")
    for name, v in values.items():
        print(f"| {name} | {statistics.median(v):.3g} | {max(v):.3g} |")


if __name__ == "__main__":
    main()
