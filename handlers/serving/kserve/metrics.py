"""The project's metrics through prometheus_client, for KServe's model server.

KServe's model server exposes the client's default registry on ``/metrics`` (its own
``request_predict_seconds``, ``request_explain_seconds``, ... histograms); the model adds the
project's metrics there: the same names, labels and values as the TorchServe handler's
(``metrics.METRICS``, ``metrics.request_observations``), so that one dashboard reads both
engines. TorchServe 0.12 observes every histogram with the client's default buckets; here each
metric has bounds chosen for what it measures (``BUCKETS``). One metric is this engine's own:
``siamese_queue_seconds``, the time a request waits in the model's collection window
(TorchServe's counterpart is its frontend's ``ts_queue_latency_microseconds``).
"""
from __future__ import annotations

import logging
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ..metrics import (
    BATCH_SIZE, COMPLETENESS, KIND_LABEL, LATENCY, METRICS, NODES, TOKENS, MetricSpec, Observation,
    request_observations,
)
from ..protocol import Envelope, Kind, RequestError

log = logging.getLogger(__name__)

QUEUE = MetricSpec("siamese_queue_seconds", "histogram", "Seconds", ("model_name", "kind"),
                   "per request: seconds from its arrival in the model to the start of its batch "
                   "(the collection window, and any wait for a free slot)")

#: upper bounds per histogram, chosen for what each measures
BUCKETS: dict[str, tuple[float, ...]] = {
    # predictions take milliseconds, explanations up to their time budgets (60 s by default)
    LATENCY.name: (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120, 300),
    # correct digits of completeness, -log10(|sum of relevance - score| / |score|): 3 = 1e-3
    COMPLETENESS.name: (0.5, 1, 1.5, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16),
    # both texts, up to max_length (256) tokens each
    TOKENS.name: (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
    # ij's path nodes per side, in hundreds: a fixed rule's steps, adaptive G10/K21 panels (21,
    # 63, 105, 147, … nodes); max_steps is 1000
    NODES.name: (0.04, 0.08, 0.16, 0.21, 0.32, 0.5, 0.63, 1.05, 1.47, 2.1, 4.2, 6.3, 10),
    # requests per batch, up to a collection window's batch size
    BATCH_SIZE.name: (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
    # the collection window is milliseconds; a wait for a busy slot can be much longer
    QUEUE.name: (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5, 30),
}


class PrometheusRecorder:
    """Records each answered request and each batch in ``registry`` (the default one: KServe's
    ``/metrics``). Never raises: metrics must not cost an answer."""

    def __init__(self, model_name: str, default_method: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.model_name = model_name
        self.default_method = default_method
        self.metrics = {spec.name: self._declare(spec, registry) for spec in (*METRICS, QUEUE)}

    @staticmethod
    def _declare(spec: MetricSpec, registry: CollectorRegistry) -> Any:
        if spec.type == "counter":  # the client appends _total itself
            return Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=registry)
        if spec.type == "gauge":
            return Gauge(spec.name, spec.help, spec.labels, registry=registry)
        return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=BUCKETS[spec.name])

    def record_request(
        self, kind: Kind, envelope: Envelope | RequestError, answers: list, status: int, seconds: float
    ) -> None:
        try:
            for obs in request_observations(self.model_name, kind, envelope, answers, status, seconds,
                                            self.default_method):
                self._observe(obs)
        except Exception:
            log.exception("recording metrics failed")

    def record_batch(self, kind: Kind, size: int, waits: list[float]) -> None:
        try:
            self._observe(Observation(BATCH_SIZE, size, (self.model_name,)))
            for wait in waits:
                self._observe(Observation(QUEUE, wait, (self.model_name, KIND_LABEL[kind])))
        except Exception:
            log.exception("recording metrics failed")

    def _observe(self, obs: Observation) -> None:
        metric = self.metrics[obs.spec.name].labels(*obs.labels)
        if obs.spec.type == "counter":
            metric.inc(obs.value)
        elif obs.spec.type == "gauge":
            metric.set(obs.value)
        else:
            metric.observe(obs.value)
