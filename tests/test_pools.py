"""Separate pools for predictions and explanations, on one real TorchServe started from
config.production.properties (token authorization on) serving ``siamese-archive minilm --pools``:
``minilm`` (predictions; explanations refused, naming ``minilm-explain``) and ``minilm-explain``
(explanations; its worker at a higher niceness, one torch thread)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from handlers.serving.pools import EXPLAIN_NICE, EXPLAIN_THREADS, PoolSettings, explanation_model
from handlers.serving.settings import ModelConfig
from scripts.deploy.kserve import layout, manifests
from scripts.dev.load_test import grpc_ports, job_pool, run_load
from scripts.dev.local_server import LocalTorchServe, read_properties
from tests.conftest import build_test_archive, sts_pairs
from handlers.tools.sources import ROOT
from tests.test_load_and_faults import LONG, PRODUCTION, ready_pid, with_explanation_settings
from tests.test_metrics import delta, scrape

MODEL = "minilm"
EXPLAIN = explanation_model(MODEL)
PAIR = {"text_a": "A man is playing a guitar.", "text_b": "Someone plays music."}
# an ij explanation of a few seconds (a fixed rule of 16 nodes through 3 blocks, 24 + 21 tokens)
SLOW_IJ = {"text_a": LONG[:100], "text_b": LONG[:90], "method": "ij", "layer": 3, "quadrature": "gauss", "steps": 16}
PREDICTIONS = ("pair", "rank", "v1", "v2")


def archive_config(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("pools_store")
    build_test_archive(store, "minilm", MODEL, "--pools", "--batch-size", "8", "--max-batch-delay", "50")
    for name in (MODEL, EXPLAIN):  # room for the slow explanation below on a loaded machine (responseTimeout 300 s)
        with_explanation_settings(store / f"{name}.mar", {"time_budget_s": {"ij": 250.0, "gae": 250.0, "lrp": 250.0}})
    return store


@pytest.fixture(scope="module")
def pools(store):
    with LocalTorchServe(models={MODEL: f"{MODEL}.mar", EXPLAIN: f"{EXPLAIN}.mar"}, model_store=store,
                         config=PRODUCTION, overrides=grpc_ports()) as ts:
        yield ts


@pytest.fixture(scope="module")
def jobs(minilm_shift):
    """Predictions routed to the prediction pool, explanations to the explanation pool."""
    pool = job_pool(minilm_shift, [(a, b) for a, b, _ in sts_pairs()[:12]], MODEL)
    return [job if job.kind in PREDICTIONS else dataclasses.replace(job, route=f"explanations/{EXPLAIN}")
            for job in pool]


def post(ts, route: str, body, timeout: float = 300) -> requests.Response:
    return requests.post(f"{ts.inference}/{route}", json=body, headers=ts.auth_headers("inference"), timeout=timeout)


def post_together(ts, calls: list[tuple[str, dict]]) -> list[tuple[requests.Response, float]]:
    """Release every (route, body) at once; each reply with the moment it came back."""
    barrier = threading.Barrier(len(calls))
    replies: list = [None] * len(calls)

    def send(i: int) -> None:
        barrier.wait()
        reply = post(ts, *calls[i])
        replies[i] = (reply, time.perf_counter())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return replies


def thread_niceness(pid: int) -> set[int]:
    """The niceness of every thread of a process (Linux: a thread's own priority)."""
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def settled_metrics(ts, timeout: float = 30):
    """/metrics once the frontend has taken in every metric line the workers wrote (two scrapes a
    second apart agree on the handler's request counts)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        samples = scrape(ts)
        counts = {key: value for key, value in samples.items() if key[0] == "siamese_requests_total"}
        if counts == last or time.monotonic() > deadline:
            return samples
        last = counts
        time.sleep(1.0)


# -- settings, archives and deployment files ----------------------------------------------------
def test_a_pool_that_refuses_explanations_must_name_the_model_that_answers_them():
    with pytest.raises(ValueError, match="explanation_model"):
        PoolSettings(explanations=False)
    with pytest.raises(ValueError):
        ModelConfig.from_yaml({"handler": {"pool": {"nice": 20}}})
    assert PoolSettings().explanations and PoolSettings().nice == 0  # one archive answers everything


@pytest.mark.server
def test_the_pools_are_one_build_with_their_own_batching_and_the_same_budgets(store):
    predict, explain = (archive_config(store / f"{name}.mar") for name in (MODEL, EXPLAIN))
    assert predict["handler"]["pool"] == {"explanations": False, "explanation_model": EXPLAIN, "nice": 0, "threads": None}
    assert explain["handler"]["pool"] == {"explanations": True, "explanation_model": None, "nice": EXPLAIN_NICE,
                                          "threads": EXPLAIN_THREADS}
    assert (predict["minWorkers"], predict["batchSize"], predict["maxBatchDelay"]) == (1, 8, 50)
    assert (explain["minWorkers"], explain["batchSize"], explain["maxBatchDelay"]) == (1, 4, 20)
    assert explain["responseTimeout"] == predict["responseTimeout"]
    # the explanation pool keeps the per-method time budgets and the memory budget
    assert explain["handler"]["explanation"] == predict["handler"]["explanation"]
    assert {k: v for k, v in explain["handler"].items() if k != "pool"} == \
        {k: v for k, v in predict["handler"].items() if k != "pool"}
    with zipfile.ZipFile(store / f"{MODEL}.mar") as a, zipfile.ZipFile(store / f"{EXPLAIN}.mar") as b:
        same = {n for n in a.namelist() if n not in ("model-config.yaml", "MAR-INF/MANIFEST.json")}
        assert same == {n for n in b.namelist() if n not in ("model-config.yaml", "MAR-INF/MANIFEST.json")}
        assert all(a.getinfo(n).CRC == b.getinfo(n).CRC for n in same)  # the same handler and weights


def test_the_shipped_configs_register_both_pools():
    for config in ("config.properties", "config.production.properties"):
        models = read_properties(ROOT / config)["load_models"].split(",")
        assert models == [f"{MODEL}={MODEL}.mar", f"{EXPLAIN}={EXPLAIN}.mar"]


@pytest.mark.server
def test_the_kserve_layout_serves_the_explanation_pool_under_the_predictor_name(store, tmp_path):
    config = layout.build([store / f"{MODEL}.mar"], tmp_path, explainers=layout.explainer_archives([store / f"{MODEL}.mar"]))
    predictor = read_properties(config)
    explainer = read_properties(config.with_name(layout.EXPLAINER_CONFIG))
    assert {k: v for k, v in predictor.items() if k != "model_snapshot"} == \
        {k: v for k, v in explainer.items() if k != "model_snapshot"}
    for props, mar in ((predictor, f"{MODEL}.mar"), (explainer, f"{EXPLAIN}.mar")):
        snapshot = json.loads(props["model_snapshot"])["models"]
        assert list(snapshot) == [MODEL]  # KServe routes /v1/models/minilm:explain to the explainer
        assert snapshot[MODEL]["1.0"]["marName"] == mar and (tmp_path / "model-store" / mar).is_file()
        assert snapshot[MODEL]["1.0"]["batchSize"] == archive_config(store / mar)["batchSize"]


def test_kserve_manifests_scale_the_explainer_on_its_own():
    """The TorchServe runtime's InferenceServices (the model server's are tested with its engine)."""
    paths = sorted(manifests.OUT.glob("*-v[12]-[cg]pu.yaml"))
    assert len(paths) == 4
    for path in paths:
        spec = yaml.safe_load(path.read_text())["spec"]
        predictor, explainer = spec["predictor"], spec["explainer"]
        (container,) = explainer["containers"]
        for component, resources in ((predictor, predictor["model"]["resources"]), (explainer, container["resources"])):
            assert resources["requests"] == resources["limits"]
            assert component["scaleMetric"] and component["scaleTarget"] >= 1
            assert 1 <= component["minReplicas"] <= component["maxReplicas"]
        assert explainer["scaleTarget"] < predictor["scaleTarget"]  # an explanation holds a pod for seconds
        assert explainer["timeout"] > predictor["timeout"]
        assert container["image"] == predictor["model"]["image"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["STORAGE_URI"] == predictor["model"]["storageUri"]  # the same layout, its own config
        assert env["CONFIG_PATH"] == f"{layout.MOUNT}/config/{layout.EXPLAINER_CONFIG}"
        assert env["CONFIG_PATH"] in container["command"][2] and env["PROTOCOL_VERSION"] == "v1"


# -- a real TorchServe with both pools --------------------------------------------------------
@pytest.mark.server
def test_the_prediction_pool_refuses_explanations_naming_the_explanation_model(pools, minilm_shift):
    v2 = {"inputs": [{"name": n, "datatype": "BYTES", "shape": [1], "data": [PAIR[n]]} for n in ("text_a", "text_b")],
          "parameters": {"method": "lrp"}}
    routes = [(f"explanations/{MODEL}", {**PAIR, "method": "lrp"}),
              (f"v1/models/{MODEL}:explain", {"instances": [{**PAIR, "method": "lrp"}]}),
              (f"v2/models/{MODEL}/explain", v2)]
    pairs = [(a, b) for a, b, _ in sts_pairs()[:5]]
    replies = post_together(pools, routes + [(f"predictions/{MODEL}", {"text_a": a, "text_b": b}) for a, b in pairs])
    for reply, _ in replies[:3]:
        assert reply.status_code == 404, reply.text
        assert reply.json()["field"] == "model" and f"'{EXPLAIN}'" in reply.json()["error"], reply.text
    scores = [reply.json()["score"] for reply, _ in replies[3:]]
    assert scores == pytest.approx(minilm_shift.score_pairs(pairs), abs=1e-5)  # the rest of the batch answered
    answer = post(pools, f"explanations/{EXPLAIN}", {**PAIR, "method": "lrp"})
    assert answer.status_code == 200 and answer.json()["score"] == pytest.approx(minilm_shift.score(*PAIR.values()), abs=1e-5)


@pytest.mark.server
def test_explanations_never_share_a_batch_with_predictions(pools, minilm_shift):
    """Predictions released together with a long explanation are all answered before it (in one
    TorchServe batch they would wait for it), and each pool computed only its own kind."""
    before = settled_metrics(pools)
    pairs = [(a, b) for a, b, _ in sts_pairs()[:8]]
    replies = post_together(pools, [(f"explanations/{EXPLAIN}", SLOW_IJ)]
                            + [(f"predictions/{MODEL}", {"text_a": a, "text_b": b}) for a, b in pairs])
    (explained, explained_at), predicted = replies[0], replies[1:]
    assert explained.status_code == 200, explained.text
    assert [r.status_code for r, _ in predicted] == [200] * len(pairs)
    assert [r.json()["score"] for r, _ in predicted] == pytest.approx(minilm_shift.score_pairs(pairs), abs=1e-5)
    assert max(at for _, at in predicted) < explained_at, (explained.json()["elapsed_ms"], [at - explained_at for _, at in predicted])

    after = settled_metrics(pools)
    on_predictions = delta(after, before, "siamese_requests_total", ("kind", "status"), model_name=MODEL)
    on_explanations = delta(after, before, "siamese_requests_total", ("kind", "status"), model_name=EXPLAIN)
    assert on_predictions == {("prediction", "200"): len(pairs)}
    assert on_explanations == {("explanation", "200"): 1}
    # every batch of the prediction pool held predictions only: its batches add up to them
    assert delta(after, before, "siamese_batch_size_sum", (), model_name=MODEL)[()] == len(pairs)


@pytest.mark.server
def test_explanation_workers_run_at_a_lower_cpu_priority(pools):
    assert post(pools, f"explanations/{EXPLAIN}", {**PAIR, "method": "gae"}).status_code == 200  # torch's pools started
    assert post(pools, f"predictions/{MODEL}", PAIR).status_code == 200
    explain_pid, predict_pid = ready_pid(pools, EXPLAIN), ready_pid(pools, MODEL)
    base = os.getpriority(os.PRIO_PROCESS, pools.pid())  # the frontend's
    assert thread_niceness(explain_pid) == {min(19, base + EXPLAIN_NICE)}
    assert thread_niceness(predict_pid) == {base}
    assert len(os.listdir(f"/proc/{explain_pid}/task")) > 1  # threads started after initialize inherit it


@pytest.mark.server
def test_explanation_pool_keeps_its_time_budget(pools):
    reply = post(pools, f"explanations/{EXPLAIN}",
                 {"text_a": LONG, "text_b": LONG, "method": "ij", "layer": 0, "quadrature": "gauss", "steps": 1000})
    assert reply.status_code == 413 and reply.json()["field"] == "steps", reply.text


@pytest.mark.server
def test_both_pools_survive_a_worker_kill(pools, jobs):
    """SIGKILL the explanation worker while it computes and the prediction worker while
    predictions are queued: every request is answered (the held ones 5xx), TorchServe starts new
    workers for both pools (the explanation one at its lower priority again), and both answer right."""
    old = {model: ready_pid(pools, model) for model in (MODEL, EXPLAIN)}
    slow: dict = {}
    sender = threading.Thread(target=lambda: slow.update(reply=post(pools, f"explanations/{EXPLAIN}", SLOW_IJ)))
    sender.start()
    time.sleep(1.0)  # the explanation is computing
    os.kill(old[EXPLAIN], signal.SIGKILL)
    killed = threading.Event()

    def kill_once(_outcome) -> None:
        if not killed.is_set():
            killed.set()
            os.kill(old[MODEL], signal.SIGKILL)

    predictions = [job for job in jobs if job.kind in PREDICTIONS]
    headers = pools.auth_headers("inference")
    outcomes = run_load(pools.inference, predictions, 40, 8, 300, headers, seed=2, on_outcome=kill_once)
    sender.join(timeout=300)
    assert not sender.is_alive() and slow["reply"].status_code >= 500, slow["reply"].text  # held, not hung
    assert all(o.status is not None for o in outcomes)  # none hung
    assert all(o.correct for o in outcomes if o.status == 200)
    assert all(o.status >= 500 for o in outcomes if o.status != 200)

    new = {model: ready_pid(pools, model) for model in (MODEL, EXPLAIN)}
    assert all(new[m] != old[m] for m in new), (old, new)
    later = run_load(pools.inference, jobs, 40, 8, 300, headers, seed=3)
    assert {o.kind for o in later} & {"ij", "gae", "lrp"} and {o.kind for o in later} & set(PREDICTIONS)
    assert [o.status for o in later] == [200] * 40 and all(o.correct for o in later), later
    base = os.getpriority(os.PRIO_PROCESS, pools.pid())
    assert thread_niceness(new[EXPLAIN]) == {min(19, base + EXPLAIN_NICE)}
