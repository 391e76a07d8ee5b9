"""Which labels a retrain learns: active labels, and pending ones with too little evidence."""

from __future__ import annotations

import dataclasses

import pytest

from adapters.serving.labels import LabelStatus, label_statuses
from refit.settings import RefitSettings


def test_labels_the_model_knows_are_active_whatever_the_feedback():
    statuses = label_statuses(["a", "b"], {"a": 40, "b": 35}, {"a": 1}, min_examples=5)
    assert [s.label for s in statuses] == ["a", "b"]
    assert all(s.status == "active" for s in statuses)
    assert statuses[0] == LabelStatus("a", "active", statuses[0].reason, 40, 1)
    assert (
        "known to the model" in statuses[0].reason and "40 training examples" in statuses[0].reason
    )


def test_a_new_label_is_pending_until_feedback_gives_it_min_examples_times():
    statuses = {s.label: s for s in label_statuses(
        ["a"], {"a": 40}, {"a": 3, "gift_card": 5, "shipping_question": 1, "typo": 4},
        min_examples=5,
    )}
    assert statuses["gift_card"].status == "active"
    assert "5 feedback examples" in statuses["gift_card"].reason
    assert statuses["shipping_question"].status == "pending"
    assert statuses["shipping_question"].reason == (
        "new label with only 1 feedback example; it is trained on once it has 5"
    )
    assert statuses["typo"].status == "pending" and statuses["typo"].feedback_count == 4
    assert statuses["typo"].training_examples == 0
    # The threshold is the setting's.
    assert label_statuses(["a"], {}, {"typo": 4}, min_examples=4)[1].status == "active"


def test_status_is_immutable_and_the_setting_defaults_to_5():
    status = label_statuses([], {}, {"x": 1}, min_examples=5)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.status = "active"  # type: ignore[misc]
    assert RefitSettings().label_min_examples == 5
    assert RefitSettings(label_min_examples=2).label_min_examples == 2


def test_the_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("REFIT_LABEL_MIN_EXAMPLES", "3")
    assert RefitSettings().label_min_examples == 3
    monkeypatch.setenv("REFIT_LABEL_MIN_EXAMPLES", "0")
    from refit.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="REFIT_LABEL_MIN_EXAMPLES"):
        load_settings()


def test_at_most_max_new_labels_are_active_the_rest_wait():
    from adapters.serving.labels import label_statuses

    feedback = {"a": 9, "b": 7, "c": 7, "d": 5, "e": 2}
    statuses = {s.label: s for s in label_statuses(["x"], {"x": 10}, feedback, 5, max_new=2)}
    assert [lab for lab, s in statuses.items() if s.status == "active"] == ["a", "b", "x"]
    assert statuses["c"].status == "pending" and "at most 2 new labels" in statuses["c"].reason
    assert statuses["d"].status == "pending"
    assert statuses["e"].status == "pending" and "only 2" in statuses["e"].reason
    unlimited = label_statuses(["x"], {"x": 10}, feedback, 5)
    assert sum(s.status == "active" for s in unlimited) == 5
