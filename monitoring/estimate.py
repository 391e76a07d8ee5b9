"""Accuracy estimated without labels, from the calibrated confidences of recent predictions.

A calibrated model is right on a share of its predictions equal to its mean confidence (that is
what calibration means: among predictions made at confidence 0.8, 80% are right). So over a window
of recent predictions, the expected accuracy is the mean confidence, overall and per predicted
label (there: the label's precision). If prediction ``i`` is right with probability ``p_i``
independently, the number right follows a Poisson-binomial law with variance ``Σ p_i (1 - p_i)``:
the interval is the mean ± ``z`` standard deviations of it, divided by the window's size (a normal
approximation, clipped to [0, 1]). It is the uncertainty of the accuracy *realised* on these
predictions, assuming calibration; it knows nothing of calibration error.

Limits, by construction: the estimate is only as good as the calibration, which was fitted on the
version's own validation data. On traffic unlike it (new intents, another domain), a model is
often confidently wrong, and the estimate stays too high (bench/estimate_stream.py measures by how
much). Predictions the feedback memory answered carry the model's probability of the served label
(0 for a label the model does not know), so they pull the estimate down although they are usually
right. It complements feedback-based accuracy; it does not replace labels.

Plain numpy: serving and the monitoring job import it, never torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Z_95 = 1.959964


@dataclass(frozen=True)
class Estimate:
    """Estimated accuracy of ``predictions`` predictions, with a 95% interval."""

    predictions: int
    accuracy: float
    lower: float
    upper: float


def estimate(confidences: np.ndarray, z: float = Z_95) -> Estimate:
    """Mean confidence and its Poisson-binomial interval (``predictions`` must be at least 1)."""
    p = np.clip(np.asarray(confidences, dtype=np.float64), 0.0, 1.0)
    n = len(p)
    if n == 0:
        raise ValueError("an estimate needs at least one prediction")
    mean = float(p.mean())
    half = z * math.sqrt(float((p * (1.0 - p)).sum())) / n
    return Estimate(n, mean, max(0.0, mean - half), min(1.0, mean + half))


@dataclass(frozen=True)
class AccuracyEstimate:
    """The estimate over a window, overall and per predicted label."""

    overall: Estimate
    by_label: dict[str, Estimate] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"overall": asdict(self.overall),
                "by_label": {label: asdict(e) for label, e in self.by_label.items()}}


def estimate_accuracy(
    labels: Sequence[str], confidences: Sequence[float] | np.ndarray, z: float = Z_95
) -> AccuracyEstimate | None:
    """Estimated accuracy of predictions with served ``labels`` and calibrated ``confidences``;
    ``None`` for no predictions."""
    p = np.asarray(confidences, dtype=np.float64)
    if len(p) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(p)} confidences")
    if len(p) == 0:
        return None
    rows: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        rows.setdefault(label, []).append(i)
    return AccuracyEstimate(
        estimate(p, z), {label: estimate(p[idx], z) for label, idx in sorted(rows.items())}
    )
