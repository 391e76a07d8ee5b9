"""Retraining on production feedback: the job that ``POST /retrain`` starts, in its own process.

Run as ``python -m adapters.training.retrain JOB_ID`` (the service does this); settings come from
the same ``REFIT_*`` environment as the server. The job writes its own progress and outcome to the
store, so its record survives the server that started it.

The job is a short sequence of steps (:func:`run_job`):

1. **Collect** the feedback. For a prediction given several labels the latest wins. A label the
   serving model (the champion) does not know is *pending* until feedback has given it
   ``REFIT_LABEL_MIN_EXAMPLES`` times (:mod:`adapters.serving.labels`): its items are kept but
   neither trained on nor judged.
2. **Embed** it. Feedback on logged predictions reuses the embedding logged with the prediction
   when it came from the champion's encoder; feedback given as text is embedded once, with the
   champion's own ONNX model, and the embedding is cached in the store.
3. **Split**: a slice of each label's feedback (chosen by a hash of its id, so an item stays on the
   same side across jobs) is held out for the gate; of the rest, some validates. Training data is
   that feedback plus a replay sample of the champion's training data, so old classes are not
   forgotten; labels active only in feedback become new classes.
4. **Fit** the head exactly as ``refit train`` does (:func:`~adapters.training.pipeline.fit_head`),
   from the champion's chosen configuration (or a new search, with ``search: "grid"``), with class
   weighting chosen on validation, warm-started from the champion's head, then fitted once more
   on train + validation for the head it serves (the gate's held-out items are never trained on).
   Meanwhile, head-only, the champion's int8 model runs over the test texts in a thread: the
   challenger's int8 model is that encoder with the new head, and its check needs those
   embeddings (:class:`~adapters.training.quantize.BackgroundEncoding`).
5. **Gate**: champion and challenger are judged on the same held-out items
   (:mod:`adapters.training.gate`).
6. **Register** the version, either way, with the gate's decision in its manifest.
7. **Promote** it if the gate passed (or ``force`` is set).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adapters.serving.data import LabelledTexts, stratified_indices
from adapters.serving.labels import LabelStatus, label_statuses
from adapters.serving.registry import ModelRegistry, ModelVersion
from adapters.serving.runtime import OnnxClassifier
from adapters.serving.tokenization import TextTokenizer
from adapters.serving.variants import Int8Gate
from adapters.training.calibration import uncalibrated
from adapters.training.gate import GateRules, HeldOutPredictions, judge
from adapters.training.head import HeadConfig, head_probabilities
from adapters.training.pipeline import (
    EmbeddedSplits,
    EncoderSource,
    FittedHead,
    HeadRecipe,
    Provenance,
    Splits,
    WarmStart,
    fit_head,
    register_version,
    version_data,
    version_encoder,
    version_head,
)
from adapters.training.quantize import BackgroundEncoding
from adapters.training.search import SearchOptions
from adapters.training.unfreeze import UnfreezeConfig
from refit.errors import ConflictError, RefitError
from refit.jobs import RetrainOptions
from refit.logs import configure_logging
from refit.processes import instance_name
from refit.settings import RefitSettings, load_settings
from refit.store import Store, StoredFeedback

log = logging.getLogger("refit.retrain")

LARGE_BATCH_FROM = 4096
WARM_PATIENCE = 8
FEEDBACK_VALIDATION_FRACTION = 0.15


class JobReporter:
    """Writes phase and progress to the job record, at most a few times a second."""

    def __init__(self, store: Store, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.phase_name = "queued"
        self.progress: dict[str, Any] = {}
        self._last_write = 0.0

    def phase(self, name: str, detail: str = "") -> None:
        mapped = {
            "loading": "training", "embedding": "training", "searching": "training",
            "training": "training", "fine-tuning": "training", "exporting": "exporting",
            "quantizing": "exporting",
            "evaluating": "evaluating", "registering": "exporting", "promoting": "promoting",
        }.get(name, name)
        self.phase_name = mapped
        self.progress = {**self.progress, "step": f"{name} {detail}".strip()}
        self._write(force=True)

    def event(self, kind: str, **fields: Any) -> None:
        if kind in ("epoch", "unfreeze_epoch"):
            self.progress = {
                **self.progress,
                "epoch": fields.get("epoch"),
                "stage": fields.get("stage"),
                "val_macro_f1": round(float(fields.get("val_macro_f1", 0.0)), 6),
                "val_accuracy": round(float(fields.get("val_accuracy", 0.0)), 6),
            }
        elif kind == "trial":
            self.progress = {
                **self.progress, "trial": fields.get("trial"), "trials": fields.get("trials")
            }
        self._write()

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= 0.5:
            self._last_write = now
            self.store.update_job(self.job_id, phase=self.phase_name, progress=self.progress)


class JobHeartbeat:
    """Renews the job's heartbeat in the store every ``interval_s``, from a thread of its own.

    A long step (a fit, an export) therefore never looks like a dead job, and a job whose process
    is gone looks dead to every replica within ``REFIT_LEASE_TIMEOUT_S``. If the store says the job
    no longer runs (another replica declared it dead while this process could not reach the
    store), the process exits at once rather than finish, and perhaps promote, a job the cluster
    has given up on and may already have replaced.
    """

    def __init__(self, store: Store, job_id: str, interval_s: float) -> None:
        self.store = store
        self.job_id = job_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (before the job writes its final state)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                running = self.store.heartbeat_job(self.job_id)
            except Exception:  # noqa: BLE001 - the store may come back before the lease ends
                log.warning("job %s: could not renew the heartbeat", self.job_id, exc_info=True)
                continue
            if not running and not self._stop.is_set():
                log.error("job %s was declared dead by another replica; exiting", self.job_id)
                os._exit(3)


@dataclass
class Feedback:
    """The feedback a job works from, and the status of every label."""

    items: list[StoredFeedback]
    """Every item in effect (the latest label per prediction), pending labels included."""
    statuses: list[LabelStatus]

    @property
    def pending_labels(self) -> list[str]:
        return [s.label for s in self.statuses if s.status == "pending"]

    @property
    def trainable(self) -> list[StoredFeedback]:
        """Items of active labels: what the job trains and judges on."""
        pending = set(self.pending_labels)
        return [item for item in self.items if item.label not in pending]


@dataclass
class RetrainData:
    """The challenger's splits (embedded by the champion's encoder) and their feedback share."""

    data: EmbeddedSplits
    new_labels: list[str]
    feedback_counts: dict[str, int]
    replay_rows: int


def holdout_mask(feedback_ids: list[int], labels: list[str], fraction: float) -> np.ndarray:
    """Which feedback items to hold out: per label, the ``fraction`` with the smallest id hash.

    Hash order is stable, so an item held out once stays held out as more feedback arrives, and
    the challenger is never judged on items an earlier version trained on. A label with a single
    item keeps it for training.
    """
    mask = np.zeros(len(feedback_ids), dtype=bool)
    by_label: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(label, []).append(position)
    for members in by_label.values():
        if len(members) < 2:
            continue
        ranked = sorted(
            members, key=lambda p: hashlib.sha256(str(feedback_ids[p]).encode()).digest()
        )
        count = min(len(members) - 1, max(1, round(len(members) * fraction)))
        mask[ranked[:count]] = True
    return mask


def latest_per_prediction(rows: list[StoredFeedback]) -> list[StoredFeedback]:
    """Feedback in effect: for a prediction labelled more than once, only the latest label."""
    latest: dict[str, int] = {}
    for row in rows:
        if row.prediction_id is not None:
            previous = latest.get(row.prediction_id)
            if previous is None or row.id > previous:
                latest[row.prediction_id] = row.id
    return [row for row in rows if row.prediction_id is None or latest[row.prediction_id] == row.id]


# -- the steps of a job ----------------------------------------------------------------------------


def collect_feedback(
    store: Store, champion: ModelVersion, settings: RefitSettings, min_feedback: int
) -> Feedback:
    """All feedback in effect, and which labels are active or pending."""
    rows = latest_per_prediction(store.all_feedback())
    if len(rows) < min_feedback:
        raise ConflictError(
            f"only {len(rows)} labelled feedback items; at least {min_feedback} are needed"
        )
    statuses = label_statuses(
        champion.labels,
        training_counts=training_label_counts(champion),
        feedback_counts=dict(Counter(row.label for row in rows)),
        min_examples=settings.label_min_examples,
        max_new=settings.retrain_max_new_labels,
    )
    return Feedback(rows, statuses)


def training_label_counts(version: ModelVersion) -> dict[str, int]:
    """Examples per label in a version's training split."""
    from adapters.serving.data import read_jsonl

    path = version.path / "data" / "train.jsonl"
    return dict(read_jsonl(path).label_counts()) if path.exists() else {}


def feedback_embeddings(
    rows: list[StoredFeedback], champion: ModelVersion, store: Store, reporter: JobReporter
) -> np.ndarray:
    """Embeddings of feedback items by the champion's encoder, computing only what's missing."""
    encoder_id = champion.encoder_id
    vectors = np.zeros((len(rows), 384), dtype=np.float32)
    missing: list[int] = []
    for position, row in enumerate(rows):
        if row.embedding is not None and row.encoder_id == encoder_id:
            vectors[position] = row.embedding
        else:
            missing.append(position)
    if missing:
        reporter.phase("embedding", f"{len(missing)} feedback texts without a cached embedding")
        classifier = OnnxClassifier(champion.path, intra_op_threads=1)
        texts = [rows[p].text for p in missing]
        computed = np.concatenate(
            [classifier.predict(texts[i : i + 256]).embeddings for i in range(0, len(texts), 256)]
        )
        vectors[missing] = computed
        store.cache_feedback_embeddings(
            {rows[p].id: computed[i] for i, p in enumerate(missing)}, encoder_id
        )
    return vectors


def split_data(
    champion: ModelVersion,
    items: list[StoredFeedback],
    vectors: np.ndarray,
    settings: RefitSettings,
    seed: int,
) -> RetrainData:
    """The challenger's train/validation/test splits, from the champion's data and feedback.

    Test (what the gate judges on) is the champion's test split plus held-out feedback; validation
    (early stopping, search) is the champion's plus some training feedback, so that new classes
    are validated too; train is a replay sample of the champion's training data plus the rest.
    """
    labels_of = [item.label for item in items]
    held = holdout_mask([item.id for item in items], labels_of, settings.retrain_holdout_fraction)
    fb_train, fb_hold = np.flatnonzero(~held), np.flatnonzero(held)
    fit_idx, val_idx = stratified_indices(
        [labels_of[p] for p in fb_train], FEEDBACK_VALIDATION_FRACTION, seed
    )
    fb_fit, fb_val = fb_train[fit_idx], fb_train[val_idx]

    champion_splits, champion_embeddings = version_data(champion)
    rng = np.random.default_rng(seed)
    replay_n = min(settings.retrain_replay_rows, len(champion_splits.train))
    replay = np.sort(rng.choice(len(champion_splits.train), replay_n, replace=False))

    def texts_of(positions: np.ndarray) -> LabelledTexts:
        return LabelledTexts.of(
            [items[p].text for p in positions], [labels_of[p] for p in positions]
        )

    splits = Splits(
        champion_splits.train.subset(replay) + texts_of(fb_fit),
        champion_splits.validation + texts_of(fb_val),
        champion_splits.test + texts_of(fb_hold),
    )
    embeddings = {
        "train": np.concatenate([champion_embeddings["train"][replay], vectors[fb_fit]]),
        "validation": np.concatenate([champion_embeddings["validation"], vectors[fb_val]]),
        "test": np.concatenate([champion_embeddings["test"], vectors[fb_hold]]),
    }
    labels = sorted(set(champion.labels) | set(labels_of))
    return RetrainData(
        data=EmbeddedSplits(labels, splits, embeddings),
        new_labels=sorted(set(labels) - set(champion.labels)),
        feedback_counts={"train": len(fb_fit), "validation": len(fb_val), "held_out": len(fb_hold)},
        replay_rows=int(replay_n),
    )


def retrain_recipe(
    champion: ModelVersion, labels: list[str], options: RetrainOptions
) -> HeadRecipe:
    """The champion's own recipe (its chosen head configuration), warm-started from its head."""
    config = HeadConfig(**champion.manifest["training"]["head"])
    warm_start = None
    if (champion.path / "head.npz").exists():
        # Warm start: on banking77 with 10k feedback items a head converges in half the epochs to
        # a better validation score than one trained from scratch (BENCHMARKS.md).
        index = {label: i for i, label in enumerate(labels)}
        warm_start = WarmStart(
            head=uncalibrated(version_head(champion), champion.manifest),
            hidden_size=config.hidden_size,
            class_map=[index[label] for label in champion.labels], version=champion.name,
            patience=WARM_PATIENCE,
        )
    return HeadRecipe(
        config=config,
        search=SearchOptions(strategy="grid" if options.search == "grid" else "none"),
        seed=options.seed,
        unfreeze=UnfreezeConfig(layers=options.unfreeze_layers),
        warm_start=warm_start,
        large_batch_from=LARGE_BATCH_FROM,
        # Class weighting is chosen on this data's validation split: feedback brings new classes
        # far smaller than the replayed ones, where inverse-frequency weights over-predict them.
        choose_class_weighting=True,
    )


def champion_encoder(champion: ModelVersion, unfreeze_layers: int) -> EncoderSource:
    """The champion's encoder, as the challenger starts with it.

    Head-only, the champion's ONNX encoder graph is reused and PyTorch never loads the encoder;
    fine-tuning needs the PyTorch encoder (with the champion's fine-tuned weights, if any).
    """
    fine_tuned = int(champion.manifest["encoder"].get("fine_tuned_layers", 0))
    return EncoderSource(
        tokenizer=TextTokenizer(
            champion.path / "tokenizer.json", champion.manifest["encoder"]["max_seq_length"]
        ),
        encoder=version_encoder(champion) if unfreeze_layers > 0 else None,
        onnx_from=champion.onnx_path,
        weights_from=champion.path / "encoder" if fine_tuned else None,
        int8_from=champion.int8_path,
        fine_tuned_layers=fine_tuned,
    )


def gate_challenger(
    champion: ModelVersion,
    judged: EmbeddedSplits,
    fitted: FittedHead,
    new_labels: list[str],
    settings: RefitSettings,
    force: bool,
) -> dict[str, Any]:
    """Champion and challenger on the same held-out items (the test split), and the decision.

    ``judged`` is the data as the champion's encoder embedded it; the challenger's own embeddings
    (different only if it fine-tuned the encoder) are in ``fitted.data``.
    """
    test = judged.splits.test
    if (champion.path / "head.npz").exists():
        scores = head_probabilities(version_head(champion), judged.embeddings["test"])
    else:  # a version from before heads were stored: run its ONNX model on the texts
        scores = OnnxClassifier(champion.path).predict(list(test.texts)).probabilities
    challenger_scores = head_probabilities(fitted.head, fitted.data.embeddings["test"])
    predictions = HeldOutPredictions(
        truth=list(test.labels),
        champion=[champion.labels[i] for i in scores.argmax(axis=1)],
        challenger=[fitted.data.labels[i] for i in challenger_scores.argmax(axis=1)],
    )
    return judge(
        predictions, champion.name, champion.labels, new_labels,
        GateRules.from_settings(settings), force,
    )


def run_job(job_id: str, settings: RefitSettings, store: Store) -> dict[str, Any]:
    """Run retrain job ``job_id`` from start to end; returns its result (what the record shows)."""
    started = time.perf_counter()
    options: RetrainOptions = store.get_job(job_id).options
    reporter = JobReporter(store, job_id)
    store.update_job(
        job_id, phase="collecting", pid=os.getpid(), host=instance_name(settings.instance_name)
    )
    reporter.phase_name = "collecting"
    registry = ModelRegistry(settings.registry_path)
    champion = registry.current()
    if champion is None:
        raise ConflictError("no current model version to retrain from")

    feedback = collect_feedback(store, champion, settings, options.min_feedback)
    items = feedback.trainable
    pending = feedback.pending_labels
    reporter.phase(
        "collecting",
        f"{len(feedback.items)} feedback items ({len(items)} on active labels); "
        f"champion {champion.name}",
    )
    vectors = feedback_embeddings(items, champion, store, reporter)
    split = split_data(champion, items, vectors, settings, options.seed)
    recipe = retrain_recipe(champion, split.data.labels, options)
    # Head-only, the challenger's int8 model will be the champion's int8 encoder with the new
    # head: its run over the test texts (the int8 check's cost) needs no head, so it goes on
    # the other core while the head trains on one.
    int8_test = None
    if options.unfreeze_layers == 0 and champion.int8_path is not None \
            and champion.int8_path.is_file():
        int8_test = BackgroundEncoding(champion.path, champion.manifest,
                                       split.data.splits.test.texts)
    fitted = fit_head(
        split.data, recipe, champion_encoder(champion, options.unfreeze_layers), reporter
    )
    reporter.phase("evaluating", "champion against challenger")
    gate = gate_challenger(champion, split.data, fitted, split.new_labels, settings, options.force)
    version = register_version(
        registry,
        fitted,
        Provenance(
            data_source=f"feedback ({len(items)} items) + replay of {champion.name}",
            parent=champion.name,
            training={
                "retrain": {
                    "warm_start": fitted.warm_start,
                    "job_id": job_id,
                    "feedback_items": len(feedback.items),
                    "feedback_train": split.feedback_counts["train"],
                    "feedback_validation": split.feedback_counts["validation"],
                    "feedback_held_out": split.feedback_counts["held_out"],
                    "replay_rows": split.replay_rows,
                    "new_labels": split.new_labels,
                    "pending_labels": pending,
                },
            },
            extra={"gate": gate},
        ),
        recipe.seed,
        reporter,
        started,
        Int8Gate.from_settings(settings),
        int8_test,
    )
    promoted = False
    if gate["promote"]:
        reporter.phase("promoting", version.name)
        registry.promote(version.name)
        promoted = True
    test = version.manifest["metrics"]["test"]
    return {
        "version": version.name,
        "parent": champion.name,
        "promoted": promoted,
        "outcome": "promoted" if promoted else "rejected",
        "reason": gate["reason"],
        "gate": gate,
        "metrics": {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
                    "examples": test["examples"]},
        "labels": version.labels,
        "new_labels": split.new_labels,
        "pending_labels": pending,
        "label_status": [asdict(status) for status in feedback.statuses],
        "feedback_items": len(feedback.items),
        "train_seconds": round(time.perf_counter() - started, 3),
    }


def failure_message(exc: BaseException) -> str:
    """What the job record says about an unexpected failure: the cause, never a server path."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ("the registry's disk is full (No space left on device): nothing was registered "
                "and the serving version is unchanged; free space and retrain")
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror} (errno {exc.errno})"
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.training.retrain")
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s retrain %(levelname)s %(message)s")
    # Serving comes first: training yields the CPU to the workers.
    with contextlib.suppress(OSError):
        os.nice(10)
    import torch

    # Niced, the job yields the CPU to serving workers whenever they need it.
    torch.set_num_threads(2)
    settings = load_settings()
    configure_logging(settings)
    store = Store.from_url(settings.resolved_database_url)
    job_id = args.job_id
    heartbeat = JobHeartbeat(store, job_id, settings.heartbeat_interval_s)
    heartbeat.start()
    try:
        result = run_job(job_id, settings, store)
    except RefitError as exc:
        heartbeat.stop()
        store.update_job(job_id, phase="failed", error=exc.message)
        log.error("job %s failed: %s", job_id, exc.message)
        return 1
    except Exception as exc:  # noqa: BLE001 - recorded on the job, then the process exits
        heartbeat.stop()
        store.update_job(job_id, phase="failed", error=failure_message(exc))
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        return 1
    heartbeat.stop()
    store.update_job(job_id, phase="done", result=result)
    log.info("job %s done: %s", job_id, result["reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
