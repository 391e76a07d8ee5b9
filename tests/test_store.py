"""The store on a real SQLite file: retention, all-or-nothing feedback, one running job."""

from __future__ import annotations

import time

import numpy as np
import pytest

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
    with pytest.raises(Exception):
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
