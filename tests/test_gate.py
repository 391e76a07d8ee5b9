"""The champion/challenger gate: its statistics, and its decisions on a real trained version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.training.gate import (
    GateRules,
    HeldOutPredictions,
    judge,
    paired_difference_interval,
    wilson_interval,
)
from adapters.training.head import ClassifierHead, head_probabilities
from adapters.training.pipeline import version_data, version_head
from adapters.training.retrain import holdout_mask, latest_per_prediction
from refit.settings import RefitSettings
from refit.store import StoredFeedback

DEFAULT_RULES = GateRules.from_settings(RefitSettings())


def test_wilson_interval_matches_known_values():
    # Reference values from the closed form (Wilson 1927), z = 1.96.
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # Narrower with more data, around the same proportion.
    assert np.ptp(wilson_interval(800, 1000)) < np.ptp(wilson_interval(80, 100))


def test_paired_difference_interval_is_centred_and_honest_with_few_discordant_items():
    low, high = paired_difference_interval(0, 0, 80)
    assert low < 0 < high and low == pytest.approx(-high)
    # 3 items lost and none won of 80: could be chance (exact McNemar p = 0.25).
    low, high = paired_difference_interval(3, 0, 80)
    assert low < 0 < high
    # 12 lost, none won: a real loss.
    assert paired_difference_interval(12, 0, 80)[1] < 0
    assert paired_difference_interval(0, 12, 80)[0] > 0


def predictions(truth: list[str], champion_wrong: set[int], challenger_wrong: set[int]):
    def predict(wrong: set[int]) -> list[str]:
        return ["other" if i in wrong else label for i, label in enumerate(truth)]

    return HeldOutPredictions(truth, predict(champion_wrong), predict(challenger_wrong))


def test_a_loss_within_noise_passes_and_a_real_loss_is_rejected():
    truth = ["a", "b"] * 40  # 80 old-class items
    # 3 more mistakes than the champion (3.75 points, beyond the 2-point tolerance) but noise.
    noisy = judge(predictions(truth, {0, 1}, {0, 1, 2, 3, 4}), "v1", ["a", "b"], [], DEFAULT_RULES)
    assert noisy["passed"], noisy
    old = noisy["old_classes"]
    assert old["examples"] == 80
    assert old["champion"]["accuracy"] == pytest.approx(78 / 80)
    assert old["challenger"]["accuracy"] == pytest.approx(75 / 80)
    assert old["difference"]["champion_only_correct"] == 3
    assert old["difference"]["ci"][0] < 0 < old["difference"]["ci"][1]
    assert old["champion"]["ci"][0] < 78 / 80 < old["champion"]["ci"][1]

    lost = set(range(14))
    real = judge(predictions(truth, set(), lost), "v1", ["a", "b"], [], DEFAULT_RULES)
    assert not real["passed"] and not real["promote"]
    assert (
        "accuracy on the old classes fell" in real["reason"] and "not by chance" in real["reason"]
    )
    assert real["old_classes"]["difference"]["ci"][1] < 0


def test_a_significant_loss_within_tolerance_passes():
    truth = ["a"] * 5000
    # 1.5 points lost on 5000 items: certainly real, but within the 2-point tolerance.
    gate = judge(predictions(truth, set(), set(range(75))), "v1", ["a"], [], DEFAULT_RULES)
    assert gate["old_classes"]["difference"]["ci"][1] < 0
    assert gate["passed"]


@pytest.fixture(scope="module")
def champion(trained_registry):
    version = trained_registry.current()
    splits, embeddings = version_data(version)
    return version, splits, embeddings


def judge_heads(
    champion, challenger, labels, holdout_vectors, holdout_labels, force=False, **settings
):
    """The gate on the champion's test split plus held-out items, as the retrain job runs it."""
    version, splits, embeddings = champion
    truth = list(splits.test.labels) + holdout_labels
    inputs = np.concatenate([embeddings["test"], holdout_vectors])
    champion_pred = head_probabilities(version_head(version), inputs).argmax(axis=1)
    challenger_pred = head_probabilities(challenger, inputs).argmax(axis=1)
    held_out = HeldOutPredictions(
        truth,
        [version.labels[i] for i in champion_pred],
        [labels[i] for i in challenger_pred],
    )
    new_labels = sorted(set(labels) - set(version.labels))
    rules = GateRules.from_settings(RefitSettings(**settings))
    return judge(held_out, version.name, version.labels, new_labels, rules, force)


def test_an_equal_challenger_passes(champion):
    version = champion[0]
    empty = np.zeros((0, 384), dtype=np.float32)
    gate = judge_heads(champion, version_head(version), version.labels, empty, [])
    assert gate["passed"] and gate["promote"] and not gate["forced"]
    assert gate["challenger"]["old_classes_accuracy"] == gate["champion"]["old_classes_accuracy"]
    assert gate["old_classes"]["difference"]["value"] == 0
    assert gate["challenger"]["new_classes_accuracy"] is None
    assert gate["old_classes"]["examples"] == len(champion[1].test)


def test_a_worse_challenger_is_rejected_unless_forced(champion):
    version = champion[0]
    torch.manual_seed(0)
    random_head = ClassifierHead(384, len(version.labels), 0, 0.0).eval()
    empty = np.zeros((0, 384), dtype=np.float32)
    gate = judge_heads(champion, random_head, version.labels, empty, [])
    assert not gate["passed"] and not gate["promote"]
    assert "accuracy on the old classes fell" in gate["reason"]
    forced = judge_heads(champion, random_head, version.labels, empty, [], force=True)
    assert forced["promote"] and forced["forced"] and not forced["passed"]


def test_new_classes_must_reach_the_minimum_and_be_verifiable(champion):
    version, _splits, embeddings = champion
    labels = sorted(version.labels + ["gift_card"])
    grown = ClassifierHead(384, len(labels), 0, 0.0).eval()
    old = version_head(version)
    with torch.no_grad():
        grown.center.copy_(old.center)
        grown.scale.copy_(old.scale)
        rows = torch.tensor([labels.index(label) for label in version.labels])
        grown.net[-1].weight.zero_()
        grown.net[-1].bias.fill_(-50.0)
        grown.net[-1].weight[rows] = old.net[-1].weight
        grown.net[-1].bias[rows] = old.net[-1].bias
    vectors = embeddings["test"][:3]
    # The grown head never predicts gift_card: 0 on the new class.
    gate = judge_heads(champion, grown, labels, vectors, ["gift_card"] * 3)
    assert gate["challenger"]["per_new_class_accuracy"] == {"gift_card": 0.0}
    per_class = gate["new_classes"]["per_class"]["gift_card"]
    assert per_class["examples"] == 3 and per_class["ci"][0] == 0.0 and per_class["ci"][1] < 0.6
    assert not gate["promote"] and "below the minimum" in gate["reason"]
    assert judge_heads(champion, grown, labels, vectors, ["gift_card"] * 3,
                       gate_min_new_class_accuracy=0.0)["promote"]
    # A new class with no held-out example cannot be verified.
    unverified = judge_heads(champion, grown, labels, np.zeros((0, 384), np.float32), [])
    assert not unverified["promote"] and "no held-out feedback" in unverified["reason"]


def test_holdout_is_per_label_stable_and_keeps_singletons_for_training():
    ids = list(range(1, 41))
    labels = ["a"] * 20 + ["b"] * 19 + ["c"]
    mask = holdout_mask(ids, labels, 0.2)
    assert mask[:20].sum() == 4 and mask[20:39].sum() == 4 and not mask[39]
    # More feedback later: items held out before stay held out.
    grown = holdout_mask(ids + [41, 42], labels + ["a", "a"], 0.2)
    assert (grown[:40] & mask).sum() >= 7


def test_the_latest_label_for_a_prediction_wins():
    def item(id_: int, prediction_id: str | None, label: str) -> StoredFeedback:
        return StoredFeedback(id_, 0.0, prediction_id, "t", label, None, None, None, None)

    rows = [item(1, "p1", "a"), item(2, None, "b"), item(3, "p1", "c"), item(4, None, "b")]
    assert [(r.id, r.label) for r in latest_per_prediction(rows)] == [(2, "b"), (3, "c"), (4, "b")]
