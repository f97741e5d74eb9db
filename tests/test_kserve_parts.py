"""The parts of KServe's model server engine that run without a server: its settings, the v2
request as KServe hands it over, its Prometheus metrics, and what crosses into the
explanation processes."""
from __future__ import annotations

import asyncio
import pickle

import pytest
import yaml

from handlers.tools import archive as build_archive
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from prometheus_client import CollectorRegistry

from handlers.attribution import Explanation
from handlers.serving.kserve import server as kserve_server
from handlers.serving.kserve.config import EngineSettings, load_settings
from handlers.serving.kserve.model import RequestRefused, SiameseModel
from handlers.serving.metrics import BATCH_SIZE, LATENCY, METRICS, batch_observations
from handlers.serving.kserve.metrics import BUCKETS, QUEUE, PrometheusRecorder
from handlers.serving.protocol import RequestError, parse_request
from handlers.serving.settings import HandlerSettings, ModelConfig
from handlers.tools.deploy import layout, manifests, modelserver

V2_BODY = {
    "id": "7",
    "inputs": [
        {"name": "text_a", "datatype": "BYTES", "shape": [2], "data": ["A man plays.", "Cats sleep."]},
        {"name": "text_b", "datatype": "BYTES", "shape": [2], "data": ["Music.", "A dog runs."]},
    ],
    "parameters": {"method": "ij", "layer": 2},
}


# -- settings --------------------------------------------------------------------------------------
def archive_dir(tmp_path, config: dict):
    (tmp_path / "model").mkdir()
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_an_unpacked_archive_gives_its_handler_section_and_batching(tmp_path):
    config = ModelConfig(batchSize=16, maxBatchDelay=7, responseTimeout=200,
                         handler=HandlerSettings(reference="none", max_length=128)).to_yaml_dict()
    root, handler, engine = load_settings(archive_dir(tmp_path, config))
    assert root == tmp_path and handler.model_dir == "model"
    assert (handler.reference, handler.max_length) == ("none", 128)
    assert (engine.batch_size, engine.max_batch_delay_ms, engine.response_timeout_s) == (16, 7, 200)


def test_the_command_line_overrides_the_file(tmp_path):
    config = {"batchSize": 16, "handler": {"similarity": "dot"}}
    _, handler, engine = load_settings(archive_dir(tmp_path, config), None, {"similarity": "cos"},
                                       {"batch_size": 4, "explain_workers": 0})
    assert handler.similarity == "cos" and engine.batch_size == 4 and engine.explain_workers == 0
    assert engine.max_batch_delay_ms == EngineSettings().max_batch_delay_ms  # not TorchServe's default 100


def test_a_model_directory_alone_is_served_with_the_defaults(minilm_dir):
    root, handler, engine = load_settings(minilm_dir)
    assert root == minilm_dir and handler.model_dir == "."
    assert handler == HandlerSettings(model_dir=".") and engine == EngineSettings()


def test_a_runtime_from_the_command_line_brings_its_precision(tmp_path):
    config = ModelConfig(handler=HandlerSettings(precision="bf16")).to_yaml_dict()
    _, handler, _ = load_settings(archive_dir(tmp_path, config), None, {"runtime": "onnx", "onnx_file": "/g.onnx"})
    assert (handler.runtime, handler.precision, handler.onnx_file) == ("onnx", "fp32", "/g.onnx")
    _, handler, _ = load_settings(tmp_path, None, {"runtime": "torch"})
    assert handler.precision == "bf16"
    with pytest.raises(SystemExit, match="bf16"):
        load_settings(tmp_path, None, {"runtime": "onnx", "precision": "bf16"})


def test_a_batch_runs_on_every_core_with_onnxruntime_and_on_its_share_with_torch():
    engine = EngineSettings(prediction_threads=2)
    assert (engine.batch_threads("onnx", 8), engine.batch_threads("torch", 8), engine.batch_threads("torch", 1)) == (8, 4, 1)
    assert EngineSettings(prediction_threads=2, torch_threads=3).batch_threads("onnx", 8) == 3
    args = kserve_server.parser().parse_args(["--model_dir", "m", "--runtime", "onnx", "--onnx_file", "g.onnx"])
    assert {k: getattr(args, k) for k in kserve_server.HANDLER_OPTIONS if getattr(args, k) is not None} == {
        "runtime": "onnx", "onnx_file": "g.onnx"}


@pytest.mark.parametrize("config, engine, named", [
    ({"handler": {"refrence": "none"}}, {}, "handler.refrence"),
    ({"responseTimeout": 30}, {}, "time_budget_s"),  # ij's 60 s budget is not below it
    ({}, {"explain_nice": 40}, "explain_nice"),
])
def test_invalid_settings_stop_the_server_naming_them(tmp_path, config, engine, named):
    with pytest.raises(SystemExit, match=named):
        load_settings(archive_dir(tmp_path, config), None, None, engine)


def test_the_command_line_declares_every_engine_setting():
    args = kserve_server.parser().parse_args(["--model_dir", "m", "--batch_size", "3", "--max_batch_delay_ms", "0.5"])
    assert (args.batch_size, args.max_batch_delay_ms, args.http_port, args.enable_grpc) == (3, 0.5, 8085, False)
    assert all(hasattr(args, name) for name in EngineSettings.model_fields)


# -- requests and refusals ---------------------------------------------------------------------------
def test_a_v2_request_parses_as_its_json_does():
    """KServe validates a v2 body into an ``InferRequest``; read through its attributes it is
    the same request, and a bad input is named as in the JSON."""
    settings = HandlerSettings()
    handed_over = InferRequest.from_inference_request(InferenceRequest.model_validate(V2_BODY), "minilm")
    direct = parse_request(V2_BODY, "explain", settings, 6, "minilm")
    via_kserve = parse_request(handed_over, "explain", settings, 6, "minilm")
    assert via_kserve == direct and via_kserve.request_id == "7" and len(via_kserve.items) == 2
    bad = {**V2_BODY, "inputs": [V2_BODY["inputs"][0], {**V2_BODY["inputs"][1], "shape": [5]}]}
    errors = []
    for body in (bad, InferRequest.from_inference_request(InferenceRequest.model_validate(bad), "minilm")):
        with pytest.raises(RequestError) as caught:
            parse_request(body, "explain", settings, 6, "minilm")
        errors.append((caught.value.field, caught.value.detail))
    assert errors[0] == errors[1] and errors[0][0].startswith("inputs.text_b"), errors


def test_a_refusal_is_kserves_invalid_input_and_keeps_status_and_field():
    refused = RequestRefused(RequestError("parameters.layer", "must be an integer in [0, 5]", 413))
    assert isinstance(refused, InvalidInput) and str(refused).startswith("parameters.layer")
    assert (refused.error.status, refused.error.field) == (413, "parameters.layer")


def test_refusals_and_explanations_cross_into_worker_processes_whole():
    error = pickle.loads(pickle.dumps(RequestError("text_a", "no content", 413)))
    assert (error.message, error.field, error.status) == ("text_a: no content", "text_a", 413)
    explanation = Explanation("gae", 0.5, ["[CLS]", "a"], ["[CLS]", "b"], delta=None)
    assert pickle.loads(pickle.dumps(explanation)).to_answer() == explanation.to_answer()


def test_without_explanation_workers_explain_is_not_implemented(tmp_path):
    model = SiameseModel("m", tmp_path, HandlerSettings(), EngineSettings(explain_workers=0),
                         PrometheusRecorder("m", "ij", CollectorRegistry()))
    with pytest.raises(NotImplementedError, match="explainer"):
        asyncio.run(model.explain({"text_a": "a", "text_b": "b"}))


# -- metrics ----------------------------------------------------------------------------------------
def test_every_histogram_has_bounds_chosen_for_it():
    histograms = [spec for spec in (*METRICS, QUEUE) if spec.type == "histogram"]
    assert {spec.name for spec in histograms} == set(BUCKETS)
    for name, bounds in BUCKETS.items():
        assert list(bounds) == sorted(set(bounds)) and bounds[0] > 0, name


def test_prometheus_metrics_are_the_torchserve_handlers():
    """Per request the same samples as the TorchServe handler records per batch: names, labels, values."""
    registry = CollectorRegistry()
    recorder = PrometheusRecorder("minilm", "ij", registry)
    envelope = parse_request({"instances": [{"text_a": "a b", "text_b": "c", "method": "lrp"}]}, "explain",
                             HandlerSettings(), 6)
    explanation = Explanation("lrp", 0.5, ["[CLS]", "a", "b", "[SEP]"], ["[CLS]", "c", "[SEP]"], delta=0.02)
    refusal = RequestError("text_a", "must be a non-empty string")
    recorder.record_request("explain", envelope, [explanation], 200, 0.3)
    recorder.record_request("predict", refusal, [], 400, 0.001)
    recorder.record_batch("explain", 1, [0.002])
    expected = batch_observations("minilm", ["explain", "predict"], [envelope, refusal], [[explanation], []],
                                  [200, 400], 0.3, "ij")
    for obs in expected:
        labels = dict(zip(obs.spec.labels, obs.labels))
        if obs.spec.type == "counter":
            assert registry.get_sample_value(obs.spec.name, labels) == obs.value, obs
        elif obs.spec not in (LATENCY, BATCH_SIZE):  # those two are per request and per batch here
            assert registry.get_sample_value(f"{obs.spec.name}_sum", labels) == pytest.approx(obs.value), obs
    latency = {"model_name": "minilm", "kind": "prediction", "method": "none"}
    assert registry.get_sample_value(f"{LATENCY.name}_sum", latency) == pytest.approx(0.001)
    assert registry.get_sample_value(f"{BATCH_SIZE.name}_count", {"model_name": "minilm"}) == 1
    assert registry.get_sample_value(
        "siamese_queue_seconds_bucket", {"model_name": "minilm", "kind": "explanation", "le": "0.002"}) == 1


def test_kserves_own_reading_of_the_command_line_accepts_ours():
    """kserve parses sys.argv when it is imported, with abbreviations on: an option of ours that
    is the start of one of its own (``--config`` of ``--configure_logging``) stops the server."""
    from kserve import model_server

    theirs = {option for action in model_server.parser._actions for option in action.option_strings}
    ours = [option for action in kserve_server.parser()._actions for option in action.option_strings
            if option.startswith("--") and option not in theirs and option != "--help"]
    assert "--model_config" in ours
    assert [(o, t) for o in ours for t in theirs if t.startswith(o)] == []


# -- deployment ----------------------------------------------------------------------------------------
def test_the_storage_layout_is_an_unpacked_archive(tmp_path):
    out = modelserver.layout("minilm", tmp_path / "minilm", ["--reference", "none"])
    assert (out / "model" / "model.safetensors").is_file() and not list(out.rglob("*.bin"))
    root, handler, engine = load_settings(out)
    assert handler.model_dir == "model" and handler.reference == "none"
    defaults = build_archive.parser().parse_args(["minilm"])
    assert (engine.batch_size, engine.max_batch_delay_ms) == (defaults.batch_size, defaults.max_batch_delay)


def test_an_onnx_layout_holds_its_graph_and_serves_without_a_window(tmp_path):
    out = modelserver.layout("minilm", tmp_path / "minilm", ["--runtime", "onnx"])
    root, handler, engine = load_settings(out)
    assert (handler.runtime, handler.precision) == ("onnx", "fp32") and (root / handler.onnx_file).is_file()
    assert (engine.max_batch_delay_ms, engine.batch_size) == (0, 8)
    _, _, engine = load_settings(out, None, None, {"max_batch_delay_ms": 3})  # the command line still wins
    assert engine.max_batch_delay_ms == 3


def test_committed_modelserver_manifests_are_the_generated_ones_and_consistent(tmp_path):
    generated = modelserver.write("minilm", tmp_path, modelserver.STORAGE_URI, modelserver.IMAGE)
    documents = {}
    for path in generated:
        committed = manifests.OUT / path.name
        assert committed.read_text() == path.read_text(), f"regenerate {committed}"
        documents[path.name] = yaml.safe_load(path.read_text())
    runtime = documents[f"{modelserver.RUNTIME}-runtime.yaml"]["spec"]
    (container,) = runtime["containers"]
    served = kserve_server.parser().parse_args([a.replace("{{.Name}}", "x") for a in container["args"]])
    assert served.explain_workers == 0 and served.http_port == modelserver.HTTP_PORT
    for protocol in manifests.PROTOCOLS:
        isvc = documents[f"minilm-modelserver-{protocol}.yaml"]
        predictor, explainer = isvc["spec"]["predictor"]["model"], isvc["spec"]["explainer"]["containers"][0]
        assert predictor["runtime"] == modelserver.RUNTIME and predictor["protocolVersion"] == protocol
        assert predictor["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
        explaining = kserve_server.parser().parse_args(explainer["args"])
        assert explaining.model_name == isvc["metadata"]["name"]  # KServe routes :explain by that name
        assert explaining.explain_workers >= 1 and explaining.http_port == modelserver.HTTP_PORT
        assert {"name": "STORAGE_URI", "value": predictor["storageUri"]} in explainer["env"]
        assert isvc["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(modelserver.HTTP_PORT)


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
