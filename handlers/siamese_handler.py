"""TorchServe entry point: wires protocol -> encoder -> attribution, per TorchServe batch.

Each request of a batch is parsed on its own; an invalid one is answered with its 4xx while
the others are computed together (predictions in one padded pass over the distinct texts,
explanations grouped by method) and answered in order.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from handlers.admission import TORCHSERVE_RESPONSE_TIMEOUT_S, Admission
from handlers.attribution import explain_items, prepare_methods
from handlers.config import HandlerSettings
from handlers.encoder import load_encoder
from handlers.inference import predict_items
from handlers.metrics import MetricsRecorder
from handlers.onnx_runtime import OnnxRows
from handlers.protocol import Envelope, ExplainItem, Kind, RequestError, parse_request

log = logging.getLogger(__name__)


def _request_body(request: dict) -> Any:
    for key in ("data", "body"):
        if key in request and request[key] is not None:
            return request[key]
    return None


def request_kind(context, idx: int) -> Kind:
    return "explain" if context.get_request_header(idx, "explain") == "True" else "predict"


def _threads_per_worker(model_yaml: dict) -> int:
    workers = int(model_yaml.get("minWorkers") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class SiameseHandler:
    """Serves similarity predictions and explanations of one bi-encoder archive."""

    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_yaml = context.model_yaml_config or {}
        self.settings = HandlerSettings.from_model_yaml(model_yaml)
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(_threads_per_worker(model_yaml))
        self.encoder = load_encoder(
            os.path.join(properties["model_dir"], self.settings.model_dir),
            reference=self.settings.reference,
            similarity=self.settings.similarity,
            max_length=self.settings.max_length,
            device=self.device,
        )
        self.embed_rows = (  # predictions only; explanations keep torch
            OnnxRows(os.path.join(properties["model_dir"], self.settings.onnx_file), self.device)
            if self.settings.runtime == "onnx" else None
        )
        prepare_methods(self.encoder)
        self.admission = Admission(
            self.encoder, self.settings.explanation,
            float(model_yaml.get("responseTimeout", TORCHSERVE_RESPONSE_TIMEOUT_S)),
        )
        self.admission.calibrate()
        self.metrics = MetricsRecorder(context, self.settings.explanation.method)
        self.model_name = context.model_name
        self.initialized = True
        log.info(
            "loaded %s (%s, %d layers) on %s: reference=%s similarity=%s max_length=%d",
            self.settings.model_dir, self.encoder.adapter.family, self.encoder.num_layers,
            self.device, self.settings.reference, self.settings.similarity, self.encoder.max_length,
        )

    # -- one TorchServe batch ---------------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[Any]:
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
        try:
            return parse_request(
                _request_body(request), kind, self.settings, self.encoder.num_layers, self.model_name
            )
        except RequestError as error:
            return error

    def _answer_items(self, envelopes: list[Envelope | RequestError]) -> list[list[Any]]:
        """Per request, one result per item: the answer dict or a RequestError."""
        results: list[list[Any]] = [
            [None] * len(e.items) if isinstance(e, Envelope) else [] for e in envelopes
        ]
        groups: dict[str, list[tuple[int, int, Any]]] = {"predict": [], "explain": []}
        parsed = [
            (i, j, item.resolved(self.settings, self.encoder.num_layers) if isinstance(item, ExplainItem) else item)
            for i, envelope in enumerate(envelopes) if isinstance(envelope, Envelope)
            for j, item in enumerate(envelope.items)
        ]
        for (i, j, item), refusal in zip(parsed, self.admission.check_batch([e[2] for e in parsed])):
            if refusal is None:
                groups[envelopes[i].kind].append((i, j, item))
            else:
                results[i][j] = envelopes[i].locate(refusal, j)
        for kind, entries in groups.items():
            if not entries:
                continue
            items = [item for _, _, item in entries]
            try:
                if kind == "predict":
                    answers = predict_items(self.encoder, items, self.embed_rows)
                else:
                    answers = explain_items(self.encoder, items, self.settings.explanation)
                    self.admission.observe(items, answers)
            except Exception:  # a bug must cost these requests, not the worker
                log.exception("%s failed for %d items", kind, len(items))
                answers = [RequestError("internal error; see the model log", "", 500)] * len(items)
            for (i, j, _), answer in zip(entries, answers):
                results[i][j] = envelopes[i].locate(answer, j) if isinstance(answer, RequestError) else answer
        return results
