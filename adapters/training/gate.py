"""The champion/challenger gate: is the retrained model (challenger) fit to replace the serving one?

Both models are judged on the same held-out items (paired): the champion's test split plus the
held-out feedback. Items whose true label the champion knows are "old-class" items; the others
belong to classes new to the challenger.

The rule (stated in the README's "Learning from feedback"):

- **Old classes.** Let ``n`` be the old-class items, ``b`` those only the champion gets right and
  ``c`` those only the challenger gets right; the accuracy difference is ``(c - b) / n``. The
  challenger is rejected if it is worse by more than the tolerance **and** the whole confidence
  interval of the difference (Bonett-Price adjusted Wald interval for paired proportions) lies
  below zero: a loss must be both large enough to matter and too large to be noise.
- **New classes.** The challenger's accuracy on held-out feedback of new classes (all new classes
  together) must reach the minimum. A new class without any held-out item cannot be verified and
  blocks promotion.

Every accuracy is reported with its sample size and a Wilson confidence interval. Pure numpy: the
decision does not depend on how the predictions were made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from refit.settings import RefitSettings

CONFIDENCE = 0.95


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when there is nothing to judge."""
    if n <= 0:
        return (0.0, 1.0)
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(
    champion_only: int, challenger_only: int, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Interval of (challenger accuracy - champion accuracy) over ``n`` paired items.

    ``champion_only`` items only the champion gets right, ``challenger_only`` the reverse. The
    Bonett-Price (2012) adjusted Wald interval: add one to each discordant count and two to ``n``,
    which keeps its coverage close to nominal even with a handful of discordant items (the plain
    Wald interval collapses to a point when there are none).
    """
    if n <= 0:
        return (-1.0, 1.0)
    z = _z(confidence)
    p_champion = (champion_only + 1) / (n + 2)
    p_challenger = (challenger_only + 1) / (n + 2)
    difference = p_challenger - p_champion
    half = z * math.sqrt(max(0.0, p_champion + p_challenger - difference**2) / (n + 2))
    return (max(-1.0, difference - half), min(1.0, difference + half))


@dataclass(frozen=True)
class GateRules:
    """The gate's thresholds (from ``REFIT_GATE_*``)."""

    tolerance: float
    """Accuracy on old classes the challenger may lose (point estimate) before a loss can count."""
    min_new_class_accuracy: float
    confidence: float = CONFIDENCE

    @classmethod
    def from_settings(cls, settings: RefitSettings) -> GateRules:
        return cls(settings.gate_tolerance, settings.gate_min_new_class_accuracy)

    def describe(self) -> str:
        level = f"{self.confidence:.0%}"
        return (
            f"rejected if accuracy on the old classes falls by more than {self.tolerance} and the "
            f"{level} confidence interval of the paired difference lies below 0, or if accuracy "
            f"on held-out feedback of new classes is below {self.min_new_class_accuracy}"
        )


@dataclass(frozen=True)
class HeldOutPredictions:
    """The held-out items, with each model's predicted label for each (same order)."""

    truth: list[str]
    champion: list[str]
    challenger: list[str]

    def __post_init__(self) -> None:
        if not len(self.truth) == len(self.champion) == len(self.challenger):
            raise ValueError("truth and predictions differ in length")


def _score(correct: np.ndarray, confidence: float) -> dict[str, Any]:
    n = int(correct.size)
    hits = int(correct.sum())
    low, high = wilson_interval(hits, n, confidence)
    return {
        "accuracy": round(hits / n, 6) if n else None,
        "examples": n,
        "ci": [round(low, 6), round(high, 6)],
    }


def judge(
    held_out: HeldOutPredictions,
    champion_version: str,
    champion_labels: list[str],
    new_labels: list[str],
    rules: GateRules,
    force: bool = False,
) -> dict[str, Any]:
    """The gate's decision and the evidence for it, as recorded in the manifest and job result."""
    truth = np.array(held_out.truth, dtype=object)
    champion = np.array(held_out.champion, dtype=object)
    challenger = np.array(held_out.challenger, dtype=object)
    is_old = np.isin(truth, np.array(champion_labels, dtype=object))
    champion_right = (champion == truth) & is_old
    challenger_right = challenger == truth

    n_old = int(is_old.sum())
    champion_only = int((champion_right & ~challenger_right & is_old).sum())
    challenger_only = int((challenger_right & ~champion_right & is_old).sum())
    old_champion = _score(champion_right[is_old], rules.confidence)
    old_challenger = _score(challenger_right[is_old], rules.confidence)
    low, high = paired_difference_interval(champion_only, challenger_only, n_old, rules.confidence)
    difference = (challenger_only - champion_only) / n_old if n_old else 0.0

    new_mask = np.isin(truth, np.array(new_labels, dtype=object))
    new_score = _score(challenger_right[new_mask], rules.confidence)
    per_new = {label: _score(challenger_right[truth == label], rules.confidence)
               for label in new_labels}
    unverifiable = [label for label, score in per_new.items() if score["examples"] == 0]

    reasons: list[str] = []
    if n_old and difference < -rules.tolerance and high < 0:
        reasons.append(
            f"accuracy on the old classes fell from {old_champion['accuracy']:.4f} to "
            f"{old_challenger['accuracy']:.4f} on {n_old} items, by more than the tolerance "
            f"{rules.tolerance}, and not by chance ({rules.confidence:.0%} interval of the "
            f"difference [{low:.4f}, {high:.4f}])"
        )
    new_accuracy = new_score["accuracy"]
    if new_accuracy is not None and new_accuracy < rules.min_new_class_accuracy:
        reasons.append(
            f"accuracy on new classes {new_accuracy:.4f} ({new_score['examples']} held-out items) "
            f"is below the minimum {rules.min_new_class_accuracy}"
        )
    if unverifiable:
        reasons.append(
            "no held-out feedback to verify new class(es) " + ", ".join(unverifiable)
        )
    passed = not reasons
    if passed:
        reason = "no real loss on the old classes"
        if new_labels:
            reason += "; new classes good enough"
    else:
        reason = "; ".join(reasons)
    return {
        "promote": passed or force,
        "passed": passed,
        "forced": force and not passed,
        "reason": reason,
        "rule": rules.describe(),
        "tolerance": rules.tolerance,
        "min_new_class_accuracy": rules.min_new_class_accuracy,
        "confidence": rules.confidence,
        "old_classes": {
            "examples": n_old,
            "champion": old_champion,
            "challenger": old_challenger,
            "difference": {
                "value": round(difference, 6),
                "ci": [round(low, 6), round(high, 6)],
                "champion_only_correct": champion_only,
                "challenger_only_correct": challenger_only,
            },
        },
        "new_classes": {"challenger": new_score, "per_class": per_new},
        # The headline numbers, flat (as before the paired gate).
        "champion": {"version": champion_version, "old_classes_accuracy": old_champion["accuracy"]},
        "challenger": {
            "old_classes_accuracy": old_challenger["accuracy"],
            "new_classes_accuracy": new_accuracy,
            "per_new_class_accuracy": {label: s["accuracy"] for label, s in per_new.items()},
        },
        "examples": {"old_classes": n_old, "new_classes": new_score["examples"]},
    }
