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


@pytest.mark.parametrize("hidden", [0, 32])
def test_composing_a_new_head_keeps_only_the_encoder_of_the_earlier_graph(
    tmp_path, encoder_and_head, hidden
):
    """A head-only retrain composes its head onto its parent's graph, which may itself be a
    composition (a chain of retrains): the encoder part is reused unchanged, the parent's head is
    dropped entirely, and the result passes the parity check; a wrong head weight fails it."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from adapters.training.export import check_head_parity, compose_with_encoder

    encoder, first, tokenizer = encoder_and_head
    whole = tmp_path / "v1.onnx"
    export_onnx(encoder, first, tokenizer, whole)
    torch.manual_seed(hidden + 1)
    heads = [ClassifierHead(384, 7, hidden_size=hidden, dropout=0.1).eval() for _ in range(2)]
    with torch.no_grad():
        for head in heads:
            head.center.normal_(std=0.05)
            head.scale.uniform_(0.5, 2.0)
    v2, v3 = tmp_path / "v2.onnx", tmp_path / "v3.onnx"
    compose_with_encoder(whole, heads[0], v2)
    compose_with_encoder(v2, heads[1], v3)
    texts = ["where is my parcel", "cancel it please"]
    for path, head in ((v2, heads[0]), (v3, heads[1])):
        assert check_head_parity(head, tokenizer, path, texts)["max_abs_diff_probabilities"] <= 1e-4
    graphs = {path: onnx.load(str(path)).graph for path in (whole, v2, v3)}
    assert [o.name for o in graphs[v3].output] == ["probabilities", "embedding"]
    # v3 is v2 with another head of the same shape: the same nodes and initializers, no leftovers.
    assert len(graphs[v3].node) == len(graphs[v2].node)
    assert sorted(t.name for t in graphs[v3].initializer) == \
        sorted(t.name for t in graphs[v2].initializer)
    assert not any(t.name.startswith("head.") for t in graphs[v2].initializer)  # v1's head
    ids, mask = tokenizer.encode(texts)
    embeddings = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            ["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
        for path in (whole, v3)
    ]
    np.testing.assert_array_equal(embeddings[0], embeddings[1])
    model = onnx.load(str(v3))
    target = next(t for t in model.graph.initializer
                  if t.name.startswith("head/") and 7 in list(t.dims) and len(t.dims) == 2)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 3.0, target.name))
    onnx.save(model, str(v3))
    with pytest.raises(ExportParityError, match="does not match the PyTorch head"):
        check_head_parity(heads[1], tokenizer, v3, texts)
