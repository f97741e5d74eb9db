"""Median attribution error of each quadrature rule, to choose the ij default.

For every model and layer (0, L/2, L−2), every rule explains the sentence pairs of
../shared/data/sts_pairs.tsv with the same number of nodes; the table lists the median
|sum(A) − score| (shift mode, cos). Prints a Markdown table.

    python -m scripts.bench.quadrature_table --models minilm mpnet --steps 50 [--pairs 60]
"""
from __future__ import annotations

import argparse
import os
import statistics

from handlers.attribution.integrated_jacobians import attribute_pairs
from handlers.attribution.quadrature import RULES
from handlers.encoder import load_encoder
from handlers.tools.sources import sts_pairs
from handlers.tools.sources import model_dir


def median_errors(model: str, steps: int, pairs: list[tuple[str, str]], budget: int) -> dict[int, dict[str, float]]:
    encoder = load_encoder(model_dir(model), reference="shift", similarity="cos")
    layers = sorted({0, encoder.num_layers // 2, encoder.num_layers - 2})
    table: dict[int, dict[str, float]] = {}
    for layer in layers:
        table[layer] = {}
        for rule in RULES:
            errors = [attribute_pairs(encoder, [pair], layer, steps, rule, budget)[0].attribution_error for pair in pairs]
            table[layer][rule] = statistics.median(errors)
            print(f"# {model} layer {layer} {rule}: {table[layer][rule]:.2e}", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "mpnet"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=None, help="the first N pairs (default: all)")
    parser.add_argument("--memory-budget-mb", type=int, default=1024)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pairs = [(a, b) for a, b, _ in sts_pairs()[: args.pairs]]
    rows = []
    for model in args.models:
        for layer, errors in median_errors(model, args.steps, pairs, args.memory_budget_mb).items():
            best = min(errors, key=errors.get)
            cells = [f"**{errors[r]:.2e}**" if r == best else f"{errors[r]:.2e}" for r in RULES]
            rows.append(f"| {model} | {layer} | " + " | ".join(cells) + " |")
    print(f"median attribution error, N = {args.steps}, {len(pairs)} pairs, shift mode, cos\n")
    print("| model | layer | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
