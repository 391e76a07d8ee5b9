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
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

    batch = parity_batch(texts)
    ids, mask = tokenizer.encode(batch)
    # One batch of 32: one thread that does not spin, so the check costs a busy machine no more
    # CPU than it needs (thread count does not change what is compared).
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
    PyTorch when that version was exported) is reused as is; only the small head is new. This
    saves loading the encoder in PyTorch and exporting it again.

    The earlier version's graph is cut down to what computes ``embedding`` (its own head
    dropped), and the new head's nodes are appended under the ``head/`` prefix. A linear head is
    written as ONNX nodes directly (no exporter to import or run); an MLP head is exported with
    ``torch.onnx``. Nothing else is run over the large encoder graph (no shape inference, no
    copy by ``onnx.compose``): the caller's parity check runs the result in onnxruntime.
    """
    import onnx

    model = onnx.load(str(encoder_onnx))
    graph = model.graph
    _keep_only_embedding(graph)
    nodes, initializers = _head_nodes(head)
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    embedding = next(o for o in graph.output if o.name == "embedding")
    probabilities = onnx.helper.make_tensor_value_info(
        "probabilities", onnx.TensorProto.FLOAT, ["batch", head.num_classes]
    )
    del graph.output[:]
    graph.output.extend([probabilities, embedding])
    onnx.save(model, str(path))


def _subgraph_inputs(node: Any) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing graph (over-approximated:
    every input of every node inside)."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.HasField("g") else []
        for sub in [*graphs, *attribute.graphs]:
            for inner in sub.node:
                names.update(inner.input)
                names |= _subgraph_inputs(inner)
    return names


def _keep_only_embedding(graph: Any) -> None:
    """Remove from ``graph`` every node, initializer and value info that ``embedding`` does not
    depend on; the graph's only output becomes ``embedding``."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    keep: set[int] = set()
    pending = ["embedding"]
    while pending:
        index = producer.get(pending.pop())
        if index is None or index in keep:
            continue
        keep.add(index)
        node = graph.node[index]
        pending.extend(name for name in node.input if name)
        pending.extend(_subgraph_inputs(node))
    if "embedding" not in producer:
        raise ValueError("the encoder graph has no 'embedding' output to attach a head to")
    kept = [node for index, node in enumerate(graph.node) if index in keep]
    used = {name for node in kept for name in node.input} | {"embedding"}
    for node in kept:
        used |= _subgraph_inputs(node)
    kept_initializers = [t for t in graph.initializer if t.name in used]
    kept_info = [v for v in graph.value_info if v.name in used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    outputs = [o for o in graph.output if o.name == "embedding"]
    del graph.output[:]
    graph.output.extend(outputs)


def _head_nodes(head: ClassifierHead) -> tuple[list[Any], list[Any]]:
    """The head as ONNX nodes reading ``embedding`` and writing ``probabilities``, with their
    initializers, every other name under ``head/``."""
    import onnx
    from onnx import helper, numpy_helper

    head = head.eval()
    linear = [module for module in head.net if isinstance(module, nn.Linear)]
    if len(linear) == 1:
        weights = linear[0]
        arrays = {
            "head/center": head.center.detach().numpy(),
            "head/scale": head.scale.detach().numpy(),
            "head/weight": weights.weight.detach().numpy(),
            "head/bias": weights.bias.detach().numpy(),
        }
        nodes = [
            helper.make_node("Sub", ["embedding", "head/center"], ["head/centred"],
                             name="head/Sub"),
            helper.make_node("Div", ["head/centred", "head/scale"], ["head/scaled"],
                             name="head/Div"),
            helper.make_node("Gemm", ["head/scaled", "head/weight", "head/bias"],
                             ["head/logits"], name="head/Gemm", transB=1),
            helper.make_node("Softmax", ["head/logits"], ["probabilities"], name="head/Softmax",
                             axis=-1),
        ]
        return nodes, [numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32),
                                               name) for name, value in arrays.items()]
    # An MLP head: exported by torch (GELU and all), then renamed under the prefix.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _HeadGraph(head),
            (torch.zeros(2, head.center.shape[0]),),
            buffer,  # type: ignore[arg-type]  # stubs omit the file objects the exporter accepts
            input_names=["embedding"], output_names=["probabilities"],
            dynamic_axes={"embedding": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    exported = onnx.load_from_string(buffer.getvalue()).graph
    keep = {"embedding", "probabilities"}

    def renamed(name: str) -> str:
        return name if name in keep or not name else f"head/{name}"

    for node in exported.node:
        node.input[:] = [renamed(name) for name in node.input]
        node.output[:] = [renamed(name) for name in node.output]
        node.name = renamed(node.name)
    for tensor in exported.initializer:
        tensor.name = renamed(tensor.name)
    return list(exported.node), list(exported.initializer)


def parity_batch(texts: Sequence[str] = ()) -> list[str]:
    """The texts every parity check runs: the fixed probes, then up to 26 of ``texts``."""
    return list(PARITY_PROBES) + list(texts)[:26]


def check_head_parity(
    head: ClassifierHead,
    tokenizer: TextTokenizer,
    path: Path,
    texts: Sequence[str] = (),
    tolerance: float = PARITY_TOLERANCE,
    encoder_embeddings: np.ndarray | None = None,
) -> dict[str, float | str]:
    """Parity of a composed graph: its probabilities against the PyTorch head applied to the
    embeddings its (reused, already verified) encoder part computes.

    With ``encoder_embeddings`` (what the graph the encoder came from computes on
    :func:`parity_batch` of ``texts``), the composed graph's embeddings must match them too.
    """
    batch, _, _, got_p, got_e = _run_parity_batch(path, tokenizer, texts)
    with torch.inference_mode():
        expected = torch.softmax(head.eval()(torch.from_numpy(got_e)), dim=-1).numpy()
    diff = float(np.abs(got_p - expected).max())
    if not diff <= tolerance:
        raise ExportParityError(
            f"composed ONNX model does not match the PyTorch head: max |Δ probability| = "
            f"{diff:.3g} > {tolerance:g}; the version was not registered"
        )
    record: dict[str, float | str] = {
        "max_abs_diff_probabilities": diff, "batch": len(batch), "tolerance": tolerance,
        "reference": "PyTorch head on the reused encoder graph's embeddings",
    }
    if encoder_embeddings is not None:
        diff_e = float(np.abs(got_e - encoder_embeddings).max()) \
            if got_e.shape == encoder_embeddings.shape else math.inf
        if not diff_e <= tolerance:
            raise ExportParityError(
                f"composed ONNX model's encoder does not match the graph it was taken from: "
                f"max |Δ embedding| = {diff_e:.3g} > {tolerance:g}; the version was not registered"
            )
        record["max_abs_diff_embedding"] = diff_e
    return record
