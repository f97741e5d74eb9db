"""ij's adaptive rule against a fixed rule, time and completeness, pair by pair.

Both rules explain each STS pair in turn (shift mode, cos, one pair per call), ``--repeat`` rounds
with the calls interleaved, so that a change of the machine's load reaches both rules alike; a
pair's time under a rule is its fastest round. Per layer: the ratio of the adaptive rule's time to
the fixed rule's, pair by pair (median and range) and over all pairs (the sums), each rule's
nodes per side and relative completeness error |sum(A) − score| / |score| (median and max), and
the share of adaptive answers that converged. A first call per rule and layer, not timed, pays
the process's first-use costs.

    python -m scripts.bench.adaptive_speed --model minilm --layers 4 5 --tolerance 1e-4 --against gauss:50
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from handlers.attribution.integrated_jacobians import IntegratedJacobians
from handlers.encoder import load_encoder
from handlers.tools.sources import model_dir, sts_pairs


def compare(method: IntegratedJacobians, layer: int, tolerance: float, against: str, pairs, repeat: int) -> dict:
    rule, _, steps = against.partition(":")
    options = {
        "adaptive": method.Options(layer=layer, tolerance=tolerance),
        against: method.Options(layer=layer, quadrature=rule, steps=int(steps), max_steps=max(int(steps), 21)),
    }
    for chosen in options.values():
        method.attribute([pairs[0]], chosen)
    seconds = {name: [float("inf")] * len(pairs) for name in options}
    answers: dict[str, list] = {name: [None] * len(pairs) for name in options}
    for _ in range(repeat):
        for k, pair in enumerate(pairs):
            for name, chosen in options.items():
                start = time.perf_counter()
                (answers[name][k],) = method.attribute([pair], chosen)
                seconds[name][k] = min(seconds[name][k], time.perf_counter() - start)
    ratios = [a / f for a, f in zip(seconds["adaptive"], seconds[against])]
    row = {"layer": layer, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
           "ratio_max": max(ratios), "ratio_total": sum(seconds["adaptive"]) / sum(seconds[against]),
           "converged": sum(bool(r.extras["converged"]) for r in answers["adaptive"]) / len(pairs)}
    for name in options:
        errors = [r.delta / abs(r.score) for r in answers[name]]
        row[name] = {"seconds": statistics.median(seconds[name]), "nodes": statistics.median(max(r.extras["nodes"])
                     for r in answers[name]), "error_median": statistics.median(errors), "error_max": max(errors)}
    return row


def table(rows: list[dict], tolerance: float, against: str) -> str:
    lines = [f"| layer | adaptive:{tolerance:g} / {against} time, per pair median (range) | over all pairs "
             f"| s/pair adaptive, {against} | nodes adaptive, {against} | completeness error median (max): adaptive "
             f"| {against} | converged |", "|---:|---|---:|---|---|---|---|---:|"]
    for r in rows:
        a, f = r["adaptive"], r[against]
        lines.append(f"| {r['layer']} | {r['ratio_median']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) "
                     f"| {r['ratio_total']:.2f} | {a['seconds']:.3f}, {f['seconds']:.3f} | {a['nodes']:g}, {f['nodes']:g} "
                     f"| {a['error_median']:.1e} ({a['error_max']:.1e}) | {f['error_median']:.1e} ({f['error_max']:.1e}) "
                     f"| {r['converged']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--layers", type=int, nargs="+", default=[4])
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--against", default="gauss:50", help="the fixed rule, rule:steps")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    method = IntegratedJacobians(load_encoder(model_dir(args.model), reference="shift", similarity="cos"))
    pairs = [(a, b) for a, b, _ in sts_pairs()[: args.pairs]]
    rows = []
    for layer in args.layers:
        rows.append(compare(method, layer, args.tolerance, args.against, pairs, args.repeat))
        print(rows[-1], flush=True)
    print(f"\n{args.model}, {len(pairs)} STS pairs, {args.repeat} rounds, CPU, {args.threads} threads\n")
    print(table(rows, args.tolerance, args.against))


if __name__ == "__main__":
    main()
