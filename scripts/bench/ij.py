"""Benchmark of the ij method against the original per-dimension algorithm.

The baseline is the original algorithm, ``handlers/attribution/per_dimension.per_dimension_attributions``: one
backward pass per embedding dimension, the right Riemann sum.

    python -m scripts.bench.ij --model mpnet --layer 8 --steps 50 --pairs 1   # both, and the ratio
    python -m scripts.bench.ij --model mpnet --long-case                      # 20 vs 256 tokens
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from handlers.attribution.integrated_jacobians import IntegratedJacobians
from handlers.serving.settings import HandlerSettings
from handlers.encoder import Encoder, load_encoder
from handlers.tools import sources
from handlers.tools.sources import model_dir
from handlers.attribution.per_dimension import per_dimension_attributions, relative_difference



def sts_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a, b, _ in sources.sts_pairs()]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def right_rule(encoder: Encoder, pair, layer: int, steps: int, budget: int):
    """ij with the original's right-endpoint rule of ``steps`` nodes."""
    options = IntegratedJacobians.Options(layer=layer, quadrature="right", steps=steps, max_steps=max(steps, 21),
                                          memory_budget_mb=budget)
    return IntegratedJacobians(encoder).attribute([pair], options)[0]


def compare(encoder: Encoder, pairs, layer: int, steps: int, budget: int) -> dict:
    rows = []
    for a, b in pairs:
        start = time.perf_counter()
        ours = right_rule(encoder, (a, b), layer, steps, budget)
        fast = time.perf_counter() - start
        start = time.perf_counter()
        reference = per_dimension_attributions(encoder, a, b, layer, steps)
        slow = time.perf_counter() - start
        rows.append(dict(
            tokens=[len(ours.tokens_a), len(ours.tokens_b)], ij_s=round(fast, 3), per_dimension_s=round(slow, 2),
            ratio=round(slow / fast, 1), relative_difference=relative_difference(ours.attributions, reference),
        ))
    return {"layer": layer, "steps": steps, "pairs": rows}


def long_case(encoder: Encoder, layer: int, steps: int, budget: int) -> dict:
    """A 20-token claim against a 256-token post."""
    texts = [t for pair in sts_pairs() for t in pair]
    claim_ids = encoder.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    claim = encoder.tokenizer.decode((claim_ids * 20)[:18])
    post = " ".join(texts)
    start = time.perf_counter()
    result = right_rule(encoder, (claim, post), layer, steps, budget)
    return {
        "layer": layer, "steps": steps, "memory_budget_mb": budget,
        "tokens": [len(result.tokens_a), len(result.tokens_b)],
        "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb()),
        "attribution_error": result.delta,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--similarity", default="cos", choices=["cos", "dot"])
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=1, help="how many sts pairs to compare")
    parser.add_argument("--memory-budget-mb", type=int, default=1024)
    parser.add_argument("--long-case", action="store_true", help="20 vs 256 tokens instead of the comparison")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = load_encoder(model_dir(args.model), reference="shift", similarity=args.similarity,
                           max_length=HandlerSettings().max_length)
    info = {"model": args.model, "similarity": args.similarity, "threads": torch.get_num_threads()}
    if args.long_case:
        layer = args.layer if args.layer is not None else IntegratedJacobians.default_layer(encoder.num_layers)
        report = long_case(encoder, layer, args.steps, args.memory_budget_mb)
    else:
        layer = args.layer if args.layer is not None else IntegratedJacobians.default_layer(encoder.num_layers)
        report = compare(encoder, sts_pairs()[: args.pairs], layer, args.steps, args.memory_budget_mb)
    print(json.dumps({**info, **report}, indent=1))


if __name__ == "__main__":
    main()
