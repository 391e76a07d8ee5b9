"""One monitoring job per server, whichever worker holds the lock.

Every serving worker runs a :class:`MonitorLeader` thread. It tries to take an exclusive ``flock``
on ``<data_dir>/monitor.lock``; the worker that gets it starts ``python -m monitoring.drift_job``
and restarts it if it dies. When that worker dies the kernel releases the lock, another worker
takes it over, and the orphaned job notices its parent is gone and exits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import TextIO

from refit.processes import spawn_module

log = logging.getLogger("refit.monitor")


class MonitorLeader:
    def __init__(self, data_dir: Path, retry_s: float = 2.0) -> None:
        self.lock_path = Path(data_dir) / "monitor.lock"
        self.log_path = Path(data_dir) / "drift" / "drift_job.log"
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_file: TextIO | None = None

    @property
    def leading(self) -> bool:
        return self._lock_file is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor-leader", daemon=True)
        self._thread.start()

    def _try_lock(self) -> bool:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        # Not a `with`: the lock lasts as long as this handle stays open (closed on release).
        handle = open(self.lock_path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def _spawn(self) -> None:
        self._process = spawn_module("monitoring.drift_job", log_path=self.log_path)
        log.info("worker %d leads monitoring: drift job pid %d", os.getpid(), self._process.pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.leading and not self._try_lock():
                self._stop.wait(self.retry_s)
                continue
            if self._process is None or self._process.poll() is not None:
                if self._process is not None:
                    log.warning("drift job exited with %s; restarting", self._process.returncode)
                self._spawn()
            self._stop.wait(self.retry_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
