"""Labelled text data: reading JSONL files, validating them, splitting and fingerprinting.

A data file holds one JSON object per line, ``{"text": str, "label": str}``. Everything that is
wrong with a file is reported as a :class:`~refit.errors.DatasetError` naming the file and line, so
the command line can print it without a traceback.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refit.errors import DatasetError


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with one label each, in a fixed order."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def of(cls, texts: Iterable[str], labels: Iterable[str]) -> LabelledTexts:
        return cls(tuple(texts), tuple(labels))

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledTexts:
        return LabelledTexts(
            tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices)
        )

    def label_counts(self) -> Counter[str]:
        return Counter(self.labels)

    def label_set(self) -> list[str]:
        """Distinct labels, sorted: the canonical class order of a model trained on this data."""
        return sorted(set(self.labels))

    def fingerprint(self) -> str:
        """sha256 over the (text, label) pairs in order: equal data gives an equal fingerprint."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            digest.update(json.dumps([text, label], ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def to_jsonl(self) -> str:
        return "".join(
            json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n"
            for t, lab in zip(self.texts, self.labels, strict=True)
        )

    def __add__(self, other: LabelledTexts) -> LabelledTexts:
        return LabelledTexts(self.texts + other.texts, self.labels + other.labels)


def read_jsonl(path: str | Path) -> LabelledTexts:
    """Read and validate a labelled JSONL file."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, expected a JSONL file")
    texts: list[str] = []
    labels: list[str] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror})") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                text, label = _parse_line(path, number, line)
                texts.append(text)
                labels.append(label)
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not texts:
        raise DatasetError(f"{path}: holds no examples")
    return LabelledTexts(tuple(texts), tuple(labels))


def _parse_line(path: Path, number: int, line: str) -> tuple[str, str]:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object with 'text' and 'label'")
    for key in ("text", "label"):
        if key not in record:
            raise DatasetError(f"{where}: missing '{key}'")
    text, label = record["text"], record["label"]
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: 'text' must be a non-empty string")
    if not isinstance(label, str) or not label.strip():
        raise DatasetError(f"{where}: 'label' must be a non-empty string")
    return text, label.strip()


def require_trainable(data: LabelledTexts, *, min_per_label: int, source: str) -> None:
    """Refuse data a classifier cannot be trained and evaluated on.

    ``min_per_label`` is how many examples each label needs so that every split it is cut into
    keeps at least one of them.
    """
    counts = data.label_counts()
    if len(counts) < 2:
        only = next(iter(counts))
        raise DatasetError(f"{source}: needs at least 2 labels, found only {only!r}")
    scarce = sorted((n, lab) for lab, n in counts.items() if n < min_per_label)
    if scarce:
        listed = ", ".join(f"{lab!r} ({n})" for n, lab in scarce[:5])
        more = f" and {len(scarce) - 5} more" if len(scarce) > 5 else ""
        raise DatasetError(
            f"{source}: too few examples to split for label(s) {listed}{more}; "
            f"each label needs at least {min_per_label}"
        )


def stratified_split(
    data: LabelledTexts, fraction: float, seed: int
) -> tuple[LabelledTexts, LabelledTexts]:
    """Split off ``fraction`` of every label (at least one example of each).

    Returns ``(rest, held_out)``. Every label with two or more examples keeps at least one in
    each part. The split depends only on the data and the seed.
    """
    rest_idx, held_idx = stratified_indices(list(data.labels), fraction, seed)
    return data.subset(rest_idx), data.subset(held_idx)


def stratified_indices(
    labels: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    rest: list[int] = []
    held: list[int] = []
    for label in sorted(by_label):
        members = np.array(by_label[label])
        rng.shuffle(members)
        n_held = int(round(len(members) * fraction))
        n_held = min(max(n_held, 1), len(members) - 1) if len(members) > 1 else 0
        held.extend(members[:n_held].tolist())
        rest.extend(members[n_held:].tolist())
    return np.array(sorted(rest), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def stratified_folds(labels: Sequence[str], k: int, seed: int) -> list[np.ndarray]:
    """Indices of ``k`` folds, each holding about 1/k of every label."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    offset = 0
    for label in sorted(by_label):
        members = np.array(by_label[label])
        rng.shuffle(members)
        for position, index in enumerate(members):
            folds[(position + offset) % k].append(int(index))
        offset += len(members)
    return [np.array(sorted(fold), dtype=np.int64) for fold in folds]
