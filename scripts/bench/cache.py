"""A repeated explanation, end to end: the first request computes it, the repeats are answered
from the worker's explanation cache. Client-side times over HTTP, on both engines.

    python -m scripts.bench.cache [--repeats 50]

TorchServe serves the default archives (``siamese-archive minilm --pools``: the explanation
pool has ``cache_mb`` 64 and ``maxBatchDelay`` 2 ms) from config.properties; KServe's model
server runs ``siamese-kserve`` with its defaults (a 2 ms collection window). Each method is asked
once to fill the cache, then ``--repeats`` times, one at a time on one keep-alive connection;
then the whole round again, which is kept for the repeats (a warm server).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import statistics
import tempfile
import time
from urllib.parse import urlsplit

from handlers.tools import archive as build_archive
from handlers.tools.local.kserve_engine import LocalKServe
from handlers.tools.local.torchserve import LocalTorchServe
from handlers.tools.sources import model_dir
from scripts.bench.predictions import percentile

PAIR = {"text_a": "A man is playing a guitar on a small stage.", "text_b": "Someone plays music for a crowd."}
METHODS = {"ij": {}, "gae": {}, "lrp": {}}


def repeated(url: str, repeats: int) -> dict[str, dict]:
    """Two rounds over the methods; the second is kept (a warm server: its first request for a
    method is then a hit too, and the first round's first computation is what ``first_ms`` shows)."""
    target = urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
    first = one_round(connection, target.path, repeats)
    warm = one_round(connection, target.path, repeats, filled=True)
    return {method: {**warm[method], "first_ms": first[method]["first_ms"]} for method in METHODS}


def one_round(connection: http.client.HTTPConnection, path: str, repeats: int, filled: bool = False) -> dict[str, dict]:
    rows = {}
    for method, options in METHODS.items():
        body = json.dumps({**PAIR, "method": method, **options})
        times, cached = [], []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            answer = json.loads(reply.read())
            times.append(1000 * (time.perf_counter() - start))
            assert reply.status == 200, answer
            cached.append(answer["cached"])
        assert cached[0] is filled and all(cached[1:]), cached
        rows[method] = {"first_ms": times[0], "repeat_p50_ms": statistics.median(times[1:]),
                        "repeat_p99_ms": percentile(times[1:], 99)}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as store:
        build_archive.build(build_archive.parser().parse_args(["minilm", "--pools", "--export-path", store]))
        with LocalTorchServe(models={"minilm": "minilm.mar", "minilm-explain": "minilm-explain.mar"}, model_store=store) as ts:
            results["TorchServe"] = repeated(f"{ts.inference}/explanations/minilm-explain", args.repeats)
    with LocalKServe(model_dir("minilm"), "minilm") as ks:
        results["KServe model server"] = repeated(f"{ks.inference}/explanations/minilm", args.repeats)
    print(f"\n{datetime.date.today()}, load {os.getloadavg()[0]:.2f} after; {args.repeats} repeats a method\n")
    print("| engine | method | first ms | repeat p50 ms | repeat p99 ms |")
    print("|---|---|---:|---:|---:|")
    for engine, rows in results.items():
        for method, row in rows.items():
            print(f"| {engine} | {method} | {row['first_ms']:.0f} | {row['repeat_p50_ms']:.1f} | {row['repeat_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
