"""The handlers' metrics: metrics.yaml against handlers/serving/metrics.py, what one batch records, and
what a real TorchServe exposes on /metrics (parsed with prometheus_client's parser)."""
from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import ts
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.attribution import Explanation
from handlers.serving.settings import HandlerSettings
from handlers.serving.metrics import (
    BATCH_SIZE, COMPLETENESS, CONVERGED, LATENCY, METRICS, NODES, REQUESTS, TOKENS,
    completeness_digits, batch_observations,
)
from handlers.serving.torchserve.metrics import MetricsRecorder
from handlers.serving.protocol import RequestError, parse_request
from handlers.tools import traffic
from handlers.tools.traffic import PAIRS
from handlers.tools.sources import ROOT
from tests.support.http import Samples, delta, headers_of, scrape, select

TS_DEFAULTS = Path(ts.__file__).parent / "configs" / "metrics.yaml"
SETTINGS = HandlerSettings()
MODEL = "minilm"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# -- metrics.yaml ---------------------------------------------------------------------------
def test_metrics_yaml_keeps_torchserve_defaults():
    ours, defaults = load_yaml(ROOT / "metrics.yaml"), load_yaml(TS_DEFAULTS)
    assert ours["ts_metrics"] == defaults["ts_metrics"]
    for metric_type, entries in defaults["model_metrics"].items():
        for entry in entries:
            assert entry in ours["model_metrics"][metric_type]


def test_metrics_yaml_declares_exactly_the_handler_metrics():
    model_metrics = load_yaml(ROOT / "metrics.yaml")["model_metrics"]
    declared = {
        entry["name"]: (metric_type, entry["unit"], tuple(entry["dimensions"]))
        for metric_type, entries in model_metrics.items() for entry in entries
        if entry["name"].startswith("siamese_")
    }
    assert declared == {spec.name: (spec.type, spec.unit, spec.labels) for spec in METRICS}


def test_config_properties_points_at_metrics_yaml():
    props = dict(
        line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert props["metrics_mode"] == "prometheus"
    assert (ROOT / props["metrics_config"]).is_file()


# -- one batch ------------------------------------------------------------------------------
def parsed(body, kind):
    try:
        return parse_request(body, kind, SETTINGS, num_layers=6)
    except RequestError as error:
        return error


def answer(method: str, delta: float | None = None, **extras) -> Explanation:
    return Explanation(method, 0.5, ["[CLS]", "a", "[SEP]"], ["[CLS]", "b", "c", "[SEP]"], delta=delta,
                       extras=extras, elapsed_ms=5.0)


def test_batch_observations_count_requests_and_read_answers():
    pair = {"text_a": "a", "text_b": "b c"}
    kinds = ["predict", "predict", "explain", "explain", "explain", "explain"]
    envelopes = [
        parsed(pair, "predict"),
        parsed(b"{bad", "predict"),
        parsed(pair, "explain"),  # the archive's default method (ij)
        parsed({"instances": [{**pair, "method": "ij"}, {**pair, "method": "lrp"}]}, "explain"),
        parsed({**pair, "method": "gae"}, "explain"),
        parsed({**pair, "steps": "many"}, "explain"),  # does not parse: its method is unknown
    ]
    results = [
        [{"score": 0.5}],
        [],
        [answer("ij", 0.01, steps=7, converged=True)],
        [answer("ij", 0.02, steps=300, converged=False), answer("lrp", 0.5)],
        [RequestError("method", "not available", 501)],
        [],
    ]
    statuses = [200, 400, 200, 200, 501, 400]
    observations = batch_observations(MODEL, kinds, envelopes, results, statuses, 0.25, "ij")
    by_spec: dict[str, list] = {}
    for obs in observations:
        by_spec.setdefault(obs.spec.name, []).append((obs.labels, obs.value))

    assert Counter(dict(by_spec[REQUESTS.name])) == Counter({
        (MODEL, "prediction", "none", "200"): 1,
        (MODEL, "prediction", "none", "400"): 1,
        (MODEL, "explanation", "ij", "200"): 1,
        (MODEL, "explanation", "mixed", "200"): 1,
        (MODEL, "explanation", "gae", "501"): 1,
        (MODEL, "explanation", "unknown", "400"): 1,
    })
    assert by_spec[BATCH_SIZE.name] == [((MODEL,), 6)]
    assert sorted(by_spec[LATENCY.name]) == sorted(
        ((MODEL, kind, method), 0.25) for kind, method in [
            ("prediction", "none"), ("prediction", "none"), ("explanation", "ij"),
            ("explanation", "mixed"), ("explanation", "gae"), ("explanation", "unknown")]
    )
    # relative errors: the answers' score is 0.5
    assert sorted(by_spec[COMPLETENESS.name]) == [
        ((MODEL, "ij"), pytest.approx(-math.log10(0.04))), ((MODEL, "ij"), pytest.approx(-math.log10(0.02))),
        ((MODEL, "lrp"), 0.0)]
    assert sorted(by_spec[NODES.name]) == [((MODEL, "ij"), 0.07), ((MODEL, "ij"), 3.0)]
    assert sorted(by_spec[CONVERGED.name]) == [((MODEL, "ij", "false"), 1), ((MODEL, "ij", "true"), 1)]
    assert sorted(by_spec[TOKENS.name]) == [((MODEL, "ij"), 7), ((MODEL, "ij"), 7), ((MODEL, "lrp"), 7)]
    for obs in observations:
        assert len(obs.labels) == len(obs.spec.labels)


METRIC_LINE = re.compile(r"\[METRICS\](?P<name>\w+)\.(?P<unit>\w+):(?P<value>[-\d.e]+)\|#(?P<dims>[^|]*)\|#type:(?P<type>\w+)")


def recorded_lines(caplog, config: Path, kinds: list[str]) -> list[dict]:
    """Run a MetricsRecorder on TorchServe's own metrics cache and context; parse what it logs."""
    cache = MetricsCacheYamlImpl(config_file_path=str(config))
    cache.initialize_cache()
    context = Context(MODEL, "/tmp", {}, len(kinds), None, "0.12.0", metrics=cache)
    context.request_processor = [RequestProcessor({"explain": str(k == "explain")}) for k in kinds]
    recorder = MetricsRecorder(context, default_method="ij")
    pair = {"text_a": "a", "text_b": "b c"}
    envelopes = [parsed(pair, kind) for kind in kinds]
    results = [[answer("ij", 0.01, steps=7)] if k == "explain" else [{"score": 0.5}]
               for k in kinds]
    context.set_response_status(code=404, idx=0)
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        recorder.record_batch(kinds, envelopes, results, context, 0.125)
    return [m.groupdict() for r in caplog.records if (m := METRIC_LINE.search(r.getMessage()))]


def test_recorder_writes_torchserve_metric_lines(caplog):
    lines = recorded_lines(caplog, ROOT / "metrics.yaml", ["predict", "explain", "explain"])
    requests_lines = [line for line in lines if line["name"] == REQUESTS.name]
    assert sorted((line["dims"], line["value"]) for line in requests_lines) == [
        ("model_name:minilm,kind:explanation,method:ij,status:200", "2"),
        ("model_name:minilm,kind:prediction,method:none,status:404", "1"),
    ]
    assert {line["type"] for line in requests_lines} == {"COUNTER"}
    histograms = Counter(line["name"] for line in lines if line["type"] == "HISTOGRAM")
    assert histograms == Counter({LATENCY.name: 3, COMPLETENESS.name: 2, NODES.name: 2,
                                  TOKENS.name: 2, BATCH_SIZE.name: 1})


def test_recorder_declares_its_metrics_under_torchserves_default_config(caplog):
    """An archive served with TorchServe's own metrics.yaml still records (auto-detect mode)."""
    lines = recorded_lines(caplog, TS_DEFAULTS, ["predict"])
    assert {line["name"] for line in lines} == {REQUESTS.name, LATENCY.name, BATCH_SIZE.name}


def test_recorder_without_torchserve_records_nothing():
    recorder = MetricsRecorder(None, default_method="ij")
    recorder.record_batch(["predict"], [parsed({"text_a": "a", "text_b": "b"}, "predict")], [[{}]], None, 0.1)
    assert recorder.metrics == {}


# -- a real TorchServe ----------------------------------------------------------------------
def wait_for_requests(server, before: Samples, expected: int, timeout: float = 30) -> Samples:
    """/metrics once the frontend has taken in every request's metric lines."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(server)
        seen = sum(delta(after, before, REQUESTS.name, (), model_name=MODEL).values())
        if seen >= expected or time.monotonic() > deadline:
            return after
        time.sleep(0.2)


@pytest.mark.server
def test_metrics_endpoint_counts_what_was_sent(server):
    before = scrape(server)
    sent = traffic.run(server.inference, MODEL, headers=headers_of(server))
    after = wait_for_requests(server, before, sum(sent.requests.values()))

    counted = delta(after, before, REQUESTS.name, ("kind", "method", "status"), model_name=MODEL)
    assert counted == sent.requests
    ts_total = delta(after, before, "ts_inference_requests_total", (), model_name=MODEL)
    assert ts_total[()] == sum(sent.requests.values())

    by_kind_method: Counter = Counter()
    for (kind, method, _), n in sent.requests.items():
        by_kind_method[(kind, method)] += n
    assert delta(after, before, f"{LATENCY.name}_count", ("kind", "method"), model_name=MODEL) == by_kind_method
    assert delta(after, before, f"{LATENCY.name}_sum", (), model_name=MODEL)[()] > 0

    explained = sent.explanations
    assert explained, "no explanation method answered"
    tokens = delta(after, before, f"{TOKENS.name}_sum", (), model_name=MODEL)[()]
    assert tokens == sum(len(e["tokens_a"]) + len(e["tokens_b"]) for e in explained)
    assert delta(after, before, f"{TOKENS.name}_count", (), model_name=MODEL)[()] == len(explained)
    digits = [completeness_digits(e.get("attribution_error", e.get("conservation_error")) / abs(e["score"]))
              for e in explained if "attribution_error" in e or "conservation_error" in e]
    nodes = [e["steps"] / 100 for e in explained if "steps" in e]
    converged = Counter(str(e["converged"]).lower() for e in explained if isinstance(e.get("converged"), bool))
    for spec, values in ((COMPLETENESS, digits), (NODES, nodes)):
        assert delta(after, before, f"{spec.name}_count", (), model_name=MODEL)[()] == len(values)
        assert delta(after, before, f"{spec.name}_sum", (), model_name=MODEL)[()] == pytest.approx(sum(values), rel=1e-5)
    assert delta(after, before, CONVERGED.name, ("converged",), model_name=MODEL) == Counter(
        {(k,): v for k, v in converged.items()})
    batches = delta(after, before, f"{BATCH_SIZE.name}_sum", (), model_name=MODEL)[()]
    assert batches == sum(sent.requests.values())  # every request was in some batch

    # Histograms are cumulative with +Inf == count; labels are the declared ones, values bounded.
    texts = {t for pair in PAIRS for t in pair}
    for spec in METRICS:
        suffix = "_count" if spec.type == "histogram" else ""
        for key in select(after, spec.name + suffix):
            assert set(dict(key)) == {*spec.labels, "Hostname"}
            assert not texts & set(dict(key).values())
        if spec.type == "histogram":
            for key, count in select(after, f"{spec.name}_count").items():
                buckets = sorted(
                    (float(dict(k)["le"]), v) for k, v in select(after, f"{spec.name}_bucket", **dict(key)).items()
                )
                assert [v for _, v in buckets] == sorted(v for _, v in buckets)
                assert buckets[-1] == (float("inf"), count)
