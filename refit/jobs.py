"""Retrain jobs as domain objects: what a job is asked to do, and what the store knows of it.

Torch-free and web-free: the service submits :class:`RetrainOptions` and reads :class:`Job`
records; the training process (``adapters.training.retrain``) reads the same options back from
the store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

JobPhase = Literal[
    "queued", "collecting", "training", "exporting", "evaluating", "promoting", "done", "failed"
]
TERMINAL_PHASES = ("done", "failed")


@dataclass(frozen=True)
class RetrainOptions:
    """What one retrain job is asked to do."""

    unfreeze_layers: int = 0
    """Top encoder layers to fine-tune after the head (0: head only)."""
    search: str = "none"
    """Hyper-parameter search of the head: ``none`` or ``grid``."""
    min_feedback: int = 20
    """Feedback items the job needs before it trains at all."""
    force: bool = False
    """Promote the challenger even if the gate rejects it."""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RetrainOptions:
        """Options as stored; keys this version does not know (from a newer one) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass(frozen=True)
class Job:
    """A retrain job as recorded in the store."""

    job_id: str
    phase: str
    created_at: float
    updated_at: float
    pid: int | None
    host: str | None
    options: RetrainOptions
    progress: dict[str, Any] | None
    """Written by the job while it runs: step, epoch, validation scores."""
    result: dict[str, Any] | None
    """The outcome once done: version, promoted, reason, scores (shaped by the training job)."""
    error: str | None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def outcome(self) -> str:
        """``promoted``, ``rejected`` or ``failed`` for a finished job; the phase otherwise."""
        if self.phase == "failed":
            return "failed"
        if self.phase == "done":
            return str((self.result or {}).get("outcome", "failed"))
        return self.phase
