"""The HTTP app in-process: handlers, wire types and the OpenAPI document, over a toy model."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

import pytest
from openapi_spec_validator import validate
from pydantic import ValidationError

from service.app import api_document, create_app, operations
from service.schemas import (
    SINCE_PATTERN,
    ErrorResponse,
    FeedbackListQuery,
    FeedbackResponse,
    ModelsResponse,
    PredictResponse,
    RetrainJobList,
)
from tests.fixtures import TOY_LABELS, TRAIN_EXAMPLES_PER_LABEL


def test_predict_answers_in_order_with_the_documented_shape(api):
    texts = ["where is my parcel?", "I was charged twice", "refund me please"]
    response = api.post("/predict", json={"texts": texts})
    assert response.status_code == 200, response.text
    body = PredictResponse.model_validate(response.json())
    assert body.model_version == "v1"
    assert len(body.predictions) == len(texts)
    for prediction in body.predictions:
        assert set(prediction.scores) == set(TOY_LABELS)
        assert prediction.label == max(prediction.scores, key=prediction.scores.__getitem__)
        assert prediction.confidence == pytest.approx(prediction.scores[prediction.label])


def test_feedback_by_prediction_id_and_by_text(api, data_plane):
    [prediction] = api.post("/predict", json={"texts": ["my card was declined"]}).json()[
        "predictions"
    ]
    response = api.post("/feedback", json={"items": [
        {"prediction_id": prediction["prediction_id"], "label": "billing"},
        {"text": "do you deliver to Norway?", "label": "shipping_question"},
    ]})
    assert response.status_code == 200, response.text
    body = FeedbackResponse.model_validate(response.json())
    assert body.accepted == 2 and len(body.feedback_ids) == 2
    stored = {row.id: row for row in data_plane.store.all_feedback()}
    by_id = stored[body.feedback_ids[0]]
    assert by_id.prediction_id == prediction["prediction_id"]
    assert by_id.predicted_label == prediction["label"]
    assert by_id.text == "my card was declined"
    assert stored[body.feedback_ids[1]].prediction_id is None


@pytest.mark.parametrize(
    ("items", "status", "field"),
    [
        ([{"prediction_id": "0" * 28, "label": "x"}], 404, "items[0].prediction_id"),
        ([{"text": "a", "prediction_id": "0" * 28, "label": "x"}], 422, "items[0]"),
        ([{"text": "   ", "label": "x"}], 422, "items[0].text"),
        ([{"text": "hello", "label": "x", "colour": "red"}], 422, "items[0].colour"),
    ],
)
def test_bad_feedback_is_a_json_error_naming_the_field(api, items, status, field):
    response = api.post("/feedback", json={"items": items})
    assert response.status_code == status, response.text
    body = ErrorResponse.model_validate(response.json())
    assert body.field == field


def test_models_and_jobs_render_their_wire_types(api):
    models = ModelsResponse.model_validate(api.get("/models").json())
    assert models.current == "v1" and models.serving.version == "v1"
    assert [v.version for v in models.versions] == ["v1"] and models.versions[0].current
    assert RetrainJobList.model_validate(api.get("/retrain").json()).jobs == []


def test_too_little_feedback_is_a_409_with_the_counts(api, plane_settings):
    response = api.post("/retrain", json={})
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["min_feedback"] == plane_settings.retrain_min_feedback
    assert body["feedback_items"] < plane_settings.retrain_min_feedback


@pytest.mark.parametrize(
    "path", ["/nope", "/predict/extra", "/docs/../../etc/passwd", "/docs/x.js"]
)
def test_unknown_paths_get_a_json_404(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


def test_wrong_method_is_a_json_405_with_allow(api):
    response = api.delete("/predict")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert "error" in response.json()


def test_the_openapi_document_is_valid_and_served(api, plane_settings):
    served = api.get("/openapi.json")
    assert served.status_code == 200
    document = served.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert document == api_document(operations(None), plane_settings)
    texts = document["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert texts["maxItems"] == plane_settings.max_texts_per_request
    assert texts["items"]["maxLength"] == plane_settings.max_text_chars


def test_every_route_is_documented_and_every_documented_path_routed(data_plane, plane_settings):
    app = create_app(data_plane, plane_settings)
    routed = {route.path for route in app.routes}  # type: ignore[attr-defined]
    documented = set(api_document(operations(None))["paths"])
    served_by_bentoml = {"/livez", "/readyz"}
    assert routed | served_by_bentoml == documented
    assert not routed & served_by_bentoml


def test_role_endpoints_carry_their_bearer_schemes():
    document = api_document(operations(None))
    for name in ("adminToken", "feedbackKey"):
        scheme = document["components"]["securitySchemes"][name]
        assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    secured = {
        (method.upper(), path): entry["security"]
        for path, entries in document["paths"].items()
        for method, entry in entries.items()
        if entry.get("security")
    }
    admin = [{"adminToken": []}]
    feedback = [{"feedbackKey": []}, {"adminToken": []}]
    assert secured == {
        ("POST", "/retrain"): admin, ("GET", "/retrain"): admin,
        ("GET", "/retrain/{job_id}"): admin, ("POST", "/models/promote"): admin,
        ("PATCH", "/feedback/{feedback_id}"): admin, ("DELETE", "/feedback/{feedback_id}"): admin,
        ("POST", "/feedback"): feedback, ("GET", "/feedback"): feedback,
        ("GET", "/review"): feedback,
    }
    for method, path in secured:
        responses = document["paths"][path][method.lower()]["responses"]
        assert "401" in responses and "403" in responses


def with_examples(path: str, entry: dict) -> str:
    """``path`` with each path parameter replaced by its documented example."""
    for parameter in entry.get("parameters", []):
        if parameter["in"] == "path":
            path = path.replace("{" + parameter["name"] + "}", str(parameter["example"]))
    return path


def test_every_documented_example_is_accepted(api):
    document = api_document(operations(None))
    sent = 0
    for path, entries in document["paths"].items():
        for method, entry in entries.items():
            body = entry.get("requestBody")
            if body is None:
                continue
            example = body["content"]["application/json"]["examples"]["example"]["value"]
            response = api.request(method.upper(), with_examples(path, entry), json=example)
            documented = {int(code) for code in entry["responses"]}
            assert response.status_code < 300 or (
                response.status_code in documented and response.status_code not in (400, 422)
            ), (path, response.status_code, response.text)
            sent += 1
    assert sent >= 4


def test_swagger_ui_is_served_from_our_own_files(api):
    page = api.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/openapi.json" in page.text and "https://" not in page.text
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"):
        response = api.get(f"/docs/{asset}")
        assert response.status_code == 200 and len(response.content) > 1000, asset


def test_index_lists_every_endpoint(api):
    body = api.get("/").json()
    assert body["docs"] == "/docs"
    assert {"POST /predict", "GET /openapi.json", "GET /docs"} <= set(body["endpoints"])


def test_labels_combine_training_data_feedback_and_recall(api, plane_settings):
    texts = [f"recall probe {i}" for i in range(4)]
    predictions = api.post("/predict", json={"texts": texts}).json()["predictions"]
    api.post("/feedback", json={"items": [
        {"prediction_id": p["prediction_id"], "label": "refund"} for p in predictions
    ] + [{"text": "one-off", "label": "rare_label"}]})
    body = api.get("/labels").json()
    rows = {row["label"]: row for row in body["labels"]}
    assert body["min_examples"] == plane_settings.label_min_examples == 5
    assert rows["billing"]["training_examples"] == TRAIN_EXAMPLES_PER_LABEL
    assert rows["rare_label"]["status"] == "pending"
    assert rows["rare_label"]["training_examples"] == 0
    right = sum(p["label"] == "refund" for p in predictions)
    assert rows["refund"]["feedback_on_predictions"] == 4
    assert rows["refund"]["recall"] == pytest.approx(right / 4)


def test_feedback_pages_cover_everything_once(api):
    items = [{"text": f"paged {i}", "label": "paged"} for i in range(7)]
    api.post("/feedback", json={"items": items})
    seen, cursor = [], None
    while True:
        page = api.get("/feedback", params={"label": "paged", "limit": 3,
                                            **({"cursor": cursor} if cursor else {})}).json()
        seen += [item["text"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"paged {i}" for i in range(6, -1, -1)]


def test_unset_roles_refuse_clients_from_other_machines(data_plane, plane_settings):
    """With no feedback key or admin token set, only local clients may use those roles."""
    from starlette.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(data_plane, plane_settings), client=("203.0.113.7", 4000)) as remote:
        item = {"text": "where is my parcel", "label": "order_status"}
        answer = remote.post("/feedback", json={"items": [item]})
        assert answer.status_code == 403 and "REFIT_FEEDBACK_KEY" in answer.json()["error"]
        assert remote.post("/retrain", json={}).status_code == 403
        assert remote.post("/predict", json={"texts": ["hello"]}).status_code == 200


def test_since_accepts_every_real_calendar_day_and_no_other():
    # Every day of a leap year, a common year and the century years, at any date the suite runs.
    pattern = re.compile(SINCE_PATTERN)
    for year in (1900, 2000, 2026, 2028, 2100):
        for month in range(1, 13):
            for day in range(1, 32):
                text = f"{year}-{month:02d}-{day:02d}"
                try:
                    real = date(year, month, day) is not None
                except ValueError:
                    real = False
                assert bool(pattern.match(text)) is real, text
                assert bool(pattern.match(f"{text}T23:59:59+01:00")) is real, text
                if real:
                    query = FeedbackListQuery(since=f"{text}T12:00:00Z").to_query()
                    assert query.since == datetime(year, month, day, 12, tzinfo=UTC).timestamp()
    with pytest.raises(ValidationError, match="since"):
        FeedbackListQuery(since="2026-11-31")
