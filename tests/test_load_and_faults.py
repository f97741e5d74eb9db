"""Load, faults, budgets and the production config, against one real TorchServe started from
config.production.properties (token authorization on) serving two archives: ``minilm`` and
``budget`` (minilm with a 16 MB explanation memory budget, time budgets of 50 s for ij and 2 s
for gae and lrp, and a 90 s responseTimeout)."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from pydantic import ValidationError

from handlers.attribution import method_of, options_for
from handlers.serving.admission import OBSERVED_WEIGHT, Admission
from handlers.serving.protocol import ExplainItem, PairItem
from handlers.serving.settings import ExplanationSettings, HandlerSettings, ModelConfig
from scripts.dev.load_test import grpc_ports, job_pool, run_load, summarize, worker_rss_mb
from scripts.dev.local_server import LocalTorchServe, read_properties
from handlers.tools.sources import ROOT
from tests.conftest import build_test_archive, sts_pairs

PRODUCTION = ROOT / "config.production.properties"
LONG = " ".join(["a man plays an acoustic guitar on a small stage"] * 30)  # over 256 tokens: truncated
BUDGET_HANDLER = {"memory_budget_mb": 16, "time_budget_s": {"ij": 50.0, "gae": 2.0, "lrp": 2.0}}


def with_explanation_settings(archive: Path, settings: dict) -> None:
    """Rewrite the ``handler.explanation`` settings inside a built archive."""
    with zipfile.ZipFile(archive) as mar:
        entries = {info: mar.read(info.filename) for info in mar.infolist()}
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as mar:
        for info, data in entries.items():
            if info.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                config["handler"]["explanation"].update(settings)
                data = yaml.safe_dump(config, sort_keys=False).encode()
            mar.writestr(info, data)


@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    store = tmp_path_factory.mktemp("prod_store")
    batching = ["--batch-size", "8", "--max-batch-delay", "50"]
    minilm = build_test_archive(store, "minilm", "minilm", *batching)
    with_explanation_settings(minilm, {"time_budget_s": {"ij": 250.0, "gae": 250.0, "lrp": 250.0}})  # responseTimeout 300
    budget = build_test_archive(store, "minilm", "budget", *batching, "--response-timeout", "90")
    with_explanation_settings(budget, BUDGET_HANDLER)
    with LocalTorchServe(models={"minilm": "minilm.mar", "budget": "budget.mar"}, model_store=store,
                         config=PRODUCTION, overrides=grpc_ports()) as ts:
        yield ts


def post(ts, route: str, body, token: bool = True, timeout: float = 120) -> requests.Response:
    headers = ts.auth_headers("inference") if token else {}
    return requests.post(f"{ts.inference}/{route}", json=body, headers=headers, timeout=timeout)


def workers(ts, model: str) -> list[dict]:
    reply = requests.get(f"{ts.management}/models/{model}", headers=ts.auth_headers("management"), timeout=30)
    reply.raise_for_status()
    return reply.json()[0]["workers"]


def ready_pid(ts, model: str, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [w for w in workers(ts, model) if w["status"] == "READY"]
        if ready:
            return int(ready[0]["pid"])
        time.sleep(0.5)
    raise TimeoutError(f"no READY worker of {model}")


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
def test_every_api_call_needs_the_token(prod):
    pair = {"text_a": "A man plays a guitar.", "text_b": "Someone plays music."}
    assert refused_for_token(post(prod, "predictions/minilm", pair, token=False))
    wrong = requests.post(f"{prod.inference}/predictions/minilm", json=pair, timeout=60,
                          headers={"Authorization": "Bearer not-the-key"})
    assert refused_for_token(wrong)
    assert refused_for_token(requests.get(f"{prod.management}/models", timeout=60))
    management_key = requests.post(f"{prod.inference}/predictions/minilm", json=pair, timeout=60,
                                   headers=prod.auth_headers("management"))
    assert refused_for_token(management_key)  # each API has its own key
    assert post(prod, "predictions/minilm", pair).status_code == 200
    assert requests.get(f"{prod.management}/models", headers=prod.auth_headers("management"), timeout=60).ok


@pytest.mark.server
def test_models_cannot_be_registered_through_the_api(prod):
    headers = prod.auth_headers("management")
    archive = prod.model_store / "minilm.mar"
    for url in (f"file://{archive}", "https://127.0.0.1:9/evil.mar"):
        reply = requests.post(f"{prod.management}/models", params={"url": url, "model_name": "evil"},
                              headers=headers, timeout=60)
        assert 400 <= reply.status_code < 500, reply.text
    listed = requests.get(f"{prod.management}/models", headers=headers, timeout=60).json()["models"]
    assert sorted(m["modelName"] for m in listed) == ["budget", "minilm"]


# -- load ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs(minilm_shift):
    pairs = [(a, b) for a, b, _ in sts_pairs()[:12]]
    return job_pool(minilm_shift, pairs, "minilm")


@pytest.mark.server
def test_mixed_load_is_answered_exactly(prod, jobs):
    """200 mixed requests (plain, ranking, KServe v1 and v2, ij, gae, lrp) from 16 clients."""
    headers = prod.auth_headers("inference")
    run_load(prod.inference, jobs, 32, 8, 300, headers)  # warm-up
    before = worker_rss_mb(prod.management, "minilm", prod.auth_headers("management"))
    start = time.perf_counter()
    outcomes = run_load(prod.inference, jobs, 200, 16, 600, headers, seed=1)
    report = summarize(outcomes, 200, time.perf_counter() - start)
    after = worker_rss_mb(prod.management, "minilm", prod.auth_headers("management"))
    assert report.requests == 200 and sorted(o.index for o in outcomes) == list(range(200))
    assert report.statuses == {"200": 200} and report.wrong_answers == 0, report
    assert {o.kind for o in outcomes} == {"pair", "rank", "v1", "v2", "ij", "gae", "lrp"}
    assert list(after) == list(before)  # the same worker
    pid = next(iter(before))
    assert after[pid] < 1.5 * before[pid], (before, after)


@pytest.mark.server
def test_killed_worker_is_restarted_and_its_requests_fail_cleanly(prod, jobs):
    """SIGKILL the worker while it computes an explanation and predictions are queued: the
    requests it held come back as 5xx (none hangs), TorchServe starts a new worker, and the
    requests after it are answered correctly."""
    headers = prod.auth_headers("inference")
    old_pid = ready_pid(prod, "minilm")
    slow: dict = {}
    long_pair = {"text_a": LONG[:150], "text_b": LONG[:140], "method": "ij", "layer": 3, "steps": 10}
    sender = threading.Thread(target=lambda: slow.update(reply=post(prod, "explanations/minilm", long_pair)))
    sender.start()
    time.sleep(0.5)  # the explanation is computing
    predictions = [j for j in jobs if j.kind in ("pair", "rank", "v1", "v2")]
    killed = threading.Event()

    def kill_once(outcome) -> None:
        if not killed.is_set():
            killed.set()
            os.kill(old_pid, signal.SIGKILL)

    outcomes = run_load(prod.inference, predictions, 60, 8, 300, headers, seed=2, on_outcome=kill_once)
    if not killed.is_set():
        os.kill(old_pid, signal.SIGKILL)
    sender.join(timeout=300)
    assert not sender.is_alive() and slow["reply"].status_code in (200, 500, 503), slow["reply"].text  # not hung
    assert all(o.status is not None for o in outcomes), [o for o in outcomes if o.status is None]  # no hangs
    assert all(o.correct for o in outcomes if o.status == 200)
    failed = [o.status for o in outcomes if o.status != 200] + [slow["reply"].status_code] * (slow["reply"].status_code != 200)
    assert failed and all(status >= 500 for status in failed), failed  # the held requests fail as errors
    new_pid = ready_pid(prod, "minilm")
    assert new_pid != old_pid
    later = run_load(prod.inference, jobs, 40, 8, 300, headers, seed=3)
    assert [o.status for o in later] == [200] * 40 and all(o.correct for o in later)


# -- budgets ------------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.parametrize("method", ["gae", "lrp"])
def test_explanation_over_the_memory_budget_is_refused_before_it_runs(prod, minilm_shift, method):
    """gae and lrp over 256 tokens would hold about 400 MB of activations; the budget is 16 MB.
    (ij checks its own per-node memory; at these sizes its time budget refuses it first.)"""
    pid = ready_pid(prod, "budget")
    rss = worker_rss_mb(prod.management, "budget", prod.auth_headers("management"))[str(pid)]
    reply = post(prod, "explanations/budget", {"text_a": LONG, "text_b": LONG, "method": method})
    assert reply.status_code == 413 and reply.json()["field"] in ("text_a", "text_b"), reply.text
    assert "memory budget" in reply.json()["error"]
    after = worker_rss_mb(prod.management, "budget", prod.auth_headers("management"))[str(pid)]
    assert after - rss < 100, (rss, after)  # the ~400 MB of activations were never allocated
    small = post(prod, "explanations/budget", {"text_a": "A man plays.", "text_b": "Music.", "method": method})
    assert small.status_code == 200, small.text
    from handlers.attribution import explain

    assert small.json()["score"] == pytest.approx(explain(minilm_shift, "A man plays.", "Music.", method=method)["score"], abs=1e-5)
    assert ready_pid(prod, "budget") == pid


@pytest.mark.server
def test_explanation_over_the_time_budget_is_refused_up_front(prod):
    """``budget`` gives ij 50 s; 1000 nodes per side over 40 tokens from layer 2 would take far
    longer here (and one node of each side fits its 16 MB memory budget)."""
    text = "a man plays an acoustic guitar on a small stage " * 4
    started = time.perf_counter()
    reply = post(prod, "explanations/budget", {"text_a": text, "text_b": text, "method": "ij", "layer": 2, "steps": 1000})
    refused_in = time.perf_counter() - started
    assert reply.status_code == 413 and reply.json()["field"] == "steps", reply.text
    assert "time budget is 50 s" in reply.json()["error"]
    started = time.perf_counter()
    small = post(prod, "explanations/budget", {"text_a": "A man plays.", "text_b": "Music.", "method": "ij",
                                               "layer": 5, "steps": 1})
    assert small.status_code == 200, small.text
    assert refused_in < 10 * (time.perf_counter() - started) + 1


def test_time_budgets_must_be_below_the_response_timeout(tmp_path):
    """Reaching responseTimeout kills the worker: an archive whose budget reaches it is not built."""
    handler = HandlerSettings(explanation=ExplanationSettings(time_budget_s={"ij": 300.0}))
    with pytest.raises(ValidationError, match="responseTimeout"):
        ModelConfig(responseTimeout=120, handler=handler)
    with pytest.raises(SystemExit, match="responseTimeout"):  # ij's default budget is 60 s
        build_test_archive(tmp_path, "minilm", "too-short", "--response-timeout", "30")
    assert not list(tmp_path.glob("*.mar"))


def with_time_budget(method: str, seconds: float) -> HandlerSettings:
    return HandlerSettings(explanation=ExplanationSettings(time_budget_s={method: seconds}))


def test_a_batch_of_explanations_gets_half_the_response_timeout(minilm_shift):
    """At a fixed rate each explanation costs 40 s of a 100 s timeout: the first fits in half of
    it, the second is told to retry (503); predictions are never held back."""
    admission = Admission(minilm_shift, with_time_budget("ij", 45.0), response_timeout_s=100)
    item = ExplainItem(text_a="A man plays a guitar.", text_b="Music.", method="ij", layer=4, steps=10)
    ij = method_of(minilm_shift, "ij")
    lengths = tuple(minilm_shift.tokenize(item.texts()).lengths)
    work = ij.work(lengths, item.options(admission.settings))
    admission.seconds_per_unit["ij"] = 40.0 / work
    pair = PairItem(text_a="a", text_b="b")
    refusals = admission.check_batch([item, pair, item, pair])
    assert refusals[0] is None and refusals[1] is None and refusals[3] is None
    assert refusals[2].status == 503 and "retry" in refusals[2].message
    doubled = item.model_copy(update={"steps": 20})
    assert ij.work(lengths, doubled.options(admission.settings)) == 2 * work
    admission.seconds_per_unit["ij"] = 50.0 / work
    (refused,) = admission.check_batch([item])
    assert refused.status == 413 and refused.field == "steps" and "45 s" in refused.message


def test_the_time_rate_follows_what_the_worker_measures(minilm_shift):
    """A rate calibrated 1000x too slow (as under a start-up stampede) comes back towards the
    measured one with every observed batch, by the moving average's weight."""
    admission = Admission(minilm_shift, with_time_budget("gae", 20.0), response_timeout_s=100)
    pairs = [("A man plays a guitar.", "Music."), ("Cats sleep.", "A dog runs in the park.")]
    gae, options = method_of(minilm_shift, "gae"), options_for("gae", {})
    results = gae.attribute(pairs, options)
    lengths = [tuple(minilm_shift.tokenize(list(pair)).lengths) for pair in pairs]
    measured = results[0].elapsed_ms / 1000 / sum(gae.work(n, options) for n in lengths)
    admission.seconds_per_unit["gae"] = start = 1000 * measured
    admission.observe("gae", options, results)
    assert admission.seconds_per_unit["gae"] == pytest.approx(start + OBSERVED_WEIGHT * (measured - start))
    for _ in range(40):
        admission.observe("gae", options, results)
    assert admission.seconds_per_unit["gae"] == pytest.approx(measured, rel=0.05)
    admission.observe("gae", options, [])  # nothing answered, nothing learnt
    assert admission.seconds_per_unit["gae"] == pytest.approx(measured, rel=0.05)
