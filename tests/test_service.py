"""The serving API end to end.

A real `bentoml serve` subprocess, 2 workers, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import signal

import pytest
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(start_service, database_url):
    return start_service(
        "svc",
        env={"REFIT_DATABASE_URL": database_url, "REFIT_MAX_TEXT_CHARS": "500",
             "REFIT_MAX_TEXTS_PER_REQUEST": "16", "REFIT_MAX_BODY_BYTES": "65536"},
    )


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def test_predict_single_and_batch_in_order(client, trained_registry):
    labels = trained_registry.current().labels
    single = client.post("/predict", json={"texts": ["where is my parcel, it has not arrived"]})
    assert single.status_code == 200, single.text
    body = single.json()
    assert body["model_version"] == "v1"
    [p] = body["predictions"]
    assert set(p) == {"prediction_id", "label", "confidence", "scores", "source", "feedback_id",
                      "similarity"}
    assert p["source"] == "model" and p["feedback_id"] is None  # no feedback given yet
    assert set(p["scores"]) == set(labels)
    assert p["label"] == max(p["scores"], key=p["scores"].get)
    assert p["confidence"] == pytest.approx(p["scores"][p["label"]])
    assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-4)

    texts = [
        "I was charged twice and the payment failed",
        "cancel my order please",
        "the box arrived crushed and the vase is broken",
        "how do I reset my password",
        "where is my parcel, it has not arrived",
    ]
    batch = client.post("/predict", json={"texts": texts}).json()["predictions"]
    assert len(batch) == len(texts)
    assert len({p["prediction_id"] for p in batch}) == len(texts)
    for sentence, prediction in zip(texts, batch, strict=True):
        alone = client.post("/predict", json={"texts": [sentence]}).json()["predictions"][0]
        assert alone["label"] == prediction["label"]
        assert alone["confidence"] == pytest.approx(prediction["confidence"], abs=1e-5)
    assert [p["label"] for p in batch[1:4]] == ["cancel_order", "delivery_damaged", "account_login"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "field"),
    [
        ({"texts": []}, None, 422, "texts"),
        ({"texts": ["fine", 7]}, None, 422, "texts[1]"),
        ({"texts": "not a list"}, None, 422, "texts"),
        ({"texts": ["ok"], "extra": 1}, None, 422, "extra"),
        ({"texts": ["x" * 501]}, None, 422, "texts[0]"),
        ({"texts": ["  "]}, None, 422, "texts[0]"),
        ({"texts": ["a"] * 17}, None, 422, "texts"),
        (b'{"texts": ["unterminated', {"content-type": "application/json"}, 400, "body"),
        (b'{"texts": ["hi"]}', {"content-type": "text/plain"}, 415, "content-type"),
        (
            json.dumps({"texts": ["y" * 400] * 200}).encode(),
            {"content-type": "application/json"},
            413,
            None,
        ),
    ],
)
def test_bad_predict_requests_get_clear_4xx(client, body, headers, status, field):
    if isinstance(body, bytes):
        response = client.post("/predict", content=body, headers=headers)
    else:
        response = client.post("/predict", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"]
    if field is not None:
        assert error["field"] == field
    # The service keeps serving.
    assert client.post("/predict", json={"texts": ["still there?"]}).status_code == 200


def test_wrong_method_is_a_json_405(client):
    response = client.get("/predict")
    assert response.status_code == 405
    assert "POST" in response.json()["error"]


def test_feedback_by_id_and_by_text(client):
    prediction = client.post("/predict", json={"texts": ["my refund never came through"]}).json()[
        "predictions"
    ][0]
    response = client.post(
        "/feedback",
        json={"items": [
            {"prediction_id": prediction["prediction_id"], "label": "refund_status"},
            {"text": "do you ship to Norway", "label": "shipping_question"},
        ]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == 2 and len(body["feedback_ids"]) == 2


@pytest.mark.parametrize(
    ("items", "status", "field"),
    [
        (
            [{"prediction_id": "0000000000000000000000000000", "label": "x"}],
            404,
            "items[0].prediction_id",
        ),
        ([{"text": "hello", "label": ""}], 422, "items[0].label"),
        ([{"text": "hello", "label": "   "}], 422, "items[0]"),
        ([{"text": "z" * 501, "label": "x"}], 422, "items[0].text"),
        ([{"text": "hello", "label": "x", "colour": "red"}], 422, "items[0].colour"),
        ([{"label": "x"}], 422, "items[0]"),
        ([], 422, "items"),
    ],
)
def test_bad_feedback_names_the_field(client, items, status, field):
    response = client.post("/feedback", json={"items": items})
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    if status == 404:
        assert items[0]["prediction_id"] in response.json()["error"]


def test_feedback_is_all_or_nothing(client, server, database_url):
    good = client.post("/predict", json={"texts": ["cancel it"]}).json()["predictions"][0][
        "prediction_id"
    ]
    engine = create_engine(database_url)
    with engine.connect() as conn:
        before = conn.execute(text("select count(*) from feedback")).scalar_one()
    response = client.post("/feedback", json={"items": [
        {"prediction_id": good, "label": "cancel_order"},
        {"prediction_id": "0000000000000000000000000001", "label": "x"},
    ]})
    assert response.status_code == 404
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from feedback")).scalar_one() == before
    engine.dispose()


def test_models_lists_versions_and_what_is_served(client):
    body = client.get("/models").json()
    assert body["current"] == "v1"
    assert body["serving"]["version"] == "v1"
    [version] = body["versions"]
    assert version["current"] is True
    assert 0 < version["metrics"]["test"]["accuracy"] <= 1
    calibration = version["calibration"]
    assert calibration["method"] == "temperature" and calibration["temperature"] > 0
    for split in ("validation", "test"):
        assert 0 <= calibration[split]["ece_after"] <= 1
        assert calibration[split]["examples"] == version["metrics"][split]["examples"]


def test_probes(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_predictions_and_feedback_survive_a_restart(server, database_url):
    with server.client() as c:
        ids = [
            p["prediction_id"]
            for p in c.post(
                "/predict", json={"texts": ["restart test one", "restart test two"]}
            ).json()["predictions"]
        ]
        fb = c.post(
            "/feedback", json={"items": [{"prediction_id": ids[0], "label": "order_status"}]}
        ).json()
    assert server.stop(signal.SIGTERM) is not None
    server.start()
    engine = create_engine(database_url)
    with engine.connect() as conn:
        stored = {
            row[0]
            for row in conn.execute(
                text("select id from predictions where id in (:a, :b)"), {"a": ids[0], "b": ids[1]}
            )
        }
        labels = conn.execute(
            text("select label from feedback where id = :i"), {"i": fb["feedback_ids"][0]}
        ).scalar_one()
    engine.dispose()
    assert stored == set(ids)
    assert labels == "order_status"
    with server.client() as c:
        # Feedback on a prediction made before the restart still resolves.
        again = c.post(
            "/feedback", json={"items": [{"prediction_id": ids[1], "label": "order_status"}]}
        )
        assert again.status_code == 200


@pytest.mark.parametrize(
    "path", ["/nope", "/predict/extra", "/docs.json", "/static_content/index.css"]
)
def test_unknown_paths_get_a_json_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


def test_openapi_document_and_swagger_ui_are_served(client):
    from openapi_spec_validator import validate

    document = client.get("/openapi.json").json()
    validate(document)
    assert {"/predict", "/feedback", "/models", "/retrain", "/livez", "/readyz"} <= set(
        document["paths"]
    )
    page = client.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    assert client.get("/docs/swagger-ui-bundle.js").status_code == 200


def with_examples(path: str, entry: dict) -> str:
    """``path`` with each path parameter replaced by its documented example."""
    for parameter in entry.get("parameters", []):
        if parameter["in"] == "path":
            path = path.replace("{" + parameter["name"] + "}", str(parameter["example"]))
    return path


def test_every_documented_request_example_is_accepted_by_the_server(client):
    document = client.get("/openapi.json").json()
    sent = 0
    for path, entries in document["paths"].items():
        for method, entry in entries.items():
            if "requestBody" not in entry:
                continue
            example = entry["requestBody"]["content"]["application/json"]["examples"]["example"]
            response = client.request(
                method.upper(), with_examples(path, entry), json=example["value"]
            )
            documented = {int(code) for code in entry["responses"]}
            # 2xx, or a documented refusal that depends on state (409: too little feedback).
            assert response.status_code < 300 or (
                response.status_code in documented and response.status_code not in (400, 422)
            ), (method, path, response.status_code, response.text)
            sent += 1
    assert sent >= 4
