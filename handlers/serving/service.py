"""What every engine does with the requests it hands over together: parse, admit, group,
compute, answer.

Both engines serve through one ``Service``: the TorchServe handler (``torchserve.handler``)
with each TorchServe batch, KServe's model server (``kserve.model``) with each batch its
collection window gathers. Each request is parsed on its own; an invalid one is answered with
its 4xx while the others are computed together (predictions in one padded pass over the
distinct texts, explanations grouped by method and options) and answered in order.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..attribution import Explanation, Plan, method_of
from ..encoder import Encoder, RowEmbedder, load_encoder
from ..errors import ExplanationError
from .admission import Admission
from .explanation_cache import ExplanationCache
from .onnx_rows import OnnxRows
from .predictions import predict_items
from .protocol import Envelope, Kind, RequestError, parse_request
from .readiness import Readiness, check_explanations
from .settings import HandlerSettings

log = logging.getLogger(__name__)

#: one item's result: an answer dict (prediction), an ``Explanation`` or the item's refusal
Result = dict | Explanation | RequestError


@dataclass(frozen=True)
class Reply:
    """The answer to one request: its HTTP status and body (``error`` when it is refused)."""

    status: int
    body: Any
    error: RequestError | None = None


@dataclass
class Service:
    """One model's encoder, settings and admission, and the steps of answering requests."""

    encoder: Encoder
    settings: HandlerSettings
    admission: Admission
    embed_rows: RowEmbedder | None = None
    model_name: str = ""
    readiness: Readiness | None = None  # the explanation checks passed at load (None: no explanations)
    model_version: str = ""
    cache: ExplanationCache = field(default_factory=lambda: ExplanationCache(0))

    @classmethod
    def load(
        cls,
        root: str | os.PathLike,
        settings: HandlerSettings,
        response_timeout_s: float,
        device: torch.device,
        model_name: str,
        explanations: bool = True,
        model_version: str = "",
    ) -> "Service":
        """The model of ``root`` (``settings.model_dir`` and ``onnx_file`` are inside it). With
        ``explanations`` every method is set up (hooks installed once), timed for admission, and
        checked on a known pair (``readiness``: ``NotReady`` when one does not add up)."""
        encoder = load_encoder(
            os.path.join(root, settings.model_dir),
            reference=settings.reference,
            similarity=settings.similarity,
            max_length=settings.max_length,
            device=device,
            precision=settings.precision,
            native_bf16=None if settings.native_bf16 == "detect" else False,
        )
        if encoder.precision.reason:
            log.warning("predictions in %s, not %s: %s", encoder.precision.used,
                        encoder.precision.requested, encoder.precision.reason)
        embed_rows = (  # predictions only; explanations keep torch
            OnnxRows(os.path.join(root, settings.onnx_file), device) if settings.runtime == "onnx" else None
        )
        admission = Admission(encoder, settings, float(response_timeout_s))
        readiness = None
        if explanations:
            admission.calibrate()
            readiness = check_explanations(encoder, settings)
            log.info(readiness.describe())
        log.info(
            "loaded %s (%s, %d layers) on %s: reference=%s similarity=%s max_length=%d predictions=%s/%s",
            os.path.join(root, settings.model_dir), encoder.adapter.family, encoder.num_layers, device,
            settings.reference, settings.similarity, encoder.max_length, settings.runtime, encoder.precision.used,
        )
        cache = ExplanationCache(int(settings.explanation.cache_mb * 2**20) if explanations else 0)
        return cls(encoder, settings, admission, embed_rows, model_name, readiness, model_version, cache)

    def parse(self, raw: Any, kind: Kind) -> Envelope | RequestError:
        """One request body (bytes, text or parsed JSON) as an ``Envelope``, or its refusal (an
        explanation sent to a prediction pool that does not answer them names the model that does)."""
        pool = self.settings.pool
        if kind == "explain" and not pool.explanations:
            return RequestError.elsewhere(pool.explanation_model or "")
        try:
            return parse_request(raw, kind, self.settings, self.encoder.num_layers, self.model_name)
        except RequestError as error:
            return error

    def answer_items(self, envelopes: list[Envelope | RequestError]) -> list[list[Result]]:
        """Per request, one result per item, computed together with the other requests'."""
        results: list[list[Any]] = [
            [None] * len(e.items) if isinstance(e, Envelope) else [] for e in envelopes
        ]
        parsed = [
            (i, j, item) for i, envelope in enumerate(envelopes) if isinstance(envelope, Envelope)
            for j, item in enumerate(envelope.items)
        ]
        groups: dict[Any, list[tuple[int, int, Any]]] = {}
        for (i, j, item), admitted in zip(parsed, self.admission.check_batch([e[2] for e in parsed])):
            if isinstance(admitted, RequestError):
                results[i][j] = envelopes[i].locate(admitted, j)
            elif isinstance(admitted, Plan):  # an explanation, planned once by admission
                groups.setdefault((admitted.method, admitted.options), []).append((i, j, admitted))
            else:
                groups.setdefault("predict", []).append((i, j, item))
        for key, entries in groups.items():
            answers = self.compute(key, [item for _, _, item in entries])
            for (i, j, _), answer in zip(entries, answers):
                results[i][j] = envelopes[i].locate(answer, j) if isinstance(answer, RequestError) else answer
        return results

    def compute(self, key: Any, items: list) -> list[Result]:
        """The answers of one group: the predictions (their items), or the explanations of one
        method and options (their plans)."""
        try:
            if key == "predict":
                return predict_items(self.encoder, items, self.embed_rows)
            method, options = key
            return self.explain(method, options, [planned.pair for planned in items])
        except ExplanationError as error:
            return [RequestError.of(error)] * len(items)
        except Exception:  # a bug must cost these requests, not the server
            log.exception("%s failed for %d items", key, len(items))
            return [RequestError("", "internal error; see the model log", 500)] * len(items)

    def explain(self, method: str, options: Any, pairs: list[tuple[str, str]]) -> list[Explanation]:
        """The explanations of ``pairs`` with one method and options: those answered before from
        the cache, the others computed together, each distinct pair once, and then cached."""
        start = time.perf_counter()
        weights = self.encoder.weights_version()
        keys = [(self.model_name, self.model_version, weights, method, options, pair) for pair in pairs]
        found = {key: hit for key in set(keys) if (hit := self.cache.get(key)) is not None}
        lookup_ms = (time.perf_counter() - start) * 1000.0
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        computed = method_of(self.encoder, method).attribute([key[-1] for key in missing], options) if missing else []
        self.admission.observe(method, options, computed)
        fresh = {}
        for key, explanation in zip(missing, computed):
            explanation.cached, explanation.evictions = False, self.cache.put(key, explanation)
            fresh[key] = explanation
        answers = []
        for key in keys:
            if key in fresh:  # computed now: the first item with this key answers it, the others repeat it
                answers.append(fresh.pop(key))
                found.setdefault(key, answers[-1])
            else:
                answers.append(replace(found[key], cached=True, evictions=0, elapsed_ms=lookup_ms))
        return answers


def reply(envelope: Envelope | RequestError, results: list[Result]) -> Reply:
    """A request's answer: its refusal (or its first refused item's), else the protocol's body."""
    error = envelope if isinstance(envelope, RequestError) else next(
        (r for r in results if isinstance(r, RequestError)), None
    )
    if error is not None:
        return Reply(error.status, error.body(), error)
    return Reply(200, envelope.answer(results))
