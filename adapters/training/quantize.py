"""The int8 twin of an exported model, and its check against the fp32 model.

At export every version gets ``model.int8.onnx`` beside ``model.onnx``: the same graph with the
encoder's weights quantised to int8 by onnxruntime's dynamic quantisation (activations are
quantised on the fly, per batch). The head's ``Gemm`` layers are not among the operators dynamic
quantisation rewrites, so the head stays in fp32. A head-only retrain reuses its parent's int8
encoder unchanged and attaches the new head (:func:`compose_with_encoder`), as it does for fp32.

Quantisation moves the embeddings a little (mean cosine to fp32 about 0.95 on short texts), so the
int8 model is run on the version's test split and compared with the fp32 predictions the version's
test metrics come from (:func:`check_int8`). The check is recorded in the manifest; serving decides
from it (:mod:`adapters.serving.variants`).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapters.serving.runtime import OnnxClassifier
from adapters.serving.variants import INT8_FILE, Int8Gate, VariantChoice, judge_int8
from adapters.training.export import compose_with_encoder
from adapters.training.head import ClassifierHead

OPERATORS = ["MatMul", "Gather"]
METHOD = {
    "kind": "dynamic",
    "tool": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "per_channel": False,
    "operators": OPERATORS,
    "head": "fp32 (Gemm is not quantised)",
}
CHECK_THREADS = 2

log = logging.getLogger("refit.quantize")


def quantize_model(fp32_path: Path, int8_path: Path) -> None:
    """Write the dynamically quantised (int8 weights) twin of an fp32 ONNX model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=False,
            op_types_to_quantize=OPERATORS,
            extra_options={"MatMulConstBOnly": True},
        )


def write_int8(
    fp32_path: Path, int8_path: Path, head: ClassifierHead, parent_int8: Path | None
) -> dict[str, Any]:
    """Write ``int8_path``; returns how it was made (for the manifest).

    With ``parent_int8`` (a head-only retrain whose parent has an int8 model) its quantised
    encoder is reused and only the new head is attached; otherwise ``fp32_path`` is quantised.
    """
    started = time.perf_counter()
    if parent_int8 is not None and parent_int8.is_file():
        compose_with_encoder(parent_int8, head, int8_path)
        origin = f"the parent's int8 encoder ({parent_int8.parent.name}) with the new head"
    else:
        quantize_model(fp32_path, int8_path)
        origin = "quantised from model.onnx"
    return {"origin": origin, "build_seconds": round(time.perf_counter() - started, 3)}


def check_int8(
    staged_dir: Path,
    manifest: dict[str, Any],
    texts: Sequence[str],
    truth: np.ndarray,
    fp32_predicted: np.ndarray,
    gate: Int8Gate,
) -> dict[str, Any]:
    """Run the int8 model on the test split and compare it with the fp32 predictions.

    ``manifest`` needs ``version``, ``labels`` and ``encoder.max_seq_length`` (the version is
    still being written). Returns the check as the manifest records it, with the verdict under
    ``gate`` (serving judges again under the thresholds in effect there).
    """
    started = time.perf_counter()
    classifier = OnnxClassifier(
        staged_dir, intra_op_threads=CHECK_THREADS,
        variant=VariantChoice("int8", INT8_FILE, None, "int8 check"), manifest=manifest,
    )
    predicted = classifier.predict(list(texts)).probabilities.argmax(axis=1)
    n = len(truth)
    fp32_accuracy = float(np.mean(fp32_predicted == truth)) if n else 0.0
    int8_accuracy = float(np.mean(predicted == truth)) if n else 0.0
    check: dict[str, Any] = {
        "split": "test",
        "examples": n,
        "reference": "the fp32 predictions the version's test metrics are computed from",
        "agreement": round(float(np.mean(predicted == fp32_predicted)) if n else 0.0, 6),
        "fp32_accuracy": round(fp32_accuracy, 6),
        "int8_accuracy": round(int8_accuracy, 6),
        "accuracy_drop": round(fp32_accuracy - int8_accuracy, 6),
        "disagreements": int(np.sum(predicted != fp32_predicted)),
        "gate": {"min_agreement": gate.min_agreement,
                 "max_accuracy_drop": gate.max_accuracy_drop},
    }
    verdict = judge_int8(check, gate)
    check.update(passed=verdict.passed, reason=verdict.reason,
                 seconds=round(time.perf_counter() - started, 3))
    log.info("%s", verdict.reason)
    return check
