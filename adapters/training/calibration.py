"""Calibrated confidence: a temperature fitted on the validation split and folded into the head.

A head's softmax is rarely calibrated: on refit's evaluation sets both heads are under-confident
(the linear head held back by its L2 penalty, the MLP by label smoothing), by 5-13 points of ECE.
Temperature scaling (Guo et al., 2017) divides the logits by one number ``T`` chosen to minimise
the negative log-likelihood of the validation split (shrunk towards 1 when that split is small:
:data:`PRIOR_LOG_SD`). It never changes a prediction (the arg-max is the same) and, with one
parameter, cannot over-fit even a small validation split badly.

Dividing the logits by ``T`` is the same as dividing the final linear layer's weights and bias by
``T``, for the linear head and the MLP alike (the last module of both is an ``nn.Linear``). So
:func:`fold_temperature` returns a head whose plain softmax *is* the calibrated probability: the
exported ONNX graph, the parity check, the stored ``head.npz`` and everything computed from them
(metrics, the drift reference's confidences) carry the calibration, and serving pays nothing.

Calibration is measured by the expected calibration error (ECE) of the top label: predictions are
put in 15 equal-width bins of confidence, and ECE is the share-weighted mean of
``|accuracy - mean confidence|`` over the bins (0 is perfect). The manifest records it, and the
negative log-likelihood, before and after, on validation (where ``T`` was fitted) and on test
(never seen).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from adapters.training.head import ClassifierHead

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The search interval for ``T``."""
METHOD = "temperature"


def expected_calibration_error(
    probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE with ``bins`` equal-width confidence bins (0 for no examples)."""
    if len(y) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in np.unique(index):
        members = index == b
        total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(y))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(_log_softmax(logits / temperature))


def negative_log_likelihood(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under ``softmax(logits / T)``."""
    if len(y) == 0:
        return 0.0
    log_p = _log_softmax(logits.astype(np.float64) / temperature)
    return float(-log_p[np.arange(len(y)), y].mean())


PRIOR_LOG_SD = 0.5
"""The fit is a MAP estimate with a normal prior on ``log T`` (mean 0, this deviation): on a
validation split of a few dozen examples that the head nearly all gets right, the likelihood alone
drives ``T`` towards 0 and makes the model sure of everything, off-topic text included (on the demo
data it hid off-topic traffic from the confidence drift signal); the prior shrinks such a ``T``
towards 1. With a thousand examples or more it moves ``T`` by less than 1%."""


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The ``T`` in :data:`TEMPERATURE_BOUNDS` minimising the validation log-loss of
    ``logits / T`` (summed over examples) plus the prior's ``(log T)² / (2 σ²)``.

    A grid of 200 points in ``log T`` brackets the minimum, a golden-section search refines it to
    a relative precision of 1e-6. With no examples, ``T`` is 1.
    """
    if len(y) == 0:
        return 1.0
    logits = logits.astype(np.float64)
    n = len(y)

    def loss(log_t: float) -> float:
        return n * negative_log_likelihood(logits, y, math.exp(log_t)) + log_t**2 / (
            2 * PRIOR_LOG_SD**2
        )

    low, high = TEMPERATURE_BOUNDS
    grid = np.linspace(math.log(low), math.log(high), 200)
    best = int(np.argmin([loss(float(u)) for u in grid]))
    lo, hi = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-6:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(math.exp((lo + hi) / 2))


def fold_temperature(head: ClassifierHead, temperature: float) -> ClassifierHead:
    """A copy of ``head`` whose logits are ``head``'s divided by ``temperature``: its final linear
    layer's weights and bias divided by it (exact for the linear head and the MLP)."""
    folded = copy.deepcopy(head).eval()
    last = cast(nn.Linear, folded.net[-1])
    with torch.no_grad():
        last.weight.div_(temperature)
        last.bias.div_(temperature)
    return folded


def uncalibrated(head: ClassifierHead, manifest: Mapping[str, Any]) -> ClassifierHead:
    """The head as training left it, before the temperature of ``manifest`` (a version's) was
    folded in: what a retrain warm-starts from. Versions without calibration are returned as is."""
    record = manifest.get("calibration") or {}
    temperature = record.get("temperature")
    if not temperature or temperature == 1.0:
        return head
    return fold_temperature(head, 1.0 / float(temperature))


@torch.inference_mode()
def head_logits(head: ClassifierHead, embeddings: np.ndarray) -> np.ndarray:
    head.eval()
    return head(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))).numpy()


@dataclass
class Calibration:
    """A fitted temperature, the head it was folded into, and the before/after record."""

    head: ClassifierHead
    temperature: float
    record: dict[str, Any]


def calibrate_head(
    head: ClassifierHead,
    x_validation: np.ndarray,
    y_validation: np.ndarray,
    judged: Mapping[str, tuple[np.ndarray, np.ndarray]],
    held_out_head: ClassifierHead | None = None,
) -> Calibration:
    """Fit ``T`` on the validation split, fold it into a copy of ``head``, and measure ECE and NLL
    before and after on every split of ``judged`` (``name -> (embeddings, class indices)``).

    ``T`` must come from predictions on data the head did not train on. When ``head`` is the final
    fit on train + validation, ``held_out_head`` is the same configuration fitted on train alone
    (the selection fit): ``T`` is fitted on *its* validation logits and then folded into ``head``,
    and the ``validation`` entry of the record is measured on it too. Fitted on the final head's
    own validation logits, ``T`` would be fitted to data it memorised, and served confidences
    would come out over-confident."""
    fitted_by = head if held_out_head is None else held_out_head
    temperature = fit_temperature(head_logits(fitted_by, x_validation), y_validation)
    record: dict[str, Any] = {
        "method": METHOD,
        "temperature": round(temperature, 6),
        "fitted_on": "validation" if held_out_head is None
        else "validation, on the train-only selection fit's logits",
        "fitted_examples": len(y_validation),
        "ece_bins": ECE_BINS,
    }
    for name, (x, y) in judged.items():
        logits = head_logits(fitted_by if name == "validation" else head, x)
        before, after = softmax(logits), softmax(logits, temperature)
        record[name] = {
            "examples": len(y),
            "ece_before": round(expected_calibration_error(before, y), 6),
            "ece_after": round(expected_calibration_error(after, y), 6),
            "nll_before": round(negative_log_likelihood(logits, y), 6),
            "nll_after": round(negative_log_likelihood(logits, y, temperature), 6),
            "mean_confidence_after": round(float(after.max(axis=1).mean()), 6) if len(y) else None,
            "accuracy": round(float((logits.argmax(axis=1) == y).mean()), 6) if len(y) else None,
        }
    return Calibration(fold_temperature(head, temperature), temperature, record)
