"""Process utilities: liveness checks, and starting the job and monitor processes (one place)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def instance_name(configured: str | None = None) -> str:
    """This replica's name in records other replicas read: the configured one
    (``REFIT_INSTANCE_NAME``), else the host name, which in Kubernetes is the pod's name."""
    return configured or socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def spawn_module(
    module: str, *args: str, log_path: Path, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``python -m module args...`` with this interpreter and environment.

    Its output goes to ``log_path`` (appended), its stdin is closed, and it runs unbuffered, so the
    log shows progress as it happens. ``new_session`` detaches it from the caller's process group
    (a retrain job must outlive a worker's graceful stop, and not receive its terminal's signals).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=new_session,
        )
