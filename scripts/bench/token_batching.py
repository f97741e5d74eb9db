"""Token-aware batching against count-only batching on KServe's model server, on a mix of short
and long pairs.

    python -m scripts.bench.token_batching [--requests 600] [--clients 16] [--max-batch-tokens 512]

The mix: 1 pair in 10 has two texts of 256 tokens, the others are STS pairs (about 10–20 tokens
a text). One keep-alive connection per client, plain pair bodies to ``/predictions/minilm``.
Each server is ``siamese-kserve`` with its defaults (batches of at most 8 requests, a 2 ms
window, 2 prediction threads), once as it is and once with ``--max_batch_tokens``; ``--rounds``
alternates them. Printed per round: pairs/s, and p50 and p99 of the short and of the long
requests.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from transformers import AutoTokenizer

from handlers.tools.local.kserve_engine import LocalKServe
from handlers.tools.sources import model_dir, sts_pairs, text_of_length
from scripts.bench.predictions import percentile
from scripts.bench.tables import markdown

MODEL = "minilm"


def mix(count: int) -> list[tuple[bool, bytes]]:
    """(long?, body) for ``count`` requests: every tenth a pair of 256-token texts."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(MODEL)))
    short = [(a, b) for a, b, _ in sts_pairs()]
    bodies = []
    for i in range(count):
        if i % 10 == 9:
            pair, long = (text_of_length(tokenizer, 256, i), text_of_length(tokenizer, 256, i + 500)), True
        else:
            pair, long = short[i % len(short)], False
        bodies.append((long, json.dumps({"text_a": pair[0], "text_b": pair[1]}).encode()))
    return bodies


def run(url: str, bodies: list[tuple[bool, bytes]], clients: int) -> dict:
    target = urlsplit(url)
    local = threading.local()
    times: list[tuple[bool, float]] = []

    def one(i: int) -> None:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        long, body = bodies[i]
        start = time.perf_counter()
        connection.request("POST", target.path, body, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}")
        times.append((long, time.perf_counter() - start))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(min(len(bodies), 2 * clients))))  # warm-up
        times.clear()
        start = time.perf_counter()
        list(pool.map(one, range(len(bodies))))
        wall = time.perf_counter() - start
    short = [1000 * t for long, t in times if not long]
    long = [1000 * t for long, t in times if long]
    return {"pairs_per_s": len(bodies) / wall, "short_p50": statistics.median(short), "short_p99": percentile(short, 99),
            "long_p50": statistics.median(long), "long_p99": percentile(long, 99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    bodies = mix(args.requests)
    rows = []
    for round_ in range(args.rounds):
        settings = [("count only", []), (f"≤ {args.max_batch_tokens} tokens", ["--max_batch_tokens", str(args.max_batch_tokens)])]
        for name, options in settings if round_ % 2 == 0 else settings[::-1]:
            with LocalKServe(model_dir(MODEL), MODEL, options) as server:
                result = run(f"{server.inference}/predictions/{MODEL}", bodies, args.clients)
            rows.append((round_ + 1, name, result))
            print(rows[-1], flush=True)
    print(f"\n{datetime.date.today()}, load {os.getloadavg()[0]:.2f} after; {args.requests} requests "
          f"(1 in 10 of 2 × 256 tokens), {args.clients} clients\n")
    print(markdown(["round", "batches", "pairs/s", "short p50 ms", "short p99 ms", "long p50 ms", "long p99 ms"], [
        [str(round_), name, f"{r['pairs_per_s']:.1f}", f"{r['short_p50']:.0f}", f"{r['short_p99']:.0f}",
         f"{r['long_p50']:.0f}", f"{r['long_p99']:.0f}"]
        for round_, name, r in rows
    ], align="rlrrrrr"))


if __name__ == "__main__":
    main()
