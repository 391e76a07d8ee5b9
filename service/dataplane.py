"""The data plane: what the HTTP endpoints do, free of any web framework.

``service/app.py`` parses requests into the wire types of ``service/schemas.py``, calls a method
here, and renders the result or the :class:`~refit.errors.RefitError` it raises. Everything that
blocks (the store, the registry) runs on a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adapters.serving.registry import ModelRegistry
from monitoring.drift_job import drift_dir
from monitoring.leader import MonitorLeader
from monitoring.metrics import forget_dead_processes, metrics
from refit.errors import InvalidInputError, NotFoundError
from refit.settings import RefitSettings
from refit.store import FeedbackRecord, PredictionRecord, Store
from service.batching import AdaptiveBatcher
from service.jobs import JOB_ID, RetrainJobs
from service.prediction_log import PredictionLog
from service.predictor import BatchOutput, ModelHolder
from service.schemas import FeedbackItem
from service.security import inline_script_policy

log = logging.getLogger("refit.dataplane")


def new_prediction_id(now: float) -> str:
    """28 hex digits: milliseconds since the epoch, then 64 random bits. Sorts by time."""
    return f"{int(now * 1000):012x}{os.urandom(8).hex()}"


def prediction_id_time(prediction_id: str) -> float | None:
    try:
        return int(prediction_id[:12], 16) / 1000.0
    except ValueError:
        return None


class DataPlane:
    def __init__(self, settings: RefitSettings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.registry_path)
        self.store: Store | None = None
        self.holder = ModelHolder(
            self.registry, settings.ort_threads, settings.swap_poll_interval_s
        )
        self.prediction_log: PredictionLog | None = None
        self.jobs: RetrainJobs | None = None
        self.monitor = MonitorLeader(settings.data_dir)
        self.batcher: AdaptiveBatcher[BatchOutput] = AdaptiveBatcher(
            self._run_batch,
            max_batch_size=settings.batch_max_size,
            max_queued=max(1024, settings.batch_max_size * 32),
            concurrency=settings.inference_threads,
        )
        self.started_at = time.time()
        self._report_cache: tuple[tuple[int, int], bytes, str] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._start_blocking)

    def _start_blocking(self) -> None:
        forget_dead_processes()
        _initialise_metrics()
        self.store = Store.from_url(self.settings.resolved_database_url)
        self.prediction_log = PredictionLog(
            self.store,
            flush_interval_s=self.settings.log_flush_interval_ms / 1000,
            retention_rows=self.settings.retention_rows,
            retention_days=self.settings.retention_days,
            quarantine_path=self.settings.data_dir / "quarantine" / "predictions.jsonl",
        )
        self.prediction_log.start()
        self.jobs = RetrainJobs(self.settings, self.store)
        self.jobs.reconcile()
        self.registry.cleanup()
        self.holder.sync()  # load and warm the current version before reporting ready
        self.holder.start_watching()
        self.monitor.start()
        if not self.holder.ready:
            log.warning("no current model in %s: not ready until one is promoted",
                        self.registry.root)
        # Everything loaded so far lives as long as the worker: move it out of the garbage
        # collector's way, and collect young objects less often. Full collections over a large
        # heap otherwise pause the worker for tens of milliseconds under load (a p99 spike).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 1000)

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop_blocking)

    def _stop_blocking(self) -> None:
        self.monitor.stop()
        self.holder.stop()
        self.batcher.close()
        if self.prediction_log is not None:
            self.prediction_log.close()
        if self.store is not None:
            self.store.close()

    @property
    def ready(self) -> bool:
        return (
            self.holder.ready and self.prediction_log is not None and self.prediction_log.store_ok
        )

    # -- predict ---------------------------------------------------------------------------------

    def _run_batch(self, texts: list[str]) -> BatchOutput:
        output = self.holder.run_batch(texts)
        m = metrics()
        labels = output.model.labels
        counts = np.bincount(output.predicted, minlength=len(labels))
        for index in np.flatnonzero(counts):
            m.predictions.labels(label=labels[index], model_version=output.model.version).inc(
                int(counts[index])
            )
        for value in output.confidence.tolist():
            m.confidence.observe(value)
        return output

    def check_texts(self, texts: Sequence[str], field: str = "texts") -> None:
        limit = self.settings.max_texts_per_request
        if len(texts) > limit:
            raise InvalidInputError(
                f"{len(texts)} texts in one request; at most {limit} are allowed", field=field
            )
        max_chars = self.settings.max_text_chars
        for index, text in enumerate(texts):
            if len(text) > max_chars:
                raise InvalidInputError(
                    f"text is {len(text)} characters long; at most {max_chars} are allowed",
                    field=f"{field}[{index}]",
                )
            if not text.strip():
                raise InvalidInputError("text is empty", field=f"{field}[{index}]")

    async def predict(self, texts: list[str]) -> dict[str, Any]:
        self.check_texts(texts)
        self.holder.require()
        output, start, stop = await self.batcher.submit(texts)
        model = output.model
        labels = model.labels
        now = time.time()
        predictions: list[dict[str, Any]] = []
        records: list[PredictionRecord] = []
        rows = output.probabilities[start:stop].tolist()
        for offset, text in enumerate(texts):
            row = start + offset
            prediction_id = new_prediction_id(now)
            label = labels[output.predicted[row]]
            confidence = rows[offset][output.predicted[row]]
            predictions.append(
                {
                    "prediction_id": prediction_id,
                    "label": label,
                    "confidence": confidence,
                    "scores": dict(zip(labels, rows[offset])),
                }
            )
            records.append(
                PredictionRecord(
                    prediction_id, now, model.version, text, label, confidence,
                    output.embeddings[row].tobytes(),
                )
            )
        assert self.prediction_log is not None
        self.prediction_log.add(records)
        return {"model_version": model.version, "predictions": predictions}

    # -- feedback --------------------------------------------------------------------------------

    async def feedback(self, items: list[FeedbackItem]) -> dict[str, Any]:
        max_chars = self.settings.max_text_chars
        for index, item in enumerate(items):
            if item.text is not None and len(item.text) > max_chars:
                raise InvalidInputError(
                    f"text is {len(item.text)} characters long; at most {max_chars} are allowed",
                    field=f"items[{index}].text",
                )
            if item.text is not None and not item.text.strip():
                raise InvalidInputError("text is empty", field=f"items[{index}].text")
        return await asyncio.to_thread(self._feedback_blocking, items)

    def _feedback_blocking(self, items: list[FeedbackItem]) -> dict[str, Any]:
        assert self.store is not None
        wanted = [item.prediction_id for item in items if item.prediction_id is not None]
        found = self._find_predictions(wanted)
        for index, item in enumerate(items):
            if item.prediction_id is not None and item.prediction_id not in found:
                raise NotFoundError(
                    f"unknown prediction_id {item.prediction_id!r} (never issued, or past the "
                    "prediction log's retention)",
                    field=f"items[{index}].prediction_id",
                    prediction_id=item.prediction_id,
                )
        records: list[FeedbackRecord] = []
        for item in items:
            label = item.label.strip()
            if item.prediction_id is not None:
                prediction = found[item.prediction_id]
                records.append(
                    FeedbackRecord(
                        prediction_id=prediction.id,
                        text=prediction.text,
                        label=label,
                        predicted_label=prediction.label,
                        model_version=prediction.model_version,
                        embedding=prediction.embedding,
                        encoder_id=self._encoder_id(prediction.model_version),
                    )
                )
            else:
                assert item.text is not None
                records.append(FeedbackRecord(prediction_id=None, text=item.text, label=label))
        ids = self.store.insert_feedback(records)
        m = metrics()
        by_id = len(wanted)
        if by_id:
            m.feedback.labels(source="prediction_id").inc(by_id)
        if len(items) - by_id:
            m.feedback.labels(source="text").inc(len(items) - by_id)
        return {"accepted": len(ids), "feedback_ids": ids}

    def _find_predictions(self, ids: list[str]) -> dict[str, PredictionRecord]:
        """Logged predictions by id, waiting briefly for ones other workers have yet to flush.

        Every wait is bounded by this server's clock, never by the client's data: only an id
        whose embedded time lies within the last few flush intervals (by our clock) may still sit
        in another worker's buffer, and the whole lookup waits at most that long. A forged id
        (from the far future or past) is looked up once and reported unknown.
        """
        if not ids:
            return {}
        assert self.store is not None and self.prediction_log is not None
        found = self.prediction_log.pending(ids)
        found.update(self.store.get_predictions(i for i in ids if i not in found))
        flush_s = self.settings.log_flush_interval_ms / 1000
        max_wait = 3 * flush_s + 1.0
        started = time.monotonic()
        while True:
            missing = [i for i in ids if i not in found]
            if not missing or time.monotonic() - started >= max_wait:
                return found
            now = time.time()
            issued = (prediction_id_time(i) for i in missing)
            if not any(t is not None and now - max_wait <= t <= now + 1.0 for t in issued):
                return found
            time.sleep(min(0.05, flush_s / 2))
            found.update(self.prediction_log.pending(missing))
            found.update(self.store.get_predictions(i for i in missing if i not in found))

    def _encoder_id(self, version: str) -> str | None:
        model = self.holder.model
        if model is not None and model.version == version:
            return model.encoder_id
        return _encoder_id_of(self.registry, version)

    # -- models ----------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        pointer = self.registry.pointer()
        model = self.holder.model
        versions = []
        for version in self.registry.list_versions():
            m = version.manifest
            versions.append(
                {
                    "version": version.name,
                    "parent": m.get("parent"),
                    "created_at": m.get("created_at"),
                    "labels": m.get("labels"),
                    "metrics": {
                        split: {
                            "accuracy": m["metrics"][split]["accuracy"],
                            "macro_f1": m["metrics"][split]["macro_f1"],
                            "examples": m["metrics"][split]["examples"],
                        }
                        for split in ("validation", "test")
                        if split in m.get("metrics", {})
                    },
                    "gate": m.get("gate"),
                    "current": pointer is not None and pointer.version == version.name,
                }
            )
        return {
            "current": pointer.version if pointer else None,
            "serving": {
                "version": model.version if model else None,
                "worker_pid": os.getpid(),
                "host": socket.gethostname(),
                "loaded_at": model.loaded_at if model else None,
                "last_swap_error": self.holder.status.last_error,
            },
            "versions": versions,
        }

    async def promote(self, version: str) -> dict[str, Any]:
        pointer = await asyncio.to_thread(self.registry.promote, version)
        return {
            "current": pointer.version,
            "previous": pointer.previous,
            "promoted_at": pointer.promoted_at,
            "note": f"every worker switches within about {self.settings.swap_poll_interval_s:g}s "
            "plus the load time",
        }


    # -- retraining -------------------------------------------------------------------------------

    async def retrain(self, options: dict[str, Any]) -> dict[str, Any]:
        self.holder.require()
        assert self.jobs is not None
        return await asyncio.to_thread(self.jobs.submit, options)

    async def retrain_status(self, job_id: str) -> dict[str, Any]:
        assert self.jobs is not None
        if not JOB_ID.fullmatch(job_id):
            raise NotFoundError(f"no retrain job {job_id[:64]!r}", field="job_id")
        return await asyncio.to_thread(self.jobs.get, job_id)

    async def retrain_jobs(self) -> dict[str, Any]:
        assert self.jobs is not None
        return {"jobs": await asyncio.to_thread(self.jobs.list)}


    # -- drift ----------------------------------------------------------------------------------

    def drift(self) -> dict[str, Any]:
        path = drift_dir(self.settings) / "latest.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {
                "status": "pending",
                "message": "the drift job has not finished a run yet; it runs every "
                f"{self.settings.drift_interval_s:g}s",
            }

    def drift_report(self) -> tuple[bytes, str]:
        """The latest drift report's HTML and the Content-Security-Policy to serve it with."""
        path = drift_dir(self.settings) / "report.html"
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotFoundError(
                "no drift report yet: one is written once the window holds "
                f"{self.settings.drift_min_window} predictions by the serving version"
            ) from None
        key = (stat.st_mtime_ns, stat.st_size)
        if self._report_cache is None or self._report_cache[0] != key:
            body = path.read_bytes()
            self._report_cache = (key, body, inline_script_policy(body))
        return self._report_cache[1], self._report_cache[2]


def _initialise_metrics() -> None:
    """Create every labelled counter at 0, so the first failure shows as an increase."""
    m = metrics()
    for outcome in ("loaded", "failed"):
        m.model_swaps.labels(outcome=outcome)
    for outcome in ("promoted", "rejected", "failed"):
        m.retrain_jobs.labels(outcome=outcome)
        m.retrain_duration.labels(outcome=outcome)
    for source in ("prediction_id", "text"):
        m.feedback.labels(source=source)
    m.prediction_log_dropped.inc(0)
    m.prediction_log_pending.set(0)


@lru_cache(maxsize=64)
def _encoder_id_of(registry: ModelRegistry, version: str) -> str | None:
    try:
        return registry.get(version).encoder_id
    except Exception:  # noqa: BLE001 - a version deleted by hand: no reusable embedding
        return None
