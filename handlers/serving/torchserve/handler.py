"""TorchServe entry point: each TorchServe batch goes through the shared ``service.Service``
(parse -> admission -> group -> compute -> answer), then its metrics are recorded.

Each request of a batch is parsed on its own; an invalid one is answered with its 4xx while
the others are computed together and answered in order. The management API's
``GET /models/{name}?customized=true`` reaches ``describe``: what the worker actually runs
(the precision of predictions, and why it differs from the archive's, the device and threads).
"""
from __future__ import annotations

import dataclasses

import logging
import time
from typing import Any

import torch

from handlers.serving.device import place
from handlers.serving.torchserve.metrics import MetricsRecorder
from handlers.serving.pools import cpu_threads, lower_priority
from handlers.serving.protocol import Kind
from handlers.serving.service import Service, reply
from handlers.serving.settings import ModelConfig

log = logging.getLogger(__name__)


def _request_body(request: dict) -> Any:
    for key in ("data", "body"):
        if key in request and request[key] is not None:
            return request[key]
    return None


def is_describe(context) -> bool:
    """TorchServe's describe call (``?customized=true``) arrives alone, with this header."""
    return context.get_request_header(0, "describe") == "True"


def request_kind(context, idx: int) -> Kind:
    return "explain" if context.get_request_header(idx, "explain") == "True" else "predict"


class SiameseHandler:
    """Serves similarity predictions and explanations of one bi-encoder archive."""

    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context) -> None:
        properties = context.system_properties
        config = ModelConfig.from_yaml(context.model_yaml_config)
        self.settings = config.handler
        lower_priority(self.settings.pool.nice)  # before torch starts its thread pools, which inherit it
        # TorchServe gives a worker its GPU (gpu_id); a worker without one stays on the CPU
        self.device = place(cpu_threads(self.settings.pool, config.min_workers), properties.get("gpu_id"),
                            gpu_without_id=False)
        self.model_name = context.model_name
        # with explanations, sets every method up (hooks installed once) and times it for admission
        version = str((context.manifest or {}).get("model", {}).get("modelVersion", ""))
        self.service = Service.load(properties["model_dir"], self.settings, config.response_timeout,
                                    self.device, self.model_name, explanations=self.settings.pool.explanations,
                                    model_version=version)
        self.encoder = self.service.encoder
        self.metrics = MetricsRecorder(context, self.settings.explanation.method)
        self.initialized = True

    def describe(self) -> dict[str, Any]:
        """What this worker runs, for the management API's describe call (``customizedMetadata``)."""
        return {
            "family": self.encoder.adapter.family,
            "reference": self.encoder.reference,
            "similarity": self.encoder.similarity,
            "max_length": self.encoder.max_length,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "runtime": self.settings.runtime,
            "precision": self.encoder.precision.describe(),
            "explanations": {"precision": "fp32"},
            # the explanation checks passed at load: each method's relative completeness error, their time
            "readiness": dataclasses.asdict(self.service.readiness) if self.service.readiness else None,
            "cache": {"max_bytes": self.service.cache.max_bytes, "held_bytes": self.service.cache.held_bytes,
                      "entries": len(self.service.cache)},
        }

    # -- one TorchServe batch ---------------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[Any]:
        if is_describe(context):
            return [self.describe()]
        started = time.perf_counter()
        kinds = [request_kind(context, idx) for idx in range(len(data))]
        envelopes = [self.service.parse(_request_body(request), kind) for request, kind in zip(data, kinds)]
        results = self.service.answer_items(envelopes)
        responses = []
        for idx, (envelope, answers) in enumerate(zip(envelopes, results)):
            context.set_response_content_type(idx, "application/json")
            answer = reply(envelope, answers)
            if answer.error is not None:
                context.set_response_status(code=answer.status, phrase=answer.error.message, idx=idx)
            responses.append(answer.body)
        self.metrics.record_batch(kinds, envelopes, results, context, time.perf_counter() - started)
        return responses
