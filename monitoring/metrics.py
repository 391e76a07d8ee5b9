"""Every Prometheus metric refit exports, defined in one place.

Serving runs several worker processes, so metrics use prometheus_client's multiprocess mode:
each process writes to files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` merges them. The
metrics are created lazily, on first use, because BentoML sets that directory in a worker only
after importing the service module; a metric created before would never reach ``/metrics``.

Names follow Prometheus conventions: ``refit_`` prefix, base units in the name, ``_total`` on
counters, labels of low cardinality (endpoint, status, model version, label of the task).
"""

from __future__ import annotations

import glob
import os
import re
import threading
from functools import cached_property

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from refit.processes import pid_alive

LATENCY_BUCKETS = (
    0.002,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
SLOW_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class RefitMetrics:
    """The metric objects; one instance per process, from :func:`metrics`."""

    # -- HTTP ----------------------------------------------------------------------------------
    @cached_property
    def http_requests(self) -> Counter:
        return Counter(
            "refit_http_requests_total", "HTTP requests answered.", ["endpoint", "status"]
        )

    @cached_property
    def http_duration(self) -> Histogram:
        return Histogram(
            "refit_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["endpoint", "status"], buckets=LATENCY_BUCKETS,
        )

    # -- inference -----------------------------------------------------------------------------
    @cached_property
    def batch_size(self) -> Histogram:
        return Histogram(
            "refit_inference_batch_size", "Texts per inference batch (adaptive batching).",
            buckets=BATCH_BUCKETS,
        )

    @cached_property
    def inference_duration(self) -> Histogram:
        return Histogram(
            "refit_inference_duration_seconds",
            "Time of one inference batch: tokenisation and onnxruntime.",
            buckets=LATENCY_BUCKETS,
        )

    @cached_property
    def predictions(self) -> Counter:
        return Counter(
            "refit_predictions_total", "Predictions made, by predicted label and model version.",
            ["label", "model_version"],
        )

    @cached_property
    def confidence(self) -> Histogram:
        return Histogram(
            "refit_prediction_confidence", "Probability of the predicted label.",
            buckets=CONFIDENCE_BUCKETS,
        )

    @cached_property
    def prediction_log_dropped(self) -> Counter:
        return Counter(
            "refit_prediction_log_dropped_total",
            "Predictions that could not be written to the log (store unavailable too long).",
        )

    @cached_property
    def prediction_log_quarantined(self) -> Counter:
        return Counter(
            "refit_prediction_log_quarantined_total",
            "Predictions the store rejected; set aside in <data_dir>/quarantine/ for a person.",
        )

    @cached_property
    def store_up(self) -> Gauge:
        return Gauge(
            "refit_store_up", "1 while this worker reaches the database, 0 while it cannot.",
            multiprocess_mode="liveall",
        )

    @cached_property
    def prediction_log_pending(self) -> Gauge:
        return Gauge(
            "refit_prediction_log_pending", "Predictions buffered for the log, per worker.",
            multiprocess_mode="liveall",
        )

    # -- feedback memory -------------------------------------------------------------------------
    @cached_property
    def memory_answers(self) -> Counter:
        return Counter(
            "refit_memory_answers_total",
            "Predictions the feedback memory answered (source \"feedback\") instead of the model.",
        )

    @cached_property
    def memory_entries(self) -> Gauge:
        return Gauge(
            "refit_memory_entries",
            "Feedback examples in a worker's memory (pid label: the worker).",
            multiprocess_mode="liveall",
        )

    # -- model versions and swaps --------------------------------------------------------------
    @cached_property
    def model_info(self) -> Gauge:
        # "liveall" keeps one sample per live worker (with a pid label): each worker's version.
        return Gauge(
            "refit_model_info", "1 for the model version a worker serves (pid label: the worker).",
            ["model_version"], multiprocess_mode="liveall",
        )

    @cached_property
    def model_swaps(self) -> Counter:
        return Counter(
            "refit_model_swaps_total", "Model loads by workers following the registry.", ["outcome"]
        )

    @cached_property
    def model_load_duration(self) -> Histogram:
        return Histogram(
            "refit_model_load_duration_seconds", "Time to load and warm a model version.",
            buckets=SLOW_BUCKETS,
        )

    # -- feedback and online accuracy ------------------------------------------------------------
    @cached_property
    def feedback(self) -> Counter:
        return Counter(
            "refit_feedback_total", "Labelled feedback items accepted, by how they name the text.",
            ["source"],
        )

    @cached_property
    def online_accuracy(self) -> Gauge:
        return Gauge(
            "refit_online_accuracy_ratio",
            "Share of recent feedback on logged predictions that the model got right.",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def online_accuracy_by_label(self) -> Gauge:
        return Gauge(
            "refit_online_accuracy_by_label_ratio",
            "Online accuracy per true label over the same window.",
            ["label"], multiprocess_mode="mostrecent",
        )

    @cached_property
    def online_accuracy_window(self) -> Gauge:
        return Gauge(
            "refit_online_accuracy_window_feedback",
            "Feedback items the online accuracy is computed over.",
            multiprocess_mode="mostrecent",
        )

    # -- accuracy estimated without labels, and calibration (monitoring/estimate.py) -----------
    @cached_property
    def estimated_accuracy(self) -> Gauge:
        return Gauge(
            "refit_estimated_accuracy_ratio",
            "Accuracy estimated without labels: mean calibrated confidence of recent predictions.",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def estimated_accuracy_lower(self) -> Gauge:
        return Gauge(
            "refit_estimated_accuracy_lower_ratio",
            "Lower end of the estimate's 95% interval (Poisson-binomial).",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def estimated_accuracy_upper(self) -> Gauge:
        return Gauge(
            "refit_estimated_accuracy_upper_ratio",
            "Upper end of the estimate's 95% interval (Poisson-binomial).",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def estimated_accuracy_by_label(self) -> Gauge:
        return Gauge(
            "refit_estimated_accuracy_by_label_ratio",
            "Estimated accuracy per predicted label (its precision) over the same window.",
            ["label"], multiprocess_mode="mostrecent",
        )

    @cached_property
    def estimated_accuracy_window(self) -> Gauge:
        return Gauge(
            "refit_estimated_accuracy_window_predictions",
            "Predictions of the serving version the estimate is computed over.",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def model_test_accuracy(self) -> Gauge:
        return Gauge(
            "refit_model_test_accuracy_ratio",
            "Accuracy of the serving version on its held-out test split (the estimate's baseline).",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def model_calibration_error(self) -> Gauge:
        return Gauge(
            "refit_model_calibration_error_ratio",
            "Expected calibration error of the serving version's confidences, by split.",
            ["split"], multiprocess_mode="mostrecent",
        )

    @cached_property
    def review_queue(self) -> Gauge:
        return Gauge(
            "refit_review_queue_predictions",
            "Unlabelled predictions of the serving version below REFIT_REVIEW_QUEUE_THRESHOLD "
            "confidence: what GET /review has to offer.",
            multiprocess_mode="mostrecent",
        )

    # -- retraining -----------------------------------------------------------------------------
    @cached_property
    def retrain_jobs(self) -> Counter:
        return Counter("refit_retrain_jobs_total", "Retrain jobs ended, by outcome.", ["outcome"])

    @cached_property
    def retrain_duration(self) -> Histogram:
        return Histogram(
            "refit_retrain_duration_seconds", "Wall time of retrain jobs.", ["outcome"],
            buckets=SLOW_BUCKETS,
        )

    # -- drift ----------------------------------------------------------------------------------
    @cached_property
    def drift_score(self) -> Gauge:
        return Gauge(
            "refit_drift_score", "Latest drift score per signal (see /drift for each method).",
            ["signal"], multiprocess_mode="mostrecent",
        )

    @cached_property
    def drift_threshold(self) -> Gauge:
        return Gauge(
            "refit_drift_threshold", "Score above which a signal counts as drifted.",
            ["signal"], multiprocess_mode="mostrecent",
        )

    @cached_property
    def drift_signal_detected(self) -> Gauge:
        return Gauge(
            "refit_drift_signal_detected", "1 if the signal drifted in the latest window.",
            ["signal"], multiprocess_mode="mostrecent",
        )

    @cached_property
    def drift_detected(self) -> Gauge:
        return Gauge(
            "refit_drift_detected", "1 if any signal drifted in the latest window.",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def drift_window(self) -> Gauge:
        return Gauge(
            "refit_drift_window_predictions", "Predictions in the latest drift window.",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def drift_last_run(self) -> Gauge:
        return Gauge(
            "refit_drift_last_run_timestamp_seconds", "When the drift job last finished.",
            multiprocess_mode="mostrecent",
        )

    @cached_property
    def drift_run_duration(self) -> Histogram:
        return Histogram(
            "refit_drift_run_duration_seconds", "Time of one drift job run.", buckets=SLOW_BUCKETS
        )


_lock = threading.Lock()
_instance: RefitMetrics | None = None


def metrics() -> RefitMetrics:
    global _instance
    if _instance is None:
        with _lock:
            if _instance is None:
                _instance = RefitMetrics()
    return _instance


def multiprocess_dir() -> str | None:
    # prometheus_client also honours the older lower-case name.
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(
        "prometheus_multiproc_dir"  # noqa: SIM112
    )


def render_latest() -> bytes:
    """The exposition text for ``/metrics``, merged over all processes when multiprocess."""
    directory = multiprocess_dir()
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


_LIVE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db$")


def forget_dead_processes() -> list[int]:
    """Drop the "live" gauge files of processes that are gone (a restarted worker, say)."""
    directory = multiprocess_dir()
    if not directory:
        return []
    dead: set[int] = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*.db")):
        match = _LIVE_FILE.search(path)
        if match and not pid_alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(dead)
