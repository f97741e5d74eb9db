"""Explanations in worker processes at a lower CPU priority, apart from the predictions.

An explanation costs from a few to thousands of predictions. Computed in the model server's
own process, it would hold the cores (and, between torch operations, the interpreter) that
the event loop and the prediction batches need. So KServe's model server hands each batch of
explanation requests to a pool of worker processes: each loads the model once, sets every
method up and times it for admission (``Service.load(..., explanations=True)``), and runs at
``nice`` (the kernel gives a niced process the cores only when the predictions leave them
idle). The worker runs the same ``Service.answer_items`` as a TorchServe worker: admission,
grouping by method and options, the methods, the refusals.

The processes start with ``spawn`` (never ``fork``: torch's thread pools do not survive it).
A worker that dies (killed for memory, say) breaks the pool: its batch is answered 503, and
the pool is started again for the next one.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass


from ..device import place, usable_cores
from ..protocol import Envelope, RequestError
from ..service import Result, Service
from ..settings import HandlerSettings

log = logging.getLogger(__name__)

#: the worker process's model (set once by ``_start_worker``, the pool's initializer)
_service: Service | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process loads, and how it runs."""

    root: str
    settings: HandlerSettings
    response_timeout_s: float
    model_name: str
    nice: int = 10
    torch_threads: int = 0  # 0: all cores (a niced worker takes them only when they are idle)


def _start_worker(spec: WorkerSpec) -> None:
    global _service
    os.nice(spec.nice)
    device = place(spec.torch_threads or usable_cores())
    _service = Service.load(spec.root, spec.settings, spec.response_timeout_s, device, spec.model_name)


def _worker_ready() -> int:
    assert _service is not None
    return os.getpid()


def _explain(envelopes: list[Envelope]) -> list[list[Result]]:
    assert _service is not None
    return _service.answer_items(envelopes)


class ExplainerPool:
    """``workers`` processes that compute explanation batches (``run``)."""

    def __init__(self, spec: WorkerSpec, workers: int = 1) -> None:
        self.spec = spec
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._starting = asyncio.Lock()

    def start(self) -> list[int]:
        """Start the workers and wait until each has loaded the model; their process ids."""
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(self.spec,),
        )
        futures = [self._pool.submit(_worker_ready) for _ in range(self.workers)]
        return sorted({future.result() for future in futures})

    def pids(self) -> list[int]:
        return sorted(self._pool._processes) if self._pool is not None else []  # noqa: SLF001

    async def run(self, envelopes: list[Envelope]) -> list[list[Result]]:
        """The results of one batch of explanation requests, computed in a worker."""
        async with self._starting:  # after a worker died, one batch starts the pool again
            if self._pool is None:
                await asyncio.get_running_loop().run_in_executor(None, self.start)
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, _explain, envelopes)
        except BrokenProcessPool:
            log.error("an explanation worker died; starting the pool again")
            if self._pool is pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            refusal = RequestError("method", "the explanation worker stopped; retry", 503)
            return [[refusal] * len(envelope.items) for envelope in envelopes]

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
