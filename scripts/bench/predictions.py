"""Prediction throughput through TorchServe against in-process sentence-transformers.

    python -m scripts.bench.predictions --requests 400
    python -m scripts.bench.predictions --requests 400 --archive --reference none --workers 1

Builds the archive from the current code into a temporary model store (handlers.tools.archive's
defaults: 2 workers, dynamic batching with batchSize 4 and maxBatchDelay 1 ms; ``--archive``
passes other options), starts a real TorchServe from config.properties and log4j2.xml, and
sends the pairs of data/sts_pairs.tsv as single-pair requests from 1, 4 and 16
concurrent client threads on loopback, each thread on one keep-alive connection. In the same run it times sentence-transformers encoding the
same pairs in-process (both texts of each pair, batch size 32), and prints a Markdown table:
pairs/s, p50 and p95 latency, and the ratio to in-process throughput.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from urllib.parse import urlsplit

import torch

from handlers.tools import archive as build_archive
from handlers.tools.local.torchserve import LocalTorchServe
from handlers.tools.sources import model_dir, sts_pairs
from scripts.bench.tables import markdown


def load_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a, b, _ in sts_pairs()]


def in_process_pairs_per_second(source: str, pairs: list[tuple[str, str]], total: int) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir(source)), device="cpu")
    work = [pairs[i % len(pairs)] for i in range(total)]
    model.encode([t for p in work[:32] for t in p], batch_size=32)  # warm-up
    start = time.perf_counter()
    model.encode([t for p in work for t in p], batch_size=32)
    return total / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def plain_body(a: str, b: str) -> dict:
    return {"text_a": a, "text_b": b}


def pair_request(url: str, pairs: list[tuple[str, ...]], body=plain_body) -> Callable[[int], None]:
    """Request ``i`` posts pair ``i`` (cycling, as ``body(a, b)``; any tuple of texts, as
    ``body(*texts)``) on its thread's keep-alive connection."""
    target = urlsplit(url)
    bodies = [json.dumps(body(*pair)).encode() for pair in pairs]
    local = threading.local()

    def one(i: int) -> None:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        connection.request("POST", target.path, bodies[i % len(bodies)], {"Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"request {i}: HTTP {reply.status}")

    return one


def timed_load(request: Callable[[int], None], total: int, concurrency: int, warm_up: bool = True) -> dict:
    """``total`` calls of ``request`` from ``concurrency`` threads: pairs/s, p50 and p95 latency,
    the wall time and the latencies themselves (seconds)."""
    latencies: list[float] = []

    def timed(i: int) -> None:
        start = time.perf_counter()
        request(i)
        latencies.append(time.perf_counter() - start)

    with ThreadPoolExecutor(concurrency) as pool:
        if warm_up:
            list(pool.map(timed, range(min(total, 2 * concurrency))))
            latencies.clear()
        start = time.perf_counter()
        list(pool.map(timed, range(total)))
        wall = time.perf_counter() - start
    return {
        "pairs_per_s": total / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * percentile(latencies, 95),
        "wall_s": wall,
        "latencies": latencies,
    }


def served_run(url: str, pairs: list[tuple[str, str]], total: int, concurrency: int, body=plain_body) -> dict:
    """Single-pair requests (``body(a, b)``) from ``concurrency`` threads, each on one keep-alive
    connection."""
    return timed_load(pair_request(url, pairs, body), total, concurrency)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="minilm")
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--archive", nargs=argparse.REMAINDER, default=[],
                   help="more handlers.tools.archive options (default: its own: --workers, --batch-size, ...)")
    args = p.parse_args()
    pairs = load_pairs()
    with tempfile.TemporaryDirectory() as store:
        build_args = build_archive.parser().parse_args([args.source, "--name", "bench", "--export-path", store, *args.archive])
        build_archive.build(build_args)
        with LocalTorchServe(models={"bench": "bench.mar"}, model_store=store) as ts:
            url = f"{ts.inference}/predictions/bench"
            rows = []
            for concurrency in args.concurrency:
                baseline = in_process_pairs_per_second(args.source, pairs, args.requests)
                served = served_run(url, pairs, args.requests, concurrency)
                rows.append((concurrency, served, baseline))
    print(f"\n{args.source}, reference {build_args.reference}, {build_args.workers} workers, batchSize "
          f"{build_args.batch_size}, maxBatchDelay {build_args.max_batch_delay} ms; {args.requests} single-pair "
          f"requests per level; in-process torch threads {torch.get_num_threads()}\n")
    print(markdown(["clients", "TorchServe pairs/s", "p50 ms", "p95 ms", "in-process pairs/s", "ratio"], [
        [str(concurrency), f"{served['pairs_per_s']:.1f}", f"{served['p50_ms']:.1f}", f"{served['p95_ms']:.1f}",
         f"{baseline:.1f}", f"{served['pairs_per_s'] / baseline:.2f}"]
        for concurrency, served, baseline in rows
    ]))


if __name__ == "__main__":
    main()
