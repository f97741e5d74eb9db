"""Parse and validate request bodies, and shape answers, for every protocol the handler speaks.

A request body becomes an ``Envelope``: the protocol it came in (plain JSON, KServe v1
``{"instances": [...]}`` or KServe v2, the Open Inference Protocol, ``{"inputs": [...]}``), and
its items, each a validated ``PairItem``, ``RankItem``, ``EmbedItem`` or ``ExplainItem``. Anything that cannot
be served raises ``RequestError`` with an HTTP status, a message and the offending field; the
core's domain errors become ``RequestError`` in one place (``RequestError.of``).
``Envelope.answer`` turns per-item results (answer dicts, or the core's ``Explanation``) back
into the protocol's own response shape.
"""
from __future__ import annotations

import base64
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    create_model,
    model_validator,
)

from ..attribution import METHODS, Explanation, MethodName, MethodOptions, declared_options, options_for
from ..errors import ExplanationError, InvalidOption, NoContent, OverBudget
from .settings import HandlerSettings

Kind = Literal["predict", "explain"]
#: the HTTP status of each of the core's domain errors
STATUS_OF: dict[type[ExplanationError], int] = {InvalidOption: 400, NoContent: 400, OverBudget: 413}


class RequestError(Exception):
    """A request that cannot be served: ``field`` is at fault (empty: the server's own fault),
    ``detail`` says how; answered with ``status`` and ``{"error", "field"}``, the message built
    here once."""

    def __init__(self, field: str, detail: str, status: int = 400):
        super().__init__(field, detail, status)
        self.field = field
        self.detail = detail
        self.status = status

    @property
    def message(self) -> str:
        return f"{self.field}: {self.detail}" if self.field else self.detail

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}

    def at(self, field: str) -> "RequestError":
        """The same refusal, of ``field`` (where the request's body holds it)."""
        return RequestError(field, self.detail, self.status)

    @classmethod
    def of(cls, error: ExplanationError) -> "RequestError":
        """The answer to one of the core's domain errors."""
        status = next((code for kind, code in STATUS_OF.items() if isinstance(error, kind)), 400)
        return cls(error.field, error.detail, status)

    @classmethod
    def elsewhere(cls, model: str) -> "RequestError":
        """A prediction pool's answer to an explanation: 404 naming the model that answers it."""
        return cls("model", f"explanations are answered by the model {model!r} "
                            f"(POST /explanations/{model}), not by this one", 404)


# -- request models ---------------------------------------------------------------------------
class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def named_texts(self) -> list[tuple[str, str]]:
        """(field name, text) of every text of the item."""
        return [("text_a", self.text_a), ("text_b", self.text_b)]  # type: ignore[attr-defined]

    def all_texts(self) -> list[str]:
        return [text for _, text in self.named_texts()]


def _check_text(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    surrogate = _lone_surrogate(value)  # JSON "\ud800": no UTF-8 for the tokenizer
    if surrogate is not None:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {surrogate})")
    limit = (info.context or {}).get("max_text_chars")
    if limit and len(value) > limit:
        raise ValueError(f"is {len(value)} characters long; the limit is {limit}")
    return value


def _lone_surrogate(value: str) -> int | None:
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


Text = Annotated[StrictStr, AfterValidator(_check_text)]


class PairItem(_Item):
    text_a: Text
    text_b: Text


def _texts_within(limit_key: str, noun: str) -> Any:
    """The type of a list of texts that holds at least one, and at most the archive's ``limit_key``."""
    def check(value: list[str], info: ValidationInfo) -> list[str]:
        limit = (info.context or {}).get(limit_key)
        if not value:
            raise ValueError(f"must hold at least one {noun}")
        if limit and len(value) > limit:
            raise ValueError(f"holds {len(value)} {noun}s; the limit is {limit}")
        return value
    return Annotated[list[Text], AfterValidator(check)]


Candidates = _texts_within("max_candidates", "candidate")
Texts = _texts_within("max_texts", "text")


class RankItem(_Item):
    query: Text
    candidates: Candidates

    def named_texts(self) -> list[tuple[str, str]]:
        return [("query", self.query), *((f"candidates.{i}", c) for i, c in enumerate(self.candidates))]


class EmbedItem(_Item):
    """Embeddings of ``texts``: the ones the scores compare (``predictions.embeddings_of``)."""

    texts: Texts

    def named_texts(self) -> list[tuple[str, str]]:
        return [(f"texts.{i}", text) for i, text in enumerate(self.texts)]


class _Explanation(_Item):
    """An explanation request: the pair, the method, and the options it sets (``ExplainItem``
    adds them as the methods declare them, in their JSON types strictly; ``options`` keeps the
    method's own)."""

    model_config = ConfigDict(strict=True)

    text_a: Text
    text_b: Text
    method: MethodName | None = None

    def method_name(self, settings: HandlerSettings) -> str:
        return self.method or settings.explanation.method

    def options(self, settings: HandlerSettings) -> MethodOptions:
        """The method's own options: those the request set over the archive's defaults. An
        option that the method does not have is ignored (a client may send one set to all)."""
        method = self.method_name(settings)
        own = METHODS[method].Options.model_fields
        given = {k: v for k, v in self.model_dump(exclude={"text_a", "text_b", "method"}, exclude_none=True).items()
                 if k in own}
        try:
            return options_for(method, given, settings.explanation.defaults(method))
        except ExplanationError as error:
            raise RequestError.of(error) from None


def _request_options() -> dict[str, Any]:
    """Every option that a request may set, as the methods declare it (``Method.Options``, less
    the archive's limits, ``MethodOptions.LIMITS``): its JSON type, strictly, or absent. Its
    checks are the method's, against the archive's defaults (``options_for``) and the model
    (``IntegratedJacobians.layer``)."""
    return {name: (info.annotation | None, None) for name, info in declared_options().items()
            if name not in MethodOptions.LIMITS}


ExplainItem = create_model("ExplainItem", __base__=_Explanation, __module__=__name__, **_request_options())

Item = PairItem | RankItem | EmbedItem | ExplainItem


def _key(key: object) -> str:
    """A key as a field name; the empty key is written as JSON writes it."""
    return str(key) or '""'


def _field_of(error: dict, prefix: str) -> str:
    parts = [_key(p) for p in error["loc"] if not str(p).startswith("function-")]
    return ".".join([prefix, *parts] if prefix else parts) or (prefix or "body")


def _validation_error(exc: ValidationError, prefix: str) -> RequestError:
    first = exc.errors(include_url=False)[0]
    where = _field_of(first, prefix)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not a known field"
    elif first["type"] == "missing":
        message = "is required"
    return RequestError(where, message)


def parse_item(obj: Any, kind: Kind, context: dict, prefix: str = "") -> Item:
    """Validate one request object (a plain body or one KServe instance)."""
    if not isinstance(obj, dict):
        where = prefix or "body"
        raise RequestError(where, "must be a JSON object")
    if kind == "explain":
        model: type[_Item] = ExplainItem
    elif "query" in obj or "candidates" in obj:
        model = RankItem
    elif "texts" in obj:
        model = EmbedItem
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
        raise RequestError("body", "is empty")
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > max_bytes:
            raise RequestError("body", f"is {len(raw)} bytes; the limit is {max_bytes}", 413)
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("body", f"is not valid UTF-8 (byte {exc.start})") from None
    if isinstance(raw, str):
        if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
            raise RequestError("body", f"is longer than the limit of {max_bytes} bytes", 413)
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise RequestError("body", f"is not valid JSON: {exc}") from None
    try:
        return _reject_non_finite(raw)
    except RecursionError:  # TorchServe's own json.loads took it; the walk over it is deeper
        raise RequestError("body", "is nested too deeply") from None


def _reject_non_finite(value: Any, where: str = "body") -> Any:
    """TorchServe may hand over an already-parsed body, in which NaN/Infinity were accepted."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(where, f"{value} is not a finite number")
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

    protocol: Literal["plain", "v1", "v2"]
    kind: Kind
    items: list[Item] = field(default_factory=list)

    def answer(self, results: list[dict | Explanation]) -> Any:
        results = [r.to_answer() if isinstance(r, Explanation) else r for r in results]
        if self.protocol == "plain":
            return results[0]
        key = "explanations" if self.kind == "explain" else "predictions"
        return {key: results}

    def locate(self, error: RequestError, index: int) -> RequestError:
        """An error raised for item ``index`` after parsing, with the field where the client wrote it."""
        if self.protocol == "v1" and error.field:
            return error.at(f"instances.{index}.{error.field}")
        return error


def item_context(settings: HandlerSettings, num_layers: int) -> dict:
    return {
        "max_text_chars": settings.max_text_chars,
        "max_candidates": settings.max_candidates,
        "max_texts": settings.max_texts,
        "max_steps": settings.explanation.max_steps,
        "num_layers": num_layers,
    }


def parse_request(
    raw: Any, kind: Kind, settings: HandlerSettings, num_layers: int, model_name: str = ""
) -> Envelope:
    """Decode and validate one request body (``model_name`` names v2 answers): bytes, text or
    parsed JSON as TorchServe hands it over, or a v2 request that KServe's model server has
    already parsed into its ``InferRequest`` (read through its attributes, not re-serialised)."""
    if is_infer_request(raw):
        return parse_v2(raw, kind, item_context(settings, num_layers), model_name)
    try:
        body = decode_body(raw, settings.max_body_bytes)
    except RequestError as error:  # a non-finite number in a parsed v2 body: name its input
        raise named_input(error, raw) if isinstance(raw, dict) else error from None
    context = item_context(settings, num_layers)
    if isinstance(body, dict) and "inputs" in body:
        return parse_v2(body, kind, context, model_name)
    if isinstance(body, dict) and "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError("instances", "must be a non-empty list")
        extra = sorted(set(body) - {"instances"})
        if extra:
            raise RequestError(_key(extra[0]), "is not a known field")
        items = [parse_item(obj, kind, context, f"instances.{i}") for i, obj in enumerate(instances)]
        return Envelope("v1", kind, items)
    return Envelope("plain", kind, [parse_item(body, kind, context)])


# -- KServe v2, the Open Inference Protocol ---------------------------------------------------
V2_INPUTS: dict[str, tuple[str, str]] = {"pair": ("text_a", "text_b"), "rank": ("query", "candidates")}


class V2Tensor(BaseModel):
    """One input tensor: BYTES (UTF-8 strings in JSON), one dimension."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    datatype: Literal["BYTES"]
    shape: list[StrictInt]
    data: list[Any]
    parameters: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _shape_is_data_length(self) -> "V2Tensor":
        if len(self.shape) != 1:
            raise ValueError(f"shape must have one dimension [n]; got {self.shape}")
        if self.shape[0] != len(self.data):
            raise ValueError(f"shape {self.shape} does not match {len(self.data)} data elements")
        return self


class V2Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = None
    model_name: StrictStr | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    parameters: dict[str, Any] | None = None


@dataclass
class V2Envelope(Envelope):
    """A v2 request: answered with ``model_name``, the request's ``id`` and ``outputs``."""

    shape: Literal["pair", "rank"] = "pair"
    model_name: str = ""
    request_id: str | None = None

    def locate(self, error: RequestError, index: int) -> RequestError:
        if not error.field:
            return error
        names = V2_INPUTS[self.shape]
        return error.at(_v2_field(error.field, index if self.shape == "pair" else None, names))

    def answer(self, results: list[dict | Explanation]) -> dict[str, Any]:
        results = [r.to_answer() if isinstance(r, Explanation) else r for r in results]
        body: dict[str, Any] = {"model_name": self.model_name}
        if self.request_id is not None:
            body["id"] = self.request_id
        if self.kind == "explain":
            body["outputs"] = [
                _v2_tensor("score", "FP64", [r["score"] for r in results]),
                _v2_tensor("explanation", "BYTES", [json.dumps(r) for r in results]),
            ]
            return body
        names = V2_INPUTS[self.shape]
        if self.shape == "pair":
            outputs = [_v2_tensor("score", "FP64", [r["score"] for r in results])]
            outputs += [
                _v2_tensor(f"truncated_{n}", "BOOL", [n in r["truncated"] for r in results]) for n in names
            ]
        else:
            (result,) = results
            candidates = [f"candidates.{i}" in result["truncated"] for i in range(len(result["scores"]))]
            outputs = [
                _v2_tensor("scores", "FP64", result["scores"]),
                _v2_tensor("ranking", "INT64", result["ranking"]),
                _v2_tensor("truncated_query", "BOOL", ["query" in result["truncated"]]),
                _v2_tensor("truncated_candidates", "BOOL", candidates),
            ]
        body["outputs"] = outputs
        body["parameters"] = {"similarity": results[0]["similarity"], "reference": results[0]["reference"]}
        return body


def _v2_tensor(name: str, datatype: str, data: list) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [len(data)], "data": data}


def _v2_field(field: str, index: int | None, inputs: tuple[str, str]) -> str:
    """Where an item's field lives in a v2 body: ``inputs.text_a.3`` (pair ``index`` 3),
    ``inputs.candidates.2``, ``parameters.layer``."""
    head, _, rest = field.partition(".")
    if head not in inputs:
        return f"parameters.{field}"
    if rest or index is None:
        return f"inputs.{field}"
    return f"inputs.{head}.{index}"


def is_infer_request(raw: Any) -> bool:
    """KServe's ``InferRequest`` (or any object with its attributes), told apart from JSON."""
    return not isinstance(raw, (dict, list, str, bytes, bytearray)) and hasattr(raw, "inputs")


def _attribute(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def named_input(error: RequestError, body: Any) -> RequestError:
    """``inputs.1.datatype`` -> ``inputs.text_b.datatype`` where input 1 has a name (``body``:
    the JSON object or the ``InferRequest``)."""
    parts = error.field.split(".")
    inputs = _attribute(body, "inputs")
    if len(parts) >= 2 and parts[0] == "inputs" and parts[1].isdigit() and isinstance(inputs, list):
        tensor = inputs[int(parts[1])]
        name = _attribute(tensor, "name")
        rest = parts[3:] if parts[2:3] == ["data"] and len(parts) >= 4 else parts[2:]  # inputs.0.data.3
        if isinstance(name, str) and name:
            return error.at(".".join(["inputs", name, *rest]))
    return error


def parse_v2(body: Any, kind: Kind, context: dict, model_name: str) -> V2Envelope:
    """``text_a`` + ``text_b`` of shape [n] (n pairs), or ``query`` [1] + ``candidates`` [k]
    (one ranking, predictions only); method options in ``parameters``. ``body``: the JSON
    object, or an ``InferRequest`` read through its attributes."""
    try:
        request = V2Request.model_validate(body, from_attributes=not isinstance(body, dict))
    except ValidationError as exc:
        raise named_input(_validation_error(exc, ""), body) from None
    tensors: dict[str, list[Any]] = {}
    for tensor in request.inputs:
        if tensor.name in tensors:
            raise RequestError(f"inputs.{tensor.name}", "is given twice")
        tensors[tensor.name] = tensor.data
    ranking = kind == "predict" and ("query" in tensors or "candidates" in tensors)
    shape: Literal["pair", "rank"] = "rank" if ranking else "pair"
    names = V2_INPUTS[shape]
    for name in tensors:
        if name not in names:
            expected = " and ".join(names)
            raise RequestError(f"inputs.{name}", f"is not a known input; expected {expected}")
    for name in names:
        if name not in tensors:
            raise RequestError(f"inputs.{name}", "is required")
    options = request.parameters or {}
    for key in options:
        if key in names:
            raise RequestError(f"parameters.{key}", "is an input, not a parameter")
    first, second = (tensors[n] for n in names)
    if shape == "rank":
        if len(first) != 1:
            raise RequestError("inputs.query", f"must have shape [1]; got [{len(first)}]")
        objects = [{**options, "query": first[0], "candidates": second}]
    else:
        if not first:
            raise RequestError("inputs.text_a", "must hold at least one text")
        if len(second) != len(first):
            raise RequestError("inputs.text_b", f"shape [{len(second)}] differs from text_a's [{len(first)}]")
        objects = [{**options, "text_a": a, "text_b": b} for a, b in zip(first, second)]
    items = []
    for index, obj in enumerate(objects):
        try:
            items.append(parse_item(obj, kind, context))
        except RequestError as error:
            where = _v2_field(error.field, index if shape == "pair" else None, names)
            raise error.at(where) from None
    return V2Envelope("v2", kind, items, shape=shape, model_name=model_name, request_id=request.id)


# -- OpenAI's embeddings API (the KServe model server's /openai/v1/embeddings) -----------------
class OpenAIEmbeddingsBody(BaseModel):
    """OpenAI's ``POST /v1/embeddings`` body, as KServe's huggingface server takes it."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    input: list[StrictStr]  # one string is a list of one (``single``)
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None  # accepted and not used, as OpenAI's own API does
    _single: bool = PrivateAttr(default=False)

    @model_validator(mode="before")
    @classmethod
    def _one_string(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("input"), str):
            return {**data, "input": [data["input"]]}
        return data

    @property
    def single(self) -> bool:
        return self._single


@dataclass
class OpenAIEmbeddings:
    """A parsed OpenAI embeddings request: the model asked for, the answer's encoding, and the
    plain envelope of one ``EmbedItem`` that the model computes."""

    model: str
    encoding_format: Literal["float", "base64"]
    envelope: Envelope
    single: bool  # ``input`` was one string: a refusal names ``input``, not ``input.0``

    def field(self, error: RequestError) -> RequestError:
        """An error of the embeddings item, named where the client wrote it (``input``)."""
        where = error.field.replace("texts", "input", 1)
        if self.single:
            where = where.replace("input.0", "input", 1)
        return error.at(where)

    def answer(self, result: dict) -> dict[str, Any]:
        tokens = sum(result["tokens"])
        data = [{"object": "embedding", "index": i, "embedding": _encoded(vector, self.encoding_format)}
                for i, vector in enumerate(result["embeddings"])]
        return {"object": "list", "data": data, "model": self.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's ``base64``: the float32 little-endian bytes of the vector."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def parse_openai_body(raw: Any, max_bytes: int) -> OpenAIEmbeddingsBody:
    """The OpenAI body, before its model is known (its texts are checked by ``openai_embeddings``)."""
    body = decode_body(raw, max_bytes)
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    try:
        parsed = OpenAIEmbeddingsBody.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc, "") from None
    parsed._single = isinstance(body.get("input"), str)
    return parsed


def openai_embeddings(body: OpenAIEmbeddingsBody, settings: HandlerSettings) -> OpenAIEmbeddings:
    """The request for the model that ``body`` names, its texts checked against the model's limits."""
    request = OpenAIEmbeddings(body.model, body.encoding_format, Envelope("plain", "predict"), body.single)
    try:
        item = EmbedItem.model_validate({"texts": body.input},
                                        context={"max_text_chars": settings.max_text_chars, "max_texts": settings.max_texts})
    except ValidationError as exc:
        raise request.field(_validation_error(exc, "")) from None
    request.envelope.items.append(item)
    return request
