"""The metrics both engines export: names, labels, and what a batch or a request contributes
(``Observation``). TorchServe records them through its metrics API (``torchserve.metrics``),
KServe's model server through prometheus_client (``kserve.metrics``).

Every metric is declared here (``METRICS``) and, for TorchServe's frontend to expose it in
Prometheus format, in the ``model_metrics`` section of the server's metrics.yaml
(config.properties: ``metrics_config=metrics.yaml``) with the same type and labels in the same
order; tests/test_metrics.py checks that both agree. The frontend adds a ``Hostname`` label.

Histograms are observed by TorchServe's Prometheus client with its fixed default buckets
(0.005 … 10), so each value is recorded in units those buckets spread: latencies in seconds,
completeness as its number of correct digits (−log10 of the relative error), path nodes in
hundreds. For the count-like histograms (tokens, batch size) the buckets are coarse; their
``_sum / _count`` is the mean.

Values come from the parsed requests, the typed results (``attribution.Explanation``: its
completeness ``delta``, its tokens, ij's ``steps``) and the statuses the engine sends,
never from method-specific code: a method that lands later is covered as soon as it fills
``delta``. Label values are bounded (no text, no request ids): ``kind`` is
``prediction`` or ``explanation``, ``method`` a method name (``none`` for predictions,
``mixed`` for a KServe request whose instances use several methods, ``unknown`` for an
explanation request that did not parse), ``status`` the HTTP status code.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from ..attribution import Explanation
from .protocol import Envelope, ExplainItem, Kind, RequestError

MetricType = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: MetricType
    unit: str
    labels: tuple[str, ...]
    help: str


PER_METHOD = ("model_name", "method")
METRICS: tuple[MetricSpec, ...] = (
    REQUESTS := MetricSpec("siamese_requests_total", "counter", "Count", ("model_name", "kind", "method", "status"),
                           "requests answered, by kind, method and HTTP status"),
    LATENCY := MetricSpec("siamese_request_latency_seconds", "histogram", "Seconds", ("model_name", "kind", "method"),
                          "per request: seconds from the start of its TorchServe batch in the worker to its answer"),
    COMPLETENESS := MetricSpec("siamese_completeness_digits", "histogram", "Digits", PER_METHOD,
                               "per explanation that promises completeness (ij, lrp): -log10 of "
                               "|sum of relevance - score| / |score| (3 = a relative error of 1e-3)"),
    TOKENS := MetricSpec("siamese_explanation_tokens", "histogram", "Count", PER_METHOD,
                         "per explanation: len(tokens_a) + len(tokens_b)"),
    NODES := MetricSpec("siamese_explanation_nodes", "histogram", "Hundreds", PER_METHOD,
                        "per explanation with path nodes (ij): nodes on the longer-worked side, in hundreds"),
    CONVERGED := MetricSpec("siamese_explanations_converged_total", "counter", "Count",
                            ("model_name", "method", "converged"),
                            "explanations that report convergence (ij), by whether they met their tolerance"),
    BATCH_SIZE := MetricSpec("siamese_batch_size", "histogram", "Count", ("model_name",),
                             "requests per TorchServe batch"),
    CACHE := MetricSpec("siamese_explanation_cache_total", "counter", "Count", ("model_name", "method", "outcome"),
                        "served explanations answered from the worker's cache (outcome hit) or computed "
                        "(miss), and the cached explanations evicted to store them (eviction)"),
)

KIND_LABEL: dict[Kind, str] = {"predict": "prediction", "explain": "explanation"}


def request_method(kind: Kind, envelope: Envelope | RequestError, default_method: str) -> str:
    """The ``method`` label of one request."""
    if kind == "predict":
        return "none"
    if isinstance(envelope, RequestError):
        return "unknown"
    methods = {
        item.method or default_method for item in envelope.items if isinstance(item, ExplainItem)
    }
    if not methods:
        return "none"
    return methods.pop() if len(methods) == 1 else "mixed"


@dataclass
class Observation:
    spec: MetricSpec
    value: float
    labels: tuple[str, ...]


def batch_observations(
    model_name: str,
    kinds: list[Kind],
    envelopes: list[Envelope | RequestError],
    results: list[list[Any]],
    statuses: list[int],
    seconds: float,
    default_method: str,
) -> list[Observation]:
    """What one batch contributes to each metric (counters summed per label set)."""
    observations = [Observation(BATCH_SIZE, len(envelopes), (model_name,))]
    requests: Counter[tuple[str, ...]] = Counter()
    for kind, envelope, answers, status in zip(kinds, envelopes, results, statuses):
        for obs in request_observations(model_name, kind, envelope, answers, status, seconds, default_method):
            if obs.spec is REQUESTS:
                requests[obs.labels] += 1
            else:
                observations.append(obs)
    observations.extend(Observation(REQUESTS, n, labels) for labels, n in requests.items())
    return observations


def request_observations(
    model_name: str,
    kind: Kind,
    envelope: Envelope | RequestError,
    answers: list[Any],
    status: int,
    seconds: float,
    default_method: str,
) -> list[Observation]:
    """What one answered request contributes: its count, its latency, its explanations."""
    method = request_method(kind, envelope, default_method)
    observations = [
        Observation(REQUESTS, 1, (model_name, KIND_LABEL[kind], method, str(status))),
        Observation(LATENCY, seconds, (model_name, KIND_LABEL[kind], method)),
    ]
    for answer in answers:
        if isinstance(answer, Explanation):
            observations.extend(explanation_observations(model_name, answer))
    return observations


def explanation_observations(model_name: str, explanation: Explanation) -> Iterable[Observation]:
    """What one explanation contributes, whatever its method."""
    labels = (model_name, explanation.method)
    yield Observation(TOKENS, len(explanation.tokens_a) + len(explanation.tokens_b), labels)
    if explanation.relative_delta is not None:
        yield Observation(COMPLETENESS, completeness_digits(explanation.relative_delta), labels)
    if isinstance(explanation.extras.get("steps"), int):
        yield Observation(NODES, explanation.extras["steps"] / 100.0, labels)
    if isinstance(explanation.extras.get("converged"), bool):
        yield Observation(CONVERGED, 1, (*labels, str(explanation.extras["converged"]).lower()))
    if explanation.cached is not None:
        yield Observation(CACHE, 1, (*labels, "hit" if explanation.cached else "miss"))
    if explanation.evictions:
        yield Observation(CACHE, explanation.evictions, (*labels, "eviction"))


def completeness_digits(relative_error: float) -> float:
    """−log10 of a relative error, within [0, 16] (16: exact in float64)."""
    return min(16.0, max(0.0, -math.log10(relative_error))) if relative_error > 0 else 16.0
