"""Calibrated confidence (issue 13): expected calibration error before and after, per data set.

    PYTHONPATH=. .venv/bin/python bench/calibration.py [SET ...] [--search grid|none]

For each set (default: banking77, hwu64, their long-tailed subsets and the demo), exactly what
``refit train`` does with its default options, on bench/datasets.py's splits and cached
embeddings: ``adapters.training.pipeline.fit_head`` (the grid search, then the head), then
``adapters.training.calibration.calibrate_head`` (the call ``register_version`` makes: a
temperature fitted on the validation split and folded into the head). ECE is the top-label
expected calibration error with 15 equal-width bins; the test split is never seen by training or
calibration. The issue's target: ECE after calibration <= 0.03 on the test splits of banking77 and
hwu64. Results go to ``bench/results/calibration.json`` and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import save  # noqa: E402
from bench.datasets import Benchmark, load  # noqa: E402

DEFAULT_SETS = ("banking77", "hwu64", "banking77-lt", "hwu64-lt", "demo")
TARGET = 0.03


def fitted_head(b: Benchmark, search: str) -> Any:
    """``refit train``'s head on the benchmark's splits (its default recipe)."""
    from adapters.training.pipeline import (
        EmbeddedSplits,
        EncoderSource,
        HeadRecipe,
        SilentReporter,
        Splits,
        TrainingOptions,
        fit_head,
    )
    from adapters.training.search import SearchOptions

    options = TrainingOptions()
    data = EmbeddedSplits(
        b.labels, Splits(b.train, b.validation, b.test),
        {"train": b.x_train, "validation": b.x_validation, "test": b.x_test},
    )
    recipe = HeadRecipe(options.head, SearchOptions(search), options.seed, options.unfreeze)
    # Head only: the encoder is needed only to fine-tune it, which the default recipe does not.
    source = EncoderSource(tokenizer=None, encoder=None)  # type: ignore[arg-type]
    return fit_head(data, recipe, source, SilentReporter()), data


def run(name: str, search: str) -> dict[str, Any]:
    from adapters.training.calibration import calibrate_head

    b = load(name)
    started = time.perf_counter()
    fitted, data = fitted_head(b, search)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    calibration = calibrate_head(
        fitted.head, b.x_validation, data.y("validation"),
        {split: (data.embeddings[split], data.y(split)) for split in ("validation", "test")},
        held_out_head=fitted.selection_head,
    )
    config = fitted.config
    record = calibration.record
    if name.endswith("-lt"):
        # The long-tailed sets test on the full test file, whose class mix is not the training
        # data's: also measure with test examples weighted back to the training mix.
        from adapters.training.calibration import head_logits, softmax

        y_test = data.y("test")
        train_share = np.bincount(data.y("train"), minlength=len(b.labels)) / len(b.train)
        test_share = np.bincount(y_test, minlength=len(b.labels)) / len(y_test)
        weights = (train_share / np.maximum(test_share, 1e-12))[y_test]
        logits = head_logits(fitted.head, b.x_test)
        record["test_at_training_mix"] = {
            "ece_before": round(weighted_ece(softmax(logits), y_test, weights), 6),
            "ece_after": round(weighted_ece(softmax(logits, calibration.temperature), y_test,
                                            weights), 6),
        }
    return {
        "set": name, "describe": b.describe(),
        "head": f"linear C={config.c:g}" if config.is_linear else f"MLP {config.hidden_size}",
        "fit_seconds": round(fit_seconds, 1),
        "calibration_seconds": round(time.perf_counter() - started, 3),
        **record,
    }


def weighted_ece(probabilities: np.ndarray, y: np.ndarray, weights: np.ndarray,
                 bins: int = 15) -> float:
    """Top-label ECE (as adapters.training.calibration computes it) with example weights."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in np.unique(index):
        m = index == b
        w = weights[m]
        total += abs((w * correct[m]).sum() - (w * confidence[m]).sum())
    return float(total / weights.sum())


HEADER = (
    "| set | head | T | validation ECE before → after | test ECE before → after | "
    "test NLL before → after | test accuracy | test mean confidence | test ECE ≤ 0.03 "
    "| test ECE at the training class mix, before → after |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def line(row: dict[str, Any]) -> str:
    v, t = row["validation"], row["test"]
    mix = row.get("test_at_training_mix")
    mixed = f"{mix['ece_before']:.4f} → {mix['ece_after']:.4f}" if mix else "-"
    return (
        f"| {row['set']} | {row['head']} | {row['temperature']:.3f} "
        f"| {v['ece_before']:.4f} → {v['ece_after']:.4f} "
        f"| {t['ece_before']:.4f} → **{t['ece_after']:.4f}** "
        f"| {t['nll_before']:.3f} → {t['nll_after']:.3f} | {t['accuracy']:.4f} "
        f"| {t['mean_confidence_after']:.4f} | {'yes' if t['ece_after'] <= TARGET else 'no'} "
        f"| {mixed} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sets", nargs="*", default=list(DEFAULT_SETS))
    parser.add_argument("--search", choices=("grid", "none"), default="grid",
                        help="the head's search (default grid, as `refit train`)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the machine is shared; head training is small
    rows = []
    for name in args.sets:
        row = run(name, args.search)
        rows.append(row)
        print(line(row), f"  ({row['fit_seconds']:.0f}s)", flush=True)
        save("calibration" + ("" if args.search == "grid" else f"-{args.search}"),
             {"search": args.search, "rows": rows})
    print()
    print(HEADER)
    print("\n".join(line(r) for r in rows))


if __name__ == "__main__":
    main()
