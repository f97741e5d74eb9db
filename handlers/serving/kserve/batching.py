"""Requests that arrive close together, computed as one batch: a collection window.

TorchServe batches in its frontend (``batchSize``, ``maxBatchDelay``). KServe's model server
hands the model one request at a time, each in its own coroutine, so the model batches for
itself: ``Batcher.submit`` queues a request and waits for its answer. As soon as one of
``concurrency`` slots is free, the collector takes the oldest queued request, waits for more
until ``window_s`` after that request's arrival (at most ``max_size`` in all) and starts the
batch. The window counts from the arrival, not from the moment a slot frees:
requests that queued while every slot was busy have had their window, and go
into the next batch at once.

With ``max_tokens`` (and ``tokens``, the cost of one request), a batch also stops before the
request that would take its tokens past the bound, as TEI's ``max-batch-tokens`` does: a long
request does not hold a batch of short ones behind it. The first request of a batch is always
taken, whatever its tokens.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass
class _Queued(Generic[T, R]):
    entry: T
    future: asyncio.Future
    tokens: int = 0
    arrived: float = field(default_factory=time.perf_counter)


class Batcher(Generic[T, R]):
    """Batches of up to ``max_size`` entries, collected for at most ``window_s``.

    ``run`` computes one batch (one result per entry, in order). ``on_batch`` is told each
    batch's size and, per entry, the seconds it waited between ``submit`` and the start of
    its batch (the collection window plus any wait for a free slot).
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        window_s: float,
        max_size: int,
        concurrency: int = 1,
        on_batch: Callable[[int, list[float]], None] | None = None,
        max_tokens: int | None = None,
        tokens: Callable[[T], int] | None = None,
    ) -> None:
        if max_size < 1 or concurrency < 1 or window_s < 0:
            raise ValueError("max_size and concurrency must be at least 1, window_s at least 0")
        if max_tokens is not None and (max_tokens < 1 or tokens is None):
            raise ValueError("max_tokens must be at least 1, with tokens (the cost of a request)")
        self.max_tokens = max_tokens
        self.tokens = tokens
        self.run = run
        self.window_s = window_s
        self.max_size = max_size
        self.concurrency = concurrency
        self.on_batch = on_batch
        self._queue: deque[_Queued[T, R]] = deque()
        self._arrival: asyncio.Event | None = None
        self._collector: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    async def submit(self, entry: T) -> R:
        """Queue ``entry``; its result once its batch has run (or the batch's exception)."""
        if self._collector is None or self._collector.done():
            self._arrival = asyncio.Event()
            self._collector = asyncio.create_task(self._collect())
        cost = self.tokens(entry) if self.max_tokens is not None and self.tokens is not None else 0
        queued: _Queued[T, R] = _Queued(entry, asyncio.get_running_loop().create_future(), cost)
        self._queue.append(queued)
        self._arrival.set()
        return await queued.future

    async def close(self) -> None:
        """Stop collecting; batches already started finish."""
        if self._collector is not None:
            self._collector.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _collect(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        assert self._arrival is not None
        while True:
            await slots.acquire()
            while not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
            deadline = self._queue[0].arrived + self.window_s
            while len(self._queue) < self.max_size and not self._full_of_tokens():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            task = asyncio.create_task(self._run(batch, slots))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _full_of_tokens(self) -> bool:
        """Whether the queued requests already fill a batch's tokens (no use waiting for more)."""
        if self.max_tokens is None:
            return False
        total = 0
        for queued in self._queue:
            total += queued.tokens
            if total >= self.max_tokens:
                return True
        return False

    def _take(self) -> list[_Queued[T, R]]:
        """The next batch: the oldest requests, up to ``max_size`` and ``max_tokens``."""
        batch = [self._queue.popleft()]
        total = batch[0].tokens
        while self._queue and len(batch) < self.max_size:
            if self.max_tokens is not None and total + self._queue[0].tokens > self.max_tokens:
                break
            total += self._queue[0].tokens
            batch.append(self._queue.popleft())
        return batch

    async def _run(self, batch: list[_Queued[T, R]], slots: asyncio.Semaphore) -> None:
        try:
            started = time.perf_counter()
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch), [started - q.arrived for q in batch])
                except Exception:  # recording must never cost an answer
                    log.exception("on_batch failed")
            try:
                results = await self.run([q.entry for q in batch])
            except Exception as exc:  # every entry of the batch learns why
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(exc)
                return
            for q, result in zip(batch, results):
                if not q.future.done():  # a client that went away has cancelled its future
                    q.future.set_result(result)
        finally:
            slots.release()
