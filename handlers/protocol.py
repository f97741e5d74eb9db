"""Parse and validate request bodies, and shape answers, for every protocol the handler speaks.

A request body becomes an ``Envelope``: the protocol it came in (plain JSON or KServe v1), and
its items, each a validated ``PairItem``, ``RankItem`` or ``ExplainItem``. Anything that cannot
be served raises ``RequestError`` with an HTTP status, a message and the offending field.
``Envelope.answer`` turns per-item results back into the protocol's own response shape.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .config import HandlerSettings

Kind = Literal["predict", "explain"]


class RequestError(Exception):
    """A request that cannot be served: answered with ``status`` and ``{"error", "field"}``."""

    def __init__(self, message: str, field: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


# -- request models ---------------------------------------------------------------------------
class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def texts(self) -> list[str]:
        raise NotImplementedError


def _check_text(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    limit = (info.context or {}).get("max_text_chars")
    if limit and len(value) > limit:
        raise ValueError(f"is {len(value)} characters long; the limit is {limit}")
    return value


Text = Annotated[StrictStr, AfterValidator(_check_text)]


class PairItem(_Item):
    text_a: Text
    text_b: Text

    def texts(self) -> list[str]:
        return [self.text_a, self.text_b]


class RankItem(_Item):
    query: Text
    candidates: list[Text]

    @field_validator("candidates")
    @classmethod
    def _candidates_valid(cls, value: list[str], info: ValidationInfo) -> list[str]:
        limit = (info.context or {}).get("max_candidates")
        if not value:
            raise ValueError("must hold at least one candidate")
        if limit and len(value) > limit:
            raise ValueError(f"holds {len(value)} candidates; the limit is {limit}")
        return value

    def texts(self) -> list[str]:
        return [self.query, *self.candidates]


class ExplainItem(_Item):
    text_a: Text
    text_b: Text
    method: Literal["ij", "gae", "lrp"] | None = None
    layer: StrictInt | None = None
    steps: StrictInt | None = None
    normalization: Literal["none", "min-max", "l2"] | None = None
    pairwise: StrictBool | None = None

    @field_validator("layer")
    @classmethod
    def _layer_in_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        layers = (info.context or {}).get("num_layers")
        if value is not None and layers is not None and not 0 <= value < layers:
            raise ValueError(f"must be an integer in [0, {layers - 1}]")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_in_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_steps")
        if value is not None and limit is not None and not 1 <= value <= limit:
            raise ValueError(f"must be an integer in [1, {limit}]")
        return value

    def texts(self) -> list[str]:
        return [self.text_a, self.text_b]

    def resolved(self, settings: HandlerSettings, num_layers: int) -> "ExplainItem":
        """The same request with every omitted option set to the archive's default."""
        defaults = settings.explanation
        layer = defaults.layer if defaults.layer is not None else max(0, num_layers - 2)
        return self.model_copy(
            update={
                "method": self.method or defaults.method,
                "layer": self.layer if self.layer is not None else layer,
                "steps": self.steps if self.steps is not None else defaults.steps,
                "normalization": self.normalization or defaults.normalization,
                "pairwise": self.pairwise if self.pairwise is not None else defaults.pairwise,
            }
        )


Item = PairItem | RankItem | ExplainItem


def _field_of(error: dict, prefix: str) -> str:
    parts = [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    return ".".join([prefix, *parts] if prefix else parts) or (prefix or "body")


def _validation_error(exc: ValidationError, prefix: str) -> RequestError:
    first = exc.errors(include_url=False)[0]
    where = _field_of(first, prefix)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not a known field"
    elif first["type"] == "missing":
        message = "is required"
    return RequestError(f"{where}: {message}", where)


def parse_item(obj: Any, kind: Kind, context: dict, prefix: str = "") -> Item:
    """Validate one request object (a plain body or one KServe instance)."""
    if not isinstance(obj, dict):
        where = prefix or "body"
        raise RequestError(f"{where}: must be a JSON object", where)
    if kind == "explain":
        model: type[_Item] = ExplainItem
    elif "query" in obj or "candidates" in obj:
        model = RankItem
    else:
        model = PairItem
    try:
        return model.model_validate(obj, context=context)
    except ValidationError as exc:
        raise _validation_error(exc, prefix) from None


# -- bodies and envelopes ---------------------------------------------------------------------
def _reject_constant(token: str) -> None:
    raise ValueError(f"{token} is not valid JSON")


def decode_body(raw: Any, max_bytes: int) -> Any:
    """The JSON value of a request body as TorchServe hands it over (bytes, str or parsed)."""
    if raw is None:
        raise RequestError("the request has no body", "body")
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > max_bytes:
            raise RequestError(f"body is {len(raw)} bytes; the limit is {max_bytes}", "body", 413)
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"body is not valid UTF-8 (byte {exc.start})", "body") from None
    if isinstance(raw, str):
        if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
            raise RequestError(f"body is longer than the limit of {max_bytes} bytes", "body", 413)
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"body is not valid JSON: {exc}", "body") from None
    return _reject_non_finite(raw)


def _reject_non_finite(value: Any, where: str = "body") -> Any:
    """TorchServe may hand over an already-parsed body, in which NaN/Infinity were accepted."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{where}: {value} is not a finite number", where)
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_non_finite(item, key if where == "body" else f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _reject_non_finite(item, f"{where}.{i}")
    return value


@dataclass
class Envelope:
    """The validated items of one request, and the protocol to answer them in."""

    protocol: Literal["plain", "v1"]
    kind: Kind
    items: list[Item] = field(default_factory=list)

    def answer(self, results: list[dict]) -> Any:
        if self.protocol == "plain":
            return results[0]
        key = "explanations" if self.kind == "explain" else "predictions"
        return {key: results}


def item_context(settings: HandlerSettings, num_layers: int) -> dict:
    return {
        "max_text_chars": settings.max_text_chars,
        "max_candidates": settings.max_candidates,
        "max_steps": settings.explanation.max_steps,
        "num_layers": num_layers,
    }


def parse_request(raw: Any, kind: Kind, settings: HandlerSettings, num_layers: int) -> Envelope:
    """Decode and validate one TorchServe request body."""
    body = decode_body(raw, settings.max_body_bytes)
    context = item_context(settings, num_layers)
    if isinstance(body, dict) and "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError("instances: must be a non-empty list", "instances")
        extra = sorted(set(body) - {"instances"})
        if extra:
            raise RequestError(f"{extra[0]}: is not a known field", extra[0])
        items = [parse_item(obj, kind, context, f"instances.{i}") for i, obj in enumerate(instances)]
        return Envelope("v1", kind, items)
    return Envelope("plain", kind, [parse_item(body, kind, context)])
