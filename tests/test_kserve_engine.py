"""KServe's own model server with the project's model (``siamese-kserve``), as a real process:
what this engine adds to the contract that tests/test_kserve.py checks on both engines.

Explanations in a separate process at a lower priority (predictions go on while one runs; a
killed worker is replaced), KServe's own errors as 4xx naming the field, many concurrent
clients through KServe's REST client, and a real Prometheus scraping KServe's ``/metrics``.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from urllib.parse import urlparse

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from handlers.serving.metrics import METRICS
from handlers.serving.kserve.metrics import BUCKETS, QUEUE
from handlers.tools import traffic
from handlers.tools.local.prometheus import LocalPrometheus
from tests.support import http
from tests.support.http import wait_until_computing
from tests.support.kserve_client import CANDIDATES, MODEL, PAIRS, QUERY, batch_histogram, output, pair_request, raised
from tests.support.prometheus import (
    dashboard_queries, expected_empty, prometheus_binary, query, request_counts, wait_for_counts,
    wait_for_scrape_after,
)
from handlers.attribution import explain
from handlers.tools.sources import sts_pairs

pytestmark = pytest.mark.server

LONG_A = " ".join(a for a, _, _ in sts_pairs()[:3])
LONG_B = " ".join(b for _, b, _ in sts_pairs()[:3])


def post(server, path: str, body, **kwargs) -> requests.Response:
    return http.post(server, body, path, **kwargs)


def pair_instances(pairs) -> dict:
    return {"instances": [{"text_a": a, "text_b": b} for a, b in pairs]}


# -- explanations apart ----------------------------------------------------------------------------
def test_explanations_run_in_a_process_at_lower_priority(kserve_engine):
    server = psutil.Process(kserve_engine.pid())
    (worker_pid,) = kserve_engine.explainer_pids()
    worker = psutil.Process(worker_pid)
    assert worker.nice() == min(19, server.nice() + 10)
    server_cpu, worker_cpu = sum(server.cpu_times()[:2]), sum(worker.cpu_times()[:2])
    body = {"instances": [{"text_a": LONG_A, "text_b": LONG_B, "method": "ij", "layer": 0, "steps": 4}]}
    reply = post(kserve_engine, f"v1/models/{MODEL}:explain", body)
    assert reply.status_code == 200, reply.text
    server_spent = sum(server.cpu_times()[:2]) - server_cpu
    worker_spent = sum(worker.cpu_times()[:2]) - worker_cpu
    assert worker_spent > 3 * server_spent, (worker_spent, server_spent)


def test_predictions_are_answered_while_an_explanation_runs(kserve_engine, minilm_shift):
    """An explanation held on purpose (its worker stopped with SIGSTOP once it computes): every
    prediction sent meanwhile is answered, right, about as fast as without it (a ratio inside one
    run), and the explanation is answered once its worker goes on."""
    body = {"instances": [{"text_a": LONG_A, "text_b": LONG_B, "method": "ij", "layer": 0, "steps": 16}]}
    (worker_pid,) = kserve_engine.explainer_pids()
    explained: dict = {}

    def predictions() -> list[float]:
        latencies = []
        for a, b in PAIRS * 2:
            start = time.perf_counter()
            reply = post(kserve_engine, f"v1/models/{MODEL}:predict", pair_instances([(a, b)]))
            latencies.append(time.perf_counter() - start)
            assert reply.json()["predictions"][0]["score"] == pytest.approx(minilm_shift.score_pairs([(a, b)])[0], abs=1e-5)
        return sorted(latencies)

    alone = predictions()
    thread = threading.Thread(target=lambda: explained.update(reply=post(kserve_engine, f"v1/models/{MODEL}:explain", body)))
    thread.start()
    wait_until_computing(worker_pid, cpu_s=0.2)
    os.kill(worker_pid, signal.SIGSTOP)  # the explanation is held: it cannot finish until SIGCONT
    try:
        during = predictions()
        assert thread.is_alive() and "reply" not in explained
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    thread.join(timeout=600)
    assert explained["reply"].status_code == 200, explained["reply"].text
    median = len(during) // 2
    assert during[median] < 4 * alone[median] + 0.25, (alone, during)


# -- errors ------------------------------------------------------------------------------------------
def test_what_kserve_refuses_itself_is_4xx_and_the_server_carries_on(kserve_engine, minilm_shift):
    pid = kserve_engine.pid()
    v2_without_data = {"inputs": [{"name": "text_a", "datatype": "BYTES", "shape": [1], "data": ["a"]},
                                  {"name": "text_b", "datatype": "BYTES", "shape": [1]}]}
    reply = post(kserve_engine, f"v2/models/{MODEL}/infer", v2_without_data)
    assert reply.status_code == 400 and reply.json()["field"] == "inputs.text_b.data"
    reply = post(kserve_engine, f"v2/models/{MODEL}/infer", b'{"inputs": [')
    assert reply.status_code == 400 and reply.json()["field"] == "body"
    reply = post(kserve_engine, f"v1/models/{MODEL}:predict", b'{"instances": [')  # KServe's own decoder
    assert reply.status_code == 400 and "error" in reply.json()
    reply = post(kserve_engine, f"predictions/{MODEL}", b"\xff\xfe not UTF-8")
    assert reply.status_code == 400 and reply.json()["field"] == "body"
    reply = post(kserve_engine, f"v1/models/{MODEL}:explain", {"instances": [{"text_a": "a", "text_b": "b", "steps": 0}]})
    assert reply.status_code == 400 and reply.json()["field"] == "instances.0.steps"
    reply = post(kserve_engine, "v1/models/nothing:predict", pair_instances(PAIRS[:1]))
    assert reply.status_code == 404
    assert kserve_engine.pid() == pid and kserve_engine.process.poll() is None  # the same server carries on


def test_a_body_over_the_limit_is_refused_before_it_is_read(kserve_engine):
    limit = 8 * 2**20  # the engine's default max_request_bytes
    big = b'{"text_a": "' + b"a" * limit + b'", "text_b": "b"}'
    reply = post(kserve_engine, f"predictions/{MODEL}", big)
    assert reply.status_code == 413 and reply.json()["field"] == "body"
    chunks = iter([b'{"text_a": "'] + [b"a" * 2**20] * 9 + [b'", "text_b": "b"}'])  # no Content-Length
    reply = post(kserve_engine, f"predictions/{MODEL}", chunks)
    assert reply.status_code == 413 and reply.json()["field"] == "body"
    assert post(kserve_engine, f"predictions/{MODEL}", {"text_a": "a", "text_b": "b"}).status_code == 200


# -- many clients --------------------------------------------------------------------------------------
def test_concurrent_clients_get_their_own_answers_in_shared_batches(kserve_engine, minilm_shift):
    """48 requests from 16 concurrent KServe clients (v1 pairs, v1 rankings, v2 pairs; every
    eighth one invalid): each answered as in-process, in fewer batches than requests."""
    from kserve import InferenceRESTClient, RESTConfig

    pairs = [(a, b) for a, b, _ in sts_pairs()[:48]]
    ranking = minilm_shift.score_pairs([(QUERY, c) for c in CANDIDATES])

    async def one(client, i: int):
        a, b = pairs[i]
        if i % 8 == 7:
            return await client.infer(kserve_engine.inference, {"instances": [{"text_a": " ", "text_b": b}]},
                                      model_name=MODEL)
        if i % 3 == 0:
            reply = await client.infer(kserve_engine.inference, pair_instances([(a, b)]), model_name=MODEL)
            return reply["predictions"][0]["score"]
        if i % 3 == 1:
            body = {"instances": [{"query": QUERY, "candidates": CANDIDATES}]}
            reply = await client.infer(kserve_engine.inference, body, model_name=MODEL)
            return reply["predictions"][0]["scores"]
        reply = await client.infer(kserve_engine.inference, pair_request([(a, b)], f"c{i}"), model_name=MODEL)
        return output(reply, "score")[2][0]

    async def client(k: int) -> dict:
        """Client k: its own v1 and v2 clients, requests k, k + 16, k + 32 one after another."""
        v1, v2 = (InferenceRESTClient(RESTConfig(protocol=p, timeout=180)) for p in ("v1", "v2"))
        answers = {}
        try:
            for i in range(k, len(pairs), 16):
                try:
                    answers[i] = await one(v2 if i % 3 == 2 and i % 8 != 7 else v1, i)
                except Exception as exc:  # noqa: BLE001 (checked below)
                    answers[i] = exc
        finally:
            await v1.close()
            await v2.close()
        return answers

    async def clients() -> dict:
        return {i: a for answers in await asyncio.gather(*(client(k) for k in range(16))) for i, a in answers.items()}

    before = batch_histogram(kserve_engine)
    answers = asyncio.run(clients())
    after = batch_histogram(kserve_engine)
    expected_pairs = minilm_shift.score_pairs(pairs)
    for i, answer in sorted(answers.items()):
        if i % 8 == 7:
            reply = raised(answer)
            assert reply.status_code == 400 and reply.json()["field"] == "instances.0.text_a"
        elif i % 3 == 1:
            assert answer == pytest.approx(ranking, abs=1e-5)
        else:
            assert answer == pytest.approx(expected_pairs[i], abs=1e-5), i
    valid = sum(1 for i in answers if i % 8 != 7)
    batched, batches = after[0] - before[0], after[1] - before[1]
    assert batched == valid and batches < valid / 2, (batched, batches)


def test_explanations_of_several_instances_in_one_request(kserve_engine, minilm_shift):
    instances = [{"text_a": a, "text_b": b, "method": method} for (a, b), method in zip(PAIRS, ["gae", "lrp", "gae"])]
    reply = post(kserve_engine, f"v1/models/{MODEL}:explain", {"instances": instances})
    assert reply.status_code == 200
    for served, instance in zip(reply.json()["explanations"], instances):
        expected = explain(minilm_shift, instance["text_a"], instance["text_b"], method=instance["method"])
        assert served["method"] == instance["method"]
        assert served["relevance_a"] == pytest.approx(expected["relevance_a"], abs=1e-4)


# -- metrics ------------------------------------------------------------------------------------------
def test_metrics_hold_kserves_and_the_projects_with_chosen_buckets(kserve_engine):
    post(kserve_engine, f"explanations/{MODEL}", {"text_a": "a b", "text_b": "c", "method": "ij", "steps": 4})
    post(kserve_engine, f"v2/models/{MODEL}/infer", pair_request(PAIRS[:1]).to_rest()[0])
    families = {f.name: f for f in text_string_to_metric_families(
        requests.get(f"{kserve_engine.metrics}/metrics", timeout=10).text)}
    assert {"request_predict_seconds", "request_explain_seconds"} <= set(families)  # KServe's own
    for spec in (*METRICS, QUEUE):
        family = families[spec.name.removesuffix("_total")]
        assert family.samples, spec.name
        if spec.type == "histogram":
            bounds = sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})
            assert bounds == [*map(float, BUCKETS[spec.name]), float("inf")], spec.name


@pytest.fixture(scope="module")
def engine_prometheus(kserve_engine, tmp_path_factory):
    target = urlparse(kserve_engine.metrics).netloc
    with LocalPrometheus(prometheus_binary(), target, tmp_path_factory.mktemp("prometheus"), job="kserve") as running:
        yield running.url


def test_prometheus_scrapes_the_engine(kserve_engine, engine_prometheus):
    """The dashboard's queries of the project's metrics return data from this engine, and the
    counts Prometheus holds are the requests sent (traffic's mix: routes as TorchServe's)."""
    wait_for_scrape_after(engine_prometheus, time.time(), job="kserve")
    baseline = request_counts(engine_prometheus)
    sent = traffic.run(kserve_engine.inference, MODEL)
    wait_for_counts(engine_prometheus, sum(baseline.values()) + sum(sent.requests.values()))
    sent.add(traffic.run(kserve_engine.inference, MODEL))
    counts = wait_for_counts(engine_prometheus, sum(baseline.values()) + sum(sent.requests.values()))
    assert counts - baseline == sent.requests
    project = [(title, expr) for title, expr in dashboard_queries()
               if any(spec.name in expr for spec in METRICS)]
    assert project
    for title, expr in project:
        values = [float(r["value"][1]) for r in query(engine_prometheus, expr)]
        assert values == [] if expected_empty(expr, sent.explanations) else values, (title, expr)
    for expr in (f'sum(request_predict_seconds_count{{model_name="{MODEL}"}})',
                 f'histogram_quantile(0.5, sum by (le) (rate({QUEUE.name}_bucket{{model_name="{MODEL}"}}[1m])))'):
        (result,) = query(engine_prometheus, expr)
        assert float(result["value"][1]) >= 0, expr


# -- faults (last: it replaces the explanation worker) ---------------------------------------------------
def test_a_killed_explanation_worker_is_replaced(kserve_engine):
    (old,) = kserve_engine.explainer_pids()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while psutil.pid_exists(old) and psutil.Process(old).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    body = {"text_a": "A man plays.", "text_b": "Music.", "method": "gae"}
    statuses = []
    for _ in range(3):
        statuses.append(post(kserve_engine, f"explanations/{MODEL}", body).status_code)
        if statuses[-1] == 200:
            break
    assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses
    (new,) = kserve_engine.explainer_pids()
    assert new != old and psutil.Process(new).nice() == min(19, psutil.Process(kserve_engine.pid()).nice() + 10)
    assert post(kserve_engine, f"predictions/{MODEL}", {"text_a": "a", "text_b": "b"}).status_code == 200
