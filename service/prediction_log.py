"""The durable log of predictions, written in batches off the request path.

Requests append records to an in-memory buffer (a cheap list append under a lock); a writer thread
moves the buffer to the store every ``flush_interval`` in one transaction. A clean shutdown
flushes what is left, so accepted predictions are not lost. If the store is unavailable the
records wait in the buffer, up to ``max_pending``; beyond that the oldest are dropped and
counted, so a long outage cannot exhaust memory. The writer also enforces retention (rows and age).

A batch the store *rejects* (as opposed to cannot reach) must not block the writes behind it:
the batch is bisected until the rows it refuses are isolated, every other row is written, and
each refused row is quarantined, appended as JSON to ``<data_dir>/quarantine/predictions.jsonl``
where a person can see it, and counted in ``refit_prediction_log_quarantined_total``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from monitoring.metrics import metrics
from refit.errors import StoreUnavailableError
from refit.store import PredictionRecord, RowsRejectedError, Store

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
        quarantine_path: Path | None = None,
    ) -> None:
        self.store = store
        self.quarantine_path = quarantine_path
        self.store_ok = True
        """Whether the last contact with the store succeeded (readiness follows it)."""
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
        self._last_ping = 0.0

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
            if not self.flush():
                self._check_store()
            now = time.monotonic()
            if self.store_ok and now - self._last_retention >= self.retention_every_s:
                self._last_retention = now
                try:
                    deleted = self.store.enforce_retention(
                        self.retention_rows, self.retention_seconds
                    )
                    if deleted:
                        log.info("retention: deleted %d old predictions", deleted)
                except Exception:  # noqa: BLE001
                    log.exception("retention pass failed")

    def _check_store(self) -> None:
        """With nothing to write, ask the store whether it is there (at most once a second)."""
        now = time.monotonic()
        if now - self._last_ping < 1.0:
            return
        self._last_ping = now
        try:
            self.store.ping()
        except Exception:  # noqa: BLE001 - any failure to answer counts as unavailable
            self._set_store_ok(False)
        else:
            self._set_store_ok(True)

    def _set_store_ok(self, ok: bool) -> None:
        if ok != self.store_ok:
            log.warning("the store is %s", "reachable again" if ok else "unreachable")
        self.store_ok = ok
        metrics().store_up.set(1 if ok else 0)

    def flush(self) -> int:
        """Write the buffer to the store; returns how many records were written."""
        with self._flush_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            metrics().prediction_log_pending.set(len(batch))
            if not batch:
                return 0
            try:
                written = self._write(batch)
            except StoreUnavailableError:
                self._set_store_ok(False)
                log.warning("store unreachable; keeping %d predictions to retry", len(batch))
                self._requeue(batch)
                return 0
            except Exception:  # noqa: BLE001 - unexpected: keep the records and retry
                log.exception("writing %d predictions failed; will retry", len(batch))
                self._requeue(batch)
                return 0
            self._set_store_ok(True)
            return written

    def _write(self, batch: list[PredictionRecord]) -> int:
        """Insert ``batch``; if the store rejects it, bisect and quarantine the rows it refuses.

        Raises :class:`StoreUnavailableError` when the store cannot be reached at all, so the
        caller keeps the whole batch for later.
        """
        try:
            self.store.insert_predictions(batch)
            return len(batch)
        except RowsRejectedError as exc:
            if len(batch) == 1:
                self._quarantine(batch[0], exc)
                return 0
        middle = len(batch) // 2
        return self._write(batch[:middle]) + self._write(batch[middle:])

    def _quarantine(self, record: PredictionRecord, error: Exception) -> None:
        log.error("the store refused prediction %s; quarantined: %s", record.id,
                  str(error).splitlines()[0][:300])
        metrics().prediction_log_quarantined.inc()
        if self.quarantine_path is None:
            return
        entry = {
            "id": record.id, "created_at": record.created_at,
            "model_version": record.model_version, "text": record.text, "label": record.label,
            "confidence": record.confidence, "error": str(error).splitlines()[0][:1000],
            "quarantined_at": time.time(),
        }
        try:
            self.quarantine_path.parent.mkdir(parents=True, exist_ok=True)
            with self.quarantine_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        except OSError:
            log.exception("could not write the quarantine file %s", self.quarantine_path)

    def _requeue(self, batch: list[PredictionRecord]) -> None:
        with self._lock:
            self._buffer = batch + self._buffer
            overflow = len(self._buffer) - self.max_pending
            if overflow > 0:
                del self._buffer[:overflow]
                metrics().prediction_log_dropped.inc(overflow)

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
