"""Tokenisation with the ``tokenizers`` library alone: shared by training and serving.

Serving workers must not import torch or transformers, so both sides turn text into token ids
here, from the encoder's own ``tokenizer.json``, and pad to the longest text of each batch.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

DEFAULT_MAX_SEQ_LENGTH = 128


class TextTokenizer:
    """Turns texts into padded ``int64`` id and attention-mask arrays.

    Longer texts are truncated to ``max_length`` tokens (special tokens included), never rejected.
    """

    def __init__(self, tokenizer_file: str | Path, max_length: int = DEFAULT_MAX_SEQ_LENGTH):
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {max_length}")
        self.path = Path(tokenizer_file)
        self.max_length = max_length
        self._tokenizer = Tokenizer.from_file(str(self.path))
        # The shipped tokenizer.json pads every text to 128: padding is ours to do, per batch.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, both ``[len(texts), longest]`` int64."""
        return pad(self.token_ids(texts))


_shared: dict[tuple[str, int], TextTokenizer] = {}
_shared_lock = threading.Lock()


def shared_tokenizer(tokenizer_file: str | Path, max_length: int) -> TextTokenizer:
    """One tokenizer per distinct ``tokenizer.json`` content and length, reused across versions.

    Parsing the file holds the GIL for about 30 ms; a worker swapping to a version with the same
    tokenizer (every version of one encoder) skips that pause on its request threads.
    """
    digest = hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest()
    key = (digest, max_length)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = TextTokenizer(tokenizer_file, max_length)
        return _shared[key]


def pad(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id sequences with 0 into one array, with the matching attention mask."""
    longest = max((len(s) for s in sequences), default=0)
    ids = np.zeros((len(sequences), longest), dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


def length_sorted_chunks(lengths: Sequence[int], chunk_size: int) -> list[np.ndarray]:
    """Indices grouped into chunks of similar length, so padding wastes little compute."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + chunk_size] for i in range(0, len(order), chunk_size)]


# Measured on 2-core x86 machines with onnxruntime 1.32 (bench/onnx_batching.py): a run costs
# about as much as this many padded tokens on top of its tokens (mostly streaming the weights).
RUN_OVERHEAD_TOKENS = 16
# ...and runs beyond this many padded tokens get slower per token (activations leave the cache).
MAX_RUN_TOKENS = 256


def plan_batches(
    lengths: Sequence[int],
    overhead_tokens: int = RUN_OVERHEAD_TOKENS,
    max_run_tokens: int = MAX_RUN_TOKENS,
) -> list[np.ndarray]:
    """Split texts into runs that minimise padded tokens plus a fixed cost per run.

    Texts are sorted by length; cutting the sorted order into contiguous runs, each run costs
    ``overhead_tokens + size * longest``. Dynamic programming finds the cheapest cut, so short
    texts are not padded to the length of a long one, and runs stay big enough to amortise the
    per-run cost but small enough (``max_run_tokens``) to stay in cache. Returns index arrays
    into ``lengths``.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    ordered = [int(lengths[i]) for i in order]
    n = len(ordered)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = ordered[end - 1]
        for start in range(end - 1, -1, -1):
            padded = (end - start) * longest
            if padded > max_run_tokens and start < end - 1:
                break
            cost = best[start] + overhead_tokens + padded
            if cost < best[end]:
                best[end] = cost
                cut[end] = start
    runs: list[np.ndarray] = []
    end = n
    while end > 0:
        runs.append(order[cut[end] : end])
        end = cut[end]
    runs.reverse()
    return runs
