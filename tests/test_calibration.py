"""Calibrated confidence: the ECE measure, the temperature fit, folding it into the exported model,
and what a trained version records and serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.serving.data import read_jsonl
from adapters.serving.runtime import OnnxClassifier
from adapters.training.calibration import (
    TEMPERATURE_BOUNDS,
    calibrate_head,
    expected_calibration_error,
    fit_temperature,
    fold_temperature,
    head_logits,
    softmax,
    uncalibrated,
)
from adapters.training.head import ClassifierHead
from adapters.training.pipeline import version_head


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_when_it_does_not() -> None:
    # 10 predictions at confidence 0.8 of which 8 are right: perfectly calibrated.
    probabilities = np.tile([[0.8, 0.2]], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probabilities, y) == pytest.approx(0.0)
    # The same confidence, all wrong: the gap is the whole confidence.
    assert expected_calibration_error(probabilities, np.ones(10, dtype=int)) == pytest.approx(0.8)
    # Two bins, weighted by their share: 0.95 confident and right (gap 0.05), 0.6 and wrong (0.6).
    mixed = np.array([[0.95, 0.05], [0.95, 0.05], [0.95, 0.05], [0.4, 0.6]])
    assert expected_calibration_error(mixed, np.array([0, 0, 0, 0])) == pytest.approx(
        (3 * 0.05 + 1 * 0.6) / 4
    )
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 0.0


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_temperature: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20_000, 6))
    p = softmax(logits, true_temperature)
    y = np.array([rng.choice(6, p=row) for row in p])
    fitted = fit_temperature(logits, y)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # Calibrated, the confidences are honest; the raw logits are not (unless T was 1).
    assert expected_calibration_error(softmax(logits, fitted), y) < 0.015


def test_a_small_perfectly_separated_validation_split_only_shrinks_the_temperature() -> None:
    """The likelihood alone would send T to its lower bound (everything certain); the prior on
    log T keeps it finite, and a larger split moves it further."""
    logits = np.eye(4)[np.arange(40) % 4] * 3
    y = np.arange(40) % 4
    small = fit_temperature(logits, y)
    assert TEMPERATURE_BOUNDS[0] * 2 < small < 1.0
    assert fit_temperature(np.tile(logits, (25, 1)), np.tile(y, 25)) < small
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0, dtype=int)) == 1.0


def head_of(hidden: int, seed: int = 0) -> ClassifierHead:
    torch.manual_seed(seed)
    head = ClassifierHead(384, 7, hidden_size=hidden, dropout=0.1)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0, 0.5)
    return head.eval()


@pytest.mark.parametrize("hidden", [0, 32])
def test_folding_divides_the_logits_and_unfolding_restores_the_head(hidden: int) -> None:
    head = head_of(hidden)
    x = np.random.default_rng(1).normal(size=(50, 384)).astype(np.float32)
    folded = fold_temperature(head, 1.7)
    raw = head_logits(head, x)
    assert head_logits(folded, x) == pytest.approx(raw / 1.7, rel=1e-5, abs=1e-5)
    assert (head_logits(folded, x).argmax(axis=1) == raw.argmax(axis=1)).all()
    assert head_logits(head, x) == pytest.approx(raw)  # the original is untouched
    restored = uncalibrated(folded, {"calibration": {"temperature": 1.7}})
    assert head_logits(restored, x) == pytest.approx(raw, rel=1e-5, abs=1e-5)
    assert uncalibrated(head, {}) is head  # a version from before calibration


def test_calibrate_head_records_before_and_after_and_folds_the_fitted_temperature() -> None:
    head = head_of(0)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 384)).astype(np.float32)
    # Labels drawn from a much softer version of the head's own probabilities: it is overconfident.
    p = softmax(head_logits(head, x), 4.0)
    y = np.array([rng.choice(7, p=row) for row in p])
    result = calibrate_head(head, x[:300], y[:300], {"validation": (x[:300], y[:300]),
                                                     "test": (x[300:], y[300:])})
    assert result.temperature == pytest.approx(4.0, rel=0.3)
    record = result.record
    assert record["method"] == "temperature" and record["fitted_examples"] == 300
    for split in ("validation", "test"):
        assert record[split]["ece_after"] < record[split]["ece_before"]
        assert record[split]["nll_after"] < record[split]["nll_before"]
    assert head_logits(result.head, x) == pytest.approx(
        head_logits(head, x) / result.temperature, rel=1e-5, abs=1e-5
    )


def test_temperature_comes_from_the_head_that_never_saw_validation() -> None:
    """The served head may be refitted on train + validation: T is then fitted on the train-only
    selection fit's validation logits and folded into the served head, not fitted to the served
    head's own (memorised) validation logits."""
    served, held_out = head_of(0), head_of(0, seed=5)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 384)).astype(np.float32)
    y = np.array([rng.choice(7, p=row) for row in softmax(head_logits(held_out, x), 3.0)])
    result = calibrate_head(served, x, y, {"validation": (x, y), "test": (x, y)},
                            held_out_head=held_out)
    assert result.temperature == pytest.approx(fit_temperature(head_logits(held_out, x), y))
    assert result.temperature != pytest.approx(fit_temperature(head_logits(served, x), y))
    assert head_logits(result.head, x) == pytest.approx(
        head_logits(served, x) / result.temperature, rel=1e-5, abs=1e-5
    )
    record = result.record
    assert "selection fit" in record["fitted_on"]
    held_out_ece = expected_calibration_error(softmax(head_logits(held_out, x)), y)
    assert record["validation"]["ece_before"] == pytest.approx(held_out_ece, abs=2e-6)
    served_ece = expected_calibration_error(softmax(head_logits(served, x)), y)
    assert record["test"]["ece_before"] == pytest.approx(served_ece, abs=2e-6)


@pytest.fixture(scope="module")
def encoder_and_tokenizer():
    from adapters.training.encoder import load_encoder, tokenizer_for

    return load_encoder(), tokenizer_for(128)


@pytest.mark.parametrize("hidden", [0, 64])
def test_exported_model_serves_the_calibrated_probabilities(tmp_path, encoder_and_tokenizer,
                                                            hidden: int) -> None:
    """Both export paths (the whole graph, and a new head composed onto an encoder graph) carry
    the folded temperature, and their parity checks pass against the calibrated head."""
    from adapters.training.export import (
        check_head_parity,
        check_parity,
        compose_with_encoder,
        export_onnx,
    )

    encoder, tokenizer = encoder_and_tokenizer
    raw = head_of(hidden, seed=3)
    temperature = 2.3
    calibrated = fold_temperature(raw, temperature)
    texts = ["where is my parcel", "cancel it please", "hi", "I want my money back now"]
    whole = tmp_path / "whole.onnx"
    export_onnx(encoder, calibrated, tokenizer, whole)
    assert check_parity(encoder, calibrated, tokenizer, whole, texts)[
        "max_abs_diff_probabilities"] <= 1e-4
    composed = tmp_path / "composed.onnx"
    compose_with_encoder(whole, calibrated, composed)
    assert check_head_parity(calibrated, tokenizer, composed, texts)[
        "max_abs_diff_probabilities"] <= 1e-4
    for path in (whole, composed):
        ids, mask = tokenizer.encode(texts)
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        served, embedding = session.run(["probabilities", "embedding"],
                                        {"input_ids": ids, "attention_mask": mask})
        expected = softmax(head_logits(raw, embedding), temperature)
        assert served == pytest.approx(expected, abs=1e-5)
        assert not np.allclose(served, softmax(head_logits(raw, embedding)), atol=1e-3)


def test_trained_version_is_calibrated_records_it_and_serves_it(trained_registry) -> None:
    version = trained_registry.current()
    record = version.manifest["calibration"]
    assert record["method"] == "temperature"
    assert TEMPERATURE_BOUNDS[0] <= record["temperature"] <= TEMPERATURE_BOUNDS[1]
    assert record["fitted_examples"] == version.manifest["data"]["validation"]["rows"]
    for split in ("validation", "test"):
        entry = record[split]
        assert entry["examples"] == version.manifest["metrics"][split]["examples"]
        assert 0 <= entry["ece_after"] <= 1 and 0 <= entry["ece_before"] <= 1
    assert record["validation"]["nll_after"] <= record["validation"]["nll_before"] + 1e-9

    # What ONNX Runtime serves is the stored head's softmax, which is the raw head's at 1/T.
    test = read_jsonl(version.path / "data" / "test.jsonl")
    with np.load(version.path / "data" / "embeddings.npz") as arrays:
        x_test = arrays["test"].astype(np.float32)
    served = OnnxClassifier(version.path).predict(test.texts).probabilities
    raw = uncalibrated(version_head(version), version.manifest)
    expected = softmax(head_logits(raw, x_test), record["temperature"])
    # Stored embeddings are float16: a few 1e-3 of probability at most.
    assert served == pytest.approx(expected, abs=5e-3)
    assert float(served.max(axis=1).mean()) == pytest.approx(
        record["test"]["mean_confidence_after"], abs=5e-3
    )
    labels = version.labels
    y = np.array([labels.index(label) for label in test.labels])
    assert expected_calibration_error(served, y) == pytest.approx(
        record["test"]["ece_after"], abs=0.02
    )
