"""KServe's own model server as an engine: a ``kserve.Model`` over the shared ``Service``.

    siamese-kserve --model_name minilm --model_dir path/to/model [--model_config model-config.yaml]
    python -m handlers.serving.kserve.server --model_name minilm --model_dir path/to/model --http_port 8085

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
The parts: ``config`` (the settings), ``model`` (the ``kserve.Model``), ``batching``,
``explainer_pool`` and ``metrics``; this module is the server: routes, middleware, errors, CLI.

- **Errors**: a refused request raises ``RequestRefused``, KServe's own ``InvalidInput``,
  answered with the refusal's 4xx and ``{"error", "field"}``; a v2 body that KServe's request
  model refuses is answered the same way (400, naming the input).
- **Batching**: predictions are batched in the model (``kserve.batching.Batcher``): a collection window
  of ``max_batch_delay_ms`` from the first request, at most ``batch_size`` requests and, with
  ``max_batch_tokens``, at most that many tokens (a long request does not hold short ones
  behind it), computed in ``prediction_threads`` threads.
- **Explanations** run in ``explain_workers`` processes at ``explain_nice``
  (``explainer_pool``), batched the same way; with 0 workers ``:explain`` answers 501 (a
  deployment whose explanations are served by a separate explainer).
- **Metrics**: KServe's ``/metrics`` with the project's metrics (``kserve.metrics``).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import kserve
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from kserve import model_server
from kserve.errors import ModelNotReady
from kserve.model import InferenceVerb
from kserve.protocol.dataplane import DataPlane

from ..protocol import RequestError, named_input, parse_openai_body
from .config import EngineSettings, load_settings
from .model import RequestRefused, SiameseModel

DEFAULT_PORT = 8085
OPENAI_EMBEDDINGS = "/openai/v1/embeddings"  # where KServe's huggingface server answers OpenAI's embeddings API


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
        return RequestError("body", f"is {size} bytes; the limit is {self.max_bytes}", 413)


def _refusal_response(error: RequestError) -> ORJSONResponse:
    return ORJSONResponse(status_code=error.status, content=error.body())


async def _refused(_: Request, exc: RequestRefused) -> ORJSONResponse:
    return _refusal_response(exc.error)


async def _invalid_v2_body(_: Request, exc: RequestValidationError) -> ORJSONResponse:
    """KServe's v2 request model refused the body: 400 naming the input, as the protocol layer does."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return _refusal_response(RequestError("body", f"is not valid JSON: {first.get('msg')}"))
    body = exc.body if isinstance(exc.body, dict) else {}
    parts = [str(p) for p in first.get("loc", ())[1:]]  # ("body", "InferenceRequest", "inputs", 1, ...)
    if parts and parts[0] not in body:
        parts = parts[1:]
    where = ".".join(parts) or "body"
    error = RequestError(where, first.get("msg", "is not valid"))
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


#: the handler settings that the command line overrides
HANDLER_OPTIONS = ("reference", "similarity", "max_length", "runtime", "onnx_file")


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
    p.add_argument("--runtime", choices=["torch", "onnx"],
                   help="handler.runtime: what computes predictions (default: the config's; onnx: fp32 in onnxruntime)")
    p.add_argument("--onnx_file", help="handler.onnx_file: the exported graph, in model_dir or an absolute path")
    for name, field in EngineSettings.model_fields.items():
        p.add_argument(f"--{name}", type=float if field.annotation is float else int, help=field.description)
    p.set_defaults(http_port=DEFAULT_PORT, enable_grpc=False, enable_latency_logging=False)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.workers != 1:
        raise SystemExit("--workers: run one server process per pod (scale with replicas); the model batches itself")
    handler = {k: getattr(args, k) for k in HANDLER_OPTIONS if getattr(args, k) is not None}
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
