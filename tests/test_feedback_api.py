"""Feedback management end to end: list, filter, page, relabel, delete, conflicting labels, and
per-label status, against a real server on SQLite and on PostgreSQL, with the admin token set."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.server

TOKEN = "feedback-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(start_service, database_url):
    return start_service(
        "feedback", env={"REFIT_ADMIN_TOKEN": TOKEN, "REFIT_DATABASE_URL": database_url}
    )


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def give(client, items: list[dict]) -> dict:
    response = client.post("/feedback", json={"items": items})
    assert response.status_code == 200, response.text
    return response.json()


def predict(client, texts: list[str]) -> list[dict]:
    response = client.post("/predict", json={"texts": texts})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def by_prediction(client) -> list[dict]:
    params = {"source": "prediction_id", "limit": 1000}
    return client.get("/feedback", params=params).json()["items"]


def test_list_filters_and_pages(client):
    before = time.time()
    predictions = predict(client, ["where is my parcel", "cancel my order please"])
    give(client, [{"prediction_id": p["prediction_id"], "label": "page_test_a"}
                  for p in predictions])
    give(client, [{"text": f"page text {i}", "label": "page_test_b"} for i in range(5)])

    by_label = client.get("/feedback", params={"label": "page_test_b"}).json()
    newest_first = [f"page text {i}" for i in range(4, -1, -1)]
    assert [item["text"] for item in by_label["items"]] == newest_first
    assert all(item["source"] == "text" for item in by_label["items"])

    by_source = client.get("/feedback", params={"source": "prediction_id", "since": before}).json()
    assert {item["label"] for item in by_source["items"]} == {"page_test_a"}
    assert {item["prediction_id"] for item in by_source["items"]} == {
        p["prediction_id"] for p in predictions
    }
    iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(before - 1))
    since_iso = client.get("/feedback", params={"since": iso, "label": "page_test_b"}).json()
    assert len(since_iso["items"]) == 5
    assert client.get("/feedback", params={"since": time.time() + 60}).json()["items"] == []

    seen: list[int] = []
    cursor = None
    for _ in range(10):
        params = {"label": "page_test_b", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/feedback", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [item["id"] for item in by_label["items"]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "x"}, "limit"),
        ({"source": "email"}, "source"), ({"since": "yesterday"}, "since"),
        ({"since": "2026-11-31"}, "since"), ({"since": "2026-02-29T00:00:00Z"}, "since"),
        ({"cursor": "-1"}, "cursor"), ({"colour": "red"}, "colour"),
    ],
)
def test_bad_listing_parameters_are_a_422_naming_them(client, params, field):
    response = client.get("/feedback", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


def test_relabel_and_delete_need_the_token(client):
    [feedback_id] = give(client, [{"text": "relabel me", "label": "typo_lable"}])["feedback_ids"]
    assert client.patch(f"/feedback/{feedback_id}", json={"label": "x"}).status_code == 401
    assert client.delete(f"/feedback/{feedback_id}").status_code == 401

    fixed = client.patch(f"/feedback/{feedback_id}", json={"label": "typo_label"}, headers=AUTH)
    assert fixed.status_code == 200, fixed.text
    assert fixed.json()["label"] == "typo_label" and fixed.json()["id"] == feedback_id
    listed = client.get("/feedback", params={"label": "typo_label"}).json()["items"]
    assert [item["id"] for item in listed] == [feedback_id]

    assert client.delete(f"/feedback/{feedback_id}", headers=AUTH).status_code == 204
    assert client.get("/feedback", params={"label": "typo_label"}).json()["items"] == []
    for method in ("patch", "delete"):
        kwargs = {"json": {"label": "x"}} if method == "patch" else {}
        gone = getattr(client, method)(f"/feedback/{feedback_id}", headers=AUTH, **kwargs)
        assert gone.status_code == 404 and str(feedback_id) in gone.json()["error"]
    bad = client.patch("/feedback/abc", json={"label": "x"}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["field"] == "feedback_id"
    blank = client.patch("/feedback/1", json={"label": " "}, headers=AUTH)
    assert blank.status_code == 422 and blank.json()["field"] == "label"


def test_the_latest_label_for_a_prediction_wins(client):
    [p] = predict(client, ["my parcel never came"])
    first = give(client, [{"prediction_id": p["prediction_id"], "label": "conflict_one"}])
    assert first["replaced"] == []
    second = give(client, [{"prediction_id": p["prediction_id"], "label": "conflict_two"}])
    assert second["replaced"] == [{
        "prediction_id": p["prediction_id"], "previous_label": "conflict_one",
        "feedback_id": first["feedback_ids"][0],
    }]
    rows = by_prediction(client)
    assert [row["label"] for row in rows if row["prediction_id"] == p["prediction_id"]] == [
        "conflict_two"
    ]
    # Within one request the later item wins as well.
    [q] = predict(client, ["the vase arrived broken"])
    both = give(client, [{"prediction_id": q["prediction_id"], "label": "conflict_one"},
                         {"prediction_id": q["prediction_id"], "label": "conflict_two"}])
    assert [r["previous_label"] for r in both["replaced"]] == ["conflict_one"]
    rows = by_prediction(client)
    assert [row["label"] for row in rows if row["prediction_id"] == q["prediction_id"]] == [
        "conflict_two"
    ]


def test_labels_report_status_counts_and_recall(client, trained_registry):
    model_labels = trained_registry.current().labels
    known = model_labels[0]
    texts = [f"labels test {i}" for i in range(6)]
    predictions = predict(client, texts)
    give(client, [{"prediction_id": p["prediction_id"], "label": known} for p in predictions])
    give(client, [{"text": f"brand new {i}", "label": "labels_pending"} for i in range(2)])
    give(client, [{"text": f"plenty {i}", "label": "labels_enough"} for i in range(5)])

    body = client.get("/labels").json()
    assert body["serving_version"] == "v1" and body["min_examples"] == 5
    by_label = {row["label"]: row for row in body["labels"]}
    assert set(model_labels) <= set(by_label)
    for label in model_labels:
        assert by_label[label]["status"] == "active"
        assert by_label[label]["training_examples"] > 0
    assert by_label["labels_pending"]["status"] == "pending"
    assert by_label["labels_pending"]["feedback_count"] == 2
    assert "5" in by_label["labels_pending"]["reason"]
    assert by_label["labels_enough"]["status"] == "active"
    assert by_label["labels_enough"]["training_examples"] == 0
    row = by_label[known]
    hits = sum(p["label"] == known for p in predictions)
    assert row["feedback_on_predictions"] >= len(predictions)
    if row["feedback_on_predictions"] == len(predictions):
        assert row["recall"] == pytest.approx(hits / len(predictions))
    assert 0 <= row["recall"] <= 1
    assert by_label["labels_pending"]["recall"] is None  # no feedback on predictions


def test_feedback_endpoints_are_documented(client):
    from openapi_spec_validator import validate

    document = client.get("/openapi.json").json()
    validate(document)
    paths = document["paths"]
    assert {"get"} <= set(paths["/feedback"]) and {"patch", "delete"} == set(
        paths["/feedback/{feedback_id}"]
    )
    assert paths["/feedback/{feedback_id}"]["patch"]["security"] == [{"adminToken": []}]
    assert {p["name"] for p in paths["/feedback"]["get"]["parameters"]} == {
        "label", "since", "source", "limit", "cursor",
    }
    assert "get" in paths["/labels"]
