"""Learning from a stream: a labelled data set replayed as traffic, with feedback, memory, retrains.

This is an in-process simulation of the service's loop (predict, take feedback, retrain, promote),
the honest test of "learns in production" (issue 9). Real code: every head is fitted by
``adapters.training.pipeline.fit_head``, the one path ``refit train`` and the retrain job use (the
first version with ``refit train``'s recipe, every retrain with the retrain job's: the champion's
configuration, class weighting chosen on validation, warm start, large batches, final fit on train
+ validation), on the retrain job's split (``holdout_mask`` and the constants of
``adapters/training/retrain.py``: a held-out fifth of the feedback per label, 15% of the rest for
validation, a replay of up to 5000 rows of the champion's training data); the feedback memory is
built by ``adapters.serving.memory.rebuilt_memory`` exactly as ``service/memory.py`` builds it
(calibrated on the feedback the served head never trained on, labels a retrain added kept
memory-served while the memory answers them better). Simulated: the traffic (the data set,
replayed) and the users' feedback (a fraction of the predictions, a few of them wrongly
labelled). Not simulated: the gate (every retrain is promoted), the encoder (embeddings come from
bench/datasets.py's cache, the same frozen encoder), time (a retrain takes effect at the next
chunk; the memory is rebuilt at every chunk, where the service rebuilds after every 20 changes).

The stream. From a data set's labels, ``--new-labels`` are drawn (seeded) that the first model
never sees. The traffic is the test split of the other labels, spread over all chunks, plus the
train and validation rows of the new labels, spread over the chunks from ``--new-from-chunk`` on.
The new labels' test rows are never in the traffic: they are the probe set on which each new
label's recall is measured after every batch. Predictions go in batches of 32; a fraction
(``--feedback-rate``) gets feedback right after its batch, with a wrong label (another known
label) at ``--wrong-rate``. A retrain starts once ``--retrain-after`` new feedback items have
arrived and serves from the next chunk on.

Four ways of serving the same stream:
- never: the first model, never adapted;
- memory: the first model, with the feedback memory (rebuilt at every chunk from all feedback);
- retrain: every retrain promoted, no memory;
- both: retrains and the memory, rebuilt for the serving version at every chunk.

A fifth, not plotted: ``memory-nearest``, the memory arm without the prototype rule (the nearest
entry alone decides), for comparison.

    .venv/bin/python bench/stream.py [--datasets hwu64 banking77] [--search grid|none] [--seed N]
                                     [--arms never memory ...]

Writes bench/figures/stream-<dataset>.png, bench/results/stream-<dataset>.json (other seeds and
``--search none``: stream-<dataset>-seed<N>-<search>.*; a run of fewer ``--arms``: its result
only), and prints the markdown tables that BENCHMARKS.md carries and each run against the
issue's target.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.serving.data import stratified_indices
from adapters.serving.memory import (
    Calibration,
    FeedbackMemory,
    class_means,
    rebuilt_memory,
)
from bench.common import ROOT, save
from bench.datasets import Benchmark, load
from refit.settings import RefitSettings

FIGURES = ROOT / "bench" / "figures"
ARMS = ("never", "memory", "retrain", "both")
NEAREST_ARM = "memory-nearest"
"""Not plotted: the memory arm without the prototype rule (the nearest entry alone decides)."""
ALL_ARMS = (*ARMS, NEAREST_ARM)
TARGET_RECALL = 0.6
# The retrain job's settings, at their defaults.
REPLAY_ROWS = int(RefitSettings.model_fields["retrain_replay_rows"].default)
HOLDOUT_FRACTION = float(RefitSettings.model_fields["retrain_holdout_fraction"].default)


@dataclass(frozen=True)
class StreamOptions:
    chunks: int = 20
    new_labels: int = 3
    new_from_chunk: int = 5
    feedback_rate: float = 0.2
    wrong_rate: float = 0.05
    retrain_after: int = 100
    batch_size: int = 32
    search: str = "grid"
    seed: int = 0


@dataclass
class Version:
    """A served head and what the registry's version folder would hold: its training data."""

    name: str
    head: Any
    labels: list[str]
    config: Any
    x_train: np.ndarray
    t_train: list[str]
    y_train: list[str]
    x_val: np.ndarray
    t_val: list[str]
    y_val: list[str]
    trained_on: set[int] = field(default_factory=set)
    """Feedback ids in its training or validation data (directly, or through replay)."""
    held_out_head: Any = None
    """The head that never trained on ``x_val`` (``FittedHead.validation_head``): what
    ``register_version`` calibrates the temperature on."""
    _prototypes: np.ndarray | None = None

    @property
    def prototypes(self) -> np.ndarray:
        """Its class prototypes from its training data (what the service reads from the version
        folder for the memory's prototype rule)."""
        if self._prototypes is None:
            self._prototypes = class_means(self.x_train, self.y_train, self.labels)
        return self._prototypes

    def predict(self, x: np.ndarray) -> np.ndarray:
        from adapters.training.head import head_probabilities

        if len(x) == 0:
            return np.array([], dtype=object)
        return np.array(self.labels, dtype=object)[head_probabilities(self.head, x).argmax(axis=1)]


def encode(labels: list[str], names: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(names)}
    return np.array([index[label] for label in labels])


def _fit(data: Any, recipe: Any) -> Any:
    """``adapters.training.pipeline.fit_head``: the one way ``refit train`` and the retrain job
    fit a head (search, class weighting, warm start, final fit on train + validation)."""
    from adapters.serving.tokenization import TextTokenizer
    from adapters.training.encoder import packaged_encoder_dir
    from adapters.training.pipeline import EncoderSource, SilentReporter, fit_head

    # Head-only: the encoder is frozen and its embeddings come from the cache; the tokenizer is
    # only read by encoder fine-tuning, which the stream does not do.
    source = EncoderSource(
        tokenizer=TextTokenizer(packaged_encoder_dir() / "tokenizer.json"), encoder=None
    )
    return fit_head(data, recipe, source, SilentReporter())


def _splits(
    train: tuple[np.ndarray, list[str], list[str]],
    validation: tuple[np.ndarray, list[str], list[str]],
    labels: list[str],
) -> Any:
    """``EmbeddedSplits`` from (embeddings, texts, labels) of train and validation (no test:
    the gate is not simulated)."""
    from adapters.serving.data import LabelledTexts
    from adapters.training.pipeline import EmbeddedSplits, Splits

    empty = LabelledTexts.of([], [])
    return EmbeddedSplits(
        labels,
        Splits(LabelledTexts.of(train[1], train[2]), LabelledTexts.of(validation[1],
               validation[2]), empty),
        {"train": train[0], "validation": validation[0],
         "test": np.zeros((0, train[0].shape[1]), np.float32)},
    )


def first_version(bench: Benchmark, old: list[str], options: StreamOptions) -> Version:
    """``refit train`` on the old labels: its head recipe (``TrainingOptions().head_recipe()``,
    the search given by ``--search``) through ``fit_head``."""
    from adapters.training.pipeline import TrainingOptions
    from adapters.training.search import SearchOptions

    keep_t = np.array([label in set(old) for label in bench.train.labels])
    keep_v = np.array([label in set(old) for label in bench.validation.labels])
    train = (bench.x_train[keep_t], list(np.array(bench.train.texts, dtype=object)[keep_t]),
             list(np.array(bench.train.labels)[keep_t]))
    val = (bench.x_validation[keep_v],
           list(np.array(bench.validation.texts, dtype=object)[keep_v]),
           list(np.array(bench.validation.labels)[keep_v]))
    recipe = TrainingOptions(
        seed=options.seed, search=SearchOptions(options.search)  # type: ignore[arg-type]
    ).head_recipe()
    fitted = _fit(_splits(train, val, list(old)), recipe)
    return Version("v1", fitted.head, list(old), fitted.config, *train, *val,
                   held_out_head=fitted.validation_head)


def retrain(
    champion: Version, ids: list[int], x: np.ndarray, texts: list[str], labels: list[str],
    name: str, seed: int,
) -> tuple[Version, dict[str, Any]]:
    """The retrain job on all feedback so far: its data split (``split_data`` in
    adapters/training/retrain.py, with the same held-out rule and constants) and its recipe
    (``retrain_recipe``: the champion's configuration, class weighting chosen on validation,
    warm start, large batches) through ``fit_head``."""
    from adapters.training.pipeline import HeadRecipe, WarmStart
    from adapters.training.retrain import (
        FEEDBACK_VALIDATION_FRACTION,
        LARGE_BATCH_FROM,
        WARM_PATIENCE,
        holdout_mask,
    )
    from adapters.training.search import SearchOptions

    names = sorted(set(champion.labels) | set(labels))
    held = holdout_mask(ids, labels, HOLDOUT_FRACTION)
    fb_train = np.flatnonzero(~held)
    fit_idx, val_idx = stratified_indices(
        [labels[p] for p in fb_train], FEEDBACK_VALIDATION_FRACTION, seed
    )
    fb_fit, fb_val = fb_train[fit_idx], fb_train[val_idx]
    rng = np.random.default_rng(seed)
    replay_n = min(REPLAY_ROWS, len(champion.y_train))
    replay = np.sort(rng.choice(len(champion.y_train), replay_n, replace=False))
    train = (np.concatenate([champion.x_train[replay], x[fb_fit]]),
             [champion.t_train[i] for i in replay] + [texts[p] for p in fb_fit],
             [champion.y_train[i] for i in replay] + [labels[p] for p in fb_fit])
    val = (np.concatenate([champion.x_val, x[fb_val]]),
           champion.t_val + [texts[p] for p in fb_val],
           champion.y_val + [labels[p] for p in fb_val])
    index = {label: i for i, label in enumerate(names)}
    recipe = HeadRecipe(
        config=champion.config,
        search=SearchOptions(strategy="none"),
        seed=seed,
        warm_start=WarmStart(
            head=champion.head, hidden_size=champion.config.hidden_size,
            class_map=[index[label] for label in champion.labels], version=champion.name,
            patience=WARM_PATIENCE,
        ),
        large_batch_from=LARGE_BATCH_FROM,
        choose_class_weighting=True,
    )
    started = time.perf_counter()
    fitted = _fit(_splits(train, val, names), recipe)
    version = Version(
        name, fitted.head, names, fitted.config, *train, *val,
        trained_on=champion.trained_on | {ids[p] for p in fb_train},
        held_out_head=fitted.validation_head,
    )
    record = {
        "version": name, "feedback": len(ids), "held_out": int(held.sum()),
        "labels": len(names), "train_rows": len(train[2]),
        "class_weight_power": fitted.config.class_weight_power,
        "prior_correction": fitted.config.prior_correction,
        "steps": fitted.trained.epochs_run, "seconds": round(time.perf_counter() - started, 2),
    }
    return version, record


@dataclass
class Stream:
    """The traffic: embeddings and labels in arrival order, each row's chunk, the probe sets."""

    x: np.ndarray
    texts: list[str]
    labels: list[str]
    chunk: np.ndarray
    new_labels: list[str]
    old_labels: list[str]
    probes: dict[str, np.ndarray]


def build_stream(bench: Benchmark, options: StreamOptions) -> Stream:
    rng = np.random.default_rng(options.seed)
    counts = {label: bench.train.labels.count(label) for label in bench.labels}
    test_counts = {label: bench.test.labels.count(label) for label in bench.labels}
    # New labels need enough rows to give ~20 feedback items and a probe set.
    eligible = sorted(lab for lab in bench.labels if counts[lab] >= 80 and test_counts[lab] >= 15)
    new = sorted(rng.choice(eligible, options.new_labels, replace=False).tolist())
    old = [label for label in bench.labels if label not in set(new)]
    test_labels = np.array(bench.test.labels)
    is_new_test = np.isin(test_labels, new)
    old_x, old_y = bench.x_test[~is_new_test], test_labels[~is_new_test]
    old_t = np.array(bench.test.texts, dtype=object)[~is_new_test]
    pool_labels = np.array(list(bench.train.labels) + list(bench.validation.labels))
    pool_x = np.concatenate([bench.x_train, bench.x_validation])
    new_rows = np.flatnonzero(np.isin(pool_labels, new))
    new_x, new_y = pool_x[new_rows], pool_labels[new_rows]
    pool_texts = np.array(list(bench.train.texts) + list(bench.validation.texts), dtype=object)
    new_t = pool_texts[new_rows]
    # Old traffic fills every chunk evenly; new traffic the chunks from new_from_chunk on.
    old_chunk = rng.permutation(np.arange(len(old_y)) * options.chunks // len(old_y))
    span = options.chunks - options.new_from_chunk
    new_chunk = options.new_from_chunk + rng.permutation(np.arange(len(new_y)) * span // len(new_y))
    x = np.concatenate([old_x, new_x])
    labels = np.concatenate([old_y, new_y])
    texts = np.concatenate([old_t, new_t])
    chunk = np.concatenate([old_chunk, new_chunk])
    order = np.lexsort((rng.random(len(chunk)), chunk))  # by chunk, shuffled within
    probes = {label: bench.x_test[test_labels == label] for label in new}
    return Stream(x[order], texts[order].tolist(), labels[order].tolist(), chunk[order], new, old,
                  probes)


def rebuilt(
    version: Version, first: Version, x: np.ndarray, labels: list[str], ids: list[int],
    prototype_rule: bool = True,
) -> tuple[FeedbackMemory, Calibration]:
    """The memory the service builds for ``version`` from all feedback so far
    (``rebuilt_memory``, as ``service/memory.py`` calls it): calibrated on the feedback the head
    never trained on (held out or newer), with the labels retrains added (those ``first`` lacks)
    kept memory-served while the memory answers them better than the head; entries of the other
    labels kept only where the head is wrong.

    With ``prototype_rule``, the memory weighs labels the model does not know against the
    version's class prototypes (as the service does); without, only the nearest entry decides.
    """
    unseen = np.array([fid not in version.trained_on for fid in ids], dtype=bool)
    return rebuilt_memory(
        ids, x, labels, list(version.predict(x)), version.labels,
        reference=version.prototypes if prototype_rule else None,
        learnt=set(version.labels) - set(first.labels), unseen=unseen,
    )


def run(name: str, options: StreamOptions, arms: tuple[str, ...] = ALL_ARMS) -> dict[str, Any]:
    """Replay ``name`` as a stream; ``arms`` (always with ``never``): the ways of serving it to
    run (fewer is quicker: without ``retrain`` and ``both``, nothing is retrained)."""
    arms = tuple(arm for arm in ALL_ARMS if arm in set(arms) | {"never"})
    bench = load(name)
    stream = build_stream(bench, options)
    rng = np.random.default_rng(options.seed + 1)
    started = time.perf_counter()
    v1 = first_version(bench, stream.old_labels, options)
    print(f"{name}: new labels {stream.new_labels}; {len(stream.labels)} predictions; "
          f"first version in {time.perf_counter() - started:.0f}s "
          f"(prior correction {v1.config.prior_correction:g})", flush=True)
    versions = {"never": v1, "memory": v1, "retrain": v1, "both": v1}
    memories = {
        arm: FeedbackMemory(known_labels=v1.labels)
        for arm in ("memory", "both", NEAREST_ARM) if arm in arms
    }
    n = len(stream.labels)
    truth = np.array(stream.labels, dtype=object)
    correct = {arm: np.zeros(n, dtype=bool) for arm in arms}
    from_memory = {arm: np.zeros(n, dtype=bool) for arm in memories}
    fb_ids: list[int] = []
    fb_x_rows: list[int] = []
    fb_labels: list[str] = []
    wrong_feedback = 0
    since_retrain = 0
    pending: Version | None = None
    retrains: list[dict[str, Any]] = []
    calibrations: list[dict[str, Any]] = []
    seen_labels = set(stream.old_labels)
    label_seen = {label: 0 for label in stream.new_labels}
    label_feedback = {label: 0 for label in stream.new_labels}
    timeline: list[dict[str, Any]] = []
    probe_cache: dict[tuple[str, str], np.ndarray] = {}

    def probe_recall(arm: str) -> dict[str, float]:
        version = versions["memory" if arm == NEAREST_ARM else arm]
        out = {}
        for label, px in stream.probes.items():
            key = (version.name, label)
            if key not in probe_cache:
                probe_cache[key] = version.predict(px)
            answer = probe_cache[key].copy()
            if arm in memories:
                matches = memories[arm].lookup(px)
                hit = matches.answered
                answer[hit] = np.array(matches.labels, dtype=object)[hit]
            out[label] = float((answer == label).mean())
        return out

    for c in range(options.chunks):
        if pending is not None:  # the retrain finished: promote it from this chunk on
            versions["retrain"] = versions["both"] = pending
            retrains[-1].update(chunk=c)
            pending = None
        if fb_ids:  # every worker rebuilds its memory (at a swap, and as feedback comes)
            fb_x = stream.x[fb_x_rows]
            record: dict[str, Any] = {"chunk": c}
            for arm in memories:
                memories[arm], cal = rebuilt(
                    versions["memory" if arm == NEAREST_ARM else arm], v1, fb_x, fb_labels,
                    fb_ids, prototype_rule=arm != NEAREST_ARM,
                )
                record[arm] = {**cal.to_dict(), "entries": len(memories[arm])}
            calibrations.append(record)
        rows = np.flatnonzero(stream.chunk == c)
        for start in range(0, len(rows), options.batch_size):
            batch = rows[start : start + options.batch_size]
            xb = stream.x[batch]
            for arm in arms:
                version = versions["memory" if arm == NEAREST_ARM else arm]
                answer = version.predict(xb)
                if arm in memories:
                    matches = memories[arm].lookup(xb)
                    answer[matches.answered] = np.array(matches.labels, dtype=object)[
                        matches.answered
                    ]
                    from_memory[arm][batch] = matches.answered
                correct[arm][batch] = answer == truth[batch]
            # Feedback on a fraction of the batch, in effect at once.
            given = batch[rng.random(len(batch)) < options.feedback_rate]
            new_ids, new_labels = [], []
            for row in given:
                label = stream.labels[row]
                if rng.random() < options.wrong_rate:
                    label = str(rng.choice(sorted(seen_labels - {label})))
                    wrong_feedback += 1
                fb_ids.append(len(fb_ids) + 1)
                fb_x_rows.append(int(row))
                fb_labels.append(label)
                new_ids.append(fb_ids[-1])
                new_labels.append(label)
                if stream.labels[row] in label_feedback:
                    label_feedback[stream.labels[row]] += 1
            for row in batch:
                if stream.labels[row] in label_seen:
                    label_seen[stream.labels[row]] += 1
                    seen_labels.add(stream.labels[row])
            if new_ids:
                for memory in memories.values():
                    memory.add(new_ids, stream.x[given], new_labels)
            since_retrain += len(new_ids)
            timeline.append({
                "chunk": c,
                "predictions": int(batch[-1] + 1),
                "seen": dict(label_seen), "feedback": dict(label_feedback),
                "recall": {arm: probe_recall(arm) for arm in arms},
            })
            if (since_retrain >= options.retrain_after and pending is None
                    and {"retrain", "both"} & set(arms)):
                pending, info = retrain(
                    versions["retrain"], fb_ids, stream.x[fb_x_rows],
                    [stream.texts[r] for r in fb_x_rows], fb_labels, f"v{len(retrains) + 2}",
                    options.seed,
                )
                info["after_prediction"] = int(batch[-1] + 1)
                retrains.append(info)
                print(f"  retrain {info}", flush=True)
                since_retrain = 0

    is_new = np.isin(truth, stream.new_labels)
    per_chunk = []
    for c in range(options.chunks):
        in_chunk = stream.chunk == c
        entry: dict[str, Any] = {"chunk": c, "predictions": int(in_chunk.sum()),
                                 "new_label_share": round(float(is_new[in_chunk].mean()), 3)}
        for arm in arms:
            entry[arm] = {
                "accuracy": float(correct[arm][in_chunk].mean()),
                "old": float(correct[arm][in_chunk & ~is_new].mean()),
                "new": float(correct[arm][in_chunk & is_new].mean()) if (in_chunk & is_new).any()
                else None,
            }
        per_chunk.append(entry)
    summary = {
        arm: {
            "accuracy": float(correct[arm].mean()),
            "old": float(correct[arm][~is_new].mean()),
            "new": float(correct[arm][is_new].mean()),
            "answered_by_memory": float(from_memory[arm].mean()) if arm in from_memory else 0.0,
            "last_5_chunks": float(correct[arm][stream.chunk >= options.chunks - 5].mean()),
        }
        for arm in arms
    }
    reach = {}
    for arm in arms:
        reach[arm] = {}
        for label in stream.new_labels:
            hit = next((t for t in timeline if t["recall"][arm][label] >= TARGET_RECALL), None)
            reach[arm][label] = None if hit is None else {
                "feedback": hit["feedback"][label], "predictions": hit["seen"][label],
                "stream_predictions": hit["predictions"],
            }
    result = {
        "dataset": name,
        "options": asdict(options),
        "arms": list(arms),
        "first_version_config": asdict(v1.config),
        "new_labels": stream.new_labels,
        "predictions": n,
        "feedback": len(fb_ids),
        "wrong_feedback": wrong_feedback,
        "feedback_per_new_label": label_feedback,
        "probe_rows": {label: len(px) for label, px in stream.probes.items()},
        "summary": summary,
        "per_chunk": per_chunk,
        "reach_recall_0_6": reach,
        "retrains": retrains,
        "calibrations": calibrations,
        "timeline": timeline,
        "seconds": round(time.perf_counter() - started, 1),
    }
    stem = result_stem(name, options)
    if set(arms) != set(ALL_ARMS):  # a partial run: no figure, and its own result file
        save(f"{stem}-{'-'.join(arms)}", result)
        return result
    save(stem, result)
    plot(result, FIGURES / f"{stem}.png")
    return result


def result_stem(name: str, options: StreamOptions) -> str:
    """``stream-<dataset>`` for the default options (the figures BENCHMARKS.md shows); other
    seeds and search modes get their own files (``stream-<dataset>-seed1-none``)."""
    if (options.seed, options.search) == (StreamOptions.seed, StreamOptions.search):
        return f"stream-{name}"
    return f"stream-{name}-seed{options.seed}-{options.search}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"never": "#777777", "memory": "#1f77b4", "retrain": "#ff7f0e", "both": "#2ca02c"}
    chunks = [e["chunk"] for e in result["per_chunk"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm in ARMS:
        axes[0].plot(chunks, [e[arm]["accuracy"] for e in result["per_chunk"]], "o-",
                     color=colours[arm], label=arm, markersize=3)
        axes[1].plot(chunks, [e[arm]["old"] for e in result["per_chunk"]], "o-",
                     color=colours[arm], label=arm, markersize=3)
        xs = [t["predictions"] for t in result["timeline"]]
        ys = [np.mean(list(t["recall"][arm].values())) for t in result["timeline"]]
        axes[2].plot(xs, ys, "-", color=colours[arm], label=arm)
    new_from = result["options"]["new_from_chunk"]
    for ax in axes[:2]:
        ax.axvline(new_from - 0.5, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("chunk")
        ax.grid(alpha=0.3)
    for r in result["retrains"]:
        if "chunk" in r:
            for ax in axes[:2]:
                ax.axvline(r["chunk"] - 0.5, color=colours["retrain"], alpha=0.3, linewidth=3)
    axes[0].set_title("accuracy per chunk (all traffic)")
    axes[1].set_title("accuracy per chunk, old labels only")
    axes[2].axhline(TARGET_RECALL, color="k", linestyle=":", linewidth=1)
    axes[2].set_title("new labels: mean recall on held-out probes")
    axes[2].set_xlabel("predictions served")
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].grid(alpha=0.3)
    axes[0].legend(loc="lower left")
    fig.suptitle(
        f"{result['dataset']}: {result['predictions']} predictions in "
        f"{result['options']['chunks']} chunks, new labels from chunk {new_from} "
        f"({', '.join(result['new_labels'])}), feedback on "
        f"{result['options']['feedback_rate']:.0%} ({result['options']['wrong_rate']:.0%} wrong)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        (f"**{result['dataset']}**: {result['predictions']} predictions, {result['feedback']} "
        f"feedback items ({result['wrong_feedback']} wrongly labelled), new labels "
        f"{', '.join(f'`{lab}`' for lab in result['new_labels'])} from chunk "
        f"{result['options']['new_from_chunk']}, {len(result['retrains'])} retrains."),
        "",
        "| | never | memory | retrain | both | memory, nearest entry only |",
        "|---|---|---|---|---|---|",
    ]
    arms = ALL_ARMS
    for key, title in (("accuracy", "accuracy, whole stream"), ("old", "old labels"),
                       ("new", "new labels (in-stream recall)"),
                       ("last_5_chunks", "accuracy, last 5 chunks"),
                       ("answered_by_memory", "answered by the memory")):
        lines.append(f"| {title} | " + " | ".join(f"{s[a][key]:.4f}" for a in arms) + " |")
    lines += ["", ("Feedback items of the label (and predictions of it) until its recall on "
                   "held-out probes first reaches 0.6; then the memory arm's recall once the "
                   "label has had 20 feedback items, and every arm's recall at the end:"), "",
              "| new label | " + " | ".join(arms) + " | memory at 20 | end: "
              + " / ".join(ARMS) + " |", "|---" * (len(arms) + 3) + "|"]
    for label in result["new_labels"]:
        cells = []
        for arm in arms:
            hit = result["reach_recall_0_6"][arm][label]
            cells.append("never" if hit is None else f"{hit['feedback']} ({hit['predictions']})")
        at_20 = next((t for t in result["timeline"] if t["feedback"][label] >= 20), None)
        cells.append("-" if at_20 is None else f"{at_20['recall']['memory'][label]:.2f}")
        end = result["timeline"][-1]["recall"]
        cells.append(" / ".join(f"{end[arm][label]:.2f}" for arm in ARMS))
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += ["", "| chunk | new-label share | " + " | ".join(ARMS) + " |",
              "|---" * (len(ARMS) + 2) + "|"]
    for e in result["per_chunk"]:
        lines.append(f"| {e['chunk']} | {e['new_label_share']:.2f} | "
                     + " | ".join(f"{e[a]['accuracy']:.3f}" for a in ARMS) + " |")
    return "\n".join(lines)


def target_line(result: dict[str, Any], arm: str = "memory") -> str:
    """One run against the issue's target, for ``arm``: the feedback items each new label needed
    until its recall first reached 0.6 (the target: at most 20), its recall at the 20th item, and
    old-class accuracy of the model alone and with the arm."""
    cells = []
    for label in result["new_labels"]:
        hit = result["reach_recall_0_6"][arm][label]
        at_20 = next((t for t in result["timeline"] if t["feedback"][label] >= 20), None)
        cells.append(f"`{label}` {'never' if hit is None else hit['feedback']}"
                     + ("" if at_20 is None else f" (at 20: {at_20['recall'][arm][label]:.2f})"))
    met = sum(
        1 for label in result["new_labels"]
        if (hit := result["reach_recall_0_6"][arm][label]) is not None and hit["feedback"] <= 20
    )
    s = result["summary"]
    cost = 100 * (s[arm]["old"] - s["never"]["old"])
    return (f"{result['dataset']} seed {result['options']['seed']} {result['options']['search']}"
            f" [{arm}]: {met} of {len(result['new_labels'])} within 20; " + ", ".join(cells)
            + f"; old classes {s['never']['old']:.4f} -> {s[arm]['old']:.4f} ({cost:+.2f} points)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["hwu64", "banking77"])
    parser.add_argument("--tables-from", nargs="+", type=Path, default=None,
                        help="print the tables of saved results (bench/results/stream-*.json)")
    defaults = StreamOptions()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--arms", nargs="+", default=list(ALL_ARMS), choices=list(ALL_ARMS),
                        help="the ways of serving to run (never is always run)")
    args = parser.parse_args()
    if args.tables_from:
        import json

        for path in args.tables_from:
            print(markdown(json.loads(path.read_text())) + "\n")
        return
    options = StreamOptions(**{k: getattr(args, k) for k in asdict(defaults)})
    import torch

    torch.set_num_threads(1)  # the machine is shared; head training is small
    for name in args.datasets:
        result = run(name, options, tuple(args.arms))
        if set(result["arms"]) == set(ALL_ARMS):
            print(markdown(result), flush=True)
        for arm in ("memory", "both"):
            if arm in result["arms"]:
                print(target_line(result, arm), flush=True)
        print(f"({result['seconds']} s)\n", flush=True)


if __name__ == "__main__":
    main()
