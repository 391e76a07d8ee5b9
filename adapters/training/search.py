"""Hyperparameter search for the head: grid or random, scored on validation data.

The default grid asks the questions that decide quality on real data, each answered by validation
data rather than fixed in advance:

- how hard to fit: the linear head's ``C`` over 0.01 … 1000 in half-decades (the range a
  logistic regression's C is usually picked from, so the family contains what it would fit);
- whether to correct for uneven classes: loss weights ``count ** -power`` with power 0 (none),
  0.5 or 1 (inverse frequency). Weighting helps rare classes on some data and over-predicts them
  on other data, so it is never always on;
- whether a hidden layer helps: one MLP head per weighting power, only with
  ``SearchOptions(mlp=True)`` (the random search also draws MLPs). It is off by default: its
  trials took over half of the search's time, and on the evaluation sets of
  ``bench/datasets.py`` it never paid: where an MLP cleared the bar below (banking77-lt), a
  weighted linear head cleared it too and scored higher on test; where it was chosen on hwu64
  (by more than one standard error, the earlier bar) it lost on test (BENCHMARKS.md, issue 9).

Each trial is scored by :func:`adapters.training.head.selection_score` (the mean of accuracy and
macro-F1) on the validation split, or, when the data is small (fewer examples than
``kfold_below``), by its mean over stratified k-fold cross-validation on train + validation, which
is far less noisy there. Ties go to the lower validation loss. Every trial is recorded.

The simplest candidates, unweighted linear heads, are plain logistic regression. A more complex
choice (class weighting or a hidden layer) is taken only when its validation advantage over the
best plain one exceeds two standard errors of the difference (``SearchOptions.complex_bar``),
estimated by a paired bootstrap over the validation examples. Otherwise a difference of a few
validation examples decides, and on data where the extra freedom does not help it loses about as
often as it wins: with a bar of one standard error, an MLP won on hwu64's validation split and
lost on its test split (BENCHMARKS.md, issue 9).

The search only chooses; :func:`adapters.training.pipeline.fit_head` then chooses the prior
correction's strength on the chosen trial's held-out predictions (``SearchResult.held_out``: the
validation split, or every row out-of-fold under cross-validation; :mod:`adapters.training.prior`),
fits the chosen configuration on train alone (its validation scores are the ones reported) and
again on train + validation for the served head.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from adapters.serving.data import stratified_folds
from adapters.serving.evaluation import macro_f1
from adapters.training.head import (
    ClassifierHead,
    HeadConfig,
    TrainedHead,
    head_log_probabilities,
    selection_score,
    train_head,
)
from adapters.training.prior import HeldOut

SearchStrategy = Literal["none", "grid", "random"]

C_GRID: tuple[float, ...] = tuple(float(f"{10.0 ** (k / 2):.4g}") for k in range(-4, 7))
"""0.01, 0.0316, 0.1, … 1000: inverse L2 strengths tried for the linear head."""
CLASS_WEIGHT_POWERS: tuple[float, ...] = (0.0, 0.5, 1.0)
MLP_GRID: tuple[dict[str, Any], ...] = (
    {"hidden_size": 512, "learning_rate": 1e-3, "weight_decay": 1e-2},
)
"""MLP candidates of ``SearchOptions(mlp=True)``, each tried with every class-weighting power."""
BOOTSTRAP_RESAMPLES = 200


@dataclass(frozen=True)
class SearchOptions:
    strategy: SearchStrategy = "grid"
    random_trials: int = 12
    kfold_below: int = 2000
    """Below this many examples (train + validation), trials are scored by k-fold CV."""
    folds: int = 5
    mlp: bool = False
    """The grid also tries the MLP heads of :data:`MLP_GRID`."""
    complex_bar: float = 2.0
    """A complex choice (class weighting or a hidden layer) replaces the best plain logistic
    regression only if its score is higher by more than this many bootstrap standard errors of
    the paired difference."""


@dataclass
class SearchResult:
    best: HeadConfig
    scoring: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    held_out: HeldOut | None = None
    """The chosen trial's held-out (validation or out-of-fold) log-probabilities: what the prior
    correction's strength is chosen on (:mod:`adapters.training.prior`)."""

    def to_manifest(self) -> dict[str, Any]:
        return {
            "scoring": self.scoring,
            "best": asdict(self.best),
            "trials": self.trials,
            "seconds": round(self.seconds, 3),
        }


TrialCallback = Callable[[int, int, dict[str, Any]], None]


def candidate_configs(base: HeadConfig, options: SearchOptions, seed: int) -> list[HeadConfig]:
    """The configurations a search tries, in order.

    Linear candidates come in runs of increasing ``C`` at one weighting power, so each fit can
    start from the previous one's solution (a few iterations instead of dozens).
    """
    if options.strategy == "none":
        return [base]
    if options.strategy == "grid":
        linear = [
            base.with_overrides(hidden_size=0, c=c, class_weight_power=power)
            for power in CLASS_WEIGHT_POWERS
            for c in C_GRID
        ]
        mlp = [
            base.with_overrides(**params, class_weight_power=power)
            for params in MLP_GRID
            for power in CLASS_WEIGHT_POWERS
        ]
        return linear + mlp if options.mlp else linear
    rng = np.random.default_rng(seed)
    configs: list[HeadConfig] = []
    for _ in range(options.random_trials):
        power = float(rng.choice(CLASS_WEIGHT_POWERS))
        if rng.random() < 0.75:
            configs.append(base.with_overrides(
                hidden_size=0, c=float(10 ** rng.uniform(-2, 3)), class_weight_power=power))
        else:
            configs.append(base.with_overrides(
                hidden_size=int(rng.choice([256, 512, 1024])),
                learning_rate=float(10 ** rng.uniform(-4, -2)),
                weight_decay=float(10 ** rng.uniform(-5, -1)),
                class_weight_power=power,
            ))
    # Same order as the grid: linear runs by power and increasing C, then the MLPs.
    return sorted(configs, key=lambda c: (not c.is_linear, c.class_weight_power, c.c))


def search_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    base: HeadConfig,
    options: SearchOptions,
    seed: int,
    on_trial: TrialCallback | None = None,
) -> SearchResult:
    """Try every candidate configuration; return the best by validation (or k-fold) score."""
    started = time.perf_counter()
    configs = candidate_configs(base, options, seed)
    if len(configs) == 1:
        # Nothing to choose between: the final training reports the validation score.
        only_trial = {"trial": 1, "params": trial_params(configs[0]), "score": None}
        return SearchResult(configs[0], "none (one configuration)", [only_trial],
                            time.perf_counter() - started)
    pooled_x = np.concatenate([x_train, x_val])
    pooled_y = np.concatenate([y_train, y_val])
    counts = np.bincount(pooled_y)
    smallest_class = int(counts[counts > 0].min())
    folds = min(options.folds, smallest_class)
    use_cv = len(pooled_y) < options.kfold_below and folds >= 2
    measure = "mean of accuracy and macro-F1"
    if use_cv:
        scoring = f"{measure}, averaged over stratified {folds}-fold cross-validation"
        splits = [
            (np.setdiff1d(np.arange(len(pooled_y)), fold), np.asarray(fold))
            for fold in stratified_folds([str(v) for v in pooled_y], folds, seed)
        ]
        parts = [(pooled_x[tr], pooled_y[tr], pooled_x[va], pooled_y[va]) for tr, va in splits]
    else:
        scoring = f"validation {measure}"
        parts = [(x_train, y_train, x_val, y_val)]

    # The last linear head fitted per (part, weighting power): the next, larger C starts there.
    previous: dict[tuple[int, float], tuple[float, ClassifierHead]] = {}
    identity = list(range(num_classes))
    y_checked = np.concatenate([part[3] for part in parts])
    log_probabilities: list[list[np.ndarray]] = []  # per trial, per part
    trials: list[dict[str, Any]] = []
    for index, config in enumerate(configs):
        trial_started = time.perf_counter()
        results: list[TrainedHead] = []
        for part_index, (xt, yt, xv, yv) in enumerate(parts):
            warm = None
            key = (part_index, config.class_weight_power)
            if config.is_linear and key in previous and previous[key][0] <= config.c:
                warm = (previous[key][1], identity)
            trained = train_head(xt, yt, xv, yv, num_classes, config, seed, warm_start=warm)
            if config.is_linear:
                previous[key] = (config.c, trained.head)
            results.append(trained)
        log_probabilities.append([head_log_probabilities(r.head, part[2])
                                  for r, part in zip(results, parts, strict=True)])
        accuracy = float(np.mean([r.val_accuracy for r in results]))
        f1 = float(np.mean([r.val_macro_f1 for r in results]))
        loss = float(np.mean([r.val_loss for r in results]))
        score = selection_score(accuracy, f1)
        trial: dict[str, Any] = {
            "trial": index + 1,
            "params": trial_params(config),
            "score": round(score, 6),
            "val_accuracy": round(accuracy, 6),
            "val_macro_f1": round(f1, 6),
            "val_loss": round(loss, 6),
        }
        if use_cv:
            trial["fold_scores"] = [round(r.val_score, 6) for r in results]
        trial["iterations" if config.is_linear else "best_epochs"] = [r.best_epoch for r in results]
        trial["seconds"] = round(time.perf_counter() - trial_started, 3)
        trials.append(trial)
        if on_trial is not None:
            on_trial(index + 1, len(configs), trial)
    predictions = [np.concatenate([p.argmax(axis=1) for p in trial]) for trial in log_probabilities]
    chosen, reason = choose_trial(configs, trials, predictions, y_checked, num_classes, seed,
                                  options.complex_bar)
    scoring += f"; {reason}"
    # Each held-out row's model was trained on its part's rows: the prior correction needs their
    # class counts.
    held_out = HeldOut.of_parts(
        [(log_p, part[3], part[1]) for log_p, part in zip(log_probabilities[chosen], parts,
                                                          strict=True)], num_classes)
    return SearchResult(configs[chosen], scoring, trials, time.perf_counter() - started, held_out)


def choose_trial(
    configs: list[HeadConfig],
    trials: list[dict[str, Any]],
    predictions: list[np.ndarray],
    y: np.ndarray,
    num_classes: int,
    seed: int,
    bar: float,
) -> tuple[int, str]:
    """The chosen trial's index and why: the best plain (unweighted linear) trial unless the best
    of all beats it by more than ``bar`` bootstrap standard errors (see the module docstring).

    ``trials[i]`` needs ``score`` and ``val_loss``; ``predictions[i]`` are trial ``i``'s predicted
    classes for the checked examples ``y``.
    """

    def rank(i: int) -> tuple[float, float]:
        # Scores are discrete (counts of right answers); the validation loss breaks their ties.
        return (round(trials[i]["score"], 9), -trials[i]["val_loss"])

    everything = range(len(configs))
    best = max(everything, key=rank)
    plain = [i for i in everything if configs[i].is_linear and configs[i].class_weight_power == 0]
    if not plain or best in plain:
        return best, "best score"
    reference = max(plain, key=rank)
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        sample = rng.integers(0, len(y), len(y))
        differences.append(
            _score(y[sample], predictions[best][sample], num_classes)
            - _score(y[sample], predictions[reference][sample], num_classes)
        )
    observed = (_score(y, predictions[best], num_classes)
                - _score(y, predictions[reference], num_classes))
    error = float(np.std(differences))
    verdict = (f"trial {best + 1} against plain trial {reference + 1}: {observed:+.4f}, "
               f"needs > {bar:g} s.e. = {bar * error:.4f}")
    if observed > bar * error:
        return best, f"best score; {verdict}"
    return reference, f"best plain logistic regression; {verdict}"


def _score(y: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    return selection_score(float((predicted == y).mean()), macro_f1(y, predicted, num_classes))


def trial_params(config: HeadConfig) -> dict[str, Any]:
    """What a trial record shows of its configuration."""
    return {
        "hidden_size": config.hidden_size,
        "c": config.c,
        "class_weight_power": config.class_weight_power,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "dropout": config.dropout,
    }
