"""Adaptive batching of concurrent requests within one worker.

Requests queue up while batches run; whenever an inference thread is free, everything queued (up
to ``max_batch_size`` texts) becomes its next batch. An idle worker therefore serves a lone request
at once, with no timer to wait out, and a busy one batches as much as its load allows. Inference
runs on ``concurrency`` dedicated threads, so the event loop keeps parsing and answering requests
meanwhile (onnxruntime and tokenizers release the GIL).

Under load, a free thread may wait a moment for a fuller batch (``max_wait_s``; 0 never waits).
When a batch ends, the texts then in play (the batch's own, whose clients are about to send their
next requests, plus those queued and running) become the *target* of the next batch. The next
batch starts as soon as that many texts are queued, or once the thread has waited a quarter of the
last batch's run time (``WAIT_SHARE``, and at most ``max_wait_s``), whichever comes first: the
wait follows how long a client's round trip through a busy worker takes, at a bounded cost.
Without it, a closed loop of clients settles into batches that alternate with each other (the
texts that arrived during one batch form the next: 1 and 27, say, for 28 clients), and small
onnxruntime runs cost more CPU per text than full ones. A free thread also waits (as long) while
requests announced with :meth:`AdaptiveBatcher.arriving` are still being read and parsed. A lone
client's target is its own request and nothing else is arriving, so an idle worker still answers
at once.

Requests are never split across batches and never dropped: when the queue holds more than
``max_queued`` texts, new requests are refused at once with :class:`OverloadedError` (503), a
signal for the client to back off that costs nothing to send.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from refit.errors import NotReadyError

T = TypeVar("T")

WAIT_SHARE = 0.25
"""Longest wait for a fuller batch, as a share of the last batch's run time."""


_announced: contextvars.ContextVar[list[object] | None] = contextvars.ContextVar(
    "announced", default=None
)
"""The request the current task announced with ``arriving``, until it reaches ``submit``."""


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
        max_wait_s: float = 0.0,
        wait_share: float = WAIT_SHARE,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.concurrency = concurrency
        self.max_wait_s = max_wait_s
        self.wait_share = wait_share
        self._target = 1
        """Texts the next batch waits for (at most ``max_wait_s``): see the module docstring."""
        self._running_texts = 0
        self._timer: asyncio.TimerHandle | None = None
        self._wait_until: float | None = None
        self._arriving = 0
        self._last_run_s = 0.0
        self._queue: collections.deque[_Pending[T]] = collections.deque()
        self._queued_texts = 0
        self._running = 0
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="inference")

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request being read (around parsing it and submitting its texts): until it
        is submitted, or leaves without submitting, a free thread may wait for it."""
        pending: list[object] = [self]
        token = _announced.set(pending)
        self._arriving += 1
        try:
            yield
        finally:
            _announced.reset(token)
            if pending:  # left without submitting (a bad request): stop waiting for it
                pending.clear()
                self._arriving -= 1
                with contextlib.suppress(RuntimeError):  # no running loop: nothing waits
                    asyncio.get_running_loop()
                    self._dispatch()

    def _arrived(self) -> None:
        """The request this task announced (if it did, to this batcher) has arrived."""
        pending = _announced.get()
        if pending and pending[0] is self:
            pending.clear()
            self._arriving -= 1

    async def submit(self, texts: Sequence[str]) -> tuple[T, int, int]:
        self._arrived()
        if self._queued_texts + len(texts) > self.max_queued:
            raise OverloadedError(
                f"this worker has {self._queued_texts} texts queued; retry shortly"
            )
        future: asyncio.Future[tuple[T, int, int]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(texts, future))
        self._queued_texts += len(texts)
        self._dispatch()
        return await future

    @property
    def target(self) -> int:
        return self._target

    def _dispatch(self) -> None:
        """Start batches while threads are free and requests wait (and need not wait longer)."""
        loop = asyncio.get_running_loop()
        while self._queue and self._running < self.concurrency:
            if self._worth_waiting(loop):
                return
            self._stop_waiting()
            self._running += 1
            loop.create_task(self._run(self._next_batch()))

    def _worth_waiting(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a free thread should wait for more texts before starting the next batch."""
        queued = self._queued_texts
        if self.max_wait_s <= 0 or queued >= self.max_batch_size:
            return False
        if not self._arriving and queued >= self._target:
            return False
        now = loop.time()
        if self._wait_until is None:  # the wait starts now, and lasts at most max_wait_s
            self._wait_until = now + min(self.max_wait_s, self.wait_share * self._last_run_s)
            self._timer = loop.call_at(self._wait_until, self._waited)
        return now < self._wait_until

    def _waited(self) -> None:
        self._timer = None
        self._wait_until = float("-inf")  # over, even if the loop's clock fired a little early
        self._dispatch()

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wait_until = None

    def _next_batch(self) -> list[_Pending[T]]:
        batch = [self._queue.popleft()]
        size = len(batch[0].texts)
        while self._queue and size + len(self._queue[0].texts) <= self.max_batch_size:
            pending = self._queue.popleft()
            size += len(pending.texts)
            batch.append(pending)
        self._queued_texts -= size
        self._running_texts += size
        return batch

    async def _run(self, batch: list[_Pending[T]]) -> None:
        loop = asyncio.get_running_loop()
        texts = [text for pending in batch for text in pending.texts]
        started = loop.time()
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
            self._last_run_s = loop.time() - started
            self._running -= 1
            self._running_texts -= len(texts)
            # Texts in play as this batch ends, shared by the threads: what the next batch expects.
            in_play = len(texts) + self._queued_texts + self._running_texts
            self._target = max(1, -(-in_play // self.concurrency))
            self._dispatch()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
