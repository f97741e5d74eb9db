"""Talking to a test server: JSON posts (with the server's token when it has one), requests
released together behind a barrier, and /metrics read as samples."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


def headers_of(server, api: str = "inference") -> dict[str, str]:
    """The bearer header of ``api`` where the server has token authorization on."""
    auth = getattr(server, "auth_headers", None)
    return auth(api) if auth else {}


def post(server, body, path: str = "predictions/minilm", **kwargs) -> requests.Response:
    """POST a JSON body (or raw bytes/str sent as application/json) to a test server."""
    kwargs.setdefault("timeout", 300)
    headers = {**headers_of(server), **kwargs.pop("headers", {})}
    if isinstance(body, (bytes, str)) or hasattr(body, "__next__"):
        return requests.post(f"{server.inference}/{path}", data=body,
                             headers={"Content-Type": "application/json", **headers}, **kwargs)
    return requests.post(f"{server.inference}/{path}", json=body, headers=headers, **kwargs)


def post_together(server, calls: list[tuple[str, object]]) -> list[requests.Response]:
    """Release every (path, body) at once, behind a barrier, so that they share a batch."""
    barrier = threading.Barrier(len(calls))

    def send(call: tuple[str, object]) -> requests.Response:
        barrier.wait()
        return post(server, call[1], call[0])

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(send, calls))


def post_all_together(server, bodies: list, path: str = "predictions/minilm") -> list[requests.Response]:
    """``post_together`` with one path for every body."""
    return post_together(server, [(path, body) for body in bodies])


def management(server, path: str) -> requests.Response:
    reply = requests.get(f"{server.management}/{path}", headers=headers_of(server, "management"), timeout=60)
    reply.raise_for_status()
    return reply


def workers(server, model: str) -> list[dict]:
    return management(server, f"models/{model}").json()[0]["workers"]


def described(server, model: str) -> dict:
    """The handler's own description of a model (TorchServe's customized metadata)."""
    return management(server, f"models/{model}?customized=true").json()[0]["customizedMetadata"]


def ready_pid(server, model: str, timeout: float = 300, other_than: int | None = None) -> int:
    """The pid of a READY worker of ``model`` (a new one, when ``other_than`` names the old)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [int(w["pid"]) for w in workers(server, model) if w["status"] == "READY"]
        ready = [pid for pid in ready if pid != other_than]
        if ready:
            return ready[0]
        time.sleep(0.5)
    raise TimeoutError(f"no READY worker of {model}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def wait_until_computing(pid: int, cpu_s: float = 0.5, timeout: float = 120) -> None:
    """Return once the process has spent ``cpu_s`` more CPU: an event (it is computing), not a guess."""
    start, deadline = cpu_seconds(pid), time.monotonic() + timeout
    while cpu_seconds(pid) - start < cpu_s:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not compute")
        time.sleep(0.05)


def scrape(server) -> Samples:
    text = requests.get(f"{server.metrics}/metrics", timeout=30).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def select(samples: Samples, name: str, **labels: str) -> dict[frozenset, float]:
    return {
        key: value for (sample, key), value in samples.items()
        if sample == name and all(dict(key).get(k) == v for k, v in labels.items())
    }


def delta(after: Samples, before: Samples, name: str, group: tuple[str, ...], **labels: str) -> Counter:
    """Increase of ``name`` per value of the ``group`` labels, over series matching ``labels``."""
    out: Counter = Counter()
    for key, value in select(after, name, **labels).items():
        increase = value - before.get((name, key), 0.0)
        if increase:
            out[tuple(dict(key)[g] for g in group)] += increase
    return out


def settled_metrics(server, timeout: float = 30) -> Samples:
    """/metrics once the frontend has taken in every metric line the workers wrote (two scrapes a
    second apart agree on the handler's request counts)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        samples = scrape(server)
        counts = {key: value for key, value in samples.items() if key[0] == "siamese_requests_total"}
        if counts == last or time.monotonic() > deadline:
            return samples
        last = counts
        time.sleep(1.0)


def main_thread_running(pid: int) -> bool:
    """Whether the process's main thread is on a CPU or waiting for one (state R), not blocked."""
    return open(f"/proc/{pid}/task/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "R"


def kill_while_computing(pid: int, timeout: float = 60) -> None:
    """SIGKILL a TorchServe worker while it computes a batch, never while it waits for one.

    TorchServe 0.12's frontend drops the requests it has gathered into a batch when the worker
    dies during the gathering window (``Model.pollBatch`` is interrupted before the batch is a
    request, and ``cleanJobs`` forgets them): those clients never get an answer. A worker that
    is running has its batch, and the frontend answers every request of it with a 5xx. The state
    is read twice, 2 ms apart, so that the few microseconds of running between sending one answer
    and waiting for the next batch do not count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if main_thread_running(pid):
            time.sleep(0.002)
            if main_thread_running(pid):
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.001)
    raise TimeoutError(f"worker {pid} did not compute within {timeout} s")
