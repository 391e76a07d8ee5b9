"""Training end to end on the demo data: quality, determinism, manifest, export parity."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from adapters.serving.data import read_jsonl
from adapters.serving.registry import ModelRegistry
from adapters.serving.runtime import OnnxClassifier
from adapters.training.head import HeadConfig
from adapters.training.pipeline import TrainingOptions, train_version
from adapters.training.search import SearchOptions, candidate_configs, search_head, trial_params


def test_trained_version_beats_majority_baseline_widely(trained_registry, demo_data_path):
    version = trained_registry.current()
    test = version.manifest["metrics"]["test"]
    data = read_jsonl(demo_data_path)
    majority = max(Counter(data.labels).values()) / len(data)
    assert test["examples"] >= 50
    assert test["accuracy"] >= majority + 0.5, (test["accuracy"], majority)
    assert test["macro_f1"] >= 0.8


def test_manifest_records_everything_needed_to_reproduce(trained_registry, demo_data_path):
    from importlib import metadata

    version = trained_registry.current()
    m = version.manifest
    assert m["version"] == version.name and m["parent"] is None
    assert m["labels"] == sorted(set(read_jsonl(demo_data_path).labels))
    assert len(m["encoder"]["sha256"]) == 64 and m["encoder"]["max_seq_length"] == 128
    assert m["training"]["head"]["learning_rate"] > 0
    for split in ("train", "validation", "test"):
        assert len(m["data"][split]["sha256"]) == 64 and m["data"][split]["rows"] > 0
    assert m["onnx"]["parity"]["max_abs_diff_probabilities"] <= 1e-4
    assert len(m["onnx"]["sha256"]) == 64
    # The versions the model was built with, whatever they are (no pin: upgrading torch is fine).
    assert m["packages"]["torch"] == metadata.version("torch")
    per_class = m["metrics"]["test"]["per_class"]
    assert set(per_class) == set(m["labels"])
    matrix = np.array(m["metrics"]["test"]["confusion_matrix"])
    assert (
        matrix.shape == (len(m["labels"]),) * 2 and matrix.sum() == m["metrics"]["test"]["examples"]
    )
    for name in (
        "model.onnx",
        "tokenizer.json",
        "labels.json",
        "reference.npz",
        "data/embeddings.npz",
    ):
        assert (version.path / name).is_file(), name
    assert json.loads((version.path / "labels.json").read_text()) == m["labels"]


def test_onnx_runtime_reproduces_recorded_test_metrics(trained_registry):
    """The served artefact (ONNX + tokenizers, no torch) scores what the manifest says."""
    version = trained_registry.current()
    test = read_jsonl(version.path / "data" / "test.jsonl")
    classifier = OnnxClassifier(version.path)
    predicted = classifier.predict(test.texts).probabilities.argmax(axis=1)
    accuracy = float(
        np.mean([classifier.labels[p] == t for p, t in zip(predicted, test.labels, strict=True)])
    )
    assert accuracy == pytest.approx(version.manifest["metrics"]["test"]["accuracy"], abs=1e-9)


def test_same_data_and_seed_give_same_metrics(tmp_path, demo_data_path):
    data = read_jsonl(demo_data_path)
    options = TrainingOptions(seed=3, search=SearchOptions(strategy="none"))
    runs = [
        train_version(ModelRegistry(tmp_path / f"r{i}"), data, options=options, promote=False)
        for i in range(2)
    ]
    first, second = (r.version.manifest for r in runs)
    assert first["metrics"] == second["metrics"]
    assert first["data"] == second["data"]
    assert (
        first["training"]["head_training"]["best_epoch"]
        == second["training"]["head_training"]["best_epoch"]
    )
    other = train_version(
        ModelRegistry(tmp_path / "r3"),
        data,
        options=TrainingOptions(seed=4, search=SearchOptions(strategy="none")),
        promote=False,
    )
    assert other.version.manifest["data"]["test"]["sha256"] != first["data"]["test"]["sha256"]


def test_search_records_every_trial_and_uses_kfold_on_small_data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16))
    y = np.repeat(np.arange(3), 30)
    x = (centers[y] + rng.normal(scale=0.8, size=(90, 16))).astype(np.float32)
    base = HeadConfig(max_epochs=30)
    small = search_head(
        x[:70], y[:70], x[70:], y[70:], 3, base, SearchOptions("grid", kfold_below=1000), 0
    )
    assert len(small.trials) == len(candidate_configs(base, SearchOptions("grid"), 0))
    assert "5-fold" in small.scoring
    assert all(len(t["fold_scores"]) == 5 for t in small.trials)
    # The chosen configuration is a recorded trial with the best score, or the best plain one.
    chosen = [t for t in small.trials if t["params"] == trial_params(small.best)]
    plain = [t for t in small.trials
             if t["params"]["hidden_size"] == 0 and t["params"]["class_weight_power"] == 0]
    assert len(chosen) == 1
    assert chosen[0]["score"] in (
        max(t["score"] for t in small.trials),
        max(t["score"] for t in plain),
    )
    big = search_head(
        x[:70],
        y[:70],
        x[70:],
        y[70:],
        3,
        base,
        SearchOptions("random", random_trials=4, kfold_below=10),
        0,
    )
    assert (
        big.scoring.startswith("validation mean of accuracy and macro-F1") and len(big.trials) == 4
    )


@pytest.mark.slow
def test_gradual_unfreezing_exports_a_fine_tuned_encoder(tmp_path, demo_data_path, monkeypatch):
    import adapters.training.pipeline as training
    from adapters.training.unfreeze import UnfreezeConfig, gradual_unfreeze

    # On the demo data the head-only model already scores 1.0 on validation, which nothing can
    # beat; judge fine-tuning against 0 so this test follows the fine-tuned path to the end.
    def against_zero(*args, **kwargs):
        args = list(args)
        args[9] = 0.0
        return gradual_unfreeze(*args, **kwargs)

    monkeypatch.setattr(training, "gradual_unfreeze", against_zero)
    registry = ModelRegistry(tmp_path)
    result = train_version(
        registry,
        read_jsonl(demo_data_path),
        options=TrainingOptions(
            search=SearchOptions(strategy="none"),
            unfreeze=UnfreezeConfig(layers=2, epochs_per_stage=2),
        ),
    )
    m = result.version.manifest
    record = m["training"]["unfreeze"]
    assert [r["trainable_layers"] for r in record["history"]] == [[5], [5], [4, 5], [4, 5]]
    assert record["kept"] is True, record
    assert record["best_val_macro_f1"] == pytest.approx(
        max(r["val_macro_f1"] for r in record["history"]), abs=1e-6
    )
    assert m["encoder"]["fine_tuned_layers"] == 2
    assert (result.version.path / "encoder" / "model.safetensors").is_file()
    assert m["encoder"]["id"] != m["encoder"]["sha256"]
    assert m["onnx"]["parity"]["max_abs_diff_probabilities"] <= 1e-4


def test_unfreezing_that_does_not_help_restores_the_encoder(demo_data_path):
    import torch

    from adapters.training.encoder import load_encoder, tokenizer_for
    from adapters.training.unfreeze import UnfreezeConfig, gradual_unfreeze

    data = read_jsonl(demo_data_path)
    labels = data.label_set()
    y = np.array([labels.index(label) for label in data.labels])
    encoder = load_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = gradual_unfreeze(
        encoder, tokenizer_for(128), data.texts[:80], y[:80], data.texts[80:120], y[80:120],
        len(labels), HeadConfig(), UnfreezeConfig(layers=1, epochs_per_stage=1),
        baseline_val_macro_f1=1.01, seed=0,
    )
    assert result.head is None
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
