"""Prediction throughput of the two engines in the same run: TorchServe and KServe's model server.

    python -m scripts.bench.engines --requests 400
    python -m scripts.bench.engines --requests 400 --rounds 3 --kserve --max_batch_delay_ms 5

Both serve the same model (minilm by default) from the current code: TorchServe the archive
built with handlers.tools.archive's defaults (2 workers of 1 torch thread, batchSize 8,
maxBatchDelay 2 ms) from config.properties, KServe's model server (``siamese-kserve``) with its
defaults (one process, predictions batched in a 2 ms collection window, one explanation process
at nice 10) plus the options after ``--kserve``. Both run at once, each idle while the other is
measured. Each request is one pair of data/sts_pairs.tsv as a KServe v1 body
(``{"instances": [pair]}`` to ``/v1/models/bench:predict``, a route both engines serve), sent
from 1, 4 and 16 client threads, one keep-alive connection each. ``--rounds`` repeats every
level, alternating which engine goes first; the table has the median round of each engine by
throughput (its pairs/s, p50 and p95) and the ratio of the medians. On a machine shared with
other work the throughput follows the load; two figures do not as much: the CPU time the
engine's processes spent per pair (server CPU ms/pair, all its processes) and the mean
requests per batch (the engines' ``siamese_batch_size``; KServe also reports the mean wait in
its collection window, ``siamese_queue_seconds``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

from handlers.tools import archive as build_archive
from handlers.tools.sources import model_dir
from scripts.bench.predictions import load_pairs, served_run
from handlers.tools.local.kserve_engine import LocalKServe
from handlers.tools.local.torchserve import LocalTorchServe

MODEL = "bench"


def v1_body(a: str, b: str) -> dict:
    return {"instances": [{"text_a": a, "text_b": b}]}


def process_cpu_s(pid: int) -> float:
    """User and system seconds of a process and all its descendants (still running)."""
    total = 0.0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def histogram_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the project's batch size and queue histograms on a /metrics page."""
    totals = {}
    for family in text_string_to_metric_families(requests.get(f"{metrics_url}/metrics", timeout=10).text):
        if family.name in ("siamese_batch_size", "siamese_queue_seconds"):
            sums = [s.value for s in family.samples if s.name.endswith("_sum")]
            counts = [s.value for s in family.samples if s.name.endswith("_count")]
            totals[family.name] = (sum(sums), sum(counts))
    return totals


def measured_run(url: str, pid: int, metrics_url: str, pairs, total: int, concurrency: int) -> dict:
    """``served_run`` with the server's CPU per pair, mean batch size and mean queue wait."""
    cpu, before = process_cpu_s(pid), histogram_totals(metrics_url)
    result = served_run(url, pairs, total, concurrency, body=v1_body)
    cpu, after = process_cpu_s(pid) - cpu, histogram_totals(metrics_url)
    warm_up = min(total, 2 * concurrency)  # served_run's, counted by the server too
    result["cpu_ms_per_pair"] = 1000 * cpu / (total + warm_up)
    for name, key in (("siamese_batch_size", "batch"), ("siamese_queue_seconds", "queue_ms")):
        if name in after:
            value_sum = after[name][0] - before.get(name, (0, 0))[0]
            count = after[name][1] - before.get(name, (0, 0))[1]
            result[key] = value_sum / count * (1000 if key == "queue_ms" else 1) if count else float("nan")
    return result


def median_round(rounds: list[dict]) -> dict:
    ordered = sorted(rounds, key=lambda r: r["pairs_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="minilm")
    p.add_argument("--requests", type=int, default=400, help="requests per engine, level and round")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--kserve", nargs=argparse.REMAINDER, default=[],
                   help="more siamese-kserve options (default: its own)")
    args = p.parse_args()
    pairs = load_pairs()
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as store:
        build_archive.build(build_archive.parser().parse_args([args.source, "--name", MODEL, "--export-path", store]))
        with LocalTorchServe(models={MODEL: f"{MODEL}.mar"}, model_store=store) as ts, \
                LocalKServe(model_dir(args.source), MODEL, args.kserve) as ks:
            servers = {"TorchServe": (ts.inference, ts.pid(), ts.metrics),
                       "KServe": (ks.inference, ks.pid(), ks.metrics)}
            for concurrency in args.concurrency:
                for round_ in range(args.rounds):
                    order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
                    for engine in order:
                        inference, pid, metrics = servers[engine]
                        url = f"{inference}/v1/models/{MODEL}:predict"
                        result = measured_run(url, pid, metrics, pairs, args.requests, concurrency)
                        results.setdefault((engine, concurrency), []).append(result)
                        print(f"{engine} {concurrency} clients round {round_ + 1}: {result['pairs_per_s']:.1f} pairs/s",
                              flush=True)
    print(f"\n{args.source}; {args.requests} single-pair v1 requests per engine, level and round; "
          f"{args.rounds} round(s); KServe options: {' '.join(args.kserve) or 'defaults'}\n")
    print("| clients | engine | pairs/s | p50 ms | p95 ms | server CPU ms/pair | requests/batch | window wait ms "
          "| KServe / TorchServe |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in args.concurrency:
        rounds = {engine: results[(engine, concurrency)] for engine in ("TorchServe", "KServe")}
        ratio = (statistics.median(r["pairs_per_s"] for r in rounds["KServe"])
                 / statistics.median(r["pairs_per_s"] for r in rounds["TorchServe"]))
        for engine, engine_rounds in rounds.items():
            r = median_round(engine_rounds)
            wait = f"{r['queue_ms']:.1f}" if "queue_ms" in r else ""
            print(f"| {concurrency} | {engine} | {r['pairs_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
                  f"| {r['cpu_ms_per_pair']:.1f} | {r.get('batch', float('nan')):.1f} | {wait} "
                  f"| {f'**{ratio:.2f}**' if engine == 'KServe' else ''} |")


if __name__ == "__main__":
    main()
