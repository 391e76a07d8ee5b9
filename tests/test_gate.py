"""The champion/challenger gate's decisions, on a real trained version (no server)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.training.head import ClassifierHead
from adapters.training.retrain import decide, holdout_mask
from adapters.training.pipeline import version_data, version_head
from refit.settings import RefitSettings


@pytest.fixture(scope="module")
def champion(trained_registry):
    version = trained_registry.current()
    splits, embeddings = version_data(version)
    return version, splits, embeddings


def judge(champion, challenger, labels, holdout_vectors, holdout_labels, force=False, **settings):
    version, splits, embeddings = champion
    return decide(
        champion=version,
        champion_test_embeddings=embeddings["test"],
        champion_holdout_embeddings=holdout_vectors,
        holdout_labels=holdout_labels,
        champion_test_labels=list(splits.test.labels),
        champion_texts=list(splits.test.texts) + ["x"] * len(holdout_labels),
        challenger=challenger,
        labels=labels,
        challenger_test_embeddings=np.concatenate([embeddings["test"], holdout_vectors]),
        new_labels=sorted(set(labels) - set(version.labels)),
        settings=RefitSettings(**settings),
        force=force,
    )


def test_an_equal_challenger_passes(champion):
    version = champion[0]
    empty = np.zeros((0, 384), dtype=np.float32)
    gate = judge(champion, version_head(version), version.labels, empty, [])
    assert gate["passed"] and gate["promote"] and not gate["forced"]
    assert gate["challenger"]["old_classes_accuracy"] == gate["champion"]["old_classes_accuracy"]
    assert gate["challenger"]["new_classes_accuracy"] is None


def test_a_worse_challenger_is_rejected_unless_forced(champion):
    version = champion[0]
    torch.manual_seed(0)
    random_head = ClassifierHead(384, len(version.labels), 0, 0.0).eval()
    empty = np.zeros((0, 384), dtype=np.float32)
    gate = judge(champion, random_head, version.labels, empty, [])
    assert not gate["passed"] and not gate["promote"]
    assert "accuracy on the old classes fell" in gate["reason"]
    forced = judge(champion, random_head, version.labels, empty, [], force=True)
    assert forced["promote"] and forced["forced"] and not forced["passed"]


def test_new_classes_must_reach_the_minimum_and_be_verifiable(champion):
    version, splits, embeddings = champion
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
    gate = judge(champion, grown, labels, vectors, ["gift_card"] * 3)
    assert gate["challenger"]["per_new_class_accuracy"] == {"gift_card": 0.0}
    assert not gate["promote"] and "below the minimum" in gate["reason"]
    assert judge(champion, grown, labels, vectors, ["gift_card"] * 3, gate_min_new_class_accuracy=0.0)["promote"]
    # A new class with no held-out example cannot be verified.
    unverified = judge(champion, grown, labels, np.zeros((0, 384), np.float32), [])
    assert not unverified["promote"] and "no held-out feedback" in unverified["reason"]


def test_holdout_is_per_label_stable_and_keeps_singletons_for_training():
    ids = list(range(1, 41))
    labels = ["a"] * 20 + ["b"] * 19 + ["c"]
    mask = holdout_mask(ids, labels, 0.2)
    assert mask[:20].sum() == 4 and mask[20:39].sum() == 4 and not mask[39]
    # More feedback later: items held out before stay held out.
    grown = holdout_mask(ids + [41, 42], labels + ["a", "a"], 0.2)
    assert (grown[:40] & mask).sum() >= 7
