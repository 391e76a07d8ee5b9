"""refit's default head recipe against logistic regression, on every evaluation set (issue 9).

    PYTHONPATH=. .venv/bin/python bench/recipe_compare.py [SET ...] [--flip 0.05]

For each set (default: all of ``bench/datasets.py``), both sides see the same splits and the same
cached frozen-encoder embeddings:

- **head**: exactly what ``refit train`` does with its default options: ``search_head`` with the
  default ``HeadConfig``/``SearchOptions`` and seed, then ``train_head`` with the chosen config on
  the training split, validated on the validation split.
- **LR**: scikit-learn ``LogisticRegression`` (lbfgs, ``max_iter=5000``) on the raw embeddings,
  fitted on the training split for every C in 0.01 … 1000 (half-decades) and picked by validation
  accuracy (ties go to the smaller C); the C picked by validation macro-F1 is reported too, with
  its test scores.

Both are scored on the test split; the margins are head − LR. ``--flip F`` relabels a fraction F
of the training and validation rows (a uniformly random other label, seeded) to check that a few
wrong labels do not make the recipe collapse; the test split stays clean. Sets with fewer than two
labels are skipped with a note (nlupp-hotels has one intent with 15 single-intent rows).
Results go to ``bench/results/recipe_compare[-flipF].json`` and a markdown table to stdout.
Seconds are wall time on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import save  # noqa: E402
from bench.datasets import NAMES, Benchmark, load  # noqa: E402

LR_C_GRID = tuple(float(f"{10.0 ** (k / 2):.4g}") for k in range(-4, 7))


def flip_labels(y: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """A copy of ``y`` with ``fraction`` of its entries moved to a random *other* class."""
    rng = np.random.default_rng(seed)
    flipped = y.copy()
    chosen = rng.choice(len(y), round(fraction * len(y)), replace=False)
    shift = rng.integers(1, num_classes, len(chosen))
    flipped[chosen] = (y[chosen] + shift) % num_classes
    return flipped


def scores(y: np.ndarray, predicted: np.ndarray, num_classes: int) -> tuple[float, float]:
    from adapters.serving.evaluation import macro_f1

    return float((predicted == y).mean()), macro_f1(y, predicted, num_classes)


def run_head(b: Benchmark, y_train: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
    from adapters.training.head import head_probabilities, train_head
    from adapters.training.pipeline import TrainingOptions
    from adapters.training.search import search_head

    options = TrainingOptions()  # what `refit train` uses unless told otherwise
    k = len(b.labels)
    started = time.perf_counter()
    search = search_head(b.x_train, y_train, b.x_validation, y_val, k, options.head,
                         options.search, options.seed)
    trained = train_head(b.x_train, y_train, b.x_validation, y_val, k, search.best, options.seed)
    seconds = time.perf_counter() - started
    predicted = head_probabilities(trained.head, b.x_test).argmax(axis=1)
    accuracy, f1 = scores(b.y("test"), predicted, k)
    best = search.best
    chosen = (f"linear C={best.c:g}" if best.is_linear else f"MLP {best.hidden_size}") + (
        f", weights^{best.class_weight_power:g}" if best.class_weight_power else ", unweighted")
    return {"accuracy": accuracy, "macro_f1": f1, "config": chosen, "scoring": search.scoring,
            "search_seconds": round(search.seconds, 1), "seconds": round(seconds, 1),
            "trials": len(search.trials), "converged": trained.converged}


def run_lr(b: Benchmark, y_train: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    k = len(b.labels)
    started = time.perf_counter()
    fits = []
    for c in LR_C_GRID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=c, max_iter=5000).fit(b.x_train, y_train)
        val = scores(y_val, model.predict(b.x_validation), k)
        test = scores(b.y("test"), model.predict(b.x_test), k)
        fits.append({"c": c, "val": val, "test": test})
    seconds = time.perf_counter() - started
    by_accuracy = max(range(len(fits)), key=lambda i: (fits[i]["val"][0], -i))
    by_f1 = max(range(len(fits)), key=lambda i: (fits[i]["val"][1], -i))
    return {
        "accuracy": fits[by_accuracy]["test"][0], "macro_f1": fits[by_accuracy]["test"][1],
        "c": fits[by_accuracy]["c"],
        "c_by_macro_f1": fits[by_f1]["c"],
        "by_macro_f1": {"accuracy": fits[by_f1]["test"][0], "macro_f1": fits[by_f1]["test"][1]},
        "seconds": round(seconds, 1),
        "fits": fits,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sets", nargs="*", default=list(NAMES))
    parser.add_argument("--flip", type=float, default=0.0,
                        help="fraction of training+validation labels to flip (default 0)")
    args = parser.parse_args()

    suffix = f"-flip{args.flip:g}" if args.flip else ""
    rows: list[dict[str, Any]] = []
    path = None
    for name in args.sets:
        b = load(name)
        k = len(b.labels)
        if k < 2:
            print(f"skipped {name}: {k} label(s) after its filtering; nothing to classify",
                  flush=True)
            rows.append({"set": name, "skipped": f"{k} label(s)"})
            continue
        y_train, y_val = b.y("train"), b.y("validation")
        if args.flip:
            y_train = flip_labels(y_train, k, args.flip, seed=1)
            y_val = flip_labels(y_val, k, args.flip, seed=2)
        head = run_head(b, y_train, y_val)
        lr = run_lr(b, y_train, y_val)
        row = {"set": name, "describe": b.describe(), "head": head, "lr": lr,
               "margin_accuracy": head["accuracy"] - lr["accuracy"],
               "margin_macro_f1": head["macro_f1"] - lr["macro_f1"]}
        rows.append(row)
        print(line(row), f"\n    head's search: {head['scoring']}", flush=True)
        path = save(f"recipe_compare{suffix}", {"flip": args.flip, "rows": rows})
    print()
    print(table(rows))
    print(f"\nsaved {path}")


HEADER = (
    "| set | head acc | head macro-F1 | LR acc | LR macro-F1 | Δ acc | Δ macro-F1 | LR C (val acc) "
    "| LR C (val macro-F1): test acc / F1 | head's choice | head s | LR s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def line(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"| {row['set']} | skipped: {row['skipped']} |" + " |" * 10
    h, lr = row["head"], row["lr"]
    by_f1 = lr["by_macro_f1"]
    other = ("same" if lr["c_by_macro_f1"] == lr["c"] else
             f"{lr['c_by_macro_f1']:g}: {by_f1['accuracy']:.4f} / {by_f1['macro_f1']:.4f}")
    return (
        f"| {row['set']} | {h['accuracy']:.4f} | {h['macro_f1']:.4f} | {lr['accuracy']:.4f} "
        f"| {lr['macro_f1']:.4f} | {row['margin_accuracy']:+.4f} | {row['margin_macro_f1']:+.4f} "
        f"| {lr['c']:g} | {other} | {h['config']} | {h['seconds']:.0f} | {lr['seconds']:.0f} |"
    )


def table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([HEADER] + [line(r) for r in rows])


if __name__ == "__main__":
    main()
