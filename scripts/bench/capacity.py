"""Per-replica figures for the capacity planner (``siamese-capacity``), and a check of its plan
against replicas behind a real load balancer.

    python -m scripts.bench.capacity measure            # writes handlers/tools/capacity_figures.json
    python -m scripts.bench.capacity check --p99-ms 250 # 1 and 2 replicas behind haproxy, against the plan

A replica is KServe's model server (``siamese-kserve``) with minilm, pinned to ``--cores`` cores
(taskset) with as many torch threads, as the manifests run it: the predictor with
``--explain_workers 0``, the explainer with one explanation process.

- ``measure``: the predictor's throughput and p99 at 1, 2, 4, 8 and 16 requests in flight,
  through haproxy as a pod is reached through Knative's proxy (single pairs of
  data/sts_pairs.tsv as KServe v1 bodies, one keep-alive connection per client; the median of
  ``--rounds`` runs by throughput, since one run on a shared machine varies by a third); the
  explainer's seconds per explanation, mean and p99, per method with its defaults, one at a time
  over the same pairs; each replica's peak resident memory (all its processes).
- ``check``: the plan for ``--p99-ms`` gives c requests in flight per replica and X(c) pairs/s.
  It starts 1, then 2 predictor replicas (on cores 0 and 1) behind haproxy (``balance leastconn``,
  ``maxconn`` c per replica, as ``containerConcurrency`` caps a pod), sends from replicas × c
  clients, and prints the measured throughput and p99 beside the plan's. The clients and haproxy
  run on the same cores as the replicas.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

from handlers.serving.settings import ExplanationSettings
from handlers.tools import capacity
from handlers.tools.local.kserve_engine import LocalKServe
from handlers.tools.local.torchserve import free_port
from handlers.tools.sources import model_dir
from scripts.bench.predictions import load_pairs, pair_request, percentile, timed_load

MODEL = "minilm"
LEVELS = (1, 2, 4, 8, 16)


def v1_body(a: str, b: str) -> dict:
    return {"instances": [{"text_a": a, "text_b": b}]}


def replica(cores: str, explain: bool) -> LocalKServe:
    threads = str(len(cores.split(",")))
    options = (["--explain_workers", "1", "--explain_threads", threads, "--explain_nice", "0"] if explain
               else ["--explain_workers", "0", "--prediction_threads", "1", "--torch_threads", threads])
    return LocalKServe(model_dir(MODEL), MODEL, options, cpus=cores)


class PeakMemory:
    """The peak resident memory of a process and its children, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mib, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak_mib = max(self.peak_mib, rss / 2**20)
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def median_run(url: str, pairs: list[tuple[str, str]], total: int, concurrency: int, rounds: int) -> dict:
    """``rounds`` closed-loop runs at ``concurrency``: the median one by throughput, with its p99."""
    runs = [timed_load(pair_request(url, pairs, v1_body), total, concurrency) for _ in range(rounds)]
    run = sorted(runs, key=lambda r: r["pairs_per_s"])[len(runs) // 2]
    return {"pairs_per_s": round(run["pairs_per_s"], 1), "p50_ms": round(run["p50_ms"], 1),
            "p99_ms": round(1000 * percentile(run["latencies"], 99), 1),
            "rounds_pairs_per_s": [round(r["pairs_per_s"], 1) for r in runs]}


def measure_predictor(cores: str, requests: int, rounds: int) -> dict:
    """Through haproxy, as the pods are reached through a proxy (Knative's queue-proxy)."""
    pairs = load_pairs()
    with replica(cores, explain=False) as server, PeakMemory(server.pid()) as memory:
        proxy, port, folder = balanced([server.port], max(LEVELS))
        try:
            url = f"http://127.0.0.1:{port}/v1/models/{MODEL}:predict"
            levels = []
            for concurrency in LEVELS:
                run = median_run(url, pairs, max(requests, 20 * concurrency), concurrency, rounds)
                levels.append({"concurrency": concurrency, **run})
                print(levels[-1], flush=True)
        finally:
            stop_proxy(proxy, folder)
    return {"cpu": len(cores.split(",")), "rss_mib": round(memory.peak_mib), "levels": levels}


def measure_explainer(cores: str, per_method: int) -> dict:
    pairs = load_pairs()
    seconds, p99 = {}, {}
    with replica(cores, explain=True) as server, PeakMemory(server.pid()) as memory:
        url = f"{server.inference}/v1/models/{MODEL}:explain"
        for method in capacity.METHODS:
            request = pair_request(url, pairs, lambda a, b, m=method: {"instances": [{"text_a": a, "text_b": b, "method": m}]})
            run = timed_load(request, per_method, 1)
            seconds[method] = round(statistics.mean(run["latencies"]), 3)
            p99[method] = round(percentile(run["latencies"], 99), 3)
            print(method, seconds[method], p99[method], flush=True)
    return {"cpu": len(cores.split(",")), "rss_mib": round(memory.peak_mib),
            "memory_budget_mib": ExplanationSettings().memory_budget_mb, "seconds": seconds, "p99_seconds": p99}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "cpu")
    return f"{os.cpu_count()}-core {cpu}, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()}"


def measure(args: argparse.Namespace) -> None:
    """Measure a replica and write its figures under ``--device`` (the others are kept)."""
    load = os.getloadavg()[0]
    path = capacity.FIGURES
    figures = capacity.load_figures(path) if path.exists() else {
        "command": "python -m scripts.bench.capacity measure",
        "replica": "KServe's model server (siamese-kserve), minilm, default precision, pinned to its cores",
        "devices": {},
    }
    figures["devices"][args.device] = {
        "measured": datetime.date.today().isoformat(),
        "machine": machine(),
        "load": f"1-minute load average {load:.2f} before the run",
        "predictor": measure_predictor(args.cores, args.requests, args.rounds),
        "explainer": measure_explainer(args.cores, args.explanations),
    }
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}")


HAPROXY = """global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout queue 300s
    option http-no-delay
frontend replicas
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
{servers}
"""


def balanced(ports: list[int], per_replica: int) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="haproxy-"))
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} maxconn {per_replica}" for i, p in enumerate(ports))
    (folder / "haproxy.cfg").write_text(HAPROXY.format(port=port, servers=servers))
    process = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(folder / "haproxy.cfg")])
    time.sleep(1)
    return process, port, folder


def stop_proxy(process: subprocess.Popen, folder: Path) -> None:
    process.terminate()
    process.wait()
    shutil.rmtree(folder, ignore_errors=True)


def check(args: argparse.Namespace) -> None:
    figures = capacity.load_figures()
    pairs = load_pairs()
    rows = []
    for count in (1, 2):
        # the plan for a rate that needs `count` replicas exactly: count × utilization × X(c)
        one = capacity.plan(0, {}, args.p99_ms, figures=figures).predictor
        per_replica = one.container_concurrency
        planned_rate = count * capacity.UTILIZATION * one.expected["pairs_per_s_per_replica"]
        plan = capacity.plan(planned_rate, {}, args.p99_ms, figures=figures).predictor
        assert plan.replicas == count, (plan.replicas, count)
        servers = [replica(str(core), explain=False).start() for core in range(count)]
        proxy, port, folder = balanced([s.port for s in servers], per_replica)
        try:
            url = f"http://127.0.0.1:{port}/v1/models/{MODEL}:predict"
            clients = count * per_replica
            run = median_run(url, pairs, max(args.requests, 30 * clients), clients, args.rounds)
        finally:
            stop_proxy(proxy, folder)
            for server in servers:
                server.stop()
        rows.append((count, clients, count * one.expected["pairs_per_s_per_replica"], one.expected["p99_ms"],
                     run["pairs_per_s"], run["p99_ms"]))
        print(rows[-1], flush=True)
    print(f"\n--p99-ms {args.p99_ms:g}; {datetime.date.today()}, {machine()}, load {os.getloadavg()[0]:.2f} after\n")
    print("| replicas | clients | planned pairs/s | measured pairs/s | ratio | planned p99 ms | measured p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count, clients, planned, planned_p99, measured, measured_p99 in rows:
        print(f"| {count} | {clients} | {planned:.0f} | {measured:.0f} | {measured / planned:.2f} | {planned_p99:.0f} | {measured_p99:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--cores", default="0", help="the replica's cores (taskset list)")
    m.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="which figures these are")
    m.add_argument("--requests", type=int, default=300, help="predictions per level (at least 20 per client)")
    m.add_argument("--explanations", type=int, default=20, help="explanations per method")
    m.add_argument("--rounds", type=int, default=3, help="runs per level; the median by throughput is kept")
    c = sub.add_parser("check")
    c.add_argument("--p99-ms", type=float, default=250)
    c.add_argument("--requests", type=int, default=600)
    c.add_argument("--rounds", type=int, default=3, help="runs per replica count; the median by throughput")
    args = p.parse_args()
    (measure if args.command == "measure" else check)(args)


if __name__ == "__main__":
    main()
