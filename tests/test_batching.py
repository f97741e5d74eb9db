"""The collection window of KServe's model server (``serving.kserve.batching.Batcher``), in-process."""
from __future__ import annotations

import asyncio
import time

import pytest

from handlers.serving.kserve.batching import Batcher


class Recorder:
    """A ``run`` that records its batches and takes ``seconds`` per batch."""

    def __init__(self, seconds: float = 0.0, fail_on: object = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list] = []
        self.started: list[float] = []
        self.running = 0
        self.most_running = 0

    async def __call__(self, entries: list) -> list:
        self.batches.append(list(entries))
        self.started.append(time.perf_counter())
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.seconds)
            if self.fail_on in entries:
                raise ValueError(f"cannot compute {self.fail_on}")
            return [entry * 10 for entry in entries]
        finally:
            self.running -= 1


def test_requests_within_the_window_share_a_batch_and_keep_their_order():
    async def scenario():
        run = Recorder()
        batcher = Batcher(run, window_s=0.05, max_size=8)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40]
    assert run.batches == [[0, 1, 2, 3, 4]]


def test_a_full_batch_starts_before_the_window_ends():
    async def scenario():
        run = Recorder()
        batcher = Batcher(run, window_s=5.0, max_size=3)
        start = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        return run, results, time.perf_counter() - start

    run, results, elapsed = asyncio.run(scenario())
    assert results == [10 * i for i in range(6)]
    assert run.batches == [[0, 1, 2], [3, 4, 5]]
    assert elapsed < 1.0  # two full batches: the 5 s window never ran out


def test_a_lone_request_waits_about_the_window():
    async def scenario(window_s: float):
        run = Recorder()
        waits: list[float] = []
        batcher = Batcher(run, window_s=window_s, max_size=8, on_batch=lambda size, w: waits.extend(w))
        await batcher.submit(1)
        return waits

    (wait,) = asyncio.run(scenario(0.03))
    assert 0.03 <= wait < 0.25
    (wait,) = asyncio.run(scenario(0.0))
    assert wait < 0.05


@pytest.mark.slow
def test_requests_queued_behind_a_busy_slot_go_next_without_another_window():
    """One slot, a 0.5 s window, 1.5 s per batch: requests that arrive while the first batch
    runs have had their window when the slot frees, so the second batch starts at once."""
    async def scenario():
        run = Recorder(seconds=1.5)
        batcher = Batcher(run, window_s=0.5, max_size=8, concurrency=1)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.7)  # the first batch started at 0.5 s
        late = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
        await asyncio.gather(first, *late)
        return run

    run = asyncio.run(scenario())
    assert run.batches == [[0], [1, 2, 3]]
    gap = run.started[1] - run.started[0]
    assert 1.5 <= gap < 1.8  # not 1.5 s + another 0.5 s window


def test_concurrency_bounds_the_batches_in_flight():
    async def scenario():
        run = Recorder(seconds=0.1)
        batcher = Batcher(run, window_s=0.0, max_size=1, concurrency=2)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [10 * i for i in range(6)]
    assert run.most_running == 2


def test_a_failed_batch_fails_its_own_requests_only():
    async def scenario():
        run = Recorder(fail_on=2)
        batcher = Batcher(run, window_s=0.02, max_size=3)
        return await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, ValueError) for r in results[:3])
    assert results[3:] == [30, 40, 50]


def test_a_client_that_goes_away_costs_the_others_nothing():
    async def scenario():
        run = Recorder(seconds=0.05)
        batcher = Batcher(run, window_s=0.02, max_size=8)
        gone = asyncio.ensure_future(batcher.submit(0))
        kept = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await kept, await batcher.submit(2)

    assert asyncio.run(scenario()) == (10, 20)


def test_settings_out_of_range_are_refused():
    for kwargs in ({"max_size": 0}, {"concurrency": 0}, {"window_s": -1}):
        with pytest.raises(ValueError):
            Batcher(Recorder(), **{"window_s": 0.0, "max_size": 1, **kwargs})


def test_a_batch_stops_at_its_token_bound_and_a_long_request_goes_alone():
    """Entries are their own token counts: a bound of 100 tokens splits what 8 requests would hold."""
    async def scenario():
        run = Recorder()
        batcher = Batcher(run, window_s=0.05, max_size=8, max_tokens=100, tokens=lambda entry: entry)
        results = await asyncio.gather(*(batcher.submit(n) for n in (10, 20, 30, 300, 40, 50, 5)))
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [100, 200, 300, 3000, 400, 500, 50]  # every request answered, in its order
    assert run.batches == [[10, 20, 30], [300], [40, 50, 5]]  # the first request of a batch is always taken
    assert all(sum(batch) <= 100 for batch in run.batches if len(batch) > 1)


def test_a_batch_full_of_tokens_starts_before_the_window_ends():
    """120 queued tokens fill a batch of 100: the first starts at once; the last one, alone in
    the queue, waits its window for company."""
    async def scenario():
        run = Recorder()
        batcher = Batcher(run, window_s=1.0, max_size=8, max_tokens=100, tokens=lambda entry: entry)
        start = time.perf_counter()
        await asyncio.gather(*(batcher.submit(n) for n in (60, 60)))
        return run, [t - start for t in run.started]

    run, started = asyncio.run(scenario())
    assert run.batches == [[60], [60]]
    assert started[0] < 0.5 <= 0.9 <= started[1]  # one window is 1 s: the first did not wait it


def test_a_token_bound_needs_the_cost_of_a_request():
    for kwargs in ({"max_tokens": 0, "tokens": len}, {"max_tokens": 10}):
        with pytest.raises(ValueError):
            Batcher(Recorder(), window_s=0.0, max_size=1, **kwargs)
