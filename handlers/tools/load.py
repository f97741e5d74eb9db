"""A bounded load on a TorchServe on this machine: mixed predictions and explanations from
concurrent clients, every answer checked against in-process values.

    python -m handlers.tools.load --requests 2000 --clients 32            # against a running server
    python -m handlers.tools.load --start --requests 2000 --clients 32    # starts its own (LocalTorchServe)

Only loopback addresses are accepted. The loop stops after ``--requests`` requests or
``--max-seconds``, whichever comes first. The bar: no 5xx, every request answered once with
its own right answer (predictions: the in-process score; explanations: the in-process score
and tokens), and the worker's resident memory before and after (reported).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EXPLAIN_OPTIONS = {"ij": {"layer": 4, "steps": 4}, "gae": {}, "lrp": {"normalization": "l2"}}


@dataclass(frozen=True)
class Job:
    """One request of the mix and what its answer must be."""

    kind: str  # pair, rank, v1, v2, ij, gae, lrp
    route: str
    body: dict
    expected: Any  # a score, a list of scores, or (score, tokens_a, tokens_b)


@dataclass
class Outcome:
    index: int
    kind: str
    status: int | None  # None: no HTTP answer (connection error or client timeout)
    correct: bool
    started: float
    seconds: float
    error: str = ""


@dataclass
class Report:
    scheduled: int = 0
    requests: int = 0
    wall_seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    wrong_answers: int = 0
    no_answer: int = 0
    server_errors: int = 0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    worker_rss_mb_before: dict[str, float] = field(default_factory=dict)
    worker_rss_mb_after: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.server_errors == 0 and self.wrong_answers == 0 and self.no_answer == 0


def require_loopback(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOOPBACK and not (host or "").startswith("127."):
        raise SystemExit(f"{url}: the load test only targets loopback addresses")
    return url.rstrip("/")


def job_pool(encoder, pairs: list[tuple[str, str]], model: str) -> list[Job]:
    """Every kind of request over ``pairs``, with the in-process answers."""
    from handlers.attribution import explain

    scores = encoder.score_pairs(pairs)
    jobs = []
    for (a, b), score in zip(pairs, scores):
        jobs.append(Job("pair", f"predictions/{model}", {"text_a": a, "text_b": b}, score))
        jobs.append(Job("v1", f"v1/models/{model}:predict", {"instances": [{"text_a": a, "text_b": b}]}, score))
        v2 = {"inputs": [{"name": n, "datatype": "BYTES", "shape": [1], "data": [t]} for n, t in (("text_a", a), ("text_b", b))]}
        jobs.append(Job("v2", f"v2/models/{model}/infer", v2, score))
    for i in range(0, len(pairs) - 3, 4):
        query, candidates = pairs[i][0], [b for _, b in pairs[i : i + 4]]
        jobs.append(Job("rank", f"predictions/{model}", {"query": query, "candidates": candidates},
                        encoder.score_pairs([(query, c) for c in candidates])))
    for (a, b) in pairs[:6]:
        for method, options in EXPLAIN_OPTIONS.items():
            answer = explain(encoder, a, b, method=method, **options)
            body = {"text_a": a, "text_b": b, "method": method, **options}
            jobs.append(Job(method, f"explanations/{model}", body, (answer["score"], answer["tokens_a"], answer["tokens_b"])))
    return jobs


def is_correct(job: Job, answer: Any, tolerance: float = 1e-4) -> bool:
    close = lambda x, y: abs(x - y) <= tolerance  # noqa: E731
    if job.kind in ("pair",):
        return close(answer["score"], job.expected)
    if job.kind == "v1":
        return close(answer["predictions"][0]["score"], job.expected)
    if job.kind == "v2":
        return close(answer["outputs"][0]["data"][0], job.expected)
    if job.kind == "rank":
        return len(answer["scores"]) == len(job.expected) and all(map(close, answer["scores"], job.expected))
    score, tokens_a, tokens_b = job.expected
    return close(answer["score"], score) and answer["tokens_a"] == tokens_a and answer["tokens_b"] == tokens_b


def worker_rss_mb(management: str, model: str, headers: dict[str, str]) -> dict[str, float]:
    """Resident memory (VmRSS) of each READY worker of ``model``, by PID."""
    reply = requests.get(f"{management}/models/{model}", headers=headers, timeout=30)
    reply.raise_for_status()
    rss = {}
    for worker in reply.json()[0]["workers"]:
        status = Path(f"/proc/{worker['pid']}/status")
        if worker["status"] == "READY" and status.exists():
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
            rss[str(worker["pid"])] = int(line.split()[1]) / 1024
    return rss


def send(inference: str, job: Job, index: int, headers: dict[str, str], timeout: float) -> Outcome:
    started = time.perf_counter()
    try:
        reply = requests.post(f"{inference}/{job.route}", json=job.body, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        return Outcome(index, job.kind, None, False, started, time.perf_counter() - started, type(exc).__name__)
    seconds = time.perf_counter() - started
    try:
        correct = reply.status_code == 200 and is_correct(job, reply.json())
    except (ValueError, KeyError, IndexError, TypeError):
        correct = False
    return Outcome(index, job.kind, reply.status_code, correct, started, seconds, "" if correct else reply.text[:200])


def run_load(inference: str, jobs: list[Job], total: int, clients: int, max_seconds: float,
             headers: dict[str, str] | None = None, seed: int = 0, timeout: float = 120,
             on_outcome=None) -> list[Outcome]:
    """Send ``total`` jobs drawn from ``jobs`` from ``clients`` threads; stop early at ``max_seconds``."""
    inference = require_loopback(inference)
    schedule = random.Random(seed).choices(jobs, k=total)
    deadline = time.perf_counter() + max_seconds
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        if time.perf_counter() > deadline:
            return
        outcome = send(inference, schedule[index], index, headers or {}, timeout)
        with lock:
            outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(total)))
    return sorted(outcomes, key=lambda o: o.index)


def summarize(outcomes: list[Outcome], scheduled: int, wall: float) -> Report:
    report = Report(scheduled=scheduled, requests=len(outcomes), wall_seconds=round(wall, 1))
    for o in outcomes:
        key = str(o.status) if o.status is not None else "none"
        report.statuses[key] = report.statuses.get(key, 0) + 1
    report.no_answer = sum(o.status is None for o in outcomes)
    report.server_errors = sum(o.status is not None and o.status >= 500 for o in outcomes)
    report.wrong_answers = sum(o.status == 200 and not o.correct for o in outcomes)
    for kind in sorted({o.kind for o in outcomes}):
        times = sorted(o.seconds * 1000 for o in outcomes if o.kind == kind)
        report.latency_ms[kind] = {
            "n": len(times), "p50": round(times[len(times) // 2], 1), "p95": round(times[int(len(times) * 0.95)], 1),
        }
    return report


def grpc_ports() -> dict[str, str]:
    """Free gRPC ports, so that a started server runs beside others."""
    from handlers.tools.local.torchserve import free_port

    return {"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference", default="http://127.0.0.1:8080")
    p.add_argument("--management", default="http://127.0.0.1:8081")
    p.add_argument("--model", default="minilm")
    p.add_argument("--start", action="store_true",
                   help="build the archive from the current code and start a TorchServe from --config")
    p.add_argument("--config", default="config.properties", help="with --start")
    p.add_argument("--key-file", help="TorchServe's key_file.json when token authorization is on")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=1200)
    p.add_argument("--pairs", type=int, default=40, help="distinct sentence pairs in the mix")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)

    from handlers import load_encoder
    from handlers.tools.sources import ROOT, model_dir, sts_pairs

    encoder = load_encoder(model_dir("minilm"), reference="shift", similarity="cos")
    pairs = [(a, b) for a, b, _ in sts_pairs()][: args.pairs]
    jobs = job_pool(encoder, pairs, args.model)

    server = None
    if args.start:
        import tempfile

        from handlers.tools import archive as build_archive
        from handlers.tools.local.torchserve import LocalTorchServe

        store = Path(tempfile.mkdtemp(prefix="load-store-"))
        # fp32 predictions: answers checked to 1e-4 against the in-process (fp32) encoder
        build_archive.build(build_archive.parser().parse_args(
            ["minilm", "--name", args.model, "--precision", "fp32", "--export-path", str(store)]))
        server = LocalTorchServe(models={args.model: f"{args.model}.mar"}, model_store=store, config=ROOT / args.config,
                                 overrides=grpc_ports()).start()
        args.inference, args.management = server.inference, server.management
        args.key_file = args.key_file or (str(server.workdir / "key_file.json")
                                          if (server.workdir / "key_file.json").exists() else None)
    try:
        inference, management = require_loopback(args.inference), require_loopback(args.management)
        keys = json.loads(Path(args.key_file).read_text()) if args.key_file else None
        inference_headers = {"Authorization": f"Bearer {keys['inference']['key']}"} if keys else {}
        management_headers = {"Authorization": f"Bearer {keys['management']['key']}"} if keys else {}
        run_load(inference, jobs, min(len(jobs), 64), 8, 300, inference_headers)  # warm-up, not counted
        before = worker_rss_mb(management, args.model, management_headers)
        start = time.perf_counter()
        outcomes = run_load(inference, jobs, args.requests, args.clients, args.max_seconds, inference_headers)
        report = summarize(outcomes, args.requests, time.perf_counter() - start)
        report.worker_rss_mb_before = before
        report.worker_rss_mb_after = worker_rss_mb(management, args.model, management_headers)
    finally:
        if server is not None:
            server.stop()
    text = json.dumps({**asdict(report), "passed": report.passed}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    for o in outcomes:
        if o.status != 200 or not o.correct:
            print(f"request {o.index} ({o.kind}): {o.status} {o.error}", file=sys.stderr)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
