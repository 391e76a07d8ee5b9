"""Gradual unfreezing: fine-tune the encoder's top layers, one more per stage, at a low rate.

The classic recipe's second phase. With ``k`` layers to unfreeze, training runs ``k`` stages of
``epochs_per_stage`` epochs; stage ``j`` trains the head and the top ``j`` layers. The learning
rate warms up, then decays linearly to zero over all stages; encoder layers learn at a rate far
below the head's, and deeper layers slower still (``layer_decay`` per layer down). A fresh head is
trained with the encoder, rather than the converged head of the first phase: a head that already
fits the training set perfectly gives the encoder almost no gradient to learn from.

Each epoch is scored on the validation split and the best weights are kept. If no epoch beats the
head-only model's validation macro-F1 the encoder is restored and ``None`` is returned, so
unfreezing never makes the validation score worse.

The layers below the lowest one ever unfrozen do not change, so their output is computed once and
cached: an epoch costs only the top ``k`` layers.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters.serving.evaluation import macro_f1
from adapters.serving.tokenization import TextTokenizer, length_sorted_chunks
from adapters.training.encoder import EMBEDDING_DIM, SentenceEncoder
from adapters.training.head import ClassifierHead, HeadConfig, class_weights, seed_everything


@dataclass(frozen=True)
class UnfreezeConfig:
    layers: int = 2
    """How many of the encoder's top layers to unfreeze, one more per stage."""
    epochs_per_stage: int = 5
    encoder_learning_rate: float = 3e-4
    head_learning_rate: float = 3e-3
    layer_decay: float = 0.8
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.1
    batch_size: int = 32
    head_hidden_size: int | None = 0
    """The fine-tuned model's head: 0 for linear (learns fastest alongside the encoder), None
    for the architecture the head-only search chose."""


@dataclass
class UnfreezeReport:
    stage: int
    epoch: int
    trainable_layers: list[int]
    train_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float


@dataclass
class UnfreezeResult:
    head: ClassifierHead | None
    """The fine-tuned head, or None when fine-tuning did not beat the head-only model."""
    best_val_macro_f1: float
    baseline_val_macro_f1: float
    best_epoch: int
    history: list[UnfreezeReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_manifest(self, config: UnfreezeConfig) -> dict[str, Any]:
        return {
            **{k: getattr(config, k) for k in config.__dataclass_fields__},
            "kept": self.head is not None,
            "baseline_val_macro_f1": round(self.baseline_val_macro_f1, 6),
            "best_val_macro_f1": round(self.best_val_macro_f1, 6),
            "best_epoch": self.best_epoch,
            "history": [r.__dict__ for r in self.history],
            "seconds": round(self.seconds, 3),
        }


EpochCallback = Callable[[UnfreezeReport], None]


class _Cached:
    """Per-text token states entering the first trainable layer, unpadded."""

    def __init__(self, states: list[torch.Tensor]) -> None:
        self.states = states
        self.lengths = [len(s) for s in states]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(self.lengths[i] for i in indices)
        hidden = torch.zeros(len(indices), longest, self.states[0].shape[-1])
        mask = torch.zeros(len(indices), longest, dtype=torch.int64)
        for row, index in enumerate(indices):
            n = self.lengths[index]
            hidden[row, :n] = self.states[index]
            mask[row, :n] = 1
        return hidden, mask


@torch.inference_mode()
def _cache_states(
    encoder: SentenceEncoder, tokenizer: TextTokenizer, texts: Sequence[str], layer: int
) -> _Cached:
    token_ids = tokenizer.token_ids(texts)
    states: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    for chunk in length_sorted_chunks([len(t) for t in token_ids], 64):
        longest = max(len(token_ids[i]) for i in chunk)
        ids = torch.zeros(len(chunk), longest, dtype=torch.int64)
        mask = torch.zeros(len(chunk), longest, dtype=torch.int64)
        for row, index in enumerate(chunk):
            ids[row, : len(token_ids[index])] = torch.tensor(token_ids[index])
            mask[row, : len(token_ids[index])] = 1
        hidden = encoder.hidden_before(layer, ids, mask)
        for row, index in enumerate(chunk):
            states[index] = hidden[row, : len(token_ids[index])].clone()
    return _Cached(states)


def _batches(cached: _Cached, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of texts of similar length (shuffle, sort within pools, cut)."""
    order = torch.randperm(len(cached.lengths), generator=generator).tolist()
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        members = sorted(order[start : start + pool], key=lambda i: cached.lengths[i])
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def _evaluate(
    encoder: SentenceEncoder, head: ClassifierHead, cached: _Cached, start: int, y: np.ndarray
) -> tuple[float, float]:
    encoder.eval()
    head.eval()
    predicted = np.empty(len(y), dtype=np.int64)
    with torch.inference_mode():
        for chunk in length_sorted_chunks(cached.lengths, 128):
            hidden, mask = cached.batch(chunk.tolist())
            logits = head(encoder.forward_from(start, hidden, mask))
            predicted[chunk] = logits.argmax(dim=1).numpy()
    return float((predicted == y).mean()), macro_f1(y, predicted, head.num_classes)


def gradual_unfreeze(
    encoder: SentenceEncoder,
    tokenizer: TextTokenizer,
    train_texts: Sequence[str],
    y_train: np.ndarray,
    val_texts: Sequence[str],
    y_val: np.ndarray,
    num_classes: int,
    head_config: HeadConfig,
    config: UnfreezeConfig,
    baseline_val_macro_f1: float,
    seed: int,
    on_epoch: EpochCallback | None = None,
) -> UnfreezeResult:
    """Fine-tune ``encoder`` in place with a new head; see the module docstring."""
    started = time.perf_counter()
    total_layers = encoder.num_layers
    k = max(1, min(config.layers, total_layers))
    start = total_layers - k
    generator = seed_everything(seed)
    hidden_size = (
        head_config.hidden_size if config.head_hidden_size is None else config.head_hidden_size
    )
    head = ClassifierHead(EMBEDDING_DIM, num_classes, hidden_size, head_config.dropout)
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    original = copy.deepcopy(encoder.state_dict())
    train_cache = _cache_states(encoder, tokenizer, train_texts, start)
    val_cache = _cache_states(encoder, tokenizer, val_texts, start)
    power = head_config.class_weight_power
    weight = class_weights(y_train, num_classes, power) if power else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    y_train_t = torch.from_numpy(y_train.astype(np.int64))

    # One parameter group per layer, created up front; a layer joins training when its stage
    # begins (until then it has no gradient, so AdamW leaves it alone).
    groups: list[dict[str, Any]] = [
        {"params": list(head.parameters()), "lr": config.head_learning_rate}
    ]
    for layer_index in range(start, total_layers):
        depth = total_layers - 1 - layer_index
        groups.append({"params": list(encoder.layers[layer_index].parameters()),
                       "lr": config.encoder_learning_rate * config.layer_decay**depth})
    optimiser = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = len(
        _batches(train_cache, config.batch_size, torch.Generator().manual_seed(0))
    )
    total_steps = max(1, steps_per_epoch * config.epochs_per_stage * k)
    warmup = max(1, int(total_steps * config.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(
            (step + 1) / warmup, max(0.0, (total_steps - step) / (total_steps - warmup))
        ),
    )

    best_f1 = baseline_val_macro_f1
    best_state: tuple[dict[str, Any], dict[str, Any]] | None = None
    best_epoch = 0
    history: list[UnfreezeReport] = []
    epoch_number = 0
    for stage in range(1, k + 1):
        trainable = list(range(total_layers - stage, total_layers))
        for parameter in encoder.layers[total_layers - stage].parameters():
            parameter.requires_grad_(True)
        for epoch in range(1, config.epochs_per_stage + 1):
            epoch_number += 1
            epoch_started = time.perf_counter()
            # The encoder's own dropout stays off: the top layers adapt by small steps, and its
            # noise on a handful of layers only slows them. The head keeps its dropout.
            encoder.eval()
            head.train()
            total = 0.0
            for batch in _batches(train_cache, config.batch_size, generator):
                hidden, mask = train_cache.batch(batch)
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(head(encoder.forward_from(start, hidden, mask)), y_train_t[batch])
                loss.backward()
                optimiser.step()
                schedule.step()
                total += float(loss.detach()) * len(batch)
            accuracy, f1 = _evaluate(encoder, head, val_cache, start, y_val)
            report = UnfreezeReport(
                stage, epoch, trainable, total / len(y_train), accuracy, f1,
                round(time.perf_counter() - epoch_started, 3),
            )
            history.append(report)
            if on_epoch is not None:
                on_epoch(report)
            if f1 > best_f1 + 1e-4:
                best_f1 = f1
                best_epoch = epoch_number
                best_state = (copy.deepcopy(encoder.state_dict()), copy.deepcopy(head.state_dict()))
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    if best_state is None:
        encoder.load_state_dict(original)
        kept: ClassifierHead | None = None
    else:
        encoder.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
        kept = head
    encoder.eval()
    head.eval()
    return UnfreezeResult(kept, best_f1, baseline_val_macro_f1, best_epoch, history,
                          time.perf_counter() - started)
