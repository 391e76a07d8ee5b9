"""The review queue's strategies (adapters/serving/review.py): numpy only, no I/O."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.serving.review import diverse_picks, kmeans, rank, top_two_margin


def test_margin_is_the_gap_between_the_two_most_probable_labels():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.45, 0.15], [1 / 3, 1 / 3, 1 / 3]], dtype=np.float32)
    assert top_two_margin(p) == pytest.approx([0.5, 0.05, 0.0], abs=1e-6)
    assert top_two_margin(np.ones((2, 1))).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        top_two_margin(np.ones(3))


def test_rank_is_ascending_and_stable():
    assert rank(np.array([0.5, 0.1, 0.5, 0.0])).tolist() == [3, 1, 0, 2]


def blobs(rng: np.random.Generator, centres: int, per: int, spread: float) -> np.ndarray:
    middle = rng.normal(size=(centres, 16)) * 5
    return np.concatenate([c + rng.normal(size=(per, 16)) * spread for c in middle])


def test_kmeans_finds_well_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    x = blobs(rng, 4, 25, 0.1)
    assignment = kmeans(x, 4, seed=1)
    for blob in range(4):
        assert len(set(assignment[blob * 25:(blob + 1) * 25].tolist())) == 1
    assert len(set(assignment.tolist())) == 4
    assert np.array_equal(assignment, kmeans(x, 4, seed=1))
    assert kmeans(x[:3], 10, seed=0).max() <= 2  # never more clusters than rows


def test_diverse_takes_the_least_confident_of_each_cluster():
    rng = np.random.default_rng(0)
    x = blobs(rng, 3, 10, 0.05)
    confidence = rng.uniform(0.1, 0.2, size=30)
    confidence[:10] -= 0.1  # the first blob is the least confident: uncertainty takes only it
    picks = diverse_picks(x, confidence, 3, seed=0)
    assert sorted(int(p) // 10 for p in picks) == [0, 1, 2]  # one from each blob
    for p in picks:
        blob = slice(p // 10 * 10, p // 10 * 10 + 10)
        assert confidence[p] == confidence[blob].min()
    assert confidence[picks].tolist() == sorted(confidence[picks].tolist())
    assert set(rank(confidence)[:3].tolist()) <= set(range(10))


def test_diverse_fills_up_when_there_are_fewer_clusters_than_picks():
    x = np.repeat(np.eye(4)[:2], 5, axis=0)  # two distinct points, five copies each
    confidence = np.linspace(0.1, 0.9, 10)
    picks = diverse_picks(x, confidence, 4, seed=0)
    assert len(set(picks.tolist())) == 4
    assert diverse_picks(x, confidence, 0).tolist() == []
    assert len(diverse_picks(x[:2], confidence[:2], 5)) == 2
