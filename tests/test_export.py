"""ONNX export parity, and that a failing parity check blocks registration."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

import adapters.training.pipeline as training
from adapters.serving.data import read_jsonl
from adapters.serving.registry import ModelRegistry
from adapters.training.encoder import load_encoder, tokenizer_for
from adapters.training.export import check_parity, export_onnx
from adapters.training.head import ClassifierHead
from adapters.training.search import SearchOptions
from refit.errors import ExportParityError


@pytest.fixture(scope="module")
def encoder_and_head():
    import torch

    torch.manual_seed(0)
    head = ClassifierHead(384, 5, hidden_size=0, dropout=0.1).eval()
    return load_encoder(), head, tokenizer_for(128)


def tamper(path, scale: float = 1.5) -> None:
    """Scale the largest head weight matrix in the ONNX file: a silent export bug."""
    model = onnx.load(str(path))
    target = next(t for t in model.graph.initializer if list(t.dims) in ([5, 384], [384, 5]))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * scale, target.name))
    onnx.save(model, str(path))


def test_export_matches_pytorch(tmp_path, encoder_and_head):
    encoder, head, tokenizer = encoder_and_head
    path = tmp_path / "m.onnx"
    export_onnx(encoder, head, tokenizer, path)
    parity = check_parity(encoder, head, tokenizer, path, ["a few more texts", "for the batch"])
    assert parity["max_abs_diff_probabilities"] <= 1e-4
    assert parity["max_abs_diff_embedding"] <= 1e-4
    assert parity["batch"] == 8


def test_tampered_export_fails_parity(tmp_path, encoder_and_head):
    encoder, head, tokenizer = encoder_and_head
    path = tmp_path / "m.onnx"
    export_onnx(encoder, head, tokenizer, path)
    tamper(path)
    with pytest.raises(ExportParityError, match="does not match PyTorch"):
        check_parity(encoder, head, tokenizer, path)


def test_parity_failure_blocks_registration(tmp_path, monkeypatch, demo_data_path):
    real_export = training.export_onnx

    def broken_export(encoder, head, tokenizer, path):
        real_export(encoder, head, tokenizer, path)
        model = onnx.load(str(path))
        n = head.num_classes
        target = next(
            t for t in model.graph.initializer if n in list(t.dims) and 384 in list(t.dims)
        )
        target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 3.0, target.name))
        onnx.save(model, str(path))

    monkeypatch.setattr(training, "export_onnx", broken_export)
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ExportParityError):
        training.train_version(
            registry,
            read_jsonl(demo_data_path),
            options=training.TrainingOptions(search=SearchOptions(strategy="none")),
        )
    assert registry.list_versions() == []
    assert registry.pointer() is None
    assert list(registry.staging_dir.iterdir()) == []
