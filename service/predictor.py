"""The model a worker serves, and how it follows the registry's ``current`` pointer.

Each worker process holds one :class:`ServingModel` reference. A watcher thread polls the pointer;
when it names another version, the watcher loads that version and warms it up off the request
path, then swaps the reference in one assignment. A batch reads the reference once, so it runs on
one version from start to end, and batches in flight finish on the old session, which is freed
when the last of them lets go. A version that fails to load leaves the old one serving; the failure
is logged, counted and shown by ``/models``, and not retried until the pointer changes again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from adapters.serving.memory import MemoryMatches
from adapters.serving.registry import ModelRegistry
from adapters.serving.runtime import OnnxClassifier, release_freed_memory
from adapters.serving.variants import Int8Gate, VariantChoice, choose_variant
from monitoring.metrics import metrics
from refit.errors import NotReadyError

RELEASE_DELAY_S = 3.0
"""After a swap, when to hand the old version's freed memory back to the system."""

log = logging.getLogger("refit.predictor")


@dataclass(frozen=True)
class ServingModel:
    version: str
    classifier: OnnxClassifier
    labels: tuple[str, ...]
    encoder_id: str
    loaded_at: float
    variant: VariantChoice
    """The model file served (fp32 or int8) and why."""


@dataclass(frozen=True)
class BatchOutput:
    """What one inference batch produced, and with which version."""

    model: ServingModel
    probabilities: np.ndarray
    embeddings: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    matches: MemoryMatches | None = None
    """The feedback memory's answers for the batch's rows, if it was consulted and had any."""


@dataclass
class SwapStatus:
    last_error: str | None = None
    failed_version: str | None = None


class ModelHolder:
    def __init__(
        self,
        registry: ModelRegistry,
        ort_threads: int = 1,
        poll_interval_s: float = 1.0,
        precision: str = "fp32",
        int8_gate: Int8Gate | None = None,
    ) -> None:
        self.registry = registry
        self.ort_threads = ort_threads
        self.poll_interval_s = poll_interval_s
        self.precision = precision
        self.int8_gate = int8_gate or Int8Gate()
        self._model: ServingModel | None = None
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = SwapStatus()

    @property
    def model(self) -> ServingModel | None:
        return self._model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def require(self) -> ServingModel:
        model = self._model
        if model is None:
            raise NotReadyError(
                "no model is loaded: the registry has no current version yet "
                "(train one with `refit train`)"
            )
        return model

    # -- inference -------------------------------------------------------------------------------

    def run_batch(self, texts: list[str]) -> BatchOutput:
        model = self.require()  # read once: the whole batch runs on this version
        started = time.perf_counter()
        output = model.classifier.predict(texts)
        probabilities = output.probabilities
        predicted = probabilities.argmax(axis=1)
        confidence = probabilities[np.arange(len(texts)), predicted]
        m = metrics()
        m.inference_duration.observe(time.perf_counter() - started)
        m.batch_size.observe(len(texts))
        return BatchOutput(model, probabilities, output.embeddings, predicted, confidence)

    # -- loading and swapping ---------------------------------------------------------------------

    def sync(self) -> bool:
        """Load the version the pointer names if it is not the one served; True if swapped."""
        pointer = self.registry.pointer()
        if pointer is None:
            return False
        current = self._model
        if current is not None and current.version == pointer.version:
            return False
        if pointer.version == self.status.failed_version:
            return False
        with self._load_lock:
            current = self._model
            if current is not None and current.version == pointer.version:
                return False
            return self._load(pointer.version)

    def choose(self, manifest: dict[str, object]) -> VariantChoice:
        """The model file this worker serves for a version (``REFIT_MODEL_PRECISION``)."""
        return choose_variant(manifest, self.precision, self.int8_gate)

    def _load(self, version_name: str) -> bool:
        m = metrics()
        started = time.perf_counter()
        try:
            version = self.registry.get(version_name)
            # A variant whose file fails its sha256 check is refused like any failed load: the
            # old model keeps serving (no silent fall back from a tampered int8 file to fp32).
            variant = self.choose(version.manifest)
            classifier = OnnxClassifier(
                version.path, intra_op_threads=self.ort_threads, variant=variant
            )
            classifier.warm_up()
            model = ServingModel(
                version=version.name,
                classifier=classifier,
                labels=tuple(classifier.labels),
                encoder_id=version.encoder_id,
                loaded_at=time.time(),
                variant=variant,
            )
        except Exception as exc:  # noqa: BLE001 - any load failure keeps the old model
            self.status.last_error = f"loading {version_name} failed: {exc}"
            self.status.failed_version = version_name
            m.model_swaps.labels(outcome="failed").inc()
            log.error("model swap failed, still serving %s: %s",
                      self._model.version if self._model else "nothing", exc)
            return False
        seconds = time.perf_counter() - started
        previous = self._model
        self._model = model  # the swap: one reference assignment
        self.status.last_error = None
        self.status.failed_version = None
        m.model_swaps.labels(outcome="loaded").inc()
        m.model_load_duration.observe(seconds)
        if previous is not None:
            m.model_info.labels(model_version=previous.version).set(0)
        m.model_info.labels(model_version=model.version).set(1)
        log.info("serving model %s %s (was %s), loaded and warmed in %.2fs: %s",
                 model.version, variant.precision, previous.version if previous else "none",
                 seconds, variant.reason)
        return True

    def start_watching(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="model-watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        # Loading a version is background work: on Linux a thread has its own nice value, so
        # the watcher yields the CPU to the threads answering requests. (With onnxruntime's own
        # thread pool in use, its threads would inherit the lower priority, so then it doesn't.)
        if self.ort_threads == 1 and hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        release_at: float | None = None
        while not self._stop.wait(self.poll_interval_s):
            try:
                if self.sync():
                    # Batches still running on the old version hold it for at most a moment.
                    release_at = time.monotonic() + RELEASE_DELAY_S
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad poll
                log.exception("model watcher poll failed")
            if release_at is not None and time.monotonic() >= release_at:
                release_at = None
                release_freed_memory()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
