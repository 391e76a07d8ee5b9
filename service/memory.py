"""Each worker's feedback memory: in step with the store, rebuilt for every model it serves.

:class:`FeedbackMemoryKeeper` owns one :class:`~adapters.serving.memory.FeedbackMemory` per worker
and two background threads:

- the *follower* (normal priority) reads the store's feedback change feed every
  ``memory_poll_interval_s`` (:meth:`refit.store.Store.feedback_changes`) and applies inserts,
  relabels and deletions, so feedback given to any worker is in effect in every worker within
  about one interval. Feedback carries its embedding when the worker that took it embedded it
  (``POST /feedback`` does, with the served encoder); otherwise the follower embeds its text.
- the *rebuilder* (niced, like the model load) notices when the worker starts serving another
  model (at start-up and after every swap) and rebuilds the memory for it: it runs the served
  classifier over every feedback text (embeddings and the model's own predictions in one pass),
  calibrates the thresholds on all of it, keeps the labels a retrain added (the version's lineage)
  *memory-served* while the memory answers their feedback better than the new head (judged on the
  items it never trained on: not in its version folder's data), and of the other labels keeps only
  the entries the model gets wrong (:func:`~adapters.serving.memory.rebuilt_memory`), then
  hands the new memory to the follower with the change-feed position it was built from.
  Changes committed meanwhile are replayed onto it (every change is idempotent), so none is
  lost. It also rebuilds for the same model
  once enough new feedback has arrived (:data:`RECALIBRATE_AFTER_CHANGES`), so the thresholds
  and the prototype rule's margin follow the feedback.

The memory answers a batch only while its embeddings come from the served model's encoder: after
a swap to a model with another encoder it stays silent until the rebuild is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from adapters.serving.memory import (
    Calibration,
    FeedbackChange,
    FeedbackFollower,
    FeedbackMemory,
    MemoryMatches,
    learnt_labels,
    rebuilt_memory,
    trained_texts,
    version_prototypes,
)
from monitoring.metrics import metrics
from refit.store import Store
from service.predictor import ModelHolder, ServingModel

log = logging.getLogger("refit.memory")

EMBED_BATCH = 256
"""Texts per classifier run while rebuilding or embedding feedback."""
REBUILD_RETRY_S = 5.0
"""After a failed rebuild (the store unreachable, say), wait this long before the next try."""
RECALIBRATE_AFTER_CHANGES = 20
RECALIBRATE_AFTER_FRACTION = 0.1
"""The memory is also rebuilt (thresholds and the prototype margin recalibrated) for the same
model once this many feedback changes arrived since the last build: at least
``RECALIBRATE_AFTER_CHANGES`` and ``RECALIBRATE_AFTER_FRACTION`` of the items that build read, so
a new label's evidence is weighed soon, and the cost (one classifier run over all feedback) stays
a small share of the feedback's own."""


@dataclass(frozen=True)
class MemoryState:
    """What a worker's memory holds (``GET /memory``)."""

    enabled: bool
    entries: int
    threshold: float | None
    new_label_threshold: float | None
    new_label_margin: float | None
    """The prototype rule's margin (``None``: off) for new labels without their own."""
    prototype_rule: bool
    """Whether the memory has the served model's class prototypes (the rule's reference)."""
    built_for: str | None
    """The model version the memory was last rebuilt for."""
    built_at: float | None
    rebuild_seconds: float | None
    feedback_items: int | None
    """Feedback items the last rebuild read (before keeping only the model's mistakes)."""
    cursor: int
    """Position in the store's feedback change feed the memory is up to date with."""
    calibration: Calibration | None
    last_error: str | None
    new_label_margins: dict[str, float | None] = field(default_factory=dict)
    """Each new label's own margin, calibrated on its own feedback (``None``: off for it)."""


def embed_texts(model: ServingModel, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[n, dim]`` and the model's predicted label indices for ``texts``, run in
    batches of :data:`EMBED_BATCH`."""
    embeddings: list[np.ndarray] = []
    predicted: list[np.ndarray] = []
    for start in range(0, len(texts), EMBED_BATCH):
        output = model.classifier.predict(list(texts[start : start + EMBED_BATCH]))
        embeddings.append(output.embeddings)
        predicted.append(output.probabilities.argmax(axis=1))
    if not embeddings:
        return np.zeros((0, 384), np.float32), np.zeros(0, np.int64)
    return np.concatenate(embeddings), np.concatenate(predicted)


class FeedbackMemoryKeeper:
    """A worker's feedback memory, its follower and its rebuilds (see the module docstring).

    ``nice`` lowers the rebuild thread's priority (as the model watcher's), so rebuilding yields
    the CPU to the threads answering requests.
    """

    def __init__(
        self, store: Store, holder: ModelHolder, poll_interval_s: float = 0.5, nice: bool = True
    ) -> None:
        self.store = store
        self.holder = holder
        self.poll_interval_s = poll_interval_s
        self.nice = nice
        self.follower = FeedbackFollower(
            FeedbackMemory(), self._fetch, self._embed, interval_s=poll_interval_s
        )
        self._built_for: ServingModel | None = None
        self._encoder_id: str | None = None  # the encoder of the memory's embeddings
        self._built_at: float | None = None
        self._rebuild_seconds: float | None = None
        self._feedback_items: int | None = None
        self._calibration: Calibration | None = None
        self._last_error: str | None = None
        self._changes_since_build = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def memory(self) -> FeedbackMemory:
        return self.follower.memory

    # -- the hot path ------------------------------------------------------------------------------

    def lookup(self, model: ServingModel, embeddings: np.ndarray) -> MemoryMatches | None:
        """The memory's answers for a batch ``model`` embedded, or ``None`` when it has none to
        give (empty, or built on another encoder's embeddings)."""
        memory = self.follower.memory
        if len(memory) == 0 or self._encoder_id != model.encoder_id:
            return None
        return memory.lookup(embeddings)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._rebuild_loop, "memory-rebuild"),
                             (self._follow_loop, "feedback-follower")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()

    def state(self) -> MemoryState:
        calibration = self._calibration
        memory = self.follower.memory
        built = self._built_for
        return MemoryState(
            enabled=True,
            entries=len(memory),
            threshold=memory.threshold if built else None,
            new_label_threshold=memory.new_label_threshold if built else None,
            new_label_margin=memory.new_label_margin if built else None,
            new_label_margins=dict(memory.new_label_margins) if built else {},
            prototype_rule=memory.reference is not None,
            built_for=built.version if built else None,
            built_at=self._built_at,
            rebuild_seconds=self._rebuild_seconds,
            feedback_items=self._feedback_items,
            cursor=self.follower.cursor,
            calibration=calibration,
            last_error=self._last_error,
        )

    # -- following the store -----------------------------------------------------------------------

    def _follow_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            if self._built_for is None:
                continue  # nothing to follow until the first build (it reads everything)
            try:
                if applied := self.follower.poll():
                    self._changes_since_build += applied
                    metrics().memory_entries.set(len(self.follower.memory))
                self._last_error = None
            except Exception as exc:  # noqa: BLE001 - retried from the same cursor next round
                self._last_error = f"following feedback failed: {exc}"
                log.warning("feedback follower poll failed: %s", exc)

    def _fetch(self, cursor: int) -> list[FeedbackChange]:
        encoder = self._encoder_id
        changes = []
        for event in self.store.feedback_changes(cursor):
            # An item gone from the store (a later event deletes it) counts as deleted now.
            label = event.label if event.text is not None else None
            reusable = event.embedding is not None and event.encoder_id == encoder
            changes.append(
                FeedbackChange(
                    event.seq, event.feedback_id, label, event.text or "",
                    event.embedding if reusable else None,
                )
            )
        return changes

    def _embed(self, texts: list[str]) -> np.ndarray:
        model = self.holder.require()
        if model.encoder_id != self._encoder_id:
            # The memory holds another encoder's embeddings: wait for the rebuild (the round is
            # retried from the same cursor).
            raise RuntimeError("the served encoder changed; the memory is being rebuilt")
        return embed_texts(model, texts)[0]

    # -- rebuilding for the served model ---------------------------------------------------------

    def _rebuild_loop(self) -> None:
        if self.nice and hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            model = self.holder.model
            if model is not None and (model is not self._built_for or self._recalibration_due()):
                try:
                    self.rebuild(model)
                except Exception as exc:  # noqa: BLE001 - retried a little later
                    self._last_error = f"rebuilding the memory for {model.version} failed: {exc}"
                    log.exception("rebuilding the feedback memory for %s failed", model.version)
                    if self._stop.wait(REBUILD_RETRY_S):
                        return
            if self._stop.wait(self.poll_interval_s):
                return

    def _recalibration_due(self) -> bool:
        built_from = self._feedback_items or 0
        return self._changes_since_build >= max(
            RECALIBRATE_AFTER_CHANGES, RECALIBRATE_AFTER_FRACTION * built_from
        )

    def rebuild(self, model: ServingModel) -> None:
        """Rebuild the memory for ``model`` from all feedback (blocking; runs the classifier)."""
        started = time.perf_counter()
        # Changes counted so far are in this build; those applied meanwhile count for the next
        # (a failed build leaves the count, so it is retried).
        counted = self._changes_since_build
        # The feed's position first: a change committed after it is replayed onto the new
        # memory, so reading the feedback after it can only see more, never less.
        cursor = self.store.latest_feedback_seq()
        items = self.store.all_feedback()
        embeddings, predicted = embed_texts(model, [item.text for item in items])
        folder = model.classifier.path
        # Labels a retrain added stay the memory's while it answers better than the head on the
        # feedback the head never trained on (its version folder holds what it trained on).
        trained = trained_texts(folder)
        memory, calibration = rebuilt_memory(
            [item.id for item in items],
            embeddings,
            [item.label for item in items],
            [model.labels[i] for i in predicted.tolist()],
            model.labels,
            reference=version_prototypes(folder, model.labels),
            learnt=learnt_labels(folder),
            unseen=np.array([item.text not in trained for item in items], dtype=bool),
        )
        self.follower.replace(memory, cursor)
        self._encoder_id = model.encoder_id
        # What describes the build first, the version it was built for last: a reader that sees
        # the new version (GET /memory, a test waiting for the rebuild) sees its calibration.
        self._built_at = time.time()
        self._rebuild_seconds = time.perf_counter() - started
        self._feedback_items = len(items)
        self._calibration = calibration
        self._built_for = model
        self._changes_since_build = max(0, self._changes_since_build - counted)
        self._last_error = None
        metrics().memory_entries.set(len(memory))
        log.info(
            "feedback memory rebuilt for %s in %.2fs: %d of %d feedback items kept (the model "
            "gets the rest right); thresholds %.3f (known labels), %.3f (new labels), prototype "
            "margin %s (class prototypes %s): %s",
            model.version, self._rebuild_seconds, len(memory), len(items),
            calibration.threshold, calibration.new_label_threshold, calibration.new_label_margin,
            "read" if memory.reference is not None else "not found", calibration.reason,
        )
