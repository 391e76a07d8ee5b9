"""The adaptive batcher on its own: batching, order, limits, errors (asyncio, no I/O)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batching import AdaptiveBatcher, OverloadedError


class Recorder:
    def __init__(self, delay: float = 0.05, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.active = 0
        self.most_active = 0
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[str]:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        self.batches.append(texts)
        if self.fail_on in texts:
            raise ValueError(f"bad text {self.fail_on}")
        return [t.upper() for t in texts]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_get_their_own_slice():
    recorder = Recorder()
    batcher = AdaptiveBatcher(recorder, max_batch_size=64, max_queued=1000)

    async def main():
        requests = [[f"r{i}a", f"r{i}b"] for i in range(10)]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for request, (result, start, stop) in zip(requests, answers, strict=True):
            assert result[start:stop] == [t.upper() for t in request]

    run(main())
    # The first request runs alone (nothing to wait for); the other nine queue behind it.
    assert [len(b) for b in recorder.batches] == [2, 18]
    batcher.close()


def test_batches_respect_the_size_limit_without_splitting_requests():
    recorder = Recorder(delay=0.02)
    batcher = AdaptiveBatcher(recorder, max_batch_size=5, max_queued=1000)

    async def main():
        await asyncio.gather(*(batcher.submit([f"{i}-{j}" for j in range(2)]) for i in range(7)))

    run(main())
    assert all(len(b) <= 5 for b in recorder.batches)
    assert sum(len(b) for b in recorder.batches) == 14
    assert all(len(b) % 2 == 0 for b in recorder.batches)
    batcher.close()


def test_concurrency_bounds_parallel_batches():
    recorder = Recorder(delay=0.05)
    batcher = AdaptiveBatcher(recorder, max_batch_size=1, max_queued=1000, concurrency=2)

    async def main():
        await asyncio.gather(*(batcher.submit([str(i)]) for i in range(8)))

    run(main())
    assert recorder.most_active == 2
    assert len(recorder.batches) == 8
    batcher.close()


def test_overload_is_refused_at_once_and_errors_reach_only_their_batch():
    recorder = Recorder(delay=0.05, fail_on="boom")
    batcher = AdaptiveBatcher(recorder, max_batch_size=1, max_queued=3)

    async def main():
        first = asyncio.ensure_future(batcher.submit(["ok"]))
        await asyncio.sleep(0.01)  # "ok" is running; the queue is empty again
        queued = [asyncio.ensure_future(batcher.submit([t])) for t in ("boom", "x", "y")]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            await batcher.submit(["one too many"])
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        assert results[0][0] == ["OK"]
        assert isinstance(results[1], ValueError)
        assert results[2][0] == ["X"] and results[3][0] == ["Y"]

    run(main())
    batcher.close()
