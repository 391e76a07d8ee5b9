"""Fault injection against a real server: SIGKILL under load, a database outage under load, and a
full disk under the registry during a retrain.

What is promised, and checked here:
- a feedback item the service acknowledged (200) survives any crash: 0 lost;
- a prediction the service answered is written unless the process died within the flush window
  (``REFIT_LOG_FLUSH_INTERVAL_MS``, 200 ms) of answering it;
- a PostgreSQL stop and start under load fails no request to /predict and loses no prediction,
  with no restart of refit;
- a retrain that runs out of disk fails clearly, and serving and the registry stay intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapters.serving.registry import ModelRegistry
from refit.store import Store
from tests.servers import PrivatePostgres, ServiceProcess, copy_registry, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
FLUSH_WINDOW_S = 0.2


@pytest.fixture(scope="module")
def private_postgres():
    pg = PrivatePostgres().init()
    if pg is None:
        pytest.skip("PostgreSQL 15 binaries not found in /usr/lib/postgresql/15/bin")
    yield pg
    pg.remove()


class Load:
    """Clients posting predictions and feedback until stopped, recording what was acknowledged."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.predictions: list[tuple[float, str]] = []  # (time answered, prediction id)
        self.feedback_ids: list[int] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    if index % 2 == 0:
                        answer = client.post("/predict", json={"texts": [f"load {index} {n}"]})
                        if answer.status_code == 200:
                            with self._lock:
                                self.predictions.append(
                                    (time.time(), answer.json()["predictions"][0]["prediction_id"]))
                        else:
                            self.failures.append(f"predict {answer.status_code}")
                    else:
                        answer = client.post("/feedback", json={"items": [
                            {"text": f"feedback {index} {n}", "label": "order_status"}]})
                        if answer.status_code == 200:
                            with self._lock:
                                self.feedback_ids += answer.json()["feedback_ids"]
                except httpx.HTTPError as exc:
                    self.failures.append(type(exc).__name__)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_under_load_loses_no_acknowledged_feedback(
    backend, trained_registry, tmp_path, request
):
    if backend == "postgresql":
        url = request.getfixturevalue("private_postgres").url
    else:
        url = f"sqlite:///{tmp_path / 'refit.db'}"
    store = Store.from_url(url)
    before_feedback = {row.id for row in store.all_feedback()}
    service = ServiceProcess(registry=trained_registry.root, data_dir=tmp_path / "var",
                             env={"REFIT_DATABASE_URL": url}).start()
    with Load(service.url) as load:
        time.sleep(4)
        killed_at = time.time()
        service.kill()
    acknowledged = set(load.feedback_ids)
    assert len(acknowledged) > 20 and len(load.predictions) > 20, "too little load to judge"
    stored_feedback = {row.id for row in store.all_feedback()} - before_feedback
    assert acknowledged - stored_feedback == set(), "acknowledged feedback lost"
    answered = [pid for t, pid in load.predictions]
    stored = store.get_predictions(answered)
    lost_early = [pid for t, pid in load.predictions
                  if pid not in stored and t < killed_at - FLUSH_WINDOW_S - 0.3]
    assert lost_early == [], f"{len(lost_early)} predictions lost from before the flush window"
    store.close()
    # The same data folder and database serve again after the crash.
    again = ServiceProcess(registry=trained_registry.root, data_dir=tmp_path / "var",
                           port=service.port, env={"REFIT_DATABASE_URL": url}).start()
    try:
        with again.client() as client:
            assert client.post("/predict", json={"texts": ["after the crash"]}).status_code == 200
    finally:
        again.stop()


def test_postgres_stop_and_start_under_load(trained_registry, private_postgres, tmp_path):
    service = ServiceProcess(registry=trained_registry.root, data_dir=tmp_path / "var",
                             env={"REFIT_DATABASE_URL": private_postgres.url}).start()
    try:
        load = Load(service.url, threads=2)
        load._threads = load._threads[:1]  # predictions only: feedback needs the database
        with load:
            time.sleep(1)
            private_postgres.stop()
            time.sleep(4)
            private_postgres.start()
            time.sleep(1)
        assert load.failures == []
        assert len(load.predictions) > 20
        store = Store.from_url(private_postgres.url)
        ids = [pid for _, pid in load.predictions]
        wait_for(lambda: len(store.get_predictions(ids)) == len(ids), 30,
                 what="every prediction answered during the outage in the store")
        store.close()
        assert service.proc is not None and service.proc.poll() is None
    finally:
        service.stop()


def test_disk_full_under_the_registry_fails_the_retrain_cleanly(trained_registry, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the registry needs root")
    source = trained_registry.current().path
    used = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    size_kb = used // 1024 + 8 * 1024  # the serving version fits; another copy of it does not
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                   check=True)
    try:
        registry = ModelRegistry(copy_registry(trained_registry.root, mount / "registry"))
        versions_before = [v.name for v in registry.list_versions()]
        service = ServiceProcess(registry=registry.root, data_dir=tmp_path / "var").start()
        try:
            with service.client() as client:
                feedback = json.loads((ROOT / "data" / "demo" / "feedback.json").read_text())
                assert client.post("/feedback", json=feedback).status_code == 200
                job = client.post("/retrain", json={"force": True}).json()
                done = wait_for(
                    lambda: (j := client.get(f"/retrain/{job['job_id']}").json())["phase"]
                    in ("done", "failed") and j, 300, what="the retrain to end")
                assert done["phase"] == "failed", done
                assert "space" in done["error"].lower(), done["error"]
                assert str(mount) not in done["error"]
                answer = client.post("/predict", json={"texts": ["where is my order"]})
                assert answer.status_code == 200
                assert answer.json()["model_version"] == registry.pointer().version
            assert [v.name for v in registry.list_versions()] == versions_before
            assert registry.current() is not None
            leftovers = list((registry.root / ".staging").glob("*")) if (
                registry.root / ".staging").exists() else []
            assert leftovers == [], f"staging not cleaned: {leftovers}"
        finally:
            service.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
