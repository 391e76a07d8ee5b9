"""Head-only training and gradual unfreezing against logistic regression, on banking77.

All three see the same splits (validation cut from banking77's train file with refit's seeded
stratified split; banking77's own test file as the test set) and the same frozen embeddings.
Logistic regression (scikit-learn, lbfgs) picks C on the validation split; the C that is best on
the test set is reported too, as the optimistic reference.

    .venv/bin/python bench/train_compare.py [--unfreeze-layers 2] [--skip-unfreeze]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import require_shared, save  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unfreeze-layers", type=int, default=2)
    parser.add_argument("--skip-unfreeze", action="store_true")
    parser.add_argument("--registry", type=Path, default=None)
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from adapters.serving.data import read_jsonl
    from adapters.serving.registry import ModelRegistry
    from adapters.training.pipeline import TrainingOptions, train_version, version_data
    from adapters.training.search import SearchOptions
    from adapters.training.unfreeze import UnfreezeConfig
    from refit.cli import TerminalReporter

    shared = require_shared()
    data = read_jsonl(shared / "banking77" / "train.jsonl")
    test = read_jsonl(shared / "banking77" / "test.jsonl")
    registry = ModelRegistry(args.registry or Path(tempfile.mkdtemp(prefix="bench-registry-")))
    rows: list[dict] = []

    started = time.perf_counter()
    head_only = train_version(
        registry, data, test, TrainingOptions(search=SearchOptions("grid")),
        reporter=TerminalReporter(), source="banking77/train.jsonl",
    )
    head_seconds = time.perf_counter() - started
    m = head_only.version.manifest
    rows.append({
        "method": "refit head-only (grid search, 12 trials)",
        "version": head_only.version.name,
        "accuracy": m["metrics"]["test"]["accuracy"],
        "macro_f1": m["metrics"]["test"]["macro_f1"],
        "train_seconds": round(head_seconds, 1),
        "head": m["training"]["head"],
    })

    # Logistic regression on the very same splits and embeddings.
    splits, embeddings = version_data(head_only.version)
    labels = head_only.version.labels
    index = {label: i for i, label in enumerate(labels)}
    y = {name: np.array([index[label] for label in part.labels]) for name, part in splits.items()}
    fits = []
    for c in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0):
        t0 = time.perf_counter()
        model = LogisticRegression(C=c, max_iter=3000).fit(embeddings["train"], y["train"])
        seconds = time.perf_counter() - t0
        predicted_val = model.predict(embeddings["validation"])
        predicted_test = model.predict(embeddings["test"])
        fits.append({
            "C": c,
            "val_accuracy": float((predicted_val == y["validation"]).mean()),
            "accuracy": float((predicted_test == y["test"]).mean()),
            "macro_f1": float(f1_score(y["test"], predicted_test, average="macro")),
            "fit_seconds": round(seconds, 1),
        })
        print(f"  logistic regression C={c}: {fits[-1]}", file=sys.stderr)
    chosen = max(fits, key=lambda f: f["val_accuracy"])
    best_on_test = max(fits, key=lambda f: f["accuracy"])
    rows.append({"method": f"logistic regression, C={chosen['C']} chosen on validation", **chosen})
    rows.append(
        {
            "method": f"logistic regression, C={best_on_test['C']} best on test (optimistic)",
            **best_on_test,
        }
    )

    if not args.skip_unfreeze:
        started = time.perf_counter()
        tuned = train_version(
            registry,
            data,
            test,
            TrainingOptions(
                search=SearchOptions("grid"), unfreeze=UnfreezeConfig(layers=args.unfreeze_layers)
            ),
            promote=False,
            reporter=TerminalReporter(),
            source="banking77/train.jsonl",
        )
        seconds = time.perf_counter() - started
        m = tuned.version.manifest
        record = m["training"]["unfreeze"]
        rows.append({
            "method": f"refit gradual unfreezing, top {args.unfreeze_layers} layers",
            "version": tuned.version.name,
            "accuracy": m["metrics"]["test"]["accuracy"],
            "macro_f1": m["metrics"]["test"]["macro_f1"],
            "train_seconds": round(seconds, 1),
            "unfreeze_seconds": record["seconds"],
            "kept": record["kept"],
            "val_macro_f1_head_only": record["baseline_val_macro_f1"],
            "val_macro_f1_unfrozen": record["best_val_macro_f1"],
        })

    path = save("train_compare", {"registry": str(registry.root), "rows": rows})
    print("\n| method | test accuracy | test macro-F1 | training seconds |\n|---|---|---|---|")
    for row in rows:
        seconds = row.get("train_seconds", row.get("fit_seconds"))
        print(f"| {row['method']} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | {seconds} |")
    print(f"\nregistry: {registry.root}\nresults: {path}")


if __name__ == "__main__":
    main()
