"""The ``kserve.Model`` over the shared ``Service``: predictions batched in threads, explanations
in the explainer pool's processes, every request parsed by the protocol layer and answered or
refused (``RequestRefused``) as the TorchServe handler answers it."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import kserve
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest

from ..device import place, usable_cores
from ..protocol import Envelope, Kind, OpenAIEmbeddingsBody, RequestError, openai_embeddings
from ..service import Result, Service, reply
from ..settings import HandlerSettings
from .batching import Batcher
from .config import EngineSettings
from .explainer_pool import ExplainerPool, WorkerSpec
from .metrics import PrometheusRecorder

log = logging.getLogger(__name__)

WARM_UP = {"text_a": "A man is playing a guitar.", "text_b": "Someone plays music."}


class RequestRefused(InvalidInput):
    """A request that cannot be served, as KServe's own ``InvalidInput``: answered with the
    refusal's status and ``{"error", "field"}`` (a server without this module's handler
    answers 400 ``{"error"}``, the message naming the field)."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


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
        device = place(engine.batch_threads(self.settings.runtime, usable_cores()))
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
        envelope = self.service.parse(payload, kind)  # an InferRequest (v2) is read as it is
        results = [] if isinstance(envelope, RequestError) else await self.batchers[kind].submit(envelope)
        answer = reply(envelope, results)
        self.metrics.record_request(kind, envelope, results, answer.status, time.perf_counter() - started)
        if answer.error is not None:
            raise RequestRefused(answer.error)
        if isinstance(payload, InferRequest) and "id" not in answer.body:
            answer.body["id"] = str(uuid.uuid4())  # KServe's v2 response model requires an id
        return answer.body
