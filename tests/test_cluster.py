"""Two replicas behind a load balancer, sharing one PostgreSQL and one registry folder: real
processes throughout.

Each replica is its own ``bentoml serve`` (two workers) with its own data folder and its own
instance name (as two pods have two host names); both use one PostgreSQL and one registry folder,
and HAProxy balances over them with health checks on ``/readyz``. Checked here, with the
defaults a user gets for heartbeats, leases and the swap poll:

- feedback by ``prediction_id`` works whichever replica made the prediction;
- exactly one drift job runs in the cluster, and ``/drift`` is the same on both replicas;
- a retrain started through one replica ends with both serving the new version within 5 s of the
  promotion, and no request through the balancer fails meanwhile;
- a rolling restart of both replicas, one after the other, under load fails no request (each
  replica is drained at the balancer first, as Kubernetes removes a terminating pod's endpoint);
- SIGKILL of the replica running a retrain (with everything it started, as when a pod dies): the
  job shows ``failed`` within 30 s, the drift job moves to the other replica, which keeps serving,
  and a new retrain through it succeeds.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from adapters.serving.data import read_jsonl
from adapters.serving.registry import ModelRegistry
from refit.leases import LeaseStore
from refit.store import FeedbackQuery, Store
from tests.servers import (
    HAProxyProcess,
    PrivatePostgres,
    ServiceProcess,
    copy_registry,
    process_tree,
    wait_for,
)

pytestmark = [
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("haproxy") is None,
        reason="HAProxy not installed (make test-prereqs installs Debian's package)",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
DEMO = read_jsonl(ROOT / "data" / "demo" / "intents.jsonl")
FEEDBACK = json.loads((ROOT / "data" / "demo" / "feedback.json").read_text())
NAMES = ("a", "b")


class Cluster:
    def __init__(self, folder: Path, registry: Path, database_url: str) -> None:
        self.folder = folder
        self.registry = ModelRegistry(registry)
        self.database_url = database_url
        self.replicas: dict[str, ServiceProcess] = {}
        self.balancer: HAProxyProcess | None = None

    def replica(self, name: str, port: int | None = None) -> ServiceProcess:
        service = ServiceProcess(
            registry=self.registry.root, data_dir=self.folder / f"replica-{name}",
            env={
                "REFIT_DATABASE_URL": self.database_url,
                "REFIT_INSTANCE_NAME": f"replica-{name}",
                # The default (tests/servers.py shortens it for single-server tests).
                "REFIT_SWAP_POLL_INTERVAL_S": "1.0",
                # Drift every few seconds and over a small window, so the test sees results.
                "REFIT_DRIFT_INTERVAL_S": "3",
                "REFIT_DRIFT_WINDOW": "200",
                "REFIT_DRIFT_MIN_WINDOW": "50",
            },
        )
        if port is not None:
            service.port = port
        self.replicas[name] = service
        return service

    def start(self) -> Cluster:
        for name in NAMES:
            self.replica(name).start()
        self.balancer = HAProxyProcess(
            self.folder / "haproxy", {name: r.port for name, r in self.replicas.items()}
        ).start()
        return self

    def restart(self, name: str) -> None:
        old = self.replicas[name]
        old.stop()
        self.replica(name, port=old.port).start()

    def drift_jobs(self) -> dict[str, int]:
        """Running drift-job processes per replica (from the process trees)."""
        counts = {}
        for name, service in self.replicas.items():
            counts[name] = 0
            if service.proc is None or service.proc.poll() is not None:
                continue
            for pid in process_tree(service.proc.pid):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"monitoring.drift_job" in cmdline:
                    counts[name] += 1
        return counts

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for service in self.replicas.values():
            service.stop()


@pytest.fixture(scope="module")
def cluster(trained_registry, tmp_path_factory):
    pg = PrivatePostgres().init()
    if pg is None:
        pytest.skip("PostgreSQL 15 binaries not found in /usr/lib/postgresql/15/bin")
    folder = tmp_path_factory.mktemp("cluster")
    registry = copy_registry(trained_registry.root, folder / "registry")
    running = Cluster(folder, registry, pg.url)
    try:
        yield running.start()
    finally:
        running.stop()
        pg.remove()


class Load:
    """Clients predicting through the balancer until stopped; every failure is recorded."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answered = 0
        self.versions: set[str] = set()
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def _run(self, index: int) -> None:
        texts = list(DEMO.texts)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            n = index
            while not self.stop.is_set():
                n += 3
                try:
                    answer = client.post("/predict", json={"texts": [texts[n % len(texts)]]})
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if answer.status_code != 200:
                    self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                else:
                    self.answered += 1
                    self.versions.add(answer.json()["model_version"])
                time.sleep(0.02)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def serving_versions(service: ServiceProcess) -> dict[str, str]:
    """The version each live worker of a replica serves, by pid (from its /metrics)."""
    text = httpx.get(service.url + "/metrics", timeout=10).text
    found: dict[str, str] = {}
    for match in re.finditer(
        r'^refit_model_info\{([^}]*)\} 1\.0$', text, flags=re.MULTILINE
    ):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        found[labels["pid"]] = labels["model_version"]
    return found


def retrain(client: httpx.Client, timeout: float = 300) -> dict:
    started = client.post("/retrain", json={"force": True})
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    return wait_for(
        lambda: (j := client.get(f"/retrain/{job_id}").json())["phase"] in ("done", "failed")
        and j, timeout, 0.5, "the retrain to end",
    )


def test_feedback_by_prediction_id_works_whichever_replica_predicted(cluster):
    a, b = cluster.replicas["a"], cluster.replicas["b"]
    for source, target in ((a, b), (b, a)):
        with source.client() as c:
            prediction = c.post("/predict", json={"texts": ["where is my parcel"]}).json()
        prediction_id = prediction["predictions"][0]["prediction_id"]
        # At once: the prediction may still be in the other replica's write buffer.
        with target.client() as c:
            answer = c.post("/feedback", json={
                "items": [{"prediction_id": prediction_id, "label": "order_status"}]})
            assert answer.status_code == 200, answer.text
        entry = Store.from_url(cluster.database_url).list_feedback(FeedbackQuery(limit=1))[0]
        assert entry.prediction_id == prediction_id and entry.text == "where is my parcel"


def test_one_drift_job_in_the_cluster_and_the_same_drift_on_every_replica(cluster):
    wait_for(lambda: sum(cluster.drift_jobs().values()), 30, 0.5, "a drift job to start")
    time.sleep(2 * 5.0)  # a few lease renewals later: still exactly one
    counts = cluster.drift_jobs()
    assert sum(counts.values()) == 1, counts
    leader = next(name for name, count in counts.items() if count)
    holder = LeaseStore(Store.from_url(cluster.database_url).engine).holder("drift-job")
    assert holder is not None and holder.startswith(f"replica-{leader}:"), holder

    with httpx.Client(base_url=cluster.balancer.url, timeout=30) as c:
        texts = list(DEMO.texts)[:120]
        for i in range(0, len(texts), 12):
            assert c.post("/predict", json={"texts": texts[i:i + 12]}).status_code == 200
    started = time.time()

    def same_everywhere() -> dict | None:
        first = httpx.get(cluster.replicas["a"].url + "/drift", timeout=10).json()
        other = httpx.get(cluster.replicas["b"].url + "/drift", timeout=10).json()
        again = httpx.get(cluster.replicas["a"].url + "/drift", timeout=10).json()
        if first.get("status") != "ok" or first["computed_at"] < started:
            return None
        return first if first == other == again else None

    result = wait_for(same_everywhere, 60, 0.5, "the same fresh drift result on both replicas")
    assert result["window"]["size"] >= 50
    reports = [httpx.get(r.url + "/drift/report", timeout=30) for r in cluster.replicas.values()]
    assert all(r.status_code == 200 for r in reports)
    assert len(reports[0].content) > 10_000


class SwapWatch:
    """Polls every worker's version from the moment a retrain starts, so the time every worker
    serves a new version is observed when it happens, not after the job's end is noticed."""

    def __init__(self, replicas: list[ServiceProcess], before: str) -> None:
        self.replicas, self.before = replicas, before
        self.seen: dict[str, float] = {}  # version -> first time every worker served it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                seen = [serving_versions(r) for r in self.replicas]
            except httpx.HTTPError:
                continue
            versions = {v for workers in seen for v in workers.values()}
            if all(seen) and len(versions) == 1 and (v := versions.pop()) != self.before:
                self.seen.setdefault(v, time.time())

    def __enter__(self) -> SwapWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_retrain_reaches_both_replicas_within_5s_and_no_request_fails(cluster):
    a = cluster.replicas["a"]
    before = cluster.registry.pointer().version
    with (Load(cluster.balancer.url) as load, a.client(timeout=60) as c,
          SwapWatch(list(cluster.replicas.values()), before) as watch):
        assert c.post("/feedback", json=FEEDBACK).status_code == 200
        job = retrain(c)
        assert job["phase"] == "done" and job["result"]["promoted"], job
        version = job["result"]["version"]
        pointer = cluster.registry.pointer()
        assert pointer.version == version != before
        promoted_at = datetime.fromisoformat(pointer.promoted_at).timestamp()
        converged = wait_for(lambda: watch.seen.get(version), 30, 0.1,
                             f"every worker of both replicas on {version}")
        time.sleep(2)  # keep the load on a little after the swap
    print(f"\nboth replicas on {version} {converged - promoted_at:.2f}s after the promotion; "
          f"{load.answered} requests through the balancer, {len(load.failures)} failed")
    assert converged - promoted_at <= 5.0, f"{converged - promoted_at:.1f}s after the promotion"
    assert load.failures == [], load.failures[:5]
    assert load.answered > 50 and version in load.versions


def test_a_rolling_restart_under_load_fails_no_request(cluster):
    balancer = cluster.balancer
    with Load(balancer.url) as load:
        time.sleep(1)
        for name in NAMES:
            balancer.drain(name)  # as Kubernetes removes a terminating pod's endpoint
            cluster.restart(name)  # SIGTERM, then a fresh process once it exited
            balancer.enable(name)  # traffic again once /readyz passes the health check
            time.sleep(1)
    print(f"\nrolling restart: {load.answered} requests through the balancer, "
          f"{len(load.failures)} failed")
    assert load.failures == [], load.failures[:5]
    assert load.answered > 50
    # Still exactly one drift job after both replicas restarted.
    wait_for(lambda: sum(cluster.drift_jobs().values()) == 1, 40, 0.5, "one drift job")


def test_sigkill_of_the_replica_running_a_retrain(cluster):
    wait_for(lambda: sum(cluster.drift_jobs().values()) == 1, 40, 0.5, "one drift job")
    counts = cluster.drift_jobs()
    # Kill the replica that also runs the drift job: both must move to the survivor.
    doomed = next(name for name, count in counts.items() if count)
    alive = next(name for name in NAMES if name != doomed)
    survivor = cluster.replicas[alive]
    with cluster.replicas[doomed].client() as c:
        job_id = c.post("/retrain", json={"force": True}).json()["job_id"]
        wait_for(lambda: c.get(f"/retrain/{job_id}").json()["phase"] not in ("queued",),
                 60, 0.5, "the retrain to start")
    job = httpx.get(f"{survivor.url}/retrain/{job_id}", timeout=10).json()
    assert job["host"] == f"replica-{doomed}" and job["phase"] != "failed", job

    cluster.replicas[doomed].kill()  # the server, its workers, the retrain and the drift job
    killed_at = time.monotonic()
    failures: list[str] = []
    with survivor.client(timeout=30) as c:
        def failed() -> dict | None:
            answer = c.post("/predict", json={"texts": ["can I pay by card"]})
            if answer.status_code != 200:
                failures.append(f"{answer.status_code}: {answer.text[:200]}")
            j = c.get(f"/retrain/{job_id}").json()
            return j if j["phase"] == "failed" else None

        job = wait_for(failed, 30, 0.5, "the killed replica's job to show failed")
        noticed = time.monotonic() - killed_at
        assert "heartbeat" in job["error"] and f"replica-{doomed}" in job["error"], job
        assert failures == [], failures[:5]
        assert noticed <= 30
        # The drift job moves to the survivor within 30 s of the death, too.
        wait_for(lambda: cluster.drift_jobs() == {doomed: 0, alive: 1},
                 max(0.5, 30 - (time.monotonic() - killed_at)), 0.5,
                 "the drift job to move to the survivor")
        moved = time.monotonic() - killed_at
        print(f"\nSIGKILL: job failed {noticed:.1f}s and the drift job moved {moved:.1f}s after "
              "the kill")
        # The balancer sends everything to the survivor.
        wait_for(lambda: cluster.balancer.up() == {alive}, 10, 0.2,
                 "haproxy to mark the dead replica down")
        with httpx.Client(base_url=cluster.balancer.url, timeout=30) as through:
            for _ in range(10):
                assert through.post("/predict", json={"texts": ["hello"]}).status_code == 200
        # And a new retrain through the survivor succeeds.
        again = retrain(c)
        assert again["phase"] == "done" and again["result"]["promoted"], again
        assert again["host"] == f"replica-{alive}"
