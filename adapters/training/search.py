"""Hyperparameter search for the head: grid or random, scored on validation data.

Trials vary the learning rate, weight decay and hidden size. Each is scored by macro-F1 on the
validation split, or, when the data is small (fewer examples than ``kfold_below``), by the mean
over stratified k-fold cross-validation, which is far less noisy there. Every trial is recorded.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from adapters.serving.data import stratified_folds
from adapters.training.head import HeadConfig, train_head

SearchStrategy = Literal["none", "grid", "random"]
SEARCH_STRATEGIES: tuple[str, ...] = ("none", "grid", "random")

GRID: dict[str, list[Any]] = {
    "learning_rate": [3e-4, 1e-3, 3e-3],
    "weight_decay": [1e-3, 1e-1],
    "hidden_size": [0, 512],
}


@dataclass(frozen=True)
class SearchOptions:
    strategy: SearchStrategy = "grid"
    random_trials: int = 12
    kfold_below: int = 2000
    """Below this many examples (train + validation), trials are scored by k-fold CV."""
    folds: int = 5


@dataclass
class SearchResult:
    best: HeadConfig
    scoring: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_manifest(self) -> dict[str, Any]:
        return {
            "scoring": self.scoring,
            "best": asdict(self.best),
            "trials": self.trials,
            "seconds": round(self.seconds, 3),
        }


TrialCallback = Callable[[int, int, dict[str, Any]], None]


def candidate_configs(base: HeadConfig, options: SearchOptions, seed: int) -> list[HeadConfig]:
    if options.strategy == "none":
        return [base]
    if options.strategy == "grid":
        keys = list(GRID)
        return [
            base.with_overrides(**dict(zip(keys, values)))
            for values in itertools.product(*(GRID[k] for k in keys))
        ]
    rng = np.random.default_rng(seed)
    return [
        base.with_overrides(
            learning_rate=float(10 ** rng.uniform(-4, -2)),
            weight_decay=float(10 ** rng.uniform(-5, -1)),
            hidden_size=int(rng.choice([0, 256, 512, 1024])),
        )
        for _ in range(options.random_trials)
    ]


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
    started = time.perf_counter()
    configs = candidate_configs(base, options, seed)
    pooled_x = np.concatenate([x_train, x_val])
    pooled_y = np.concatenate([y_train, y_val])
    counts = np.bincount(pooled_y)
    smallest_class = int(counts[counts > 0].min())
    folds = min(options.folds, smallest_class)
    use_cv = len(configs) > 1 and len(pooled_y) < options.kfold_below and folds >= 2
    scoring = (
        f"mean validation macro-F1 over stratified {folds}-fold cross-validation"
        if use_cv
        else "validation macro-F1"
    )
    trials: list[dict[str, Any]] = []
    best_index, best_score = 0, -1.0
    for index, config in enumerate(configs):
        if len(configs) == 1:
            # Nothing to choose between: the final training reports the validation score.
            trials.append({"trial": 1, "params": _params(config), "score": None})
            break
        trial_started = time.perf_counter()
        if use_cv:
            fold_scores, epochs = _cross_validate(pooled_x, pooled_y, num_classes, config, folds, seed)
            score = float(np.mean(fold_scores))
            record = {"fold_scores": [round(s, 6) for s in fold_scores], "best_epochs": epochs}
        else:
            trained = train_head(x_train, y_train, x_val, y_val, num_classes, config, seed)
            score = trained.val_macro_f1
            record = {"best_epoch": trained.best_epoch, "val_accuracy": round(trained.val_accuracy, 6)}
        trial = {
            "trial": index + 1,
            "params": _params(config),
            "score": round(score, 6),
            **record,
            "seconds": round(time.perf_counter() - trial_started, 3),
        }
        trials.append(trial)
        if score > best_score + 1e-9:
            best_index, best_score = index, score
        if on_trial is not None:
            on_trial(index + 1, len(configs), trial)
    return SearchResult(configs[best_index], scoring, trials, time.perf_counter() - started)


def _params(config: HeadConfig) -> dict[str, Any]:
    return {
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "hidden_size": config.hidden_size,
        "dropout": config.dropout,
    }


def _cross_validate(
    x: np.ndarray, y: np.ndarray, num_classes: int, config: HeadConfig, k: int, seed: int
) -> tuple[list[float], list[int]]:
    folds = stratified_folds([str(v) for v in y], k, seed)
    scores: list[float] = []
    epochs: list[int] = []
    for fold in folds:
        train_mask = np.ones(len(y), dtype=bool)
        train_mask[fold] = False
        trained = train_head(x[train_mask], y[train_mask], x[fold], y[fold], num_classes, config, seed)
        scores.append(trained.val_macro_f1)
        epochs.append(trained.best_epoch)
    return scores, epochs
