"""Adaptive batching of concurrent requests within one worker.

Requests queue up while batches run; whenever an inference thread is free, everything queued (up
to ``max_batch_size`` texts) becomes its next batch. An idle worker therefore serves a lone request
at once, with no timer to wait out, and a busy one batches as much as its load allows. Inference
runs on ``concurrency`` dedicated threads, so the event loop keeps parsing and answering requests
meanwhile (onnxruntime and tokenizers release the GIL).

Requests are never split across batches and never dropped: when the queue holds more than
``max_queued`` texts, new requests are refused at once with :class:`OverloadedError` (503), a
signal for the client to back off that costs nothing to send.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from refit.errors import NotReadyError

T = TypeVar("T")


class OverloadedError(NotReadyError):
    """The worker's queue is full: retry later (503)."""


@dataclass
class _Pending(Generic[T]):
    texts: Sequence[str]
    future: asyncio.Future[tuple[T, int, int]]


class AdaptiveBatcher(Generic[T]):
    """Runs ``run_batch(texts)`` on batches of queued requests.

    ``submit`` returns ``(batch_result, start, stop)``: the result of the batch the request ran
    in, and where its texts sit in that batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[str]], T],
        max_batch_size: int,
        max_queued: int,
        concurrency: int = 1,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.concurrency = concurrency
        self._queue: collections.deque[_Pending[T]] = collections.deque()
        self._queued_texts = 0
        self._running = 0
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="inference")

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    async def submit(self, texts: Sequence[str]) -> tuple[T, int, int]:
        if self._queued_texts + len(texts) > self.max_queued:
            raise OverloadedError(
                f"this worker has {self._queued_texts} texts queued; retry shortly"
            )
        future: asyncio.Future[tuple[T, int, int]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(texts, future))
        self._queued_texts += len(texts)
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        """Start batches while threads are free and requests wait."""
        loop = asyncio.get_running_loop()
        while self._queue and self._running < self.concurrency:
            self._running += 1
            loop.create_task(self._run(self._next_batch()))

    def _next_batch(self) -> list[_Pending[T]]:
        batch = [self._queue.popleft()]
        size = len(batch[0].texts)
        while self._queue and size + len(self._queue[0].texts) <= self.max_batch_size:
            pending = self._queue.popleft()
            size += len(pending.texts)
            batch.append(pending)
        self._queued_texts -= size
        return batch

    async def _run(self, batch: list[_Pending[T]]) -> None:
        loop = asyncio.get_running_loop()
        texts = [text for pending in batch for text in pending.texts]
        try:
            result = await loop.run_in_executor(self._executor, self._run_batch, texts)
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        else:
            start = 0
            for pending in batch:
                stop = start + len(pending.texts)
                if not pending.future.done():  # the client may have gone away
                    pending.future.set_result((result, start, stop))
                start = stop
        finally:
            self._running -= 1
            self._dispatch()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
