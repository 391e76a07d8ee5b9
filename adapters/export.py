"""Export of encoder + head to one ONNX graph, with a parity check against PyTorch.

The graph takes ``input_ids`` and ``attention_mask`` (int64, ``[batch, tokens]``) and returns
``probabilities`` (``[batch, classes]``) and the pooled sentence ``embedding`` (``[batch, 384]``),
which serving logs for drift detection and feedback retraining. Every export is checked against
the PyTorch model on a fixed batch; a mismatch raises :class:`ExportParityError` and the version
is never registered.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from adapters.encoder import SentenceEncoder
from adapters.head import ClassifierHead
from adapters.tokenization import TextTokenizer
from refit.errors import ExportParityError

OPSET = 17
PARITY_TOLERANCE = 1e-4
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("probabilities", "embedding")

# Texts of very different lengths, so the parity batch exercises padding and truncation.
PARITY_PROBES = (
    "hi",
    "my card was stolen yesterday and I need a new one",
    "Where is my order? It was supposed to arrive on Monday, and the tracking page has not "
    "changed in five days. Can you tell me what is going on and when I will receive it?",
    "refund??",
    "I would like to change the delivery address on order #48213 to 12 Elm Street please",
    " ".join(["very long text"] * 120),
)


class ServingGraph(nn.Module):
    """What the ONNX file computes: token ids → (class probabilities, sentence embedding)."""

    def __init__(self, encoder: SentenceEncoder, head: ClassifierHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encoder(input_ids, attention_mask)
        probabilities = torch.softmax(self.head(embedding), dim=-1)
        return probabilities, embedding


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(
    encoder: SentenceEncoder, head: ClassifierHead, tokenizer: TextTokenizer, path: Path
) -> None:
    graph = ServingGraph(encoder, head).eval()
    ids, mask = tokenizer.encode(list(PARITY_PROBES[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "probabilities": {0: "batch"},
                "embedding": {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def check_parity(
    encoder: SentenceEncoder,
    head: ClassifierHead,
    tokenizer: TextTokenizer,
    path: Path,
    texts: Sequence[str] = (),
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float]:
    """Compare ONNX Runtime with PyTorch on a fixed batch; raise if probabilities differ.

    Returns the largest absolute differences of probabilities and embeddings.
    """
    import onnxruntime as ort

    batch = list(PARITY_PROBES) + list(texts)[:26]
    ids, mask = tokenizer.encode(batch)
    with torch.inference_mode():
        expected_p, expected_e = ServingGraph(encoder, head).eval()(
            torch.from_numpy(ids), torch.from_numpy(mask)
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_p, got_e = session.run(list(OUTPUT_NAMES), {"input_ids": ids, "attention_mask": mask})
    diff_p = float(np.abs(got_p - expected_p.numpy()).max())
    diff_e = float(np.abs(got_e - expected_e.numpy()).max())
    if not diff_p <= tolerance:  # also catches NaN
        raise ExportParityError(
            f"ONNX export does not match PyTorch: max |Δ probability| = {diff_p:.3g} "
            f"> {tolerance:g} on a batch of {len(batch)} texts; the version was not registered"
        )
    return {"max_abs_diff_probabilities": diff_p, "max_abs_diff_embedding": diff_e,
            "batch": len(batch), "tolerance": tolerance}
