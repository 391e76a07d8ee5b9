"""The evaluation data sets every training or adaptation change is judged on.

They come with cached embeddings.

Each :class:`Benchmark` has train/validation/test splits of labelled texts and their frozen-encoder
embeddings (the packaged all-MiniLM-L6-v2, mean pooling, L2 normalisation, 128 tokens: exactly what
``refit train`` computes). Embeddings are cached under ``~/.cache/refit-bench`` by a hash of the
texts, so a second run embeds nothing.

- ``banking77``: its train file, validation cut from it (refit's stratified 15%), its test file.
- ``hwu64``: the same; classes of uneven size.
- ``banking77-lt``, ``hwu64-lt``: long-tailed subsamples of the train file, class sizes falling as
  a Zipf law from the largest class to 5 examples (classes in a seeded random order), validation
  cut from that subsample, the full test file as test.
- ``nlupp-banking``, ``nlupp-hotels``: NLU++ is multi-label; here the label of a row is its set of
  intents (sorted, joined by ``+``), keeping rows with at least one intent and label sets with at
  least 10 rows in that domain (banking: 25 classes, 550 rows; hotels: 16 classes, 283 rows);
  folds 0-13 train, 14-16 validation, 17-19 test (the source gives 20 folds).
- ``demo``: refit's demo data (10 intents x 50), split as ``refit train`` splits it.

    .venv/bin/python bench/datasets.py      # prints each set's sizes, embedding what is missing
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.serving.data import LabelledTexts, read_jsonl, stratified_split  # noqa: E402
from bench.common import ROOT, require_shared  # noqa: E402

CACHE = Path.home() / ".cache" / "refit-bench"
NAMES = (
    "banking77", "hwu64", "banking77-lt", "hwu64-lt", "nlupp-banking", "nlupp-hotels", "demo",
)
SEED = 0
VALIDATION_FRACTION = 0.15


@dataclass
class Benchmark:
    name: str
    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts
    x_train: np.ndarray
    x_validation: np.ndarray
    x_test: np.ndarray

    @property
    def labels(self) -> list[str]:
        return sorted(set(self.train.labels))

    def y(self, split: str) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index[label] for label in getattr(self, split).labels])

    def describe(self) -> str:
        counts = Counter(self.train.labels)
        return (
            f"{self.name}: {len(self.labels)} labels, train {len(self.train)} "
            f"(class sizes {min(counts.values())}-{max(counts.values())}), "
            f"validation {len(self.validation)}, test {len(self.test)}"
        )


def zipf_subsample(data: LabelledTexts, smallest: int = 5, seed: int = SEED) -> LabelledTexts:
    """Class sizes falling as a Zipf law, from the largest class's full size down to ``smallest``.

    Classes are ranked in a seeded random order; class of rank r (0-based) keeps
    ``max(smallest, round(largest / (r + 1) ** s))`` rows, with the exponent ``s`` chosen so that
    the last rank gets exactly ``smallest``.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    labels = sorted(by_label)
    rng.shuffle(labels)
    largest = max(len(v) for v in by_label.values())
    exponent = np.log(largest / smallest) / np.log(len(labels))
    keep: list[int] = []
    for rank, label in enumerate(labels):
        size = max(smallest, int(round(largest / (rank + 1) ** exponent)))
        members = by_label[label]
        keep += sorted(rng.choice(members, min(size, len(members)), replace=False).tolist())
    return data.subset(sorted(keep))


def _nlupp(domain: str) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    rows = [json.loads(line) for line in
            (require_shared() / "nlupp" / f"{domain}.jsonl").read_text().splitlines() if line]
    for row in rows:
        row["intents"] = "+".join(sorted(row["label"]))
    counts = Counter(r["intents"] for r in rows if r["intents"])
    kept = [r for r in rows if r["intents"] and counts[r["intents"]] >= 10]

    def part(folds: range) -> LabelledTexts:
        chosen = [r for r in kept if r["fold"] in folds]
        return LabelledTexts.of([r["text"] for r in chosen], [r["intents"] for r in chosen])

    train, validation, test = part(range(0, 14)), part(range(14, 17)), part(range(17, 20))
    known = set(train.labels)
    keep_v = [i for i, label in enumerate(validation.labels) if label in known]
    keep_t = [i for i, label in enumerate(test.labels) if label in known]
    return train, validation.subset(keep_v), test.subset(keep_t)


def splits(name: str, split_seed: int = 0) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """The set's splits. ``split_seed`` (0: the standard cut) draws another validation cut from
    the same training rows; the test split, the long-tailed subsample and NLU++'s folds (given by
    the source) stay as they are."""
    if name == "demo":
        data = read_jsonl(ROOT / "data" / "demo" / "intents.jsonl")
        rest, test = stratified_split(data, 0.15, SEED)
        share = VALIDATION_FRACTION / (1 - 0.15)
        train, validation = stratified_split(rest, share, SEED + 1 + split_seed)
        return train, validation, test
    if name.startswith("nlupp-"):
        return _nlupp(name.removeprefix("nlupp-"))
    base = name.removesuffix("-lt")
    shared = require_shared()
    data = read_jsonl(shared / base / "train.jsonl")
    test = read_jsonl(shared / base / "test.jsonl")
    if name.endswith("-lt"):
        data = zipf_subsample(data)
    train, validation = stratified_split(data, VALIDATION_FRACTION, SEED + 1 + split_seed)
    known = set(train.labels)
    test = test.subset([i for i, label in enumerate(test.labels) if label in known])
    return train, validation, test


_encoder = None


def embed(texts: list[str]) -> np.ndarray:
    """Frozen-encoder embeddings of ``texts``, from the cache when it has them."""
    global _encoder
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:24]
    path = CACHE / f"{key}.npy"
    if path.exists():
        return np.load(path)
    from adapters.training.encoder import embed_texts, load_encoder, tokenizer_for

    if _encoder is None:
        _encoder = load_encoder()
    vectors = embed_texts(_encoder, tokenizer_for(128), texts)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    return vectors


def load(name: str, split_seed: int = 0) -> Benchmark:
    """The set ``name`` with its embeddings; ``split_seed``: see :func:`splits`."""
    train, validation, test = splits(name, split_seed)
    if split_seed == 0:
        return Benchmark(
            name, train, validation, test,
            embed(train.texts), embed(validation.texts), embed(test.texts),
        )
    # Another cut of the same rows: their embeddings come from the standard cut's cache.
    standard = load(name)
    vectors = dict(zip(standard.train.texts + standard.validation.texts,
                       np.concatenate([standard.x_train, standard.x_validation]), strict=True))

    def lookup(texts: list[str]) -> np.ndarray:
        return np.stack([vectors[t] for t in texts]) if texts else standard.x_validation[:0]

    return Benchmark(name, train, validation, test, lookup(train.texts),
                     lookup(validation.texts), standard.x_test)


if __name__ == "__main__":
    for n in sys.argv[1:] or NAMES:
        print(load(n).describe(), flush=True)
