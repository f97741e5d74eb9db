"""CPU throughput of predictions, torch against onnxruntime (fp32 and int8), and the int8 drift.

    python -m scripts.bench.onnx                      # minilm, shift mode, batches 1 16 64, 1 thread
    python -m scripts.bench.onnx --threads 2 --repeats 40
    python -m scripts.bench.onnx mpnet --repeats 10

Each batch of texts (from the shared STS pairs) is encoded the way predictions encode it
(``Encoder.encode_batch``: the texts' rows in one run, then the shift by the reference
embeddings, which each runtime computed once per length in the warm-up), once per runtime per round, with the runtimes' order rotating each round. The figures
are medians over rounds; ``speed-up`` is the median over rounds of torch's time divided by the
runtime's time in the same round, so that load from other processes during one round weighs on
both sides alike. Threads: ``--threads`` for torch and for each onnxruntime session, as the
handler sizes them for one worker (cores // workers: 1 for the default archive on 2 cores).
torch runs with its OpenMP library's default wait policy, as in the worker; the onnxruntime
sessions do not spin, as in the worker. ``OMP_WAIT_POLICY=PASSIVE`` or ``ACTIVE`` in the
environment changes torch's figures at 2 threads a lot (docs/performance.md: "ONNX predictions").

The drift table compares the scores of all STS pairs: onnxruntime fp32 and int8 against torch,
and the Spearman correlation of each with the pairs' gold similarity.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from handlers.encoder import Encoder, RowEmbedder, load_encoder
from handlers.serving.onnx_rows import OnnxRows
from handlers.tools.export_onnx import export, int8_name, quantize_int8
from handlers.tools.evaluation import pair_scores, spearman
from handlers.tools.sources import model_dir, sts_pairs


def runtimes(encoder: Encoder, onnx_file: Path, threads: int) -> dict[str, RowEmbedder]:
    return {
        "torch": encoder.embed_ids,
        "onnx fp32": OnnxRows(onnx_file, threads=threads),
        "onnx int8": OnnxRows(int8_name(onnx_file), threads=threads),
    }


def throughput(encoder: Encoder, rows: dict[str, RowEmbedder], texts: list[str], size: int, repeats: int) -> dict:
    """Median texts/s per runtime and median per-round speed-up over the first, for one batch size."""
    batch = encoder.tokenize([texts[i % len(texts)] for i in range(size)])
    names = list(rows)
    for name in names:  # warm-up: allocator, onnxruntime's first run
        encoder.encode_batch(batch, rows[name])
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            encoder.encode_batch(batch, rows[name])
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {
            "texts_per_s": size / statistics.median(seconds[name]),
            "speedup": statistics.median(t / r for t, r in zip(seconds[names[0]], seconds[name])),
        }
        for name in names
    }


def drift(encoder: Encoder, rows: dict[str, RowEmbedder], pairs: list[tuple[str, str, float]]) -> dict:
    gold = np.array([s for _, _, s in pairs])
    scores = {name: pair_scores(encoder, pairs, fn) for name, fn in rows.items()}
    return {
        name: {
            "max_abs": float(np.abs(s - scores["torch"]).max()),
            "mean_abs": float(np.abs(s - scores["torch"]).mean()),
            "spearman_gold": spearman(s, gold),
        }
        for name, s in scores.items()
    }


def report(source: str, args: argparse.Namespace, speed: dict[int, dict], drifts: dict, pairs: int) -> str:
    lines = [
        f"{source}, reference={args.reference}, {args.threads} thread(s), {args.repeats} rounds, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, CPU",
        "",
        "| batch | torch texts/s | onnx fp32 texts/s | speed-up | onnx int8 texts/s | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size, result in speed.items():
        fp32, int8 = result["onnx fp32"], result["onnx int8"]
        lines.append(
            f"| {size} | {result['torch']['texts_per_s']:.1f} | {fp32['texts_per_s']:.1f} | "
            f"{fp32['speedup']:.2f}× | {int8['texts_per_s']:.1f} | {int8['speedup']:.2f}× |"
        )
    lines += [
        "",
        f"Scores of the {pairs} STS pairs against torch:",
        "",
        "| runtime | max abs drift | mean abs drift | Spearman with gold |",
        "|---|---:|---:|---:|",
    ]
    for name, d in drifts.items():
        lines.append(f"| {name} | {d['max_abs']:.2e} | {d['mean_abs']:.2e} | {d['spearman_gold']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default="minilm", help="minilm, mpnet, or a local directory")
    p.add_argument("--reference", choices=["shift", "none"], default="shift")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=20, help="rounds per batch size")
    p.add_argument("--onnx", type=Path, help="an exported graph (with its .int8.onnx); default: export now")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    encoder = load_encoder(model_dir(args.source), reference=args.reference)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = args.onnx or export(encoder, Path(tmp) / "model.onnx")
        if not int8_name(onnx_file).exists():
            quantize_int8(onnx_file, int8_name(onnx_file))
        rows = runtimes(encoder, onnx_file, args.threads)
        pairs = sts_pairs()
        texts = [t for a, b, _ in pairs for t in (a, b)]
        speed = {size: throughput(encoder, rows, texts, size, args.repeats) for size in args.batches}
        print(report(args.source, args, speed, drift(encoder, rows, pairs), len(pairs)))


if __name__ == "__main__":
    main()
