"""Drift of production traffic against the serving version's reference, with Evidently.

Four signals compare a window of recent predictions (by the serving version) with the reference
stored in that version at training time (``reference.npz``):

* ``label``: the predicted-label distribution, Jensen–Shannon distance (Evidently
  ``jensenshannon``).
* ``confidence``: the probability of the predicted label, Wasserstein distance in units of the
  reference's standard deviation (Evidently ``wasserstein``).
* ``text_length``: characters per text, the same test.

For these three, the threshold is the larger of the configured one and the score that chance
alone reaches for a window of that size (:func:`noise_quantiles`).
* ``embedding``: the 384-dim sentence embeddings, Evidently's domain-classifier method
  (``ModelDriftMethod``): a classifier learns to tell window from reference and its ROC AUC on
  held-back rows is the score. It counts as drift only when the AUC is both above the threshold
  and above the 99th percentile of AUCs of random guesses on the same rows, so a small window
  does not raise false alarms.

The reference's label, confidence and length rows come from the version's held-out splits (a
model is over-confident on texts it trained on); its embeddings from all its data. The first
three signals run as one Evidently ``Report``, which is also the HTML report of the window.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SIGNALS = ("label", "confidence", "embedding", "text_length")


@dataclass(frozen=True)
class Thresholds:
    label: float = 0.1
    confidence: float = 0.1
    embedding: float = 0.55
    text_length: float = 0.1


@dataclass
class Reference:
    version: str
    labels: tuple[str, ...]
    embeddings: np.ndarray
    text_length: np.ndarray  # held-out rows, like predicted and confidence
    predicted: np.ndarray  # label indices
    confidence: np.ndarray
    noise: dict[int, dict[str, float]] = field(default_factory=dict)
    """Per window size: the 99th percentile of each tabular score between samples of the
    reference itself (see :func:`noise_quantiles`), computed once."""

    @classmethod
    def load(cls, version: str, version_dir: Path, labels: Sequence[str]) -> Reference:
        with np.load(version_dir / "reference.npz") as data:
            return cls(
                version=version,
                labels=tuple(labels),
                embeddings=data["embeddings"].astype(np.float32),
                text_length=data["text_length"].astype(np.float64),
                predicted=data["predicted"].astype(np.int64),
                confidence=data["confidence"].astype(np.float64),
            )


@dataclass(frozen=True)
class Window:
    labels: list[str]
    confidence: np.ndarray
    text_length: np.ndarray
    embeddings: np.ndarray
    start: float | None
    end: float | None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SignalResult:
    method: str
    score: float
    threshold: float
    drifted: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DriftResult:
    status: str  # "ok", "insufficient_data", "no_model"
    model_version: str | None
    reference_version: str | None
    window: dict[str, Any]
    signals: dict[str, SignalResult]
    drift_detected: bool
    computed_at: float
    seconds: float
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["signals"] = {name: asdict(signal) for name, signal in self.signals.items()}
        return body


def _frame(labels: Sequence[str], confidence: np.ndarray, lengths: np.ndarray) -> Any:
    import pandas as pd

    return pd.DataFrame(
        {"predicted_label": list(labels), "confidence": confidence, "text_length": lengths}
    )


NOISE_REPEATS = 100
NOISE_QUANTILE = 0.99


def noise_quantiles(reference: Reference, size: int, seed: int = 0) -> dict[str, float]:
    """How large each tabular score gets by chance alone, for windows of ``size`` rows.

    A distance between two samples is never 0: with 77 labels, a window of 500 predictions from
    the very distribution of the reference has a Jensen-Shannon distance of about 0.13, above the
    usual 0.1 threshold. So the job draws pairs of independent bootstrap samples from the
    reference (one of the reference's size, one of the window's), scores them with the same
    Evidently tests, and a signal counts as drifted only above the 99th percentile of those
    scores as well as above its configured threshold.
    """
    if size in reference.noise:
        return reference.noise[size]
    import pandas as pd
    from evidently.legacy.calculations.stattests import (
        jensenshannon_stat_test,
        wasserstein_stat_test,
    )
    from evidently.legacy.core import ColumnType

    rng = np.random.default_rng(seed)
    labels = np.array([reference.labels[i] for i in reference.predicted], dtype=object)
    columns = {
        "label": (labels, jensenshannon_stat_test, ColumnType.Categorical),
        "confidence": (reference.confidence, wasserstein_stat_test, ColumnType.Numerical),
        "text_length": (reference.text_length, wasserstein_stat_test, ColumnType.Numerical),
    }
    n = len(labels)
    scores: dict[str, list[float]] = {name: [] for name in columns}
    for _ in range(NOISE_REPEATS):
        base = rng.integers(0, n, n)
        window = rng.integers(0, n, size)
        for name, (values, test, kind) in columns.items():
            score, _ = test.func(pd.Series(values[base]), pd.Series(values[window]), kind, 0.1)
            scores[name].append(float(score))
    reference.noise[size] = {
        name: float(np.quantile(v, NOISE_QUANTILE)) for name, v in scores.items()
    }
    return reference.noise[size]


def tabular_report(reference: Reference, window: Window, thresholds: Thresholds) -> Any:
    """The Evidently report over predicted label, confidence and text length (a Snapshot)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    definition = DataDefinition(
        numerical_columns=["confidence", "text_length"], categorical_columns=["predicted_label"]
    )
    ref_labels = [reference.labels[i] for i in reference.predicted]
    reference_frame = _frame(ref_labels, reference.confidence, reference.text_length)
    current_frame = _frame(window.labels, window.confidence, window.text_length)
    report = Report(
        [
            ValueDrift(
                column="predicted_label", method="jensenshannon", threshold=thresholds.label
            ),
            ValueDrift(column="confidence", method="wasserstein", threshold=thresholds.confidence),
            ValueDrift(
                column="text_length", method="wasserstein", threshold=thresholds.text_length
            ),
        ]
    )
    return report.run(
        current_data=Dataset.from_pandas(current_frame, data_definition=definition),
        reference_data=Dataset.from_pandas(reference_frame, data_definition=definition),
    )


def embedding_drift(reference: Reference, window: Window, threshold: float) -> SignalResult:
    import pandas as pd
    from evidently.metrics.embeddings import ModelDriftMethod

    method = ModelDriftMethod(threshold=threshold, bootstrap=True, quantile_probability=0.99)
    auc, significant, _ = method(
        pd.DataFrame(window.embeddings.astype(np.float64)),
        pd.DataFrame(reference.embeddings.astype(np.float64)),
    )
    return SignalResult(
        method="domain classifier ROC AUC (Evidently ModelDriftMethod)",
        score=float(auc),
        threshold=threshold,
        drifted=bool(significant and auc > threshold),
        details={"significant_vs_random_q99": bool(significant)},
    )


def detect(
    reference: Reference, window: Window, thresholds: Thresholds
) -> tuple[DriftResult, Any]:
    """All four signals for one window; returns the result and the Evidently snapshot."""
    started = time.perf_counter()
    snapshot = tabular_report(reference, window, thresholds)
    values = {m["config"]["column"]: float(m["value"]) for m in snapshot.dict()["metrics"]}
    noise = noise_quantiles(reference, len(window))
    signals: dict[str, SignalResult] = {}
    for name, column, method, configured in (
        ("label", "predicted_label", "Jensen-Shannon distance (Evidently)", thresholds.label),
        (
            "confidence",
            "confidence",
            "Wasserstein distance, normed (Evidently)",
            thresholds.confidence,
        ),
        (
            "text_length",
            "text_length",
            "Wasserstein distance, normed (Evidently)",
            thresholds.text_length,
        ),
    ):
        threshold = max(configured, noise[name])
        signals[name] = SignalResult(
            method, values[column], threshold, values[column] > threshold,
            {"configured_threshold": configured, "chance_q99": round(noise[name], 6)},
        )
    signals["embedding"] = embedding_drift(reference, window, thresholds.embedding)
    result = DriftResult(
        status="ok",
        model_version=reference.version,
        reference_version=reference.version,
        window={"size": len(window), "start": window.start, "end": window.end},
        signals=signals,
        drift_detected=any(s.drifted for s in signals.values()),
        computed_at=time.time(),
        seconds=round(time.perf_counter() - started, 3),
    )
    return result, snapshot
