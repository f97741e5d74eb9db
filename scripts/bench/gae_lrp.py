"""Cost of gae and lrp explanations relative to a prediction of the same pair, in one run.

    python -m scripts.bench.gae_lrp --model minilm --pairs 20 --repeat 5

For each pair of data/sts_pairs.tsv it times a prediction of the pair
(``predict_items``), a gae and an lrp explanation of both sides, and an lrp explanation with
the token×token matrix (``"pairwise": true``), in-process through the calls the handler makes.
The calls are interleaved so that other load on the machine hits every method alike: each
round times every call once, and the fastest round of each call counts. It also times one batch
of ``--batch`` pairs per method (the requests of a TorchServe batch are computed together). It
prints a Markdown table of median milliseconds and the median of the per-pair ratios to the
prediction, by the wall clock and by the process's CPU time (steadier on a shared machine:
another process's load does not count); the requirement is a ratio of at most 4 for gae and lrp.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from handlers.attribution import GAE, LRP
from handlers.encoder import Encoder, load_encoder
from handlers.serving.predictions import predict_items
from handlers.serving.protocol import PairItem
from handlers.tools.sources import model_dir, sts_pairs

METHODS = {"gae": (GAE, GAE.Options()), "lrp": (LRP, LRP.Options()), "lrp pairwise": (LRP, LRP.Options(pairwise=True))}


Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(call: Callable[[], object]) -> dict[str, float]:
    """Milliseconds of one call by the wall clock and by the process's CPU time (all threads)."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    call()
    return {name: (clock() - start[name]) * 1000.0 for name, clock in CLOCKS.items()}


def _calls(encoder: Encoder, pairs: list[tuple[str, str]]) -> dict[str, Callable[[], object]]:
    predict = [PairItem(text_a=a, text_b=b) for a, b in pairs]
    calls: dict[str, Callable[[], object]] = {"prediction": lambda: predict_items(encoder, predict)}
    for name, (method, options) in METHODS.items():
        instance = method(encoder)
        calls[name] = lambda instance=instance, options=options: instance.attribute(pairs, options)
    return calls


def fastest(calls: dict[str, Callable[[], object]], repeat: int) -> dict[str, dict[str, float]]:
    """Per call and clock, the fastest of ``repeat`` rounds; each round times every call once, in turn."""
    rounds = [{name: _timed(call) for name, call in calls.items()} for _ in range(repeat)]
    return {name: {c: min(r[name][c] for r in rounds) for c in CLOCKS} for name in calls}


def measure(encoder: Encoder, pairs: list[tuple[str, str]], repeat: int, batch: int) -> list[dict]:
    """Per method and clock: median ms of one pair, median and max of the per-pair ratios to the
    prediction, and the ms and ratio of one batch of ``batch`` pairs."""
    single: dict[str, list[dict[str, float]]] = {}
    for pair in pairs:
        calls = _calls(encoder, [pair])
        for call in calls.values():  # warm-up of this length
            call()
        for name, ms in fastest(calls, repeat).items():
            single.setdefault(name, []).append(ms)
    batched = fastest(_calls(encoder, pairs[:batch]), repeat)
    rows = []
    for name, times in single.items():
        row: dict = {"method": name}
        for c in CLOCKS:
            ratios = [t[c] / p[c] for t, p in zip(times, single["prediction"])]
            row[c] = {
                "pair_ms": statistics.median(t[c] for t in times),
                "ratio": statistics.median(ratios),
                "max_ratio": max(ratios),
                "batch_ms": batched[name][c],
                "batch_ratio": batched[name][c] / batched["prediction"][c],
            }
        rows.append(row)
    return rows


def table(rows: list[dict], batch: int) -> str:
    lines = [
        f"| method | clock | ms per pair (median) | × prediction (median, max) | ms per batch of {batch} | × prediction |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for c in CLOCKS:
            m = r[c]
            lines.append(
                f"| {r['method']} | {c} | {m['pair_ms']:.1f} | {m['ratio']:.2f} ({m['max_ratio']:.2f}) "
                f"| {m['batch_ms']:.1f} | {m['batch_ratio']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--reference", default="shift", choices=["shift", "none"])
    parser.add_argument("--similarity", default="cos", choices=["cos", "dot"])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5, help="rounds per pair; the fastest counts")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = load_encoder(model_dir(args.model), reference=args.reference, similarity=args.similarity)
    pairs = [(a, b) for a, b, _ in sts_pairs()[: args.pairs]]
    rows = measure(encoder, pairs, args.repeat, args.batch)
    print(
        f"{args.model}, reference {args.reference}, {args.similarity}, {len(pairs)} pairs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(table(rows, args.batch))


if __name__ == "__main__":
    main()
