"""Training a version from labelled data, end to end, and writing it to the registry.

The recipe: split off a stratified test set (unless one is given) and a validation set; embed
every text once with the frozen pre-trained encoder; search the head's hyperparameters on
validation data; train the chosen head on the training split (its validation scores are the ones
reported), then once more on training + validation for the head that is served; optionally
unfreeze the encoder's top layers gradually at a lower rate; export encoder + head to ONNX and
check it against PyTorch; evaluate on the held-out test set; record everything needed to
reproduce and compare the version in its manifest; commit it atomically and (unless told not to)
make it the serving version.

``refit train`` (:func:`train_version`) and retraining from feedback
(:mod:`adapters.training.retrain`) share the two halves: :func:`fit_head` (search → train →
final fit → unfreeze, described by a :class:`HeadRecipe`) and :func:`register_version` (export →
check → evaluate → commit). They differ only in where the data and the encoder come from.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adapters.serving.data import LabelledTexts, require_trainable, stratified_split
from adapters.serving.evaluation import classification_report
from adapters.serving.registry import ModelRegistry, ModelVersion, utc_now
from adapters.serving.tokenization import DEFAULT_MAX_SEQ_LENGTH, TextTokenizer
from adapters.serving.variants import INT8_FILE, Int8Gate
from adapters.training.calibration import calibrate_head, fold_temperature
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
    TrainedHead,
    correct_for_prior,
    head_log_probabilities,
    head_probabilities,
    load_head,
    save_head,
    train_head,
)
from adapters.training.prior import HeldOut, choose_strength
from adapters.training.quantize import METHOD as INT8_METHOD
from adapters.training.quantize import EncodedTest, Probe, check_int8, write_int8
from adapters.training.search import SearchOptions, choose_trial, search_head
from adapters.training.unfreeze import UnfreezeConfig, gradual_unfreeze
from refit.errors import DatasetError

SPLITS = ("train", "validation", "test")
REFERENCE_ROWS = 5000
LARGE_BATCH = 512


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
    int8_gate: Int8Gate = field(default_factory=Int8Gate)
    """Thresholds the int8 model's check is judged by (``REFIT_INT8_*`` settings)."""

    def head_recipe(self) -> HeadRecipe:
        """How ``refit train`` fits the head with these options (``bench/recipe_compare.py``
        calls the same)."""
        return HeadRecipe(self.head, self.search, self.seed, self.unfreeze)


@dataclass
class Splits:
    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts

    def items(self) -> list[tuple[str, LabelledTexts]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


@dataclass
class EmbeddedSplits:
    """The splits a head is fitted and judged on, their embeddings, and the class order."""

    labels: list[str]
    splits: Splits
    embeddings: dict[str, np.ndarray]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def y(self, name: str) -> np.ndarray:
        """Class indices of split ``name``."""
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array(
            [index[label] for label in getattr(self.splits, name).labels], dtype=np.int64
        )


@dataclass(frozen=True)
class WarmStart:
    """An earlier head to start from: its weights, and each of its classes' index here."""

    head: ClassifierHead
    hidden_size: int
    class_map: list[int]
    version: str
    patience: int = 8
    """A warm head needs less patience than one trained from scratch."""


@dataclass(frozen=True)
class HeadRecipe:
    """How to fit a head: starting configuration, search, seed, warm start, unfreezing."""

    config: HeadConfig = field(default_factory=HeadConfig)
    search: SearchOptions = field(default_factory=SearchOptions)
    seed: int = 0
    unfreeze: UnfreezeConfig = field(default_factory=lambda: UnfreezeConfig(layers=0))
    warm_start: WarmStart | None = None
    """Used only when the chosen configuration has the warm head's architecture."""
    large_batch_from: int | None = None
    """From this many training examples on, train with batches of :data:`LARGE_BATCH`."""
    choose_class_weighting: bool = False
    """Without a search, train with and without class weighting and choose on validation by the
    search's rule (weighting only if it clears ``search.complex_bar``; a search chooses it among
    its other hyperparameters)."""
    choose_prior_correction: bool = True
    """Choose the strength of the prior correction (logit adjustment) on held-out data and fold
    it into the head (:mod:`adapters.training.prior`); otherwise ``config.prior_correction`` is
    applied as given."""
    final_fit_on_validation: bool = True
    """Once validation has chosen the configuration (and, for an MLP, the epoch count), fit the
    served head again on train + validation. The test split is never trained on."""


@dataclass(frozen=True)
class EncoderSource:
    """Where a version's encoder comes from, and how it is exported."""

    tokenizer: TextTokenizer
    encoder: SentenceEncoder | None
    """The PyTorch encoder; needed to export the encoder graph anew or to fine-tune it."""
    onnx_from: Path | None = None
    """An earlier version's ``model.onnx`` whose encoder graph is reused unchanged (head-only)."""
    weights_from: Path | None = None
    """An earlier version's ``encoder/`` folder of fine-tuned weights, reused unchanged."""
    int8_from: Path | None = None
    """With ``onnx_from``: the same version's int8 model, whose quantised encoder is reused."""
    fine_tuned_layers: int = 0


@dataclass
class FittedHead:
    """A fitted head, with the record of how it was chosen and trained."""

    head: ClassifierHead
    config: HeadConfig
    trained: TrainedHead
    search: dict[str, Any]
    unfreeze: dict[str, Any] | None
    warm_start: str | None
    encoder: EncoderSource
    """The encoder after fitting: fine-tuning replaces the one fitting started with."""
    data: EmbeddedSplits
    """The data, embedded again if the encoder was fine-tuned."""
    selection_head: ClassifierHead | None = None
    """When the served head was fitted again on train + validation: the head fitted on train
    alone, whose validation scores chose the configuration. Validation metrics come from it, since
    the served head has seen the validation split."""
    final_fit: dict[str, Any] | None = None
    """How the served head was fitted when it is not the selection fit (data, size, steps)."""

    @property
    def validation_head(self) -> ClassifierHead:
        """The head whose validation predictions are honest: one that never trained on them."""
        return self.head if self.selection_head is None else self.selection_head

    def record(self, seed: int) -> dict[str, Any]:
        return {
            "seed": seed,
            "head": asdict(self.config),
            "head_training": self.trained.summary(),
            "final_fit": self.final_fit or {
                "data": "train", "examples": len(self.data.splits.train),
                "validation_scores": "of this head",
            },
            "search": self.search,
            "unfreeze": self.unfreeze,
        }


@dataclass(frozen=True)
class Provenance:
    """What a version's manifest says about where it came from."""

    data_source: str
    parent: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    """Added to the manifest's ``training`` record (split description, retrain details)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Added at the top of the manifest (the gate's decision)."""


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
            "int8": int8_summary(self.version.manifest),
            "path": str(self.version.path),
        }


def int8_summary(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The int8 model's check in brief, and what quantising and checking it took."""
    record = manifest.get("int8")
    if not isinstance(record, dict):
        return None
    check = record["check"]
    return {
        "passed": check["passed"], "reason": check["reason"],
        "agreement": check["agreement"], "accuracy_drop": check["accuracy_drop"],
        "size_mb": round(record["size_bytes"] / 2**20, 1),
        "seconds": round(record["build_seconds"] + check["seconds"], 3),
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
    """Train, export, evaluate and register a new version from labelled data (``refit train``)."""
    options = options or TrainingOptions()
    reporter = reporter or SilentReporter()
    started = time.perf_counter()
    splits = make_splits(data, test, options, source)

    reporter.phase("loading", "encoder")
    source_encoder = EncoderSource(
        tokenizer=TextTokenizer(packaged_encoder_dir() / "tokenizer.json", options.max_seq_length),
        encoder=load_encoder(),
    )
    embedded = embed_splits(splits, source_encoder, reporter)
    recipe = options.head_recipe()
    fitted = fit_head(embedded, recipe, source_encoder, reporter)
    version = register_version(
        registry,
        fitted,
        Provenance(
            data_source=source,
            training={
                "splits": {
                    "test": "given"
                    if test is not None
                    else f"stratified {options.test_fraction:.0%}",
                    "validation": f"stratified {options.validation_fraction:.0%}",
                },
            },
        ),
        recipe.seed,
        reporter,
        started,
        options.int8_gate,
    )
    promoted = False
    if promote:
        reporter.phase("promoting", version.name)
        registry.promote(version.name)
        promoted = True
    return TrainedVersion(version, promoted, time.perf_counter() - started)


def embed_splits(splits: Splits, source: EncoderSource, reporter: Reporter) -> EmbeddedSplits:
    """Embed every split with the PyTorch encoder, reporting progress."""
    assert source.encoder is not None
    total = sum(len(part) for _, part in splits.items())
    reporter.phase("embedding", f"{total} texts")
    embeddings: dict[str, np.ndarray] = {}
    done = 0

    def progress(n: int, _total: int) -> None:
        reporter.event("embedded", done=done + n, total=total)

    for name, part in splits.items():
        embeddings[name] = embed_texts(
            source.encoder, source.tokenizer, part.texts, progress=progress
        )
        done += len(part)
    return EmbeddedSplits(splits.train.label_set(), splits, embeddings)


def fit_head(
    data: EmbeddedSplits, recipe: HeadRecipe, source: EncoderSource, reporter: Reporter
) -> FittedHead:
    """Search the head's configuration, train it, and optionally fine-tune the encoder's top layers.

    The one way a head is fitted, for ``refit train`` and for retraining from feedback alike.
    """
    x_train, y_train = data.embeddings["train"], data.y("train")
    x_val, y_val = data.embeddings["validation"], data.y("validation")
    choose_prior = recipe.choose_prior_correction and len(y_val) > 0
    # The correction is chosen on the held-out scores of the uncorrected candidates.
    config = recipe.config.with_overrides(prior_correction=0.0) if choose_prior else recipe.config
    search_record: dict[str, Any] = {"strategy": "none"}
    held_out: HeldOut | None = None
    if recipe.search.strategy != "none":
        reporter.phase("searching", recipe.search.strategy)
        search = search_head(
            x_train, y_train, x_val, y_val, data.num_classes, config, recipe.search, recipe.seed,
            on_trial=lambda _i, n, trial: reporter.event("trial", trials=n, **trial),
        )
        config, held_out = search.best, search.held_out
        search_record = {"strategy": recipe.search.strategy, **search.to_manifest()}

    if recipe.large_batch_from is not None and len(y_train) >= recipe.large_batch_from:
        # Large sets: bigger batches (learning rate scaled by the square root) train the head
        # about 2.5 times faster for the same validation score (bench/retrain_speed.py).
        scale = (LARGE_BATCH / config.batch_size) ** 0.5
        config = config.with_overrides(
            batch_size=LARGE_BATCH, learning_rate=config.learning_rate * scale
        )
    warm = recipe.warm_start
    if warm is not None and warm.hidden_size != config.hidden_size:
        warm = None  # another architecture was chosen: nothing to start from
    if warm is not None:
        config = config.with_overrides(patience=min(config.patience, warm.patience))

    candidates = [config]
    if recipe.search.strategy == "none" and recipe.choose_class_weighting:
        candidates = class_weighting_choices(config)
    reporter.phase("training", f"head on {len(y_train)} examples, {data.num_classes} labels")
    attempts: list[TrainedHead] = []
    weighting_trials: list[dict[str, Any]] = []
    start = None if warm is None else (warm.head, warm.class_map)
    for candidate in candidates:
        attempt = train_head(
            x_train, y_train, x_val, y_val, data.num_classes, candidate, recipe.seed,
            on_epoch=lambda r: reporter.event("epoch", stage="head", **asdict(r)),
            warm_start=start,
        )
        attempts.append(attempt)
        if candidate.is_linear:
            # The candidates' objectives differ only in class weights, and each is convex: the
            # last one's optimum is a closer start than the champion, and leads to the same
            # optimum in fewer L-BFGS iterations.
            start = (attempt.head, list(range(data.num_classes)))
        weighting_trials.append({"class_weight_power": candidate.class_weight_power,
                                 "score": selection_score(attempt),
                                 "val_loss": attempt.val_loss,
                                 "val_accuracy": round(attempt.val_accuracy, 6),
                                 "val_macro_f1": round(attempt.val_macro_f1, 6)})
    chosen, reason = 0, "one configuration"
    if len(candidates) > 1 and len(y_val) > 0:
        # The search's rule: weighting replaces the unweighted head only if it clears the bar.
        predictions = [head_probabilities(a.head, x_val).argmax(axis=1) for a in attempts]
        chosen, reason = choose_trial(candidates, weighting_trials, predictions, y_val,
                                      data.num_classes, recipe.seed, recipe.search.complex_bar)
    trained, config = attempts[chosen], candidates[chosen]
    if len(candidates) > 1:
        search_record = {**search_record, "class_weighting": {
            "chosen_power": config.class_weight_power,
            "scoring": f"mean of validation accuracy and macro-F1; {reason}",
            "trials": [{k: v for k, v in t.items() if k not in ("score", "val_loss")}
                       for t in weighting_trials],
        }}
    if choose_prior:
        if held_out is None:  # no search: the selection fit's own validation scores
            held_out = HeldOut.of_parts(
                [(head_log_probabilities(trained.head, x_val), y_val, y_train)], data.num_classes)
        strength, strength_trials = choose_strength(held_out, data.num_classes)
        reporter.phase("training", f"head: prior correction strength {strength:g}, chosen on "
                                   f"{len(held_out.y)} held-out examples")
        if strength:
            trained = correct_for_prior(trained, y_train, x_val, y_val, strength)
            config = trained.config
        search_record = {**search_record, "prior_correction": {
            "strength": strength,
            "scoring": f"mean of accuracy and macro-F1 on {len(held_out.y)} held-out examples "
                       "(validation, or out-of-fold under cross-validation); ties to the weaker",
            "trials": strength_trials,
        }}
    fitted = FittedHead(
        head=trained.head, config=config, trained=trained, search=search_record, unfreeze=None,
        warm_start=None if warm is None else warm.version, encoder=source, data=data,
    )
    if recipe.final_fit_on_validation and len(y_val) > 0:
        start = None if warm is None else (warm.head, warm.class_map)
        _refit_on_train_and_validation(fitted, recipe.seed, reporter, start)
    if recipe.unfreeze.layers > 0:
        fitted = _unfreeze(fitted, recipe, reporter)
    return fitted


def _refit_on_train_and_validation(
    fitted: FittedHead,
    seed: int,
    reporter: Reporter,
    mlp_start: tuple[ClassifierHead, list[int]] | None = None,
) -> None:
    """Fit the chosen configuration again on train + validation; it becomes the served head.

    Validation has done its work (it chose the configuration and, for an MLP, the epoch count);
    15% more data is then worth more than keeping it out, the standard practice after a search.
    The linear head starts from the selection fit's solution and runs to convergence (no early
    stopping, nothing to choose); the MLP runs exactly the selection fit's best epoch count from
    the selection fit's own start (``mlp_start``, a retrain's warm start, or scratch) and keeps its
    last weights. The selection fit is kept for honest validation metrics.
    """
    data, config, selected = fitted.data, fitted.config, fitted.trained
    x = np.concatenate([data.embeddings["train"], data.embeddings["validation"]])
    y = np.concatenate([data.y("train"), data.y("validation")])
    reporter.phase("training", f"final head on train + validation, {len(y)} examples")
    warm: tuple[ClassifierHead, list[int]] | None
    if config.is_linear:
        final_config = config
        warm = (selected.head, list(range(data.num_classes)))
    else:
        final_config = config.with_overrides(max_epochs=selected.best_epoch)
        warm = mlp_start
    final = train_head(
        x, y, data.embeddings["validation"], data.y("validation"), data.num_classes, final_config,
        seed, on_epoch=lambda r: reporter.event("epoch", stage="final", **asdict(r)),
        warm_start=warm, fixed_epochs=True,
    )
    fitted.selection_head = selected.head
    fitted.head = final.head
    fitted.final_fit = {
        "data": "train + validation",
        "examples": len(y),
        "solver": "lbfgs" if config.is_linear else "adamw",
        # Linear: L-BFGS iterations from the selection fit's solution; MLP: the epochs it ran.
        "steps": final.epochs_run,
        "converged": final.converged,
        "validation_scores": "of the selection fit on train alone (head_training); the served "
                             "head has seen the validation split",
        "seconds": round(final.seconds, 3),
    }


def class_weighting_choices(config: HeadConfig) -> list[HeadConfig]:
    """``config`` and the same with the other class weightings (inverse class frequency to the
    power 0, 0.5, 1), to be chosen between on validation.

    Weighting the loss helps rare classes on some data and makes the head predict them far too
    often on other data (issue 9): it is a choice made per retrain, not a default.
    """
    powers = [config.class_weight_power] + [p for p in (0.0, 0.5, 1.0)
                                            if p != config.class_weight_power]
    return [config.with_overrides(class_weight_power=p) for p in powers]


def selection_score(trained: TrainedHead) -> float:
    """What choices between heads maximise on validation: the mean of accuracy and macro-F1, so
    neither is traded away for the other (as in the search)."""
    return (trained.val_accuracy + trained.val_macro_f1) / 2


def _unfreeze(fitted: FittedHead, recipe: HeadRecipe, reporter: Reporter) -> FittedHead:
    """Fine-tune the encoder's top layers gradually; keep the result only if it beats the head."""
    source, data = fitted.encoder, fitted.data
    if source.encoder is None:
        raise ValueError("fine-tuning needs the PyTorch encoder")
    layers = recipe.unfreeze.layers
    reporter.phase("fine-tuning", f"top {layers} encoder layer(s), gradually")
    result = gradual_unfreeze(
        source.encoder, source.tokenizer, data.splits.train.texts, data.y("train"),
        data.splits.validation.texts, data.y("validation"), data.num_classes, fitted.config,
        recipe.unfreeze, fitted.trained.val_macro_f1, recipe.seed,
        on_epoch=lambda r: reporter.event("unfreeze_epoch", **asdict(r)),
    )
    fitted.unfreeze = result.to_manifest(recipe.unfreeze)
    if result.head is None:
        reporter.phase("fine-tuning", "did not beat the head-only model on validation; kept that")
        return fitted
    reporter.phase("embedding", "again, with the fine-tuned encoder")
    embeddings = {
        name: embed_texts(source.encoder, source.tokenizer, part.texts)
        for name, part in data.splits.items()
    }
    hidden = recipe.unfreeze.head_hidden_size
    fitted.head = result.head
    # Fine-tuning trained on train alone, stopping on validation: its validation scores are its own.
    fitted.selection_head, fitted.final_fit = None, None
    # The head trained with the encoder may have another width: the manifest records the real one.
    # It has no prior correction either: its strength was chosen for the head-only model.
    fitted.config = fitted.config.with_overrides(
        hidden_size=fitted.config.hidden_size if hidden is None else hidden, prior_correction=0.0
    )
    fitted.encoder = EncoderSource(
        source.tokenizer, source.encoder,
        fine_tuned_layers=max(source.fine_tuned_layers, layers),
    )
    fitted.data = EmbeddedSplits(data.labels, data.splits, embeddings)
    return fitted


def register_version(
    registry: ModelRegistry,
    fitted: FittedHead,
    provenance: Provenance,
    seed: int,
    reporter: Reporter,
    started: float,
    int8_gate: Int8Gate | None = None,
    int8_test: Callable[[], EncodedTest] | None = None,
) -> ModelVersion:
    """Export, check, evaluate and commit a version; returns it once visible in the registry.

    The one way a version is written, for ``refit train`` and retraining alike. With
    ``fitted.encoder.onnx_from`` the encoder graph is reused and only the head is exported
    (:func:`compose_with_encoder`). With ``weights_from`` a parent's fine-tuned encoder weights are
    reused (hard-linked); with ``fine_tuned_layers > 0`` and no such folder they are saved anew.
    Every version also gets an int8 model, checked against fp32 on the test split under
    ``int8_gate`` (:mod:`adapters.training.quantize`). When that model is ``int8_from``'s encoder
    with the new head, ``int8_test`` may give what that encoder computes on the test texts (a
    retrain computes it while the head trains) for the check to use.
    """
    source, data = fitted.encoder, fitted.data
    splits, embeddings, labels = data.splits, data.embeddings, data.labels
    tokenizer = source.tokenizer
    # From here on the head is the calibrated one (its temperature folded into the last layer):
    # what is exported, checked, stored, evaluated and used for the drift reference.
    calibration = calibrate_head(
        fitted.head, embeddings["validation"], data.y("validation"),
        {name: (embeddings[name], data.y(name)) for name in ("validation", "test")},
        held_out_head=fitted.selection_head,
    )
    head = calibration.head
    with registry.stage() as staged:
        reporter.phase("exporting", "ONNX")
        onnx_path = staged.path / "model.onnx"
        parity: Mapping[str, float | str]
        if source.onnx_from is not None:
            compose_with_encoder(source.onnx_from, head, onnx_path)
            parity = check_head_parity(head, tokenizer, onnx_path, splits.test.texts)
        else:
            if source.encoder is None:
                raise ValueError("exporting the encoder graph needs the PyTorch encoder")
            export_onnx(source.encoder, head, tokenizer, onnx_path)
            parity = check_parity(source.encoder, head, tokenizer, onnx_path, splits.test.texts)
        shutil.copyfile(tokenizer.path, staged.path / "tokenizer.json")
        (staged.path / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
        save_head(head, staged.path / "head.npz")
        if source.weights_from is not None:
            _link_tree(source.weights_from, staged.path / "encoder")
        elif source.fine_tuned_layers > 0:
            if source.encoder is None:
                raise ValueError("saving fine-tuned weights needs the PyTorch encoder")
            save_encoder_weights(source.encoder, staged.path / "encoder")

        reporter.phase("evaluating", f"{len(splits.test)} held-out examples")
        metrics: dict[str, Any] = {}
        # What the served model answers on the held-out splits: the int8 model is compared with
        # it.
        probabilities = {name: head_probabilities(head, embeddings[name])
                         for name in ("validation", "test")}
        # What a model that never saw each split answers on it, calibrated as the served head
        # is: the validation metrics and the drift reference are made of it (the served head is
        # over-confident on the validation split it was refitted on).
        unseen = dict(probabilities)
        if fitted.validation_head is not fitted.head:
            unseen["validation"] = head_probabilities(
                fold_temperature(fitted.validation_head, calibration.temperature),
                embeddings["validation"],
            )
        for name in ("validation", "test"):
            metrics[name] = classification_report(
                data.y(name), unseen[name].argmax(axis=1), labels
            )
        reporter.phase("quantizing", "int8 model")
        int8_gate = int8_gate or Int8Gate()
        staged_manifest = {"version": "staged", "labels": labels,
                           "encoder": {"max_seq_length": tokenizer.max_length}}
        int8_path = staged.path / INT8_FILE
        int8_from = source.int8_from if source.onnx_from is not None else None
        int8_build = write_int8(
            staged.path, onnx_path.name, head, int8_from, staged_manifest,
            Probe(splits.validation.texts, data.y("validation"),
                  probabilities["validation"].argmax(axis=1)),
            int8_gate,
        )
        reporter.phase("evaluating", f"int8 model on {len(splits.test)} test examples")
        encoded = None
        if int8_test is not None and int8_from is not None and int8_from.is_file():
            encoded = int8_test()
            if encoded.int8_file != int8_from:
                raise ValueError(f"int8 embeddings from {encoded.int8_file}, not {int8_from}")
        int8_check = check_int8(
            staged.path, staged_manifest,
            Probe(splits.test.texts, data.y("test"), probabilities["test"].argmax(axis=1)),
            int8_gate, encoded, head, tokenizer,
        )

        data_dir = staged.path / "data"
        data_dir.mkdir()
        for name, part in splits.items():
            (data_dir / f"{name}.jsonl").write_text(part.to_jsonl())
        halves = {name: embeddings[name].astype(np.float16) for name, _ in splits.items()}
        np.savez(data_dir / "embeddings.npz", **halves)  # type: ignore[arg-type]
        _write_reference(staged.path / "reference.npz", splits, embeddings, unseen)

        encoder_folder = packaged_encoder_dir()
        package_hash = encoder_content_hash(encoder_folder)
        weights_file = staged.path / "encoder" / "model.safetensors"
        manifest = {
            "version": None,
            "parent": provenance.parent,
            "created_at": utc_now(),
            "labels": labels,
            "encoder": {
                "name": ENCODER_NAME,
                "package": f"{ENCODER_PACKAGE}=={encoder_package_version()}",
                "sha256": package_hash,
                # Identifies the weights that produced this version's embeddings: embeddings
                # logged under versions with the same id can be reused without re-encoding.
                "id": sha256_file(weights_file) if weights_file.exists() else package_hash,
                "fine_tuned_layers": source.fine_tuned_layers,
                "weights": "encoder/" if source.fine_tuned_layers else "package",
                "pooling": "mean",
                "normalized": True,
                "max_seq_length": tokenizer.max_length,
            },
            "training": {**fitted.record(seed), **provenance.training},
            "data": {
                "source": provenance.data_source,
                **{
                    name: {"rows": len(part), "sha256": part.fingerprint(),
                           "labels": len(part.label_counts())}
                    for name, part in splits.items()
                },
            },
            "metrics": metrics,
            "calibration": calibration.record,
            "onnx": {"sha256": sha256_file(onnx_path), "opset": OPSET, "parity": parity},
            "int8": {
                "file": INT8_FILE,
                "sha256": sha256_file(int8_path),
                "size_bytes": int8_path.stat().st_size,
                "fp32_size_bytes": onnx_path.stat().st_size,
                "method": INT8_METHOD,
                **int8_build,
                "check": int8_check,
            },
            "packages": package_versions(),
            "train_seconds": round(time.perf_counter() - started, 3),
            **provenance.extra,
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
