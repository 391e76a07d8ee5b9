"""The classification head and its training on frozen-encoder embeddings.

The head replaces the encoder's last layer for the task: it standardises the embedding (mean and
scale fixed from the training data and stored in the head, so export carries them), then applies
dropout and a linear layer, or one hidden layer first. It is trained with AdamW and weight decay,
class-weighted, label-smoothed cross-entropy, and early stopping on the validation macro-F1 (the
weights of the best epoch are kept), from a fixed seed.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from adapters.serving.evaluation import macro_f1


@dataclass(frozen=True)
class HeadConfig:
    """Everything that shapes a head and its training; recorded in every manifest."""

    hidden_size: int = 0
    """0 for a linear head; otherwise the width of one hidden layer."""
    dropout: float = 0.1
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 15
    """Epochs without a better validation macro-F1 before training stops."""
    label_smoothing: float = 0.1
    class_weighting: bool = True
    """Weight the loss by inverse class frequency, so rare labels count as much as common ones."""

    def with_overrides(self, **changes: Any) -> HeadConfig:
        return HeadConfig(**{**asdict(self), **changes})


class ClassifierHead(nn.Module):
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

    def fit_standardisation(self, embeddings: np.ndarray) -> None:
        self.center.copy_(torch.from_numpy(embeddings.mean(axis=0)))
        self.scale.copy_(torch.from_numpy(embeddings.std(axis=0) + 1e-6))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.net((embeddings - self.center) / self.scale)

    @property
    def num_classes(self) -> int:
        return int(self.net[-1].out_features)


@dataclass
class EpochReport:
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
    epochs_run: int
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float
    history: list[EpochReport] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "val_loss": round(self.val_loss, 6),
            "val_accuracy": round(self.val_accuracy, 6),
            "val_macro_f1": round(self.val_macro_f1, 6),
            "seconds": round(self.seconds, 3),
        }


EpochCallback = Callable[[EpochReport], None]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present; absent classes get 0."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    present = counts > 0
    weights = weights / weights[present].mean()
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
) -> TrainedHead:
    """Train a head on embeddings; keep the weights of the epoch with the best validation macro-F1.

    Ties on macro-F1 go to the lower validation loss. ``warm_start`` is an earlier head of the
    same architecture and, for each of its classes, that class's index here: training starts from
    its weights (classes it lacks start from scratch), so a retrained head converges in a few
    epochs instead of dozens.
    """
    started = time.perf_counter()
    generator = seed_everything(seed)
    head = ClassifierHead(x_train.shape[1], num_classes, config.hidden_size, config.dropout)
    if warm_start is None:
        head.fit_standardisation(x_train)
    else:
        copy_weights(warm_start[0], head, warm_start[1])
    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    yt = torch.from_numpy(y_train.astype(np.int64))
    xv = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32))
    yv = torch.from_numpy(y_val.astype(np.int64))
    weight = class_weights(y_train, num_classes) if config.class_weighting else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    val_loss_fn = nn.CrossEntropyLoss()
    optimiser = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    best_state = copy.deepcopy(head.state_dict())
    best = (math.inf, 0.0, -1.0)  # (val loss, accuracy, macro-F1) of the kept epoch
    best_epoch = 0
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
        head.eval()
        with torch.inference_mode():
            logits = head(xv)
            val_loss = float(val_loss_fn(logits, yv))
            predicted = logits.argmax(dim=1).numpy()
        accuracy = float((predicted == y_val).mean())
        f1 = macro_f1(y_val, predicted, num_classes)
        report = EpochReport(epoch, total / len(xt), val_loss, accuracy, f1)
        history.append(report)
        if on_epoch is not None:
            on_epoch(report)
        improved = f1 > best[2] + 1e-4
        if improved or (abs(f1 - best[2]) <= 1e-4 and val_loss < best[0]):
            best = (val_loss, accuracy, f1)
            best_epoch = epoch
            best_state = copy.deepcopy(head.state_dict())
        # Patience counts epochs without a better macro-F1: a tie with a lower loss is kept,
        # but does not extend training (on small data the F1 plateaus while the loss creeps).
        stale = 0 if improved else stale + 1
        if stale >= config.patience:
            break
    head.load_state_dict(best_state)
    head.eval()
    return TrainedHead(
        head=head,
        config=config,
        best_epoch=best_epoch,
        epochs_run=epoch,
        val_loss=best[0],
        val_accuracy=best[1],
        val_macro_f1=best[2],
        seconds=time.perf_counter() - started,
        history=history,
    )


@torch.no_grad()
def copy_weights(source: ClassifierHead, target: ClassifierHead, class_map: list[int]) -> None:
    """Copy ``source`` into ``target``; output class ``i`` of ``source`` becomes ``class_map[i]``."""
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
    logits = head(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)))
    return torch.softmax(logits, dim=1).numpy()


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
