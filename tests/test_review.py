"""The review queue (``GET /review``) end to end: a real server, 2 workers, SQLite and PostgreSQL,
with the feedback key set; and the store's queries and schema upgrade on both backends."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy import text as sql_text

from adapters.serving.review import diverse_picks
from refit.store import FeedbackRecord, PredictionRecord, Store
from tests.readme_walkthrough import curl_calls
from tests.servers import wait_for

pytestmark = pytest.mark.server

KEY = "review-feedback-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}

# Clear demo intents the model is sure of; six near-duplicates of one nonsense text (the least
# confident, and all alike); and texts between two intents (uncertain, each different).
CLEAR = [
    "where is my parcel, it has not arrived", "I want to cancel my order please",
    "the vase arrived broken", "how do I reset my password", "connect me to a human agent",
    "my card payment was declined", "what is your return policy", "has my refund been approved",
    "change the delivery address of my order", "does the kettle have a warranty",
]
ALIKE = [f"asdf qwer zxcv {n}" for n in range(1, 7)]
BETWEEN = [
    "I cancelled and want my money back", "the payment failed so where is my order",
    "the parcel came damaged, can I return it", "I can't log in to check my order status",
    "the blender arrived broken, does the warranty cover it",
    "cancel the order and change the address", "let me talk to someone about my refund",
    "I returned it, when do I get the refund", "my payment went through but no order",
    "change my password and my shipping address",
]
TEXTS = CLEAR + ALIKE + BETWEEN


@pytest.fixture(scope="module")
def server(start_service, database_url):
    return start_service(
        "review", env={"REFIT_FEEDBACK_KEY": KEY, "REFIT_DATABASE_URL": database_url,
                       "REFIT_DRIFT_INTERVAL_S": "1"},
    )


@pytest.fixture()
def client(server):
    with server.client(headers=AUTH) as c:
        yield c


def margin(scores: dict[str, float]) -> float:
    top = sorted(scores.values(), reverse=True)
    return top[0] - top[1]


def review(client, **params) -> dict:
    response = client.get("/review", params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def logged(server, database_url) -> dict[str, dict]:
    """Every text predicted once (and the first clear text a second time), by prediction id,
    once the prediction log has them all."""
    with server.client(headers=AUTH) as client:
        answer = client.post("/predict", json={"texts": TEXTS}).json()
        again = client.post("/predict", json={"texts": TEXTS[:1]}).json()
        predictions = {
            p["prediction_id"]: {**p, "text": text, "margin": margin(p["scores"])}
            for text, p in zip(TEXTS + TEXTS[:1], answer["predictions"] + again["predictions"],
                               strict=True)
        }
        store = Store.from_url(database_url)
        try:  # every worker's log flushed, the repeated text's second prediction included
            wait_for(lambda: len(store.get_predictions(predictions)) == len(predictions),
                     timeout=15, what="every prediction in the log")
        finally:
            store.close()
        assert len(review(client, limit=100)["items"]) == len(TEXTS)
    return predictions


def expected(logged: dict[str, dict], key: str, exclude: set[str] = frozenset()) -> list[str]:
    """Prediction ids by ``key`` then id, one per text (the earliest id of a repeated text's
    lowest score), leaving out ``exclude``d texts."""
    ranked = sorted(logged, key=lambda pid: (logged[pid][key], pid))
    seen: set[str] = set(exclude)
    out = []
    for pid in ranked:
        if logged[pid]["text"] not in seen:
            seen.add(logged[pid]["text"])
            out.append(pid)
    return out


@pytest.mark.parametrize(("strategy", "key"), [("uncertainty", "confidence"),
                                                ("margin", "margin")])
def test_uncertainty_and_margin_rank_every_unlabelled_prediction(client, logged, strategy, key):
    body = review(client, strategy=strategy, limit=100)
    assert body["model_version"] == "v1" and body["strategy"] == strategy
    items = body["items"]
    assert [item["prediction_id"] for item in items] == expected(logged, key)
    for item in items:
        sent = logged[item["prediction_id"]]
        assert item["text"] == sent["text"] and item["predicted_label"] == sent["label"]
        assert item["confidence"] == pytest.approx(sent["confidence"], abs=1e-6)
        assert item["margin"] == pytest.approx(sent["margin"], abs=1e-6)
        assert 0 < item["created_at"] <= time.time()
    scores = [item[key] for item in items]
    assert scores == sorted(scores)
    assert len({item["text"] for item in items}) == len(items)  # a repeated text appears once

    top = review(client, strategy=strategy, limit=5)["items"]
    assert [item["prediction_id"] for item in top] == expected(logged, key)[:5]
    assert len(review(client, strategy=strategy)["items"]) == 10  # the default limit


def test_diverse_spreads_its_picks_over_the_uncertain_predictions(client, logged, server,
                                                                  database_url):
    limit = 5
    uncertain = review(client, strategy="uncertainty", limit=limit)["items"]
    body = review(client, strategy="diverse", limit=limit)
    picks = body["items"]
    assert body["strategy"] == "diverse" and len(picks) == limit
    # Picks come from the least confident 2 x limit (REFIT_REVIEW_DIVERSE_POOL_FACTOR),
    # least confident first.
    pool = expected(logged, "confidence")[: 2 * limit]
    assert {item["prediction_id"] for item in picks} <= set(pool)
    assert [item["confidence"] for item in picks] == sorted(item["confidence"] for item in picks)
    # Exactly the service's clustering of that pool, on the embeddings it logged.
    store = Store.from_url(database_url)
    try:
        stored = store.get_predictions(pool)
    finally:
        store.close()
    embeddings = np.stack([np.frombuffer(stored[pid].embedding, dtype=np.float32) for pid in pool])
    confidence = np.array([stored[pid].confidence for pid in pool])
    chosen = diverse_picks(embeddings, confidence, limit, seed=0)
    assert [item["prediction_id"] for item in picks] == [pool[i] for i in chosen]

    # Spread: the six near-duplicates are the least confident, so uncertainty alone spends its
    # picks on them; diverse spends fewer and covers more labels.
    alike = set(ALIKE)
    assert sum(item["text"] in alike for item in uncertain) >= 3, uncertain
    assert sum(item["text"] in alike for item in picks) < sum(
        item["text"] in alike for item in uncertain)
    by_id = {pid: vector for pid, vector in zip(pool, embeddings, strict=True)}

    def mean_similarity(items: list[dict]) -> float:
        vectors = np.stack([by_id[item["prediction_id"]] for item in items])
        similarity = vectors @ vectors.T
        return float(similarity[~np.eye(len(items), dtype=bool)].mean())

    assert mean_similarity(picks) < mean_similarity(uncertain)
    assert len({item["predicted_label"] for item in picks}) > len(
        {item["predicted_label"] for item in uncertain})


def test_labelled_predictions_leave_the_queue(client, logged):
    before = review(client, strategy="uncertainty", limit=100)["items"]
    first, second = before[0], before[1]
    answer = client.post("/feedback", json={"items": [
        {"prediction_id": first["prediction_id"], "label": "talk_to_human"}]})
    assert answer.status_code == 200, answer.text
    after = review(client, strategy="uncertainty", limit=100)["items"]
    assert [item["prediction_id"] for item in after] == [
        item["prediction_id"] for item in before[1:]]
    # Feedback given as text removes every prediction of that text, here the repeated one.
    repeated = TEXTS[0]
    answer = client.post("/feedback", json={"items": [{"text": repeated, "label": "order_status"}]})
    assert answer.status_code == 200, answer.text
    for strategy in ("uncertainty", "margin", "diverse"):
        items = review(client, strategy=strategy, limit=100)["items"]
        ids = {item["prediction_id"] for item in items}
        assert first["prediction_id"] not in ids
        assert repeated not in {item["text"] for item in items}
    assert review(client, strategy="margin", limit=100)["items"]
    assert second["prediction_id"] in {
        item["prediction_id"] for item in review(client, limit=100)["items"]}


def test_expired_and_other_versions_are_left_out(client, logged, database_url):
    store = Store.from_url(database_url)
    now = time.time()
    old = f"{int((now - 40 * 86400) * 1000):012x}{'0' * 16}"
    other = f"{int(now * 1000):012x}{'1' * 16}"
    vector = np.ones(384, dtype=np.float32).tobytes()
    try:
        store.insert_predictions([
            PredictionRecord(old, now - 40 * 86400, "v1", "expired but unsure", "order_status",
                             0.0001, vector, 0.0),
            PredictionRecord(other, now, "v0", "another version's", "order_status", 0.0001,
                             vector, 0.0),
        ])
    finally:
        store.close()
    for strategy in ("uncertainty", "margin", "diverse"):
        ids = {item["prediction_id"] for item in review(client, strategy=strategy)["items"]}
        assert not ids & {old, other}, strategy


def test_the_queue_size_is_a_prometheus_gauge(client, logged, server):
    items = review(client, strategy="uncertainty", limit=100)["items"]
    below = sum(item["confidence"] < 0.5 for item in items)  # REFIT_REVIEW_QUEUE_THRESHOLD

    def gauge() -> float | None:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("refit_review_queue_predictions "):
                return float(line.split()[1])
        return None

    wait_for(lambda: gauge() == below, timeout=30, what=f"the gauge at {below}")
    assert below > 0


def test_the_readme_section_works_as_written(client, logged):
    """Every curl of README's "What to label next", in order, with this server's key and the
    README's example prediction id replaced by the first one the queue returned."""
    calls = curl_calls(title="What to label next")
    assert [call.path.split("?")[0] for call in calls] == [
        "/review", "/review", "/review", "/feedback"]
    readme_id = json.loads(calls[-1].body or "{}")["items"][0]["prediction_id"]
    real_id = ""
    for call in calls:
        assert call.headers["authorization"] == "Bearer $REFIT_FEEDBACK_KEY"
        body = call.body.replace(readme_id, real_id) if call.body else None
        response = client.request(call.method, call.path, content=body,
                                  headers={**call.headers, **AUTH})
        assert response.status_code == 200, (call.source, response.text)
        if call.path.startswith("/review"):
            items = response.json()["items"]
            assert items and len(items) == int(call.path.rsplit("limit=", 1)[1])
            real_id = real_id or items[0]["prediction_id"]
    assert response.json()["accepted"] == 1
    assert real_id not in {item["prediction_id"] for item in review(client, limit=100)["items"]}


def test_the_queue_needs_the_feedback_key(server):
    with server.client() as anonymous:
        refused = anonymous.get("/review")
        assert refused.status_code == 401, refused.text
        assert "REFIT_FEEDBACK_KEY" in refused.json()["error"]
        wrong = anonymous.get("/review", headers={"authorization": "Bearer not-the-key-at-all"})
        assert wrong.status_code == 401


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"strategy": "random"}, "strategy"),
        ({"strategy": ""}, "strategy"),
        ({"strategy": "uncertainty\x00"}, "strategy"),
        ({"limit": "0"}, "limit"),
        ({"limit": "-3"}, "limit"),
        ({"limit": "101"}, "limit"),  # above REFIT_REVIEW_MAX_LIMIT
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1e3"}, "limit"),
        ({"limit": "9" * 400}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limits": "5"}, "limits"),
    ],
)
def test_bad_parameters_are_a_422_naming_the_field(client, params, field):
    response = client.get("/review", params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["field"] == field


def test_the_document_describes_the_queue(client):
    document = client.get("/openapi.json").json()
    entry = document["paths"]["/review"]["get"]
    assert entry["security"] == [{"feedbackKey": []}, {"adminToken": []}]
    parameters = {p["name"]: p for p in entry["parameters"]}
    assert set(parameters) == {"strategy", "limit"}
    assert parameters["strategy"]["schema"]["enum"] == ["uncertainty", "margin", "diverse"]
    limit = next(o for o in parameters["limit"]["schema"]["anyOf"] if o["type"] == "integer")
    assert limit["maximum"] == 100 and limit["minimum"] == 1
    item = document["components"]["schemas"]["ReviewItem"]["properties"]
    assert {"prediction_id", "text", "predicted_label", "confidence", "margin",
            "created_at"} <= set(item)


# -- the store --------------------------------------------------------------------------------


def test_review_candidates_walk_the_index_in_order(tmp_path, backend):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'review.db'}"
    else:
        from tests.servers import postgres_url

        url, reason = postgres_url("refit_review_store")
        if url is None:
            pytest.skip(f"PostgreSQL unavailable: {reason}")
    store = Store.from_url(url)
    rng = np.random.default_rng(0)
    now = time.time()
    vector = np.zeros(384, dtype=np.float32).tobytes()
    rows = []
    for i in range(300):
        confidence = float(rng.random())
        rows.append(PredictionRecord(f"{i:028x}", now - i, "v2" if i % 3 else "v1", f"t{i}",
                                     "a", confidence, vector,
                                     None if i % 10 == 0 else float(rng.random())))
    try:
        store.insert_predictions(rows)
        store.insert_feedback([FeedbackRecord(prediction_id=rows[5].id, text="t5", label="b")])
        v2 = [r for r in rows if r.model_version == "v2" and r.id != rows[5].id]
        got = store.review_candidates("v2", "confidence", now - 1000, 7)
        assert [c.id for c in got] == [r.id for r in sorted(v2, key=lambda r: r.confidence)[:7]]
        assert all(c.embedding is None for c in got)
        with_margin = [r for r in v2 if r.margin is not None]
        got = store.review_candidates("v2", "margin", now - 1000, 500, with_embeddings=True)
        assert [c.id for c in got] == [
            r.id for r in sorted(with_margin, key=lambda r: r.margin or 0)]
        assert got[0].embedding is not None and got[0].embedding.shape == (384,)
        recent = store.review_candidates("v2", "confidence", now - 50.5, 500)
        assert {c.id for c in recent} == {r.id for r in v2 if r.created_at >= now - 50.5}
        assert store.count_review_queue("v2", 0.5, now - 1000) == sum(
            r.confidence < 0.5 for r in v2)
        assert store.labelled_texts(["t5", "t6"]) == {"t5"}
    finally:
        store.close()


def test_an_older_database_gains_the_margin_column_and_indexes(tmp_path, backend):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        from tests.servers import postgres_url

        url, reason = postgres_url("refit_review_upgrade")
        if url is None:
            pytest.skip(f"PostgreSQL unavailable: {reason}")
    engine = create_engine(url)
    with engine.begin() as conn:  # the predictions table as refit created it before
        conn.execute(sql_text(
            "CREATE TABLE predictions (id VARCHAR(40) PRIMARY KEY, created_at FLOAT NOT NULL, "
            "model_version VARCHAR(32) NOT NULL, text TEXT NOT NULL, label VARCHAR(200) NOT NULL,"
            " confidence FLOAT NOT NULL, embedding " +
            ("BLOB" if backend == "sqlite" else "BYTEA") + " NOT NULL)"))
        conn.execute(sql_text(
            "INSERT INTO predictions VALUES ('0000000000000000000000000001', :t, 'v1', 'old', "
            "'a', 0.3, :e)"), {"t": time.time(), "e": b"\0" * 1536})
    engine.dispose()
    for _ in range(2):  # a second start finds everything in place
        store = Store.from_url(url)
        try:
            found = inspect(store.engine)
            assert "margin" in {c["name"] for c in found.get_columns("predictions")}
            assert {"ix_predictions_review_confidence", "ix_predictions_review_margin"} <= {
                i["name"] for i in found.get_indexes("predictions")}
            [old] = store.review_candidates("v1", "confidence", 0, 10)
            assert old.margin is None and old.confidence == pytest.approx(0.3)
            assert store.review_candidates("v1", "margin", 0, 10) == []
        finally:
            store.close()
