"""ij quadrature: cost against accuracy, for the fixed rules and the adaptive rule.

For every model and layer (0, L/2, L−2 by default), each rule explains the sentence pairs of
data/sts_pairs.tsv (shift mode, cos, one pair per call): fixed Gauss and right
(the original's) at N = 20, 50 and 200 nodes per side, and the adaptive rule at tolerances
1e-2, 1e-3 and 1e-4 (node budget ``--max-steps`` per side). Per cell: the median and the max
relative completeness error |sum(A) − score| / |score|, the median path nodes per side, the
median seconds, and for the adaptive rule the share converged. ``--reference-check`` also
compares each converged adaptive matrix with a fine reference (midpoint, 1,600 nodes): the
max |A − A_ref| / max |A_ref|. Prints Markdown and writes JSON with ``--out``.

    python -m scripts.bench.quadrature --models minilm --pairs 20
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
    reference_gaps: list[float]

    def row(self) -> dict:
        return {
            "model": self.model, "layer": self.layer, "rule": self.rule, "pairs": len(self.errors),
            "median_error": statistics.median(self.errors), "max_error": max(self.errors),
            "median_nodes": statistics.median(self.nodes), "median_seconds": statistics.median(self.seconds),
            "converged": sum(self.converged) / len(self.converged),
            "max_reference_gap": max(self.reference_gaps) if self.reference_gaps else None,
        }


def run_cell(encoder, model: str, layer: int, spec: str, pairs, args) -> Cell:
    rule, _, value = spec.partition(":")
    cell = Cell(model, layer, spec, [], [], [], [], [])
    method = IntegratedJacobians(encoder)
    options = dict(layer=layer, quadrature=rule, memory_budget_mb=args.memory_budget_mb)
    if rule == "adaptive":
        options.update(tolerance=float(value), max_steps=args.max_steps)
    else:
        options.update(steps=int(value), max_steps=max(int(value), 21))
    midpoint = IntegratedJacobians.Options(layer=layer, quadrature="midpoint", steps=1600, max_steps=1600,
                                           memory_budget_mb=args.memory_budget_mb)
    for pair in pairs:
        start = time.perf_counter()
        (result,) = method.attribute([pair], IntegratedJacobians.Options(**options))
        cell.seconds.append(time.perf_counter() - start)
        cell.errors.append(result.delta / abs(result.score))
        cell.nodes.append(max(result.extras["nodes"]))
        cell.converged.append(bool(result.extras["converged"]))
        if args.reference_check and rule == "adaptive" and result.extras["converged"]:
            (fine,) = method.attribute([pair], midpoint)
            gap = (result.attributions - fine.attributions).abs().max() / fine.attributions.abs().max()
            cell.reference_gaps.append(float(gap))
    return cell


def table(rows: list[dict]) -> str:
    lines = ["| model | layer | rule | pairs | median rel. error | max rel. error | median nodes/side "
             "| median s | converged | max gap to reference |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gap = f"{r['max_reference_gap']:.1e}" if r["max_reference_gap"] is not None else ""
        lines.append(f"| {r['model']} | {r['layer']} | {r['rule']} | {r['pairs']} | {r['median_error']:.1e} "
                     f"| {r['max_error']:.1e} | {r['median_nodes']:.0f} | {r['median_seconds']:.2f} "
                     f"| {100 * r['converged']:.0f} % | {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--model-dir", help="a local model directory instead of --models")
    parser.add_argument("--layers", nargs="+", type=int, help="default: 0, L/2, L-2")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="rule:N or adaptive:tolerance")
    parser.add_argument("--pairs", type=int, default=20, help="the first N pairs")
    parser.add_argument("--pair", nargs=2, metavar=("TEXT_A", "TEXT_B"), help="this one pair instead")
    parser.add_argument("--max-steps", type=int, default=1000, help="adaptive node budget per side")
    parser.add_argument("--memory-budget-mb", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference-check", action="store_true", help="compare with midpoint, 1,600 nodes")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pairs = [tuple(args.pair)] if args.pair else [(a, b) for a, b, _ in sts_pairs()[: args.pairs]]
    rows = []
    sources = [(Path(args.model_dir).name, args.model_dir)] if args.model_dir else [(m, model_dir(m)) for m in args.models]
    for name, path in sources:
        encoder = load_encoder(path, reference="shift", similarity="cos", device=args.device)
        layers = args.layers or sorted({0, encoder.num_layers // 2, encoder.num_layers - 2})
        for layer in layers:
            for spec in args.rules:
                rows.append(run_cell(encoder, str(name), layer, spec, pairs, args).row())
                print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{len(pairs)} pairs, shift mode, cos, {device}\n")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": device, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
