"""TorchServe's side of the metrics: each answered batch recorded into the worker's metrics cache
(the definitions and what a batch contributes are the engines' common part, ``serving.metrics``)."""
from __future__ import annotations

import logging
from typing import Any

from ..metrics import METRICS, MetricSpec, batch_observations
from ..protocol import Envelope, Kind, RequestError

log = logging.getLogger(__name__)


class MetricsRecorder:
    """Records the metrics of each batch into TorchServe's metrics cache (``context.metrics``).

    Without a metrics cache (the handler used outside TorchServe) it records nothing. Metrics
    missing from the server's metrics.yaml are added to the worker's cache, so the handler
    runs under any metrics config; the frontend exposes them only when metrics.yaml declares
    them (or with ``model_metrics_auto_detect=true``).
    """

    def __init__(self, context, default_method: str) -> None:
        self.cache = getattr(context, "metrics", None)
        self.model_name = str(getattr(context, "model_name", "") or "")
        self.default_method = default_method
        self.metrics = {spec.name: self._declare(spec) for spec in METRICS} if self.cache else {}

    def _declare(self, spec: MetricSpec):
        from ts.metrics.metric_cache_errors import MetricsCacheKeyError
        from ts.metrics.metric_type_enum import MetricTypes

        metric_type = MetricTypes(spec.type)
        try:
            metric = self.cache.get_metric(spec.name, metric_type)
            if tuple(metric.dimension_names) == spec.labels:
                return metric
            log.warning("metrics.yaml declares %s with labels %s; using %s",
                        spec.name, metric.dimension_names, list(spec.labels))
        except MetricsCacheKeyError:
            pass
        return self.cache.add_metric_to_cache(spec.name, spec.unit, list(spec.labels), metric_type)

    def record_batch(
        self,
        kinds: list[Kind],
        envelopes: list[Envelope | RequestError],
        results: list[list[Any]],
        context,
        seconds: float,
    ) -> None:
        """Record one answered batch; statuses are read back from ``context``. Never raises."""
        if not self.metrics:
            return
        try:
            statuses = [context.get_response_status(idx)[0] for idx in range(len(envelopes))]
            for obs in batch_observations(self.model_name, kinds, envelopes, results, statuses,
                                          seconds, self.default_method):
                self.metrics[obs.spec.name].add_or_update(obs.value, list(obs.labels))
        except Exception:  # metrics must never cost an answer
            log.exception("recording metrics failed")
