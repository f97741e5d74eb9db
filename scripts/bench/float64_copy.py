"""The float64 copy that ij's adaptive rule makes for panels narrower than float32 resolves
(``paths.Float64Twin``, docs/ij.md "mpnet's lower layers"): per layer, its weights, what the
memory budget leaves for its passes, whether one float64 node of each side fits there, and the
seconds to make it (one STS pair, shift mode, cos).

    python -m scripts.bench.float64_copy --model mpnet --layers 0 2 4 8 10 --budget-mb 1024
"""
from __future__ import annotations

import argparse
import time

from handlers.attribution.integrated_jacobians.integration import float64_fits
from handlers.attribution.integrated_jacobians.paths import Float64Twin, Task, float64_copy, sides_at
from handlers.encoder import load_encoder
from handlers.tools.sources import model_dir, sts_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mpnet")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 2, 4, 8, 10])
    parser.add_argument("--budget-mb", type=int, default=1024)
    args = parser.parse_args()
    encoder = load_encoder(model_dir(args.model), reference="shift", similarity="cos")
    a, b, _ = sts_pairs()[0]
    print("| layer | copy's weights MiB | left for its passes MiB | a node fits | seconds to copy |\n|---:|---:|---:|---|---:|")
    with encoder.adapter.attention("eager"):
        for layer in args.layers:
            twin = Float64Twin(encoder, [Task.of(*sides_at(encoder, [a, b], layer)[0])], layer, args.budget_mb * 2**20)
            start = time.perf_counter()
            float64_copy(encoder, layer)
            seconds = time.perf_counter() - start
            print(f"| {layer} | {twin.weights / 2**20:.0f} | {twin.budget / 2**20:.0f} | {float64_fits(twin)} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
