"""Retraining on production feedback: the job that ``POST /retrain`` starts, in its own process.

Run as ``python -m adapters.training.retrain JOB_ID`` (the service does this); settings come from the same
``REFIT_*`` environment as the server. The job writes its own progress and outcome to the store,
so its record survives the server that started it.

What it trains: a new head on all feedback so far plus a replay sample of the serving version's
(the champion's) training data, so old classes are not forgotten. Labels seen only in feedback
become new classes. Feedback on logged predictions reuses the embedding logged with the
prediction when it came from the champion's encoder; feedback given as text is embedded once, with
the champion's own ONNX model, and the embedding is cached in the store.

The gate: a slice of the feedback (chosen by a hash of its id, so an item stays on the same side
across jobs) is held out. Champion and challenger are scored on the champion's test split plus the
held-out feedback on the champion's classes ("old classes"), and the challenger on held-out
feedback of classes new to it. It is promoted only if it loses no more than the tolerance on the
old classes and reaches the minimum on the new ones, unless ``force`` is set. The version is
registered either way, with the decision and both scores in its manifest.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from adapters.serving.data import LabelledTexts, stratified_indices
from adapters.serving.evaluation import accuracy_on
from adapters.training.head import HeadConfig, head_probabilities, train_head
from adapters.serving.registry import ModelRegistry, ModelVersion
from adapters.serving.runtime import OnnxClassifier
from adapters.training.search import SearchOptions, search_head
from adapters.serving.tokenization import TextTokenizer
from adapters.training.pipeline import (
    Splits,
    build_version,
    version_data,
    version_encoder,
    version_head,
)
from adapters.training.unfreeze import UnfreezeConfig, gradual_unfreeze
from refit.errors import ConflictError, RefitError
from refit.jobs import RetrainOptions
from refit.settings import RefitSettings, load_settings
from refit.store import Store, StoredFeedback

log = logging.getLogger("refit.retrain")

LARGE_BATCH = 512
LARGE_BATCH_FROM = 4096
WARM_PATIENCE = 8


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
            self.progress = {**self.progress, "trial": fields.get("trial"), "trials": fields.get("trials")}
        self._write()

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= 0.5:
            self._last_write = now
            self.store.update_job(self.job_id, phase=self.phase_name, progress=self.progress)


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
        ranked = sorted(members, key=lambda p: hashlib.sha256(str(feedback_ids[p]).encode()).digest())
        count = min(len(members) - 1, max(1, int(round(len(members) * fraction))))
        mask[ranked[:count]] = True
    return mask


def feedback_embeddings(
    rows: list[StoredFeedback], champion: ModelVersion, store: Store, reporter: JobReporter
) -> np.ndarray:
    """Embeddings of every feedback item by the champion's encoder, computing only what's missing."""
    encoder_id = champion.manifest["encoder"]["id"]
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


def run_job(job_id: str, settings: RefitSettings, store: Store) -> dict[str, Any]:
    started = time.perf_counter()
    options: RetrainOptions = store.get_job(job_id).options
    reporter = JobReporter(store, job_id)
    store.update_job(job_id, phase="collecting", pid=os.getpid(), host=socket.gethostname())
    reporter.phase_name = "collecting"

    registry = ModelRegistry(settings.registry_path)
    champion = registry.current()
    if champion is None:
        raise ConflictError("no current model version to retrain from")
    rows = store.all_feedback()
    if len(rows) < options.min_feedback:
        raise ConflictError(
            f"only {len(rows)} labelled feedback items; at least {options.min_feedback} are needed"
        )
    reporter.phase("collecting", f"{len(rows)} feedback items; champion {champion.name}")
    old_labels = champion.labels
    feedback_labels = [row.label for row in rows]
    labels = sorted(set(old_labels) | set(feedback_labels))
    new_labels = sorted(set(labels) - set(old_labels))
    index = {label: i for i, label in enumerate(labels)}

    vectors = feedback_embeddings(rows, champion, store, reporter)
    held = holdout_mask([row.id for row in rows], feedback_labels, settings.retrain_holdout_fraction)
    fb_train = np.flatnonzero(~held)
    fb_hold = np.flatnonzero(held)

    champion_splits, champion_embeddings = version_data(champion)
    rng = np.random.default_rng(options.seed)
    replay_n = min(settings.retrain_replay_rows, len(champion_splits.train))
    replay = np.sort(rng.choice(len(champion_splits.train), replay_n, replace=False))

    def texts_of(positions: np.ndarray) -> LabelledTexts:
        return LabelledTexts.of([rows[p].text for p in positions], [rows[p].label for p in positions])

    # Part of the training feedback validates (early stopping needs the new classes too).
    fb_train_labels = [rows[p].label for p in fb_train]
    fit_idx, val_idx = stratified_indices(fb_train_labels, 0.15, options.seed)
    # Labels with too few items keep them all for fitting.
    fb_fit, fb_val = fb_train[fit_idx], fb_train[val_idx]

    train = champion_splits.train.subset(replay) + texts_of(fb_fit)
    validation = champion_splits.validation + texts_of(fb_val)
    test = champion_splits.test + texts_of(fb_hold)
    splits = Splits(train, validation, test)
    embeddings = {
        "train": np.concatenate([champion_embeddings["train"][replay], vectors[fb_fit]]),
        "validation": np.concatenate([champion_embeddings["validation"], vectors[fb_val]]),
        "test": np.concatenate([champion_embeddings["test"], vectors[fb_hold]]),
    }
    y = {name: np.array([index[label] for label in part.labels]) for name, part in splits.items()}

    champion_config = HeadConfig(**champion.manifest["training"]["head"])
    head_config = champion_config
    search_record: dict[str, Any] = {"strategy": "none"}
    if options.search == "grid":
        reporter.phase("searching", "grid")
        search = search_head(
            embeddings["train"], y["train"], embeddings["validation"], y["validation"],
            len(labels), head_config, SearchOptions("grid"), options.seed,
            on_trial=lambda _i, n, trial: reporter.event("trial", trials=n, **trial),
        )
        head_config = search.best
        search_record = {"strategy": "grid", **search.to_manifest()}

    if len(train) >= LARGE_BATCH_FROM:
        # Large sets: bigger batches (learning rate scaled by the square root) train the head
        # about 2.5 times faster for the same validation score (bench/retrain_speed.py).
        scale = (LARGE_BATCH / head_config.batch_size) ** 0.5
        head_config = head_config.with_overrides(
            batch_size=LARGE_BATCH, learning_rate=head_config.learning_rate * scale
        )
    # Warm start from the champion's head when the architecture is the same: on banking77 with
    # 10k feedback items it converges in half the epochs to a better validation score than a
    # head trained from scratch (BENCHMARKS.md), and it needs less patience.
    warm_start = None
    if (champion.path / "head.npz").exists() and head_config.hidden_size == champion_config.hidden_size:
        warm_start = (version_head(champion), [index[label] for label in old_labels])
        head_config = head_config.with_overrides(patience=min(head_config.patience, WARM_PATIENCE))
    reporter.phase("training", f"head on {len(train)} examples, {len(labels)} labels")
    trained = train_head(
        embeddings["train"], y["train"], embeddings["validation"], y["validation"], len(labels),
        head_config, options.seed, on_epoch=lambda r: reporter.event("epoch", **asdict(r)),
        warm_start=warm_start,
    )
    head = trained.head
    tokenizer = TextTokenizer(champion.path / "tokenizer.json",
                              champion.manifest["encoder"]["max_seq_length"])
    fine_tuned = champion.manifest["encoder"].get("fine_tuned_layers", 0)
    weights_from = champion.path / "encoder" if fine_tuned else None
    # Head-only: the champion's encoder graph is reused; PyTorch never loads the encoder.
    encoder = None
    encoder_onnx_from: Path | None = champion.onnx_path
    unfreeze_record = None
    if options.unfreeze_layers > 0:
        from adapters.training.encoder import embed_texts

        encoder = version_encoder(champion)
        reporter.phase("fine-tuning", f"top {options.unfreeze_layers} layer(s)")
        result = gradual_unfreeze(
            encoder, tokenizer, train.texts, y["train"], validation.texts, y["validation"],
            len(labels), head_config, UnfreezeConfig(layers=options.unfreeze_layers),
            trained.val_macro_f1, options.seed,
            on_epoch=lambda r: reporter.event("unfreeze_epoch", **asdict(r)),
        )
        unfreeze_record = result.to_manifest(UnfreezeConfig(layers=options.unfreeze_layers))
        if result.head is not None:
            head = result.head
            fine_tuned = max(fine_tuned, options.unfreeze_layers)
            weights_from = None
            encoder_onnx_from = None
            reporter.phase("embedding", "with the fine-tuned encoder")
            embeddings = {name: embed_texts(encoder, tokenizer, part.texts) for name, part in splits.items()}

    reporter.phase("evaluating", "champion against challenger")
    gate = decide(
        champion=champion, champion_test_embeddings=champion_embeddings["test"],
        champion_holdout_embeddings=vectors[fb_hold], holdout_labels=[rows[p].label for p in fb_hold],
        champion_test_labels=list(champion_splits.test.labels), champion_texts=list(test.texts),
        challenger=head, labels=labels,
        challenger_test_embeddings=embeddings["test"], new_labels=new_labels,
        settings=settings, force=options.force,
    )
    version = build_version(
        registry,
        encoder=encoder,
        fine_tuned_layers=fine_tuned,
        encoder_weights_from=weights_from,
        head=head,
        labels=labels,
        tokenizer=tokenizer,
        splits=splits,
        embeddings=embeddings,
        training={
            "seed": options.seed,
            "head": asdict(head_config),
            "head_training": trained.summary(),
            "search": search_record,
            "unfreeze": unfreeze_record,
            "retrain": {
                "warm_start": champion.name if warm_start is not None else None,
                "job_id": job_id,
                "feedback_items": len(rows),
                "feedback_train": int(len(fb_fit)),
                "feedback_validation": int(len(fb_val)),
                "feedback_held_out": int(len(fb_hold)),
                "replay_rows": int(replay_n),
                "new_labels": new_labels,
            },
        },
        parent=champion.name,
        data_source=f"feedback ({len(rows)} items) + replay of {champion.name}",
        reporter=reporter,
        started=started,
        extra={"gate": gate},
        encoder_onnx_from=encoder_onnx_from,
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
        "labels": labels,
        "new_labels": new_labels,
        "feedback_items": len(rows),
        "train_seconds": round(time.perf_counter() - started, 3),
    }


def decide(
    *,
    champion: ModelVersion,
    champion_test_embeddings: np.ndarray,
    champion_holdout_embeddings: np.ndarray,
    holdout_labels: list[str],
    champion_test_labels: list[str],
    champion_texts: list[str],
    challenger: Any,
    labels: list[str],
    challenger_test_embeddings: np.ndarray,
    new_labels: list[str],
    settings: RefitSettings,
    force: bool,
) -> dict[str, Any]:
    """Champion/challenger scores on the held-out data and the promotion decision."""
    old_labels = champion.labels
    # The challenger's test split is the champion's test split followed by the held-out feedback.
    truth = champion_test_labels + holdout_labels
    is_old = np.array([label in set(old_labels) for label in truth])
    is_new = ~is_old
    challenger_pred = head_probabilities(challenger, challenger_test_embeddings).argmax(axis=1)
    challenger_labels = np.array([labels[i] for i in challenger_pred])
    if (champion.path / "head.npz").exists():
        champion_inputs = np.concatenate([champion_test_embeddings, champion_holdout_embeddings])
        champion_pred = head_probabilities(version_head(champion), champion_inputs).argmax(axis=1)
    else:  # a version from before heads were stored: run its ONNX model on the texts
        champion_pred = OnnxClassifier(champion.path).predict(champion_texts).probabilities.argmax(axis=1)
    champion_labels = np.array([old_labels[i] for i in champion_pred])
    truth_arr = np.array(truth)
    old_champion = accuracy_on(truth_arr, champion_labels, is_old)
    old_challenger = accuracy_on(truth_arr, challenger_labels, is_old)
    new_challenger = accuracy_on(truth_arr, challenger_labels, is_new)
    per_new = {
        label: accuracy_on(truth_arr, challenger_labels, truth_arr == label) for label in new_labels
    }
    unverifiable = [label for label, value in per_new.items() if value is None]
    reasons: list[str] = []
    if old_champion is not None and old_challenger is not None:
        if old_challenger < old_champion - settings.gate_tolerance:
            reasons.append(
                f"accuracy on the old classes fell from {old_champion:.4f} to {old_challenger:.4f} "
                f"(tolerance {settings.gate_tolerance})"
            )
    if new_challenger is not None and new_challenger < settings.gate_min_new_class_accuracy:
        reasons.append(
            f"accuracy on new classes {new_challenger:.4f} is below the minimum "
            f"{settings.gate_min_new_class_accuracy}"
        )
    if unverifiable:
        reasons.append(
            "no held-out feedback to verify new class(es) "
            + ", ".join(unverifiable)
            + " (each needs at least 2 feedback items)"
        )
    passed = not reasons
    return {
        "promote": passed or force,
        "passed": passed,
        "forced": force and not passed,
        "reason": "; ".join(reasons) if reasons else "not worse on old classes; new classes good enough",
        "tolerance": settings.gate_tolerance,
        "min_new_class_accuracy": settings.gate_min_new_class_accuracy,
        "champion": {"version": champion.name, "old_classes_accuracy": old_champion},
        "challenger": {
            "old_classes_accuracy": old_challenger,
            "new_classes_accuracy": new_challenger,
            "per_new_class_accuracy": per_new,
        },
        "examples": {"old_classes": int(is_old.sum()), "new_classes": int(is_new.sum())},
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
    try:
        os.nice(10)
    except OSError:
        pass
    import torch

    # Niced, the job yields the CPU to serving workers whenever they need it.
    torch.set_num_threads(2)
    settings = load_settings()
    store = Store.from_url(settings.resolved_database_url)
    job_id = args.job_id
    try:
        result = run_job(job_id, settings, store)
    except RefitError as exc:
        store.update_job(job_id, phase="failed", error=exc.message)
        log.error("job %s failed: %s", job_id, exc.message)
        return 1
    except Exception as exc:  # noqa: BLE001 - recorded on the job, then the process exits
        store.update_job(job_id, phase="failed", error=failure_message(exc))
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        return 1
    store.update_job(job_id, phase="done", result=result)
    log.info("job %s done: %s", job_id, result["reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
