"""Online adaptation end to end: feedback → retrain → gated promotion → hot swap → rollback.

A real `bentoml serve` with 2 workers, a real training subprocess, SQLite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapters.serving.registry import ModelRegistry
from tests.readme_walkthrough import CurlCall, curl_calls
from tests.servers import wait_for

pytestmark = pytest.mark.server

TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}

# The README's own example feedback: a new intent (gift_card) and corrections, all by text.
README_FEEDBACK = json.loads(
    (Path(__file__).parent.parent / "data" / "demo" / "feedback.json").read_text()
)["items"]
GIFT_CARD_UNSEEN = [
    "I'd like to get a gift card for my colleague",
    "what gift card amounts can I choose",
    "can I use two gift cards on one order",
    "how long is a gift voucher valid",
]


def worker_versions(client: httpx.Client) -> dict[str, str]:
    """pid → the model version that worker serves, from /metrics."""
    text = client.get("/metrics").text
    serving = {}
    for line in text.splitlines():
        match = re.match(r'refit_model_info\{model_version="([^"]+)",pid="(\d+)"\} 1\.0', line)
        if match:
            serving[match.group(2)] = match.group(1)
    return serving


def wait_job(client: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    phases = []

    def finished():
        job = client.get(f"/retrain/{job_id}", headers=AUTH).json()
        if not phases or phases[-1] != job["phase"]:
            phases.append(job["phase"])
        return job if job["phase"] in ("done", "failed") else None

    job = wait_for(finished, timeout, 0.2, f"job {job_id}")
    job["seen_phases"] = phases
    return job


@pytest.fixture(scope="module")
def server(start_service):
    # Default gate and retrain settings: the walkthrough must work as a user gets it.
    return start_service("adapt", env={"REFIT_ADMIN_TOKEN": TOKEN})


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def test_admin_endpoints_need_the_token_and_predict_stays_open(client):
    assert client.post("/retrain", json={}).status_code == 401
    wrong = client.post("/retrain", json={}, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "admin token" in wrong.json()["error"]
    assert client.post("/models/promote", json={"version": "v1"}).status_code == 401
    assert client.get("/retrain/whatever").status_code == 401
    assert client.post("/predict", json={"texts": ["hi there"]}).status_code == 200
    assert client.get("/models").status_code == 200


def test_too_little_feedback_is_a_clear_409(client):
    response = client.post("/retrain", json={}, headers=AUTH)
    assert response.status_code == 409
    body = response.json()
    assert "at least 20" in body["error"] and body["feedback_items"] < 20


def test_unknown_job_is_404(client):
    response = client.get("/retrain/job-nope", headers=AUTH)
    assert response.status_code == 404 and "job-nope" in response.json()["error"]


def run_readme_call(client: httpx.Client, call: CurlCall, ids: dict[str, str]) -> httpx.Response:
    """One of the README's curl commands against the test server, as README tells a user to run it.

    The README's example ids (prediction and job) are replaced by the ones this server returned;
    the admin token goes on the retrain and promote calls, as the README says to add it.
    """
    path, body = call.path, call.body
    for example, real in ids.items():
        path = path.replace(example, real)
        body = body.replace(example, real) if body is not None else None
    headers = dict(call.headers)
    if path.startswith(("/retrain", "/models/promote")):
        headers.update(AUTH)
    return client.request(call.method, path, headers=headers, content=body)


def test_readme_walkthrough_works_as_written(client, server):
    """Every curl of the README's "Try it", in order, with default settings: v2 serves gift_card."""
    calls = curl_calls()
    paths = [call.path for call in calls]
    assert paths[:4] == ["/predict", "/feedback", "/feedback", "/retrain"], paths
    readme_prediction_id = json.loads(calls[1].body)["items"][0]["prediction_id"]
    readme_job_id = calls[4].path.rsplit("/", 1)[1]
    ids: dict[str, str] = {}
    responses: list[httpx.Response] = []
    job: dict = {}
    for call in calls:
        response = run_readme_call(client, call, ids)
        # Until the drift window holds enough predictions, the report is a JSON 404 saying so.
        not_yet = call.path == "/drift/report" and response.status_code == 404
        assert response.status_code < 400 or not_yet, (
            call.source, response.status_code, response.text
        )
        if not_yet:
            assert "no drift report yet" in response.json()["error"]
        responses.append(response)
        if call.path == "/predict" and not ids:
            ids[readme_prediction_id] = response.json()["predictions"][0]["prediction_id"]
        elif call.path == "/retrain":
            assert response.status_code == 202
            ids[readme_job_id] = response.json()["job_id"]
            job = wait_job(client, ids[readme_job_id])  # the README's next call shows it done
            print("walkthrough job:", json.dumps(job["result"]))
            if (job.get("result") or {}).get("promoted"):
                # "see the new intent served by every worker": each follows within about 1.5 s.
                wait_for(lambda: set(worker_versions(client).values()) == {"v2"}, 15,
                         what="both workers on v2")
        elif call.path == "/models/promote":
            wait_for(lambda: set(worker_versions(client).values()) == {"v1"}, 15,
                     what="both workers back on v1")

    feedback = [r.json() for r, c in zip(responses, calls, strict=True) if c.path == "/feedback"]
    assert feedback[0]["accepted"] == 2
    assert feedback[1]["accepted"] == len(README_FEEDBACK)
    assert job["phase"] == "done", job
    result = job["result"]
    assert result["version"] == "v2" and result["parent"] == "v1"
    assert result["promoted"] is True, result["gate"]
    assert result["new_labels"] == ["gift_card"]
    # The Norway item's label, given once, is pending: kept, not trained on, not blocking.
    assert result["pending_labels"] == ["shipping_question"]
    status = {s["label"]: s for s in result["label_status"]}
    assert status["shipping_question"]["status"] == "pending"
    assert status["shipping_question"]["feedback_count"] == 1
    assert "shipping_question" not in result["labels"]
    assert status["gift_card"]["status"] == "active"
    gate = result["gate"]
    old = gate["old_classes"]
    assert old["examples"] == old["champion"]["examples"] == old["challenger"]["examples"] > 70
    assert old["difference"]["ci"][0] <= old["difference"]["value"] <= old["difference"]["ci"][1]
    assert gate["challenger"]["per_new_class_accuracy"]["gift_card"] >= 0.6
    assert job["progress"]["epoch"] >= 1
    assert set(job["seen_phases"]) <= {
        "queued", "collecting", "training", "exporting", "evaluating", "promoting", "done"
    }
    served = [r.json() for r, c in zip(responses, calls, strict=True) if c.path == "/predict"][-1]
    assert served["model_version"] == "v2"
    assert served["predictions"][0]["label"] == "gift_card", served
    models = [r.json() for r, c in zip(responses, calls, strict=True) if c.path == "/models"][-1]
    assert models["current"] == "v2"
    assert client.get("/models").json()["current"] == "v1"  # the walkthrough's last step


def test_promoted_version_swaps_everywhere_and_rolls_back(client, server):
    """After the walkthrough: v2 again on every worker, its manifest, cached embeddings, restart."""
    jobs = client.get("/retrain", headers=AUTH).json()["jobs"]
    job_id = next(j["job_id"] for j in jobs if (j["result"] or {}).get("version") == "v2")
    assert client.post("/models/promote", json={"version": "v2"}, headers=AUTH).status_code == 200
    items_posted = 2 + len(README_FEEDBACK)

    # Every worker swaps to v2 within a few seconds.
    swapped_at = time.monotonic()
    wait_for(
        lambda: set(worker_versions(client).values()) == {"v2"}
        and len(worker_versions(client)) == 2,
        15, what="both workers on v2",
    )
    assert time.monotonic() - swapped_at < 15
    after = client.post("/predict", json={"texts": GIFT_CARD_UNSEEN}).json()
    assert after["model_version"] == "v2"
    hits = sum(p["label"] == "gift_card" for p in after["predictions"])
    assert hits >= 3, after
    assert "shipping_question" not in {p["label"] for p in after["predictions"]}
    manifest = ModelRegistry(server.registry).get("v2").manifest
    assert manifest["gate"]["promote"] is True and manifest["parent"] == "v1"
    # Feedback given as text was embedded once, and the embedding cached for later jobs.
    from refit.store import Store

    store = Store.from_url(f"sqlite:///{server.data_dir / 'refit.db'}")
    by_text = [row for row in store.all_feedback() if row.prediction_id is None]
    store.close()
    assert len(by_text) == len(README_FEEDBACK) + 1  # and the Norway item
    trained_on = [row for row in by_text if row.label != "shipping_question"]
    assert all(row.embedding is not None and row.encoder_id == manifest["encoder"]["id"]
               for row in trained_on)
    assert manifest["training"]["retrain"]["feedback_items"] == items_posted
    assert manifest["training"]["retrain"]["pending_labels"] == ["shipping_question"]

    # Rollback through the API.
    back = client.post("/models/promote", json={"version": "v1"}, headers=AUTH)
    assert back.status_code == 200 and back.json()["previous"] == "v2"
    wait_for(lambda: set(worker_versions(client).values()) == {"v1"}, 15,
             what="both workers back on v1")
    assert client.get("/models").json()["current"] == "v1"
    rolled_back = client.post("/predict", json={"texts": GIFT_CARD_UNSEEN}).json()
    assert rolled_back["model_version"] == "v1"
    # v1's head never learnt gift_card: any such answer now comes from the feedback memory,
    # which keeps the feedback in effect across a rollback.
    assert all(p["source"] == "feedback" for p in rolled_back["predictions"]
               if p["label"] == "gift_card"), rolled_back

    # The job record survives a restart of the server.
    server.stop()
    server.start()
    with server.client() as fresh:
        again = fresh.get(f"/retrain/{job_id}", headers=AUTH).json()
        assert again["phase"] == "done" and again["result"]["version"] == "v2"


def test_no_failed_request_while_workers_swap(client, server):
    registry = ModelRegistry(server.registry)
    versions = {v.name: set(v.labels) for v in registry.list_versions()}
    assert len(versions) >= 2
    stop = threading.Event()
    results: list[tuple[int, str | None, list[str]]] = []
    lock = threading.Lock()

    def hammer():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(
                        "/predict", json={"texts": ["where is my order", "gift card please"]}
                    )
                    body = r.json() if r.status_code == 200 else {}
                    # The model's answers only: the feedback memory may answer with a label
                    # (gift_card) that the version serving the request does not know yet.
                    entry = (r.status_code, body.get("model_version"),
                             [p["label"] for p in body.get("predictions", [])
                              if p["source"] == "model"])
                except httpx.HTTPError as exc:
                    entry = (0, repr(exc), [])
                with lock:
                    results.append(entry)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for target in ("v2", "v1", "v2", "v1"):
            promoted = client.post("/models/promote", json={"version": target}, headers=AUTH)
            assert promoted.status_code == 200
            wait_for(lambda target=target: set(worker_versions(client).values()) == {target},
                     15, what=f"workers on {target}")
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:5]
    assert len(results) > 50
    seen = {version for _, version, _ in results}
    assert seen == {"v1", "v2"}
    for _, version, labels in results:
        # A request runs on one version from start to end.
        assert set(labels) <= versions[version]


def test_killed_training_process_leaves_registry_and_service_intact(client, server):
    registry = ModelRegistry(server.registry)
    before_versions = [v.name for v in registry.list_versions()]
    before_pointer = registry.pointer()
    started = client.post("/retrain", json={"search": "grid"}, headers=AUTH)
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    job = wait_for(
        lambda: (
            (j := client.get(f"/retrain/{job_id}", headers=AUTH).json())["phase"] == "training"
            and j
        ),
        120, 0.1, "the job to reach training",
    )
    os.kill(job["pid"], signal.SIGKILL)
    failed = wait_job(client, job_id, timeout=30)
    assert failed["phase"] == "failed"
    assert "killed by signal 9" in failed["error"] or "gone" in failed["error"]
    assert [v.name for v in registry.list_versions()] == before_versions
    assert registry.pointer() == before_pointer
    assert client.post("/predict", json={"texts": ["still serving?"]}).status_code == 200
    # A new job may start once the dead one is failed.
    assert client.post("/retrain", json={"min_feedback": 10_000}, headers=AUTH).status_code == 409
    too_little = client.post("/retrain", json={"min_feedback": 10_000}, headers=AUTH)
    assert "at least 10000" in too_little.json()["error"]


def test_a_version_that_fails_to_load_keeps_the_old_one_serving(client, server):
    registry = ModelRegistry(server.registry)
    serving = client.get("/models").json()["current"]
    good = registry.get(serving)
    with registry.stage() as staged:
        for name in ("tokenizer.json", "labels.json"):
            (staged.path / name).write_bytes((good.path / name).read_bytes())
        (staged.path / "model.onnx").write_bytes(b"this is not an onnx model")
        broken = registry.commit(staged, {**good.manifest, "parent": serving})
    promoted = client.post("/models/promote", json={"version": broken.name}, headers=AUTH)
    assert promoted.status_code == 200

    def reported():
        body = client.get("/models").json()
        return body if body["serving"]["last_swap_error"] else None

    body = wait_for(reported, 15, what="the failed load to be reported")
    assert broken.name in body["serving"]["last_swap_error"]
    assert body["serving"]["version"] == serving
    assert client.post("/predict", json={"texts": ["hello"]}).json()["model_version"] == serving
    assert 'refit_model_swaps_total{outcome="failed"}' in client.get("/metrics").text
    # Rolling back to the good version clears the error.
    rolled_back = client.post("/models/promote", json={"version": serving}, headers=AUTH)
    assert rolled_back.status_code == 200
