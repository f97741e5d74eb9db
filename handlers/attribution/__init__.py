"""Explanation methods. Each method is a module with the same call shape:

    explain_batch(encoder, items: list[ExplainItem], settings: ExplanationSettings) -> list[dict]

``items`` have every option resolved (``ExplainItem.resolved``); the module returns one answer
per item, in order, with the method's own fields. This package adds the fields every answer
carries (``method``, ``elapsed_ms``) and groups the items of a batch by method.

A module may also define ``prepare(encoder) -> None``: one-time set-up (hooks, buffers) that
the handler runs in ``initialize`` through ``prepare_methods``, never per request.
"""
from __future__ import annotations

import importlib
import time
from typing import Any

from ..config import ExplanationSettings, HandlerSettings
from ..protocol import ExplainItem, RequestError

METHODS = {"ij": "integrated_jacobians", "gae": "gae", "lrp": "lrp"}


def method_module(method: str):
    if method not in METHODS:
        raise RequestError(f"method: unknown method {method!r}; one of {sorted(METHODS)}", "method")
    return importlib.import_module(f"{__name__}.{METHODS[method]}")


def prepare_methods(encoder) -> None:
    """Run every method's one-time set-up on ``encoder`` (idempotent)."""
    prepared = getattr(encoder, "prepared_methods", set())
    for method in METHODS:
        module = method_module(method)
        if method not in prepared and hasattr(module, "prepare"):
            module.prepare(encoder)
        prepared.add(method)
    encoder.prepared_methods = prepared


def explain_items(encoder, items: list[ExplainItem], settings: ExplanationSettings) -> list[dict | RequestError]:
    """Answer resolved explanation items; the items of one method are computed together."""
    answers: list[dict | RequestError | None] = [None] * len(items)
    by_method: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_method.setdefault(item.method, []).append(index)
    for method, indexes in by_method.items():
        start = time.perf_counter()
        try:
            results = method_module(method).explain_batch(encoder, [items[i] for i in indexes], settings)
        except RequestError as error:
            results = [error] * len(indexes)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        for index, result in zip(indexes, results):
            if isinstance(result, dict):
                result = {"method": method, **result, "elapsed_ms": elapsed_ms}
            answers[index] = result
    return answers  # type: ignore[return-value]


def explain(encoder, text_a: str, text_b: str, method: str = "ij", **options: Any) -> dict:
    """Explain the similarity of two texts in-process; the same dict as the HTTP answer."""
    settings = HandlerSettings(explanation=options.pop("settings", ExplanationSettings()))
    item = ExplainItem.model_validate({"text_a": text_a, "text_b": text_b, "method": method, **options})
    result = explain_items(encoder, [item.resolved(settings, encoder.num_layers)], settings.explanation)[0]
    if isinstance(result, RequestError):
        raise result
    return result
