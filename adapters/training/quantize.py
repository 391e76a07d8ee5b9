"""The int8 twin of an exported model, and its check against the fp32 model.

At export every version gets ``model.int8.onnx`` beside ``model.onnx``: the same graph with the
encoder's weights quantised to int8, per output channel, by onnxruntime's dynamic quantisation
(activations are quantised on the fly, per batch). The head's ``Gemm`` layers are not among the
operators dynamic quantisation rewrites, so the head stays in fp32. A head-only retrain reuses its
parent's int8 encoder unchanged and attaches the new head (:func:`compose_with_encoder`), as it
does for fp32.

Quantisation moves the embeddings a little, and how much that changes predictions depends on the
head. Two recipes are tried in order (:data:`RECIPES`): every weight matrix in int8 (fastest), then
the same with the six feed-forward output projections kept in fp32 (their inputs, after GELU,
have the widest range; on banking77 this lifts agreement with fp32 from 98.9% to 99.2% and costs
about a third of the speed-up, see BENCHMARKS.md). The first recipe whose predictions pass the
gate *on the validation split* is kept, so the choice never looks at the test split; if none
passes, the most faithful one is kept. Then the kept model is checked on the test split against
the fp32 predictions the version's test metrics come from (:func:`check_int8`). The check is
recorded in the manifest; serving decides from it (:mod:`adapters.serving.variants`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.serving.runtime import OnnxClassifier
from adapters.serving.tokenization import TextTokenizer
from adapters.serving.variants import INT8_FILE, Int8Gate, VariantChoice, judge_int8
from adapters.training.export import check_head_parity, compose_with_encoder, parity_batch
from adapters.training.head import ClassifierHead, head_probabilities

OPERATORS = ["MatMul", "Gather"]
METHOD = {
    "kind": "dynamic",
    "tool": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "per_channel": True,
    "operators": OPERATORS,
    "activations": "uint8, quantised per batch at run time",
    "head": "fp32 (Gemm is not quantised)",
}
CHECK_THREADS = 2

log = logging.getLogger("refit.quantize")


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    description: str
    keep_fp32: str | None = None
    """Regular expression on node names: matching nodes stay in fp32."""


RECIPES = (
    Int8Recipe("all-int8", "every MatMul and Gather weight in int8"),
    Int8Recipe(
        "ffn-output-fp32",
        "int8 except the feed-forward output projections (kept in fp32)",
        keep_fp32=r"layer\.\d+/output/dense/MatMul$",
    ),
)


@dataclass(frozen=True)
class Probe:
    """Texts, their true classes and the fp32 model's predicted classes."""

    texts: Sequence[str]
    truth: np.ndarray
    fp32_predicted: np.ndarray


def quantize_model(fp32_path: Path, int8_path: Path, recipe: Int8Recipe = RECIPES[0]) -> None:
    """Write the dynamically quantised (int8 weights, per channel) twin of an fp32 ONNX model."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep: list[str] = []
    if recipe.keep_fp32 is not None:
        pattern = re.compile(recipe.keep_fp32)
        graph = onnx.load(str(fp32_path), load_external_data=False).graph
        keep = [node.name for node in graph.node if pattern.search(node.name)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # It logs a generic advice to pre-process the model on the root logger, every time.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(
                fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True,
                op_types_to_quantize=OPERATORS, nodes_to_exclude=keep,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            logging.disable(logging.NOTSET)


def measure(
    folder: Path, file: str, manifest: dict[str, Any], probe: Probe
) -> dict[str, Any]:
    """Agreement with fp32 and both accuracies of the int8 model in ``folder/file``."""
    classifier = OnnxClassifier(
        folder, intra_op_threads=CHECK_THREADS,
        variant=VariantChoice("int8", file, None, "int8 check"), manifest=manifest,
    )
    return scores(classifier.predict(list(probe.texts)).probabilities.argmax(axis=1), probe)


def scores(predicted: np.ndarray, probe: Probe) -> dict[str, Any]:
    """Agreement of ``predicted`` (the int8 model's classes) with fp32, and both accuracies."""
    n = len(probe.truth)
    fp32_accuracy = float(np.mean(probe.fp32_predicted == probe.truth)) if n else 0.0
    int8_accuracy = float(np.mean(predicted == probe.truth)) if n else 0.0
    return {
        "examples": n,
        "agreement": round(float(np.mean(predicted == probe.fp32_predicted)) if n else 0.0, 6),
        "fp32_accuracy": round(fp32_accuracy, 6),
        "int8_accuracy": round(int8_accuracy, 6),
        "accuracy_drop": round(fp32_accuracy - int8_accuracy, 6),
        "disagreements": int(np.sum(predicted != probe.fp32_predicted)),
    }


@dataclass(frozen=True)
class EncodedTest:
    """What a parent's int8 model computes on a head-only child's test texts, obtained before
    the child's head exists (a retrain computes it while the head trains).

    The child's int8 model is the parent's int8 encoder graph, unchanged, with the new head
    attached (:func:`~adapters.training.export.compose_with_encoder`): on the same texts in the
    same batches it computes these embeddings, so its predictions are the new head's on them.
    """

    int8_file: Path
    """The parent's int8 model that computed them (the child's ``int8_from``)."""
    embeddings: np.ndarray
    """Of the test texts, batched as :meth:`OnnxClassifier.predict` batches them."""
    parity_embeddings: np.ndarray
    """Of :func:`~adapters.training.export.parity_batch` of the test texts, as one batch."""


def write_int8(
    folder: Path,
    fp32_file: str,
    head: ClassifierHead,
    parent_int8: Path | None,
    manifest: dict[str, Any],
    validation: Probe,
    gate: Int8Gate,
) -> dict[str, Any]:
    """Write ``folder/model.int8.onnx``; returns how it was made (for the manifest).

    With ``parent_int8`` (a head-only retrain whose parent has an int8 model) its quantised
    encoder is reused and only the new head is attached. Otherwise the recipes are tried on the
    validation split as the module docstring says.
    """
    started = time.perf_counter()
    target = folder / INT8_FILE
    if parent_int8 is not None and parent_int8.is_file():
        compose_with_encoder(parent_int8, head, target)
        return {"origin": f"the parent's int8 encoder ({parent_int8.parent.name}) with the new "
                          "head", "build_seconds": round(time.perf_counter() - started, 3)}
    trials: list[dict[str, Any]] = []
    kept: tuple[Path, dict[str, Any]] | None = None
    for index, recipe in enumerate(RECIPES):
        candidate = folder / f".int8-candidate-{index}.onnx"
        quantize_model(folder / fp32_file, candidate, recipe)
        scores = measure(folder, candidate.name, manifest, validation)
        passed = judge_int8(scores, gate).passed
        trials.append({"recipe": recipe.name, "description": recipe.description,
                       "split": "validation", **scores, "passed": passed})
        if kept is None or scores["agreement"] > kept[1]["agreement"]:
            kept = (candidate, trials[-1])
        if passed:
            kept = (candidate, trials[-1])
            break
    assert kept is not None
    kept[0].replace(target)
    for leftover in folder.glob(".int8-candidate-*.onnx"):
        leftover.unlink()
    chosen = kept[1]
    return {
        "origin": "quantised from model.onnx",
        "recipe": chosen["recipe"],
        "selection": {
            "rule": "the first recipe passing the gate on the validation split, else the one "
                    "agreeing most with fp32",
            "trials": trials,
        },
        "build_seconds": round(time.perf_counter() - started, 3),
    }


class BackgroundEncoding:
    """An :class:`EncodedTest` computed in a thread: the test texts through a version's int8
    model, one onnxruntime thread, while the caller does other work (a retrain: train the head
    that will be attached to that model's encoder). Calling it waits for the result.
    """

    def __init__(self, version_dir: Path, manifest: dict[str, Any], texts: Sequence[str]) -> None:
        record = manifest["int8"]
        self.int8_file = version_dir / record["file"]
        self._variant = VariantChoice("int8", str(record["file"]), record.get("sha256"),
                                      "the int8 check of a head-only child")
        self._version_dir, self._manifest, self._texts = version_dir, manifest, list(texts)
        self._result: EncodedTest | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="int8-test-encoding", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            classifier = OnnxClassifier(self._version_dir, intra_op_threads=1,
                                        variant=self._variant, manifest=self._manifest)
            embeddings = classifier.predict(self._texts).embeddings
            _, parity = classifier.run_tokens(*classifier.tokenizer.encode(
                parity_batch(self._texts)))
            self._result = EncodedTest(self.int8_file, embeddings, parity)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            self._error = exc

    def __call__(self) -> EncodedTest:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def check_int8(
    folder: Path, manifest: dict[str, Any], test: Probe, gate: Int8Gate,
    encoded: EncodedTest | None = None, head: ClassifierHead | None = None,
    tokenizer: TextTokenizer | None = None,
) -> dict[str, Any]:
    """Run the int8 model on the test split and compare it with the fp32 predictions.

    ``manifest`` needs ``version``, ``labels`` and ``encoder.max_seq_length`` (the version is
    still being written). Returns the check as the manifest records it, with the verdict under
    ``gate`` (serving judges again under the thresholds in effect there).

    With ``encoded`` (the model is its parent's int8 encoder with ``head`` attached), the
    encoder's part of the run is taken from it: the composed file is first checked on the parity
    batch (its embeddings equal to the parent's, its probabilities to ``head``'s on them), then
    ``head`` is applied to the test texts' embeddings.
    """
    started = time.perf_counter()
    if encoded is not None:
        if head is None or tokenizer is None:
            raise ValueError("checking from a parent's embeddings needs the head and tokenizer")
        if len(encoded.embeddings) != len(test.truth):
            raise ValueError(f"{len(encoded.embeddings)} embeddings for {len(test.truth)} texts")
        parity = check_head_parity(head, tokenizer, folder / INT8_FILE, test.texts,
                                   encoder_embeddings=encoded.parity_embeddings)
        predicted = head_probabilities(head, encoded.embeddings).argmax(axis=1)
        measured = {**scores(predicted, test), "encoder_run": {
            "from": f"{encoded.int8_file.parent.name}/{encoded.int8_file.name}",
            "why": "the same int8 encoder graph, run on the test texts while the head trained",
            "composed_file_parity": parity,
        }}
    else:
        measured = measure(folder, INT8_FILE, manifest, test)
    check: dict[str, Any] = {
        "split": "test",
        "reference": "the fp32 predictions the version's test metrics are computed from",
        **measured,
        "gate": {"min_agreement": gate.min_agreement,
                 "max_accuracy_drop": gate.max_accuracy_drop},
    }
    verdict = judge_int8(check, gate)
    check.update(passed=verdict.passed, reason=verdict.reason,
                 seconds=round(time.perf_counter() - started, 3))
    log.info("%s", verdict.reason)
    return check
