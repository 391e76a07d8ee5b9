"""All settings, in one pydantic-settings class read from ``REFIT_*`` environment variables.

Built once at start-up and passed to whoever needs it. A bad value stops start-up with a message
naming the variable and the problem, and a ``REFIT_*`` variable that is no setting (a typo, or a
setting since removed) is logged as a warning naming the closest real one (see
:func:`load_settings`).

Every field carries a docstring: its first sentence is the README's description of the setting.
``python -m refit.settings --markdown`` prints the README's settings table and
``python -m refit.settings --readme README.md`` rewrites it in place.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("refit.settings")

ENV_PREFIX = "REFIT_"
# Variables with these prefixes belong to tools around the service (the benchmarks), not to it.
FOREIGN_PREFIXES = ("REFIT_BENCH_",)
# Settings that existed once, and why they went: a deployment may still set them.
REMOVED_SETTINGS = {
    "REFIT_BATCH_MAX_LATENCY_MS": "the batcher never waits to fill a batch (a batch starts as soon "
    "as an inference thread is free), so there is no latency for it to budget; overload is "
    "refused at once with 503 instead",
}
README_START = "<!-- settings:start -->"
README_END = "<!-- settings:end -->"


class SettingsError(SystemExit):
    """Raised (as a clean exit with a message) when the environment holds a bad setting."""


class RefitSettings(BaseSettings):
    """The service's configuration; each field is read from ``REFIT_<FIELD NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    # -- where things live ----------------------------------------------------------------------
    registry_path: Path = Path("model_registry")
    """Folder of the model registry (versions and the ``current`` pointer)."""
    data_dir: Path = Path("var")
    """Folder for the SQLite database (by default), drift reports and lock files."""
    database_url: str | None = None
    """SQLAlchemy URL of the prediction, feedback and job store, such as
    ``postgresql+psycopg://user:pw@host/db``; unset: the SQLite file ``<data_dir>/refit.db``."""

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
    inference_model_name: str = Field("refit", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The model's name on the Open Inference Protocol (v2) endpoints: ``/v2/models/<name>/...``
    (its versions are the registry's, ``v1``, ``v2``, ...)."""
    batch_max_size: int = Field(64, ge=2, le=1024)
    """Most texts the adaptive batcher puts into one inference call."""
    batch_max_wait_ms: float = Field(20.0, ge=0, le=1000)
    """Under load, how long a free inference thread may wait for a fuller batch: until as many
    texts are queued as were in play when the last batch ended, for at most a quarter of the last
    batch's run time and at most this long (0: never wait). A lone client is never kept waiting.
    Small batches cost more CPU per text (see service/batching.py)."""
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

    # -- int8 model -------------------------------------------------------------------------------
    model_precision: Literal["auto", "fp32", "int8"] = "fp32"
    """Which model file each worker serves: ``fp32`` always the fp32 model, ``auto`` a version's
    int8 model where it passed the accuracy gate (the two settings below) and its fp32 model
    otherwise, ``int8`` the int8 model whenever the version has one. ``GET /models`` shows what
    each version would serve, and why. The default is fp32: int8 models exported before
    2026-11-30 (dynamic int8) answer slightly differently depending on the other texts in their
    batch (on banking77, 1.5% of labels changed between a text sent alone and in a batch of 32),
    and newer ones (blockwise int8, independent of batch-mates) gain only 1.2-1.4x req/s at 32
    connections for a small loss of agreement (BENCHMARKS.md section 12)."""
    int8_min_agreement: float = Field(0.99, ge=0, le=1)
    """Least share of a version's test examples on which the int8 model must predict the same
    label as the fp32 model for ``auto`` to serve it."""
    int8_max_accuracy_drop: float = Field(0.005, ge=0, le=1)
    """Most test accuracy the int8 model may lose against the fp32 model for ``auto`` to serve it,
    as a fraction (0.005 is half a point)."""

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

    # -- feedback memory --------------------------------------------------------------------------
    memory_enabled: bool = True
    """Answer predictions close to a labelled feedback example with that example's label, before
    any retrain (``"source": "feedback"``). Each worker keeps the memory in step with the store
    and rebuilds it for every model version it loads."""
    memory_poll_interval_s: float = Field(0.5, gt=0, le=60)
    """How often each worker reads new, changed and deleted feedback into its memory: feedback is
    in effect in every worker within about this long."""

    # -- admin ------------------------------------------------------------------------------------
    admin_token: SecretStr | None = None
    """Bearer token for the admin endpoints (retrain, promote, relabel, delete), at least 16
    characters. Unset: they answer only clients on this machine (loopback)."""
    feedback_key: SecretStr | None = None
    """Bearer key for posting feedback (the admin token works too). Unset: only clients on this
    machine may post feedback."""
    feedback_rate_per_minute: int = Field(600, ge=0, le=1_000_000)
    """Feedback items one client may post per minute, per worker (0: no limit)."""
    retrain_rate_per_hour: int = Field(12, ge=0, le=10_000)
    """Retrain requests one client may make per hour, per worker (0: no limit)."""

    # -- retraining -------------------------------------------------------------------------------
    retrain_min_feedback: int = Field(20, ge=1)
    """Labelled feedback items a retrain needs by default; fewer is a 409 (a request's
    ``min_feedback`` overrides it)."""
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
    label_min_examples: int = Field(5, ge=1, le=10_000)
    """Feedback items a label the model does not know needs before a retrain trains on it. Until
    then the label is *pending*: stored, shown and counted, but not trained on, and it does not
    hold a retrain back."""
    retrain_max_new_labels: int = Field(10, ge=0, le=1000)
    """Most new labels one retrain may add (those with the most feedback); the others stay
    pending until a later retrain."""

    # -- monitoring -------------------------------------------------------------------------------
    drift_window: int = Field(2000, ge=50)
    """Most recent predictions compared with the reference in each drift run."""
    drift_min_window: int = Field(100, ge=10)
    """Fewer recent predictions than this: no drift verdict yet."""
    drift_interval_s: float = Field(60.0, ge=1)
    """Seconds between two runs of the drift job."""
    drift_embedding_threshold: float = Field(0.55, gt=0.5, lt=1)
    """ROC AUC of a classifier told to separate window from reference above which embeddings
    drift."""
    drift_label_threshold: float = Field(0.1, gt=0, lt=1)
    """Jensen-Shannon distance of the predicted-label distributions above which they drift."""
    drift_confidence_threshold: float = Field(0.1, gt=0, lt=1)
    """Wasserstein distance (in standard deviations of the reference) for confidence drift."""
    drift_length_threshold: float = Field(0.1, gt=0, lt=10)
    """Wasserstein distance (in standard deviations of the reference) for text-length drift."""
    online_accuracy_window: int = Field(500, ge=10)
    """Feedback on logged predictions that online accuracy is computed over."""
    estimate_window: int = Field(1000, ge=10)
    """Most recent predictions of the serving version whose calibrated confidences estimate its
    accuracy without labels (computed by the drift job, every ``REFIT_DRIFT_INTERVAL_S``)."""

    # -- several replicas sharing one store and one registry -------------------------------------
    instance_name: str | None = None
    """This replica's name in records other replicas read (retrain jobs, the drift job's lease);
    unset: the host name, which in Kubernetes is the pod's name."""
    heartbeat_interval_s: float = Field(5.0, gt=0, le=60)
    """How often a running retrain job and the leader of the drift job renew their heartbeat in
    the store."""
    lease_timeout_s: float = Field(20.0, ge=2, le=600)
    """A retrain job or drift-job leader on another replica that has not renewed its heartbeat for
    this long is presumed dead: the job shows `failed` and another replica takes over."""
    staging_stale_after_s: float = Field(3600.0, ge=60)
    """A folder in the registry's staging area that another host has not written to for this long
    is presumed abandoned and removed (a host's own dead writers are removed at once)."""
    # -- review queue (what to label next) ------------------------------------------------------
    review_max_limit: int = Field(100, ge=1, le=1000)
    """Most predictions one ``GET /review`` returns (its ``limit`` may not exceed this)."""
    review_diverse_pool_factor: int = Field(2, ge=1, le=20)
    """The ``diverse`` strategy clusters this many times ``limit`` of the least confident candidates
    and picks one per cluster. Larger spreads the picks wider but takes less uncertain ones (2
    measured best in bench/active_learning.py)."""
    review_queue_threshold: float = Field(0.5, gt=0, le=1)
    """The review queue's size (``refit_review_queue_predictions``) counts unlabelled predictions
    of the serving version whose confidence is below this."""

    # -- logging ----------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of refit's own log messages (the ``refit.*`` loggers) in the serving workers, the
    retrain job and the drift job."""

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("sqlite:///", "postgresql")):
            raise ValueError("must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value

    @field_validator("admin_token", "feedback_key")
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
        if self.lease_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                "REFIT_LEASE_TIMEOUT_S must be at least twice REFIT_HEARTBEAT_INTERVAL_S, so one "
                "late heartbeat does not declare a live job dead"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        """The store's URL: :attr:`database_url`, or the SQLite file in :attr:`data_dir`."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'refit.db').resolve()}"


def env_name(field_name: str) -> str:
    """The environment variable a field is read from."""
    return ENV_PREFIX + field_name.upper()


def load_settings(**overrides: object) -> RefitSettings:
    """Settings from the environment; a bad value exits with a message naming the variable.

    ``REFIT_*`` variables that are no setting are logged as warnings (see
    :func:`unknown_variables`): pydantic-settings would ignore them silently.
    """
    for message in unknown_variables(os.environ):
        log.warning("%s", message)
    try:
        return RefitSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = error["loc"]
            name = env_name("_".join(str(p) for p in loc)) if loc else ENV_PREFIX + "*"
            lines.append(f"  {name}: {error['msg']}")
        raise SettingsError("refit: invalid settings:\n" + "\n".join(lines)) from None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per ``REFIT_*`` variable in ``environ`` that names no setting.

    Each names the variable and the closest setting, if one is close, or why a removed setting
    went. Names are compared as pydantic-settings reads them: without regard to case.
    """
    known = {env_name(name) for name in RefitSettings.model_fields}
    messages = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        if upper.startswith(FOREIGN_PREFIXES):
            continue
        if upper in REMOVED_SETTINGS:
            messages.append(f"{variable} is set but is no longer a setting: "
                            f"{REMOVED_SETTINGS[upper]}; it is ignored")
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        messages.append(f"{variable} is set but is no refit setting, so it is ignored{hint}")
    return messages


# -- the README's settings table ------------------------------------------------------------------


def settings_table() -> str:
    """The README's table of every setting: variable, default and the docstring's first sentence."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, info in RefitSettings.model_fields.items():
        if not info.description:
            raise ValueError(f"RefitSettings.{name} has no docstring: document it")
        rows.append(
            f"| `{env_name(name)}` | {_default_cell(info.default)} | "
            f"{_cell(first_sentence(info.description))} |"
        )
    return "\n".join(rows) + "\n"


def first_sentence(text: str) -> str:
    """The text up to the first full stop that ends a sentence, on one line."""
    text = " ".join(text.split())
    # A sentence ends at a full stop followed by a capital letter, unless it is an abbreviation.
    for match in re.finditer(r"\.\s+(?=[A-Z])", text):
        if not text[: match.start()].endswith(("e.g", "i.e", "etc")):
            return text[: match.start() + 1]
    return text


def _cell(text: str) -> str:
    # reStructuredText literals (``x``) become Markdown code; a pipe would end the cell.
    return text.replace("``", "`").replace("|", "\\|")


def _default_cell(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = str(value)
    return f"`{value}`"


def replace_readme_table(readme: str, table: str) -> str:
    """``readme`` with the text between the settings markers replaced by ``table``."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README lacks the markers {README_START} ... {README_END}")
    return readme[: start + len(README_START)] + "\n" + table + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m refit.settings", description="Document refit's settings."
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true",
                        help="print the settings table in Markdown")
    action.add_argument("--readme", type=Path, metavar="PATH",
                        help="rewrite the settings table in this README, between its markers")
    args = parser.parse_args(argv)
    table = settings_table()
    if args.markdown:
        sys.stdout.write(table)
        return 0
    try:
        updated = replace_readme_table(args.readme.read_text(), table)
    except (OSError, ValueError) as exc:
        print(f"refit.settings: {exc}", file=sys.stderr)
        return 2
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
