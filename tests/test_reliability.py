"""Hostile and unlucky input against a real server: forged ids, NUL characters, a rejected row,
a database outage, integers past any bound, clients that hang up, and the security headers.

Each test here reproduces a defect that once broke refit (issue 10) and fails without its fix.
The PostgreSQL tests run a cluster of their own (``PrivatePostgres``) so that they can stop it
mid-test without disturbing anything else.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import PrivatePostgres, ServiceProcess, wait_for

pytestmark = pytest.mark.server

FORGED_ID = "ffffffffffff0000000000000000"  # "issued" in the year 10889


@pytest.fixture(scope="module")
def private_postgres():
    pg = PrivatePostgres().init()
    if pg is None:
        pytest.skip("PostgreSQL 15 binaries not found in /usr/lib/postgresql/15/bin")
    yield pg
    pg.remove()


@pytest.fixture(scope="module")
def pg_server(trained_registry, private_postgres, tmp_path_factory):
    service = ServiceProcess(
        registry=trained_registry.root, data_dir=tmp_path_factory.mktemp("var-pg"),
        env={"REFIT_DATABASE_URL": private_postgres.url},
    ).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def sqlite_server(trained_registry, tmp_path_factory):
    service = ServiceProcess(
        registry=trained_registry.root, data_dir=tmp_path_factory.mktemp("var-sqlite"),
    ).start()
    yield service
    service.stop()


def feedback_by_id(client: httpx.Client, prediction_id: str, label: str = "order_status"):
    return client.post(
        "/feedback", json={"items": [{"prediction_id": prediction_id, "label": label}]}
    )


def stored_texts(database_url: str, ids: list[str]) -> dict[str, str]:
    """Texts of the predictions with these ids that the store holds (read past the service)."""
    from refit.store import Store

    store = Store.from_url(database_url)
    try:
        return {pid: record.text for pid, record in store.get_predictions(ids).items()}
    finally:
        store.close()


def wait_stored(database_url: str, ids: list[str], timeout: float = 15) -> dict[str, str]:
    return wait_for(
        lambda: (found := stored_texts(database_url, ids)) and len(found) == len(ids) and found,
        timeout, what=f"{len(ids)} predictions in the store",
    )


def test_forged_prediction_ids_never_wedge_a_worker(sqlite_server):
    """Ids from the far future used to make /feedback wait until then, filling the thread pool."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(
            lambda _: httpx.post(sqlite_server.url + "/feedback", timeout=30, json={
                "items": [{"prediction_id": FORGED_ID, "label": "x"}]}),
            range(24),
        ))
    assert {a.status_code for a in answers} == {404}
    assert answers[0].json()["field"] == "items[0].prediction_id"
    assert time.monotonic() - started < 15
    with sqlite_server.client(timeout=10) as client:
        for _ in range(6):  # reaches both workers
            assert (
                client.post("/predict", json={"texts": ["where is my parcel"]}).status_code == 200
            )
            assert client.get("/models").status_code == 200


@pytest.mark.parametrize("prediction_id", ["not-hex", "F" * 28, "0" * 27, "0" * 40, "a\u0000b"])
def test_malformed_prediction_ids_are_a_422_naming_the_field(sqlite_server, prediction_id):
    with sqlite_server.client() as client:
        answer = feedback_by_id(client, prediction_id)
    assert answer.status_code == 422
    assert answer.json()["field"] == "items[0].prediction_id"


@pytest.mark.parametrize("body, field", [
    ({"min_feedback": 18446744073709551616}, "min_feedback"),
    ({"min_feedback": 10**40}, "min_feedback"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"unfreeze_layers": 10**30}, "unfreeze_layers"),
])
def test_integers_past_their_bounds_are_a_422(sqlite_server, body, field):
    with sqlite_server.client() as client:
        answer = client.post("/retrain", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


@pytest.mark.parametrize("label", ["a\u0000b", "line\nbreak", "\u0007bell"])
def test_labels_with_control_characters_are_refused(sqlite_server, label):
    with sqlite_server.client() as client:
        answer = client.post("/feedback", json={"items": [{"text": "hello there", "label": label}]})
    assert answer.status_code == 422
    assert answer.json()["field"] == "items[0]"


@pytest.mark.parametrize("job_id", ["job-%00", "job-20261123-000000-ZZZZZZ", "x" * 5000])
def test_malformed_job_ids_are_a_404(sqlite_server, job_id):
    with sqlite_server.client() as client:
        answer = client.get(f"/retrain/{job_id}")
    assert answer.status_code == 404
    assert "error" in answer.json()


def test_a_client_that_hangs_up_mid_body_costs_nothing(sqlite_server):
    host, port = "127.0.0.1", sqlite_server.port
    for _ in range(20):
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 100000\r\n\r\n{\"texts\": [\"half a bo"
            )
    with sqlite_server.client(timeout=10) as client:
        for _ in range(6):
            assert client.post("/predict", json={"texts": ["still serving?"]}).status_code == 200


def test_security_headers_on_every_response(sqlite_server):
    with sqlite_server.client() as client:
        for answer in (
            client.post("/predict", json={"texts": ["hello"]}),
            client.post("/predict", json={"texts": []}),
            client.get("/metrics"),
            client.get("/models"),
        ):
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["x-frame-options"] == "DENY"
            assert "default-src 'none'" in answer.headers["content-security-policy"]
            assert answer.headers["cache-control"] == "no-store"


def test_inline_script_policy_allows_exactly_the_page_scripts():
    from service.security import inline_script_policy

    html = b"<html><script>alert(1)</script><script src='x.js'></script><script>b()</script></html>"
    policy = inline_script_policy(html)
    assert policy.count("'sha256-") == 2
    assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
    assert "sandbox allow-scripts" in policy
    assert "connect-src 'none'" in policy


# -- PostgreSQL ------------------------------------------------------------------------------------


def test_nul_characters_round_trip_and_never_block_the_log(pg_server):
    """A NUL used to fail the batch write on PostgreSQL, forever, blocking every later row."""
    with pg_server.client() as client:
        poisoned = client.post("/predict", json={"texts": ["a\u0000b", "where is my order"]})
        assert poisoned.status_code == 200
        ids = [p["prediction_id"] for p in poisoned.json()["predictions"]]
        later = [client.post("/predict", json={"texts": [f"later {i}"]}).json()["predictions"][0]
                 ["prediction_id"] for i in range(10)]
        stored = wait_stored(pg_server.env["REFIT_DATABASE_URL"], ids + later)
        assert stored[ids[0]] == "a\u0000b"
        assert feedback_by_id(client, ids[0]).status_code == 200
        by_text = client.post("/feedback", json={"items": [{"text": "x\u0000y", "label": "nul"}]})
        assert by_text.status_code == 200


def test_a_row_the_store_rejects_is_quarantined_not_retried_forever(pg_server, private_postgres):
    """Simulates a database that refuses one row (a constraint of the operator's): the rest of
    the batch and every later prediction are still written; the refused row is set aside."""
    psql = ["runuser", "-u", "postgres", "--", "psql", "-h", str(private_postgres.folder), "-p",
            str(private_postgres.port), "-qAtc"]
    subprocess.run([*psql, "ALTER TABLE predictions ADD CONSTRAINT refuse_poison "
                    "CHECK (text NOT LIKE '%poison-row%')"], check=True, capture_output=True)
    try:
        with pg_server.client() as client:
            answer = client.post("/predict", json={"texts": ["a poison-row here", "a good row"]})
            poison, good = (p["prediction_id"] for p in answer.json()["predictions"])
            later = client.post("/predict", json={"texts": ["after the poison"]}).json()
            wait_stored(private_postgres.url, [good, later["predictions"][0]["prediction_id"]])
            wait_for(lambda: feedback_by_id(client, poison).status_code == 404, 10,
                     what="the poison row to leave the buffer, unwritten")
            metrics = client.get("/metrics").text
        quarantined = [
            json.loads(line) for path in pg_server.data_dir.glob("quarantine/*.jsonl")
            for line in path.read_text().splitlines()
        ]
        assert [q["id"] for q in quarantined] == [poison]
        assert "refuse_poison" in quarantined[0]["error"]
        count = [line for line in metrics.splitlines()
                 if line.startswith("refit_prediction_log_quarantined_total")]
        assert count and float(count[0].split()[-1]) == 1.0
    finally:
        subprocess.run([*psql, "ALTER TABLE predictions DROP CONSTRAINT refuse_poison"],
                       check=True, capture_output=True)


def test_database_outage_is_a_503_not_a_500_and_nothing_is_lost(pg_server, private_postgres):
    with pg_server.client(timeout=30) as client:
        private_postgres.stop()
        try:
            answer = client.post("/feedback", json={"items": [{"text": "hi", "label": "greeting"}]})
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"].isdigit()
            assert "database" in answer.json()["error"]
            wait_for(lambda: client.get("/readyz").status_code == 503, 15,
                     what="/readyz to report the outage")
            during = [client.post("/predict", json={"texts": [f"during the outage {i}"]})
                      for i in range(10)]
            assert {a.status_code for a in during} == {200}
        finally:
            private_postgres.start()
        wait_for(lambda: client.get("/readyz").status_code == 200, 30,
                 what="/readyz once the database is back")
        wait_stored(private_postgres.url,
                    [a.json()["predictions"][0]["prediction_id"] for a in during], timeout=30)
