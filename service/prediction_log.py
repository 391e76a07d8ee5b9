"""The durable log of predictions, written in batches off the request path.

Requests append records to an in-memory buffer (a cheap list append under a lock); a writer thread
moves the buffer to the store every ``flush_interval`` in one transaction. A clean shutdown
flushes what is left, so accepted predictions are not lost. If the store is unavailable the
records wait in the buffer, up to ``max_pending``; beyond that the oldest are dropped and
counted, so a long outage cannot exhaust memory. The writer also enforces retention (rows and age).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable

from monitoring.metrics import metrics
from refit.store import PredictionRecord, Store

log = logging.getLogger("refit.prediction_log")


class PredictionLog:
    def __init__(
        self,
        store: Store,
        flush_interval_s: float = 0.2,
        retention_rows: int = 1_000_000,
        retention_days: float = 30.0,
        retention_every_s: float = 60.0,
        max_pending: int = 200_000,
    ) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.retention_rows = retention_rows
        self.retention_seconds = retention_days * 86400
        self.retention_every_s = retention_every_s
        self.max_pending = max_pending
        self._buffer: list[PredictionRecord] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_retention = 0.0

    def add(self, records: list[PredictionRecord]) -> None:
        with self._lock:
            self._buffer.extend(records)

    def pending(self, ids: Iterable[str]) -> dict[str, PredictionRecord]:
        """Records not yet written (in this worker), by id."""
        wanted = set(ids)
        with self._lock:
            return {r.id: r for r in self._buffer if r.id in wanted}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()
            now = time.monotonic()
            if now - self._last_retention >= self.retention_every_s:
                self._last_retention = now
                try:
                    deleted = self.store.enforce_retention(self.retention_rows, self.retention_seconds)
                    if deleted:
                        log.info("retention: deleted %d old predictions", deleted)
                except Exception:  # noqa: BLE001
                    log.exception("retention pass failed")

    def flush(self) -> int:
        """Write the buffer to the store; returns how many records were written."""
        with self._flush_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            metrics().prediction_log_pending.set(len(batch))
            if not batch:
                return 0
            try:
                self.store.insert_predictions(batch)
            except Exception:  # noqa: BLE001 - keep the records and try again next time
                log.exception("writing %d predictions failed; will retry", len(batch))
                with self._lock:
                    self._buffer = batch + self._buffer
                    overflow = len(self._buffer) - self.max_pending
                    if overflow > 0:
                        del self._buffer[:overflow]
                        metrics().prediction_log_dropped.inc(overflow)
                return 0
            return len(batch)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for _ in range(3):
            self.flush()
            with self._lock:
                if not self._buffer:
                    return
            time.sleep(0.5)
        log.error("shutting down with %d predictions unwritten", len(self._buffer))
