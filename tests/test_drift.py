"""Drift detection on the demo model with real Evidently and onnxruntime (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.serving.data import read_jsonl
from adapters.serving.runtime import OnnxClassifier
from monitoring.drift import Reference, Thresholds, Window, detect
from tests.offtopic import offtopic_texts


@pytest.fixture(scope="module")
def model(trained_registry):
    version = trained_registry.current()
    return (
        version,
        OnnxClassifier(version.path),
        Reference.load(version.name, version.path, version.labels),
    )


def window_of(classifier: OnnxClassifier, texts: list[str]) -> Window:
    output = classifier.predict(texts)
    predicted = output.probabilities.argmax(axis=1)
    return Window(
        labels=[classifier.labels[i] for i in predicted],
        confidence=output.probabilities.max(axis=1).astype(np.float64),
        text_length=np.array([len(t) for t in texts], dtype=np.float64),
        embeddings=output.embeddings,
        start=0.0,
        end=1.0,
    )


def test_reference_holds_held_out_rows_and_all_embeddings(model):
    version, _, reference = model
    held_out = (
        version.manifest["data"]["validation"]["rows"] + version.manifest["data"]["test"]["rows"]
    )
    assert (
        len(reference.confidence)
        == len(reference.predicted)
        == len(reference.text_length)
        == held_out
    )
    assert len(reference.embeddings) == sum(
        version.manifest["data"][s]["rows"] for s in ("train", "validation", "test")
    )


def test_held_out_traffic_does_not_drift(model):
    version, classifier, reference = model
    texts = list(
        read_jsonl(version.path / "data" / "test.jsonl").texts
        + read_jsonl(version.path / "data" / "validation.jsonl").texts
    )
    result, snapshot = detect(reference, window_of(classifier, texts), Thresholds())
    assert not result.drift_detected, result.to_dict()["signals"]
    assert set(result.signals) == {"label", "confidence", "embedding", "text_length"}
    assert result.signals["label"].score < 0.1
    assert snapshot is not None


def test_off_topic_traffic_drifts_on_every_signal(model):
    _, classifier, reference = model
    result, _ = detect(reference, window_of(classifier, offtopic_texts(200)), Thresholds())
    assert result.drift_detected
    drifted = {name for name, signal in result.signals.items() if signal.drifted}
    assert {"label", "confidence", "embedding"} <= drifted, result.to_dict()["signals"]
    assert result.signals["embedding"].score > 0.9


def test_a_mixed_window_is_scored_between(model):
    version, classifier, reference = model
    texts = list(read_jsonl(version.path / "data" / "test.jsonl").texts)
    clean, _ = detect(reference, window_of(classifier, texts), Thresholds())
    mixed, _ = detect(reference, window_of(classifier, texts + offtopic_texts(40)), Thresholds())
    shifted, _ = detect(reference, window_of(classifier, offtopic_texts(120)), Thresholds())
    for signal in ("label", "embedding"):
        assert (
            clean.signals[signal].score
            < mixed.signals[signal].score
            < shifted.signals[signal].score
        )
