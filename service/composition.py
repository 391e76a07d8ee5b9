"""The composition root: the one place that builds the service's parts from the settings.

``build_data_plane(settings)`` makes the store, registry, model holder, feedback memory,
prediction log, retrain jobs, monitor leader and batcher and hands them to
:class:`~service.dataplane.DataPlane` fully formed. ``service/app.py`` calls it in each worker's
start-up hook; tests call it in-process.
"""

from __future__ import annotations

import functools
import gc

from adapters.serving.registry import ModelRegistry
from adapters.serving.variants import Int8Gate
from monitoring.leader import (
    Election,
    FileLockElection,
    LeaseElection,
    MonitorLeader,
)
from monitoring.metrics import forget_dead_processes
from refit.leases import LeaseStore
from refit.processes import instance_name
from refit.settings import RefitSettings
from refit.store import Store
from service.batching import AdaptiveBatcher
from service.dataplane import DataPlane, initialise_metrics, run_observed_batch
from service.jobs import RetrainJobs
from service.memory import FeedbackMemoryKeeper
from service.prediction_log import PredictionLog
from service.predictor import BatchOutput, ModelHolder


class NoDriftJob:
    """Stands in for the drift monitor where another process runs the drift job (or none)."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def build_data_plane(settings: RefitSettings, *, run_drift_job: bool = True) -> DataPlane:
    """Build every settings-dependent part and the data plane over them (blocking: opens the
    store). Call ``start()`` on the result to load the model and start its threads.

    ``run_drift_job=False`` leaves out the drift monitor (whose leader starts the drift job as a
    process): in-process tests use that.
    """
    forget_dead_processes()
    initialise_metrics()
    store = Store.from_url(settings.resolved_database_url)
    registry = ModelRegistry(settings.registry_path)
    holder = ModelHolder(
        registry, settings.ort_threads, settings.swap_poll_interval_s,
        precision=settings.model_precision, int8_gate=Int8Gate.from_settings(settings),
    )
    memory = (
        FeedbackMemoryKeeper(
            store, holder, settings.memory_poll_interval_s,
            # As the model watcher: onnxruntime's own threads would inherit a lower priority.
            nice=settings.ort_threads == 1,
        )
        if settings.memory_enabled
        else None
    )
    batcher: AdaptiveBatcher[BatchOutput] = AdaptiveBatcher(
        functools.partial(run_observed_batch, holder, memory),
        max_batch_size=settings.batch_max_size,
        max_queued=max(1024, settings.batch_max_size * 32),
        concurrency=settings.inference_threads,
        max_wait_s=settings.batch_max_wait_ms / 1000,
    )
    return DataPlane(
        settings=settings,
        store=store,
        registry=registry,
        holder=holder,
        prediction_log=PredictionLog(
            store,
            flush_interval_s=settings.log_flush_interval_ms / 1000,
            retention_rows=settings.retention_rows,
            retention_days=settings.retention_days,
            quarantine_path=settings.data_dir / "quarantine" / "predictions.jsonl",
        ),
        jobs=RetrainJobs(settings, store),
        monitor=(
            MonitorLeader(settings.data_dir, monitor_election(settings, store))
            if run_drift_job else NoDriftJob()
        ),
        batcher=batcher,
        memory=memory,
    )


def monitor_election(settings: RefitSettings, store: Store) -> Election:
    """How the one drift job is elected: per machine (``flock``) over SQLite, which one machine
    serves; per cluster (a lease row in the shared store) over PostgreSQL."""
    if store.dialect == "sqlite":
        return FileLockElection(settings.data_dir / "monitor.lock")
    return LeaseElection(
        LeaseStore(store.engine), instance_name(settings.instance_name),
        heartbeat_s=settings.heartbeat_interval_s, timeout_s=settings.lease_timeout_s,
    )


def freeze_heap() -> None:
    """Move everything loaded at start-up out of the garbage collector's way.

    Everything loaded so far lives as long as the worker, and young objects are collected less
    often: full collections over a large heap otherwise pause the worker for tens of milliseconds
    under load (a p99 spike).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)
