"""The classification head and its training on frozen-encoder embeddings.

The head replaces the encoder's last layer for the task: it centres (and, for the MLP, scales) the
embedding with statistics fixed from the training data and stored in the head, so export carries
them, then applies a linear layer, or one hidden layer first.

Two heads, two ways of training them, one loss:

- **Linear** (``hidden_size == 0``): multinomial logistic regression, trained to convergence by
  full-batch L-BFGS on a convex objective, the one scikit-learn's ``LogisticRegression`` minimises:
  ``C · Σ_i w_i · cross-entropy_i + ½‖W‖²``, an L2 penalty on the weights only (biases are free).
  Embeddings are centred but not rescaled, so ``c`` means exactly what scikit-learn's ``C`` means.
  There is no early stopping, dropout or label smoothing: the optimum is the model.
- **MLP** (``hidden_size > 0``): one GELU hidden layer on standardised embeddings, AdamW with
  weight decay, dropout, label smoothing, and early stopping on the validation score (the weights
  of the best epoch are kept), from a fixed seed.

Both weight the loss per class by ``count ** -class_weight_power`` (0: none, 0.5: square root of
inverse frequency, 1: inverse frequency), normalised so the weights sum to the number of examples.
Weighting shifts decisions towards rare classes; whether that helps depends on the data, so it is
a choice made on validation data (``adapters.training.search``), never always on.

After training, a *prior correction* may be folded into the output bias (``prior_correction``,
:func:`correct_for_prior`): each class's logit gains ``τ · log(n_max / n_k)``, so decisions no
longer lean towards the classes that were frequent in training. Its strength is also chosen on
held-out data (:mod:`adapters.training.prior`), never always on.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import InitVar, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from adapters.serving.evaluation import macro_f1
from adapters.training.lbfgs import Lbfgs


@dataclass(frozen=True)
class HeadConfig:
    """Everything that shapes a head and its training; recorded in every manifest."""

    hidden_size: int = 0
    """0 for a linear head (logistic regression, L-BFGS); otherwise one hidden layer's width."""
    c: float = 10.0
    """Linear head: inverse L2 strength, scikit-learn's ``C``: the loss is
    ``C · Σ weighted cross-entropy + ½‖W‖²`` (biases unpenalised). Larger fits the data harder."""
    class_weight_power: float = 0.0
    """Class ``k`` weighs ``count_k ** -power`` in the loss: 0 none, 0.5 square root of inverse
    frequency, 1 inverse frequency (every class counts as much as any other)."""
    prior_correction: float = 0.0
    """Logit adjustment folded into the output bias after training: class ``k``'s logit gains
    ``τ · log(n_max / n_k)`` for its training count ``n_k`` (0 none, 1 the balanced-error
    correction). :func:`adapters.training.pipeline.fit_head` chooses it on held-out data
    (:mod:`adapters.training.prior`)."""
    max_iterations: int = 1000
    """Linear head: the most L-BFGS iterations (it stops earlier once converged)."""
    dropout: float = 0.1
    """MLP head only, like the fields below."""
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 15
    """Epochs without a better validation score before training stops."""
    label_smoothing: float = 0.1
    class_weighting: InitVar[bool | None] = None
    """Accepted from manifests written before ``class_weight_power`` existed: ``True`` meant
    inverse-frequency weights (power 1), ``False`` none (power 0). Not stored."""

    def __post_init__(self, class_weighting: bool | None) -> None:
        if class_weighting is not None:
            object.__setattr__(self, "class_weight_power", 1.0 if class_weighting else 0.0)
        if (self.hidden_size < 0 or self.c <= 0 or self.class_weight_power < 0
                or self.prior_correction < 0):
            raise ValueError(f"invalid head configuration: {self}")

    @property
    def is_linear(self) -> bool:
        return self.hidden_size == 0

    def with_overrides(self, **changes: Any) -> HeadConfig:
        return HeadConfig(**{**asdict(self), **changes})


class ClassifierHead(nn.Module):
    # Buffers registered in __init__, declared here so the type checker knows them as tensors.
    center: torch.Tensor
    scale: torch.Tensor

    def __init__(self, input_dim: int, num_classes: int, hidden_size: int, dropout: float):
        super().__init__()
        self.register_buffer("center", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(input_dim))
        if hidden_size > 0:
            self.net = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(input_dim, hidden_size),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, num_classes),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(input_dim, num_classes))

    def fit_standardisation(self, embeddings: np.ndarray, rescale: bool = True) -> None:
        """Centre on the mean of ``embeddings``; with ``rescale``, also divide by their spread."""
        self.center.copy_(torch.from_numpy(embeddings.mean(axis=0)))
        if rescale:
            self.scale.copy_(torch.from_numpy(embeddings.std(axis=0) + 1e-6))
        else:
            self.scale.fill_(1.0)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.net((embeddings - self.center) / self.scale)

    @property
    def num_classes(self) -> int:
        return int(cast(nn.Linear, self.net[-1]).out_features)


@dataclass
class EpochReport:
    """Progress of one epoch (MLP) or one block of L-BFGS iterations (linear head)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float


@dataclass
class TrainedHead:
    head: ClassifierHead
    config: HeadConfig
    best_epoch: int
    """The kept epoch (MLP) or the number of L-BFGS iterations run (linear head)."""
    epochs_run: int
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float
    history: list[EpochReport] = field(default_factory=list)
    converged: bool = True
    """Linear head: whether L-BFGS met its tolerance within ``max_iterations``."""

    @property
    def val_score(self) -> float:
        return selection_score(self.val_accuracy, self.val_macro_f1)

    def summary(self) -> dict[str, Any]:
        return {
            "solver": "lbfgs" if self.config.is_linear else "adamw",
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "converged": self.converged,
            "val_loss": round(self.val_loss, 6),
            "val_accuracy": round(self.val_accuracy, 6),
            "val_macro_f1": round(self.val_macro_f1, 6),
            "seconds": round(self.seconds, 3),
        }


EpochCallback = Callable[[EpochReport], None]

LBFGS_BLOCK = 25
"""L-BFGS iterations between two progress reports."""
LBFGS_TOLERANCE = 1e-6
"""Convergence: the largest absolute entry of the gradient of ``(1/n) Σ w_i CE_i + ‖W‖²/(2Cn)``
(scikit-learn's ``tol`` bounds the same quantity, 1e-4 by default; large C needs a tighter one)."""


def selection_score(accuracy: float, macro_f1_score: float) -> float:
    """What search and early stopping maximise: the mean of accuracy and macro-F1.

    Accuracy alone ignores rare classes; macro-F1 alone trades common-class accuracy for them
    (inverse-frequency weighting wins it by over-predicting rare classes). The mean asks for both.
    """
    return 0.5 * (accuracy + macro_f1_score)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def class_weights(y: np.ndarray, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Per-class loss weights ``count ** -power``, scaled so that the examples' weights sum to
    their number; absent classes get 0. ``power`` 0 gives all ones."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.where(present, np.maximum(counts, 1) ** -power, 0.0)
    weights *= len(y) / float((weights * counts).sum())
    return torch.tensor(weights, dtype=torch.float32)


def train_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    config: HeadConfig,
    seed: int,
    on_epoch: EpochCallback | None = None,
    warm_start: tuple[ClassifierHead, list[int]] | None = None,
    fixed_epochs: bool = False,
) -> TrainedHead:
    """Train a head on embeddings and score it on the validation data.

    The linear head is fitted to convergence (see the module docstring); the MLP keeps the weights
    of the epoch with the best validation score, ties going to the lower validation loss.
    ``warm_start`` is an earlier head of the same architecture and, for each of its classes, that
    class's index here: training starts from its weights (and its centring), classes it lacks
    start from zero (linear) or from scratch (MLP), so a retrained head converges in a few
    iterations instead of many.

    With ``fixed_epochs`` the MLP runs exactly ``config.max_epochs`` epochs and keeps the last
    weights: the validation data is then only reported on, never used to choose (the final fit on
    train + validation, whose epoch count the selection fit chose). The linear head ignores it.
    """
    started = time.perf_counter()
    generator = seed_everything(seed)
    head = ClassifierHead(x_train.shape[1], num_classes, config.hidden_size, config.dropout)
    if config.is_linear:
        with torch.no_grad():
            output = cast(nn.Linear, head.net[-1])
            output.weight.zero_()
            output.bias.zero_()
    if warm_start is None:
        head.fit_standardisation(x_train, rescale=not config.is_linear)
    else:
        copy_weights(warm_start[0], head, warm_start[1])
    xt = _tensor(x_train)
    yt = torch.from_numpy(y_train.astype(np.int64))
    xv = _tensor(x_val)
    weight = class_weights(y_train, num_classes, config.class_weight_power)

    def validate(epoch: int, train_loss: float) -> EpochReport:
        report = EpochReport(epoch, train_loss, *_validation_scores(head, xv, y_val))
        if on_epoch is not None:
            on_epoch(report)
        return report

    # The MLP's mini-batches are small. The linear head always runs on one thread: L-BFGS's
    # two-loop recursion does about 40 dot products per iteration on a vector of the head's
    # parameters (30k floats on banking77), and with two threads each cost 1.3-1.9 ms instead of
    # 7-17 µs on 2 busy cores, a full pass 3x the wall time and 2.7x the CPU (BENCHMARKS.md).
    small = len(xt) * x_train.shape[1] * config.batch_size < SMALL_WORK
    with _threads(1 if config.is_linear or small else None):
        if config.is_linear:
            trained = _fit_linear(head, xt, yt, weight, config, validate, started)
        else:
            trained = _fit_mlp(head, xt, yt, weight, config, generator, validate, started,
                               fixed_epochs)
    if config.prior_correction:
        trained = correct_for_prior(trained, y_train, x_val, y_val, config.prior_correction)
    return trained


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _validation_scores(
    head: ClassifierHead, xv: torch.Tensor, y_val: np.ndarray
) -> tuple[float, float, float]:
    """Validation loss, accuracy and macro-F1 of ``head``."""
    head.eval()
    with torch.inference_mode():
        logits = head(xv)
        yv = torch.from_numpy(y_val.astype(np.int64))
        val_loss = float(nn.functional.cross_entropy(logits, yv)) if len(yv) else math.nan
        predicted = logits.argmax(dim=1).numpy()
    accuracy = float((predicted == y_val).mean()) if len(y_val) else 0.0
    return val_loss, accuracy, macro_f1(y_val, predicted, head.num_classes)


def prior_offsets(counts: np.ndarray, strength: float) -> np.ndarray:
    """What the prior correction adds to each logit of a head trained on ``counts`` examples per
    class: ``τ · log(n_max / n_k)``, 0 for the most frequent class (the same decisions as
    ``−τ · log π_k``; see :mod:`adapters.training.prior`). A class absent from training gets 0:
    it has no frequency to correct, and boosting a class the head never saw only adds errors.
    ``counts`` may hold one row of counts per example (the last axis is the classes)."""
    counts = np.asarray(counts, dtype=np.float64)
    if strength == 0.0:
        return np.zeros(counts.shape)
    largest = counts.max(axis=-1, keepdims=True)
    return np.where(counts > 0, strength * np.log(np.maximum(largest, 1.0)
                                                  / np.maximum(counts, 1.0)), 0.0)


def correct_for_prior(
    trained: TrainedHead, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    strength: float,
) -> TrainedHead:
    """``trained`` with the prior correction of ``strength`` for its training labels ``y_train``
    folded into its output bias (in place), and its validation scores measured again."""
    head = trained.head
    counts = np.bincount(y_train, minlength=head.num_classes)
    with torch.no_grad():
        output = cast(nn.Linear, head.net[-1])
        output.bias.add_(torch.from_numpy(prior_offsets(counts, strength)).to(output.bias.dtype))
    val_loss, accuracy, f1 = _validation_scores(head, _tensor(x_val), y_val)
    return replace(trained, config=trained.config.with_overrides(prior_correction=strength),
                   val_loss=val_loss, val_accuracy=accuracy, val_macro_f1=f1)


SMALL_WORK = 100_000_000
"""Multiply-adds per step below which training runs on one thread: on small tensors the threads'
synchronisation costs more than they save, and far more when the CPU is shared (up to 10 times
slower on 2 busy cores)."""


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit_linear(
    head: ClassifierHead,
    xt: torch.Tensor,
    yt: torch.Tensor,
    weight: torch.Tensor,
    config: HeadConfig,
    validate: Callable[[int, float], EpochReport],
    started: float,
) -> TrainedHead:
    """Minimise ``(1/n) Σ w_i CE_i + ‖W‖² / (2 C n)`` (the same minimiser as ``C Σ w_i CE_i +
    ½‖W‖²``) by full-batch L-BFGS with a strong-Wolfe line search."""
    linear = cast(nn.Linear, head.net[-1])
    # In float64, like scikit-learn: near the optimum a step lowers the objective (about 0.3) by
    # less than float32 resolves (3e-8 of it), and in float32 the fit stalls short of the
    # tolerance (hwu64 at C = 10: a gradient of 3e-6, not 1e-6; BENCHMARKS.md §9).
    with torch.no_grad():
        x = ((xt - head.center) / head.scale).double()
    w_example = weight[yt].double()
    n = len(yt)
    penalty = 1.0 / (2.0 * config.c * n)
    coef = linear.weight.detach().double().clone().requires_grad_(True)
    bias = linear.bias.detach().double().clone().requires_grad_(True)

    def objective() -> torch.Tensor:
        coef.grad = bias.grad = None
        losses = nn.functional.cross_entropy(x @ coef.T + bias, yt, reduction="none")
        value = (w_example * losses).sum() / n + penalty * (coef * coef).sum()
        value.backward()
        return value

    # Not torch.optim.LBFGS: constructing it imports torch._dynamo (seconds of start-up in a
    # retrain job); Lbfgs is the same algorithm and takes the same steps (see its module).
    optimiser = Lbfgs([coef, bias], objective, tolerance_grad=LBFGS_TOLERANCE,
                      tolerance_change=1e-12, history_size=20, lr=1.0)
    history: list[EpochReport] = []
    iterations = 0
    converged = False
    block = 0
    while iterations < config.max_iterations:
        block += 1
        loss, ran = optimiser.run(LBFGS_BLOCK, max_eval=2 * LBFGS_BLOCK)
        iterations += ran
        with torch.no_grad():
            linear.weight.copy_(coef)
            linear.bias.copy_(bias)
        history.append(validate(block, loss))
        # Converged is a statement about the gradient at the point reached, nothing else. A block
        # also ends early when it runs out of function evaluations (the line search takes
        # several per iteration): that is not convergence, and the next block goes on. Taking
        # any short block for convergence stopped hwu64's fit from zero at C = 10 after 23
        # iterations, its objective 9% above the optimum (BENCHMARKS.md §9).
        reached = optimiser.loss
        if optimiser.gradient_max <= LBFGS_TOLERANCE:
            converged = True
            break
        if ran == 0 or loss - reached <= 1e-12 * abs(loss):
            break  # no progress left at this precision: stalled, not converged
    head.eval()
    last = history[-1]
    return TrainedHead(
        head=head, config=config, best_epoch=iterations, epochs_run=iterations,
        val_loss=last.val_loss, val_accuracy=last.val_accuracy, val_macro_f1=last.val_macro_f1,
        seconds=time.perf_counter() - started, history=history, converged=converged,
    )


def _fit_mlp(
    head: ClassifierHead,
    xt: torch.Tensor,
    yt: torch.Tensor,
    weight: torch.Tensor,
    config: HeadConfig,
    generator: torch.Generator,
    validate: Callable[[int, float], EpochReport],
    started: float,
    fixed_epochs: bool = False,
) -> TrainedHead:
    loss_fn = nn.CrossEntropyLoss(
        weight=weight if config.class_weight_power else None,
        label_smoothing=config.label_smoothing,
    )
    optimiser = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    best_state = copy.deepcopy(head.state_dict())
    best: EpochReport | None = None
    history: list[EpochReport] = []
    stale = 0
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        head.train()
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(head(xt[batch]), yt[batch])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        report = validate(epoch, total / len(xt))
        history.append(report)
        if fixed_epochs:
            best = report
            continue
        score = selection_score(report.val_accuracy, report.val_macro_f1)
        best_score = -1.0 if best is None else selection_score(best.val_accuracy, best.val_macro_f1)
        improved = score > best_score + 1e-4
        if improved or (best is not None and abs(score - best_score) <= 1e-4
                        and report.val_loss < best.val_loss):
            best = report
            best_state = copy.deepcopy(head.state_dict())
        # Patience counts epochs without a better score: a tie with a lower loss is kept, but
        # does not extend training (on small data the score plateaus while the loss creeps).
        stale = 0 if improved else stale + 1
        if stale >= config.patience:
            break
    assert best is not None
    if not fixed_epochs:
        head.load_state_dict(best_state)
    head.eval()
    return TrainedHead(
        head=head, config=config, best_epoch=best.epoch, epochs_run=epoch,
        val_loss=best.val_loss, val_accuracy=best.val_accuracy, val_macro_f1=best.val_macro_f1,
        seconds=time.perf_counter() - started, history=history,
    )


@torch.no_grad()
def copy_weights(source: ClassifierHead, target: ClassifierHead, class_map: list[int]) -> None:
    """Copy ``source`` into ``target``.

    Output class ``i`` of ``source`` becomes output class ``class_map[i]`` of ``target``.
    """
    source_state = source.state_dict()
    target_state = target.state_dict()
    last = f"net.{len(target.net) - 1}"
    for name, value in source_state.items():
        if name.startswith(last):
            target_state[name][class_map] = value
        elif target_state[name].shape == value.shape:
            target_state[name].copy_(value)
        else:
            raise ValueError(f"cannot warm-start: {name} has shape {tuple(value.shape)}, "
                             f"needs {tuple(target_state[name].shape)}")
    target.load_state_dict(target_state)


@torch.inference_mode()
def head_probabilities(head: ClassifierHead, embeddings: np.ndarray) -> np.ndarray:
    head.eval()
    return torch.softmax(head(_tensor(embeddings)), dim=1).numpy()


@torch.inference_mode()
def head_log_probabilities(head: ClassifierHead, embeddings: np.ndarray) -> np.ndarray:
    head.eval()
    return torch.log_softmax(head(_tensor(embeddings)), dim=1).numpy()


def save_head(head: ClassifierHead, path: Path) -> None:
    """The head's weights as plain arrays (with its shape), so it can be rebuilt without ONNX."""
    arrays = {name: tensor.detach().numpy() for name, tensor in head.state_dict().items()}
    np.savez(path, **arrays)


def load_head(path: Path, hidden_size: int, dropout: float) -> ClassifierHead:
    with np.load(path) as arrays:
        state = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    last = max((k for k in state if k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))
    num_classes, _ = state[last].shape
    input_dim = state["center"].shape[0]
    head = ClassifierHead(input_dim, int(num_classes), hidden_size, dropout)
    head.load_state_dict(state)
    head.eval()
    return head
