"""The feedback memory: lookup, thresholds, pruning, removal, calibration, following the store."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from adapters.serving.memory import (
    DEFAULT_NEW_LABEL_THRESHOLD,
    DEFAULT_THRESHOLD,
    THRESHOLD_FLOOR,
    FeedbackChange,
    FeedbackFollower,
    FeedbackMemory,
    calibrate_threshold,
    prune_to_mistakes,
    rebuilt_memory,
)

ROOT = Path(__file__).resolve().parent.parent


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def near(vector: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly ``cosine`` similarity to the unit ``vector``."""
    noise = rng.standard_normal(vector.shape).astype(np.float32)
    noise -= noise @ vector * vector
    noise /= np.linalg.norm(noise)
    return unit(cosine * vector + np.sqrt(1 - cosine**2) * noise)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_lookup_answers_with_the_nearest_entry_above_its_threshold(rng):
    base = unit(rng.standard_normal((3, 384)))
    memory = FeedbackMemory(threshold=0.9, new_label_threshold=0.7, known_labels={"a", "b"})
    memory.add([10, 11, 12], base, ["a", "b", "new"])
    queries = np.stack([
        near(base[0], 0.95, rng),  # known label, close enough
        near(base[1], 0.85, rng),  # known label, not close enough: the model answers
        near(base[2], 0.75, rng),  # new label: its lower threshold applies
        near(base[2], 0.6, rng),   # new label, too far
    ])
    matches = memory.lookup(queries)
    assert matches.labels == ["a", None, "new", None]
    assert matches.feedback_ids.tolist() == [10, -1, 12, -1]
    assert matches.answered.tolist() == [True, False, True, False]
    np.testing.assert_allclose(matches.similarity, [0.95, 0.85, 0.75, 0.6], atol=1e-5)


def test_an_empty_memory_never_answers(rng):
    matches = FeedbackMemory().lookup(unit(rng.standard_normal((2, 384))))
    assert matches.labels == [None, None]
    assert matches.feedback_ids.tolist() == [-1, -1]


def test_a_repeated_text_gets_its_label_at_the_default_thresholds(rng):
    vector = unit(rng.standard_normal(384))
    memory = FeedbackMemory(known_labels={"a"})
    memory.add([1], vector[None], ["a"])
    assert memory.lookup(vector[None]).labels == ["a"]
    assert DEFAULT_NEW_LABEL_THRESHOLD < DEFAULT_THRESHOLD


def test_a_farther_new_label_never_overrides_a_nearer_known_one(rng):
    base = unit(rng.standard_normal(384))
    query = near(base, 0.8, rng)
    memory = FeedbackMemory(threshold=0.9, new_label_threshold=0.7, known_labels={"a"})
    memory.add([1, 2], np.stack([base, near(query, 0.75, rng)]), ["a", "new"])
    # Nearest is "a" at 0.8 < 0.9: no answer, although "new" at 0.75 clears its own threshold.
    assert memory.lookup(query[None]).labels == [None]


def test_weighted_vote_lets_several_close_entries_outvote_the_nearest(rng):
    base = unit(rng.standard_normal(384))
    query = near(base, 0.97, rng)
    entries = np.stack([near(query, 0.96, rng), near(query, 0.95, rng), near(query, 0.94, rng)])
    nearest_only = FeedbackMemory(threshold=0.9, known_labels={"a", "b"})
    voting = FeedbackMemory(threshold=0.9, known_labels={"a", "b"}, neighbours=3)
    for memory in (nearest_only, voting):
        memory.add([1, 2, 3], entries, ["a", "b", "b"])
    assert nearest_only.lookup(query[None]).labels == ["a"]
    assert voting.lookup(query[None]).labels == ["b"]


def test_adding_an_existing_id_relabels_it_and_remove_deletes(rng):
    vectors = unit(rng.standard_normal((3, 384)))
    memory = FeedbackMemory(known_labels={"a", "b"})
    memory.add([1, 2, 3], vectors, ["a", "a", "a"])
    memory.add([2], vectors[1:2], ["b"])
    assert len(memory) == 3
    assert memory.lookup(vectors).labels == ["a", "b", "a"]
    assert memory.remove([1, 99]) == 1
    assert memory.lookup(vectors).labels == [None, "b", "a"]
    assert sorted(memory.ids.tolist()) == [2, 3]


def test_add_grows_past_its_capacity_and_keeps_every_entry(rng):
    vectors = unit(rng.standard_normal((300, 384)))
    memory = FeedbackMemory(known_labels={"x"})
    for start in range(0, 300, 7):
        memory.add(list(range(start, min(start + 7, 300))), vectors[start : start + 7],
                   ["x"] * len(vectors[start : start + 7]))
    assert len(memory) == 300
    assert memory.lookup(vectors).feedback_ids.tolist() == list(range(300))


def test_add_rejects_mismatched_lengths(rng):
    with pytest.raises(ValueError, match="same length"):
        FeedbackMemory().add([1, 2], unit(rng.standard_normal((1, 384))), ["a", "b"])


def test_prune_keeps_only_what_the_new_head_gets_wrong(rng):
    vectors = unit(rng.standard_normal((4, 384)))
    memory = FeedbackMemory(known_labels={"a", "b", "c"})
    memory.add([1, 2, 3, 4], vectors, ["a", "b", "c", "a"])
    ids = memory.ids
    # Added after the head predicted: the head never saw it, so it stays.
    memory.add([5], unit(rng.standard_normal((1, 384))), ["c"])
    removed = prune_to_mistakes(memory, ids, ["a", "a", "c", "b"])
    assert removed == 2
    assert sorted(memory.ids.tolist()) == [2, 4, 5]


def test_retain_only_rejects_a_mask_longer_than_the_memory(rng):
    memory = FeedbackMemory()
    memory.add([1], unit(rng.standard_normal((1, 384))), ["a"])
    with pytest.raises(ValueError, match="mask"):
        memory.retain_only(np.ones(2, dtype=bool))


def test_lookup_sees_a_consistent_state_while_a_writer_adds_and_removes(rng):
    vectors = unit(rng.standard_normal((400, 384)))
    memory = FeedbackMemory(known_labels={"x"})
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            memory.add([i], vectors[i % 400][None], ["x"])
            if i % 5 == 0:
                memory.remove([i - 3])
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(300):
            matches = memory.lookup(vectors[:16])
            # Every answer names an id that was added with exactly that vector.
            for row, fid in enumerate(matches.feedback_ids.tolist()):
                if fid >= 0:
                    assert fid % 400 == row
    finally:
        stop.set()
        writer.join()


# -- calibration ---------------------------------------------------------------------------------


def clustered_feedback(rng: np.random.Generator, per_cluster: int = 20):
    """Tight clusters whose members share a label (pairwise similarity ≈ 0.94), plus stray items
    whose nearest neighbour (at similarity ≈ 0.86-0.9, above the floor) belongs to another label,
    while the model gets them right."""
    centres = unit(rng.standard_normal((6, 384)))
    names = [f"l{i}" for i in range(6)]
    vectors, labels, predicted = [], [], []
    for centre, name in zip(centres, names, strict=True):
        for _ in range(per_cluster):
            vectors.append(near(centre, 0.97, rng))
            labels.append(name)
            predicted.append(name if rng.random() < 0.7 else "l0")  # the model errs 30% here
    for i in range(40):
        centre = centres[i % 6]
        vectors.append(near(centre, float(rng.uniform(0.89, 0.925)), rng))
        labels.append(names[(i + 1) % 6])
        predicted.append(names[(i + 1) % 6])
    return np.stack(vectors), labels, predicted, names


def test_calibration_does_not_lower_accuracy_where_far_neighbours_are_wrong(rng):
    vectors, labels, predicted, names = clustered_feedback(rng)
    calibration = calibrate_threshold(vectors, labels, predicted, names)
    # Cluster members sit at ≈ 0.94 to each other; the wrong neighbours at ≤ 0.9.
    assert 0.9 < calibration.threshold <= 0.945
    assert calibration.combined_accuracy is not None and calibration.model_accuracy is not None
    assert calibration.combined_accuracy > calibration.model_accuracy
    # Check it independently: memory-or-model at the chosen threshold, leave-one-out.
    memory_correct = 0
    for i in range(len(vectors)):
        others = [j for j in range(len(vectors)) if j != i]
        memory = FeedbackMemory(threshold=calibration.threshold, known_labels=names)
        memory.add(others, vectors[others], [labels[j] for j in others])
        answer = memory.lookup(vectors[i][None]).labels[0]
        memory_correct += (answer if answer is not None else predicted[i]) == labels[i]
    assert memory_correct / len(vectors) == pytest.approx(calibration.combined_accuracy)
    model_only = np.mean(np.array(predicted) == np.array(labels))
    assert memory_correct / len(vectors) >= model_only
    # The case discriminates: at the floor, the memory would answer the strays wrongly.
    at_floor = FeedbackMemory(threshold=THRESHOLD_FLOOR, known_labels=names)
    at_floor.add(list(range(120)), vectors[:120], labels[:120])
    strays = at_floor.lookup(vectors[120:]).labels
    assert sum(a is not None and a != t for a, t in zip(strays, labels[120:], strict=True)) >= 30


def test_calibration_keeps_the_ceiling_when_the_memory_cannot_help(rng):
    vectors, labels, _, names = clustered_feedback(rng)
    calibration = calibrate_threshold(vectors, labels, labels, names)  # a perfect model
    assert calibration.threshold == 0.98
    assert calibration.combined_accuracy == pytest.approx(1.0)


def test_calibration_never_goes_below_the_floor(rng):
    centres = unit(rng.standard_normal((2, 384)))
    # Same-label neighbours at only 0.7: helpful, but below the floor for known labels.
    vectors = np.stack([near(centres[i % 2], 0.84, rng) for i in range(60)])
    labels = [f"l{i % 2}" for i in range(60)]
    calibration = calibrate_threshold(vectors, labels, ["wrong"] * 60, ["l0", "l1", "wrong"])
    assert calibration.threshold >= THRESHOLD_FLOOR


def test_new_labels_get_their_own_lower_threshold(rng):
    centre = unit(rng.standard_normal(384))
    vectors = np.stack([near(centre, 0.85, rng) for _ in range(40)])  # pairwise ≈ 0.72
    labels = ["new"] * 40
    calibration = calibrate_threshold(vectors, labels, ["old"] * 40, ["old"])
    assert calibration.new_label_threshold < 0.75
    assert calibration.combined_accuracy == pytest.approx(1.0)


def test_a_gain_on_new_labels_is_not_bought_with_old_ones(rng):
    # Group A: 20 pairs of a new label at similarity 0.6 (the memory gains 40 below 0.6).
    # Group B: 5 pairs of a new label at 0.8, each member with 6 items of known labels (which
    # the model gets right) at 0.7 to it: below 0.7 the memory would answer them wrongly.
    vectors, labels, predicted = [], [], []
    for _ in range(20):
        a = unit(rng.standard_normal(384))
        vectors += [a, near(a, 0.6, rng)]
        labels += ["new-a", "new-a"]
        predicted += ["k0", "k0"]
    for pair in range(5):
        b = unit(rng.standard_normal(384))
        vectors += [b, near(b, 0.8, rng)] + [near(b, 0.7, rng) for _ in range(6)]
        labels += ["new-b", "new-b"] + [f"k{pair}"] * 6
        predicted += ["k0", "k0"] + [f"k{pair}"] * 6
    known = [f"k{i}" for i in range(5)]
    stacked = np.stack(vectors)
    guarded = calibrate_threshold(stacked, labels, predicted, known)
    unguarded = calibrate_threshold(stacked, labels, predicted, known, max_known_loss=1.0)
    assert unguarded.new_label_threshold <= 0.6  # 40 gained, 30 lost: a net gain overall
    assert 0.7 < guarded.new_label_threshold <= 0.8  # only the pairs at 0.8
    assert guarded.answered == 10


def test_too_little_feedback_keeps_the_defaults(rng):
    vectors = unit(rng.standard_normal((5, 384)))
    calibration = calibrate_threshold(vectors, ["a"] * 5, ["a"] * 5, ["a"])
    assert (calibration.threshold, calibration.new_label_threshold) == (
        DEFAULT_THRESHOLD, DEFAULT_NEW_LABEL_THRESHOLD)
    assert "at least" in calibration.reason


# -- following the store -------------------------------------------------------------------------


class FeedbackTable:
    """A feedback table as a list of changes, read the way the service's fetch would."""

    def __init__(self) -> None:
        self.changes: list[FeedbackChange] = []

    def fetch(self, cursor: int) -> list[FeedbackChange]:
        return [c for c in self.changes if c.sequence > cursor]


def test_the_follower_picks_up_new_rows_embeds_texts_and_applies_deletions(rng):
    table = FeedbackTable()
    vectors = unit(rng.standard_normal((3, 384)))
    embedded: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        embedded.append(texts)
        return np.stack([vectors[int(t[-1])] for t in texts])

    memory = FeedbackMemory(known_labels={"a", "b"})
    follower = FeedbackFollower(memory, table.fetch, embed, interval_s=0.05)
    assert follower.poll() == 0
    table.changes += [
        FeedbackChange(1, 1, "a", "text 0", vectors[0]),
        FeedbackChange(2, 2, "b", "text 1"),  # given by text: no embedding yet
    ]
    assert follower.poll() == 2
    assert embedded == [["text 1"]]
    assert memory.lookup(vectors[:2]).labels == ["a", "b"]
    assert follower.poll() == 0  # the cursor moved on
    table.changes += [FeedbackChange(3, 1, None, "text 0")]  # feedback 1 deleted
    follower.poll()
    assert memory.lookup(vectors[:2]).labels == [None, "b"]


def test_the_running_follower_applies_new_feedback_within_its_interval(rng):
    table = FeedbackTable()
    vector = unit(rng.standard_normal(384))
    memory = FeedbackMemory(known_labels={"a"})
    follower = FeedbackFollower(memory, table.fetch, lambda texts: None, interval_s=0.05)
    follower.start()
    try:
        table.changes.append(FeedbackChange(1, 7, "a", "hello", vector))
        seen = threading.Event()
        for _ in range(100):
            if memory.lookup(vector[None]).labels == ["a"]:
                seen.set()
                break
            threading.Event().wait(0.01)
        assert seen.is_set(), "the follower did not apply the new row within 1 s"
    finally:
        follower.stop()


def test_a_failed_embedding_leaves_the_cursor_for_the_next_poll(rng):
    table = FeedbackTable()
    table.changes.append(FeedbackChange(1, 1, "a", "text"))
    calls = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        if len(calls) == 1:
            raise RuntimeError("model swapping")
        return unit(rng.standard_normal((1, 384)))

    memory = FeedbackMemory()
    follower = FeedbackFollower(memory, table.fetch, embed)
    with pytest.raises(RuntimeError):
        follower.poll()
    assert follower.cursor == 0 and len(memory) == 0
    assert follower.poll() == 1 and len(memory) == 1


def test_replace_waits_for_the_round_in_progress_and_follows_the_new_memory(rng):
    table = FeedbackTable()
    vectors = unit(rng.standard_normal((3, 384)))
    table.changes.append(FeedbackChange(1, 1, "a", "t", vectors[0]))
    inside, release = threading.Event(), threading.Event()

    def slow_fetch(cursor: int) -> list[FeedbackChange]:
        inside.set()
        release.wait(5)
        return table.fetch(cursor)

    old = FeedbackMemory(known_labels={"a"})
    follower = FeedbackFollower(old, slow_fetch, lambda texts: None)
    polling = threading.Thread(target=follower.poll)
    polling.start()
    inside.wait(5)
    new = FeedbackMemory(known_labels={"a"})
    new.add([1], vectors[:1], ["a"])  # rebuilt from every change up to 1
    replacing = threading.Thread(target=follower.replace, args=(new, 1))
    replacing.start()
    replacing.join(0.2)
    assert replacing.is_alive(), "replace must wait for the round in progress"
    release.set()
    polling.join(5)
    replacing.join(5)
    assert follower.memory is new and follower.cursor == 1
    table.changes.append(FeedbackChange(2, 2, "a", "t", vectors[1]))
    follower.poll()
    assert sorted(new.ids.tolist()) == [1, 2]


def test_a_rebuilt_memory_keeps_the_new_heads_mistakes_with_calibrated_thresholds(rng):
    vectors, labels, predicted, names = clustered_feedback(rng)
    ids = list(range(100, 100 + len(labels)))
    memory, calibration = rebuilt_memory(ids, vectors, labels, predicted, names)
    wrong = {fid for fid, label, p in zip(ids, labels, predicted, strict=True) if label != p}
    assert set(memory.ids.tolist()) == wrong
    assert (memory.threshold, memory.new_label_threshold) == (
        calibration.threshold, calibration.new_label_threshold)
    assert memory.known_labels == frozenset(names)
    empty, _ = rebuilt_memory([], np.zeros((0, 384), np.float32), [], [], names)
    assert len(empty) == 0


# -- on real data --------------------------------------------------------------------------------


@pytest.mark.slow
def test_on_hwu64_the_calibrated_memory_keeps_old_class_accuracy():
    shared_data = ROOT.parent / "shared" / "data"
    if not (shared_data / "hwu64").is_dir():
        pytest.skip(
            f"real datasets not found at {shared_data} (only the team's machines have them)"
        )
    """A head trained without 3 labels; the validation split as feedback (5% wrongly labelled);
    the memory at its calibrated thresholds must not cost the old classes more than a point on
    the test split, and must teach the new labels."""
    from adapters.training.head import HeadConfig, head_probabilities, train_head
    from bench.datasets import load

    bench = load("hwu64")
    rng = np.random.default_rng(0)
    validation_labels = np.array(bench.validation.labels)
    eligible = sorted(
        label for label in bench.labels if (validation_labels == label).sum() >= 15
    )
    new = set(rng.choice(eligible, 3, replace=False).tolist())
    old = [label for label in bench.labels if label not in new]
    train_labels = np.array(bench.train.labels)
    keep_t, keep_v = ~np.isin(train_labels, list(new)), ~np.isin(validation_labels, list(new))
    index = {label: i for i, label in enumerate(old)}
    trained = train_head(
        bench.x_train[keep_t], np.array([index[label] for label in train_labels[keep_t]]),
        bench.x_validation[keep_v], np.array([index[label] for label in validation_labels[keep_v]]),
        len(old), HeadConfig(), seed=0,
    )

    def model(x: np.ndarray) -> np.ndarray:
        return np.array(old, dtype=object)[head_probabilities(trained.head, x).argmax(axis=1)]

    feedback_labels = validation_labels.astype(object)
    wrong = rng.random(len(feedback_labels)) < 0.05
    feedback_labels[wrong] = rng.choice(old, int(wrong.sum()))
    calibration = calibrate_threshold(
        bench.x_validation, list(feedback_labels), list(model(bench.x_validation)), old
    )
    memory = FeedbackMemory(known_labels=old)
    memory.set_thresholds(calibration)
    memory.add(list(range(len(feedback_labels))), bench.x_validation, list(feedback_labels))

    truth = np.array(bench.test.labels, dtype=object)
    alone = model(bench.x_test)
    matches = memory.lookup(bench.x_test)
    combined = alone.copy()
    combined[matches.answered] = np.array(matches.labels, dtype=object)[matches.answered]
    is_old = ~np.isin(truth, list(new))
    old_alone = float((alone == truth)[is_old].mean())
    old_combined = float((combined == truth)[is_old].mean())
    new_recall = float((combined == truth)[~is_old].mean())
    print(f"thresholds {calibration.threshold} / {calibration.new_label_threshold}; old classes "
          f"{old_alone:.4f} alone, {old_combined:.4f} with the memory; new-label recall "
          f"{new_recall:.3f} from {int((~keep_v).sum())} feedback items")
    assert old_combined >= old_alone - 0.01
    assert new_recall >= 0.3  # the model alone: 0
