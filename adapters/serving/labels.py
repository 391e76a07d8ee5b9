"""Which labels have enough evidence to train on: active or pending (torch-free, pure).

A label the serving model knows is active. A label only feedback has given is pending until
feedback has given it ``min_examples`` times (``REFIT_LABEL_MIN_EXAMPLES``): one typo'd or
one-off label must not become a class, nor block a retrain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LabelState = Literal["active", "pending"]


@dataclass(frozen=True)
class LabelStatus:
    label: str
    status: LabelState
    reason: str
    training_examples: int
    """Examples of the label in the serving version's training split."""
    feedback_count: int
    """Feedback items that give the label."""


def label_statuses(
    model_labels: list[str],
    training_counts: dict[str, int],
    feedback_counts: dict[str, int],
    min_examples: int,
) -> list[LabelStatus]:
    """The status of every label the model knows or feedback gives, sorted by label."""
    known = set(model_labels)
    statuses = []
    for label in sorted(known | set(feedback_counts)):
        given = feedback_counts.get(label, 0)
        trained = training_counts.get(label, 0)
        if label in known:
            status: LabelState = "active"
            reason = "the serving model knows this label"
        elif given >= min_examples:
            status = "active"
            reason = f"feedback gives it {given} times (at least {min_examples} needed)"
        else:
            status = "pending"
            reason = (
                f"new label with {given} feedback item{'s' if given != 1 else ''}; "
                f"it is trained on once feedback gives it {min_examples} times"
            )
        statuses.append(LabelStatus(label, status, reason, trained, given))
    return statuses
