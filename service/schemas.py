"""Wire types of the HTTP API (pydantic). They stay in ``service/``; the core never sees them.

Requests forbid unknown fields, so a typo is a 422 naming the field rather than silently ignored.
Limits that depend on settings (text length, batch size) are checked by the data plane, which
knows the settings, with the same error shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator


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

    prediction_id: StrictStr | None = Field(None, min_length=1, max_length=40)
    text: StrictStr | None = Field(None, min_length=1)
    label: StrictStr = Field(min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_source(self) -> FeedbackItem:
        if (self.prediction_id is None) == (self.text is None):
            raise ValueError("give exactly one of 'prediction_id' or 'text'")
        if not self.label.strip():
            raise ValueError("'label' must not be blank")
        return self


class FeedbackRequest(_Request):
    items: list[FeedbackItem] = Field(min_length=1, max_length=1000)


class FeedbackResponse(BaseModel):
    accepted: int
    feedback_ids: list[int]


class PromoteRequest(_Request):
    version: StrictStr = Field(min_length=1, max_length=32)


class RetrainRequest(_Request):
    unfreeze_layers: int = Field(0, ge=0, le=6)
    search: Literal["none", "grid"] = "none"
    min_feedback: int | None = Field(None, ge=1)
    force: bool = False
    seed: int = 0
