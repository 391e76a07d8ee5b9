"""Training a version from labelled data, end to end, and writing it to the registry.

The recipe: split off a stratified test set (unless one is given) and a validation set; embed
every text once with the frozen pre-trained encoder; search the head's hyperparameters on
validation data; train the head with early stopping; optionally unfreeze the encoder's top layers
gradually at a lower rate; export encoder + head to ONNX and check it against PyTorch; evaluate on
the held-out test set; record everything needed to reproduce and compare the version in its
manifest; commit it atomically and (unless told not to) make it the serving version.

:func:`build_version` is the second half on its own (export → evaluate → commit), shared with
retraining from feedback.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adapters.serving.data import LabelledTexts, require_trainable, stratified_split
from adapters.training.encoder import (
    ENCODER_NAME,
    ENCODER_PACKAGE,
    SentenceEncoder,
    embed_texts,
    encoder_content_hash,
    encoder_package_version,
    load_encoder,
    packaged_encoder_dir,
    save_encoder_weights,
)
from adapters.serving.evaluation import classification_report
from adapters.training.export import (
    OPSET,
    check_head_parity,
    check_parity,
    compose_with_encoder,
    export_onnx,
    sha256_file,
)
from adapters.training.head import (
    ClassifierHead,
    HeadConfig,
    head_probabilities,
    load_head,
    save_head,
    train_head,
)
from adapters.serving.registry import ModelRegistry, ModelVersion, utc_now
from adapters.training.search import SearchOptions, search_head
from adapters.serving.tokenization import DEFAULT_MAX_SEQ_LENGTH, TextTokenizer
from adapters.training.unfreeze import UnfreezeConfig, gradual_unfreeze
from refit.errors import DatasetError

SPLITS = ("train", "validation", "test")
REFERENCE_ROWS = 5000


class Reporter(Protocol):
    """Receives progress: phase changes and events within a phase (epochs, trials, steps)."""

    def phase(self, name: str, detail: str = "") -> None: ...

    def event(self, kind: str, **fields: Any) -> None: ...


class SilentReporter:
    def phase(self, name: str, detail: str = "") -> None:
        pass

    def event(self, kind: str, **fields: Any) -> None:
        pass


@dataclass(frozen=True)
class TrainingOptions:
    seed: int = 0
    head: HeadConfig = field(default_factory=HeadConfig)
    search: SearchOptions = field(default_factory=SearchOptions)
    unfreeze: UnfreezeConfig = field(default_factory=lambda: UnfreezeConfig(layers=0))
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    test_fraction: float = 0.15
    validation_fraction: float = 0.15


@dataclass
class Splits:
    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts

    def items(self) -> list[tuple[str, LabelledTexts]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


@dataclass
class TrainedVersion:
    version: ModelVersion
    promoted: bool
    train_seconds: float

    @property
    def metrics(self) -> dict[str, Any]:
        return self.version.manifest["metrics"]

    def summary(self) -> dict[str, Any]:
        test = self.metrics["test"]
        return {
            "version": self.version.name,
            "promoted": self.promoted,
            "metrics": {
                "accuracy": test["accuracy"],
                "macro_f1": test["macro_f1"],
                "examples": test["examples"],
                "validation_accuracy": self.metrics["validation"]["accuracy"],
                "validation_macro_f1": self.metrics["validation"]["macro_f1"],
            },
            "labels": self.version.labels,
            "train_seconds": round(self.train_seconds, 3),
            "path": str(self.version.path),
        }


def make_splits(
    data: LabelledTexts, test: LabelledTexts | None, options: TrainingOptions, source: str
) -> Splits:
    """Cut train/validation(/test) splits, refusing data that cannot be split."""
    if test is None:
        require_trainable(data, min_per_label=3, source=source)
        rest, test = stratified_split(data, options.test_fraction, options.seed)
    else:
        require_trainable(data, min_per_label=2, source=source)
        unknown = sorted(set(test.labels) - set(data.labels))
        if unknown:
            raise DatasetError(
                f"test data has label(s) absent from the training data: {', '.join(unknown[:5])}"
            )
        rest = data
    # Validation takes its share of the whole, not of what the test split left.
    share = options.validation_fraction / max(1e-9, 1.0 - options.test_fraction)
    train, validation = stratified_split(rest, min(share, 0.5), options.seed + 1)
    return Splits(train, validation, test)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("refit", "torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy",
                 ENCODER_PACKAGE):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def train_version(
    registry: ModelRegistry,
    data: LabelledTexts,
    test: LabelledTexts | None = None,
    options: TrainingOptions | None = None,
    promote: bool = True,
    reporter: Reporter | None = None,
    source: str = "data",
) -> TrainedVersion:
    """Train, export, evaluate and register a new version from labelled data."""
    options = options or TrainingOptions()
    reporter = reporter or SilentReporter()
    started = time.perf_counter()
    splits = make_splits(data, test, options, source)
    labels = splits.train.label_set()
    index = {label: i for i, label in enumerate(labels)}
    y = {name: np.array([index[lab] for lab in part.labels]) for name, part in splits.items()}

    reporter.phase("loading", "encoder")
    encoder = load_encoder()
    tokenizer = TextTokenizer(packaged_encoder_dir() / "tokenizer.json", options.max_seq_length)

    embeddings: dict[str, np.ndarray] = {}
    total = len(data) + (len(test) if test is not None else 0)
    reporter.phase("embedding", f"{total} texts")
    done = 0
    for name, part in splits.items():
        offset = done
        embeddings[name] = embed_texts(
            encoder, tokenizer, part.texts,
            progress=lambda n, _t, offset=offset: reporter.event("embedded", done=offset + n, total=total),
        )
        done += len(part)

    reporter.phase("searching", options.search.strategy)
    search = search_head(
        embeddings["train"], y["train"], embeddings["validation"], y["validation"], len(labels),
        options.head, options.search, options.seed,
        on_trial=lambda _i, n, trial: reporter.event("trial", trials=n, **trial),
    )

    reporter.phase("training", "head")
    trained = train_head(
        embeddings["train"], y["train"], embeddings["validation"], y["validation"], len(labels),
        search.best, options.seed,
        on_epoch=lambda r: reporter.event("epoch", stage="head", **asdict(r)),
    )
    head = trained.head
    fine_tuned_layers = 0
    unfreeze_record: dict[str, Any] | None = None
    if options.unfreeze.layers > 0:
        reporter.phase("fine-tuning", f"top {options.unfreeze.layers} encoder layer(s), gradually")
        result = gradual_unfreeze(
            encoder, tokenizer, splits.train.texts, y["train"], splits.validation.texts,
            y["validation"], len(labels), search.best, options.unfreeze, trained.val_macro_f1,
            options.seed,
            on_epoch=lambda r: reporter.event("unfreeze_epoch", **asdict(r)),
        )
        unfreeze_record = result.to_manifest(options.unfreeze)
        if result.head is None:
            reporter.phase("fine-tuning", "did not beat the head-only model on validation; kept that")
        else:
            head = result.head
            fine_tuned_layers = options.unfreeze.layers
            reporter.phase("embedding", "again, with the fine-tuned encoder")
            embeddings = {
                name: embed_texts(encoder, tokenizer, part.texts) for name, part in splits.items()
            }

    recipe = {
        "seed": options.seed,
        "head": asdict(search.best),
        "head_training": trained.summary(),
        "search": {"strategy": options.search.strategy, **search.to_manifest()},
        "unfreeze": unfreeze_record,
        "splits": {
            "test": "given" if test is not None else f"stratified {options.test_fraction:.0%}",
            "validation": f"stratified {options.validation_fraction:.0%}",
        },
    }
    version = build_version(
        registry,
        encoder=encoder,
        fine_tuned_layers=fine_tuned_layers,
        encoder_weights_from=None,
        head=head,
        labels=labels,
        tokenizer=tokenizer,
        splits=splits,
        embeddings=embeddings,
        training=recipe,
        parent=None,
        data_source=source,
        reporter=reporter,
        started=started,
    )
    promoted = False
    if promote:
        reporter.phase("promoting", version.name)
        registry.promote(version.name)
        promoted = True
    return TrainedVersion(version, promoted, time.perf_counter() - started)


def build_version(
    registry: ModelRegistry,
    *,
    encoder: SentenceEncoder | None,
    fine_tuned_layers: int,
    encoder_weights_from: Path | None,
    head: ClassifierHead,
    labels: list[str],
    tokenizer: TextTokenizer,
    splits: Splits,
    embeddings: dict[str, np.ndarray],
    training: dict[str, Any],
    parent: str | None,
    data_source: str,
    reporter: Reporter,
    started: float,
    extra: dict[str, Any] | None = None,
    encoder_onnx_from: Path | None = None,
) -> ModelVersion:
    """Export, check, evaluate and commit a version; returns it once visible in the registry.

    With ``encoder_onnx_from`` (an earlier version's ``model.onnx`` whose encoder this version
    shares unchanged) the encoder graph is reused and only the head is exported
    (:func:`compose_with_encoder`); ``encoder`` may then be None.

    ``encoder_weights_from`` names a parent version's ``encoder/`` folder to reuse (hard-linked)
    when the encoder is fine-tuned but unchanged by this training; with ``fine_tuned_layers > 0``
    and no such folder the encoder's weights are saved anew.
    """
    index = {label: i for i, label in enumerate(labels)}
    with registry.stage() as staged:
        reporter.phase("exporting", "ONNX")
        onnx_path = staged.path / "model.onnx"
        if encoder_onnx_from is not None:
            compose_with_encoder(encoder_onnx_from, head, onnx_path)
            parity = check_head_parity(head, tokenizer, onnx_path, splits.test.texts)
        else:
            assert encoder is not None
            export_onnx(encoder, head, tokenizer, onnx_path)
            parity = check_parity(encoder, head, tokenizer, onnx_path, splits.test.texts)
        shutil.copyfile(tokenizer.path, staged.path / "tokenizer.json")
        (staged.path / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
        save_head(head, staged.path / "head.npz")
        if encoder_weights_from is not None:
            _link_tree(encoder_weights_from, staged.path / "encoder")
        elif fine_tuned_layers > 0:
            assert encoder is not None
            save_encoder_weights(encoder, staged.path / "encoder")

        reporter.phase("evaluating", f"{len(splits.test)} held-out examples")
        metrics: dict[str, Any] = {}
        probabilities: dict[str, np.ndarray] = {}
        for name in ("validation", "test"):
            part = getattr(splits, name)
            probabilities[name] = head_probabilities(head, embeddings[name])
            y_true = np.array([index[lab] for lab in part.labels])
            metrics[name] = classification_report(
                y_true, probabilities[name].argmax(axis=1), labels
            )

        data_dir = staged.path / "data"
        data_dir.mkdir()
        for name, part in splits.items():
            (data_dir / f"{name}.jsonl").write_text(part.to_jsonl())
        np.savez(
            data_dir / "embeddings.npz",
            **{name: embeddings[name].astype(np.float16) for name, _ in splits.items()},
        )
        _write_reference(staged.path / "reference.npz", splits, embeddings, probabilities)

        encoder_folder = packaged_encoder_dir()
        package_hash = encoder_content_hash(encoder_folder)
        weights_file = staged.path / "encoder" / "model.safetensors"
        manifest = {
            "version": None,
            "parent": parent,
            "created_at": utc_now(),
            "labels": labels,
            "encoder": {
                "name": ENCODER_NAME,
                "package": f"{ENCODER_PACKAGE}=={encoder_package_version()}",
                "sha256": package_hash,
                # Identifies the weights that produced this version's embeddings: embeddings
                # logged under versions with the same id can be reused without re-encoding.
                "id": sha256_file(weights_file) if weights_file.exists() else package_hash,
                "fine_tuned_layers": fine_tuned_layers,
                "weights": "encoder/" if fine_tuned_layers else "package",
                "pooling": "mean",
                "normalized": True,
                "max_seq_length": tokenizer.max_length,
            },
            "training": training,
            "data": {
                "source": data_source,
                **{
                    name: {"rows": len(part), "sha256": part.fingerprint(),
                           "labels": len(part.label_counts())}
                    for name, part in splits.items()
                },
            },
            "metrics": metrics,
            "onnx": {"sha256": sha256_file(onnx_path), "opset": OPSET, "parity": parity},
            "packages": package_versions(),
            "train_seconds": round(time.perf_counter() - started, 3),
            **(extra or {}),
        }
        reporter.phase("registering", str(registry.root))
        return registry.commit(staged, manifest)


def _write_reference(
    path: Path,
    splits: Splits,
    embeddings: dict[str, np.ndarray],
    probabilities: dict[str, np.ndarray],
) -> None:
    """What drift detection compares production traffic with.

    Predicted labels, confidences and text lengths come from the held-out splits (validation and
    test): a model is over-confident on the texts it trained on, so those would make any
    production traffic look drifted. Embeddings come from all the version's data.
    """
    rng = np.random.default_rng(0)
    texts = splits.validation.texts + splits.test.texts
    probs = np.concatenate([probabilities["validation"], probabilities["test"]])
    rows = np.arange(len(texts))
    if len(rows) > REFERENCE_ROWS:
        rows = np.sort(rng.choice(rows, REFERENCE_ROWS, replace=False))
    vectors = np.concatenate([embeddings[name] for name in SPLITS])
    vector_rows = np.arange(len(vectors))
    if len(vector_rows) > REFERENCE_ROWS:
        vector_rows = np.sort(rng.choice(vector_rows, REFERENCE_ROWS, replace=False))
    np.savez(
        path,
        embeddings=vectors[vector_rows].astype(np.float32),
        predicted=probs[rows].argmax(axis=1).astype(np.int32),
        confidence=probs[rows].max(axis=1).astype(np.float32),
        text_length=np.array([len(texts[i]) for i in rows], dtype=np.int32),
    )


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link an immutable folder's files into ``target`` (copy across file systems)."""
    target.mkdir()
    for item in source.iterdir():
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copy2(item, target / item.name)


def version_encoder(version: ModelVersion) -> SentenceEncoder:
    """The PyTorch encoder a version was built with (fine-tuned weights or the package's)."""
    if version.manifest["encoder"].get("fine_tuned_layers", 0) > 0:
        return load_encoder(version.path / "encoder")
    return load_encoder()


def version_head(version: ModelVersion) -> ClassifierHead:
    head = version.manifest["training"]["head"]
    return load_head(version.path / "head.npz", head["hidden_size"], head["dropout"])


def version_data(version: ModelVersion) -> tuple[Splits, dict[str, np.ndarray]]:
    """A version's data splits and their embeddings (by that version's encoder)."""
    from adapters.serving.data import read_jsonl

    folder = version.path / "data"
    splits = Splits(*(read_jsonl(folder / f"{name}.jsonl") for name in SPLITS))
    with np.load(folder / "embeddings.npz") as arrays:
        embeddings = {name: arrays[name].astype(np.float32) for name in SPLITS}
    return splits, embeddings
