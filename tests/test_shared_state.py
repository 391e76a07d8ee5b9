"""State that replicas share through one store and one registry folder, on real SQLite and a real
PostgreSQL: the drift job's lease, drift results, retrain heartbeats, and staging clean-up that
never touches another host's work in progress.

Replicas are played by separate store connections (engines) and by distinct instance names, as
two pods would be; ``tests/test_cluster.py`` runs the real thing with two servers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from adapters.serving.registry import ModelRegistry, host_key
from monitoring.drift_store import DriftResultStore
from monitoring.leader import LeaseElection
from refit.jobs import RetrainOptions
from refit.leases import LeaseStore
from refit.settings import load_settings
from refit.store import Store
from service.jobs import RetrainJobs
from tests.servers import PrivatePostgres, wait_for


@pytest.fixture(scope="module")
def private_postgres():
    pg = PrivatePostgres().init()
    if pg is None:
        pytest.skip("PostgreSQL 15 binaries not found in /usr/lib/postgresql/15/bin")
    yield pg
    pg.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'refit.db'}"
    pg = request.getfixturevalue("private_postgres")
    store = Store.from_url(pg.url)
    with store.engine.begin() as conn:  # a fresh start for each test
        for table in ("refit_leases", "drift_results", "retrain_jobs"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    store.close()
    return pg.url


def replica(url: str) -> Store:
    """One replica's own connection pool to the shared store."""
    return Store.from_url(url)


# -- the drift job's lease ---------------------------------------------------------------------


def test_one_holder_at_a_time_and_takeover_once_it_expires(url):
    a, b = LeaseStore(replica(url).engine), LeaseStore(replica(url).engine)
    assert a.acquire("drift-job", "pod-a", ttl_s=2)
    assert not b.acquire("drift-job", "pod-b", ttl_s=2)
    assert a.acquire("drift-job", "pod-a", ttl_s=2)  # a renewal
    assert b.holder("drift-job") == "pod-a"
    time.sleep(2.3)  # pod-a stops renewing (it died)
    assert b.holder("drift-job") is None
    assert b.acquire("drift-job", "pod-b", ttl_s=2)
    assert not a.acquire("drift-job", "pod-a", ttl_s=2)  # back from the dead: too late
    b.release("drift-job", "pod-b")
    assert a.acquire("drift-job", "pod-a", ttl_s=2)  # released: taken at once


def test_lease_elections_elect_one_leader_and_hand_over(url):
    leases = [LeaseStore(replica(url).engine) for _ in range(3)]
    elections = [LeaseElection(lease, f"pod-{i}", heartbeat_s=0.5, timeout_s=1.5)
                 for i, lease in enumerate(leases)]
    assert [e.lead() for e in elections] == [True, False, False]
    assert [e.lead() for e in elections] == [True, False, False]
    elections[0].resign()  # a clean stop hands over at once
    assert [e.lead() for e in elections[1:]] == [True, False]
    # The leader dies silently: the next one leads once the lease times out, not before.
    started = time.monotonic()
    while not elections[2].lead():
        assert time.monotonic() - started < 3, "no takeover"
        time.sleep(0.1)
    assert time.monotonic() - started >= 1.0


# -- drift results ---------------------------------------------------------------------------


def test_every_replica_reads_the_drift_result_and_report_one_wrote(url):
    writer, reader = DriftResultStore(replica(url).engine), DriftResultStore(replica(url).engine)
    assert reader.latest() is None and reader.report() is None
    writer.save_result({"status": "ok", "drift_detected": True, "window": {"size": 3}})
    writer.save_report(b"<html>first</html>")
    first = reader.report_version()
    writer.save_report(b"<html>second</html>")
    assert reader.latest() == {"status": "ok", "drift_detected": True, "window": {"size": 3}}
    written, body = reader.report()
    assert body == b"<html>second</html>" and written >= first


# -- retrain jobs ------------------------------------------------------------------------------


def jobs_on(url: str, instance: str, tmp_path) -> RetrainJobs:
    settings = load_settings(
        database_url=url, data_dir=tmp_path / instance, instance_name=instance,
        heartbeat_interval_s=0.5, lease_timeout_s=2,
    )
    return RetrainJobs(settings, replica(url))


def test_a_job_whose_replica_vanished_fails_on_every_replica_and_the_next_can_start(url, tmp_path):
    a, b = jobs_on(url, "pod-a", tmp_path), jobs_on(url, "pod-b", tmp_path)
    a.store.create_job("job-20261129-000000-aaaaaa", RetrainOptions())
    # pod-a's training process: pid 1 is alive here, but pids on another pod mean nothing.
    a.store.update_job("job-20261129-000000-aaaaaa", pid=1, host="pod-a", phase="training")
    for _ in range(4):  # heartbeats keep it running, as pod-b sees it
        time.sleep(0.5)
        assert a.store.heartbeat_job("job-20261129-000000-aaaaaa")
        assert b.get("job-20261129-000000-aaaaaa").phase == "training"
    time.sleep(2.2)  # pod-a is gone: no heartbeat for longer than the lease
    job = b.get("job-20261129-000000-aaaaaa")
    assert job.phase == "failed" and "pod-a" in job.error and "heartbeat" in job.error
    # Its process, were it alive somewhere, learns that it was given up on.
    assert not a.store.heartbeat_job("job-20261129-000000-aaaaaa")
    b.store.create_job("job-20261129-000001-bbbbbb", RetrainOptions())  # no conflict
    assert b.store.running_job().job_id == "job-20261129-000001-bbbbbb"


def test_on_its_own_instance_a_dead_process_fails_the_job_at_once(url, tmp_path):
    a = jobs_on(url, "pod-a", tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a.store.create_job("job-20261129-000002-cccccc", RetrainOptions())
    a.store.update_job("job-20261129-000002-cccccc", pid=dead.pid, host="pod-a")
    assert a.get("job-20261129-000002-cccccc").phase == "failed"


def test_a_heartbeat_between_read_and_verdict_keeps_the_job_alive(url, tmp_path):
    a = jobs_on(url, "pod-a", tmp_path)
    a.store.create_job("job-20261129-000003-dddddd", RetrainOptions())
    a.store.update_job("job-20261129-000003-dddddd", pid=1, host="pod-b")
    seen = a.store.get_job("job-20261129-000003-dddddd")
    time.sleep(0.01)
    assert a.store.heartbeat_job(seen.job_id)
    assert not a.store.fail_running_job(seen.job_id, seen.updated_at, "presumed dead")
    assert a.store.get_job(seen.job_id).phase == "queued"


def test_the_lease_must_outlast_two_heartbeats():
    with pytest.raises(SystemExit, match="REFIT_LEASE_TIMEOUT_S"):
        load_settings(heartbeat_interval_s=5, lease_timeout_s=8)


# -- staging clean-up on a shared registry ---------------------------------------------------


def test_cleanup_leaves_other_hosts_work_in_progress_alone(tmp_path):
    registry = ModelRegistry(tmp_path)
    registry._ensure_layout()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = host_key()
    folders = {
        "mine-alive": f"{here}-{os.getpid()}-aaaaaaaaaaaa",
        "mine-dead": f"{here}-{dead.pid}-bbbbbbbbbbbb",
        # Another host's writer, with a pid that is dead *here*: judged by age only.
        "other-fresh": f"0123456789ab-{dead.pid}-cccccccccccc",
        "other-stale": f"0123456789ab-{os.getpid()}-dddddddddddd",
        "legacy-dead": f"{dead.pid}-eeeeeeeeeeee",
    }
    for name in folders.values():
        (registry.staging_dir / name).mkdir()
        (registry.staging_dir / name / "model.onnx").write_bytes(b"x")
    old = time.time() - 7200
    for path in (registry.staging_dir / folders["other-stale"]).rglob("*"):
        os.utime(path, (old, old))
    os.utime(registry.staging_dir / folders["other-stale"], (old, old))
    removed = {path.name for path in registry.cleanup(stale_after_s=3600)}
    assert removed == {folders["mine-dead"], folders["other-stale"], folders["legacy-dead"]}
    assert {p.name for p in registry.staging_dir.iterdir()} == {
        folders["mine-alive"], folders["other-fresh"]
    }


def test_a_staging_folder_names_its_writer_host(tmp_path):
    registry = ModelRegistry(tmp_path)
    with registry.stage() as staged:
        key, pid, _ = staged.path.name.split("-")
        assert key == host_key() and pid == str(os.getpid())
        assert registry.cleanup() == []  # its own writer is alive


# -- the leader runs the drift job, and stops it when it loses the lease --------------------------


def test_a_leader_that_loses_its_lease_stops_its_drift_job(tmp_path, toy_registry, monkeypatch):
    from monitoring.leader import MonitorLeader
    from refit.processes import pid_alive

    url = f"sqlite:///{tmp_path / 'refit.db'}"
    # The drift job reads the same environment as the server that starts it.
    monkeypatch.setenv("REFIT_DATABASE_URL", url)
    monkeypatch.setenv("REFIT_REGISTRY_PATH", str(toy_registry.root))
    monkeypatch.setenv("REFIT_DATA_DIR", str(tmp_path / "var"))
    leases = LeaseStore(replica(url).engine)
    leaders = [
        MonitorLeader(tmp_path / name, LeaseElection(leases, name, heartbeat_s=0.3, timeout_s=5))
        for name in ("pod-a", "pod-b")
    ]
    leaders[0].start()
    first = wait_for(lambda: leaders[0]._process, 10, 0.1, "pod-a's drift job")
    leaders[1].start()
    try:
        time.sleep(1.5)
        assert leaders[1]._process is None and leases.holder("drift-job").startswith("pod-a:")
        # pod-a's renewals were late and pod-b's election took the lease over.
        with leases.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE refit_leases SET holder = ?, expires_at = expires_at + 60",
                (leaders[1].election.holder,),
            )
        second = wait_for(lambda: leaders[1]._process, 10, 0.1, "pod-b's drift job")
        wait_for(lambda: not pid_alive(first.pid), 15, 0.1, "pod-a's drift job to stop")
        assert leaders[0]._process is None and pid_alive(second.pid)
    finally:
        for leader in leaders:
            leader.stop()
    assert not pid_alive(second.pid)
    assert leases.holder("drift-job") is None  # a clean stop released it
