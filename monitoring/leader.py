"""One monitoring job per deployment, whichever worker wins the election.

Every serving worker runs a :class:`MonitorLeader` thread. It asks its :class:`Election` to lead;
the worker that wins starts ``python -m monitoring.drift_job`` and restarts it if it dies. Two
elections exist:

* :class:`FileLockElection` (the default with SQLite, where one machine serves): an exclusive
  ``flock`` on ``<data_dir>/monitor.lock``. When the leading worker dies the kernel releases the
  lock and another worker of the machine takes it over.
* :class:`LeaseElection` (with PostgreSQL, where several replicas share one store): a lease row in
  the store (:mod:`refit.leases`), renewed every ``heartbeat_interval_s``. The whole cluster then
  runs one drift job. When the leading replica dies its lease expires after ``lease_timeout_s`` and
  a worker of another replica takes it over; a clean stop releases it at once.

A leader that loses its election (its lease could not be renewed in time) stops its drift job at
once. An orphaned drift job notices its parent is gone and exits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol, TextIO

from refit.leases import LeaseStore
from refit.processes import spawn_module

log = logging.getLogger("refit.monitor")

MONITOR_LEASE = "drift-job"


class Election(Protocol):
    """Decides which one worker leads; ``lead()`` is called every ``retry_s`` by every worker."""

    retry_s: float

    def lead(self) -> bool:
        """Try to become (or stay) the leader; whether this worker leads now."""
        ...

    def resign(self) -> None:
        """Stop leading (a clean stop), so another worker can take over at once."""
        ...


class FileLockElection:
    """One leader per machine: whoever holds an exclusive ``flock`` on a file."""

    def __init__(self, lock_path: Path, retry_s: float = 2.0) -> None:
        self.lock_path = lock_path
        self.retry_s = retry_s
        self._lock_file: TextIO | None = None

    def lead(self) -> bool:
        if self._lock_file is not None:
            return True
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        # Not a `with`: the lock lasts as long as this handle stays open (closed on resign).
        handle = open(self.lock_path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def resign(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


class LeaseElection:
    """One leader per store: whoever holds the store's lease ``name``, renewed on every call."""

    def __init__(
        self, leases: LeaseStore, instance: str, heartbeat_s: float, timeout_s: float,
        name: str = MONITOR_LEASE,
    ) -> None:
        self.leases = leases
        self.name = name
        # Unique per worker process and per start, readable in the table.
        self.holder = f"{instance}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.retry_s = heartbeat_s
        self.timeout_s = timeout_s
        self._renewed_at: float | None = None

    def lead(self) -> bool:
        try:
            held = self.leases.acquire(self.name, self.holder, self.timeout_s)
        except Exception:  # noqa: BLE001 - the store is unreachable: count it as a failed renewal
            log.warning("could not renew the %s lease", self.name, exc_info=True)
            held = False
            # Keep leading only while the lease we last renewed can still be ours: after that,
            # another replica may have taken it.
            if self._renewed_at is not None and (
                time.monotonic() - self._renewed_at < self.timeout_s - self.retry_s
            ):
                return True
        self._renewed_at = time.monotonic() if held else None
        return held

    def resign(self) -> None:
        if self._renewed_at is None:
            return
        self._renewed_at = None
        try:
            self.leases.release(self.name, self.holder)
        except Exception:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the %s lease; it expires by itself", self.name)


class MonitorLeader:
    def __init__(self, data_dir: Path, election: Election | None = None) -> None:
        self.log_path = Path(data_dir) / "drift" / "drift_job.log"
        self.election: Election = election or FileLockElection(Path(data_dir) / "monitor.lock")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.leading = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor-leader", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self._process = spawn_module("monitoring.drift_job", log_path=self.log_path)
        log.info("worker %d leads monitoring: drift job pid %d", os.getpid(), self._process.pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.leading = self.election.lead()
            if not self.leading:
                if self._process is not None:
                    log.warning("worker %d lost the monitoring election; stopping its drift job",
                                os.getpid())
                    self._end_process()
            elif self._process is None or self._process.poll() is not None:
                if self._process is not None:
                    log.warning("drift job exited with %s; restarting", self._process.returncode)
                self._spawn()
            self._stop.wait(self.election.retry_s)

    def _end_process(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._end_process()
        self.election.resign()
        self.leading = False
