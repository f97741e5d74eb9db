"""Do explanations slow predictions down? Prediction latency and throughput beside explanation load.

    python -m scripts.bench.isolation                 # the pools and, for comparison, one shared pool
    python -m scripts.bench.isolation --seconds 10 --deployments pools
    python -m scripts.bench.isolation --deployments kserve --kserve-runtime onnx --kserve="--max_batch_delay_ms 0"

Builds the archives from the current code into a temporary model store and starts one real
TorchServe from config.properties serving both deployments (idle workers cost no CPU):

- **pools**: ``minilm`` (predictions; ``handlers.tools.archive`` defaults: 2 workers, batchSize 8,
  maxBatchDelay 2 ms) and ``minilm-explain`` (explanations: 1 worker of 1 thread at niceness 10, batchSize 4),
  built with ``siamese-archive minilm --pools``;
- **shared**: one archive with the same prediction settings that answers both, explanations sent
  to the prediction model itself;
- **kserve** (only when asked for): KServe's model server (``siamese-kserve``) with its explanation
  processes, ``--kserve`` options; ``--kserve-runtime onnx`` exports the graph and serves
  predictions from onnxruntime (``scripts/serve.sh --engine kserve --runtime onnx``).

For each deployment, in one run: ``--clients`` prediction clients (closed loop, one keep-alive
connection each, single pairs of data/sts_pairs.tsv) alone, then beside 1 and 2
explanation clients (closed loop; ij with the archive's default options; then lrp), each phase
``--seconds`` long after a one-second settle. It prints the predictions' p50/p95/p99 latency and
throughput, their ratios to the predictions-alone phase of the same deployment, and the
explanations answered per second. The goal: with one ij client on the pools, p99 at most 2x and
throughput at least 0.75x of predictions alone.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import shlex
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from handlers.serving.pools import explanation_model
from handlers.tools import archive as build_archive
from handlers.tools.export_onnx import export_source
from handlers.tools.local.kserve_engine import LocalKServe
from handlers.tools.local.torchserve import LocalTorchServe
from handlers.tools.sources import model_dir, sts_pairs
from scripts.bench.predictions import percentile

SETTLE_S = 1.0
P99_GOAL, THROUGHPUT_GOAL = 2.0, 0.75
LOADS: list[tuple[str, int]] = [("", 0), ("ij", 1), ("ij", 2), ("lrp", 1), ("lrp", 2)]


@dataclass
class Calls:
    """What the clients of one kind saw: (start, end, status) per request."""

    records: list[tuple[float, float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, start: float, end: float, status: int) -> None:
        with self.lock:
            self.records.append((start, end, status))

    def within(self, t0: float, t1: float) -> list[tuple[float, float, int]]:
        """The requests that started at or after ``t0`` and ended by ``t1``."""
        return [r for r in self.records if r[0] >= t0 and r[1] <= t1]


def client(url: str, bodies: list[bytes], offset: int, stop: threading.Event, calls: Calls) -> None:
    """Send ``bodies`` in turn, one at a time on one keep-alive connection, until ``stop``."""
    target = urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
    for i in itertools.count(offset):
        if stop.is_set():
            break
        start = time.perf_counter()
        connection.request("POST", target.path, bodies[i % len(bodies)], {"Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        calls.add(start, time.perf_counter(), reply.status)
    connection.close()


def phase(inference: str, prediction_model: str, explain_route: str, method: str, explainers: int,
          clients: int, seconds: float) -> dict:
    """One phase: ``clients`` prediction clients beside ``explainers`` clients of ``method``."""
    pairs = [(a, b) for a, b, _ in sts_pairs()]
    predictions = [json.dumps({"text_a": a, "text_b": b}).encode() for a, b in pairs]
    explanations = [json.dumps({"text_a": a, "text_b": b, "method": method}).encode() for a, b in pairs]
    stop, predicted, explained = threading.Event(), Calls(), Calls()
    threads = [threading.Thread(target=client, args=(f"{inference}/predictions/{prediction_model}",
                                                     predictions, 7 * i, stop, predicted))
               for i in range(clients)]
    threads += [threading.Thread(target=client, args=(f"{inference}/explanations/{explain_route}",
                                                      explanations, 11 * i, stop, explained))
                for i in range(explainers)]
    for thread in threads:
        thread.start()
    t0 = time.perf_counter() + SETTLE_S
    time.sleep(SETTLE_S + seconds)
    t1 = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join()
    window = predicted.within(t0, t1)
    latencies = [end - start for start, end, status in window if status == 200]
    done = [r for r in explained.records if r[1] <= t1]
    enough = len(latencies) >= 2
    return {
        "method": method,
        "explainers": explainers,
        "predictions_per_s": len(latencies) / (t1 - t0),
        **{f"p{q}_ms": 1000 * percentile(latencies, q) if enough else float("nan") for q in (50, 95, 99)},
        "prediction_errors": sum(status != 200 for _, _, status in window),
        "explanations_per_s": sum(status == 200 for _, _, status in done) / (t1 - t0 + SETTLE_S),
        "explanation_statuses": dict(Counter(str(status) for _, _, status in explained.records)),
    }


def parse_load(text: str) -> tuple[str, int]:
    """``-`` (predictions alone) or ``method:clients``."""
    if text == "-":
        return "", 0
    method, _, clients = text.partition(":")
    return method, int(clients or 1)


#: per deployment, the model that predictions go to and the one that explanations go to
ROUTES = {"pools": ("minilm", explanation_model("minilm")), "shared": ("shared", "shared"), "kserve": ("minilm", "minilm")}


def run(deployment: str, inference: str, clients: int, seconds: float, loads: list[tuple[str, int]]) -> list[dict]:
    prediction_model, explain_route = ROUTES[deployment]
    rows = []
    for method, explainers in loads:
        row = phase(inference, prediction_model, explain_route, method or "ij", explainers, clients, seconds)
        row.update(deployment=deployment, method=method or "-")
        rows.append(row)
        print(json.dumps(row), flush=True)
    alone = rows[0]
    for row in rows:
        row["p99_ratio"] = row["p99_ms"] / alone["p99_ms"]
        row["throughput_ratio"] = row["predictions_per_s"] / alone["predictions_per_s"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| deployment | explanation clients | predictions/s | p50 ms | p95 ms | p99 ms | p99 × alone "
        "| throughput × alone | explanations/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        load = "none" if not r["explainers"] else f"{r['explainers']} × {r['method']}"
        lines.append(
            f"| {r['deployment']} | {load} | {r['predictions_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['p99_ratio']:.2f} | {r['throughput_ratio']:.2f} "
            f"| {r['explanations_per_s']:.2f} |"
        )
    return "\n".join(lines)


def goal(rows: list[dict]) -> str:
    """The goal, for each deployment that keeps explanations apart (pools, kserve)."""
    lines = []
    for deployment in ("pools", "kserve"):
        row = next((r for r in rows if r["deployment"] == deployment and r["method"] == "ij" and r["explainers"] == 1), None)
        if row is None:
            continue
        met = row["p99_ratio"] <= P99_GOAL and row["throughput_ratio"] >= THROUGHPUT_GOAL and row["explanations_per_s"] > 0
        lines.append(f"goal ({deployment}, 1 ij client): p99 {row['p99_ratio']:.2f}x (<= {P99_GOAL}), throughput "
                     f"{row['throughput_ratio']:.2f}x (>= {THROUGHPUT_GOAL}), {row['explanations_per_s']:.2f} "
                     f"explanations/s: {'met' if met else 'NOT met'}")
    return "\n".join(lines) or "goal: not measured (no pools or kserve run)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    p.add_argument("--clients", type=int, default=4, help="prediction clients")
    p.add_argument("--deployments", nargs="+", choices=list(ROUTES), default=["pools", "shared"])
    p.add_argument("--kserve", default="", help="siamese-kserve options for the kserve deployment")
    p.add_argument("--kserve-runtime", choices=["torch", "onnx"], default="torch",
                   help="onnx: export the graph and serve the kserve deployment's predictions from onnxruntime")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--loads", nargs="+", default=[f"{m}:{n}" if n else "-" for m, n in LOADS],
                   help="the phases: - (predictions alone) or method:clients (default: %(default)s)")
    p.add_argument("--archive", nargs=argparse.REMAINDER, default=[],
                   help="more siamese-archive options for the pools (e.g. --explain-nice 19 --explain-threads 2)")
    args = p.parse_args()
    loads = [parse_load(text) for text in args.loads]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as store:
        served = [d for d in args.deployments if d != "kserve"]
        models = {}
        if "pools" in served:
            build_archive.build(build_archive.parser().parse_args(["minilm", "--pools", "--export-path", store, *args.archive]))
            models.update({"minilm": "minilm.mar", explanation_model("minilm"): f"{explanation_model('minilm')}.mar"})
        if "shared" in served:
            build_archive.build(build_archive.parser().parse_args(["minilm", "--name", "shared", "--export-path", store]))
            models["shared"] = "shared.mar"
        if served:
            with LocalTorchServe(models=models, model_store=store) as ts:
                rows += [row for deployment in served for row in run(deployment, ts.inference, args.clients, args.seconds, loads)]
        if "kserve" in args.deployments:
            options = shlex.split(args.kserve)
            if args.kserve_runtime == "onnx":
                options += ["--runtime", "onnx", "--onnx_file", str(export_source(model_dir("minilm"), Path(store) / "minilm.onnx"))]
            with LocalKServe(model_dir("minilm"), "minilm", options) as server:
                rows += run("kserve", server.inference, args.clients, args.seconds, loads)
    print(f"\n{args.clients} prediction clients, {args.seconds:g} s per phase; pools built with "
          f"{' '.join(['--pools', *args.archive])}; kserve: siamese-kserve {args.kserve} (runtime {args.kserve_runtime})\n")
    print(table(rows))
    print(f"\n{goal(rows)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
