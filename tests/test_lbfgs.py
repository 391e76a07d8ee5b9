"""The linear head's L-BFGS (adapters/training/lbfgs.py) against torch.optim.LBFGS, which it
replaces: the same steps, so the same heads, validation scores and class-weighting choice on the
retrain path (warm start from a champion, three weightings chosen on validation, final fit on
train + validation); and no torch._dynamo import."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

import adapters.training.head as head_module
from adapters.serving.data import LabelledTexts
from adapters.serving.tokenization import TextTokenizer
from adapters.training.head import (
    LBFGS_BLOCK,
    LBFGS_TOLERANCE,
    ClassifierHead,
    EpochReport,
    HeadConfig,
    TrainedHead,
    train_head,
)
from adapters.training.pipeline import (
    EmbeddedSplits,
    EncoderSource,
    FittedHead,
    HeadRecipe,
    SilentReporter,
    Splits,
    WarmStart,
    fit_head,
)
from adapters.training.search import SearchOptions
from tests.fixtures import tokenizer_file

ROOT = Path(__file__).resolve().parents[1]


def _fit_linear_with_torch_optim(
    head: ClassifierHead,
    xt: torch.Tensor,
    yt: torch.Tensor,
    weight: torch.Tensor,
    config: HeadConfig,
    validate: Callable[[int, float], EpochReport],
    started: float,
) -> TrainedHead:
    """The linear head's fit as it was before lbfgs.py (torch.optim.LBFGS), kept as the
    reference the new one must reproduce."""
    linear = cast(nn.Linear, head.net[-1])
    with torch.no_grad():
        x = (xt - head.center) / head.scale
    w_example = weight[yt]
    n = len(yt)
    penalty = 1.0 / (2.0 * config.c * n)
    coef = linear.weight.detach().clone().requires_grad_(True)
    bias = linear.bias.detach().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [coef, bias], lr=1.0, max_iter=LBFGS_BLOCK, history_size=20,
        tolerance_grad=LBFGS_TOLERANCE, tolerance_change=1e-12, line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimiser.zero_grad(set_to_none=True)
        losses = nn.functional.cross_entropy(x @ coef.T + bias, yt, reduction="none")
        value = (w_example * losses).sum() / n + penalty * (coef * coef).sum()
        value.backward()
        return value

    history: list[EpochReport] = []
    iterations, converged, block = 0, False, 0
    while iterations < config.max_iterations:
        block += 1
        before = optimiser.state[optimiser._params[0]].get("n_iter", 0)
        loss = float(optimiser.step(objective).detach())
        ran = optimiser.state[optimiser._params[0]]["n_iter"] - before
        iterations += ran
        with torch.no_grad():
            linear.weight.copy_(coef)
            linear.bias.copy_(bias)
        history.append(validate(block, loss))
        coef_grad, bias_grad = cast(torch.Tensor, coef.grad), cast(torch.Tensor, bias.grad)
        gradient = max(float(coef_grad.abs().max()), float(bias_grad.abs().max()))
        if ran < LBFGS_BLOCK or gradient <= LBFGS_TOLERANCE:
            converged = gradient <= LBFGS_TOLERANCE or ran < LBFGS_BLOCK
            break
    head.eval()
    last = history[-1]
    return TrainedHead(
        head=head, config=config, best_epoch=iterations, epochs_run=iterations,
        val_loss=last.val_loss, val_accuracy=last.val_accuracy, val_macro_f1=last.val_macro_f1,
        seconds=0.0, history=history, converged=converged,
    )


def blobs(
    sizes: list[int], spread: float, seed: int, dim: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(7).normal(size=(len(sizes), dim))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    return (centres[y] + rng.normal(scale=spread, size=(len(y), dim))).astype(np.float32), y


def retrain_like_fit() -> FittedHead:
    """fit_head as a retrain calls it: warm-started from an earlier head that lacks a class,
    choosing the class weighting on validation, then the final fit on train + validation."""
    labels = ["a", "b", "c", "d", "e"]
    x, y = blobs([200, 90, 40, 15, 30], spread=1.6, seed=0)
    xv, yv = blobs([60, 30, 15, 8, 10], spread=1.6, seed=1)
    x_old, y_old = blobs([150, 60, 30, 12], spread=1.6, seed=2)
    champion = train_head(x_old, y_old, xv[yv < 4], yv[yv < 4], 4, HeadConfig(c=10.0), seed=0)

    def texts(ys: np.ndarray) -> LabelledTexts:
        return LabelledTexts(tuple(f"t{i}" for i in range(len(ys))), tuple(labels[k] for k in ys))

    data = EmbeddedSplits(labels, Splits(texts(y), texts(yv), texts(yv[:0])),
                          {"train": x, "validation": xv, "test": xv[:0]})
    recipe = HeadRecipe(
        config=HeadConfig(c=30.0), search=SearchOptions(strategy="none"),
        warm_start=WarmStart(head=champion.head, hidden_size=0, class_map=[0, 1, 2, 3],
                             version="v1"),
        choose_class_weighting=True,
    )
    source = EncoderSource(tokenizer=TextTokenizer(tokenizer_file()), encoder=None)
    return fit_head(data, recipe, source, SilentReporter())


def state(fitted: FittedHead) -> dict[str, np.ndarray]:
    return {name: value.numpy().copy() for name, value in fitted.head.state_dict().items()}


def test_retrain_fit_is_the_one_torch_optim_lbfgs_gave(monkeypatch: pytest.MonkeyPatch) -> None:
    new = retrain_like_fit()
    with monkeypatch.context() as patch:
        patch.setattr(head_module, "_fit_linear", _fit_linear_with_torch_optim)
        old = retrain_like_fit()
    # Several blocks of iterations ran, so resuming between blocks is exercised.
    assert old.trained.epochs_run > 2 * LBFGS_BLOCK
    assert new.search["class_weighting"] == old.search["class_weighting"]  # every trial's scores
    assert new.config == old.config
    assert new.trained.epochs_run == old.trained.epochs_run
    assert new.trained.converged and old.trained.converged
    assert new.final_fit is not None and old.final_fit is not None
    assert new.final_fit["steps"] == old.final_fit["steps"]
    assert [asdict_report(r) for r in new.trained.history] == \
        [asdict_report(r) for r in old.trained.history]
    new_state, old_state = state(new), state(old)
    for name in old_state:
        np.testing.assert_array_equal(new_state[name], old_state[name])  # the same steps


def asdict_report(report: EpochReport) -> tuple[int, float, float, float, float]:
    return (report.epoch, round(report.train_loss, 7), round(report.val_loss, 7),
            report.val_accuracy, report.val_macro_f1)


def test_fitting_a_linear_head_does_not_import_torch_dynamo() -> None:
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from adapters.training.head import HeadConfig, train_head\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.normal(size=(60, 8)).astype(np.float32); y = np.arange(60) % 3\n"
        "trained = train_head(x, y, x, y, 3, HeadConfig(), seed=0)\n"
        "assert trained.epochs_run > 0\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
