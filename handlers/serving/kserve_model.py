"""KServe's own model server as an engine: a ``kserve.Model`` over the shared ``Service``.

    siamese-kserve --model_name minilm --model_dir path/to/model [--model_config model-config.yaml]
    python -m handlers.serving.kserve_model --model_name minilm --model_dir path/to/model --http_port 8085

``--model_dir`` is a sentence-transformers directory, or a directory with a ``model-config.yaml``
(an archive's, unpacked: ``model/`` beside it); ``--model_config`` names that file elsewhere. The
file's ``handler:`` section is the same ``HandlerSettings`` as an archive's; of TorchServe's
keys, ``batchSize``, ``maxBatchDelay`` and ``responseTimeout`` set the collection window and
admission. Command-line options override the file.

- **Routes** (KServe's): v1 ``/v1/models/{m}:predict`` and ``:explain``, v2
  ``/v2/models/{m}/infer``; and, as TorchServe serves them, ``/v2/models/{m}/explain`` and the
  plain ``/predictions/{m}`` and ``/explanations/{m}``. Every answer is the TorchServe
  handler's JSON (v2 answers always carry an ``id``: KServe's response model requires one).
  And OpenAI's embeddings API, ``/openai/v1/embeddings``, where KServe's huggingface server
  answers it (KServe's own OpenAI layer needs vLLM's types, so the route is the project's).
- **Errors**: a refused request raises ``RequestRefused``, KServe's own ``InvalidInput``,
  answered with the refusal's 4xx and ``{"error", "field"}``; a v2 body that KServe's request
  model refuses is answered the same way (400, naming the input).
- **Batching**: predictions are batched in the model (``batching.Batcher``): a collection window
  of ``max_batch_delay_ms`` from the first request, at most ``batch_size`` requests and, with
  ``max_batch_tokens``, at most that many tokens (a long request does not hold short ones
  behind it), computed in ``prediction_threads`` threads.
- **Explanations** run in ``explain_workers`` processes at ``explain_nice``
  (``explainer_pool``), batched the same way; with 0 workers ``:explain`` answers 501 (a
  deployment whose explanations are served by a separate explainer).
- **Metrics**: KServe's ``/metrics`` with the project's metrics (``prometheus_metrics``).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import kserve
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from kserve import model_server
from kserve.errors import InvalidInput, ModelNotReady
from kserve.model import InferenceVerb
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError

from .batching import Batcher
from .device import place
from .explainer_pool import ExplainerPool, WorkerSpec
from .prometheus_metrics import PrometheusRecorder
from .protocol import (Envelope, Kind, OpenAIEmbeddingsBody, RequestError, named_input, openai_embeddings,
                       parse_openai_body)
from .service import Result, Service, reply
from .settings import HandlerSettings, ModelConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 8085
MODEL_CONFIG = "model-config.yaml"
OPENAI_EMBEDDINGS = "/openai/v1/embeddings"  # where KServe's huggingface server answers OpenAI's embeddings API
WARM_UP = {"text_a": "A man is playing a guitar.", "text_b": "Someone plays music."}
#: the keys of TorchServe's model-config.yaml that this engine reads, and the settings they give
TORCHSERVE_KEYS = {"batchSize": "batch_size", "maxBatchDelay": "max_batch_delay_ms", "responseTimeout": "response_timeout_s"}


class EngineSettings(BaseModel):
    """How KServe's model server runs the model (what TorchServe's config and archive give it)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: PositiveInt = Field(default=8, description="requests per prediction batch, at most (batchSize)")
    max_batch_tokens: NonNegativeInt = Field(
        default=0, description="tokens per prediction batch, at most (every text of its requests); 0: no bound")
    max_batch_delay_ms: NonNegativeFloat = Field(default=2, description="the collection window (maxBatchDelay)")
    prediction_threads: PositiveInt = Field(default=2, description="prediction batches computed at once (as 2 workers)")
    torch_threads: NonNegativeInt = Field(default=0, description="per prediction batch; 0: cores / prediction_threads")
    explain_workers: NonNegativeInt = Field(default=1, description="explanation processes; 0: none (501)")
    explain_nice: int = Field(default=10, ge=0, le=19, description="their CPU priority (nice)")
    explain_threads: NonNegativeInt = Field(default=0, description="torch threads per explanation process; 0: cores")
    explain_batch_size: PositiveInt = Field(default=8, description="explanation requests per batch, at most")
    response_timeout_s: PositiveInt = Field(default=300, description="admission: a batch's explanations get half")
    max_request_bytes: PositiveInt = Field(default=8 * 2**20, description="request body limit (413 above)")


def load_settings(
    model_dir: Path, config_file: Path | None = None, handler: dict | None = None, engine: dict | None = None
) -> tuple[Path, HandlerSettings, EngineSettings]:
    """The model's root directory and settings: ``config_file`` (or ``model_dir``'s
    model-config.yaml) under the command line's ``handler`` and ``engine`` overrides."""
    config_file = config_file or (model_dir / MODEL_CONFIG if (model_dir / MODEL_CONFIG).is_file() else None)
    raw = yaml.safe_load(config_file.read_text()) if config_file else {}
    try:
        raw = dict(raw or {})
        raw["handler"] = {**(raw.get("handler") or {}), **(handler or {})}
        config = ModelConfig.from_yaml(raw)
        from_file = config.to_yaml_dict()
        given = {name: from_file[key] for key, name in TORCHSERVE_KEYS.items() if key in raw}
        settings = EngineSettings(**{**given, **(engine or {})})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"])
        raise SystemExit(f"{config_file or 'settings'}: {where}: {error['msg']}") from None
    handler_settings = config.handler
    if not (model_dir / handler_settings.model_dir).is_dir():  # model_dir is the model itself
        handler_settings = handler_settings.model_copy(update={"model_dir": "."})
    return model_dir, handler_settings, settings


class RequestRefused(InvalidInput):
    """A request that cannot be served, as KServe's own ``InvalidInput``: answered with the
    refusal's status and ``{"error", "field"}`` (a server without this module's handler
    answers 400 ``{"error"}``, the message naming the field)."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


def rest_body(payload: Any) -> Any:
    """A request as the protocol layer parses it: KServe's ``InferRequest`` (v2) back as JSON."""
    if not isinstance(payload, InferRequest):
        return payload
    inputs = []
    for tensor in payload.inputs:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape), "data": tensor.data}
        if tensor.parameters:
            entry["parameters"] = dict(tensor.parameters)
        inputs.append(entry)
    body: dict[str, Any] = {"inputs": inputs}
    if payload.id is not None:
        body["id"] = payload.id
    if payload.parameters:
        body["parameters"] = dict(payload.parameters)
    return body


class SiameseModel(kserve.Model):
    """Similarity predictions and explanations of one bi-encoder, on KServe's model server."""

    def __init__(
        self, name: str, root: Path, settings: HandlerSettings, engine: EngineSettings,
        metrics: PrometheusRecorder | None = None,
    ) -> None:
        super().__init__(name)
        self.root = root
        self.settings = settings
        self.engine_settings = engine
        self.metrics = metrics or PrometheusRecorder(name, settings.explanation.method)
        self.explainers: ExplainerPool | None = None
        self.batchers: dict[Kind, Batcher] = {}

    def load(self) -> bool:
        engine = self.engine_settings
        device = place(engine.torch_threads or (os.cpu_count() or 1) // engine.prediction_threads)
        self.service = Service.load(self.root, self.settings, engine.response_timeout_s, device, self.name,
                                    explanations=False)
        self.threads = ThreadPoolExecutor(engine.prediction_threads, thread_name_prefix="predictions")
        self.service.answer_items([self.service.parse(WARM_UP, "predict")])  # the first pass sets torch up
        window_s = engine.max_batch_delay_ms / 1000
        self.batchers["predict"] = Batcher(
            self._predict_batch, window_s, engine.batch_size, engine.prediction_threads,
            on_batch=lambda size, waits: self.metrics.record_batch("predict", size, waits),
            max_tokens=engine.max_batch_tokens or None, tokens=self._tokens,
        )
        if engine.explain_workers:
            spec = WorkerSpec(str(self.root), self.settings, engine.response_timeout_s, self.name,
                              engine.explain_nice, engine.explain_threads)
            self.explainers = ExplainerPool(spec, engine.explain_workers)
            try:
                log.info("explanation workers %s at nice %d", self.explainers.start(), engine.explain_nice)
            except BrokenProcessPool:  # a worker's load failed: its NotReady (or error) is in the log above
                log.error("the explanation workers did not start; %s stays not ready", self.name)
                self.explainers.stop()
                self.ready = False
                return self.ready
            self.batchers["explain"] = Batcher(
                self.explainers.run, window_s, engine.explain_batch_size, engine.explain_workers,
                on_batch=lambda size, waits: self.metrics.record_batch("explain", size, waits),
            )
        self.ready = True
        return self.ready

    def _tokens(self, envelope: Envelope) -> int:
        """A request's tokens: every text of its items, as the encoder tokenizes them."""
        texts = [text for item in envelope.items for text in item.all_texts()]
        return sum(self.service.encoder.tokenize(texts).lengths) if texts else 0

    async def _predict_batch(self, envelopes: list[Envelope]) -> list[list[Result]]:
        return await asyncio.get_running_loop().run_in_executor(self.threads, self.service.answer_items, envelopes)

    def stop(self) -> None:
        if self.explainers is not None:
            self.explainers.stop()
        if getattr(self, "threads", None) is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)
        self.ready = False

    def validate(self, payload: Any) -> Any:
        return payload  # the protocol layer validates, naming the field

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        return await self.serve(payload, "predict")

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        if "explain" not in self.batchers:
            raise NotImplementedError(f"{self.name} serves no explanations here: ask its explainer")
        return await self.serve(payload, "explain")

    async def embeddings(self, body: OpenAIEmbeddingsBody) -> dict[str, Any]:
        """OpenAI's embeddings API: the texts embedded in the next prediction batch."""
        started = time.perf_counter()
        try:
            request = openai_embeddings(body, self.settings)
        except RequestError as error:
            self.metrics.record_request("predict", error, [], error.status, time.perf_counter() - started)
            raise RequestRefused(error) from None
        results = await self.batchers["predict"].submit(request.envelope)
        answer = reply(request.envelope, results)
        self.metrics.record_request("predict", request.envelope, results, answer.status, time.perf_counter() - started)
        if answer.error is not None:
            raise RequestRefused(request.field(answer.error))
        return request.answer(results[0])

    async def serve(self, payload: Any, kind: Kind) -> Any:
        """One request: parsed here, computed in its kind's next batch, answered or refused."""
        started = time.perf_counter()
        envelope = self.service.parse(rest_body(payload), kind)
        results = [] if isinstance(envelope, RequestError) else await self.batchers[kind].submit(envelope)
        answer = reply(envelope, results)
        self.metrics.record_request(kind, envelope, results, answer.status, time.perf_counter() - started)
        if answer.error is not None:
            raise RequestRefused(answer.error)
        if isinstance(payload, InferRequest) and "id" not in answer.body:
            answer.body["id"] = str(uuid.uuid4())  # KServe's v2 response model requires an id
        return answer.body


# -- the server ---------------------------------------------------------------------------------
class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413 before it is read whole (ASGI middleware)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _refusal_response(self._refusal(int(length)))(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise RequestRefused(self._refusal(received))
            return message

        return await self.app(scope, limited, send)

    def _refusal(self, size: int) -> RequestError:
        return RequestError(f"body is {size} bytes; the limit is {self.max_bytes}", "body", 413)


def _refusal_response(error: RequestError) -> ORJSONResponse:
    return ORJSONResponse(status_code=error.status, content=error.body())


async def _refused(_: Request, exc: RequestRefused) -> ORJSONResponse:
    return _refusal_response(exc.error)


async def _invalid_v2_body(_: Request, exc: RequestValidationError) -> ORJSONResponse:
    """KServe's v2 request model refused the body: 400 naming the input, as the protocol layer does."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return _refusal_response(RequestError(f"body is not valid JSON: {first.get('msg')}", "body"))
    body = exc.body if isinstance(exc.body, dict) else {}
    parts = [str(p) for p in first.get("loc", ())[1:]]  # ("body", "InferenceRequest", "inputs", 1, ...)
    if parts and parts[0] not in body:
        parts = parts[1:]
    where = ".".join(parts) or "body"
    error = RequestError(f"{where}: {first.get('msg', 'is not valid')}", where)
    return _refusal_response(named_input(error, body))


def install(app: FastAPI, dataplane: DataPlane, max_request_bytes: int) -> None:
    """The routes, error answers and body limit that KServe's app lacks."""
    app.add_exception_handler(RequestRefused, _refused)
    app.add_exception_handler(RequestValidationError, _invalid_v2_body)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    def route(verb: InferenceVerb):
        async def call(model_name: str, request: Request) -> ORJSONResponse:
            if not await dataplane.model_ready(model_name, True):
                raise ModelNotReady(model_name)
            model = await dataplane.get_model(model_name)
            answer, _ = await model(await request.body(), headers=dict(request.headers), verb=verb)
            return ORJSONResponse(answer)
        return call

    async def embeddings(request: Request) -> ORJSONResponse:
        try:
            body = parse_openai_body(await request.body(), max_request_bytes)
        except RequestError as error:
            raise RequestRefused(error) from None
        if not await dataplane.model_ready(body.model, True):
            raise ModelNotReady(body.model)
        model = await dataplane.get_model(body.model)
        return ORJSONResponse(await model.embeddings(body))

    app.add_api_route("/predictions/{model_name}", route(InferenceVerb.PREDICT), methods=["POST"])
    app.add_api_route(OPENAI_EMBEDDINGS, embeddings, methods=["POST"])
    app.add_api_route("/explanations/{model_name}", route(InferenceVerb.EXPLAIN), methods=["POST"])
    app.add_api_route("/v2/models/{model_name}/explain", route(InferenceVerb.EXPLAIN), methods=["POST"])


class SiameseModelServer(kserve.ModelServer):
    """KServe's ModelServer, bound to ``host`` (KServe's binds every interface)."""

    def __init__(self, host: str, max_request_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host
        self.max_request_bytes = max_request_bytes

    def start(self, models: list[kserve.Model]) -> None:
        install(model_server.app, self.dataplane, self.max_request_bytes)
        super().start(models)

    def setup_event_loop(self) -> None:
        super().setup_event_loop()  # runs after the REST server is made, before it binds
        if self._rest_server is not None:
            self._rest_server.config.host = self.host


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, parents=[model_server.parser],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, required=True,
                   help="a sentence-transformers directory, or one with model-config.yaml (and model/)")
    p.add_argument("--model_config", type=Path, help="a model-config.yaml elsewhere (default: model_dir's)")
    p.add_argument("--http_host", default="127.0.0.1", help="the address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--request_logs", type=lambda x: x.lower() in ("1", "true", "yes"), default=False,
                   help="a log line per request (KServe's access and timing logs)")
    p.add_argument("--reference", choices=["shift", "none"], help="handler.reference (default: the config's)")
    p.add_argument("--similarity", choices=["cos", "dot"], help="handler.similarity (default: the config's)")
    p.add_argument("--max_length", type=int, help="handler.max_length (default: the config's)")
    for name, field in EngineSettings.model_fields.items():
        p.add_argument(f"--{name}", type=float if field.annotation is float else int, help=field.description)
    p.set_defaults(http_port=DEFAULT_PORT, enable_grpc=False, enable_latency_logging=False)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.workers != 1:
        raise SystemExit("--workers: run one server process per pod (scale with replicas); the model batches itself")
    handler = {k: getattr(args, k) for k in ("reference", "similarity", "max_length") if getattr(args, k) is not None}
    engine = {k: getattr(args, k) for k in EngineSettings.model_fields if getattr(args, k) is not None}
    root, settings, config = load_settings(args.model_dir, args.model_config, handler, engine)
    server = SiameseModelServer(
        args.http_host, config.max_request_bytes, http_port=args.http_port, grpc_port=args.grpc_port,
        workers=1, enable_grpc=args.enable_grpc, enable_latency_logging=args.enable_latency_logging,
    )
    ours = logging.getLogger("handlers")  # the project's log lines go where KServe's go
    ours.handlers, ours.propagate = logging.getLogger("kserve").handlers, False
    ours.setLevel(logging.INFO)
    if not args.request_logs:
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    model = SiameseModel(args.model_name, root, settings, config)
    model.load()
    server.start([model])


if __name__ == "__main__":
    main()
