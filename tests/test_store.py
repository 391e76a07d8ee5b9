"""The store on a real SQLite file: retention, all-or-nothing feedback, one running job."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from refit.errors import ConflictError
from refit.jobs import RetrainOptions
from refit.store import FeedbackRecord, PredictionRecord, Store, vector_bytes


@pytest.fixture()
def store(tmp_path):
    s = Store.from_url(f"sqlite:///{tmp_path / 'refit.db'}")
    yield s
    s.close()


def prediction(i: int, created_at: float) -> PredictionRecord:
    return PredictionRecord(f"{i:028x}", created_at, "v1", f"text {i}", "a", 0.9,
                            vector_bytes(np.full(384, i, dtype=np.float32)))


def test_retention_bounds_rows_and_age(store):
    now = time.time()
    store.insert_predictions([prediction(i, now - 100 + i) for i in range(50)])
    store.insert_predictions([prediction(1000 + i, now - 40 * 86400) for i in range(5)])
    deleted = store.enforce_retention(max_rows=20, max_age_seconds=30 * 86400)
    assert deleted == 5 + 30
    kept = store.recent_predictions(100)
    assert len(kept) == 20
    assert [r.id for r in kept] == [f"{i:028x}" for i in range(30, 50)]
    assert np.frombuffer(kept[0].embedding, dtype=np.float32)[0] == 30


def test_feedback_insert_is_one_transaction(store):
    good = FeedbackRecord(None, "hello", "greeting")
    with pytest.raises(IntegrityError):  # NOT NULL on feedback.text
        store.insert_feedback([good, FeedbackRecord(None, None, "broken")])  # type: ignore[arg-type]
    assert store.count_feedback() == 0
    assert len(store.insert_feedback([good, good]).ids) == 2


def test_only_one_job_runs_at_a_time(store):
    store.create_job("job-a", RetrainOptions(force=True, min_feedback=7))
    with pytest.raises(ConflictError) as conflict:
        store.create_job("job-b", RetrainOptions())
    assert conflict.value.details["running_job_id"] == "job-a"
    store.update_job("job-a", phase="done", result={"version": "v2", "outcome": "promoted"})
    store.create_job("job-b", RetrainOptions())
    running = store.running_job()
    assert running is not None and running.job_id == "job-b" and not running.terminal
    done = store.get_job("job-a")
    assert done.result == {"version": "v2", "outcome": "promoted"} and done.outcome == "promoted"
    assert done.options == RetrainOptions(force=True, min_feedback=7)


def test_online_accuracy_counts_only_feedback_on_predictions(store):
    store.insert_feedback([
        FeedbackRecord("p1", "t1", "a", predicted_label="a"),
        FeedbackRecord("p2", "t2", "a", predicted_label="b"),
        FeedbackRecord("p3", "t3", "b", predicted_label="b"),
        FeedbackRecord(None, "t4", "b"),
    ])
    count, accuracy, per_label = store.online_accuracy(window=10)
    assert count == 3 and accuracy == pytest.approx(2 / 3)
    assert per_label == {"a": (2, 0.5), "b": (1, 1.0)}


@pytest.fixture()
def backend_store(database_url):
    """The store on SQLite and on PostgreSQL (the module shares one database per backend)."""
    s = Store.from_url(database_url)
    yield s
    s.close()


def test_feedback_change_feed_reports_every_change_in_order(backend_store):
    store = backend_store
    start = store.latest_feedback_seq()
    pid = f"{int(time.time() * 1000):012x}{'ab' * 8}"
    store.insert_predictions([PredictionRecord(pid, time.time(), "v1", "where is my card", "a",
                                               0.9, vector_bytes(np.ones(384, np.float32)))])
    first = store.insert_feedback([
        FeedbackRecord(pid, "where is my card", "card_arrival", "a", "v1",
                       vector_bytes(np.ones(384, np.float32)), "enc-1"),
        FeedbackRecord(None, "gift voucher?", "gift_card"),
    ])
    store.relabel_feedback(first.ids[1], "gift_cards")
    # A newer label for the same prediction replaces the earlier item: a deletion and an insert.
    second = store.insert_feedback([FeedbackRecord(pid, "where is my card", "card_lost")])
    assert [r.feedback_id for r in second.replaced] == [first.ids[0]]
    store.delete_feedback(first.ids[1])

    changes = store.feedback_changes(start)
    assert [(c.feedback_id, c.label) for c in changes] == [
        (first.ids[0], "card_arrival"),
        (first.ids[1], "gift_card"),
        (first.ids[1], "gift_cards"),
        (first.ids[0], None),
        (second.ids[0], "card_lost"),
        (first.ids[1], None),
    ]
    seqs = [c.seq for c in changes]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert store.latest_feedback_seq() == seqs[-1]
    # Rows still stored come with their text; deleted ones without.
    live = changes[4]
    assert live.text == "where is my card" and live.embedding is None
    assert changes[0].text is None  # its item was replaced (deleted) since
    # Paging: after a cursor, with a limit.
    assert [c.seq for c in store.feedback_changes(seqs[1], limit=2)] == seqs[2:4]
    assert store.feedback_changes(seqs[-1]) == []


def test_feedback_change_feed_carries_stored_embeddings(backend_store):
    store = backend_store
    start = store.latest_feedback_seq()
    vector = np.linspace(-1, 1, 384, dtype=np.float32)
    [fid] = store.insert_feedback([
        FeedbackRecord(None, "embedded text", "x", embedding=vector_bytes(vector), encoder_id="e")
    ]).ids
    [change] = store.feedback_changes(start)
    assert change.feedback_id == fid and change.encoder_id == "e"
    assert change.embedding is not None and np.array_equal(change.embedding, vector)


def test_recent_confidences_are_the_newest_of_one_version_oldest_first(backend_store):
    store = backend_store
    now = time.time()
    rows = [
        PredictionRecord(f"{int(now * 1000):012x}{i:016x}", now - 10 + i,
                         "v-estimate" if i % 3 else "v-other", f"text {i}", f"l{i % 2}",
                         i / 10, vector_bytes(np.zeros(384, np.float32)))
        for i in range(9)
    ]
    store.insert_predictions(rows)
    mine = [r for r in rows if r.model_version == "v-estimate"]  # i = 1, 2, 4, 5, 7, 8
    got = store.recent_confidences(4, "v-estimate")
    assert [(label, conf) for label, conf, _ in got] == [
        (r.label, pytest.approx(r.confidence)) for r in mine[-4:]
    ]
    assert [t for _, _, t in got] == pytest.approx([r.created_at for r in mine[-4:]])
    assert store.recent_confidences(10, "v-none") == []
