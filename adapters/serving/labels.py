"""Which labels a model may learn: active labels, and pending ones with too little evidence.

A label the model already knows (it is in the model's labels or its training data) is active. A
label that only feedback has given is active once feedback has given it ``min_examples`` times;
before that it is *pending*: its feedback is stored, shown and counted, but no retrain trains on
it and no retrain is held back by it. One example of a new label is not enough to learn a class
from, and weighting it up to the size of the others lets it cost every other class accuracy.

Torch-free: the retrain job and ``GET /labels`` both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LabelState = Literal["active", "pending"]


@dataclass(frozen=True)
class LabelStatus:
    """One label's status, and why."""

    label: str
    status: LabelState
    reason: str
    training_examples: int
    """Examples of the label in the model's training data."""
    feedback_count: int
    """Feedback items that give the label."""


def label_statuses(
    model_labels: list[str],
    training_counts: dict[str, int],
    feedback_counts: dict[str, int],
    min_examples: int,
    max_new: int | None = None,
) -> list[LabelStatus]:
    """The status of every label the model or the feedback knows, sorted by label.

    ``training_counts`` counts the model's training examples per label, ``feedback_counts`` the
    feedback items per label, and ``min_examples`` is how many feedback items a label the model
    does not know needs before it is trained on (``REFIT_LABEL_MIN_EXAMPLES``). At most
    ``max_new`` new labels are active at once (``REFIT_RETRAIN_MAX_NEW_LABELS``): those with the
    most feedback; the others wait, pending, so that no single burst of feedback can add an
    unbounded number of classes in one retrain.
    """
    known = set(model_labels) | {label for label, n in training_counts.items() if n > 0}
    eligible = sorted(
        (label for label, n in feedback_counts.items() if label not in known and n >= min_examples),
        key=lambda label: (-feedback_counts[label], label),
    )
    over_cap = set(eligible[max_new:]) if max_new is not None else set()
    statuses = []
    for label in sorted(known | set(feedback_counts)):
        trained = int(training_counts.get(label, 0))
        given = int(feedback_counts.get(label, 0))
        if label in known:
            status: LabelState = "active"
            reason = "known to the model"
            if trained:
                reason += f" ({trained} training example{'s' if trained != 1 else ''})"
        elif label in over_cap:
            status = "pending"
            reason = (
                f"new label with {given} feedback examples, but a retrain adds at most "
                f"{max_new} new labels and {max_new} others have more feedback"
            )
        elif given >= min_examples:
            status = "active"
            reason = (
                f"new label with {given} feedback examples "
                f"(at least {min_examples} are needed)"
            )
        else:
            status = "pending"
            reason = (
                f"new label with only {given} feedback example{'s' if given != 1 else ''}; "
                f"it is trained on once it has {min_examples}"
            )
        statuses.append(LabelStatus(label, status, reason, trained, given))
    return statuses
