"""Classification metrics, in numpy alone (serving and the CLI use them without torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0
    )
    return precision, recall, f1, support


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes that occur in ``y_true`` (absent classes would only add zeros)."""
    matrix = confusion(y_true, y_pred, num_classes)
    _, _, f1, support = _per_class(matrix)
    present = support > 0
    return float(f1[present].mean()) if present.any() else 0.0


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``y_true`` and ``y_pred`` are indices into ``labels``. Only classes with support count
    towards macro-F1.
    """
    matrix = confusion(y_true, y_pred, len(labels))
    precision, recall, f1, support = _per_class(matrix)
    present = support > 0
    return {
        "examples": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": matrix.tolist(),
    }


def accuracy_on(y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray) -> float | None:
    """Accuracy restricted to ``mask``; ``None`` where the mask selects nothing."""
    if not mask.any():
        return None
    return float((y_true[mask] == y_pred[mask]).mean())
