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


def closed_loop(batcher: AdaptiveBatcher, clients: int, rounds: int, think_s: float):
    """``clients`` callers, each sending its next one-text request ``think_s`` after its answer
    (a client's round trip), as wrk's connections do."""

    async def client(i: int) -> None:
        for r in range(rounds):
            result, start, stop = await batcher.submit([f"c{i}r{r}"])
            assert result[start:stop] == [f"C{i}R{r}"]
            await asyncio.sleep(think_s)

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(clients)))

    run(main())


def test_without_a_wait_a_closed_loop_splits_into_alternating_small_batches():
    recorder = Recorder(delay=0.02)
    batcher = AdaptiveBatcher(recorder, max_batch_size=64, max_queued=1000, max_wait_s=0)
    closed_loop(batcher, clients=8, rounds=6, think_s=0.003)
    sizes = [len(b) for b in recorder.batches]
    # The first request runs alone, the other seven form the next batch, and so on.
    assert sizes[:3] == [1, 7, 1]
    batcher.close()


def test_under_load_a_free_thread_waits_briefly_for_the_clients_of_the_last_batch():
    recorder = Recorder(delay=0.02)
    batcher = AdaptiveBatcher(
        recorder, max_batch_size=64, max_queued=1000, max_wait_s=0.2, wait_share=10.0
    )
    closed_loop(batcher, clients=8, rounds=6, think_s=0.003)
    sizes = [len(b) for b in recorder.batches]
    # The first request runs alone; it ends with 8 texts in play (its own and the 7 queued
    # behind it), so from then on every batch waits for, and holds, all 8 clients.
    assert sizes == [1] + [8] * 5 + [7], sizes
    batcher.close()


def test_the_wait_never_delays_a_lone_client_and_ends_when_the_load_does():
    recorder = Recorder(delay=0.005)
    batcher = AdaptiveBatcher(
        recorder, max_batch_size=64, max_queued=1000, max_wait_s=0.2, wait_share=1000.0
    )

    async def timed(text: str) -> float:
        started = time.perf_counter()
        await batcher.submit([text])
        return time.perf_counter() - started

    async def main() -> None:
        # A lone client: nothing else in play, so no request waits for company.
        alone = [await timed(f"a{i}") for i in range(5)]
        assert max(alone) < 0.1, alone
        # A burst of 8 raises the target ...
        await asyncio.gather(*(batcher.submit([f"b{i}"]) for i in range(8)))
        assert batcher.target > 1
        # ... so the next lone request waits for company, at most max_wait_s, and no longer:
        # its batch ends with one text in play, and the lone client is served at once again.
        first = await timed("c0")
        assert 0.15 < first < 0.6, first
        assert batcher.target == 1
        again = [await timed(f"c{i}") for i in range(1, 4)]
        assert max(again) < 0.1, again

    run(main())
    batcher.close()


def test_a_free_thread_waits_for_a_request_still_being_read_and_no_longer():
    recorder = Recorder(delay=0.01)
    batcher = AdaptiveBatcher(
        recorder, max_batch_size=64, max_queued=1000, max_wait_s=0.5, wait_share=1000.0
    )

    async def announced(text: str | None) -> None:
        with batcher.arriving():
            await asyncio.sleep(0.05)  # reading and parsing the body
            if text is None:
                raise ValueError("a bad body: never submitted")
            await batcher.submit([text])

    async def main() -> None:
        await batcher.submit(["first"])  # the wait is a share of the last batch's run time
        # One request is being read while another is submitted: they share one batch.
        reading = asyncio.ensure_future(announced("late"))
        await asyncio.sleep(0.01)
        await asyncio.gather(batcher.submit(["early"]), reading)
        assert recorder.batches[1:] == [["early", "late"]]

    run(main())
    batcher.close()


def test_a_request_that_leaves_without_submitting_ends_the_wait_for_it():
    recorder = Recorder(delay=0.01)
    batcher = AdaptiveBatcher(
        recorder, max_batch_size=64, max_queued=1000, max_wait_s=0.5, wait_share=1000.0
    )

    async def announced() -> None:
        with batcher.arriving():
            await asyncio.sleep(0.05)  # reading and parsing the body
            raise ValueError("a bad body: never submitted")

    async def main() -> None:
        await batcher.submit(["first"])  # the wait is a share of the last batch's run time
        failing = asyncio.ensure_future(announced())
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        await batcher.submit(["alone"])
        assert time.perf_counter() - started < 0.3
        with pytest.raises(ValueError):
            await failing
        assert recorder.batches[-1] == ["alone"]

    run(main())
    batcher.close()
