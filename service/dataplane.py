"""The data plane: what the HTTP endpoints do, free of any web framework.

``service/app.py`` parses requests into the wire types of ``service/schemas.py``, converts them
to domain types, calls a method here, and renders the domain objects it returns (or the
:class:`~refit.errors.RefitError` it raises) as wire types. Nothing here knows the wire types.
Everything that blocks (the store, the registry) runs on a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adapters.serving.data import read_jsonl
from adapters.serving.labels import LabelStatus, label_statuses
from adapters.serving.registry import ModelRegistry, ModelVersion, Pointer
from adapters.serving.review import Strategy, diverse_picks, top_two_margin
from adapters.serving.variants import Int8Gate, VariantChoice
from monitoring.drift_store import DriftResultStore
from monitoring.estimate import AccuracyEstimate, estimate_accuracy
from monitoring.metrics import metrics
from refit.errors import InvalidInputError, NotFoundError, NotReadyError
from refit.jobs import Job, RetrainOptions
from refit.settings import RefitSettings
from refit.store import (
    FeedbackEntry,
    FeedbackQuery,
    FeedbackRecord,
    FeedbackSubmission,
    PredictionRecord,
    ReplacedFeedback,
    ReviewCandidate,
    Store,
)
from refit.text import is_blank
from service.batching import AdaptiveBatcher
from service.jobs import JOB_ID, RetrainJobs
from service.memory import FeedbackMemoryKeeper, MemoryState, embed_texts
from service.prediction_log import PredictionLog
from service.predictor import BatchOutput, ModelHolder
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


@dataclass(frozen=True)
class PredictionResult:
    """One answer. ``label`` is what is served: the feedback memory's label when it answered
    (``source == "feedback"``, with the feedback item's id and its similarity), else the model's.
    ``confidence`` is always the model's probability of ``label`` (0 for a label the model does
    not know) and ``scores`` the model's probabilities."""

    prediction_id: str
    label: str
    confidence: float
    scores: dict[str, float]
    source: str = "model"
    feedback_id: int | None = None
    similarity: float | None = None


@dataclass(frozen=True)
class PredictionBatch:
    """What ``predict`` answers: one result per text, in order, all from one model version."""

    model_version: str
    predictions: list[PredictionResult]


@dataclass(frozen=True)
class Classification:
    """What ``classify`` answers: ``predict``'s results as arrays, one row per text, in order,
    all from one model version (the shape the Open Inference Protocol's tensors take)."""

    model_version: str
    labels: tuple[str, ...]
    """The model's labels: the columns of ``probabilities``."""
    prediction_ids: list[str]
    served: list[str]
    """The label served for each text (the feedback memory's, where it answered)."""
    confidence: np.ndarray
    """[N] float32: the model's probability of the served label."""
    probabilities: np.ndarray
    """[N, C] float32: the model's probability of every label."""


@dataclass(frozen=True)
class FeedbackReceipt:
    feedback_ids: list[int]
    replaced: list[ReplacedFeedback]


@dataclass(frozen=True)
class FeedbackPage:
    items: list[FeedbackEntry]
    next_cursor: int | None
    """Pass as ``before_id`` for the next page; ``None`` on the last page."""


@dataclass(frozen=True)
class LabelReport:
    """One label: its status, its evidence, and its recall as feedback shows it."""

    status: LabelStatus
    feedback_on_predictions: int
    recall: float | None
    """Share of feedback items on logged predictions with this true label that the model
    predicted right; ``None`` without such feedback."""


@dataclass(frozen=True)
class LabelsOverview:
    serving_version: str | None
    min_examples: int
    labels: list[LabelReport]


@dataclass(frozen=True)
class ReviewQueue:
    """What ``review`` answers: the predictions of ``model_version`` most worth labelling,
    in the order the strategy ranks them."""

    model_version: str
    strategy: Strategy
    items: list[ReviewCandidate]


REVIEW_DEFAULT_LIMIT = 10
REVIEW_SCAN_FACTOR = 4
"""The review queue reads this many times the candidates it needs, so that duplicate texts and
texts labelled through another prediction can be dropped and still leave enough."""


@dataclass(frozen=True)
class ServingState:
    """What this worker serves."""

    version: str | None
    worker_pid: int
    host: str
    loaded_at: float | None
    last_swap_error: str | None
    variant: VariantChoice | None = None
    """The model file served (fp32 or int8) and why."""


@dataclass(frozen=True)
class EstimateOverview:
    """Accuracy estimated without labels over the serving version's newest predictions."""

    model_version: str | None
    window: int
    """The configured window (``REFIT_ESTIMATE_WINDOW``); ``estimate`` may cover fewer."""
    start: float | None
    end: float | None
    estimate: AccuracyEstimate | None
    test_accuracy: float | None
    test_calibration_error: float | None


@dataclass(frozen=True)
class ModelsOverview:
    pointer: Pointer | None
    serving: ServingState
    versions: list[ModelVersion]
    variants: dict[str, VariantChoice] = field(default_factory=dict)
    """Per version, the model file this worker's precision setting picks for it, and why."""
    int8_gate: Int8Gate | None = None
    """The int8 accuracy gate in effect."""


class BackgroundTask(Protocol):
    """Something the data plane starts with itself and stops with itself (the drift monitor)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def run_observed_batch(
    holder: ModelHolder, memory: FeedbackMemoryKeeper | None, texts: list[str]
) -> BatchOutput:
    """One inference batch on the serving version, looked up in the feedback memory (once for
    the whole batch) and counted in the prediction metrics by served label."""
    output = holder.run_batch(texts)
    model = output.model
    labels = model.labels
    m = metrics()
    matches = memory.lookup(model, output.embeddings) if memory is not None else None
    if matches is not None and matches.answered.any():
        answered = matches.answered
        output = replace(output, matches=matches)
        by_model = output.predicted[~answered]
        confidence = output.confidence.copy()
        served: dict[str, int] = {}
        for row in np.flatnonzero(answered).tolist():
            label = matches.labels[row]
            assert label is not None  # answered rows carry a label
            served[label] = served.get(label, 0) + 1
            confidence[row] = model_probability(output.probabilities[row], labels, label)
        m.memory_answers.inc(int(answered.sum()))
        for label, count in served.items():
            m.predictions.labels(label=label, model_version=model.version).inc(count)
    else:
        by_model, confidence = output.predicted, output.confidence
    counts = np.bincount(by_model, minlength=len(labels))
    for index in np.flatnonzero(counts):
        m.predictions.labels(label=labels[index], model_version=model.version).inc(
            int(counts[index])
        )
    for value in confidence.tolist():
        m.confidence.observe(value)
    return output


def model_probability(probabilities: np.ndarray, labels: Sequence[str], label: str) -> float:
    """The model's probability of ``label``; 0 for a label it does not know (a new label)."""
    try:
        return float(probabilities[labels.index(label)])
    except ValueError:
        return 0.0


class DataPlane:
    """The service's operations, over parts built by :func:`~service.composition.build_data_plane`.

    ``start()`` loads the model and starts the background threads; ``stop()`` ends them and
    flushes the prediction log.
    """

    def __init__(
        self,
        settings: RefitSettings,
        store: Store,
        registry: ModelRegistry,
        holder: ModelHolder,
        prediction_log: PredictionLog,
        jobs: RetrainJobs,
        monitor: BackgroundTask,
        batcher: AdaptiveBatcher[BatchOutput],
        memory: FeedbackMemoryKeeper | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.holder = holder
        self.prediction_log = prediction_log
        self.jobs = jobs
        self.monitor = monitor
        self.batcher = batcher
        self.memory = memory
        """The feedback memory (``None`` when ``memory_enabled`` is off)."""
        self.started_at = time.time()
        self.drift_results = DriftResultStore(store.engine)
        self._report_cache: tuple[float, bytes, str] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.start_blocking)

    def start_blocking(self) -> None:
        """Start the parts' threads and load the current version (before reporting ready)."""
        self.prediction_log.start()
        self.jobs.reconcile()
        self.registry.cleanup(self.settings.staging_stale_after_s)
        self.holder.sync()  # load and warm the current version before reporting ready
        self.holder.start_watching()
        if self.memory is not None:
            self.memory.start()  # builds the memory for the loaded model, then follows feedback
        self.monitor.start()
        if not self.holder.ready:
            log.warning("no current model in %s: not ready until one is promoted",
                        self.registry.root)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_blocking)

    def stop_blocking(self) -> None:
        self.monitor.stop()
        if self.memory is not None:
            self.memory.stop()
        self.holder.stop()
        self.batcher.close()
        self.prediction_log.close()
        self.store.close()

    @property
    def ready(self) -> bool:
        """A model is loaded and the store answers (the prediction log checks it every second)."""
        return self.holder.ready and self.prediction_log.store_ok

    # -- predict ---------------------------------------------------------------------------------

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
            if is_blank(text):
                raise InvalidInputError("text is empty", field=f"{field}[{index}]")

    async def predict(self, texts: list[str]) -> PredictionBatch:
        self.check_texts(texts)
        self.holder.require()
        output, start, stop = await self.batcher.submit(texts)
        model = output.model
        labels = model.labels
        now = time.time()
        predictions: list[PredictionResult] = []
        records: list[PredictionRecord] = []
        rows = output.probabilities[start:stop].tolist()
        matches = output.matches
        margins = top_two_margin(output.probabilities[start:stop]).tolist()
        for offset, text in enumerate(texts):
            row = start + offset
            prediction_id = new_prediction_id(now)
            scores = rows[offset]
            if matches is not None and (remembered := matches.labels[row]) is not None:
                label = remembered
                result = PredictionResult(
                    prediction_id, label,
                    model_probability(output.probabilities[row], labels, label),
                    dict(zip(labels, scores, strict=True)), "feedback",
                    int(matches.feedback_ids[row]), float(matches.similarity[row]),
                )
            else:
                label = labels[output.predicted[row]]
                result = PredictionResult(
                    prediction_id, label, scores[output.predicted[row]],
                    dict(zip(labels, scores, strict=True)),
                )
            confidence = result.confidence
            predictions.append(result)
            records.append(
                PredictionRecord(
                    prediction_id, now, model.version, text, label, confidence,
                    output.embeddings[row].tobytes(), margins[offset],
                )
            )
        self.prediction_log.add(records)
        return PredictionBatch(model.version, predictions)

    async def classify(
        self, texts: list[str], version: str | None = None, field: str = "texts"
    ) -> Classification:
        """``predict`` with array results, through the same checks, batcher, metrics and
        prediction log. With ``version``, only that version may answer: it must be the one this
        worker has loaded (a version that exists but is not loaded is a 503, an unknown one 404).
        ``field`` names the texts in errors.
        """
        self.check_texts(texts, field)
        if version is not None:
            self._require_loaded(version)
        else:
            self.holder.require()
        output, start, stop = await self.batcher.submit(texts)
        model = output.model
        if version is not None and model.version != version:  # swapped while queued
            self._require_loaded(version)
        labels = model.labels
        probabilities = output.probabilities[start:stop]
        confidence = output.confidence[start:stop].astype(np.float32)
        served = [labels[i] for i in output.predicted[start:stop].tolist()]
        matches = output.matches
        if matches is not None:
            for offset in range(len(texts)):
                remembered = matches.labels[start + offset]
                if remembered is not None:
                    served[offset] = remembered
                    confidence[offset] = model_probability(
                        probabilities[offset], labels, remembered
                    )
        now = time.time()
        ids = [new_prediction_id(now) for _ in texts]
        embeddings = output.embeddings
        self.prediction_log.add([
            PredictionRecord(
                ids[offset], now, model.version, text, served[offset],
                float(confidence[offset]), embeddings[start + offset].tobytes(),
            )
            for offset, text in enumerate(texts)
        ])
        return Classification(model.version, labels, ids, served, confidence, probabilities)

    def _require_loaded(self, version: str) -> None:
        model = self.holder.require()
        if model.version == version:
            return
        self.registry.get(version)  # an unknown version: 404 naming the known ones
        raise NotReadyError(
            f"model version {version!r} exists but is not loaded: this worker serves "
            f"{model.version!r}, the registry's current version (promote {version!r} to serve it)",
            field="version",
        )

    # -- feedback --------------------------------------------------------------------------------

    async def feedback(self, items: list[FeedbackSubmission]) -> FeedbackReceipt:
        max_chars = self.settings.max_text_chars
        for index, item in enumerate(items):
            if (item.prediction_id is None) == (item.text is None):
                raise InvalidInputError(
                    "give exactly one of 'prediction_id' or 'text'", field=f"items[{index}]"
                )
            if is_blank(item.label):
                raise InvalidInputError("'label' must not be blank", field=f"items[{index}].label")
            if item.text is not None and len(item.text) > max_chars:
                raise InvalidInputError(
                    f"text is {len(item.text)} characters long; at most {max_chars} are allowed",
                    field=f"items[{index}].text",
                )
            if item.text is not None and is_blank(item.text):
                raise InvalidInputError("text is empty", field=f"items[{index}].text")
        return await asyncio.to_thread(self._feedback_blocking, items)

    def _feedback_blocking(self, items: list[FeedbackSubmission]) -> FeedbackReceipt:
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
            elif item.text is not None:
                records.append(FeedbackRecord(prediction_id=None, text=item.text, label=label))
        records = self._with_embeddings(records)
        inserted = self.store.insert_feedback(records)
        m = metrics()
        by_id = len(wanted)
        if by_id:
            m.feedback.labels(source="prediction_id").inc(by_id)
        if len(items) - by_id:
            m.feedback.labels(source="text").inc(len(items) - by_id)
        return FeedbackReceipt(inserted.ids, inserted.replaced)

    def _with_embeddings(self, records: list[FeedbackRecord]) -> list[FeedbackRecord]:
        """Feedback given as text, embedded by the served encoder (when the memory is on).

        Embedded here, once, by the worker that took the feedback, every other worker's memory
        just reads the embedding from the store, and a retrain on the same encoder reuses it.
        """
        model = self.holder.model
        missing = [i for i, r in enumerate(records) if r.embedding is None]
        if self.memory is None or model is None or not missing:
            return records
        embeddings, _ = embed_texts(model, [records[i].text for i in missing])
        records = list(records)
        for i, vector in zip(missing, embeddings, strict=True):
            records[i] = replace(records[i], embedding=vector.tobytes(),
                                 encoder_id=model.encoder_id)
        return records

    async def list_feedback(self, query: FeedbackQuery) -> FeedbackPage:
        """One page of feedback, newest first."""
        wanted = replace(query, limit=query.limit + 1)  # one more tells whether a page follows
        entries = await asyncio.to_thread(self.store.list_feedback, wanted)
        more = len(entries) > query.limit
        entries = entries[: query.limit]
        return FeedbackPage(entries, entries[-1].id if more and entries else None)

    async def relabel_feedback(self, feedback_id: int, label: str) -> FeedbackEntry:
        if is_blank(label):
            raise InvalidInputError("'label' must not be blank", field="label")
        return await asyncio.to_thread(self.store.relabel_feedback, feedback_id, label.strip())

    async def delete_feedback(self, feedback_id: int) -> None:
        await asyncio.to_thread(self.store.delete_feedback, feedback_id)

    async def labels(self) -> LabelsOverview:
        return await asyncio.to_thread(self._labels_blocking)

    def _labels_blocking(self) -> LabelsOverview:
        version = self.registry.current()
        model_labels = version.labels if version is not None else []
        training = training_label_counts(version) if version is not None else {}
        stats = self.store.feedback_label_stats()
        min_examples = self.settings.label_min_examples
        statuses = label_statuses(
            model_labels, training, {label: s.items for label, s in stats.items()}, min_examples,
            max_new=self.settings.retrain_max_new_labels,
        )
        reports = []
        for status in statuses:
            stat = stats.get(status.label)
            on = stat.on_predictions if stat else 0
            recall = stat.predicted_right / on if stat and on else None
            reports.append(LabelReport(status, on, recall))
        return LabelsOverview(version.name if version else None, min_examples, reports)

    def _find_predictions(self, ids: list[str]) -> dict[str, PredictionRecord]:
        """Logged predictions by id, waiting briefly for ones other workers have yet to flush.

        Every wait is bounded by this server's clock, never by the client's data: only an id
        whose embedded time lies within the last few flush intervals (by our clock) may still sit
        in another worker's buffer, and the whole lookup waits at most that long. A forged id
        (from the far future or past) is looked up once and reported unknown.
        """
        if not ids:
            return {}
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

    def memory_state(self) -> MemoryState:
        """What this worker's feedback memory holds."""
        if self.memory is None:
            return MemoryState(False, 0, None, None, None, False, None, None, None, None, 0,
                               None, None)
        return self.memory.state()

    # -- review queue ----------------------------------------------------------------------------

    async def review(self, strategy: Strategy, limit: int | None) -> ReviewQueue:
        """The unlabelled, unexpired predictions of the serving version most worth labelling.

        ``uncertainty``: least confident first; ``margin``: smallest gap between the model's two
        most probable labels first; ``diverse``: the least confident member of each of ``limit``
        k-means clusters over the ``review_diverse_pool_factor`` x ``limit`` least confident
        (see ``adapters/serving/review.py``). A text appears once, and not at all once any
        feedback labels it.
        """
        maximum = self.settings.review_max_limit
        if limit is None:
            limit = min(REVIEW_DEFAULT_LIMIT, maximum)
        if limit > maximum:
            raise InvalidInputError(
                f"limit is {limit}; at most {maximum} (REFIT_REVIEW_MAX_LIMIT)", field="limit"
            )
        version = self.holder.require().version
        return await asyncio.to_thread(self._review_blocking, version, strategy, limit)

    def _review_blocking(self, version: str, strategy: Strategy, limit: int) -> ReviewQueue:
        diverse = strategy == "diverse"
        wanted = limit * self.settings.review_diverse_pool_factor if diverse else limit
        not_before = time.time() - self.settings.retention_days * 86400
        candidates = self.store.review_candidates(
            version, "margin" if strategy == "margin" else "confidence", not_before,
            wanted * REVIEW_SCAN_FACTOR, with_embeddings=diverse,
        )
        labelled = self.store.labelled_texts(c.text for c in candidates)
        seen: set[str] = set()
        pool: list[ReviewCandidate] = []
        for candidate in candidates:
            if candidate.text not in labelled and candidate.text not in seen:
                seen.add(candidate.text)
                pool.append(candidate)
            if len(pool) == wanted:
                break
        if diverse and pool:
            embeddings = np.stack([c.embedding for c in pool if c.embedding is not None])
            confidence = np.array([c.confidence for c in pool])
            picks = diverse_picks(embeddings, confidence, limit, seed=0)
            pool = [replace(pool[i], embedding=None) for i in picks.tolist()]
        return ReviewQueue(version, strategy, pool[:limit])

    # -- models ----------------------------------------------------------------------------------

    def models(self) -> ModelsOverview:
        model = self.holder.model
        versions = self.registry.list_versions()
        return ModelsOverview(
            pointer=self.registry.pointer(),
            serving=ServingState(
                version=model.version if model else None,
                worker_pid=os.getpid(),
                host=socket.gethostname(),
                loaded_at=model.loaded_at if model else None,
                last_swap_error=self.holder.status.last_error,
                variant=model.variant if model else None,
            ),
            versions=versions,
            variants={v.name: self.holder.choose(v.manifest) for v in versions},
            int8_gate=self.holder.int8_gate,
        )

    async def estimate(self) -> EstimateOverview:
        """The accuracy estimate of the version this worker serves (``monitoring.estimate``)."""
        self.holder.require()
        return await asyncio.to_thread(self._estimate_blocking)

    def _estimate_blocking(self) -> EstimateOverview:
        model = self.holder.require()
        manifest = self.registry.get(model.version).manifest
        rows = self.store.recent_confidences(self.settings.estimate_window, model.version)
        test = manifest.get("metrics", {}).get("test", {})
        calibration = (manifest.get("calibration") or {}).get("test") or {}
        return EstimateOverview(
            model_version=model.version, window=self.settings.estimate_window,
            start=rows[0][2] if rows else None, end=rows[-1][2] if rows else None,
            estimate=estimate_accuracy([r[0] for r in rows], [r[1] for r in rows]),
            test_accuracy=test.get("accuracy"),
            test_calibration_error=calibration.get("ece_after"),
        )

    async def promote(self, version: str) -> Pointer:
        return await asyncio.to_thread(self.registry.promote, version)

    # -- retraining -------------------------------------------------------------------------------

    async def retrain(self, options: RetrainOptions) -> Job:
        self.holder.require()
        return await asyncio.to_thread(self.jobs.submit, options)

    async def retrain_status(self, job_id: str) -> Job:
        if not JOB_ID.fullmatch(job_id):  # never let an arbitrary string reach SQL
            raise NotFoundError(f"no retrain job {job_id[:64]!r}", field="job_id")
        return await asyncio.to_thread(self.jobs.get, job_id)

    async def retrain_jobs(self) -> list[Job]:
        return await asyncio.to_thread(self.jobs.list)


    # -- drift ----------------------------------------------------------------------------------

    async def drift(self) -> dict[str, Any]:
        """The drift job's latest result (see ``monitoring.drift.DriftResult``), or pending.

        Read from the store, where the one drift job writes it: the same on every replica.
        """
        result = await asyncio.to_thread(self.drift_results.latest)
        if result is None:
            return {
                "status": "pending",
                "message": "the drift job has not finished a run yet; it runs every "
                f"{self.settings.drift_interval_s:g}s",
            }
        return result

    async def drift_report(self) -> tuple[bytes, str]:
        """The latest drift report's HTML and the Content-Security-Policy to serve it with."""
        return await asyncio.to_thread(self._drift_report_blocking)

    def _drift_report_blocking(self) -> tuple[bytes, str]:
        written = self.drift_results.report_version()
        if written is None:
            raise NotFoundError(
                "no drift report yet: one is written once the window holds "
                f"{self.settings.drift_min_window} predictions by the serving version"
            )
        if self._report_cache is None or self._report_cache[0] != written:
            stored = self.drift_results.report()
            if stored is None:  # pragma: no cover - reports are replaced, never deleted
                raise NotFoundError("no drift report yet")
            written, body = stored
            self._report_cache = (written, body, inline_script_policy(body))
        return self._report_cache[1], self._report_cache[2]


def initialise_metrics() -> None:
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


def training_label_counts(version: ModelVersion) -> dict[str, int]:
    """Examples per label in a version's training split (``data/train.jsonl``)."""
    return dict(_training_label_counts(version.path))


@lru_cache(maxsize=8)
def _training_label_counts(path: Path) -> tuple[tuple[str, int], ...]:
    # Versions are immutable, so the counts of a folder never change.
    train = path / "data" / "train.jsonl"
    if not train.exists():
        return ()
    return tuple(sorted(read_jsonl(train).label_counts().items()))
