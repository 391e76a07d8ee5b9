"""Which of a version's model files a worker serves: the fp32 model or its int8 twin.

Every version exported since issue 11 holds two ONNX files with the same inputs and outputs:
``model.onnx`` (fp32) and ``model.int8.onnx`` (the same encoder with int8 weights and int8
compute, the head left in fp32; :mod:`adapters.training.quantize` says how it is made).
Quantisation moves the embeddings a little, so training measures the int8 model against the fp32
one on the version's test split and records that *check* in the manifest (``int8.check``).
Serving then picks a variant from the ``REFIT_MODEL_PRECISION`` setting:

* ``fp32`` (the default): always the fp32 model;
* ``int8``: the int8 model whenever the version has one, whatever its check says;
* ``auto``: the int8 model only where its check passes the accuracy gate (:class:`Int8Gate`:
  prediction agreement with fp32 and the accuracy lost), otherwise fp32, with the reason.

fp32 is the default because the int8 models of versions exported before the blockwise recipe
(``int8.method.kind`` ``dynamic``) answer differently with different batch-mates: onnxruntime's
dynamic quantisation scales activations per tensor, i.e. per batch, so a text's probabilities
move a little with the other texts batched with it. The blockwise int8 model exported now
quantises each text's activations on its own (``int8.method.batch_independent``), and its answers
alone and in a batch agree as fp32's do (BENCHMARKS.md section 12 measures both).

The gate is judged where it is applied, from the recorded measurements and the thresholds in
effect (:func:`judge_int8`), so tightening a threshold takes effect without retraining.

Both files' sha256 are in the manifest and :func:`verify_bytes` refuses a file that does not match:
a tampered model (either variant) is never loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from refit.errors import RegistryError
from refit.settings import RefitSettings

Precision = Literal["auto", "fp32", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "int8")
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
DEFAULT_MIN_AGREEMENT: float = RefitSettings.model_fields["int8_min_agreement"].default
DEFAULT_MAX_ACCURACY_DROP: float = RefitSettings.model_fields["int8_max_accuracy_drop"].default


class ModelIntegrityError(RegistryError):
    """A model file's content differs from the sha256 its manifest records."""


@dataclass(frozen=True)
class Int8Gate:
    """When an int8 model may stand in for the fp32 one."""

    min_agreement: float = DEFAULT_MIN_AGREEMENT
    """Least share of test examples on which int8 and fp32 predict the same label."""
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    """Most test accuracy (a fraction: 0.005 is half a point) int8 may lose against fp32."""

    @classmethod
    def from_settings(cls, settings: RefitSettings) -> Int8Gate:
        return cls(settings.int8_min_agreement, settings.int8_max_accuracy_drop)


@dataclass(frozen=True)
class Int8Verdict:
    passed: bool
    reason: str


def judge_int8(check: dict[str, Any] | None, gate: Int8Gate) -> Int8Verdict:
    """Whether a recorded int8 check passes ``gate``, and why (or why not)."""
    if not check:
        return Int8Verdict(False, "the version has no int8 model")
    agreement = float(check["agreement"])
    drop = float(check["accuracy_drop"])
    problems = []
    if not agreement >= gate.min_agreement:
        problems.append(
            f"prediction agreement with fp32 {agreement:.2%} < {gate.min_agreement:.2%}"
        )
    if not drop <= gate.max_accuracy_drop:
        problems.append(
            f"accuracy drop {100 * drop:.2f} points > {100 * gate.max_accuracy_drop:.2f}"
        )
    examples = int(check.get("examples", 0))
    if problems:
        return Int8Verdict(False, "int8 failed the accuracy gate on "
                           f"{examples} test examples: " + "; ".join(problems))
    return Int8Verdict(True, f"int8 passed the accuracy gate on {examples} test examples "
                       f"(agreement {agreement:.2%}, accuracy drop {100 * drop:.2f} points)")


@dataclass(frozen=True)
class VariantChoice:
    """The file a worker loads for a version under a precision setting, and why."""

    precision: Literal["fp32", "int8"]
    file: str
    sha256: str | None
    reason: str


def int8_record(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's int8 section, or ``None`` for versions without an int8 model."""
    record = manifest.get("int8")
    return record if isinstance(record, dict) and record.get("file") else None


def choose_variant(manifest: dict[str, Any], precision: str, gate: Int8Gate) -> VariantChoice:
    """Which model file of a version to serve under ``precision`` (see the module docstring)."""
    fp32_sha = manifest.get("onnx", {}).get("sha256")
    record = int8_record(manifest)
    if precision == "fp32":
        return VariantChoice("fp32", FP32_FILE, fp32_sha, "REFIT_MODEL_PRECISION is fp32")
    if record is None:
        return VariantChoice("fp32", FP32_FILE, fp32_sha, "the version has no int8 model")
    int8 = VariantChoice("int8", str(record["file"]), record.get("sha256"), "")
    if precision == "int8":
        verdict = judge_int8(record.get("check"), gate)
        note = "" if verdict.passed else f" (although {verdict.reason})"
        return VariantChoice(int8.precision, int8.file, int8.sha256,
                             f"REFIT_MODEL_PRECISION is int8{note}")
    verdict = judge_int8(record.get("check"), gate)
    if verdict.passed:
        return VariantChoice(int8.precision, int8.file, int8.sha256, verdict.reason)
    return VariantChoice("fp32", FP32_FILE, fp32_sha, f"{verdict.reason}; serving fp32")


def verify_bytes(content: bytes, expected_sha256: str | None, name: str) -> None:
    """Refuse a model file's ``content`` if it is not what the manifest recorded.

    Versions written before hashes were recorded (``None``) are not checked.
    """
    if expected_sha256 is None:
        return
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise ModelIntegrityError(
            f"{name} does not match the sha256 in its manifest "
            f"(recorded {expected_sha256[:12]}…, found {actual[:12]}…): the file was changed "
            "after training; refusing to load it"
        )
