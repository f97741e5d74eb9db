"""Separate pools for predictions and explanations, on the run's TorchServe (started from
config.production.properties, token authorization on) serving ``siamese-archive minilm --pools``
as ``pooled`` (predictions; explanations refused, naming ``pooled-explain``) and ``pooled-explain``
(explanations; its worker at a higher niceness, one torch thread)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import zipfile

import pytest
import requests

from handlers.serving.device import usable_cores
from handlers.serving.pools import EXPLAIN_NICE, EXPLAIN_THREADS, PoolSettings, explanation_model
from handlers.serving.settings import ModelConfig
from handlers.tools.deploy import layout
from handlers.tools.load import job_pool, run_load
from handlers.tools.local.torchserve import read_properties
from handlers.tools.sources import ROOT, sts_pairs
from tests.support import http
from tests.support.archives import archive_config
from tests.support.http import delta, kill_while_computing, post_together, ready_pid, settled_metrics, wait_until_computing

MODEL = "pooled"
LONG = " ".join(["a man plays an acoustic guitar on a small stage"] * 30)  # over 256 tokens: truncated
EXPLAIN = explanation_model(MODEL)
PAIR = {"text_a": "A man is playing a guitar.", "text_b": "Someone plays music."}
# an ij explanation of a few seconds (a fixed rule of 16 nodes through 3 blocks, 24 + 21 tokens)
SLOW_IJ = {"text_a": LONG[:100], "text_b": LONG[:90], "method": "ij", "layer": 3, "quadrature": "gauss", "steps": 16}
PREDICTIONS = ("pair", "rank", "v1", "v2")


@pytest.fixture(scope="module")
def jobs(minilm_shift):
    """Predictions routed to the prediction pool, explanations to the explanation pool."""
    pool = job_pool(minilm_shift, [(a, b) for a, b, _ in sts_pairs()[:12]], MODEL)
    return [job if job.kind in PREDICTIONS else dataclasses.replace(job, route=f"explanations/{EXPLAIN}")
            for job in pool]


def post(server, route: str, body) -> requests.Response:
    return http.post(server, body, route)


def thread_niceness(pid: int) -> set[int]:
    """The niceness of every thread of a process (Linux: a thread's own priority)."""
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


# -- settings, archives and deployment files ----------------------------------------------------
@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "100000 100000\n"}, 1),            # cgroup v2: Kubernetes' limits.cpu 1
    ({"cpu.max": "150000 100000\n"}, 2),            # 1.5 CPUs: rounded up
    ({"cpu.max": "max 100000\n"}, None),            # no limit
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_threads_follow_the_containers_cpu_limit_not_the_nodes_cores(tmp_path, files, limit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == (min(cores, limit) if limit else cores)


def test_a_pool_that_refuses_explanations_must_name_the_model_that_answers_them():
    with pytest.raises(ValueError, match="explanation_model"):
        PoolSettings(explanations=False)
    with pytest.raises(ValueError):
        ModelConfig.from_yaml({"handler": {"pool": {"nice": 20}}})
    assert PoolSettings().explanations and PoolSettings().nice == 0  # one archive answers everything


@pytest.mark.server
def test_the_pools_are_one_build_with_their_own_batching_and_the_same_budgets(model_store):
    predict, explain = (archive_config(model_store / f"{name}.mar") for name in (MODEL, EXPLAIN))
    assert predict["handler"]["pool"] == {"explanations": False, "explanation_model": EXPLAIN, "nice": 0, "threads": None}
    assert explain["handler"]["pool"] == {"explanations": True, "explanation_model": None, "nice": EXPLAIN_NICE,
                                          "threads": EXPLAIN_THREADS}
    assert (predict["minWorkers"], predict["batchSize"], predict["maxBatchDelay"]) == (1, 8, 50)
    assert (explain["minWorkers"], explain["batchSize"], explain["maxBatchDelay"]) == (1, 4, 2)
    assert explain["responseTimeout"] == predict["responseTimeout"]
    # the explanation pool keeps the per-method time budgets and the memory budget
    assert explain["handler"]["explanation"] == predict["handler"]["explanation"]
    assert {k: v for k, v in explain["handler"].items() if k != "pool"} == \
        {k: v for k, v in predict["handler"].items() if k != "pool"}
    with zipfile.ZipFile(model_store / f"{MODEL}.mar") as a, zipfile.ZipFile(model_store / f"{EXPLAIN}.mar") as b:
        same = {n for n in a.namelist() if n not in ("model-config.yaml", "MAR-INF/MANIFEST.json")}
        assert same == {n for n in b.namelist() if n not in ("model-config.yaml", "MAR-INF/MANIFEST.json")}
        assert all(a.getinfo(n).CRC == b.getinfo(n).CRC for n in same)  # the same handler and weights


def test_the_shipped_configs_register_both_pools():
    for config in ("config.properties", "config.production.properties"):
        models = read_properties(ROOT / config)["load_models"].split(",")
        assert models == ["minilm=minilm.mar", "minilm-explain=minilm-explain.mar"]


@pytest.mark.server
def test_the_kserve_layout_serves_the_explanation_pool_under_the_predictor_name(model_store, tmp_path):
    config = layout.build([model_store / f"{MODEL}.mar"], tmp_path, explainers=layout.explainer_archives([model_store / f"{MODEL}.mar"]))
    predictor = read_properties(config)
    explainer = read_properties(config.with_name(layout.EXPLAINER_CONFIG))
    assert {k: v for k, v in predictor.items() if k != "model_snapshot"} == \
        {k: v for k, v in explainer.items() if k != "model_snapshot"}
    for props, mar in ((predictor, f"{MODEL}.mar"), (explainer, f"{EXPLAIN}.mar")):
        snapshot = json.loads(props["model_snapshot"])["models"]
        assert list(snapshot) == [MODEL]  # KServe routes /v1/models/minilm:explain to the explainer
        assert snapshot[MODEL]["1.0"]["marName"] == mar and (tmp_path / "model-store" / mar).is_file()
        assert snapshot[MODEL]["1.0"]["batchSize"] == archive_config(model_store / mar)["batchSize"]


# -- a real TorchServe with both pools --------------------------------------------------------
@pytest.mark.server
def test_the_prediction_pool_refuses_explanations_naming_the_explanation_model(server, minilm_shift):
    v2 = {"inputs": [{"name": n, "datatype": "BYTES", "shape": [1], "data": [PAIR[n]]} for n in ("text_a", "text_b")],
          "parameters": {"method": "lrp"}}
    routes = [(f"explanations/{MODEL}", {**PAIR, "method": "lrp"}),
              (f"v1/models/{MODEL}:explain", {"instances": [{**PAIR, "method": "lrp"}]}),
              (f"v2/models/{MODEL}/explain", v2)]
    pairs = [(a, b) for a, b, _ in sts_pairs()[:5]]
    replies = post_together(server, routes + [(f"predictions/{MODEL}", {"text_a": a, "text_b": b}) for a, b in pairs])
    for reply in replies[:3]:
        assert reply.status_code == 404, reply.text
        assert reply.json()["field"] == "model" and f"'{EXPLAIN}'" in reply.json()["error"], reply.text
    scores = [reply.json()["score"] for reply in replies[3:]]
    assert scores == pytest.approx(minilm_shift.score_pairs(pairs), abs=1e-5)  # the rest of the batch answered
    answer = post(server, f"explanations/{EXPLAIN}", {**PAIR, "method": "lrp"})
    assert answer.status_code == 200 and answer.json()["score"] == pytest.approx(minilm_shift.score(*PAIR.values()), abs=1e-5)


@pytest.mark.server
def test_explanations_never_share_a_batch_with_predictions(server, minilm_shift):
    """Predictions released together with a long explanation: each pool computed only its own
    kind, and every batch of the prediction pool held predictions only (counted on /metrics)."""
    before = settled_metrics(server)
    pairs = [(a, b) for a, b, _ in sts_pairs()[:8]]
    replies = post_together(server, [(f"explanations/{EXPLAIN}", SLOW_IJ)]
                            + [(f"predictions/{MODEL}", {"text_a": a, "text_b": b}) for a, b in pairs])
    explained, predicted = replies[0], replies[1:]
    assert explained.status_code == 200, explained.text
    assert [r.status_code for r in predicted] == [200] * len(pairs)
    assert [r.json()["score"] for r in predicted] == pytest.approx(minilm_shift.score_pairs(pairs), abs=1e-5)

    after = settled_metrics(server)
    on_predictions = delta(after, before, "siamese_requests_total", ("kind", "status"), model_name=MODEL)
    on_explanations = delta(after, before, "siamese_requests_total", ("kind", "status"), model_name=EXPLAIN)
    assert on_predictions == {("prediction", "200"): len(pairs)}
    assert on_explanations == {("explanation", "200"): 1}
    # every batch of the prediction pool held predictions only: its batches add up to them
    assert delta(after, before, "siamese_batch_size_sum", (), model_name=MODEL)[()] == len(pairs)


@pytest.mark.server
def test_explanation_workers_run_at_a_lower_cpu_priority(server):
    assert post(server, f"explanations/{EXPLAIN}", {**PAIR, "method": "gae"}).status_code == 200  # torch's pools started
    assert post(server, f"predictions/{MODEL}", PAIR).status_code == 200
    explain_pid, predict_pid = ready_pid(server, EXPLAIN), ready_pid(server, MODEL)
    base = os.getpriority(os.PRIO_PROCESS, server.pid())  # the frontend's
    assert thread_niceness(explain_pid) == {min(19, base + EXPLAIN_NICE)}
    assert thread_niceness(predict_pid) == {base}
    assert len(os.listdir(f"/proc/{explain_pid}/task")) > 1  # threads started after initialize inherit it


@pytest.mark.server
def test_explanation_pool_keeps_its_time_budget(server):
    reply = post(server, f"explanations/{EXPLAIN}",
                 {"text_a": LONG, "text_b": LONG, "method": "ij", "layer": 0, "quadrature": "gauss", "steps": 1000})
    assert reply.status_code == 413 and reply.json()["field"] == "steps", reply.text


@pytest.mark.server
def test_both_pools_survive_a_worker_kill(server, jobs):
    """SIGKILL the explanation worker while it computes and the prediction worker while
    predictions are queued: every request is answered (the held ones 5xx, none hangs), TorchServe
    starts new workers for both pools (the explanation one at its lower priority again), and both
    answer right. (TorchServe treats a killed worker the same whatever its archive answers: this
    test stands for the archives of one pool too.)"""
    old = {model: ready_pid(server, model) for model in (MODEL, EXPLAIN)}
    slow: dict = {}
    sender = threading.Thread(target=lambda: slow.update(reply=post(server, f"explanations/{EXPLAIN}", SLOW_IJ)))
    sender.start()
    wait_until_computing(old[EXPLAIN], cpu_s=0.2)  # the explanation is computing
    os.kill(old[EXPLAIN], signal.SIGKILL)
    killed = threading.Event()

    def kill_once(_outcome) -> None:
        if not killed.is_set():
            killed.set()
            kill_while_computing(old[MODEL])

    predictions = [job for job in jobs if job.kind in PREDICTIONS]
    headers = server.auth_headers("inference")
    outcomes = run_load(server.inference, predictions, 40, 8, 300, headers, seed=2, on_outcome=kill_once)
    sender.join(timeout=300)
    assert not sender.is_alive() and slow["reply"].status_code >= 500, slow["reply"].text  # held, not hung
    assert all(o.status is not None for o in outcomes)  # none hung
    assert all(o.correct for o in outcomes if o.status == 200)
    assert all(o.status >= 500 for o in outcomes if o.status != 200)

    new = {model: ready_pid(server, model) for model in (MODEL, EXPLAIN)}
    assert all(new[m] != old[m] for m in new), (old, new)
    later = run_load(server.inference, jobs, 40, 8, 300, headers, seed=3)
    assert {o.kind for o in later} & {"ij", "gae", "lrp"} and {o.kind for o in later} & set(PREDICTIONS)
    assert [o.status for o in later] == [200] * 40 and all(o.correct for o in later), later
    base = os.getpriority(os.PRIO_PROCESS, server.pid())
    assert thread_niceness(new[EXPLAIN]) == {min(19, base + EXPLAIN_NICE)}
