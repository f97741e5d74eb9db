"""Predictions on a CUDA device: texts/s in fp32 and bf16 at several batch sizes, and bf16's
score drift against fp32 on the STS pairs.

    python -m scripts.bench.cuda_precision path/to/model [--batches 1 16 64 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from handlers.encoder import load_encoder
from handlers.tools.sources import sts_pairs


def texts_per_second(encoder, texts: list[str], size: int, repeats: int) -> float:
    batch = encoder.tokenize([texts[i % len(texts)] for i in range(size)])
    encoder.encode_batch(batch)  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.encode_batch(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    pairs = sts_pairs()
    texts = [t for a, b, _ in pairs for t in (a, b)]
    encoders = {p: load_encoder(args.model, device="cuda", precision=p) for p in ("fp32", "bf16")}
    print(f"{torch.cuda.get_device_name()}; bf16 runs as {encoders['bf16'].precision.used}\n")
    print("| batch | fp32 texts/s | bf16 texts/s | bf16 / fp32 |\n|---:|---:|---:|---:|")
    for size in args.batches:
        rates = {p: texts_per_second(e, texts, size, args.repeats) for p, e in encoders.items()}
        print(f"| {size} | {rates['fp32']:.0f} | {rates['bf16']:.0f} | {rates['bf16'] / rates['fp32']:.2f} |")
    scores = {p: torch.tensor(e.score_pairs([(a, b) for a, b, _ in pairs])) for p, e in encoders.items()}
    drift = (scores["bf16"] - scores["fp32"]).abs()
    print(f"\nbf16 against fp32 over {len(pairs)} pairs: max |Δscore| {drift.max():.2e}, mean {drift.mean():.2e}")


if __name__ == "__main__":
    main()
