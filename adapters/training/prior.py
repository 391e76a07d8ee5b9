"""Prior correction of a fitted head: logit adjustment, its strength chosen on held-out data.

A head trained on uneven classes learns their frequencies: its logits carry ``log π_k``, the
training prior of class ``k``, and its decisions lean towards frequent classes. Subtracting
``τ · log π_k`` from each logit (Menon et al., "Long-tail learning via logit adjustment", ICLR
2021) removes that lean: ``τ = 1`` is the correction that is optimal for balanced error (every
class counting alike, as macro-F1 counts them), ``τ = 0`` leaves the head as trained. Where the
classes are even, every ``τ`` gives the same decisions.

Unlike class weighting in the loss, the correction moves the decision boundaries even where the
training data is separable (at a large ``C`` the weights of the loss barely matter there), and it
costs no refit: the strength is chosen on the held-out logits the search already has (the
validation split, or out-of-fold logits under cross-validation), by the same selection score as
everything else (the mean of accuracy and macro-F1), ties going to the weaker correction. It is
then folded into the head's output bias, so the exported model carries it and nothing changes at
serving time (:func:`adapters.training.head.correct_for_prior`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters.serving.evaluation import macro_f1
from adapters.training.head import prior_offsets, selection_score

STRENGTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
"""The values of ``τ`` tried: from none to the balanced-error correction."""


@dataclass(frozen=True)
class HeldOut:
    """Held-out log-probabilities of one configuration, the classes they belong to, and the
    class counts of the data each row's model was trained on (one row per held-out example)."""

    log_probabilities: np.ndarray
    y: np.ndarray
    training_counts: np.ndarray

    @classmethod
    def of_parts(
        cls, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int
    ) -> HeldOut:
        """From ``(log-probabilities, labels, training labels)`` of one model per part: one part
        for a validation split, one per fold under cross-validation."""
        return cls(
            np.concatenate([log_p for log_p, _, _ in parts]),
            np.concatenate([y for _, y, _ in parts]),
            np.concatenate([np.tile(np.bincount(y_train, minlength=num_classes), (len(y), 1))
                            for _, y, y_train in parts]),
        )


def choose_strength(held_out: HeldOut, num_classes: int) -> tuple[float, list[dict[str, Any]]]:
    """The strength with the best selection score on ``held_out`` (ties: the weaker one), and the
    score of every strength tried, for the manifest."""
    trials: list[dict[str, Any]] = []
    best, best_score = 0.0, -np.inf
    for strength in STRENGTHS:
        predicted = (held_out.log_probabilities
                     + prior_offsets(held_out.training_counts, strength)).argmax(axis=1)
        accuracy = float((predicted == held_out.y).mean())
        f1 = macro_f1(held_out.y, predicted, num_classes)
        score = selection_score(accuracy, f1)
        trials.append({"strength": strength, "score": round(score, 6),
                       "accuracy": round(accuracy, 6), "macro_f1": round(f1, 6)})
        if round(score, 9) > round(best_score, 9):
            best, best_score = strength, score
    return best, trials
