"""Feedback in effect at once, against a real server with the default settings (2 workers).

Feedback posted to one worker answers predictions in every worker within about a second, with
``"source": "feedback"``; unrelated texts stay the model's; a deleted item stops answering. Each
request below goes on a fresh connection, so the requests land on both workers (``/memory``
names the worker that answered, and the test checks both were seen).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.servers import wait_for

pytestmark = pytest.mark.server

NEW_LABEL_TEXT = "can I pay with a gift voucher"
PARAPHRASE = "Can I pay with a gift voucher?"
UNRELATED = "I was charged twice for my order"
REQUESTS = 16


@pytest.fixture(scope="module")
def server(start_service):
    return start_service("memory")


def fresh_post(server, path: str, body: dict) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=30) as client:  # a new connection each time
        return client.post(path, json=body)


def fresh_get(server, path: str) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        return client.get(path)


def predict_one(server, text: str) -> dict:
    response = fresh_post(server, "/predict", {"texts": [text]})
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def memories_of_both_workers(server) -> dict[int, dict]:
    """``GET /memory`` on fresh connections until both workers have answered."""
    seen: dict[int, dict] = {}

    def both() -> bool:
        state = fresh_get(server, "/memory").json()
        seen[state["worker_pid"]] = state
        return len(seen) == 2

    wait_for(both, timeout=30, interval=0.05, what="both workers to answer /memory")
    return seen


def test_feedback_is_in_effect_at_once_in_every_worker(server):
    # Both workers built their memory for the served model at start-up (no feedback yet).
    wait_for(lambda: all(s["built_for"] == "v1" for s in memories_of_both_workers(server).values()),
             timeout=30, what="both workers to build their memory")
    before = predict_one(server, NEW_LABEL_TEXT)
    assert before["source"] == "model" and before["label"] != "gift_card"

    response = fresh_post(server, "/feedback",
                          {"items": [{"text": NEW_LABEL_TEXT, "label": "gift_card"}]})
    assert response.status_code == 200, response.text
    given = time.monotonic()
    [feedback_id] = response.json()["feedback_ids"]

    time.sleep(max(0.0, given + 1.5 - time.monotonic()))
    exact = [predict_one(server, NEW_LABEL_TEXT) for _ in range(REQUESTS)]
    assert all(p["label"] == "gift_card" and p["source"] == "feedback" for p in exact), exact
    assert all(p["feedback_id"] == feedback_id and p["similarity"] > 0.99 for p in exact)
    # The model does not know the label: its probability of it is 0; its scores are its own.
    assert all(p["confidence"] == 0.0 and "gift_card" not in p["scores"] for p in exact)
    close = [predict_one(server, PARAPHRASE) for _ in range(REQUESTS)]
    assert all(p["label"] == "gift_card" and p["source"] == "feedback" for p in close), close
    unrelated = [predict_one(server, UNRELATED) for _ in range(4)]
    assert all(p["source"] == "model" and p["feedback_id"] is None for p in unrelated), unrelated
    # Both workers hold it (the requests above were spread over them).
    states = memories_of_both_workers(server)
    assert all(s["entries"] == 1 and s["built_for"] == "v1" for s in states.values()), states
    assert all(s["new_label_threshold"] is not None for s in states.values())
    # The served version's class prototypes were read: the prototype rule is on.
    assert all(s["prototype_rule"] and s["new_label_margin"] is not None for s in states.values())
    # One item is too little to calibrate: no label has a margin of its own yet.
    assert all(s["new_label_margins"] == {} for s in states.values())

    deleted = fresh_get(server, "/openapi.json")  # the document shows the new fields
    prediction_schema = deleted.json()["components"]["schemas"]["Prediction"]["properties"]
    assert {"source", "feedback_id", "similarity"} <= set(prediction_schema)
    assert "/memory" in deleted.json()["paths"]
    memory_schema = deleted.json()["components"]["schemas"]["MemoryResponse"]["properties"]
    assert {"new_label_margin", "new_label_margins"} <= set(memory_schema)

    with httpx.Client(base_url=server.url, timeout=30) as client:
        # Admin endpoint: loopback clients are allowed while no admin token is set.
        assert client.delete(f"/feedback/{feedback_id}").status_code == 204
    removed = time.monotonic()
    time.sleep(max(0.0, removed + 1.5 - time.monotonic()))
    after = [predict_one(server, NEW_LABEL_TEXT) for _ in range(REQUESTS)]
    assert all(p["source"] == "model" and p["label"] != "gift_card" for p in after), after
    assert all(s["entries"] == 0 for s in memories_of_both_workers(server).values())


def test_served_label_is_logged_and_counted(server):
    item = {"text": "is there a loyalty points scheme", "label": "loyalty"}
    response = fresh_post(server, "/feedback", {"items": [item]})
    assert response.status_code == 200, response.text
    time.sleep(1.5)
    served = predict_one(server, "is there a loyalty points scheme")
    assert served["source"] == "feedback" and served["label"] == "loyalty"
    # Feedback on that prediction records the served label as what was predicted.
    wait_for(
        lambda: fresh_post(server, "/feedback", {"items": [
            {"prediction_id": served["prediction_id"], "label": "loyalty"}]}).status_code == 200,
        timeout=10, what="the prediction to reach the log",
    )
    listed = fresh_get(server, "/feedback?source=prediction_id").json()["items"]
    assert listed[0]["predicted_label"] == "loyalty"
    text = fresh_get(server, "/metrics").text
    answers = [line for line in text.splitlines() if line.startswith("refit_memory_answers_total")]
    assert answers and float(answers[0].split()[-1]) >= 1
    entries = [line for line in text.splitlines() if line.startswith("refit_memory_entries{")]
    assert len(entries) >= 2, entries  # one per worker
