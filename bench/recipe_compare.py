"""refit's default head recipe against logistic regression, on every evaluation set (issue 9).

    PYTHONPATH=. .venv/bin/python bench/recipe_compare.py [SET ...] [--flip 0.05] [--split-seed N]

For each set (default: all of ``bench/datasets.py``), both sides see the same splits and the same
cached frozen-encoder embeddings:

- **head**: exactly what ``refit train`` does with its default options: ``fit_head`` (the one
  path of ``refit train`` and of retraining) with ``TrainingOptions().head_recipe()``: the search
  on validation, the selection fit on the training split, then the final fit of the chosen
  configuration on training + validation.
- **LR**: scikit-learn ``LogisticRegression`` (lbfgs, ``max_iter=5000``) on the raw embeddings,
  fitted on the training split for every C in 0.01 … 1000 (half-decades) and picked by validation
  accuracy (ties go to the smaller C); the C picked by validation macro-F1 is reported too, with
  its test scores, and so is the validation-picked C refitted on training + validation (not the
  target's baseline: shown because the head's final fit sees validation too).

Both are scored on the test split; the margins are head − LR. ``--flip F`` relabels a fraction F
of the training and validation rows (a uniformly random other label, seeded) to check that a few
wrong labels do not make the recipe collapse; the test split stays clean. ``--split-seed N`` cuts
another validation split from the same training rows (``bench/datasets.py: splits``; NLU++ keeps
its source folds), to see how much one cut decides. Sets with fewer than two
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
    """What `refit train` does with its default options: ``fit_head`` with the default recipe."""
    from adapters.serving.data import LabelledTexts
    from adapters.serving.tokenization import TextTokenizer
    from adapters.training.encoder import packaged_encoder_dir
    from adapters.training.head import head_probabilities
    from adapters.training.pipeline import (
        EmbeddedSplits,
        EncoderSource,
        SilentReporter,
        Splits,
        TrainingOptions,
        fit_head,
    )

    options = TrainingOptions()  # what `refit train` uses unless told otherwise
    labels = b.labels
    k = len(labels)

    def relabelled(part: LabelledTexts, y: np.ndarray) -> LabelledTexts:
        return LabelledTexts.of(part.texts, [labels[i] for i in y])  # --flip changes y

    data = EmbeddedSplits(
        labels,
        Splits(relabelled(b.train, y_train), relabelled(b.validation, y_val), b.test),
        {"train": b.x_train, "validation": b.x_validation, "test": b.x_test},
    )
    source = EncoderSource(
        tokenizer=TextTokenizer(packaged_encoder_dir() / "tokenizer.json",
                                options.max_seq_length),
        encoder=None,  # head-only: the embeddings are given
    )
    started = time.perf_counter()
    fitted = fit_head(data, options.head_recipe(), source, SilentReporter())
    seconds = time.perf_counter() - started
    predicted = head_probabilities(fitted.head, b.x_test).argmax(axis=1)
    accuracy, f1 = scores(b.y("test"), predicted, k)
    best = fitted.config
    chosen = (f"linear C={best.c:g}" if best.is_linear else f"MLP {best.hidden_size}") + (
        f", weights^{best.class_weight_power:g}" if best.class_weight_power else ", unweighted") + (
        f", prior τ={best.prior_correction:g}" if best.prior_correction else "")
    search = fitted.search
    final = fitted.final_fit or {}
    return {"accuracy": accuracy, "macro_f1": f1, "config": chosen, "scoring": search["scoring"],
            "search_seconds": round(search["seconds"], 1), "seconds": round(seconds, 1),
            "trials": len(search["trials"]), "converged": fitted.trained.converged,
            "final_fit": final.get("data", "train"),
            "prior_correction": search.get("prior_correction"),
            "selection_val": {"accuracy": fitted.trained.val_accuracy,
                              "macro_f1": fitted.trained.val_macro_f1}}


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
    # Not the target's baseline; shown because the head's final fit sees validation too: the
    # validation-picked C refitted on train + validation.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pooled = LogisticRegression(C=fits[by_accuracy]["c"], max_iter=5000).fit(
            np.concatenate([b.x_train, b.x_validation]), np.concatenate([y_train, y_val]))
    pooled_test = scores(b.y("test"), pooled.predict(b.x_test), k)
    return {
        "accuracy": fits[by_accuracy]["test"][0], "macro_f1": fits[by_accuracy]["test"][1],
        "c": fits[by_accuracy]["c"],
        "c_by_macro_f1": fits[by_f1]["c"],
        "by_macro_f1": {"accuracy": fits[by_f1]["test"][0], "macro_f1": fits[by_f1]["test"][1]},
        "refit_train_validation": {"accuracy": pooled_test[0], "macro_f1": pooled_test[1]},
        "seconds": round(seconds, 1),
        "fits": fits,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sets", nargs="*", default=list(NAMES))
    parser.add_argument("--flip", type=float, default=0.0,
                        help="fraction of training+validation labels to flip (default 0)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="another validation cut of the same rows (default 0: the standard)")
    parser.add_argument("--out", default="",
                        help="results name under bench/results (default recipe_compare[-flipF])")
    args = parser.parse_args()

    suffix = (f"-flip{args.flip:g}" if args.flip else "") + (
        f"-split{args.split_seed}" if args.split_seed else "")
    rows: list[dict[str, Any]] = []
    path = None
    for name in args.sets:
        b = load(name, args.split_seed)
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
        path = save(args.out or f"recipe_compare{suffix}",
                    {"flip": args.flip, "split_seed": args.split_seed, "rows": rows})
    print()
    print(table(rows))
    print(f"\nsaved {path}")


HEADER = (
    "| set | head acc | head macro-F1 | LR acc | LR macro-F1 | Δ acc | Δ macro-F1 | LR C (val acc) "
    "| LR C (val macro-F1): test acc / F1 | LR refit on train+val: test acc / F1 "
    "| head's choice | head s | LR s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def line(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"| {row['set']} | skipped: {row['skipped']} |" + " |" * 11
    h, lr = row["head"], row["lr"]
    by_f1, pooled = lr["by_macro_f1"], lr["refit_train_validation"]
    other = ("same" if lr["c_by_macro_f1"] == lr["c"] else
             f"{lr['c_by_macro_f1']:g}: {by_f1['accuracy']:.4f} / {by_f1['macro_f1']:.4f}")
    return (
        f"| {row['set']} | {h['accuracy']:.4f} | {h['macro_f1']:.4f} | {lr['accuracy']:.4f} "
        f"| {lr['macro_f1']:.4f} | {row['margin_accuracy']:+.4f} | {row['margin_macro_f1']:+.4f} "
        f"| {lr['c']:g} | {other} | {pooled['accuracy']:.4f} / {pooled['macro_f1']:.4f} "
        f"| {h['config']} | {h['seconds']:.0f} | {lr['seconds']:.0f} |"
    )


def table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([HEADER] + [line(r) for r in rows])


if __name__ == "__main__":
    main()
