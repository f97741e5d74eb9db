"""TorchServe entry point: wires protocol -> admission -> core, per TorchServe batch.

Each request of a batch is parsed on its own; an invalid one is answered with its 4xx while
the others are computed together (predictions in one padded pass over the distinct texts,
explanations grouped by method and options) and answered in order. The management API's
``GET /models/{name}?customized=true`` reaches ``describe``: what the worker actually runs
(the precision of predictions, and why it differs from the archive's, the device and threads).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from handlers.attribution import Explanation, method_of
from handlers.encoder import load_encoder
from handlers.errors import ExplanationError
from handlers.serving.admission import Admission
from handlers.serving.metrics import MetricsRecorder
from handlers.serving.onnx_rows import OnnxRows
from handlers.serving.pools import cpu_threads, lower_priority
from handlers.serving.predictions import predict_items
from handlers.serving.protocol import Envelope, ExplainItem, Kind, RequestError, parse_request
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
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(cpu_threads(self.settings.pool, config.min_workers))
        self.encoder = load_encoder(
            os.path.join(properties["model_dir"], self.settings.model_dir),
            reference=self.settings.reference,
            similarity=self.settings.similarity,
            max_length=self.settings.max_length,
            device=self.device,
            precision=self.settings.precision,
            native_bf16=None if self.settings.native_bf16 == "detect" else False,
        )
        if self.encoder.precision.reason:
            log.warning("predictions in %s, not %s: %s", self.encoder.precision.used,
                        self.encoder.precision.requested, self.encoder.precision.reason)
        self.embed_rows = (  # predictions only; explanations keep torch
            OnnxRows(os.path.join(properties["model_dir"], self.settings.onnx_file), self.device)
            if self.settings.runtime == "onnx" else None
        )
        self.admission = Admission(self.encoder, self.settings, float(config.response_timeout))
        if self.settings.pool.explanations:
            self.admission.calibrate()  # sets every method up (hooks installed once) and times it
        self.metrics = MetricsRecorder(context, self.settings.explanation.method)
        self.model_name = context.model_name
        self.initialized = True
        log.info(
            "loaded %s (%s, %d layers) on %s: reference=%s similarity=%s max_length=%d predictions=%s/%s",
            self.settings.model_dir, self.encoder.adapter.family, self.encoder.num_layers,
            self.device, self.settings.reference, self.settings.similarity, self.encoder.max_length,
            self.settings.runtime, self.encoder.precision.used,
        )

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
        }

    # -- one TorchServe batch ---------------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[Any]:
        if is_describe(context):
            return [self.describe()]
        started = time.perf_counter()
        kinds = [request_kind(context, idx) for idx in range(len(data))]
        envelopes = [self._parse(request, kind) for request, kind in zip(data, kinds)]
        results = self._answer_items(envelopes)
        responses = []
        for idx, envelope in enumerate(envelopes):
            context.set_response_content_type(idx, "application/json")
            error = envelope if isinstance(envelope, RequestError) else next(
                (r for r in results[idx] if isinstance(r, RequestError)), None
            )
            if error is not None:
                context.set_response_status(code=error.status, phrase=error.message, idx=idx)
                responses.append(error.body())
            else:
                responses.append(envelope.answer(results[idx]))
        self.metrics.record_batch(kinds, envelopes, results, context, time.perf_counter() - started)
        return responses

    def _parse(self, request: dict, kind: Kind) -> Envelope | RequestError:
        pool = self.settings.pool
        if kind == "explain" and not pool.explanations:
            return RequestError.elsewhere(pool.explanation_model or "")
        try:
            return parse_request(
                _request_body(request), kind, self.settings, self.encoder.num_layers, self.model_name
            )
        except RequestError as error:
            return error

    def _answer_items(self, envelopes: list[Envelope | RequestError]) -> list[list[Any]]:
        """Per request, one result per item: an answer dict, an ``Explanation`` or a RequestError."""
        results: list[list[Any]] = [
            [None] * len(e.items) if isinstance(e, Envelope) else [] for e in envelopes
        ]
        parsed = [
            (i, j, item) for i, envelope in enumerate(envelopes) if isinstance(envelope, Envelope)
            for j, item in enumerate(envelope.items)
        ]
        groups: dict[Any, list[tuple[int, int, Any]]] = {}
        for (i, j, item), refusal in zip(parsed, self.admission.check_batch([e[2] for e in parsed])):
            if refusal is not None:
                results[i][j] = envelopes[i].locate(refusal, j)
            elif isinstance(item, ExplainItem):
                key = (item.method_name(self.settings), item.options(self.settings))
                groups.setdefault(key, []).append((i, j, item))
            else:
                groups.setdefault("predict", []).append((i, j, item))
        for key, entries in groups.items():
            items = [item for _, _, item in entries]
            answers = self._compute(key, items)
            for (i, j, _), answer in zip(entries, answers):
                results[i][j] = envelopes[i].locate(answer, j) if isinstance(answer, RequestError) else answer
        return results

    def _compute(self, key: Any, items: list) -> list[dict | Explanation | RequestError]:
        """The answers of one group: the predictions, or the explanations of one method and options."""
        try:
            if key == "predict":
                return predict_items(self.encoder, items, self.embed_rows)
            method, options = key
            explanations = method_of(self.encoder, method).attribute([(it.text_a, it.text_b) for it in items], options)
            self.admission.observe(method, options, explanations)
            return explanations
        except ExplanationError as error:
            return [RequestError.of(error)] * len(items)
        except Exception:  # a bug must cost these requests, not the worker
            log.exception("%s failed for %d items", key, len(items))
            return [RequestError("internal error; see the model log", "", 500)] * len(items)
