"""Export of encoder + head to one ONNX graph, with a parity check against PyTorch.

The graph takes ``input_ids`` and ``attention_mask`` (int64, ``[batch, tokens]``) and returns
``probabilities`` (``[batch, classes]``) and the pooled sentence ``embedding`` (``[batch, 384]``),
which serving logs for drift detection and feedback retraining. Every export is checked against
the PyTorch model on a fixed batch; a mismatch raises :class:`ExportParityError` and the version
is never registered.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adapters.serving.tokenization import TextTokenizer
from adapters.training.encoder import SentenceEncoder
from adapters.training.head import ClassifierHead
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


def _run_parity_batch(
    path: Path, tokenizer: TextTokenizer, texts: Sequence[str]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed parity batch (probes plus up to 26 of ``texts``) through the ONNX file."""
    import onnxruntime as ort

    batch = list(PARITY_PROBES) + list(texts)[:26]
    ids, mask = tokenizer.encode(batch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_p, got_e = session.run(list(OUTPUT_NAMES), {"input_ids": ids, "attention_mask": mask})
    return batch, ids, mask, got_p, got_e


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
    batch, ids, mask, got_p, got_e = _run_parity_batch(path, tokenizer, texts)
    with torch.inference_mode():
        expected_p, expected_e = ServingGraph(encoder, head).eval()(
            torch.from_numpy(ids), torch.from_numpy(mask)
        )
    diff_p = float(np.abs(got_p - expected_p.numpy()).max())
    diff_e = float(np.abs(got_e - expected_e.numpy()).max())
    if not diff_p <= tolerance:  # also catches NaN
        raise ExportParityError(
            f"ONNX export does not match PyTorch: max |Δ probability| = {diff_p:.3g} "
            f"> {tolerance:g} on a batch of {len(batch)} texts; the version was not registered"
        )
    return {"max_abs_diff_probabilities": diff_p, "max_abs_diff_embedding": diff_e,
            "batch": len(batch), "tolerance": tolerance}


class _HeadGraph(nn.Module):
    def __init__(self, head: ClassifierHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(embedding), dim=-1)


def compose_with_encoder(encoder_onnx: Path, head: ClassifierHead, path: Path) -> None:
    """A new version's graph from an existing version's encoder graph and a new head.

    Head-only retraining leaves the encoder as it is, so its graph (already checked against
    PyTorch when that version was exported) is reused as is; only the small head is exported.
    This saves loading the encoder in PyTorch and exporting it again.
    """
    import onnx
    from onnx import compose, utils

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _HeadGraph(head).eval(),
            (torch.zeros(2, head.center.shape[0]),),
            buffer,  # type: ignore[arg-type]  # stubs omit the file objects the exporter accepts
            input_names=["embedding"], output_names=["probabilities"],
            dynamic_axes={"embedding": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    head_model = compose.add_prefix(onnx.load_from_string(buffer.getvalue()), "head/")
    encoder = utils.Extractor(onnx.load(str(encoder_onnx))).extract_model(
        list(INPUT_NAMES), ["embedding"]
    )
    head_model.ir_version = encoder.ir_version
    merged = compose.merge_models(
        encoder, head_model, io_map=[("embedding", "head/embedding")],
        outputs=["head/probabilities", "embedding"],
    )
    for node in merged.graph.node:
        node.output[:] = ["probabilities" if o == "head/probabilities" else o for o in node.output]
    for output in merged.graph.output:
        if output.name == "head/probabilities":
            output.name = "probabilities"
    onnx.save(merged, str(path))


def check_head_parity(
    head: ClassifierHead,
    tokenizer: TextTokenizer,
    path: Path,
    texts: Sequence[str] = (),
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float | str]:
    """Parity of a composed graph: its probabilities against the PyTorch head applied to the
    embeddings its (reused, already verified) encoder part computes."""
    batch, _, _, got_p, got_e = _run_parity_batch(path, tokenizer, texts)
    with torch.inference_mode():
        expected = torch.softmax(head.eval()(torch.from_numpy(got_e)), dim=-1).numpy()
    diff = float(np.abs(got_p - expected).max())
    if not diff <= tolerance:
        raise ExportParityError(
            f"composed ONNX model does not match the PyTorch head: max |Δ probability| = "
            f"{diff:.3g} > {tolerance:g}; the version was not registered"
        )
    return {"max_abs_diff_probabilities": diff, "batch": len(batch), "tolerance": tolerance,
            "reference": "PyTorch head on the reused encoder graph's embeddings"}
