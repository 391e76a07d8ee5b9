"""All settings, in one pydantic-settings class read from ``REFIT_*`` environment variables.

Built once at start-up and passed to whoever needs it. A bad value stops start-up with a message
naming the variable and the problem (see :func:`load_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(SystemExit):
    """Raised (as a clean exit with a message) when the environment holds a bad setting."""


class RefitSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFIT_", extra="ignore", frozen=True)

    # -- where things live ----------------------------------------------------------------------
    registry_path: Path = Path("model_registry")
    """Folder of the model registry (versions and the ``current`` pointer)."""
    data_dir: Path = Path("var")
    """Folder for the SQLite database (by default), drift reports and lock files."""
    database_url: str | None = None
    """SQLAlchemy URL of the prediction/feedback/job store, e.g.
    ``postgresql+psycopg://user:pw@host/db``. Default: SQLite file ``<data_dir>/refit.db``."""

    # -- serving ----------------------------------------------------------------------------------
    workers: int = Field(2, ge=1, le=64)
    """Serving worker processes; each holds its own copy of the model."""
    max_texts_per_request: int = Field(64, ge=1, le=4096)
    """Most texts one ``/predict`` request may carry."""
    max_text_chars: int = Field(2000, ge=1, le=1_000_000)
    """Longest text accepted, in characters (longer is a 422, not a silent cut). The model itself
    truncates to its maximum token length."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body accepted; larger bodies get 413."""
    batch_max_size: int = Field(64, ge=2, le=1024)
    """Most texts the adaptive batcher puts into one inference call."""
    batch_max_latency_ms: int = Field(100, ge=1, le=60_000)
    """Latency budget of the adaptive batcher."""
    keepalive_requests: int = Field(100, ge=0)
    """Requests served on one keep-alive connection before the service asks the client to
    reconnect (0: never). Workers share one listening socket and a connection stays with the
    worker that accepted it; reconnecting now and then spreads long-lived client connections
    evenly over the workers (nginx does the same with ``keepalive_requests``)."""
    ort_threads: int = Field(1, ge=1, le=64)
    """onnxruntime intra-op threads per inference batch (1 suits one worker per core)."""
    inference_threads: int = Field(1, ge=1, le=16)
    """Batches each worker runs at once. More than 1 lets one worker use several cores when
    clients' connections land unevenly on the workers."""

    # -- prediction log ---------------------------------------------------------------------------
    log_flush_interval_ms: int = Field(200, ge=10, le=60_000)
    """How often each worker writes its buffered predictions to the store."""
    retention_rows: int = Field(1_000_000, ge=1000)
    """Most predictions kept in the log; the oldest are deleted beyond this."""
    retention_days: float = Field(30.0, gt=0)
    """Predictions older than this are deleted."""

    # -- model swap -------------------------------------------------------------------------------
    swap_poll_interval_s: float = Field(1.0, gt=0, le=60)
    """How often each worker checks the registry's ``current`` pointer."""

    # -- admin ------------------------------------------------------------------------------------
    admin_token: SecretStr | None = None
    """Bearer token required by ``/retrain`` and ``/models/promote``. Unset: they are open."""

    # -- retraining -------------------------------------------------------------------------------
    retrain_min_feedback: int = Field(20, ge=1)
    retrain_holdout_fraction: float = Field(0.2, gt=0, lt=0.9)
    """Share of feedback (per label) held out from training to judge the challenger."""
    retrain_replay_rows: int = Field(5000, ge=0)
    """Most rows of the serving version's training data replayed into a retrain."""
    gate_tolerance: float = Field(0.02, ge=0, le=1)
    """How much accuracy on the old classes a challenger may lose and still be promoted. A larger
    loss rejects it only if it is also not noise: the 95% confidence interval of the paired
    difference lies below zero (see the README's "Learning from feedback")."""
    gate_min_new_class_accuracy: float = Field(0.6, ge=0, le=1)
    """Accuracy a challenger must reach on held-out feedback of classes new to it."""
    label_min_examples: int = Field(5, ge=1)
    """Feedback items a label the model does not know needs before a retrain trains on it. Until
    then the label is *pending*: stored, shown and counted, but not trained on, and it does not
    hold a retrain back."""

    # -- monitoring -------------------------------------------------------------------------------
    drift_window: int = Field(2000, ge=50)
    """Most recent predictions compared with the reference in each drift run."""
    drift_min_window: int = Field(100, ge=10)
    """Fewer recent predictions than this: no drift verdict yet."""
    drift_interval_s: float = Field(60.0, ge=1)
    drift_embedding_threshold: float = Field(0.55, gt=0.5, lt=1)
    """ROC AUC of a classifier told to separate window from reference above which embeddings drift."""
    drift_label_threshold: float = Field(0.1, gt=0, lt=1)
    """Jensen-Shannon distance of the predicted-label distributions above which they drift."""
    drift_confidence_threshold: float = Field(0.1, gt=0, lt=1)
    """Wasserstein distance (in standard deviations of the reference) for confidence drift."""
    drift_length_threshold: float = Field(0.1, gt=0, lt=10)
    """Wasserstein distance (in standard deviations of the reference) for text-length drift."""
    online_accuracy_window: int = Field(500, ge=10)
    """Feedback on logged predictions that online accuracy is computed over."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("sqlite:///", "postgresql")):
            raise ValueError("must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RefitSettings:
        if self.drift_min_window > self.drift_window:
            raise ValueError("REFIT_DRIFT_MIN_WINDOW must not exceed REFIT_DRIFT_WINDOW")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'refit.db').resolve()}"


def load_settings(**overrides: object) -> RefitSettings:
    """Settings from the environment; a bad value exits with a message naming the variable."""
    try:
        return RefitSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = "REFIT_" + "_".join(str(p) for p in error["loc"]).upper() if error["loc"] else "REFIT_*"
            lines.append(f"  {name}: {error['msg']}")
        raise SettingsError("refit: invalid settings:\n" + "\n".join(lines)) from None
