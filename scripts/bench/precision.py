"""bf16 predictions against fp32 and ONNX, in-process and served beside infinity-emb, in one run.

    python -m scripts.bench.precision                               # minilm: speed, quality, served
    python -m scripts.bench.precision mpnet --parts speed quality   # another model, in-process only
    python -m scripts.bench.precision --parts served --serve default= "b4=--batch-size 4" --no-peer
    python -m scripts.bench.precision --parts served --serve default= --texts 0 1 32   # pairs and embeddings

Parts (each a Markdown table; figures of one table are taken in the same run, interleaved):

- ``speed``: texts/s of ``Encoder.encode_batch`` at batch 1, 16 and 64 (texts of the STS pairs),
  ``--threads`` torch and onnxruntime threads (1: what each worker of the default archive runs),
  for fp32, bf16 (bf16 Linear weights under autocast: what ``precision: bf16`` runs), plain
  autocast over the fp32 weights (the alternative it was chosen over), ONNX fp32 and ONNX int8.
  Rounds rotate the order; the speed-up is the median of per-round ratios to fp32
  (``scripts.bench.onnx.throughput``).
- ``quality``: all STS pairs, each runtime against fp32: max and mean |Δscore|, Spearman with the
  gold similarity (ties averaged), and top-1 agreement: for each text_a of the file, whether the
  best-scoring text_b among all text_b of the file is the one fp32 picks.
- ``served``: single-pair requests (one pair of the STS file each) from 1, 4 and 16 client
  threads, one keep-alive connection each, to archives built from the current code (``--serve``
  NAME=OPTIONS: ``siamese-archive`` options; default: the default archive and its fp32 variant)
  on one TorchServe from config.properties, and to infinity-emb 0.0.78 with its ONNX Runtime
  engine (``scripts/bench/infinity_peer.py``: one ``/embeddings`` request with both texts,
  cosine in the client). ``--texts 1 32`` adds workloads of embeddings requests of 1 and 32
  texts (``{"texts": [...]}`` on the prediction route; infinity's ``/embeddings`` with the same
  texts). ``--kserve NAME=OPTIONS`` adds KServe's model server (``siamese-kserve`` with these
  options, one server each) on the same route. At each level the targets take turns, ``--rounds`` rounds, the order
  rotating. Reported: pairs/s, p50 and p95 latency over all rounds, and the CPU cores the server
  used while it was measured (its process tree's CPU time / wall time; per worker for
  TorchServe), how many workers had work on average (runnable, whether or not a core was free)
  and how busy the rest of the machine was meanwhile.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import requests
import torch

from handlers.encoder import Encoder, RowEmbedder, load_encoder
from handlers.tools import archive as build_archive
from handlers.tools.export_onnx import export, int8_name, quantize_int8
from handlers.tools.sources import model_dir, sts_pairs
from scripts.bench.infinity_peer import InfinityServer, cosine
from handlers.tools.evaluation import spearman
from scripts.bench.onnx import runtimes, throughput
from scripts.bench.predictions import pair_request, percentile, plain_body, timed_load
from handlers.tools.local.kserve_engine import LocalKServe
from handlers.tools.local.torchserve import LocalTorchServe

PARTS = ("speed", "quality", "served")


# -- in-process ---------------------------------------------------------------------------------
def row_embedders(encoder: Encoder, onnx_file: Path, threads: int) -> dict[str, RowEmbedder]:
    """fp32 first (the baseline of speed-ups and drifts), then bf16, autocast, ONNX fp32 and int8."""

    def autocast_fp32_weights(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder.embed_ids(input_ids, attention_mask).float()

    onnx = runtimes(encoder, onnx_file, threads)
    return {
        "fp32": encoder.embed_ids,
        "bf16": encoder.predict_ids,
        "autocast, fp32 weights": autocast_fp32_weights,
        "onnx fp32": onnx["onnx fp32"],
        "onnx int8": onnx["onnx int8"],
    }


def quality(encoder: Encoder, rows: dict[str, RowEmbedder], pairs: list[tuple[str, str, float]]) -> dict:
    """Per runtime against the first: score drift, Spearman with gold, top-1 agreement."""
    texts_a, texts_b = [a for a, _, _ in pairs], [b for _, b, _ in pairs]
    gold = np.array([s for _, _, s in pairs])
    batch = encoder.tokenize(texts_a + texts_b)
    results, baseline = {}, None
    for name, embed_rows in rows.items():
        emb = encoder.encode_batch(batch, embed_rows)
        a, b = emb[: len(pairs)], emb[len(pairs):]
        scores = encoder.similarity_of(a, b).numpy()
        grid = encoder.similarity_of(a[:, None, :].expand(-1, len(pairs), -1).reshape(-1, a.shape[1]),
                                     b.repeat(len(pairs), 1)).reshape(len(pairs), len(pairs))
        top1 = grid.argmax(1).numpy()
        baseline = baseline or (scores, top1)
        results[name] = {
            "max_abs": float(np.abs(scores - baseline[0]).max()),
            "mean_abs": float(np.abs(scores - baseline[0]).mean()),
            "spearman": spearman(scores, gold),
            "top1": float((top1 == baseline[1]).mean()),
        }
    return results


def in_process(args: argparse.Namespace, parts: set[str]) -> list[str]:
    torch.set_num_threads(args.threads)
    encoder = load_encoder(model_dir(args.source), reference=args.reference, precision="bf16", native_bf16=True)
    pairs = sts_pairs()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = export(encoder, Path(tmp) / "model.onnx")
        quantize_int8(onnx_file, int8_name(onnx_file))
        rows = row_embedders(encoder, onnx_file, args.threads)
        if "speed" in parts:
            texts = [t for a, b, _ in pairs for t in (a, b)]
            speed = {size: throughput(encoder, rows, texts, size, args.repeats) for size in args.batches}
            names = list(rows)
            lines += [f"### Speed: texts/s, {args.source}, reference {args.reference}, {args.threads} thread(s), "
                      f"{args.repeats} rounds", "",
                      "| batch | " + " | ".join(f"{n} | ×" for n in names) + " |",
                      "|---:|" + "---:|---:|" * len(names)]
            for size, result in speed.items():
                lines.append(f"| {size} | " + " | ".join(
                    f"{result[n]['texts_per_s']:.0f} | {result[n]['speedup']:.2f}" for n in names) + " |")
            lines.append("")
        if "quality" in parts:
            lines += [f"### Quality against fp32: {args.source}, {len(pairs)} STS pairs", "",
                      "| runtime | max abs Δscore | mean abs Δscore | Spearman with gold | top-1 agreement |",
                      "|---|---:|---:|---:|---:|"]
            for name, q in quality(encoder, rows, pairs).items():
                lines.append(f"| {name} | {q['max_abs']:.1e} | {q['mean_abs']:.1e} | {q['spearman']:.4f} "
                             f"| {q['top1']:.0%} |")
            lines.append("")
    return lines


# -- served -------------------------------------------------------------------------------------
class Target:
    """One server under load: how to send request ``i``, and which processes to account."""

    def __init__(self, name: str, request: Callable[[int], None], root_pid: int, worker_pids: list[int]):
        self.name, self.request, self.root_pid, self.worker_pids = name, request, root_pid, worker_pids
        self.runs: list[dict] = []

    def cpu_seconds(self) -> tuple[float, list[float]]:
        """CPU time of the whole process tree, and of each worker."""
        def of(pid: int) -> float:
            try:
                times = psutil.Process(pid).cpu_times()
                return times.user + times.system
            except psutil.NoSuchProcess:
                return 0.0

        root = psutil.Process(self.root_pid)
        tree = [self.root_pid] + [child.pid for child in root.children(recursive=True)]
        return sum(of(pid) for pid in tree), [of(pid) for pid in self.worker_pids]

    def run(self, total: int, concurrency: int) -> None:
        timed_load(self.request, 2 * concurrency, concurrency, warm_up=False)
        busy_before = busy_cpu_seconds()
        tree_before, workers_before = self.cpu_seconds()
        with RunnableWorkers(self.worker_pids) as runnable:
            result = timed_load(self.request, total, concurrency, warm_up=False)
        tree_after, workers_after = self.cpu_seconds()
        result["runnable"] = runnable.samples
        result["server_cpu_s"] = tree_after - tree_before
        result["worker_cpu_s"] = [a - b for a, b in zip(workers_after, workers_before)]
        result["machine_cpu_s"] = busy_cpu_seconds() - busy_before
        self.runs.append(result)


class RunnableWorkers:
    """Samples how many workers have work (state R: running, or waiting for a core), every
    ``interval`` seconds: unlike CPU time, this does not depend on what else keeps the cores busy."""

    def __init__(self, pids: list[int], interval: float = 0.002):
        self.files = [f"/proc/{pid}/stat" for pid in pids]
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            states = []
            for name in self.files:
                with open(name) as stat:
                    states.append(stat.read().rsplit(")", 1)[1].split()[0])
            self.samples.append(states.count("R"))

    def __enter__(self) -> "RunnableWorkers":
        if self.files:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.files:
            self._thread.join()


def busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def workload(texts: int) -> tuple[list[tuple[str, ...]], Callable[..., dict]]:
    """The requests of one workload: single pairs (``texts`` 0: a score each), or ``texts`` texts
    of the STS file each, on the embeddings route (``{"texts": [...]}``)."""
    if not texts:
        return [(a, b) for a, b, _ in sts_pairs()], plain_body
    pool = [t for a, b, _ in sts_pairs() for t in (a, b)]
    groups = [tuple(pool[(i * texts + k) % len(pool)] for k in range(texts)) for i in range(len(pool))]
    return groups, lambda *group: {"texts": list(group)}


def torchserve_targets(ts: LocalTorchServe, names: list[str], texts: int) -> list[Target]:
    groups, body = workload(texts)
    targets = []
    for name in names:
        described = requests.get(f"{ts.management}/models/{name}", timeout=30).json()[0]
        workers = [int(w["pid"]) for w in described["workers"]]
        targets.append(Target(name, pair_request(f"{ts.inference}/predictions/{name}", groups, body), ts.pid(), workers))
    return targets


def kserve_target(server: LocalKServe, name: str, texts: int) -> Target:
    """KServe's model server (``siamese-kserve``) on the same route and body as TorchServe's."""
    groups, body = workload(texts)
    assert server.process is not None
    return Target(name, pair_request(f"{server.inference}/predictions/{server.name}", groups, body),
                  server.process.pid, [server.process.pid])


def infinity_target(server: InfinityServer, texts: int) -> Target:
    """infinity's /embeddings with the same texts (for a pair: both, and the cosine in the client)."""
    groups, _ = workload(texts)

    def one(i: int) -> None:
        embeddings = server.embed(list(groups[i % len(groups)]))
        if not texts:
            cosine(*embeddings)

    assert server._proc is not None
    return Target("infinity-emb (ORT)", one, server._proc.pid, [])


def summary(target: Target) -> dict:
    wall = sum(r["wall_s"] for r in target.runs)
    latencies = [t for r in target.runs for t in r["latencies"]]
    return {
        "pairs_per_s": len(latencies) / wall,
        "p50_ms": 1000 * float(np.median(latencies)),
        "p95_ms": 1000 * percentile(latencies, 95),
        "cores": sum(r["server_cpu_s"] for r in target.runs) / wall,
        "workers": [sum(r["worker_cpu_s"][k] for r in target.runs) / wall for k in range(len(target.worker_pids))],
        "machine": sum(r["machine_cpu_s"] for r in target.runs) / wall,
        "runnable": float(np.mean([n for r in target.runs for n in r["runnable"]] or [np.nan])),
        "cpu_ms_per_pair": 1000 * sum(r["server_cpu_s"] for r in target.runs) / len(latencies),
    }


def served(args: argparse.Namespace) -> list[str]:
    variants = dict(spec.split("=", 1) for spec in args.serve)
    cores = os.cpu_count() or 1
    lines = [f"### Served: {args.source}, {args.requests} requests per workload, level and target "
             f"in {args.rounds} interleaved rounds; {cores} cores, load average {os.getloadavg()[0]:.1f} at the start", ""]
    with tempfile.TemporaryDirectory() as store:
        for name, options in variants.items():
            lines.append(f"- `{name}`: siamese-archive {args.source} {options}".rstrip())
            build_archive.build(build_archive.parser().parse_args(
                [args.source, "--name", name, "--export-path", store, *shlex.split(options)]))
        # each server in a session of its own, as infinity_peer starts infinity: Linux schedules
        # sessions as groups (autogroup), so neither shares the CPU share of the clients
        engines = dict(spec.split("=", 1) for spec in args.kserve)
        for name, options in engines.items():
            lines.append(f"- `{name}`: siamese-kserve {options}".rstrip())
        with LocalTorchServe(models={name: f"{name}.mar" for name in variants}, model_store=store,
                             own_session=True) as ts, contextlib.ExitStack() as stack:
            kservers = {name: stack.enter_context(LocalKServe(model_dir(args.source), "bench", shlex.split(options)))
                        for name, options in engines.items()}
            peer = InfinityServer(model_dir(args.source), batch_size=32) if args.peer else None
            if peer is not None:
                peer.start()
                lines.append("- `infinity-emb (ORT)`: infinity_emb v2 --engine optimum --batch-size 32 (scripts/bench/infinity_peer.py)")
            try:
                table = []
                for texts in args.texts:
                    targets = torchserve_targets(ts, list(variants), texts)
                    targets += [kserve_target(server, name, texts) for name, server in kservers.items()]
                    targets += [infinity_target(peer, texts)] if peer is not None else []
                    for concurrency in args.concurrency:
                        for target in targets:
                            target.runs.clear()
                        per_round = max(concurrency, args.requests // args.rounds)
                        for round_ in range(args.rounds):
                            shift = round_ % len(targets)
                            for target in targets[shift:] + targets[:shift]:
                                target.run(per_round, concurrency)
                        table += [(texts, concurrency, target.name, summary(target)) for target in targets]
            finally:
                if peer is not None:
                    peer.stop()
    lines += ["", f"load average {os.getloadavg()[0]:.1f} at the end; `other` = cores busy with anything but "
              "the server under test (the benchmark's clients, the other engineers' work)", "",
              "| request | clients | server | requests/s | p50 ms | p95 ms | server cores (per worker) "
              "| CPU ms per request | workers with work | other |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for texts, concurrency, name, s in table:
        per_worker = f" ({' + '.join(f'{w:.2f}' for w in s['workers'])})" if s["workers"] else ""
        request = f"{texts} text{'s' * (texts > 1)} (embeddings)" if texts else "a pair (score)"
        lines.append(f"| {request} | {concurrency} | {name} | {s['pairs_per_s']:.1f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} "
                     f"| {s['cores']:.2f}{per_worker} | {s['cpu_ms_per_pair']:.1f} | {s['runnable']:.2f} "
                     f"| {s['machine'] - s['cores']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default="minilm", help="minilm, mpnet, or a local directory")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--reference", choices=["shift", "none"], default="shift")
    p.add_argument("--threads", type=int, default=1, help="in-process torch and onnxruntime threads")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=20, help="speed: rounds per batch size")
    p.add_argument("--serve", nargs="+", default=["default=", "fp32=--precision fp32"],
                   help="served archives, NAME=siamese-archive options")
    p.add_argument("--kserve", nargs="*", default=[], metavar="NAME=OPTIONS",
                   help="served: KServe's model server too, with these siamese-kserve options (each its own server)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="without infinity-emb")
    p.add_argument("--requests", type=int, default=400, help="served: requests per level and target")
    p.add_argument("--rounds", type=int, default=4, help="served: interleaved rounds per level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--texts", type=int, nargs="+", default=[0],
                   help="served workloads: 0 single pairs (a score each), N>0 requests of N texts on the "
                        "embeddings route (infinity: /embeddings with the same texts)")
    args = p.parse_args(argv)
    parts = set(args.parts)
    started = time.perf_counter()
    lines = in_process(args, parts) if parts & {"speed", "quality"} else []
    if "served" in parts:
        lines += served(args)
    print("\n".join(lines + ["", f"({time.perf_counter() - started:.0f} s)"]))


if __name__ == "__main__":
    main()
