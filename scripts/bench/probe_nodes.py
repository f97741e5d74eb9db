"""How many path nodes ij's estimate of the long side's ‖V_l‖_F needs (docs/ij.md, "The certificate").

The adaptive rule gives the short side a share of the tolerance scaled by ‖V_l‖_F, estimated
with random cotangents on a fixed Gauss rule (``integration.long_norms``). For each pair and
layer this prints the estimate on ``--nodes`` Gauss nodes divided by the estimate on
``--against`` nodes, with the same probes, so that only the rule differs (shift mode, cos).

    python -m scripts.bench.probe_nodes --model minilm --layers 0 1 2 3 4 5 --pairs 8
    python -m scripts.bench.probe_nodes --model mpnet --layers 0 2 4 6 8 10 --pairs 5
"""
from __future__ import annotations

import argparse

import torch

from handlers.attribution.integrated_jacobians.integration import long_norms
from handlers.attribution.integrated_jacobians.paths import Task, sides_at
from handlers.encoder import load_encoder
from handlers.tools.sources import model_dir, sts_pairs


def ratios(model: str, layers: list[int], pairs: int, rules: list[int], against: int) -> list[str]:
    encoder = load_encoder(model_dir(model), reference="shift", similarity="cos")
    lines = [f"### {model}: ‖V_l‖_F on N Gauss nodes / on {against}, {pairs} STS pairs (min–max)", "",
             "| layer | " + " | ".join(f"{n} nodes" for n in rules) + " |", "|---:|" + "---|" * len(rules)]
    for layer in layers:
        found: dict[int, list[float]] = {n: [] for n in rules}
        for a, b, _ in sts_pairs()[:pairs]:
            with encoder.adapter.attention("eager"):
                task = Task.of(*sides_at(encoder, [a, b], layer)[0])
                reference = long_norms(encoder, [task], layer, 2**30, against)[0]
                for n in rules:
                    found[n].append(long_norms(encoder, [task], layer, 2**30, n)[0] / reference)
        lines.append(f"| {layer} | " + " | ".join(f"{min(v):.3f}–{max(v):.3f}" for v in found.values()) + " |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--nodes", type=int, nargs="+", default=[7, 21], help="the rules compared")
    p.add_argument("--against", type=int, default=64, help="the finer rule they are divided by")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("\n".join(ratios(args.model, args.layers, args.pairs, args.nodes, args.against)))


if __name__ == "__main__":
    main()
