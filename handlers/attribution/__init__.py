"""Explanation methods: one class per method, one call shape, typed results (``base``).

    from handlers.attribution import LRP
    LRP(encoder).attribute([(a, b)], LRP.Options(pairwise=True))[0].delta

``METHODS`` is the one list of method names; ``options_for`` turns a dict of options (a
request's, over an archive's defaults) into the method's own options, refusing an option the
method does not have. ``plan`` resolves one explanation once (what ``explain``, the CLI's
in-process mode and the serving layer's admission share). ``explain`` is the in-process form of
an HTTP explanation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from ..encoder import Encoder
from ..errors import InvalidOption
from ..inference import no_content
from .base import MEMORY_BUDGET_MB, TEXT_FIELDS, Explanation, Method, MethodOptions, Pair
from .gae import GAE
from .integrated_jacobians import IntegratedJacobians
from .lrp import LRP

MethodName = Literal["ij", "gae", "lrp"]
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (IntegratedJacobians, GAE, LRP)}
assert tuple(METHODS) == get_args(MethodName)

__all__ = ["METHODS", "GAE", "LRP", "Explanation", "IntegratedJacobians", "Method", "MethodName",
           "MethodOptions", "Pair", "Plan", "declared_options", "explain", "method_of", "options_for", "plan",
           "prepare_methods"]


def declared_options() -> dict[str, FieldInfo]:
    """Every option of every method as its ``Options`` declares it (a name two methods share has
    one declaration: the first method's). The request's fields and the archive's defaults are
    made from these."""
    fields: dict[str, FieldInfo] = {}
    for cls in METHODS.values():
        for name, info in cls.Options.model_fields.items():
            fields.setdefault(name, info)
    return fields


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InvalidOption("method", f"unknown method {name!r}; one of {', '.join(METHODS)}")
    return METHODS[name]


def method_of(encoder: Encoder, name: str) -> Method:
    """The encoder's instance of method ``name``, set up on first use (hooks installed once)."""
    if name not in encoder.methods:
        encoder.methods[name] = method_class(name)(encoder)
    return encoder.methods[name]


def prepare_methods(encoder: Encoder) -> dict[str, Method]:
    """Every method set up on ``encoder`` (what a server does once, before any request)."""
    return {name: method_of(encoder, name) for name in METHODS}


def options_for(name: str, given: dict[str, Any], defaults: dict[str, Any] | None = None) -> MethodOptions:
    """Method ``name``'s options from ``given`` over ``defaults`` (only the method's own keys of
    ``defaults`` are read); an unknown or invalid given option is an ``InvalidOption``."""
    cls = method_class(name)
    options_class = cls.Options
    own = {k: v for k, v in (defaults or {}).items() if k in options_class.model_fields}
    unknown = sorted(set(given) - set(options_class.model_fields))
    if unknown:
        raise InvalidOption(unknown[0], f"is not an option of {name}")
    given = cls.completed(given)
    try:
        return options_class.model_validate({**own, **given})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or "method"
        raise InvalidOption(where, error["msg"].removeprefix("Value error, ")) from None


@dataclass(frozen=True)
class Plan:
    """One explanation, resolved once: its method, its options, the pair and its token counts."""

    method: str
    options: MethodOptions
    pair: Pair
    lengths: tuple[int, int]


def plan(encoder: Encoder, pair: Pair, method: str, options: MethodOptions, memory_budget_mb: int) -> Plan:
    """The explanation of ``pair`` by ``method`` with ``options``: its texts tokenized once, and
    refused with the core's domain errors when a text has no content (``NoContent``) or the pair
    needs more than ``memory_budget_mb`` at once (``OverBudget``)."""
    lengths = tuple(encoder.tokenize(list(pair)).lengths)
    refusal = no_content(encoder, list(zip(TEXT_FIELDS, lengths)))
    if refusal is not None:
        raise refusal
    method_of(encoder, method).check(lengths, options, memory_budget_mb)  # type: ignore[arg-type]
    return Plan(method, options, pair, lengths)  # type: ignore[arg-type]


def explain(encoder: Encoder, text_a: str, text_b: str, method: str = "ij", **options: Any) -> dict:
    """Explain the similarity of two texts in-process; the same dict as the HTTP answer.

    ``options`` are the method's own (``METHODS[method].Options``). A text without content or a
    pair over the method's memory budget is refused (``NoContent``, ``OverBudget``), as a
    server refuses it.
    """
    parsed = options_for(method, options)
    planned = plan(encoder, (text_a, text_b), method, parsed, getattr(parsed, "memory_budget_mb", MEMORY_BUDGET_MB))
    return method_of(encoder, method).attribute([planned.pair], planned.options)[0].to_answer()

