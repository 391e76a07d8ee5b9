"""Wire types of the HTTP API (pydantic). They stay in ``service/``; the core never sees them.

Requests forbid unknown fields, so a typo is a 422 naming the field rather than silently ignored.
Limits that depend on settings (text length, batch size) are checked by the data plane, which
knows the settings, with the same error shape.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

PREDICTION_ID_PATTERN = r"^[0-9a-f]{28}$"
"""What ``/predict`` issues: 12 hex digits of milliseconds, then 16 random hex digits."""
MAX_SEED = 2**31 - 1
MAX_MIN_FEEDBACK = 10_000_000


def check_label(label: str) -> str:
    """A label is a name: not blank, and free of control characters (NUL, newlines, ...)."""
    if not label.strip():
        raise ValueError("'label' must not be blank")
    if any(unicodedata.category(ch) == "Cc" for ch in label):
        raise ValueError("'label' must not contain control characters")
    return label


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class PredictRequest(_Request):
    texts: list[StrictStr] = Field(min_length=1, description="Texts to classify, in order.")


class Prediction(BaseModel):
    prediction_id: str
    label: str
    confidence: float
    scores: dict[str, float]


class PredictResponse(BaseModel):
    model_version: str
    predictions: list[Prediction]


class FeedbackItem(_Request):
    """Either the id of a logged prediction, or the text itself, with its true label."""

    prediction_id: StrictStr | None = Field(
        None, pattern=PREDICTION_ID_PATTERN,
        description="The id /predict returned: 28 lowercase hex digits.",
    )
    text: StrictStr | None = Field(None, min_length=1)
    label: StrictStr = Field(min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_source(self) -> FeedbackItem:
        if (self.prediction_id is None) == (self.text is None):
            raise ValueError("give exactly one of 'prediction_id' or 'text'")
        check_label(self.label)
        return self


class FeedbackRequest(_Request):
    items: list[FeedbackItem] = Field(min_length=1, max_length=1000)


class FeedbackResponse(BaseModel):
    accepted: int
    feedback_ids: list[int]


class PromoteRequest(_Request):
    version: StrictStr = Field(pattern=r"^v[0-9]{1,9}$", description="A version name: v1, v2, ...")


class RetrainRequest(_Request):
    unfreeze_layers: int = Field(0, ge=0, le=6)
    search: Literal["none", "grid"] = "none"
    min_feedback: int | None = Field(None, ge=1, le=MAX_MIN_FEEDBACK)
    force: bool = False
    seed: int = Field(0, ge=0, le=MAX_SEED)
