"""Load, faults, budgets and the production config, against the run's TorchServe (started from
config.production.properties, token authorization on): ``minilm``, and ``budget`` (minilm with a
16 MB explanation memory budget, time budgets of 50 s for ij and 2 s for gae and lrp, and a 90 s
responseTimeout)."""
from __future__ import annotations

import re
import time

import pytest
import requests

from handlers.tools.load import job_pool, run_load, summarize, worker_rss_mb
from handlers.tools.local.torchserve import read_properties
from handlers.tools.sources import ROOT, sts_pairs
from tests.support.http import post as post_json, ready_pid

LONG = " ".join(["a man plays an acoustic guitar on a small stage"] * 30)  # over 256 tokens: truncated


def post(ts, route: str, body, token: bool = True, timeout: float = 120) -> requests.Response:
    if token:
        return post_json(ts, body, route, timeout=timeout)
    return requests.post(f"{ts.inference}/{route}", json=body, timeout=timeout)


# -- security defaults --------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["config.properties", "config.production.properties"])
def test_shipped_configs_are_locked_down(config):
    props = read_properties(ROOT / config)
    for api in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"https?://127\.0\.0\.1:\d+", props[api]), (api, props[api])
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"] == "file://.*model_store.*"
    assert 0 < int(props["max_request_size"]) <= 8 * 2**20
    assert props["install_py_dep_per_model"] == "false"
    if config == "config.production.properties":
        assert props["disable_token_authorization"] == "false"
        assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
        assert props["enable_envvars_config"] == "false"


def refused_for_token(reply: requests.Response) -> bool:
    """TorchServe 0.12 answers a missing or wrong token with 400 and this message."""
    return reply.status_code == 400 and "Token Authorization failed" in reply.text


@pytest.mark.server
def test_every_api_call_needs_the_token(server):
    pair = {"text_a": "A man plays a guitar.", "text_b": "Someone plays music."}
    assert refused_for_token(post(server, "predictions/minilm", pair, token=False))
    wrong = requests.post(f"{server.inference}/predictions/minilm", json=pair, timeout=60,
                          headers={"Authorization": "Bearer not-the-key"})
    assert refused_for_token(wrong)
    assert refused_for_token(requests.get(f"{server.management}/models", timeout=60))
    management_key = requests.post(f"{server.inference}/predictions/minilm", json=pair, timeout=60,
                                   headers=server.auth_headers("management"))
    assert refused_for_token(management_key)  # each API has its own key
    assert post(server, "predictions/minilm", pair).status_code == 200
    assert requests.get(f"{server.management}/models", headers=server.auth_headers("management"), timeout=60).ok


@pytest.mark.server
def test_models_cannot_be_registered_through_the_api(server):
    headers = server.auth_headers("management")
    archive = server.model_store / "minilm.mar"
    for url in (f"file://{archive}", "https://127.0.0.1:9/evil.mar"):
        reply = requests.post(f"{server.management}/models", params={"url": url, "model_name": "evil"},
                              headers=headers, timeout=60)
        assert 400 <= reply.status_code < 500, reply.text
    listed = requests.get(f"{server.management}/models", headers=headers, timeout=60).json()["models"]
    assert sorted(m["modelName"] for m in listed) == sorted(server.models)


# -- load ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs(minilm_shift):
    pairs = [(a, b) for a, b, _ in sts_pairs()[:12]]
    return job_pool(minilm_shift, pairs, "minilm")


@pytest.mark.server
def test_mixed_load_is_answered_exactly(server, jobs):
    """200 mixed requests (plain, ranking, KServe v1 and v2, ij, gae, lrp) from 16 clients."""
    headers = server.auth_headers("inference")
    run_load(server.inference, jobs, 32, 8, 300, headers)  # warm-up
    before = worker_rss_mb(server.management, "minilm", server.auth_headers("management"))
    start = time.perf_counter()
    outcomes = run_load(server.inference, jobs, 200, 16, 600, headers, seed=1)
    report = summarize(outcomes, 200, time.perf_counter() - start)
    after = worker_rss_mb(server.management, "minilm", server.auth_headers("management"))
    assert report.requests == 200 and sorted(o.index for o in outcomes) == list(range(200))
    assert report.statuses == {"200": 200} and report.wrong_answers == 0, report
    assert {o.kind for o in outcomes} == {"pair", "rank", "v1", "v2", "ij", "gae", "lrp"}
    assert list(after) == list(before)  # the same worker
    pid = next(iter(before))
    assert after[pid] < 1.5 * before[pid], (before, after)


# -- budgets ------------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.parametrize("method", ["gae", "lrp"])
def test_explanation_over_the_memory_budget_is_refused_before_it_runs(server, minilm_shift, method):
    """gae and lrp over 256 tokens would hold about 400 MB of activations; the budget is 16 MB.
    (ij checks its own per-node memory; at these sizes its time budget refuses it first.)"""
    pid = ready_pid(server, "budget")
    rss = worker_rss_mb(server.management, "budget", server.auth_headers("management"))[str(pid)]
    reply = post(server, "explanations/budget", {"text_a": LONG, "text_b": LONG, "method": method})
    assert reply.status_code == 413 and reply.json()["field"] in ("text_a", "text_b"), reply.text
    assert "memory budget" in reply.json()["error"]
    after = worker_rss_mb(server.management, "budget", server.auth_headers("management"))[str(pid)]
    assert after - rss < 100, (rss, after)  # the ~400 MB of activations were never allocated
    small = post(server, "explanations/budget", {"text_a": "A man plays.", "text_b": "Music.", "method": method})
    assert small.status_code == 200, small.text
    from handlers.attribution import explain

    assert small.json()["score"] == pytest.approx(explain(minilm_shift, "A man plays.", "Music.", method=method)["score"], abs=1e-5)
    assert ready_pid(server, "budget") == pid


@pytest.mark.server
def test_explanation_over_the_time_budget_is_refused_up_front(server):
    """``budget`` gives ij 50 s; 1000 nodes per side over 40 tokens from layer 2 would take far
    longer here (and one node of each side fits its 16 MB memory budget)."""
    text = "a man plays an acoustic guitar on a small stage " * 4
    started = time.perf_counter()
    reply = post(server, "explanations/budget", {"text_a": text, "text_b": text, "method": "ij", "layer": 2, "steps": 1000})
    refused_in = time.perf_counter() - started
    assert reply.status_code == 413 and reply.json()["field"] == "steps", reply.text
    assert "time budget is 50 s" in reply.json()["error"]
    started = time.perf_counter()
    small = post(server, "explanations/budget", {"text_a": "A man plays.", "text_b": "Music.", "method": "ij",
                                               "layer": 5, "steps": 1})
    assert small.status_code == 200, small.text
    assert refused_in < 10 * (time.perf_counter() - started) + 1
