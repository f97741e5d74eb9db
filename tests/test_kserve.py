"""KServe: the storage layout served as KServe's TorchServe runtime starts it, and KServe's own
model server with the project's model, both driven by KServe's own REST client in both
protocols (v1 ``instances`` and v2, the Open Inference Protocol): the same answers, the same
errors."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse

from handlers.attribution import METHODS, explain
from handlers.tools.deploy import layout, manifests
from handlers.tools.local.kserve_engine import LocalKServe
from handlers.tools.local.torchserve import named_files, read_properties
from tests.support.kserve_client import (
    CANDIDATES, MODEL, OPTIONS, PAIRS, QUERY, SHORT, KServeRuntime, batch_histogram, bytes_input, call, gather,
    output, pair_request, raised, v2_explain,
)

pytestmark = pytest.mark.server

@pytest.fixture(scope="module", params=["torchserve-runtime", "kserve-engine"])
def kserve_server(request, model_store, tmp_path_factory):
    """Each engine behind KServe's protocols: TorchServe started as KServe's TorchServe runtime
    starts it, and KServe's own model server with the project's model (``kserve_engine``)."""
    if request.param == "kserve-engine":
        yield request.getfixturevalue("kserve_engine")
        return
    with KServeRuntime(tmp_path_factory.mktemp("kserve"), [model_store / f"{MODEL}.mar"]) as ts:
        yield ts


# -- v1 ----------------------------------------------------------------------------------------
def test_v1_predict_answers_every_instance_in_order(kserve_server, minilm_shift):
    instances = [{"text_a": a, "text_b": b} for a, b in PAIRS]
    instances.insert(2, {"query": QUERY, "candidates": CANDIDATES})
    body = call("v1", "infer", kserve_server.inference, {"instances": instances}, model_name=MODEL)
    predictions = body["predictions"]
    assert len(predictions) == len(instances)
    ranking = predictions.pop(2)
    assert [p["score"] for p in predictions] == pytest.approx(minilm_shift.score_pairs(PAIRS), abs=1e-5)
    expected = minilm_shift.score_pairs([(QUERY, c) for c in CANDIDATES])
    assert ranking["scores"] == pytest.approx(expected, abs=1e-5)
    assert ranking["ranking"] == sorted(range(len(expected)), key=lambda i: -expected[i])


#: invalid v1 instances, and the field the answer must name (every engine)
V1_INVALID = [
    ([{"text_a": "a", "text_b": "b"}, {"text_a": "", "text_b": "b"}], "instances.1.text_a"),
    ([{"text_a": "a", "text_b": "b"}, {"text_a": "a"}], "instances.1.text_b"),
    ([{"query": "q", "candidates": ["c", 7]}], "instances.0.candidates.1"),
    ([], "instances"),
]


@pytest.mark.parametrize("instances, field", V1_INVALID)
def test_v1_invalid_instance_gets_400_naming_it(kserve_server, instances, field):
    reply = raised(call("v1", "infer", kserve_server.inference, {"instances": instances}, model_name=MODEL))
    assert reply.status_code == 400
    assert reply.json()["field"] == field and reply.json()["error"].startswith(field)


# -- v2 ----------------------------------------------------------------------------------------
def test_v2_infer_pairs(kserve_server, minilm_shift):
    long_text = "guitar " * 2000
    pairs = [*PAIRS, (long_text, "music")]
    response = call("v2", "infer", kserve_server.inference, pair_request(pairs, "request-17"), model_name=MODEL)
    assert response.id == "request-17" and response.model_name == MODEL
    assert [o.name for o in response.outputs] == ["score", "truncated_text_a", "truncated_text_b"]
    datatype, shape, scores = output(response, "score")
    assert (datatype, shape) == ("FP64", [len(pairs)])
    assert scores == pytest.approx(minilm_shift.score_pairs(pairs), abs=1e-5)
    assert output(response, "truncated_text_a") == ("BOOL", [len(pairs)], [False] * len(PAIRS) + [True])
    assert output(response, "truncated_text_b")[2] == [False] * len(pairs)
    assert response.parameters == {"similarity": "cos", "reference": "shift"}


def test_v2_infer_ranking(kserve_server, minilm_shift):
    request = InferRequest(MODEL, [bytes_input("query", [QUERY]), bytes_input("candidates", CANDIDATES)])
    response = call("v2", "infer", kserve_server.inference, request, model_name=MODEL)
    expected = minilm_shift.score_pairs([(QUERY, c) for c in CANDIDATES])
    datatype, shape, scores = output(response, "scores")
    assert (datatype, shape) == ("FP64", [3]) and scores == pytest.approx(expected, abs=1e-5)
    assert output(response, "ranking") == ("INT64", [3], sorted(range(3), key=lambda i: -expected[i]))
    assert output(response, "truncated_query")[2] == [False]
    assert output(response, "truncated_candidates")[2] == [False] * 3


def test_v2_body_on_torchserve_predictions_route(kserve_server, minilm_shift):
    """Some versions of KServe's model server forward v2 bodies to /predictions/{model}."""
    body, _ = pair_request(PAIRS[:2], "x").to_rest()
    reply = call("v2", "infer", f"{kserve_server.inference}/predictions/{MODEL}", body, is_graph_endpoint=True)
    response = InferResponse.from_rest(reply)
    assert response.id == "x"
    assert output(response, "score")[2] == pytest.approx(minilm_shift.score_pairs(PAIRS[:2]), abs=1e-5)


def raw_inputs(**inputs: list) -> list[InferInput]:
    return [bytes_input(name, data) for name, data in inputs.items()]


#: invalid v2 inputs and parameters, and the field the answer must name (every engine)
V2_INVALID = [
    (raw_inputs(text_a=["a", "b", ""], text_b=["c", "d", "e"]), None, "inputs.text_a.2"),
    (raw_inputs(text_a=["a", "b"], text_b=["c", 4]), None, "inputs.text_b.1"),
    (raw_inputs(text_a=["a", "b"], text_b=["c"]), None, "inputs.text_b"),
    (raw_inputs(text_a=["a"], text_c=["c"]), None, "inputs.text_c"),
    (raw_inputs(text_a=["a"]), None, "inputs.text_b"),
    (raw_inputs(query=["q", "r"], candidates=["c"]), None, "inputs.query"),
    (raw_inputs(query=["q"], candidates=["c", ""]), None, "inputs.candidates.1"),
    ([bytes_input("text_a", ["a"]), InferInput("text_b", [1], "FP32", data=[1.0])], None, "inputs.text_b.datatype"),
    (raw_inputs(text_a=["a"], text_b=["b"]), {"layer": 2}, "parameters.layer"),
]


@pytest.mark.parametrize("inputs, parameters, field", V2_INVALID)
def test_v2_invalid_input_gets_400_naming_it(kserve_server, inputs, parameters, field):
    request = InferRequest(MODEL, inputs, request_id="bad", parameters=parameters)
    reply = raised(call("v2", "infer", kserve_server.inference, request, model_name=MODEL))
    assert reply.status_code == 400
    assert reply.json()["field"] == field and reply.json()["error"].startswith(field)


def test_v2_requests_are_batched_and_a_bad_one_costs_no_other(kserve_server, minilm_shift):
    """Nine v2 requests at once (batchSize 8, maxBatchDelay 50 ms), one invalid: the engine
    batches them (fewer batches than requests) and answers each on its own. TorchServe's
    batches hold the invalid request too; KServe's model server refuses it before batching."""
    requests_ = [pair_request([pair], f"r{i}") for i, pair in enumerate(PAIRS + PAIRS[:2])]
    requests_.insert(4, pair_request([("", "nothing")], "bad"))
    before = batch_histogram(kserve_server)
    calls = [((kserve_server.inference, r), {"model_name": MODEL}) for r in requests_]
    replies = asyncio.run(gather("v2", "infer", calls))
    after = batch_histogram(kserve_server)
    bad = raised(replies.pop(4))
    assert bad.status_code == 400 and bad.json()["field"] == "inputs.text_a.0"
    assert [r.id for r in replies] == [f"r{i}" for i in range(len(replies))]
    scores = [output(r, "score")[2][0] for r in replies]
    assert scores == pytest.approx(minilm_shift.score_pairs(PAIRS + PAIRS[:2]), abs=1e-5)
    requests_counted, batches = after[0] - before[0], after[1] - before[1]
    batched = len(requests_) - (1 if isinstance(kserve_server, LocalKServe) else 0)
    assert requests_counted == batched and batches < batched


# -- explanations --------------------------------------------------------------------------------
def assert_close(served, expected, where: str = "") -> None:
    """Equal structure, equal strings and integers, numbers within 1e-4 (batch padding)."""
    if isinstance(expected, dict):
        assert sorted(served) == sorted(expected), where
        for key in expected:
            assert_close(served[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(served, list) and len(served) == len(expected), where
        for i, (s, e) in enumerate(zip(served, expected)):
            assert_close(s, e, f"{where}.{i}")
    elif isinstance(expected, float):
        assert served == pytest.approx(expected, abs=1e-4), where
    else:
        assert served == expected, where


def same_explanation(served: dict, expected: dict) -> None:
    """The served answer is the in-process one (timings aside; computed, not from a cache)."""
    served, expected = dict(served), dict(expected)
    assert served.pop("elapsed_ms") >= 0 and expected.pop("elapsed_ms") >= 0
    assert served.pop("cached") is False
    assert_close(served, expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_v1_explain(kserve_server, minilm_shift, method):
    instances = [{"text_a": a, "text_b": b, "method": method, **OPTIONS[method]} for a, b in [SHORT, SHORT[::-1]]]
    reply = call("v1", "explain", kserve_server.inference, MODEL, {"instances": instances})
    explanations = reply["explanations"]
    assert len(explanations) == 2
    for served, (a, b) in zip(explanations, [SHORT, SHORT[::-1]]):
        same_explanation(served, explain(minilm_shift, a, b, method=method, **OPTIONS[method]))


@pytest.mark.parametrize("method", list(METHODS))
def test_v2_explain(kserve_server, minilm_shift, method):
    pairs = [SHORT, (SHORT[0], "The cat sleeps.")]
    response = v2_explain(kserve_server, pair_request(pairs, "why-1", {"method": method, **OPTIONS[method]}))
    assert response.id == "why-1" and response.model_name == MODEL
    assert [o.name for o in response.outputs] == ["score", "explanation"]
    datatype, shape, data = output(response, "explanation")
    assert (datatype, shape) == ("BYTES", [2])
    expected = [explain(minilm_shift, a, b, method=method, **OPTIONS[method]) for a, b in pairs]
    for served, reference in zip(map(json.loads, data), expected):
        same_explanation(served, reference)
    assert output(response, "score")[2] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def test_v2_explain_invalid_option_gets_400(kserve_server):
    reply = raised(v2_explain(kserve_server, pair_request([SHORT], parameters={"layer": 99})))
    assert reply.status_code == 400 and reply.json()["field"] == "parameters.layer"
    reply = raised(v2_explain(kserve_server, pair_request([SHORT], parameters={"method": "shap"})))
    assert reply.status_code == 400 and reply.json()["field"] == "parameters.method"


# -- deployment files --------------------------------------------------------------------------
def test_layout_keeps_the_security_choices_and_the_archive_settings(model_store, tmp_path):
    config = layout.build([model_store / f"{MODEL}.mar"], tmp_path)
    props = read_properties(config)
    assert props["inference_address"] == props["management_address"] == "http://127.0.0.1:8085"
    assert props["metrics_address"] == "http://0.0.0.0:8082" and props["metrics_mode"] == "prometheus"
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["enable_model_api"] == "false" and props["enable_envvars_config"] == "false"
    assert "service_envelope" not in props and "load_models" not in props
    assert (tmp_path / "model-store" / f"{MODEL}.mar").is_file()
    files = named_files(props)
    assert set(files) == {"metrics_config", "log_config"}  # both travel with the config
    for path in files.values():
        assert path.startswith("/mnt/models/config/")
        assert (tmp_path / "config" / Path(path).name).is_file()
    snapshot = json.loads(props["model_snapshot"])
    _, version, archive_config = layout.archive_info(model_store / f"{MODEL}.mar")
    entry = snapshot["models"][MODEL][version]
    assert entry["marName"] == f"{MODEL}.mar" and entry["defaultVersion"] is True
    assert {k: entry[k] for k in layout.SNAPSHOT_KEYS} == {k: archive_config[k] for k in layout.SNAPSHOT_KEYS}


def test_committed_manifests_are_the_generated_ones(tmp_path):
    generated = manifests.write(MODEL, tmp_path, manifests.STORAGE_URI, manifests.IMAGE)
    for path in generated:
        committed = manifests.OUT / path.name
        assert committed.read_text() == path.read_text(), f"regenerate {committed}"
        isvc = yaml.safe_load(path.read_text())
        _, protocol, device = path.stem.rsplit("-", 2)
        model = isvc["spec"]["predictor"]["model"]
        assert model["protocolVersion"] == protocol and model["runtime"] == "kserve-torchserve"
        assert model["resources"]["requests"] == model["resources"]["limits"]
        assert ("nvidia.com/gpu" in model["resources"]["limits"]) == (device == "gpu")
        assert isvc["metadata"]["annotations"]["prometheus.kserve.io/port"] == "8082"
