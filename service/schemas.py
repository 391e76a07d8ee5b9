"""Wire types of the HTTP API (pydantic), both ways. They stay in ``service/``; the core never
sees them.

Requests forbid unknown fields, so a typo is a 422 naming the field rather than silently ignored.
Limits that depend on settings (text length, batch size) are checked by the data plane, which
knows the settings, with the same error shape. Responses are built from the data plane's domain
objects by the ``from_...`` constructors here; ``/openapi.json`` is generated from these classes.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

from adapters.serving.registry import ModelVersion, Pointer
from adapters.serving.variants import Int8Gate, VariantChoice, int8_record, judge_int8
from refit.jobs import Job, RetrainOptions
from refit.store import FeedbackEntry, FeedbackQuery, FeedbackSubmission
from refit.text import LABEL_PATTERN, TEXT_PATTERN, has_control_characters, is_blank
from service.dataplane import (
    EstimateOverview,
    FeedbackPage,
    FeedbackReceipt,
    LabelsOverview,
    ModelsOverview,
    PredictionBatch,
    ReviewQueue,
)
from service.memory import MemoryState


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# -- predict ---------------------------------------------------------------------------------------


# What the checks in code enforce, stated in the document too (refit/text.py).
Text = Annotated[StrictStr, Field(min_length=1, json_schema_extra={"pattern": TEXT_PATTERN})]
Label = Annotated[
    StrictStr, Field(min_length=1, max_length=200, json_schema_extra={"pattern": LABEL_PATTERN})
]


class PredictRequest(_Request):
    texts: list[Text] = Field(min_length=1, description="Texts to classify, in order.")


class Prediction(BaseModel):
    prediction_id: str = Field(description="Give it back with feedback on this prediction.")
    label: str = Field(description="The answer: the feedback memory's label when `source` is "
                       "`feedback`, else the model's.")
    confidence: float = Field(
        description="The model's probability of `label` (0 when the label comes from feedback "
        "and the model does not know it yet)."
    )
    scores: dict[str, float] = Field(
        description="The model's probability of every label it knows."
    )
    source: Literal["model", "feedback"] = Field(
        description="`feedback`: the text is close to a labelled feedback example, whose label "
        "this is (the feedback memory); `model`: the model's prediction."
    )
    feedback_id: int | None = Field(
        None, description="With `source` `feedback`: the feedback item whose label this is."
    )
    similarity: float | None = Field(
        None, description="With `source` `feedback`: cosine similarity of the text to that item."
    )


class PredictResponse(BaseModel):
    model_version: str = Field(description="The version that made every prediction here.")
    predictions: list[Prediction] = Field(description="One per text, in the request's order.")

    @classmethod
    def from_batch(cls, batch: PredictionBatch) -> PredictResponse:
        # Validating from the dataclasses' attributes is the fastest way pydantic offers here
        # (faster than model_construct): about 20 µs for one prediction over 10 labels.
        return cls.model_validate(batch, from_attributes=True)


# -- feedback --------------------------------------------------------------------------------------


PREDICTION_ID_PATTERN = r"^[0-9a-f]{28}$"
"""What ``/predict`` issues: 12 hex digits of milliseconds, then 16 random hex digits."""
MAX_SEED = 2**31 - 1
MAX_ID = 10**18 - 1
"""Largest row id (feedback ids, cursors) the API takes: well inside a 64-bit integer."""
MAX_MIN_FEEDBACK = 10_000_000


def check_label(label: str) -> str:
    """A label is a name: not blank, and free of control characters (NUL, newlines, ...)."""
    if is_blank(label):
        raise ValueError("'label' must not be blank")
    if has_control_characters(label):
        raise ValueError("'label' must not contain control characters")
    return label


def _exactly_one_source(schema: dict[str, Any]) -> None:
    """State in the document what the validator enforces: exactly one of the two sources."""
    for name in ("prediction_id", "text"):
        field = schema["properties"][name]
        options = [o for o in field.pop("anyOf", []) if o.get("type") != "null"]
        field.pop("default", None)
        if options:
            field.update(options[0])
    schema["oneOf"] = [
        {"required": ["prediction_id"], "not": {"required": ["text"]}},
        {"required": ["text"], "not": {"required": ["prediction_id"]}},
    ]


class FeedbackItem(_Request):
    """Either the id of a logged prediction, or the text itself, with its true label."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_source)

    prediction_id: StrictStr | None = Field(
        None, pattern=PREDICTION_ID_PATTERN,
        description="The id /predict returned: 28 lowercase hex digits.",
    )
    text: Text | None = None
    label: Label

    @model_validator(mode="after")
    def _one_source(self) -> FeedbackItem:
        if (self.prediction_id is None) == (self.text is None):
            raise ValueError("give exactly one of 'prediction_id' or 'text'")
        check_label(self.label)
        return self

    def to_submission(self) -> FeedbackSubmission:
        return FeedbackSubmission(
            prediction_id=self.prediction_id, text=self.text, label=self.label
        )


class FeedbackRequest(_Request):
    items: list[FeedbackItem] = Field(min_length=1, max_length=1000)


class ReplacedItem(BaseModel):
    prediction_id: str
    previous_label: str
    feedback_id: int = Field(description="The id of the replaced (now deleted) item.")


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="Items stored (all of them: feedback is all or nothing).")
    feedback_ids: list[int] = Field(
        description="Ids of the stored items, in the request's order (an item a later item of "
        "the same request replaced is listed in `replaced` as well)."
    )
    replaced: list[ReplacedItem] = Field(
        description="Earlier labels for the same predictions, replaced: the latest label wins."
    )

    @classmethod
    def from_receipt(cls, receipt: FeedbackReceipt) -> FeedbackResponse:
        return cls(
            accepted=len(receipt.feedback_ids),
            feedback_ids=receipt.feedback_ids,
            replaced=[
                ReplacedItem(prediction_id=r.prediction_id, previous_label=r.previous_label,
                             feedback_id=r.feedback_id)
                for r in receipt.replaced
            ],
        )


_YEAR = r"[1-9][0-9]{3}"
_LEAP_YEAR = r"([1-9][0-9](0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26])00)"
_DATE = (
    rf"({_YEAR}-((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)"
    rf"|(0[13578]|1[02])-31)|{_LEAP_YEAR}-02-29)"
)
SINCE_PATTERN = (
    rf"^([0-9]{{1,12}}(\.[0-9]{{1,9}})?|{_DATE}"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
    r"(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9])?)?)$"
)
"""Unix seconds, or an ISO 8601 date or time. The pattern matches exactly the real calendar
days (the 30th, the 31st and 29 February of leap years included), so every string it lets
through parses, and every real date gets through."""


class FeedbackListQuery(_Request):
    """Query parameters of ``GET /feedback``."""

    label: StrictStr | None = Field(None, min_length=1, max_length=200,
                                    description="Only items with this label.")
    since: str | None = Field(
        None, max_length=40, pattern=SINCE_PATTERN,
        description="Only items given at or after this time: unix seconds or ISO 8601.",
        examples=["1763900000", "2026-11-23T18:00:00+00:00"],
    )
    source: Literal["prediction_id", "text"] | None = Field(
        None, description="Only items given by prediction id, or only by text."
    )
    limit: int = Field(100, ge=1, le=1000, description="Items per page.")
    cursor: int | None = Field(
        None,
        ge=1,
        le=MAX_ID,
        description="`next_cursor` of the previous page (items older than it).",
    )

    @field_validator("since")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            parse_time(value)
        return value

    def to_query(self) -> FeedbackQuery:
        return FeedbackQuery(
            label=self.label, since=parse_time(self.since) if self.since else None,
            source=self.source, limit=self.limit, before_id=self.cursor,
        )


def parse_time(value: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be unix seconds or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class FeedbackEntryInfo(BaseModel):
    id: int
    created_at: float = Field(description="Unix time it was given.")
    source: Literal["prediction_id", "text"]
    prediction_id: str | None
    text: str
    label: str
    predicted_label: str | None = Field(description="What the model said, for a prediction.")
    model_version: str | None

    @classmethod
    def from_entry(cls, entry: FeedbackEntry) -> FeedbackEntryInfo:
        return cls(
            id=entry.id, created_at=entry.created_at,
            source="text" if entry.prediction_id is None else "prediction_id",
            prediction_id=entry.prediction_id, text=entry.text, label=entry.label,
            predicted_label=entry.predicted_label, model_version=entry.model_version,
        )


class FeedbackList(BaseModel):
    items: list[FeedbackEntryInfo] = Field(description="Newest first.")
    next_cursor: int | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )

    @classmethod
    def from_page(cls, page: FeedbackPage) -> FeedbackList:
        return cls(
            items=[FeedbackEntryInfo.from_entry(entry) for entry in page.items],
            next_cursor=page.next_cursor,
        )


class RelabelRequest(_Request):
    label: Label

    @field_validator("label")
    @classmethod
    def _a_name(cls, value: str) -> str:
        return check_label(value)


class LabelInfo(BaseModel):
    label: str
    status: Literal["active", "pending"]
    reason: str
    training_examples: int = Field(description="Examples in the serving version's training split.")
    feedback_count: int
    feedback_on_predictions: int = Field(description="Feedback items on logged predictions.")
    recall: float | None = Field(
        description="Share of those the model predicted right; null without such feedback."
    )


class LabelsResponse(BaseModel):
    serving_version: str | None
    min_examples: int = Field(description="REFIT_LABEL_MIN_EXAMPLES.")
    labels: list[LabelInfo]

    @classmethod
    def from_overview(cls, overview: LabelsOverview) -> LabelsResponse:
        return cls(
            serving_version=overview.serving_version,
            min_examples=overview.min_examples,
            labels=[
                LabelInfo(
                    label=r.status.label, status=r.status.status, reason=r.status.reason,
                    training_examples=r.status.training_examples,
                    feedback_count=r.status.feedback_count,
                    feedback_on_predictions=r.feedback_on_predictions, recall=r.recall,
                )
                for r in overview.labels
            ],
        )


# -- review queue ----------------------------------------------------------------------------------

MAX_REVIEW_LIMIT = 1000
"""The hard bound on ``limit``; REFIT_REVIEW_MAX_LIMIT (at most this) is the one in force."""


class ReviewQuery(_Request):
    """Query parameters of ``GET /review``."""

    strategy: Literal["uncertainty", "margin", "diverse"] = Field(
        "uncertainty",
        description="`uncertainty`: least confident first; `margin`: smallest gap between the "
        "model's two most probable labels first; `diverse`: the least confident prediction of "
        "each of `limit` clusters of the uncertain ones (spread over the embedding space).",
    )
    limit: int | None = Field(
        None, ge=1, le=MAX_REVIEW_LIMIT,
        description="Predictions to return: default 10, at most REFIT_REVIEW_MAX_LIMIT (100).",
    )


class ReviewItem(BaseModel):
    prediction_id: str = Field(description="Label it with `POST /feedback` by this id.")
    text: str
    predicted_label: str = Field(description="The label served for it.")
    confidence: float = Field(description="The model's probability of `predicted_label`.")
    margin: float | None = Field(
        description="The model's top probability less its second (null on predictions logged "
        "before refit recorded it)."
    )
    created_at: float = Field(description="Unix time of the prediction.")


class ReviewResponse(BaseModel):
    model_version: str = Field(
        description="The serving version, whose predictions (and only those) the queue ranks."
    )
    strategy: Literal["uncertainty", "margin", "diverse"]
    items: list[ReviewItem] = Field(
        description="Unlabelled, unexpired predictions, the most worth labelling first; a text "
        "appears once, and not at all once any feedback labels it."
    )

    @classmethod
    def from_queue(cls, queue: ReviewQueue) -> ReviewResponse:
        return cls(
            model_version=queue.model_version,
            strategy=queue.strategy,
            items=[
                ReviewItem(
                    prediction_id=c.id, text=c.text, predicted_label=c.label,
                    confidence=c.confidence, margin=c.margin, created_at=c.created_at,
                )
                for c in queue.items
            ],
        )


# -- models ----------------------------------------------------------------------------------------


class SplitMetrics(BaseModel):
    accuracy: float
    macro_f1: float
    examples: int


class Int8Info(BaseModel):
    """A version's int8 model: its accuracy check against fp32 on the test split."""

    size_mb: float
    fp32_size_mb: float
    examples: int = Field(description="Test examples the check ran on.")
    agreement: float = Field(description="Share of them on which int8 and fp32 agree.")
    fp32_accuracy: float
    int8_accuracy: float
    accuracy_drop: float = Field(description="fp32 accuracy minus int8 accuracy (a fraction).")
    passed: bool = Field(description="Whether the check passes the accuracy gate in effect.")
    reason: str


class CalibrationSplit(BaseModel):
    examples: int
    ece_before: float = Field(description="Expected calibration error of the raw head.")
    ece_after: float = Field(description="Expected calibration error as served (calibrated).")


class CalibrationInfo(BaseModel):
    """How the served confidences were calibrated (see adapters/training/calibration.py)."""

    method: str = Field(description="`temperature`: the logits divided by one fitted number.")
    temperature: float = Field(description="Fitted on the validation split; folded into the "
                               "exported model, so served probabilities are calibrated.")
    ece_bins: int
    validation: CalibrationSplit | None = Field(description="Where the temperature was fitted.")
    test: CalibrationSplit | None = Field(description="Held out: the honest measure.")

    @classmethod
    def from_manifest(cls, record: dict[str, Any] | None) -> CalibrationInfo | None:
        if not record:
            return None
        splits = {
            name: CalibrationSplit(examples=record[name]["examples"],
                                   ece_before=record[name]["ece_before"],
                                   ece_after=record[name]["ece_after"])
            if name in record else None
            for name in ("validation", "test")
        }
        return cls(method=record["method"], temperature=record["temperature"],
                   ece_bins=record["ece_bins"], **splits)


class VersionInfo(BaseModel):
    version: str
    parent: str | None = Field(description="The version it was retrained from, if any.")
    created_at: str | None
    labels: list[str]
    metrics: dict[str, SplitMetrics] = Field(description="Scores on `validation` and `test`.")
    gate: dict[str, Any] | None = Field(description="The promotion gate's decision, if retrained.")
    calibration: CalibrationInfo | None = Field(
        None, description="Confidence calibration and its error before and after; null for "
        "versions trained before calibration existed.")
    current: bool = Field(description="Whether the registry's pointer names this version.")
    int8: Int8Info | None = Field(
        None, description="Its int8 model's check (absent for versions without one).")
    precision: Literal["fp32", "int8"] | None = Field(
        None, description="The model file this worker serves for this version under "
        "REFIT_MODEL_PRECISION, and why (precision_reason).")
    precision_reason: str | None = None

    @classmethod
    def from_version(
        cls, version: ModelVersion, current: bool, variant: VariantChoice | None = None,
        gate: Int8Gate | None = None,
    ) -> VersionInfo:
        m = version.manifest
        record = int8_record(m)
        int8 = None
        if record is not None and record.get("check"):
            check = record["check"]
            verdict = judge_int8(check, gate or Int8Gate())
            int8 = Int8Info(
                size_mb=round(record["size_bytes"] / 2**20, 1),
                fp32_size_mb=round(record["fp32_size_bytes"] / 2**20, 1),
                examples=check["examples"], agreement=check["agreement"],
                fp32_accuracy=check["fp32_accuracy"], int8_accuracy=check["int8_accuracy"],
                accuracy_drop=check["accuracy_drop"], passed=verdict.passed,
                reason=verdict.reason,
            )
        return cls(
            version=version.name,
            parent=m.get("parent"),
            created_at=m.get("created_at"),
            labels=list(m.get("labels", [])),
            metrics={
                split: SplitMetrics(
                    accuracy=m["metrics"][split]["accuracy"],
                    macro_f1=m["metrics"][split]["macro_f1"],
                    examples=m["metrics"][split]["examples"],
                )
                for split in ("validation", "test")
                if split in m.get("metrics", {})
            },
            gate=m.get("gate"),
            calibration=CalibrationInfo.from_manifest(m.get("calibration")),
            current=current,
            int8=int8,
            precision=variant.precision if variant else None,
            precision_reason=variant.reason if variant else None,
        )


class ServingInfo(BaseModel):
    """What the worker that answered serves (each worker follows the pointer on its own)."""

    version: str | None
    worker_pid: int
    host: str
    loaded_at: float | None = Field(description="Unix time the version was loaded.")
    last_swap_error: str | None = Field(description="Why the last swap failed, if it did.")
    precision: Literal["fp32", "int8"] | None = Field(
        None, description="The model file it serves: fp32 or int8 (REFIT_MODEL_PRECISION).")
    precision_reason: str | None = Field(
        None, description="Why that file: the setting, or the int8 accuracy gate's verdict.")


class ModelsResponse(BaseModel):
    current: str | None = Field(description="The version the registry's pointer names.")
    serving: ServingInfo
    versions: list[VersionInfo]

    @classmethod
    def from_overview(cls, overview: ModelsOverview) -> ModelsResponse:
        current = overview.pointer.version if overview.pointer else None
        serving = overview.serving
        return cls(
            current=current,
            serving=ServingInfo(
                version=serving.version, worker_pid=serving.worker_pid, host=serving.host,
                loaded_at=serving.loaded_at, last_swap_error=serving.last_swap_error,
                precision=serving.variant.precision if serving.variant else None,
                precision_reason=serving.variant.reason if serving.variant else None,
            ),
            versions=[
                VersionInfo.from_version(
                    v, v.name == current, overview.variants.get(v.name), overview.int8_gate
                )
                for v in overview.versions
            ],
        )


# -- accuracy estimated without labels ---------------------------------------------------------


class EstimatedAccuracy(BaseModel):
    predictions: int = Field(description="Predictions the estimate is computed over.")
    accuracy: float = Field(description="Their mean calibrated confidence.")
    lower: float = Field(description="Lower end of the 95% interval (Poisson-binomial).")
    upper: float = Field(description="Upper end of the 95% interval.")


class LabelEstimate(EstimatedAccuracy):
    label: str = Field(description="The predicted (served) label: its estimate is a precision.")


class EstimateResponse(BaseModel):
    """Accuracy estimated from the calibrated confidences of the serving version's newest
    predictions, without labels. As good as the calibration: on traffic unlike the training data
    (new intents) the model is often confidently wrong and the estimate too high."""

    model_version: str = Field(description="The version this worker serves.")
    window: int = Field(description="Newest predictions considered (`REFIT_ESTIMATE_WINDOW`).")
    window_start: float | None = Field(description="Unix time of the oldest prediction used.")
    window_end: float | None = Field(description="Unix time of the newest prediction used.")
    accuracy: EstimatedAccuracy | None = Field(description="Overall; null before any prediction.")
    by_label: list[LabelEstimate] = Field(description="Per predicted label, lowest first.")
    test_accuracy: float | None = Field(description="The version's accuracy on its test split.")
    test_calibration_error: float | None = Field(
        description="The version's expected calibration error on its test split.")

    @classmethod
    def from_overview(cls, overview: EstimateOverview) -> EstimateResponse:
        estimate = overview.estimate
        assert overview.model_version is not None
        return cls(
            model_version=overview.model_version, window=overview.window,
            window_start=overview.start, window_end=overview.end,
            accuracy=EstimatedAccuracy(**asdict(estimate.overall)) if estimate else None,
            by_label=sorted(
                (LabelEstimate(label=label, **asdict(e))
                 for label, e in (estimate.by_label.items() if estimate else [])),
                key=lambda e: (e.accuracy, e.label),
            ),
            test_accuracy=overview.test_accuracy,
            test_calibration_error=overview.test_calibration_error,
        )


class MemoryCalibration(BaseModel):
    items: int = Field(description="Feedback items the thresholds were calibrated on.")
    model_accuracy: float | None = Field(description="The model alone on those items.")
    combined_accuracy: float | None = Field(
        description="Leave-one-out accuracy of memory-or-model on them at these thresholds."
    )
    answered: int = Field(description="Items the memory answered at these thresholds.")
    prototype_answered: int = Field(
        0, description="Of those, the items the prototype rule answered."
    )
    reason: str
    memory_served: list[str] = Field(
        [], description="Labels a retrain added that the memory still answers as if the model "
        "did not know them: on their feedback the memory is right more often than the new head."
    )


class MemoryResponse(BaseModel):
    """The feedback memory of the worker that answered (each worker keeps its own)."""

    enabled: bool = Field(description="REFIT_MEMORY_ENABLED.")
    worker_pid: int
    entries: int = Field(description="Feedback examples the memory holds.")
    threshold: float | None = Field(
        description="Similarity at which an example of a label the model knows answers."
    )
    new_label_threshold: float | None = Field(
        description="Similarity at which an example of a label the model does not know answers."
    )
    new_label_margin: float | None = Field(
        None,
        description=(
            "Prototype rule: a text gets a label the model does not know when its similarity to "
            "that label's prototype (the mean of its examples) exceeds its similarity to the "
            "nearest of the model's class prototypes by this margin (null: the rule is off). "
            "Applies to labels without a margin of their own in `new_label_margins`."
        ),
    )
    new_label_margins: dict[str, float | None] = Field(
        {},
        description=(
            "Each label the model does not know, with its own prototype-rule margin (null: the "
            "rule is off for it), calibrated on its own feedback and shrunk towards the shared "
            "margin by how little of it there is."
        ),
    )
    prototype_rule: bool = Field(
        False, description="Whether the served model's class prototypes were read (the rule's "
        "reference, from the version folder's training data).",
    )
    built_for: str | None = Field(description="The model version the memory was rebuilt for.")
    built_at: float | None = Field(description="Unix time of that rebuild.")
    rebuild_seconds: float | None
    feedback_items: int | None = Field(
        description="Feedback items the rebuild read; it kept those the model gets wrong."
    )
    cursor: int = Field(description="Position in the store's feedback change feed.")
    calibration: MemoryCalibration | None
    last_error: str | None

    @classmethod
    def from_state(cls, state: MemoryState, worker_pid: int) -> MemoryResponse:
        c = state.calibration
        return cls(
            enabled=state.enabled, worker_pid=worker_pid, entries=state.entries,
            threshold=state.threshold, new_label_threshold=state.new_label_threshold,
            new_label_margin=state.new_label_margin,
            new_label_margins=dict(state.new_label_margins), prototype_rule=state.prototype_rule,
            built_for=state.built_for, built_at=state.built_at,
            rebuild_seconds=state.rebuild_seconds, feedback_items=state.feedback_items,
            cursor=state.cursor,
            calibration=None if c is None else MemoryCalibration(
                items=c.items, model_accuracy=c.model_accuracy,
                combined_accuracy=c.combined_accuracy, answered=c.answered,
                prototype_answered=c.prototype_answered, reason=c.reason,
                memory_served=list(c.memory_served),
            ),
            last_error=state.last_error,
        )


class PromoteRequest(_Request):
    version: StrictStr = Field(pattern=r"^v[0-9]{1,9}$", description="A version name: v1, v2, ...")


class PromoteResponse(BaseModel):
    current: str
    previous: str | None
    promoted_at: str
    note: str

    @classmethod
    def from_pointer(cls, pointer: Pointer, poll_interval_s: float) -> PromoteResponse:
        return cls(
            current=pointer.version,
            previous=pointer.previous,
            promoted_at=pointer.promoted_at,
            note=f"every worker switches within about {poll_interval_s:g}s plus the load time",
        )


# -- retraining ------------------------------------------------------------------------------------


class RetrainRequest(_Request):
    unfreeze_layers: int = Field(0, ge=0, le=6, description="Top encoder layers to fine-tune.")
    search: Literal["none", "grid"] = "none"
    min_feedback: int | None = Field(
        None, ge=1, le=MAX_MIN_FEEDBACK,
        description="Feedback items needed; default REFIT_RETRAIN_MIN_FEEDBACK.",
    )
    force: bool = Field(False, description="Promote even if the gate rejects the challenger.")
    seed: int = Field(0, ge=0, le=MAX_SEED)

    def to_options(self, default_min_feedback: int) -> RetrainOptions:
        return RetrainOptions(
            unfreeze_layers=self.unfreeze_layers,
            search=self.search,
            min_feedback=self.min_feedback or default_min_feedback,
            force=self.force,
            seed=self.seed,
        )


class RetrainOptionsInfo(BaseModel):
    unfreeze_layers: int
    search: str
    min_feedback: int
    force: bool
    seed: int


class RetrainJob(BaseModel):
    job_id: str
    phase: Literal[
        "queued", "collecting", "training", "exporting", "evaluating", "promoting", "done",
        "failed",
    ]
    created_at: float
    updated_at: float
    pid: int | None
    host: str | None
    options: RetrainOptionsInfo
    progress: dict[str, Any] | None = Field(description="Step, epoch and scores while it runs.")
    result: dict[str, Any] | None = Field(
        description="Once done: version, outcome (promoted/rejected), reason, scores."
    )
    error: str | None

    @classmethod
    def from_job(cls, job: Job) -> RetrainJob:
        return cls.model_validate(
            {
                "job_id": job.job_id, "phase": job.phase, "created_at": job.created_at,
                "updated_at": job.updated_at, "pid": job.pid, "host": job.host,
                "options": job.options.to_dict(), "progress": job.progress, "result": job.result,
                "error": job.error,
            }
        )


class RetrainJobList(BaseModel):
    jobs: list[RetrainJob] = Field(description="The most recent jobs, newest first.")


# -- drift -----------------------------------------------------------------------------------------


class DriftSignal(BaseModel):
    method: str
    score: float
    threshold: float
    drifted: bool
    details: dict[str, Any] = {}


class DriftResponse(BaseModel):
    """The drift job's latest result; ``status`` is ``pending`` before its first run."""

    model_config = ConfigDict(extra="allow")

    status: str = Field(description="ok, insufficient_data, no_model or pending")
    message: str = ""
    model_version: str | None = None
    reference_version: str | None = None
    window: dict[str, Any] | None = None
    signals: dict[str, DriftSignal] | None = None
    drift_detected: bool | None = None
    computed_at: float | None = None
    seconds: float | None = None


# -- errors and index ------------------------------------------------------------------------------


class FieldProblem(BaseModel):
    field: str
    problem: str


class ErrorResponse(BaseModel):
    """Every error: a message, the field at fault if any, and details of the failure."""

    model_config = ConfigDict(extra="allow")

    error: str
    field: str | None = Field(None, description="The field at fault, e.g. `items[0].label`.")
    errors: list[FieldProblem] | None = Field(None, description="Every problem found (422).")
    prediction_id: str | None = Field(None, description="404: the unknown prediction id.")
    running_job_id: str | None = Field(None, description="409: the job already running.")
    feedback_items: int | None = Field(None, description="409: feedback items stored so far.")
    min_feedback: int | None = Field(None, description="409: feedback items a retrain needs.")


class IndexResponse(BaseModel):
    service: str
    docs: str = Field(description="Interactive API documentation (Swagger UI).")
    openapi: str = Field(description="The OpenAPI 3.1 document.")
    endpoints: dict[str, str]
