"""Feedback in effect at once: a nearest-neighbour memory over labelled feedback embeddings.

Before any retrain, a prediction whose text is close to a labelled feedback example answers with
that example's label. The memory holds the L2-normalised embeddings (so cosine similarity is a
dot product) of feedback items with their labels and feedback ids; :meth:`FeedbackMemory.lookup`
finds, for each row of a batch, the nearest entry, and answers with its label when the similarity
reaches the threshold. Otherwise the model answers.

Design for the serving hot path (numpy only, no torch):

- Search is exact (one matrix product per batch). Its cost grows linearly with the number of
  entries (bench/memory_speed.py; BENCHMARKS.md, "Learning from a stream"): about a millisecond
  for a batch of 64 against a thousand entries, tens of milliseconds against 100,000. The memory
  stays small because :func:`rebuilt_memory` keeps, after each promotion, only the entries
  the new head still gets wrong (and those of labels it still serves); a memory meant to hold
  100k entries would need an approximate index (e.g. inverted lists over k-means centroids)
  instead.
- Reads never take a lock. The state is an immutable snapshot (matrix, ids, labels, row count)
  replaced by one reference assignment. Appends write into spare rows of the current buffer,
  which no published snapshot covers, then publish a snapshot with the larger count; removals
  build compacted copies. Writers serialise on a lock.
- Two thresholds: one for entries whose label the serving model knows (the memory then competes
  with a model that is usually right, so it must be very close) and a lower one for labels the
  model does not have yet (new labels: there the model is always wrong). The nearest entry
  answers when its similarity reaches the threshold of its own label.
- The *prototype rule*, for labels the model does not know, answers from all of a label's
  examples rather than one: a text no entry answered gets the new label whose estimated mean
  direction is most similar, when that similarity exceeds the similarity to the nearest of the
  model's class prototypes (the reference: the class means of the version's training data,
  :func:`version_prototypes`) by the label's margin. A label's mean direction is estimated from
  its few examples without the small-sample bias of their plain mean (:func:`_prototype_scale`),
  so its score does not drift as examples come. Varied labels, whose examples are rarely close
  to a new text one by one, are taught this way (BENCHMARKS.md, section 5). Per-label sums are
  kept with each snapshot, so a lookup adds two small matrix products.
- :func:`calibrate_threshold` picks both thresholds and the margins on held-out feedback by
  leave-one-out, against the entries the memory will hold, so that the memory does not lower
  accuracy. Each new label gets its own margin from its own items (a label close to a known
  class needs a smaller lead over it than one far from all), shrunk towards the margin
  calibrated on all new labels together while it has few items (:data:`MARGIN_PRIOR_ITEMS`),
  all within one budget of lost answers on labels the model knows.
- :class:`FeedbackFollower` keeps a worker's memory in step with the store by polling for new
  feedback (every worker within about one poll interval).
- After a retrain, :func:`rebuilt_memory` keeps a label the retrain added *memory-served* (as if
  the model did not know it) while the memory answers its feedback better than the new head.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("refit.memory")

DIM = 384
DEFAULT_THRESHOLD = 0.9
"""For labels the model knows, until enough feedback exists to calibrate."""
DEFAULT_NEW_LABEL_THRESHOLD = 0.75
"""For labels the model does not know, until enough feedback exists to calibrate."""
THRESHOLD_FLOOR = 0.85
"""Calibration never goes below this for known labels: a guard against a small, lucky sample."""
NEW_LABEL_THRESHOLD_FLOOR = 0.5
"""Calibration never goes below this for labels the model does not know."""
MAX_KNOWN_LOSS = 0.005
"""Calibration accepts no thresholds under which the leave-one-out accuracy on feedback of labels
the model knows falls by more than this (a gain on new labels must not be paid by old ones)."""
THRESHOLD_CEILING = 0.98
"""Calibration never goes above this: a repeat of a labelled text always gets its label."""
MIN_CALIBRATION_ITEMS = 30
"""Below this many feedback items, calibration keeps the default thresholds."""
DEFAULT_NEW_LABEL_MARGIN = 0.1
"""The prototype rule's margin until feedback gives evidence to calibrate it (at least
:data:`MIN_CALIBRATION_ITEMS` items, among them two of one label the model does not know).
Calibrated margins on hwu64 and banking77 streams ranged from about -0.1 to 0.15."""
MARGIN_PRIOR_ITEMS = 10.0
"""A new label's own margin (calibrated on its own leave-one-out evidence) is shrunk towards the
margin calibrated on all new labels together, with weight ``k / (k + MARGIN_PRIOR_ITEMS)`` for
a label with ``k`` calibration items: its own evidence counts as much as all labels' at this
many items."""
MARGIN_FLOOR = -0.1
MARGIN_CEILING = 0.4
"""Calibration picks the prototype rule's margin in ``[MARGIN_FLOOR, MARGIN_CEILING]``."""


@dataclass(frozen=True)
class MemoryMatches:
    """What the memory says about each row of a batch.

    ``labels[i]`` is the feedback label when the memory answers row ``i`` (similarity at or above
    the threshold), else ``None``; ``similarity[i]`` is the cosine similarity of the nearest entry
    (``-inf`` when the memory is empty) and ``feedback_ids[i]`` its feedback id (``-1`` when the
    memory does not answer).
    """

    labels: list[str | None]
    similarity: np.ndarray
    feedback_ids: np.ndarray

    @property
    def answered(self) -> np.ndarray:
        return self.feedback_ids >= 0


@dataclass(frozen=True)
class _Snapshot:
    matrix: np.ndarray  # [capacity, dim] float32; rows [0, count) are live
    ids: np.ndarray  # [capacity] int64
    codes: np.ndarray  # [capacity] int32, index into label_names
    count: int
    label_names: tuple[str, ...]
    sums: np.ndarray  # [len(label_names), dim] float32: each label's sum of live entries
    sizes: np.ndarray  # [len(label_names)] int64: each label's number of live entries


def _label_sums(
    matrix: np.ndarray, codes: np.ndarray, count: int, labels: int
) -> tuple[np.ndarray, np.ndarray]:
    sums = np.zeros((labels, matrix.shape[1]), np.float32)
    np.add.at(sums, codes[:count], matrix[:count])
    return sums, np.bincount(codes[:count], minlength=labels).astype(np.int64)


def class_means(
    embeddings: np.ndarray, labels: Sequence[str], names: Sequence[str]
) -> np.ndarray:
    """Each of ``names``' mean of its rows in ``embeddings`` (``[len(names), dim]``; a zero row
    for a name without rows). Its direction is the class prototype; for unit rows its squared
    norm measures how alike the class's examples are (about their mean pairwise cosine)."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    index = {name: i for i, name in enumerate(names)}
    rows = [i for i, label in enumerate(labels) if label in index]
    codes = np.array([index[labels[i]] for i in rows], dtype=np.int64)
    sums = np.zeros((len(names), vectors.shape[1] if vectors.ndim == 2 else DIM), np.float32)
    if rows:
        np.add.at(sums, codes, vectors[rows])
    sizes = np.bincount(codes, minlength=len(names)).astype(np.float32)
    return np.divide(sums, sizes[:, None], out=np.zeros_like(sums), where=sizes[:, None] > 0)


def class_prototypes(
    embeddings: np.ndarray, labels: Sequence[str], names: Sequence[str]
) -> np.ndarray:
    """Each of ``names``' prototype: the L2-normalised :func:`class_means` (a zero row for a
    name without rows: the memory drops those)."""
    means = class_means(embeddings, labels, names)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return np.divide(means, norms, out=np.zeros_like(means), where=norms > 0)


def _usable_reference(reference: np.ndarray | None, dim: int) -> np.ndarray | None:
    """The reference's non-zero rows (a label without training rows has no prototype)."""
    if reference is None:
        return None
    rows = np.ascontiguousarray(reference, dtype=np.float32).reshape(-1, dim)
    rows = rows[np.linalg.norm(rows, axis=1) > 0]
    return rows if len(rows) else None


PRIOR_PAIRS = 2.0
"""Weight, in pairs of examples, of the prior in a new label's coherence estimate."""
COHERENCE_FLOOR = 0.05
"""Estimated coherences are clipped to ``[COHERENCE_FLOOR, 1]`` (two dissimilar examples, or a
wrong label among few, must not blow up the label's score)."""


def _reference_scale(rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Per reference row (a class mean), the factor that turns ``q · row`` into the cosine of
    ``q`` with the class's prototype; and the prior coherence of a label: the median squared norm
    of the class means (for unit examples, about the mean pairwise cosine within a class)."""
    norms2 = (rows.astype(np.float64) ** 2).sum(axis=1)
    prior = float(np.clip(np.median(norms2), COHERENCE_FLOOR, 1.0)) if len(rows) else 1.0
    return 1.0 / np.sqrt(norms2), prior


def _prototype_scale(sums_sq: np.ndarray, sizes: np.ndarray, prior: float) -> np.ndarray:
    """Per new label (elementwise), the factor that turns ``q · sum`` (the sum of its ``k``
    unit examples) into the label's score: the cosine of ``q`` with the label's *estimated mean
    direction*, ``q · mean / a``, where ``a²``, the label's coherence (the squared norm of its
    examples' expected value), is estimated by their mean pairwise cosine
    (``(‖sum‖² − k) / (k(k − 1))``), shrunk towards ``prior`` by :data:`PRIOR_PAIRS` pairs.

    The plain cosine with the normalised mean is biased low for few examples (the mean of ``k``
    examples has squared norm ``a² + (1 − a²) / k``, not ``a²``), the more so the more varied the
    label: its score would then rise as examples come, and one margin could not serve labels with
    different numbers of examples. The class means of the model's classes come from hundreds of
    examples each: their plain cosine is the same estimate."""
    k = np.asarray(sizes, np.float64)
    coherence = (sums_sq - k + PRIOR_PAIRS * prior) / (k * (k - 1) + PRIOR_PAIRS)
    coherence = np.clip(coherence, COHERENCE_FLOOR, 1.0)
    with np.errstate(divide="ignore"):
        return 1.0 / (k * np.sqrt(coherence))


def version_prototypes(folder: str | Path, labels: Sequence[str]) -> np.ndarray | None:
    """The class means of a version's training data (:func:`class_means`: their directions are
    the class prototypes, their norms how alike each class's examples are): ``data/train.jsonl``
    and its rows of ``data/embeddings.npz`` in the version folder (by that version's encoder, as
    served), one row per label in ``labels``. ``None`` when the folder has no such data (the
    prototype rule is then off)."""
    from adapters.serving.data import read_jsonl

    data = Path(folder) / "data"
    if not (data / "train.jsonl").is_file() or not (data / "embeddings.npz").is_file():
        return None
    train = read_jsonl(data / "train.jsonl")
    with np.load(data / "embeddings.npz") as arrays:
        if "train" not in arrays:
            return None
        vectors = arrays["train"].astype(np.float32)
    if len(vectors) != len(train.labels):
        return None
    return class_means(vectors, train.labels, labels)


class FeedbackMemory:
    """Labelled feedback embeddings and a thresholded nearest-neighbour lookup.

    ``known_labels`` are the serving model's labels: entries with one of them answer at
    ``threshold``, entries with any other label at ``new_label_threshold`` (set them again with
    :meth:`set_known_labels` after a swap). ``neighbours`` is how many of the nearest entries
    vote: 1 answers with the nearest entry's label; more takes a similarity-weighted vote among
    the ``neighbours`` nearest entries that reach their threshold.

    The *prototype rule* answers rows that no entry answered, with a label the model does not know,
    from more than one entry: the row gets the label whose estimated mean direction (from its
    entries: :func:`_prototype_scale`) is most similar when that similarity exceeds the similarity
    to the nearest of the model's own class prototypes (``reference``: one row per known label,
    the class means of the model's training data, :func:`class_means`; unit rows work too) by at
    least the label's margin: ``new_label_margins[label]`` where given (``None``: off for that
    label), else ``new_label_margin``. It is off while the reference is ``None``, and for the
    labels whose margin is ``None``.
    """

    def __init__(
        self,
        dim: int = DIM,
        threshold: float = DEFAULT_THRESHOLD,
        new_label_threshold: float = DEFAULT_NEW_LABEL_THRESHOLD,
        known_labels: Iterable[str] = (),
        neighbours: int = 1,
        reference: np.ndarray | None = None,
        new_label_margin: float | None = DEFAULT_NEW_LABEL_MARGIN,
        new_label_margins: Mapping[str, float | None] | None = None,
    ) -> None:
        if neighbours < 1:
            raise ValueError("neighbours must be at least 1")
        self.dim = dim
        self.threshold = float(threshold)
        self.new_label_threshold = float(new_label_threshold)
        self.known_labels = frozenset(known_labels)
        self.neighbours = neighbours
        self.reference: np.ndarray | None = None
        self.set_reference(reference)
        self.new_label_margin = new_label_margin
        self.new_label_margins: Mapping[str, float | None] = dict(new_label_margins or {})
        self._lock = threading.Lock()
        self._prototype_cache: (
            tuple[_Snapshot, frozenset[str], float, np.ndarray, np.ndarray] | None
        ) = None
        self._snapshot = _Snapshot(
            np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int32), 0, (),
            np.zeros((0, dim), np.float32), np.zeros(0, np.int64),
        )

    def set_known_labels(self, labels: Iterable[str]) -> None:
        """The serving model's labels (after a swap): they decide which threshold applies."""
        self.known_labels = frozenset(labels)

    def set_reference(self, reference: np.ndarray | None) -> None:
        """The serving model's class prototypes (:func:`class_prototypes` of its training data),
        against which the prototype rule weighs a label the model does not know."""
        rows = _usable_reference(reference, self.dim)
        if rows is None:
            self._reference_scoring, self._prior = None, 1.0
        else:
            scale, self._prior = _reference_scale(rows)
            self._reference_scoring = (rows * scale[:, None]).astype(np.float32)
        self.reference = rows

    def set_thresholds(self, calibration: Calibration) -> None:
        self.threshold = calibration.threshold
        self.new_label_threshold = calibration.new_label_threshold
        self.new_label_margin = calibration.new_label_margin
        self.new_label_margins = dict(calibration.new_label_margins)

    def __len__(self) -> int:
        return self._snapshot.count

    @property
    def ids(self) -> np.ndarray:
        """Feedback ids of the live entries, in insertion order."""
        s = self._snapshot
        return s.ids[: s.count].copy()

    @property
    def embeddings(self) -> np.ndarray:
        s = self._snapshot
        return s.matrix[: s.count]

    @property
    def labels(self) -> list[str]:
        s = self._snapshot
        return [s.label_names[c] for c in s.codes[: s.count]]

    # -- writes ----------------------------------------------------------------------------------

    def add(self, ids: Sequence[int], embeddings: np.ndarray, labels: Sequence[str]) -> None:
        """Add entries; an id already present is replaced (a relabelled feedback item)."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1, self.dim)
        ids_array = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(vectors) == len(ids_array) == len(labels):
            raise ValueError(
                f"ids ({len(ids_array)}), embeddings ({len(vectors)}) and labels ({len(labels)}) "
                "must have the same length"
            )
        if len(ids_array) == 0:
            return
        # Within one call, the last occurrence of an id wins.
        _, last = np.unique(ids_array[::-1], return_index=True)
        keep = np.sort(len(ids_array) - 1 - last)
        ids_array, vectors = ids_array[keep], vectors[keep]
        labels = [labels[i] for i in keep]
        with self._lock:
            s = self._snapshot
            if np.isin(ids_array, s.ids[: s.count]).any():
                s = self._compacted(~np.isin(s.ids[: s.count], ids_array))
            names = list(s.label_names)
            index = {name: i for i, name in enumerate(names)}
            codes = np.empty(len(labels), np.int32)
            for i, label in enumerate(labels):
                if label not in index:
                    index[label] = len(names)
                    names.append(label)
                codes[i] = index[label]
            count, extra = s.count, len(ids_array)
            matrix, stored_ids, stored_codes = s.matrix, s.ids, s.codes
            sums = np.zeros((len(names), self.dim), np.float32)
            sums[: len(s.sums)] = s.sums
            np.add.at(sums, codes, vectors)
            sizes = np.zeros(len(names), np.int64)
            sizes[: len(s.sizes)] = s.sizes
            sizes += np.bincount(codes, minlength=len(names))
            if count + extra > len(matrix):
                capacity = max(64, 2 * (count + extra))
                matrix = np.zeros((capacity, self.dim), np.float32)
                stored_ids = np.full(capacity, -1, np.int64)
                stored_codes = np.zeros(capacity, np.int32)
                matrix[:count] = s.matrix[:count]
                stored_ids[:count] = s.ids[:count]
                stored_codes[:count] = s.codes[:count]
            # Rows past ``count`` belong to no published snapshot: readers never see them
            # half-written.
            matrix[count : count + extra] = vectors
            stored_ids[count : count + extra] = ids_array
            stored_codes[count : count + extra] = codes
            self._snapshot = _Snapshot(
                matrix, stored_ids, stored_codes, count + extra, tuple(names), sums, sizes
            )

    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries by feedback id (deleted feedback); returns how many were removed."""
        gone = np.asarray(list(ids), dtype=np.int64)
        with self._lock:
            s = self._snapshot
            keep = ~np.isin(s.ids[: s.count], gone)
            removed = int(s.count - keep.sum())
            if removed:
                self._snapshot = self._compacted(keep)
        return removed

    def remove_matching(self, labels_by_id: dict[int, str]) -> int:
        """Remove the entries whose label equals ``labels_by_id[their id]``; returns how many.

        Decided on the state at the time of the call, under the writers' lock, so a concurrent
        add, relabel or removal can never misalign it.
        """
        with self._lock:
            s = self._snapshot
            names = s.label_names
            keep = np.array(
                [
                    labels_by_id.get(fid) != names[code]
                    for fid, code in zip(
                        s.ids[: s.count].tolist(), s.codes[: s.count].tolist(), strict=True
                    )
                ],
                dtype=bool,
            )
            removed = int(s.count - keep.sum())
            if removed:
                self._snapshot = self._compacted(keep)
        return removed

    def retain_only(self, mask: np.ndarray) -> int:
        """Keep the entries where ``mask`` (aligned with :attr:`ids`) is true; returns removals.

        The mask must come from the snapshot it was computed on: entries added in between are
        kept (their rows lie past the mask's length).
        """
        mask = np.asarray(mask, dtype=bool)
        with self._lock:
            s = self._snapshot
            if len(mask) > s.count:
                raise ValueError(f"mask has {len(mask)} rows; the memory has {s.count}")
            keep = np.ones(s.count, dtype=bool)
            keep[: len(mask)] = mask
            removed = int(s.count - keep.sum())
            if removed:
                self._snapshot = self._compacted(keep)
        return removed

    def clear(self) -> None:
        with self._lock:
            self._snapshot = self._compacted(np.zeros(self._snapshot.count, dtype=bool))

    def _compacted(self, keep: np.ndarray) -> _Snapshot:
        """A fresh snapshot of the kept rows.

        New buffers: readers of the old snapshot are unaffected.
        """
        s = self._snapshot
        rows = np.flatnonzero(keep)
        matrix, codes = np.ascontiguousarray(s.matrix[rows]), s.codes[rows].copy()
        sums, sizes = _label_sums(matrix, codes, len(rows), len(s.label_names))
        return _Snapshot(
            matrix, s.ids[rows].copy(), codes, len(rows), s.label_names, sums, sizes
        )

    # -- reads -----------------------------------------------------------------------------------

    def lookup(self, embeddings: np.ndarray) -> MemoryMatches:
        """The memory's answer for each row of ``embeddings`` (L2-normalised, ``[n, dim]``)."""
        s = self._snapshot  # read once: the whole batch sees one state
        queries = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1, self.dim)
        n = len(queries)
        if s.count == 0 or n == 0:
            return MemoryMatches([None] * n, np.full(n, -np.inf, np.float32), np.full(n, -1))
        entry_thresholds = self._thresholds(s)
        similarity = queries @ s.matrix[: s.count].T
        rows = np.arange(n)
        nearest = similarity.argmax(axis=1)
        best = similarity[rows, nearest]
        codes = s.codes[nearest]
        # The nearest entry decides whether the memory answers at all: a farther entry of a new
        # label never overrides a nearer one of a known label that was not close enough.
        answered = best >= entry_thresholds[codes]
        feedback_ids = np.where(answered, s.ids[nearest], -1)
        if self.neighbours > 1 and answered.any():
            codes = codes.copy()
            live = s.codes[: s.count]
            for i in np.flatnonzero(answered):
                codes[i] = _weighted_vote(
                    similarity[i], live, entry_thresholds[live], self.neighbours
                )
        prototype = self._prototype_answers(s, queries, answered)
        if prototype is not None:
            rows_p, codes_p = prototype
            codes = codes.copy()
            codes[rows_p] = codes_p
            answered = answered.copy()
            answered[rows_p] = True
            best = best.copy()
            feedback_ids = feedback_ids.copy()
            live = s.codes[: s.count]
            for row, code in zip(rows_p.tolist(), codes_p.tolist(), strict=True):
                # Reported: the label's nearest entry (the served answer's closest example).
                own = np.where(live == code, similarity[row], -np.inf)
                entry = int(own.argmax())
                best[row], feedback_ids[row] = own[entry], s.ids[entry]
        labels = [
            s.label_names[c] if a else None for c, a in zip(codes.tolist(), answered, strict=True)
        ]
        return MemoryMatches(labels, best, feedback_ids)

    def _prototype_answers(
        self, s: _Snapshot, queries: np.ndarray, answered: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Rows (not ``answered``) that the prototype rule answers, and their label codes."""
        reference = self._reference_scoring
        if reference is None or answered.all():
            return None
        new, prototypes = self._new_label_prototypes(s)
        if len(new) == 0:
            return None
        margins = self._margins(s, new)
        if not np.isfinite(margins).any():
            return None
        open_rows = np.flatnonzero(~answered)
        q = queries[open_rows]
        scores = q @ prototypes.T
        pick = scores.argmax(axis=1)
        lead = scores[np.arange(len(q)), pick] - (q @ reference.T).max(axis=1)
        hit = lead >= margins[pick]
        return open_rows[hit], new[pick[hit]].astype(np.int32)

    def _margins(self, s: _Snapshot, new: np.ndarray) -> np.ndarray:
        """Each new label's margin (of the codes ``new``): its own calibrated margin, else the
        shared one; ``inf`` where the rule is off."""
        shared = self.new_label_margin
        own = self.new_label_margins
        out = np.empty(len(new), np.float64)
        for i, code in enumerate(new.tolist()):
            name = s.label_names[code]
            margin = own.get(name, shared)
            out[i] = np.inf if margin is None else margin
        return out

    def _new_label_prototypes(self, s: _Snapshot) -> tuple[np.ndarray, np.ndarray]:
        """Codes of the labels the model does not know that have entries, and their prototypes;
        computed once per snapshot and set of known labels."""
        known = self.known_labels
        cached = self._prototype_cache
        if (cached is not None and cached[0] is s and cached[1] is known
                and cached[2] == self._prior):
            return cached[3], cached[4]
        new = np.array(
            [i for i, name in enumerate(s.label_names) if s.sizes[i] > 0 and name not in known],
            dtype=np.int64,
        )
        sums = s.sums[new].astype(np.float64)
        scale = _prototype_scale((sums**2).sum(axis=1), s.sizes[new], self._prior)
        prototypes = (sums * scale[:, None]).astype(np.float32)
        # One assignment: safe to race.
        self._prototype_cache = (s, known, self._prior, new, prototypes)
        return new, prototypes

    def _thresholds(self, s: _Snapshot) -> np.ndarray:
        """Each label code's threshold."""
        return np.array(
            [self.threshold if name in self.known_labels else self.new_label_threshold
             for name in s.label_names],
            dtype=np.float32,
        )


def _weighted_vote(
    similarity: np.ndarray, codes: np.ndarray, thresholds: np.ndarray, k: int
) -> int:
    """The label with the largest summed similarity among the ``k`` nearest entries that reach
    their own threshold."""
    k = min(k, len(similarity))
    top = np.argpartition(-similarity, k - 1)[:k]
    top = top[similarity[top] >= thresholds[top]]
    votes = np.bincount(codes[top], weights=similarity[top])
    return int(votes.argmax())


# -- after a promotion ---------------------------------------------------------------------------


def prune_to_mistakes(memory: FeedbackMemory, ids: Sequence[int], predicted: Sequence[str]) -> int:
    """Keep only the entries the new head still gets wrong; returns how many were removed.

    ``predicted[i]`` is the new head's label for the entry with feedback id ``ids[i]``. Entries
    it did not predict (added since) are kept: the new head never saw them.
    """
    return memory.remove_matching(dict(zip((int(i) for i in ids), predicted, strict=False)))


# -- threshold calibration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Calibrated thresholds and the leave-one-out evidence for them."""

    threshold: float
    """For entries whose label the model knows."""
    new_label_threshold: float
    """For entries whose label the model does not know."""
    items: int
    model_accuracy: float | None
    """Accuracy of the model alone on the calibration items."""
    combined_accuracy: float | None
    """Leave-one-out accuracy of (memory if its nearest entry is close enough, else model)."""
    answered: int
    """How many calibration items the memory answered at these thresholds."""
    reason: str
    new_label_margin: float | None = None
    """The prototype rule's margin (``None``: off, for want of evidence or of a reference)."""
    prototype_answered: int = 0
    """How many of the answered calibration items the prototype rule answered."""
    new_label_margins: Mapping[str, float | None] = field(default_factory=dict)
    """Each new label's own margin, calibrated on its own leave-one-out evidence (``None``: off
    for it); a label without one gets ``new_label_margin``."""
    memory_served: tuple[str, ...] = ()
    """Labels the model knows that the memory still serves as if it did not (labels a retrain
    added whose feedback the memory answers better than the new head: :func:`rebuilt_memory`)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold, "new_label_threshold": self.new_label_threshold,
            "new_label_margin": self.new_label_margin,
            "new_label_margins": dict(self.new_label_margins),
            "items": self.items, "model_accuracy": self.model_accuracy,
            "combined_accuracy": self.combined_accuracy, "answered": self.answered,
            "prototype_answered": self.prototype_answered, "reason": self.reason,
            "memory_served": list(self.memory_served),
        }


def calibrate_threshold(
    embeddings: np.ndarray,
    labels: Sequence[str],
    model_predictions: Sequence[str],
    known_labels: Iterable[str],
    **options: Any,
) -> Calibration:
    """The thresholds that maximise leave-one-out accuracy of memory-or-model on feedback
    (:func:`_calibrate`, whose keyword options it takes)."""
    return _calibrate(embeddings, labels, model_predictions, known_labels, **options)[0]


def _calibrate(
    embeddings: np.ndarray,
    labels: Sequence[str],
    model_predictions: Sequence[str],
    known_labels: Iterable[str],
    *,
    floor: float = THRESHOLD_FLOOR,
    new_label_floor: float = NEW_LABEL_THRESHOLD_FLOOR,
    ceiling: float = THRESHOLD_CEILING,
    default: float = DEFAULT_THRESHOLD,
    new_label_default: float = DEFAULT_NEW_LABEL_THRESHOLD,
    max_known_loss: float = MAX_KNOWN_LOSS,
    min_items: int = MIN_CALIBRATION_ITEMS,
    step: float = 0.005,
    reference: np.ndarray | None = None,
    margin_floor: float = MARGIN_FLOOR,
    margin_ceiling: float = MARGIN_CEILING,
    margin_default: float = DEFAULT_NEW_LABEL_MARGIN,
    margin_prior_items: float = MARGIN_PRIOR_ITEMS,
    queries: np.ndarray | None = None,
    kept: np.ndarray | None = None,
) -> tuple[Calibration, np.ndarray | None]:
    """The thresholds that maximise leave-one-out accuracy of memory-or-model on feedback, and
    per item whether memory-or-model is right at them (leave-one-out; ``None`` with too few items
    to calibrate).

    Each item is looked up against all the others: at thresholds ``(t, t_new)`` it is answered
    by its nearest other item when their similarity reaches ``t`` (that item's label is one of
    ``known_labels``, the model's) or ``t_new`` (it is not), else by the model, whose prediction
    for it is ``model_predictions[i]``. Every pair of candidate thresholds (``t`` from ``floor``,
    ``t_new`` from ``new_label_floor``, both up to ``ceiling`` in ``step``) is scored; pairs that
    lower the accuracy on items of known labels by more than ``max_known_loss`` are excluded;
    the most correct answers win, ties going to the higher (more cautious) thresholds. Where
    nothing beats the model, the ceiling is kept: the memory then only repeats the labels of
    (near) duplicates. With fewer than ``min_items`` items, the defaults.

    With a ``reference`` (the model's class prototypes), the prototype rule's margin is then
    calibrated the same way on the items the entries leave unanswered: each item of a label the
    model does not know is compared with its label's prototype *without it* (leave-one-out; an
    only example has none), every other item with the full prototypes; margins from
    ``margin_floor`` to ``margin_ceiling`` are scored with what is left of the known-label
    budget; where none gains, the rule stays off (margin ``None``). Where no label the model
    does not know has two items yet (nothing to leave one out of), ``margin_default``. That
    shared margin serves labels without evidence of their own; each label with items the rule
    would answer also gets its own (``new_label_margins``): the margins that together gain most
    within the same budget (:func:`_label_margins`; ties go to the margin nearest the shared
    one), each shrunk towards the shared margin with weight ``k / (k + margin_prior_items)``
    for a label with ``k`` items, further where the shrunk margins together overspend the
    budget (:func:`_own_margins`).

    ``queries`` (a mask; all items without it) are the items scored, e.g. those the model never
    trained on; ``kept`` (all without it) the items the memory holds as entries: an item's
    nearest other item is sought among those, as the memory will seek it. The prototypes are
    built from all items (the memory keeps every entry of a label the model does not know).
    """
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    total_items = len(vectors)
    if not total_items == len(labels) == len(model_predictions):
        raise ValueError("embeddings, labels and model_predictions must have the same length")
    scored = (np.ones(total_items, dtype=bool) if queries is None
              else np.asarray(queries, dtype=bool))
    rows = np.flatnonzero(scored)
    n = len(rows)
    has_reference = _usable_reference(reference, vectors.shape[1]) is not None
    if n < min_items:
        return Calibration(default, new_label_default, n, None, None, 0,
                           f"{n} feedback items; at least {min_items} are needed to calibrate",
                           margin_default if has_reference else None), None
    known = frozenset(known_labels)
    all_truth = np.array(labels, dtype=object)
    truth = all_truth[rows]
    model_correct = np.array(model_predictions, dtype=object)[rows] == truth
    entries = np.ones(total_items, dtype=bool) if kept is None else np.asarray(kept, dtype=bool)
    nearest = np.zeros(n, np.int64)
    similarity = np.full(n, -np.inf, np.float32)
    if entries.any():
        entry_rows = np.flatnonzero(entries)
        entry_vectors = vectors[entry_rows]
        position = np.full(total_items, -1)
        position[entry_rows] = np.arange(len(entry_rows))
        for start in range(0, n, 1024):  # blocks: an n x n matrix of 10k items would be 400 MB
            part = rows[start : start + 1024]
            block = vectors[part] @ entry_vectors.T
            own = position[part]
            block[np.flatnonzero(own >= 0), own[own >= 0]] = -np.inf  # never its own entry
            nearest[start : start + len(part)] = entry_rows[block.argmax(axis=1)]
            similarity[start : start + len(part)] = block.max(axis=1)
    memory_correct = all_truth[nearest] == truth
    neighbour_known = np.array([label in known for label in all_truth[nearest]], dtype=bool)
    item_known = np.array([label in known for label in truth], dtype=bool)
    gain = memory_correct.astype(int) - model_correct.astype(int)

    def table(group: np.ndarray, low: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per candidate threshold (descending): the gain over the model within ``group``, and
        the part of it on items of known labels."""
        ts = np.round(np.arange(ceiling, low - step / 2, -step), 6)
        above = similarity[None, :] >= ts[:, None]
        in_group = above & group[None, :]
        return ts, (in_group * gain).sum(axis=1), (in_group * (gain * item_known)).sum(axis=1)

    t1, g1, k1 = table(neighbour_known, floor)
    t2, g2, k2 = table(~neighbour_known, new_label_floor)
    total = g1[:, None] + g2[None, :]
    known_change = k1[:, None] + k2[None, :]
    allowed = known_change >= -max_known_loss * max(1, int(item_known.sum()))
    total = np.where(allowed, total, np.iinfo(np.int64).min)
    # Candidates run from the ceiling down, so the first maximum has the highest thresholds.
    i, j = (int(v) for v in np.unravel_index(int(np.argmax(total)), total.shape))
    if total[i, j] <= 0:
        i, j = 0, 0
    t_known, t_new = float(t1[i]), float(t2[j])
    answered = np.where(neighbour_known, similarity >= t_known, similarity >= t_new)
    combined = np.where(answered, memory_correct, model_correct)
    reason = (
        "leave-one-out accuracy of memory-or-model is highest at these thresholds"
        if total[i, j] > 0
        else "no thresholds beat the model alone: only near-duplicates are answered"
    )
    margin, by_prototype = None, np.zeros(n, dtype=bool)
    margins: dict[str, float | None] = {}
    reference = _usable_reference(reference, vectors.shape[1]) if has_reference else None
    if reference is not None:
        lead, correct_p, picked = _prototype_leave_one_out(vectors, all_truth, known, reference)
        lead, correct_p, picked = lead[rows], correct_p[rows], picked[rows]
        open_items = ~answered & np.isfinite(lead)
        evidence = bool((np.isfinite(lead) & ~item_known).any())
        gain_p = correct_p.astype(int) - model_correct.astype(int)
        budget = max_known_loss * max(1, int(item_known.sum())) + int(known_change[i, j])
        ms = np.round(np.arange(margin_ceiling, margin_floor - step / 2, -step), 6)
        above = (lead[None, :] >= ms[:, None]) & open_items[None, :]
        gains = (above * gain_p).sum(axis=1)
        known_losses = (above * (gain_p * item_known)).sum(axis=1)
        gains = np.where(known_losses >= -budget, gains, np.iinfo(np.int64).min)
        k = int(np.argmax(gains))  # from the ceiling down: ties go to the larger margin
        if not evidence:
            margin = margin_default
            reason += (f"; no label the model does not know has two items: prototype margin "
                       f"{margin:.3f} (the default)")
        else:
            margin = float(ms[k]) if gains[k] > 0 else None
            sizes = {str(label): int((truth == label).sum()) for label in set(picked) - {None}}
            margins, by_prototype = _own_margins(
                _label_margins(ms, lead, picked, open_items, gain_p, item_known, budget, margin),
                sizes, margin, margin_ceiling, margin_prior_items, lead, picked, open_items,
                gain_p * item_known, budget,
            )
            combined = np.where(by_prototype, correct_p, combined)
            shared = "off" if margin is None else f"{margin:.3f}"
            reason += (
                f"; the prototype rule answers {int(by_prototype.sum())} more, at margins "
                + ", ".join(f"{label} {'off' if m is None else f'{m:.3f}'}"
                            for label, m in margins.items())
                + f" (other labels: {shared})"
            )
    calibration = Calibration(
        t_known, t_new, n, float(model_correct.mean()), float(combined.mean()),
        int(answered.sum() + by_prototype.sum()), reason, margin, int(by_prototype.sum()),
        new_label_margins=margins,
    )
    return calibration, combined.astype(bool)


def _label_margins(
    ms: np.ndarray,
    lead: np.ndarray,
    picked: np.ndarray,
    open_items: np.ndarray,
    gain: np.ndarray,
    item_known: np.ndarray,
    budget: float,
    shared: float | None = None,
) -> dict[str, float | None]:
    """Each new label's own margin (``None``: the rule is off for it), from its own
    leave-one-out evidence: the items the rule would give it (``picked``, among ``open_items``)
    with their ``lead`` and ``gain`` over the model. The margins together maximise the gain
    while the items of labels the model knows lose at most ``budget`` answers, shared among the
    labels (an exact search over the candidate margins ``ms``, descending: ties go to the larger
    margin, and to off where no margin gains)."""
    labels = sorted({str(label) for label in picked[open_items]})
    cap = int(np.floor(budget + 1e-9))
    if cap < 0:  # the thresholds spent more than the budget: no margin is allowed
        return dict.fromkeys(labels)
    # Per label: (gain, known loss, margin) for each candidate, "off" first.
    options: list[list[tuple[int, int, float | None]]] = []
    for label in labels:
        mine = open_items & (picked == label)
        above = (lead[None, :] >= ms[:, None]) & mine[None, :]
        gains = (above * gain).sum(axis=1)
        losses = -(above * (gain * item_known)).sum(axis=1)
        candidates: list[tuple[int, int, float | None]] = [
            (int(g), int(loss), float(m))
            for g, loss, m in zip(gains, losses, ms, strict=True) if loss <= cap
        ]
        if shared is None:
            options.append([(0, 0, None), *candidates])
        else:  # ties go to the margin nearest the shared one
            candidates.sort(key=lambda c: (abs(float(c[2] or 0.0) - shared), -float(c[2] or 0.0)))
            options.append([*candidates, (0, 0, None)])
    # best[b]: the largest total gain with at most b known answers lost, and its margins.
    best: list[tuple[int, tuple[float | None, ...]]] = [(0, ())] * (cap + 1)
    for choices in options:
        step: list[tuple[int, tuple[float | None, ...]]] = []
        for b in range(cap + 1):
            top: tuple[int, tuple[float | None, ...]] | None = None
            for g, loss, m in choices:
                if loss <= b and (top is None or best[b - loss][0] + g > top[0]):
                    top = (best[b - loss][0] + g, best[b - loss][1] + (m,))
            assert top is not None  # "off" is always possible
            step.append(top)
        best = step
    return dict(zip(labels, best[cap][1], strict=True))


def _own_margins(
    fitted: dict[str, float | None],
    sizes: dict[str, int],
    shared: float | None,
    ceiling: float,
    prior_items: float,
    lead: np.ndarray,
    picked: np.ndarray,
    open_items: np.ndarray,
    known_gain: np.ndarray,
    budget: float,
) -> tuple[dict[str, float | None], np.ndarray]:
    """Each label's margin: its ``fitted`` margin (:func:`_label_margins`) shrunk towards the
    ``shared`` one by its number of items ``k``, with weight ``k / (k + prior_items)`` (off, as
    either margin, counts as the ``ceiling``); and the items the rule then answers. Where the
    shrunk margins together lose more than ``budget`` answers on items of labels the model
    knows, each is shrunk further towards the shared margin (in tenths of the way) until they
    do not (off for all where even the shared margin, or the ceiling, overspends)."""
    base = ceiling if shared is None else shared
    for shrink in np.linspace(1.0, 0.0, 11):
        margins: dict[str, float | None] = {}
        for label, own in fitted.items():
            if shared is None and own is None:
                margins[label] = None
                continue
            weight = float(shrink) * sizes[label] / (sizes[label] + prior_items)
            margins[label] = round(base + weight * ((ceiling if own is None else own) - base), 6)
        limit = np.array([
            np.inf if label is None or (m := margins.get(label, shared)) is None else m
            for label in picked
        ], dtype=np.float64)
        answered = open_items & (lead >= limit)
        if (answered * known_gain).sum() >= -budget:
            return margins, answered
    # Only where the shared rule is off (margins at the ceiling) and that still overspends.
    return dict.fromkeys(fitted), np.zeros_like(open_items)


def _prototype_leave_one_out(
    vectors: np.ndarray, truth: np.ndarray, known: frozenset[str], reference: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: the prototype rule's lead (best new-label prototype's similarity minus the
    nearest reference prototype's; ``-inf`` where no new label has a prototype), whether its
    label would be right, and that label (``None`` where there is none), each item's own
    label's prototype built without it."""
    n = len(vectors)
    new = sorted({str(label) for label in truth if label not in known})
    if not new:
        return np.full(n, -np.inf), np.zeros(n, dtype=bool), np.full(n, None, dtype=object)
    index = {label: k for k, label in enumerate(new)}
    codes = np.array([index.get(label, -1) for label in truth], dtype=np.int64)
    own = codes >= 0
    sums = np.zeros((len(new), vectors.shape[1]), np.float64)
    np.add.at(sums, codes[own], vectors[own])
    sizes = np.bincount(codes[own], minlength=len(new))
    dots = vectors.astype(np.float64) @ sums.T  # [n, labels]
    norms2 = np.repeat((sums**2).sum(axis=1)[None, :], n, axis=0)
    rows = np.flatnonzero(own)
    self_dot = (vectors[rows].astype(np.float64) ** 2).sum(axis=1)
    dots[rows, codes[rows]] -= self_dot
    norms2[rows, codes[rows]] += self_dot - 2 * (dots[rows, codes[rows]] + self_dot)
    counts = sizes[None, :] - own[:, None] * (codes[:, None] == np.arange(len(new))[None, :])
    reference_rows = np.asarray(reference, np.float32)
    reference_scale, prior = _reference_scale(reference_rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = dots * _prototype_scale(np.maximum(norms2, 0.0), counts, prior)
    # A label with no other entry has no prototype for this item.
    alone = counts == 0
    scores = np.where(alone | ~np.isfinite(scores), -np.inf, scores)
    pick = scores.argmax(axis=1)
    best = scores[np.arange(n), pick]
    lead = best - ((vectors @ reference_rows.T) * reference_scale[None, :]).max(axis=1)
    picked: np.ndarray = np.array(new, dtype=object)[pick]
    right: np.ndarray = picked == truth
    picked[~np.isfinite(lead)] = None
    return lead, right, picked


def memory_served_labels(
    embeddings: np.ndarray,
    labels: Sequence[str],
    predicted: Sequence[str],
    known_labels: Sequence[str],
    learnt: Iterable[str],
    reference: np.ndarray | None = None,
    queries: np.ndarray | None = None,
) -> frozenset[str]:
    """Of the ``learnt`` labels (labels a retrain added to the model), those the memory should
    still serve: where memory-or-model, with those labels treated as labels the model does not
    know (their own thresholds, the prototype rule against the other classes' prototypes), is
    right on more of the label's feedback items (leave-one-out, on the ``queries`` items) than
    the model alone.

    A retrained head learns a label from its first few examples slowly; until its own recall on
    the label's feedback matches the memory's, the memory keeps answering for it. ``reference``:
    one row per label of ``known_labels`` (as :func:`version_prototypes` returns them).
    """
    known = list(known_labels)
    candidates = {label for label in learnt if label in set(known)} & set(labels)
    if not candidates:
        return frozenset()
    trusted = [label for label in known if label not in candidates]
    truth = np.array(labels, dtype=object)
    model_right = np.array(predicted, dtype=object) == truth
    kept = np.isin(truth, list(candidates)) | ~model_right
    scored = (np.ones(len(truth), dtype=bool) if queries is None
              else np.asarray(queries, dtype=bool))
    _, combined = _calibrate(embeddings, labels, predicted, trusted,
                             reference=_reference_rows(reference, known, trusted),
                             queries=scored, kept=kept)
    if combined is None:  # too few items to tell: the memory keeps them (the model is new to them)
        return frozenset(candidates)
    truth, model_right = truth[scored], model_right[scored]
    return frozenset(
        label for label in candidates
        if combined[truth == label].sum() > model_right[truth == label].sum()
    )


def _reference_rows(
    reference: np.ndarray | None, known: Sequence[str], keep: Sequence[str]
) -> np.ndarray | None:
    """The rows of ``reference`` (one per label of ``known``) of the labels in ``keep``."""
    if reference is None:
        return None
    rows = np.asarray(reference)
    if len(rows) != len(known):
        raise ValueError(f"the reference has {len(rows)} rows for {len(known)} labels")
    wanted = set(keep)
    return rows[[i for i, label in enumerate(known) if label in wanted]]


def rebuilt_memory(
    ids: Sequence[int],
    embeddings: np.ndarray,
    labels: Sequence[str],
    predicted: Sequence[str],
    known_labels: Iterable[str],
    reference: np.ndarray | None = None,
    *,
    learnt: Iterable[str] = (),
    unseen: np.ndarray | None = None,
) -> tuple[FeedbackMemory, Calibration]:
    """The memory for a newly served model, from all feedback so far.

    ``embeddings`` and ``predicted`` are the new model's embeddings of the feedback texts and its
    labels for them (one ONNX run over the texts gives both). ``reference``: the model's class
    prototypes, one row per label of ``known_labels`` (:func:`version_prototypes`), for the
    prototype rule (off without them).

    ``unseen`` marks the items the model never trained on (all when ``None``). ``learnt``: labels
    a retrain added (the model's lineage); those of them the memory answers better than the model
    (:func:`memory_served_labels`, judged on the unseen items, or on all when fewer than
    :data:`MIN_CALIBRATION_ITEMS` are unseen) stay *memory-served*: the memory treats them as
    labels the model does not know, and keeps all their entries. Of the other labels' entries,
    only those the model gets wrong are kept.

    The thresholds and margins are calibrated on *all* items. A head is right more often on the
    items it trained on than on new traffic, so there every memory answer that overrides it
    counts as a loss: the calibration comes out cautious, which is the side to err on for the
    labels the model knows. Calibrated on the unseen items alone (after a retrain, its held-out
    fifth of the feedback and what came since), the half-point budget was judged on too few items
    to hold: retrains plus the memory cost the old classes more than a point against the
    retrained heads alone in 3 of 10 stream runs, at most 0.68 calibrated on all (BENCHMARKS.md,
    section 5, change 6).
    """
    known = list(known_labels)
    vectors = np.asarray(embeddings, dtype=np.float32)
    queries = np.ones(len(labels), dtype=bool) if unseen is None else np.asarray(unseen, bool)
    if queries.sum() < MIN_CALIBRATION_ITEMS:
        queries = np.ones(len(labels), dtype=bool)
    served = memory_served_labels(vectors, labels, predicted, known, learnt, reference, queries)
    trusted = [label for label in known if label not in served]
    trusted_reference = _reference_rows(reference, known, trusted) if served else reference
    truth = np.array(labels, dtype=object)
    # Entries kept: every entry of a memory-served label (its prototype is built from them), and
    # of the other labels those the model gets wrong. Calibrated against exactly those.
    kept = np.isin(truth, list(served)) | (np.array(predicted, dtype=object) != truth)
    calibration = calibrate_threshold(
        vectors, labels, predicted, trusted, reference=trusted_reference, kept=kept,
    )
    if served:
        calibration = replace(calibration, memory_served=tuple(sorted(served)))
    memory = FeedbackMemory(
        dim=vectors.shape[1] if vectors.ndim == 2 and len(vectors) else DIM,
        threshold=calibration.threshold,
        new_label_threshold=calibration.new_label_threshold,
        known_labels=trusted,
        reference=trusted_reference,
        new_label_margin=calibration.new_label_margin,
        new_label_margins=calibration.new_label_margins,
    )
    rows = np.flatnonzero(kept).tolist()
    memory.add([ids[i] for i in rows], vectors[rows], [labels[i] for i in rows])
    return memory, calibration


def learnt_labels(folder: str | Path) -> frozenset[str]:
    """The labels retrains added along a version's lineage: the ``new_labels`` each retrain's
    manifest records, from the version in ``folder`` up its parents."""
    from adapters.serving.registry import ModelVersion

    path = Path(folder)
    found: set[str] = set()
    for version in ModelVersion(path.name, path).lineage():
        retrain = (version.manifest.get("training") or {}).get("retrain") or {}
        found.update(str(label) for label in retrain.get("new_labels") or ())
    return frozenset(found)


def trained_texts(folder: str | Path) -> frozenset[str]:
    """The texts a version's head trained on: its ``data/train.jsonl`` and
    ``data/validation.jsonl`` (the served head is fitted on both); empty when absent."""
    from adapters.serving.data import read_jsonl

    texts: set[str] = set()
    for name in ("train", "validation"):
        path = Path(folder) / "data" / f"{name}.jsonl"
        if path.is_file():
            texts.update(read_jsonl(path).texts)
    return frozenset(texts)


# -- keeping every worker in step with the store ------------------------------------------------


@dataclass(frozen=True)
class FeedbackChange:
    """One feedback row as the store reports it to a follower.

    ``sequence`` orders changes (the feedback id for inserts; a store that also reports relabels
    and deletions gives them a larger sequence number). ``label`` is ``None`` for a deleted item.
    ``embedding`` is ``None`` when the store has none from the serving encoder (feedback given as
    text): the follower embeds ``text`` then.
    """

    sequence: int
    feedback_id: int
    label: str | None
    text: str
    embedding: np.ndarray | None = None


FetchChanges = Callable[[int], Sequence[FeedbackChange]]
"""Changes with a sequence number greater than the argument, in sequence order."""
EmbedTexts = Callable[[list[str]], np.ndarray]


class FeedbackFollower:
    """Polls the store for feedback changes and applies them to a memory.

    ``fetch(cursor)`` returns the changes after ``cursor``; ``embed(texts)`` embeds texts that
    came without an embedding, with the serving model's encoder. :meth:`poll` applies one round
    and is what tests call; :meth:`start` runs it every ``interval_s`` on a daemon thread, so a
    change reaches the memory of every worker within about one interval plus the embedding time.
    """

    def __init__(
        self,
        memory: FeedbackMemory,
        fetch: FetchChanges,
        embed: EmbedTexts,
        interval_s: float = 0.5,
        cursor: int = 0,
    ) -> None:
        self.memory = memory
        self.fetch = fetch
        self.embed = embed
        self.interval_s = interval_s
        self.cursor = cursor
        self._round = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def replace(self, memory: FeedbackMemory, cursor: int) -> None:
        """Follow ``memory`` from ``cursor`` on (a memory rebuilt for a new model from every change
        up to ``cursor``). Waits for a round in progress, so none of its changes is lost."""
        with self._round:
            self.memory = memory
            self.cursor = cursor

    def poll(self) -> int:
        """Fetch and apply the changes since the cursor; returns how many were applied."""
        with self._round:
            return self._poll()

    def _poll(self) -> int:
        changes = list(self.fetch(self.cursor))
        if not changes:
            return 0
        # The latest change of an id wins: a deletion after an insert removes it.
        latest: dict[int, FeedbackChange] = {}
        for change in changes:
            latest[change.feedback_id] = change
        deleted = [fid for fid, c in latest.items() if c.label is None]
        kept = [c for c in latest.values() if c.label is not None]
        missing = [c for c in kept if c.embedding is None]
        vectors: dict[int, np.ndarray] = {
            c.feedback_id: np.asarray(c.embedding, np.float32)
            for c in kept
            if c.embedding is not None
        }
        if missing:
            computed = self.embed([c.text for c in missing])
            for change, vector in zip(missing, computed, strict=True):
                vectors[change.feedback_id] = vector
        if deleted:
            self.memory.remove(deleted)
        if kept:
            self.memory.add(
                [c.feedback_id for c in kept],
                np.stack([vectors[c.feedback_id] for c in kept]),
                [c.label for c in kept if c.label is not None],
            )
        # Advance only after applying: a failed round is retried from the same cursor.
        self.cursor = max(c.sequence for c in changes)
        return len(changes)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feedback-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:
                log.exception("feedback follower poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
