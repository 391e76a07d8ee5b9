"""Retrain jobs as seen from the service: start one, supervise it, report it.

A job runs ``python -m adapters.training.retrain JOB_ID`` as a separate, lower-priority process, so
training never competes with request handling for a worker's threads and the GIL, and killing it
at any instant cannot touch the serving model (the registry only changes by atomic commit and
promote). The job writes its own progress to the store, and renews a heartbeat there every
``REFIT_HEARTBEAT_INTERVAL_S``. This side records the job (one at a time in the whole cluster: the
store enforces it), starts the process, and marks the job failed if the process dies without
saying so: at once when the worker that started it sees it exit; when anyone on the same instance
next reads the job and finds its process gone; and, from any replica, when its heartbeat is older
than ``REFIT_LEASE_TIMEOUT_S`` (its replica vanished).
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

from monitoring.metrics import metrics
from refit.errors import ConflictError
from refit.jobs import Job, RetrainOptions
from refit.processes import instance_name, pid_alive, spawn_module
from refit.settings import RefitSettings
from refit.store import Store

JOB_ID = re.compile(r"job-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
"""What :meth:`RetrainJobs.submit` issues; anything else is not a job (and never reaches SQL)."""

log = logging.getLogger("refit.jobs")

# A job recorded whose process never reported in is presumed never to have started after this long.
NEVER_STARTED_AFTER_S = 60.0


class RetrainJobs:
    """Starts, supervises and reports retrain jobs (one running at a time)."""

    def __init__(self, settings: RefitSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.log_dir = Path(settings.data_dir) / "jobs"
        self.host = instance_name(settings.instance_name)

    def submit(self, options: RetrainOptions) -> Job:
        """Record and start a job; 409 if too little feedback or a job is already running."""
        min_feedback = options.min_feedback
        have = self.store.count_feedback()
        if have < min_feedback:
            raise ConflictError(
                f"only {have} labelled feedback items; a retrain needs at least {min_feedback} "
                "(POST more to /feedback, or lower min_feedback)",
                feedback_items=have, min_feedback=min_feedback,
            )
        self.reconcile()
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.store.create_job(job_id, options)  # ConflictError names the running job
        try:
            process = spawn_module(
                "adapters.training.retrain", job_id,
                log_path=self.log_dir / f"{job_id}.log", new_session=True,
            )
        except OSError as exc:
            self.store.update_job(job_id, phase="failed", error=f"could not start training: {exc}")
            raise
        self.store.update_job(job_id, pid=process.pid, host=self.host)
        threading.Thread(
            target=self._supervise, args=(job_id, process, time.monotonic()),
            name=f"supervise-{job_id}", daemon=True,
        ).start()
        log.info("retrain %s started as pid %d", job_id, process.pid)
        return self.get(job_id)

    def _supervise(self, job_id: str, process: subprocess.Popen[bytes], started: float) -> None:
        code = process.wait()
        job = self.store.get_job(job_id)
        if not job.terminal:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            self.store.update_job(job_id, phase="failed", error=f"the training process {how}")
            job = self.store.get_job(job_id)
        outcome = job.outcome
        m = metrics()
        m.retrain_jobs.labels(outcome=outcome).inc()
        m.retrain_duration.labels(outcome=outcome).observe(time.monotonic() - started)
        log.info("retrain %s ended: %s", job_id, outcome)

    def reconcile(self) -> None:
        """Mark the running job failed if its process is gone."""
        job = self.store.running_job()
        if job is None:
            return
        now = time.time()
        error = None
        if job.host == self.host and job.pid is not None and not pid_alive(job.pid):
            error = "the training process is gone (killed, or the server restarted under it)"
        elif job.pid is not None and now - job.updated_at > self.settings.lease_timeout_s:
            # Judged by the heartbeat alone on another instance (its process ids mean nothing
            # here), and on this one too in case the pid was reused after a restart.
            error = (
                f"the training process on {job.host or 'another instance'} stopped sending its "
                f"heartbeat {now - job.updated_at:.0f}s ago (its replica is gone)"
            )
        elif job.pid is None and now - job.created_at > NEVER_STARTED_AFTER_S:
            error = "the training process never started"
        if error is not None and self.store.fail_running_job(job.job_id, job.updated_at, error):
            log.warning("retrain %s marked failed: %s", job.job_id, error)

    def get(self, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if not job.terminal:
            self.reconcile()
            job = self.store.get_job(job_id)
        return job

    def list(self, limit: int = 20) -> list[Job]:
        self.reconcile()
        return self.store.list_jobs(limit)
