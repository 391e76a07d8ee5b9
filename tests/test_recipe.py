"""The head's training recipe: a converged linear head, class weighting chosen on validation,
old manifests still loading, and (slow, real data) the default recipe against logistic regression.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from adapters.serving.data import LabelledTexts
from adapters.serving.evaluation import macro_f1
from adapters.serving.tokenization import TextTokenizer
from adapters.training.encoder import packaged_encoder_dir
from adapters.training.head import (
    HeadConfig,
    class_weights,
    head_probabilities,
    selection_score,
    train_head,
)
from adapters.training.pipeline import (
    EmbeddedSplits,
    EncoderSource,
    HeadRecipe,
    SilentReporter,
    Splits,
    fit_head,
)
from adapters.training.search import SearchOptions, candidate_configs, choose_trial, search_head

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def blobs(
    sizes: list[int], spread: float, seed: int, dim: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around fixed centres (the same centres for every ``seed``)."""
    centres = np.random.default_rng(123).normal(size=(len(sizes), dim))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[y] + rng.normal(scale=spread, size=(len(y), dim))
    return x.astype(np.float32), y


def objective(
    weights: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray, c: float
) -> float:
    """scikit-learn's logistic regression objective, C · Σ cross-entropy + ½‖W‖², in float64."""
    logits = x.astype(np.float64) @ weights.T + bias
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-c * log_p[np.arange(len(y)), y].sum() + 0.5 * (weights**2).sum())


def test_linear_head_converges_to_the_logistic_regression_optimum():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs([60, 40, 30, 20], spread=1.2, seed=0)
    xv, yv = blobs([30, 30, 30, 30], spread=1.2, seed=1)
    for c in (0.1, 10.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
        trained = train_head(x, y, xv, yv, 4, HeadConfig(c=c), seed=0)
        assert trained.converged
        # The head centres its input; in raw coordinates its bias absorbs the centre.
        linear = trained.head.net[-1]
        weights = linear.weight.detach().double().numpy()
        center = trained.head.center.double().numpy()
        bias = linear.bias.detach().double().numpy() - weights @ center
        ours = objective(weights, bias, x, y, c)
        theirs = objective(reference.coef_, reference.intercept_, x, y, c)
        assert ours <= theirs * (1 + 1e-6), (c, ours, theirs)
        probabilities = head_probabilities(trained.head, xv)
        assert np.abs(probabilities - reference.predict_proba(xv)).max() < 0.02, c
        assert trained.val_accuracy == pytest.approx(reference.score(xv, yv), abs=1 / len(yv))


def test_linear_head_converges_where_a_block_runs_out_of_line_search_evaluations():
    """Many classes on unit-norm inputs (like sentence embeddings): from zero the first L-BFGS
    steps need several line-search evaluations each, so the first block of iterations ends early
    on its evaluation budget. That is not convergence: the fit must go on to the optimum (it used
    to stop there, about 22 iterations in, and call itself converged)."""
    from sklearn.linear_model import LogisticRegression

    def sphere(per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        centres = np.random.default_rng(123).normal(size=(64, 128))
        y = np.repeat(np.arange(64), per)
        x = centres[y] + np.random.default_rng(seed).normal(scale=3.0, size=(len(y), 128))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    x, y = sphere(15, 0)
    xv, yv = sphere(5, 1)
    c = 10.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
    trained = train_head(x, y, xv, yv, 64, HeadConfig(c=c), seed=0)
    assert trained.converged
    linear = trained.head.net[-1]
    weights = linear.weight.detach().double().numpy()
    bias = linear.bias.detach().double().numpy() - weights @ trained.head.center.double().numpy()
    ours = objective(weights, bias, x, y, c)
    theirs = objective(reference.coef_, reference.intercept_, x, y, c)
    assert ours <= theirs * (1 + 1e-6), (ours, theirs, trained.epochs_run)


def test_class_weights_follow_the_power_and_keep_the_total():
    y = np.array([0] * 90 + [1] * 10)
    for power, ratio in ((0.0, 1.0), (0.5, 3.0), (1.0, 9.0)):
        w = class_weights(y, 3, power).numpy()
        assert w[1] / w[0] == pytest.approx(ratio, rel=1e-5)
        assert w[2] == 0.0  # absent class
        assert (w[y]).sum() == pytest.approx(len(y), rel=1e-5)


def search(x, y, xv, yv, classes):
    # The given validation split, not k-fold: these cases hinge on what validation looks like.
    return search_head(x, y, xv, yv, classes, HeadConfig(max_epochs=20),
                       SearchOptions("grid", kfold_below=0), seed=0)


def test_search_leaves_weighting_off_where_it_hurts():
    # Rare classes overlap a common one, and validation is as uneven as training: weighting the
    # rare classes up makes the head claim the overlap for them, which costs accuracy and F1.
    sizes = [1000, 20, 20]
    x, y = blobs(sizes, spread=1.0, seed=0)
    xv, yv = blobs(sizes, spread=1.0, seed=1)
    result = search(x, y, xv, yv, 3)
    assert result.best.class_weight_power == 0.0, result.scoring
    best = {power: max(t["score"] for t in result.trials
                       if t["params"]["class_weight_power"] == power) for power in (0.0, 1.0)}
    assert best[1.0] < best[0.0] - 0.05, best


def test_search_turns_weighting_on_where_it_helps():
    # Training is uneven but validation (like the traffic to serve) is balanced: without
    # weighting the head under-predicts the rare classes.
    x, y = blobs([600, 30, 30, 30], spread=1.6, seed=0)
    xv, yv = blobs([150, 150, 150, 150], spread=1.6, seed=1)
    result = search(x, y, xv, yv, 4)
    assert result.best.class_weight_power > 0.0, result.scoring
    plain = train_head(x, y, xv, yv, 4, HeadConfig(c=result.best.c), seed=0)
    chosen = train_head(x, y, xv, yv, 4, result.best, seed=0)
    assert chosen.val_accuracy > plain.val_accuracy
    assert chosen.val_macro_f1 > plain.val_macro_f1


def test_grid_covers_weighting_powers_and_c_range_and_mlps_on_request():
    configs = candidate_configs(HeadConfig(), SearchOptions("grid"), 0)
    assert all(c.is_linear for c in configs)  # the default grid: logistic regression only
    assert {c.class_weight_power for c in configs} == {0.0, 0.5, 1.0}
    assert min(c.c for c in configs) <= 0.01 and max(c.c for c in configs) >= 1000
    with_mlp = candidate_configs(HeadConfig(), SearchOptions("grid", mlp=True), 0)
    assert with_mlp[: len(configs)] == configs
    assert {c.class_weight_power for c in with_mlp if not c.is_linear} == {0.0, 0.5, 1.0}
    assert candidate_configs(HeadConfig(c=3.0), SearchOptions("none"), 0) == [HeadConfig(c=3.0)]


def test_head_config_loads_manifests_written_before_class_weight_power():
    old = {"hidden_size": 512, "dropout": 0.1, "learning_rate": 3e-3, "weight_decay": 1e-2,
           "batch_size": 64, "max_epochs": 200, "patience": 15, "label_smoothing": 0.1,
           "class_weighting": True}
    config = HeadConfig(**old)
    assert config.class_weight_power == 1.0 and config.hidden_size == 512
    assert HeadConfig(**{**old, "class_weighting": False}).class_weight_power == 0.0
    saved = asdict(config)
    assert "class_weighting" not in saved
    assert HeadConfig(**saved) == config
    assert config.with_overrides(batch_size=256).class_weight_power == 1.0
    with pytest.raises(ValueError):
        HeadConfig(c=0.0)


def test_linear_head_warm_start_reaches_the_same_optimum_faster():
    x, y = blobs([60, 40, 30], spread=1.0, seed=0)
    xv, yv = blobs([20, 20, 20], spread=1.0, seed=1)
    config = HeadConfig(c=30.0)
    cold = train_head(x, y, xv, yv, 3, config, seed=0)
    earlier = train_head(x, y, xv, yv, 3, HeadConfig(c=10.0), seed=0)
    warm = train_head(x, y, xv, yv, 3, config, seed=0, warm_start=(earlier.head, [0, 1, 2]))
    assert warm.epochs_run < cold.epochs_run
    difference = head_probabilities(warm.head, xv) - head_probabilities(cold.head, xv)
    assert np.abs(difference).max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hwu64-lt", "hwu64"])
def test_default_recipe_at_least_matches_logistic_regression(name):
    """The default `refit train` recipe against LR with C picked on the same validation split
    (issue 9's target; hwu64's macro-F1 missed it by 0.0001 before the prior correction)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real datasets at {SHARED_DATA} (absent here)")
    from sklearn.linear_model import LogisticRegression

    from adapters.training.pipeline import TrainingOptions
    from bench.datasets import load

    b = load(name)
    k = len(b.labels)
    y_train, y_val, y_test = b.y("train"), b.y("validation"), b.y("test")
    data = EmbeddedSplits(b.labels, Splits(b.train, b.validation, b.test),
                          {"train": b.x_train, "validation": b.x_validation, "test": b.x_test})
    fitted = fit_head(data, TrainingOptions().head_recipe(), head_only_source(), SilentReporter())
    predicted = head_probabilities(fitted.head, b.x_test).argmax(axis=1)
    head = (float((predicted == y_test).mean()), macro_f1(y_test, predicted, k))

    best_val, lr = -1.0, (0.0, 0.0)
    for c in (0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0, 31.6, 100.0, 316.0, 1000.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=c, max_iter=5000).fit(b.x_train, y_train)
        val = model.score(b.x_validation, y_val)
        if val > best_val:
            p = model.predict(b.x_test)
            best_val, lr = val, (float((p == y_test).mean()), macro_f1(y_test, p, k))
    assert head[0] >= lr[0] and head[1] >= lr[1], (head, lr, fitted.config)


def test_linear_head_trains_on_one_thread_and_gives_the_threads_back():
    """L-BFGS's many small vector operations cost 100x more on two threads of a busy machine."""
    import torch

    # Large enough (20,000 x 384 inputs, 16 classes) that a matrix product would be threaded.
    x, y = blobs([1250] * 16, spread=1.0, seed=0, dim=384)
    xv, yv = blobs([5] * 16, spread=1.0, seed=1, dim=384)
    seen: list[int] = []
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_head(x, y, xv, yv, 16, HeadConfig(c=1.0, max_iterations=25), seed=0,
                   on_epoch=lambda _report: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_class_weighting_choice_reaches_each_weightings_own_optimum():
    """Retraining chooses the class weighting on validation, each candidate starting from the
    previous one's optimum: the chosen head and every trial's scores are those of a head trained
    from scratch with that weighting."""
    from adapters.serving.data import LabelledTexts
    from adapters.serving.tokenization import TextTokenizer
    from adapters.training.pipeline import (
        EmbeddedSplits,
        EncoderSource,
        HeadRecipe,
        SilentReporter,
        Splits,
        fit_head,
    )
    from tests.fixtures import tokenizer_file

    x, y = blobs([120, 40, 12], spread=1.4, seed=0)
    xv, yv = blobs([40, 20, 10], spread=1.4, seed=1)
    labels = ["a", "b", "c"]

    def split(ys: np.ndarray) -> LabelledTexts:
        return LabelledTexts(tuple(f"t{i}" for i in range(len(ys))), tuple(labels[k] for k in ys))

    data = EmbeddedSplits(labels, Splits(split(y), split(yv), split(yv[:0])),
                          {"train": x, "validation": xv, "test": xv[:0]})
    config = HeadConfig(c=30.0)
    fitted = fit_head(
        data,
        HeadRecipe(config=config, search=SearchOptions(strategy="none"),
                   choose_class_weighting=True),
        EncoderSource(tokenizer=TextTokenizer(tokenizer_file()), encoder=None), SilentReporter(),
    )
    trials = fitted.search["class_weighting"]["trials"]
    assert [t["class_weight_power"] for t in trials] == [0.0, 0.5, 1.0]
    for trial in trials:
        cold = train_head(x, y, xv, yv, 3,
                          config.with_overrides(class_weight_power=trial["class_weight_power"]),
                          seed=0)
        assert abs(cold.val_accuracy - trial["val_accuracy"]) < 1e-6
        assert abs(cold.val_macro_f1 - trial["val_macro_f1"]) < 1e-6
        if trial["class_weight_power"] == fitted.config.class_weight_power:
            # The selection fit (train only), with the prior correction chosen for it (recorded
            # in the configuration); the served head is then refitted on train + validation.
            chosen = train_head(x, y, xv, yv, 3, fitted.config, seed=0)
            difference = (head_probabilities(fitted.trained.head, xv)
                          - head_probabilities(chosen.head, xv))
            assert np.abs(difference).max() < 1e-3




def embedded_blobs(sizes: list[int], spread: float) -> EmbeddedSplits:
    """Blobs as the pipeline's data: train, validation and test splits with their embeddings."""
    parts = {}
    vectors = {}
    for seed, name in enumerate(("train", "validation", "test")):
        x, y = blobs(sizes, spread=spread, seed=seed)
        parts[name] = LabelledTexts.of([f"{name} {i}" for i in range(len(y))],
                                       [f"c{v}" for v in y])
        vectors[name] = x
    return EmbeddedSplits(sorted({f"c{v}" for v in range(len(sizes))}), Splits(**parts), vectors)


def head_only_source() -> EncoderSource:
    return EncoderSource(
        tokenizer=TextTokenizer(packaged_encoder_dir() / "tokenizer.json", 128), encoder=None
    )


@pytest.mark.parametrize("hidden_size", [0, 32])
def test_final_head_is_fitted_on_train_and_validation(hidden_size):
    """The served head is the chosen configuration fitted on train + validation; the manifest's
    validation scores come from the selection fit, which never saw validation."""
    data = embedded_blobs([80, 50, 30], spread=1.5)
    config = HeadConfig(hidden_size=hidden_size, c=1.0, max_epochs=30, patience=5)
    recipe = HeadRecipe(config=config, search=SearchOptions("none"))
    fitted = fit_head(data, recipe, head_only_source(), SilentReporter())

    pooled_x = np.concatenate([data.embeddings["train"], data.embeddings["validation"]])
    pooled_y = np.concatenate([data.y("train"), data.y("validation")])
    x_test = data.embeddings["test"]
    selection = fitted.trained
    assert fitted.selection_head is selection.head and fitted.head is not selection.head
    assert fitted.validation_head is selection.head
    # The recorded configuration, with the prior correction the recipe chose (if any).
    chosen = fitted.config
    if hidden_size:  # the MLP runs the selection fit's best epoch count on the pooled data
        final_config = chosen.with_overrides(max_epochs=selection.best_epoch)
        expected = train_head(pooled_x, pooled_y, x_test[:0], data.y("test")[:0], 3,
                              final_config, 0, fixed_epochs=True)
    else:
        expected = train_head(pooled_x, pooled_y, x_test[:0], data.y("test")[:0], 3, chosen, 0)
    served = head_probabilities(fitted.head, x_test)
    assert np.abs(served - head_probabilities(expected.head, x_test)).max() < 2e-3
    # ... and it is not the head fitted on train alone.
    assert np.abs(served - head_probabilities(selection.head, x_test)).max() > 1e-2
    record = fitted.record(seed=0)
    assert record["final_fit"]["data"] == "train + validation"
    assert record["final_fit"]["examples"] == len(pooled_y)
    assert record["head_training"]["val_accuracy"] == round(selection.val_accuracy, 6)


def test_final_fit_can_be_left_to_train_alone():
    data = embedded_blobs([40, 40], spread=1.0)
    recipe = HeadRecipe(search=SearchOptions("none"), final_fit_on_validation=False)
    fitted = fit_head(data, recipe, head_only_source(), SilentReporter())
    assert fitted.selection_head is None and fitted.head is fitted.trained.head
    assert fitted.record(seed=0)["final_fit"]["data"] == "train"


def test_a_complex_choice_must_clear_the_bar_over_plain_logistic_regression():
    """A weighted or MLP trial replaces the best plain one only if it wins by more than
    ``bar`` bootstrap standard errors of the paired difference."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2000)
    plain_right = rng.random(2000) < 0.80
    plain = np.where(plain_right, y, (y + 1) % 4)
    configs = [HeadConfig(c=1.0), HeadConfig(c=1.0, class_weight_power=1.0),
               HeadConfig(hidden_size=64)]

    def trials(scores: list[float]) -> list[dict]:
        return [{"score": s, "val_loss": 1.0} for s in scores]

    def score(predicted: np.ndarray) -> float:
        return selection_score(float((predicted == y).mean()), macro_f1(y, predicted, 4))

    # "slightly": the MLP fixes 20 of plain's mistakes and makes 12 new ones: better, by about
    # 1.4 s.e. (8 net of 32 discordant items); "far": it fixes 200 and makes the same 12.
    wrong, right = np.flatnonzero(~plain_right), np.flatnonzero(plain_right)
    slightly = plain.copy()
    slightly[wrong[:20]] = y[wrong[:20]]
    slightly[right[:12]] = (y[right[:12]] + 2) % 4
    far = slightly.copy()
    far[wrong[:200]] = y[wrong[:200]]
    for mlp, bar, expected in ((slightly, 2.0, 0), (far, 2.0, 2), (slightly, 0.0, 2)):
        predictions = [plain, plain, mlp]
        chosen, reason = choose_trial(configs, trials([score(p) for p in predictions]),
                                      predictions, y, 4, seed=0, bar=bar)
        assert chosen == expected, reason
    # Better by more than one s.e.: the old bar of one s.e. took it.
    chosen, reason = choose_trial(configs, trials([score(plain), score(plain), score(slightly)]),
                                  [plain, plain, slightly], y, 4, seed=0, bar=1.0)
    assert chosen == 2, reason


def test_search_bar_default_is_two_standard_errors():
    assert SearchOptions().complex_bar == 2.0


def test_retrain_weighting_choice_applies_the_same_bar():
    """Without a search (a retrain), class weighting is chosen among three powers by the search's
    rule: it replaces the unweighted head only if it clears ``complex_bar`` standard errors."""
    x, y = blobs([600, 30, 30, 30], spread=1.6, seed=0)
    xv, yv = blobs([150, 150, 150, 150], spread=1.6, seed=1)
    xt, yt = blobs([20, 20, 20, 20], spread=1.6, seed=2)

    def split(name: str, ys: np.ndarray) -> LabelledTexts:
        return LabelledTexts.of([f"{name} {i}" for i in range(len(ys))], [f"c{v}" for v in ys])

    data = EmbeddedSplits(["c0", "c1", "c2", "c3"],
                          Splits(split("train", y), split("validation", yv), split("test", yt)),
                          {"train": x, "validation": xv, "test": xt})
    chosen = {}
    for bar in (2.0, 1e9):
        recipe = HeadRecipe(config=HeadConfig(c=1.0), search=SearchOptions("none", complex_bar=bar),
                            choose_class_weighting=True)
        fitted = fit_head(data, recipe, head_only_source(), SilentReporter())
        chosen[bar] = fitted.config.class_weight_power
        assert fitted.search["class_weighting"]["chosen_power"] == chosen[bar]
    assert chosen[2.0] > 0.0  # balanced validation: weighting helps by far more than the bar
    assert chosen[1e9] == 0.0  # an unreachable bar keeps the unweighted head
