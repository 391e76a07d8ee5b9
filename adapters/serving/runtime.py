"""Inference on a registered version with onnxruntime and tokenizers only (no torch).

This is the serving path and the evaluation path: what ``refit evaluate`` measures is exactly
what the service computes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from adapters.serving.tokenization import (
    DEFAULT_MAX_SEQ_LENGTH,
    pad,
    plan_batches,
    shared_tokenizer,
)
from adapters.serving.variants import FP32_FILE, VariantChoice, verify_bytes

OUTPUTS = ["probabilities", "embedding"]
# (texts, tokens) per warm-up run: the run sizes the length-aware planner produces.
WARM_UP_SHAPES = ((1, 8), (1, 32), (4, 16), (8, 32), (16, 16), (4, 64), (2, 128))


def release_freed_memory() -> None:
    """Return memory freed by a dropped session to the operating system.

    A session's weights and arena are freed into glibc's heap when the last reference goes, but
    glibc keeps freed pages in its per-thread arenas; after a swap the worker's RSS stayed about
    one model higher, for good (+40 MB per swap in the soak until it levelled off). ``gc`` first
    frees anything only a reference cycle held, then ``malloc_trim`` releases the free pages.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class ClassifierOutput:
    probabilities: np.ndarray  # [n, classes] float32
    embeddings: np.ndarray  # [n, 384] float32


class OnnxClassifier:
    """A loaded version: tokenizer, ONNX Runtime session and label list.

    ``variant`` names the model file to load (see :mod:`adapters.serving.variants`); by default
    the fp32 ``model.onnx``. A file whose sha256 differs from the one recorded in the manifest is
    refused with :class:`~adapters.serving.variants.ModelIntegrityError`.
    """

    def __init__(
        self, version_dir: str | Path, intra_op_threads: int = 1,
        variant: VariantChoice | None = None, manifest: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(version_dir)
        if manifest is None:  # given only for a version still being written (its int8 check)
            manifest = json.loads((self.path / "manifest.json").read_text())
        if variant is None:
            variant = VariantChoice("fp32", FP32_FILE, manifest.get("onnx", {}).get("sha256"),
                                    "the fp32 model")
        self.variant = variant
        # Hashed and loaded from the same bytes: the file cannot change between check and load.
        model_bytes = (self.path / variant.file).read_bytes()
        verify_bytes(model_bytes, variant.sha256, f"{self.path.name}/{variant.file}")
        self.version: str = manifest["version"]
        self.labels: list[str] = list(manifest["labels"])
        max_length = int(manifest.get("encoder", {}).get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
        self.tokenizer = shared_tokenizer(self.path / "tokenizer.json", max_length)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn CPU while waiting for work: a server has better uses for it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"]
        )

    def run_tokens(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, embeddings = self.session.run(
            OUTPUTS, {"input_ids": ids, "attention_mask": mask}
        )
        return probabilities, embeddings

    def predict(self, texts: Sequence[str]) -> ClassifierOutput:
        """Probabilities and embeddings in input order.

        The texts run in groups of similar length (see :func:`plan_batches`): padding a short
        text to a long one's length costs as much compute as the long text itself.
        """
        token_ids = self.tokenizer.token_ids(texts)
        n = len(token_ids)
        probabilities = np.empty((n, len(self.labels)), dtype=np.float32)
        embeddings = np.empty((n, 384), dtype=np.float32)
        for chunk in plan_batches([len(t) for t in token_ids]):
            ids, mask = pad([token_ids[i] for i in chunk])
            p, e = self.run_tokens(ids, mask)
            probabilities[chunk] = p
            embeddings[chunk] = e
        return ClassifierOutput(probabilities, embeddings)

    def warm_up(self) -> float:
        """Run batches of the shapes serving meets, so no request pays for first-time set-up.

        onnxruntime grows its memory arena and settles kernels on the first run of each shape;
        done here, off the request path, a freshly swapped-in session answers at full speed.
        """
        started = time.perf_counter()
        for batch, tokens in WARM_UP_SHAPES:
            ids = np.full((batch, tokens), 1000, dtype=np.int64)
            ids[:, 0], ids[:, -1] = 101, 102
            self.run_tokens(ids, np.ones_like(ids))
        return time.perf_counter() - started
