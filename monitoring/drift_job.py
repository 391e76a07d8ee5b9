"""The periodic monitoring job: drift, online accuracy and the review queue's size, in a process.

``python -m monitoring.drift_job`` loops every ``REFIT_DRIFT_INTERVAL_S``: it compares the newest
predictions of the serving version with that version's reference (see ``monitoring.drift``),
writes the result and Evidently's HTML report to the store (``monitoring.drift_store``: every
replica serves the same ones), sets the drift gauges, and computes online accuracy from feedback
and accuracy estimated without labels (``monitoring.estimate``). It runs at low priority, off
every request path, and exits when the serving worker that started it goes away. One per machine
with SQLite, one per cluster with PostgreSQL: see ``monitoring.leader``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapters.serving.registry import ModelRegistry
from monitoring.drift import DriftResult, Reference, Thresholds, Window, detect
from monitoring.drift_store import DriftResultStore
from monitoring.estimate import AccuracyEstimate, estimate_accuracy
from monitoring.metrics import metrics
from refit.logs import configure_logging
from refit.settings import RefitSettings, load_settings
from refit.store import Store

log = logging.getLogger("refit.drift")


def drift_dir(settings: RefitSettings) -> Path:
    """The drift job's own folder (its log, and the report while Evidently writes it)."""
    return Path(settings.data_dir) / "drift"


def thresholds(settings: RefitSettings) -> Thresholds:
    return Thresholds(
        label=settings.drift_label_threshold,
        confidence=settings.drift_confidence_threshold,
        embedding=settings.drift_embedding_threshold,
        text_length=settings.drift_length_threshold,
    )


class DriftJob:
    def __init__(self, settings: RefitSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.registry = ModelRegistry(settings.registry_path)
        self.results = DriftResultStore(store.engine)
        self.folder = drift_dir(settings)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._reference: Reference | None = None
        self._estimated_labels: set[str] = set()

    def reference_for(self, version_name: str) -> Reference:
        if self._reference is None or self._reference.version != version_name:
            version = self.registry.get(version_name)
            self._reference = Reference.load(version.name, version.path, version.labels)
        return self._reference

    def run_once(self) -> DriftResult:
        started = time.perf_counter()
        m = metrics()
        pointer = self.registry.pointer()
        if pointer is None:
            result = self._empty("no_model", None, 0, "no model version is serving yet")
        else:
            rows = self.store.recent_predictions(self.settings.drift_window, pointer.version)
            if len(rows) < self.settings.drift_min_window:
                result = self._empty(
                    "insufficient_data", pointer.version, len(rows),
                    f"{len(rows)} predictions by {pointer.version} so far; a verdict needs "
                    f"{self.settings.drift_min_window}",
                )
            else:
                window = Window(
                    labels=[r.label for r in rows],
                    confidence=np.array([r.confidence for r in rows]),
                    text_length=np.array([len(r.text) for r in rows], dtype=np.float64),
                    embeddings=np.stack(
                        [np.frombuffer(r.embedding, dtype=np.float32) for r in rows]
                    ),
                    start=rows[0].created_at,
                    end=rows[-1].created_at,
                )
                reference = self.reference_for(pointer.version)
                result, snapshot = detect(reference, window, thresholds(self.settings))
                self._write_report(snapshot)
                for name, signal in result.signals.items():
                    m.drift_score.labels(signal=name).set(signal.score)
                    m.drift_threshold.labels(signal=name).set(signal.threshold)
                    m.drift_signal_detected.labels(signal=name).set(int(signal.drifted))
                m.drift_detected.set(int(result.drift_detected))
        m.drift_window.set(result.window["size"])
        m.drift_last_run.set(time.time())
        result.seconds = round(time.perf_counter() - started, 3)
        m.drift_run_duration.observe(result.seconds)
        self.results.save_result(result.to_dict())
        return result

    def _empty(self, status: str, version: str | None, size: int, message: str) -> DriftResult:
        return DriftResult(
            status=status, model_version=version, reference_version=version,
            window={"size": size, "start": None, "end": None}, signals={},
            drift_detected=False, computed_at=time.time(), seconds=0.0, message=message,
        )

    def _write_report(self, snapshot: Any) -> None:
        temporary = self.folder / f".report-{os.getpid()}.html"
        try:
            snapshot.save_html(str(temporary))
            self.results.save_report(temporary.read_bytes())
        finally:
            temporary.unlink(missing_ok=True)

    def update_online_accuracy(self) -> dict[str, Any]:
        count, accuracy, per_label = self.store.online_accuracy(
            self.settings.online_accuracy_window
        )
        m = metrics()
        m.online_accuracy_window.set(count)
        if accuracy is not None:
            m.online_accuracy.set(accuracy)
            for label, (_, value) in per_label.items():
                m.online_accuracy_by_label.labels(label=label).set(value)
        return {"feedback": count, "accuracy": accuracy}

    def update_estimated_accuracy(self) -> AccuracyEstimate | None:
        """Estimate the serving version's accuracy from its recent predictions' calibrated
        confidences (see ``monitoring.estimate``) and set the gauges; also publish the version's
        test accuracy (the baseline the alert compares with) and calibration error."""
        pointer = self.registry.pointer()
        m = metrics()
        if pointer is None:
            return None
        version = self.registry.get(pointer.version)
        manifest = version.manifest
        test_accuracy = manifest.get("metrics", {}).get("test", {}).get("accuracy")
        if test_accuracy is not None:
            m.model_test_accuracy.set(test_accuracy)
        for split in ("validation", "test"):
            entry = (manifest.get("calibration") or {}).get(split)
            if entry:
                m.model_calibration_error.labels(split=split).set(entry["ece_after"])
        rows = self.store.recent_confidences(self.settings.estimate_window, pointer.version)
        m.estimated_accuracy_window.set(len(rows))
        result = estimate_accuracy([r[0] for r in rows], [r[1] for r in rows])
        if result is None:
            return None
        m.estimated_accuracy.set(result.overall.accuracy)
        m.estimated_accuracy_lower.set(result.overall.lower)
        m.estimated_accuracy_upper.set(result.overall.upper)
        for label, value in result.by_label.items():
            m.estimated_accuracy_by_label.labels(label=label).set(value.accuracy)
        # A label that left the window has no estimate now, rather than its old one.
        for label in self._estimated_labels - set(result.by_label):
            m.estimated_accuracy_by_label.labels(label=label).set(math.nan)
        self._estimated_labels = set(result.by_label)
        return result

    def update_review_queue(self) -> int | None:
        """Set the review queue's size: unlabelled, unexpired predictions of the serving version
        below the confidence threshold (``None`` while no version serves)."""
        pointer = self.registry.pointer()
        if pointer is None:
            return None
        size = self.store.count_review_queue(
            pointer.version, self.settings.review_queue_threshold,
            time.time() - self.settings.retention_days * 86400,
        )
        metrics().review_queue.set(size)
        return size


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drift %(levelname)s %(message)s")
    with contextlib.suppress(OSError):
        os.nice(10)
    settings = load_settings()
    configure_logging(settings)
    store = Store.from_url(settings.resolved_database_url)
    job = DriftJob(settings, store)
    parent = os.getppid()
    log.info(
        "drift job started (every %.0fs, window %d)",
        settings.drift_interval_s,
        settings.drift_window,
    )
    while os.getppid() == parent:
        try:
            result = job.run_once()
            job.update_online_accuracy()
            job.update_review_queue()
            log.info(
                "drift %s: %s (window %d, %.2fs)",
                result.status,
                "DRIFT" if result.drift_detected else "no drift",
                result.window["size"],
                result.seconds,
            )
        except Exception:  # noqa: BLE001 - the job must outlive one bad run
            log.exception("drift run failed")
        try:  # cheap and independent of drift: a failed drift run must not stop it
            job.update_estimated_accuracy()
        except Exception:  # noqa: BLE001
            log.exception("accuracy estimate failed")
        deadline = time.monotonic() + settings.drift_interval_s
        while time.monotonic() < deadline and os.getppid() == parent:
            time.sleep(min(1.0, settings.drift_interval_s))
    log.info("serving worker gone; drift job exits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
