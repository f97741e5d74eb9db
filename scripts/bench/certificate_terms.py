"""ij's adaptive error estimate taken apart, term by term, against float64 references
(docs/ij.md, "What it shows"): per STS pair, the short side's estimate and its true error
‖Δv‖_F, the carry that takes it to A (probed along the error's own directions, at most 1.5
‖V_l‖_F) against ‖Δv V_lᵀ‖_F / ‖Δv‖_F, ‖V_l‖_F and ‖V_l‖₂, the long side's estimate and true
error, and the answer's estimate over its true error. The references: v and V_l (the long
side's own per-token vectors, by forward-mode products) by a Gauss rule of ``--reference-nodes``
on a float64 copy of the model; so for a model whose path a fixed rule does not resolve (mpnet
below layer 10) the reference is not exact.

    python -m scripts.bench.certificate_terms --model minilm --layer 1 --tolerance 1e-4 --pairs 8
"""
from __future__ import annotations

import argparse

import torch

from handlers.attribution.integrated_jacobians import _compared, _scale
from handlers.attribution.integrated_jacobians.integration import adaptive
from handlers.attribution.integrated_jacobians.paths import Task, _double, sides_at
from handlers.attribution.integrated_jacobians.plan import Nodes
from handlers.attribution.integrated_jacobians.products import short_vectors
from handlers.attribution.quadrature import nodes
from handlers.encoder import load_encoder
from handlers.tools.sources import model_dir, sts_pairs

BUDGET = 512 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--reference-nodes", type=int, default=128)
    args = parser.parse_args()
    encoder = load_encoder(model_dir(args.model), reference="shift", similarity="cos")
    exact = load_encoder(model_dir(args.model), reference="shift", similarity="cos")
    exact.adapter.model.double()
    if exact.dense is not None:
        exact.dense.double()
    path = Nodes.fixed(1, *nodes("gauss", args.reference_nodes))
    print("| pair | short estimate | short true | carry | ‖ΔvVᵀ‖/‖Δv‖ | ‖V_l‖_F | ‖V_l‖₂ | long estimate | long true "
          "| estimate / true | nodes |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    layer = args.layer
    for k, (a, b, _) in enumerate(sts_pairs()[: args.pairs]):
        with encoder.adapter.attention("eager"), exact.adapter.attention("eager"):
            task = Task.of(*sides_at(encoder, [a, b], layer)[0])
            scale = _scale(_compared(encoder.scoring, task.short), _compared(encoder.scoring, task.long))
            short, long, carry = adaptive(encoder, [task], layer, args.tolerance, 4000, BUDGET, [scale])
            v, matrix = short[0].estimate, long[0].estimate
            reference = Task(_double(task.short), _double(task.long), task.swapped)
            v_ref = short_vectors(exact, [reference], path, layer, BUDGET)
            v_long = short_vectors(exact, [Task(reference.long, reference.short, reference.swapped)], path, layer, BUDGET)
        short_true = float((v - v_ref).norm())
        carried = float(((v - v_ref) @ v_long.T).norm())
        long_true = float((matrix - v @ v_long.T).norm())
        estimate = short[0].error * carry[0] + long[0].error
        true = float((matrix - v_ref @ v_long.T).norm())
        print(f"| {k} | {short[0].error:.2e} | {short_true:.2e} | {carry[0]:.3g} | {carried / short_true:.2f} "
              f"| {float(v_long.norm()):.3g} | {float(torch.linalg.matrix_norm(v_long, 2)):.3g} | {long[0].error:.2e} "
              f"| {long_true:.2e} | {estimate / true:.1f} | {short[0].nodes_used}, {long[0].nodes_used} |", flush=True)


if __name__ == "__main__":
    main()
