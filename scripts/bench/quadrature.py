"""ij quadrature: cost against accuracy, for the fixed rules and the adaptive rule.

For every model and layer (0, L/2, L−2 by default), each rule explains the sentence pairs of
data/sts_pairs.tsv (shift mode, cos, one pair per call): fixed Gauss and right
(the original's) at N = 20, 50 and 200 nodes per side, and the adaptive rule at tolerances
1e-2, 1e-3 and 1e-4 (node budget ``--max-steps`` per side). Per cell: the median and the max
relative completeness error |sum(A) − score| / |score|, the median path nodes per side, the
median seconds, and for the adaptive rule the share converged. ``--reference RULE`` also
computes each pair's matrix with RULE on a float64 copy of the model (``gauss:128`` by default
in the examples; ``adaptive:1e-6`` where the integrand has features narrower than a fixed
rule's spacing): the true error ‖A − A_ref‖_F / |score| of every answer, the ratio of the
adaptive rule's ``error_estimate`` to it, and how many answers said ``converged`` while their
true error was above the tolerance. Prints Markdown and writes JSON with ``--out``.

    python -m scripts.bench.quadrature --models minilm --pairs 20
    python -m scripts.bench.quadrature --models minilm --layers 0 1 2 3 4 5 --rules adaptive:1e-3 --reference gauss:128
    python -m scripts.bench.quadrature --models mpnet --layers 0 6 10 --rules adaptive:1e-3 --pairs 60
    python -m scripts.bench.quadrature --models mpnet --layers 0 --rules adaptive:1e-3 --max-steps 200 \
        --pair "A man is playing a guitar." "Someone plays music."
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from handlers.attribution.integrated_jacobians import IntegratedJacobians
from handlers.encoder import load_encoder
from handlers.tools.sources import model_dir, sts_pairs

DEFAULT_RULES = ("gauss:20", "gauss:50", "gauss:200", "right:20", "right:50", "right:200",
                 "adaptive:1e-2", "adaptive:1e-3", "adaptive:1e-4")


@dataclass
class Cell:
    model: str
    layer: int
    rule: str
    errors: list[float]
    nodes: list[int]
    seconds: list[float]
    converged: list[bool]
    true_errors: list[float]
    estimates: list[float]
    tolerance: float | None = None
    float64_nodes: list[int] | None = None  # per answer, the more of its two sides' float64 nodes

    def row(self) -> dict:
        ratios = [e / t for e, t in zip(self.estimates, self.true_errors) if t > 0]
        row = {
            "model": self.model, "layer": self.layer, "rule": self.rule, "pairs": len(self.errors),
            "median_error": statistics.median(self.errors), "max_error": max(self.errors),
            "median_nodes": statistics.median(self.nodes), "max_nodes": max(self.nodes),
            "median_seconds": statistics.median(self.seconds),
            "converged": sum(self.converged) / len(self.converged),
        }
        if self.float64_nodes:
            row.update(median_float64_nodes=statistics.median(self.float64_nodes), max_float64_nodes=max(self.float64_nodes))
        if self.true_errors:
            row.update(
                median_true_error=statistics.median(self.true_errors), max_true_error=max(self.true_errors),
                ratio_min=min(ratios, default=None), ratio_median=statistics.median(ratios) if ratios else None,
                ratio_max=max(ratios, default=None),
                false_claims=sum(c and t > self.tolerance for c, t in zip(self.converged, self.true_errors))
                if self.tolerance is not None else None,
            )
        return row


def options_of(spec: str, layer: int, args) -> IntegratedJacobians.Options:
    """``gauss:50`` or ``adaptive:1e-3`` as the method's options at ``layer``."""
    rule, _, value = spec.partition(":")
    options = dict(layer=layer, quadrature=rule, memory_budget_mb=args.memory_budget_mb)
    if rule == "adaptive":
        options.update(tolerance=float(value), max_steps=max(args.max_steps, args.reference_max_steps))
    else:
        options.update(steps=int(value), max_steps=max(int(value), 21))
    return IntegratedJacobians.Options(**options)


REFERENCES: dict[tuple, object] = {}


def run_cell(encoder, reference, model: str, layer: int, spec: str, pairs, args) -> Cell:
    """One rule at one layer over the pairs; with ``reference`` (ij on a float64 copy of the
    model), every answer's true error and its estimate's ratio to it."""
    options = options_of(spec, layer, args)
    if options.quadrature == "adaptive":
        options = options.model_copy(update={"max_steps": args.max_steps})
    cell = Cell(model, layer, spec, [], [], [], [], [], [],
                options.tolerance if options.quadrature == "adaptive" else None)
    method = IntegratedJacobians(encoder)
    for pair in pairs:
        start = time.perf_counter()
        (result,) = method.attribute([pair], options)
        cell.seconds.append(time.perf_counter() - start)
        cell.errors.append(result.delta / abs(result.score))
        cell.nodes.append(max(result.extras["nodes"]))
        cell.converged.append(bool(result.extras["converged"]))
        cell.float64_nodes = (cell.float64_nodes or []) + [max(result.extras["float64_nodes"])]
        if reference is not None:
            key = (id(reference), layer, pair)
            if key not in REFERENCES:  # one reference per pair and layer, whatever the rules compared
                REFERENCES[key] = reference.attribute([pair], options_of(args.reference, layer, args))[0]
            exact = REFERENCES[key]
            truth = exact.attributions.double()
            cell.true_errors.append(float((result.attributions.double() - truth).norm()) / abs(exact.score))
            cell.estimates.append(result.extras["error_estimate"] or 0.0)
        print(json.dumps({"pair": len(cell.errors), "nodes": result.extras["nodes"],
                          "converged": result.extras["converged"], "estimate": result.extras["error_estimate"],
                          "true": cell.true_errors[-1] if cell.true_errors else None,
                          "seconds": round(cell.seconds[-1], 2)}), flush=True)
    return cell


def _e(value) -> str:
    return "" if value is None else f"{value:.1e}"


def table(rows: list[dict]) -> str:
    lines = ["| model | layer | rule | pairs | converged | nodes/side median (max) | completeness error median (max) "
             "| true error median (max) | estimate / true min, median, max | converged but above tolerance | s/pair "
             "| float64 nodes/side median (max) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        truth = f"{_e(r['median_true_error'])} ({_e(r['max_true_error'])})" if "median_true_error" in r else ""
        ratio = f"{r['ratio_min']:.1f}, {r['ratio_median']:.1f}, {r['ratio_max']:.1f}" \
            if r.get("ratio_median") and r.get("ratio_min") else ""
        claims = "" if r.get("false_claims") is None else str(r["false_claims"])
        fine = f"{r['median_float64_nodes']:.0f} ({r['max_float64_nodes']})" if "median_float64_nodes" in r else ""
        lines.append(f"| {r['model']} | {r['layer']} | {r['rule']} | {r['pairs']} | {100 * r['converged']:.0f} % "
                     f"| {r['median_nodes']:.0f} ({r['max_nodes']}) | {_e(r['median_error'])} ({_e(r['max_error'])}) "
                     f"| {truth} | {ratio} | {claims} | {r['median_seconds']:.2f} | {fine} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--model-dir", help="a local model directory instead of --models")
    parser.add_argument("--layers", nargs="+", type=int, help="default: 0, L/2, L-2")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="rule:N or adaptive:tolerance")
    parser.add_argument("--pairs", type=int, default=20, help="the first N pairs (after --skip)")
    parser.add_argument("--skip", type=int, default=0, help="start after this many pairs of the file")
    parser.add_argument("--pair", nargs=2, metavar=("TEXT_A", "TEXT_B"), help="this one pair instead")
    parser.add_argument("--max-steps", type=int, default=1000, help="adaptive node budget per side")
    parser.add_argument("--memory-budget-mb", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference", help="a rule (gauss:128, adaptive:1e-6) run on a float64 copy of the model "
                        "for every answer's true error")
    parser.add_argument("--reference-max-steps", type=int, default=4000, help="the reference's adaptive node budget")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pairs = [tuple(args.pair)] if args.pair else [(a, b) for a, b, _ in sts_pairs()[args.skip : args.skip + args.pairs]]
    rows = []
    sources = [(Path(args.model_dir).name, args.model_dir)] if args.model_dir else [(m, model_dir(m)) for m in args.models]
    for name, path in sources:
        encoder = load_encoder(path, reference="shift", similarity="cos", device=args.device)
        reference = None
        if args.reference:
            exact = load_encoder(path, reference="shift", similarity="cos", device=args.device)
            exact.adapter.model.double()
            reference = IntegratedJacobians(exact)
        layers = args.layers or sorted({0, encoder.num_layers // 2, encoder.num_layers - 2})
        for layer in layers:
            for spec in args.rules:
                rows.append(run_cell(encoder, reference, str(name), layer, spec, pairs, args).row())
                print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{len(pairs)} pairs, shift mode, cos, {device}\n")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": device, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
