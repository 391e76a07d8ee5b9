"""The prior correction (logit adjustment) of the head: chosen on held-out data, folded into the
served head, recorded so that the head can be reproduced (issue 9)."""

from __future__ import annotations

import numpy as np

from adapters.serving.data import LabelledTexts
from adapters.serving.evaluation import macro_f1
from adapters.training.head import HeadConfig, head_probabilities, prior_offsets, train_head
from adapters.training.pipeline import (
    EmbeddedSplits,
    HeadRecipe,
    SilentReporter,
    Splits,
    fit_head,
)
from adapters.training.prior import STRENGTHS, HeldOut, choose_strength
from adapters.training.search import SearchOptions
from tests.test_recipe import blobs, head_only_source

UNEVEN = [600, 30, 30, 30]
EVEN = [150, 150, 150, 150]


def splits(train_sizes: list[int], held_out_sizes: list[int], spread: float) -> EmbeddedSplits:
    """Training data of ``train_sizes``; validation and test of ``held_out_sizes`` (the traffic
    to serve), all Gaussian classes around the same centres."""
    parts, vectors = {}, {}
    for seed, name in enumerate(("train", "validation", "test")):
        x, y = blobs(train_sizes if name == "train" else held_out_sizes, spread, seed)
        parts[name] = LabelledTexts.of([f"{name} {i}" for i in range(len(y))],
                                       [f"c{v}" for v in y])
        vectors[name] = x
    labels = [f"c{v}" for v in range(len(train_sizes))]
    return EmbeddedSplits(labels, Splits(**parts), vectors)


def test_offsets_raise_rare_classes_and_leave_absent_ones_alone():
    offsets = prior_offsets(np.array([100, 10, 0, 100]), 0.5)
    assert np.allclose(offsets, [0.0, 0.5 * np.log(10), 0.0, 0.0])
    assert not prior_offsets(np.array([100, 10, 0, 100]), 0.0).any()
    rows = prior_offsets(np.array([[4, 1], [1, 4]]), 1.0)  # one row of counts per example
    assert np.allclose(rows, [[0.0, np.log(4)], [np.log(4), 0.0]])


def test_strength_is_chosen_where_training_was_uneven_and_not_where_it_was_even():
    x, y = blobs(UNEVEN, spread=1.6, seed=0)
    xv, yv = blobs(EVEN, spread=1.6, seed=1)
    plain = train_head(x, y, xv, yv, 4, HeadConfig(c=1.0), seed=0)
    log_p = np.log(head_probabilities(plain.head, xv))
    counts = np.tile(np.bincount(y), (len(yv), 1))
    strength, trials = choose_strength(HeldOut(log_p, yv, counts), 4)
    assert strength > 0 and [t["strength"] for t in trials] == list(STRENGTHS)
    chosen = next(t for t in trials if t["strength"] == strength)
    assert chosen["macro_f1"] > trials[0]["macro_f1"] + 0.05, trials

    # Even training classes: every strength gives the same decisions, and the tie goes to none.
    x, y = blobs(EVEN, spread=1.6, seed=0)
    even = train_head(x, y, xv, yv, 4, HeadConfig(c=1.0), seed=0)
    held_out = HeldOut(np.log(head_probabilities(even.head, xv)), yv,
                       np.tile(np.bincount(y), (len(yv), 1)))
    assert choose_strength(held_out, 4)[0] == 0.0


def test_fit_head_folds_the_chosen_correction_into_the_served_head():
    data = splits(UNEVEN, EVEN, spread=1.6)
    recipe = HeadRecipe(config=HeadConfig(c=1.0), search=SearchOptions("none"))
    fitted = fit_head(data, recipe, head_only_source(), SilentReporter())
    record = fitted.record(seed=0)
    strength = record["search"]["prior_correction"]["strength"]
    assert strength > 0 and fitted.config.prior_correction == strength
    assert record["head"]["prior_correction"] == strength  # in the manifest's configuration

    # The recorded configuration reproduces the served head: fitted on train + validation, the
    # correction folded in for their class counts.
    pooled_x = np.concatenate([data.embeddings["train"], data.embeddings["validation"]])
    pooled_y = np.concatenate([data.y("train"), data.y("validation")])
    x_test, y_test = data.embeddings["test"], data.y("test")
    again = train_head(pooled_x, pooled_y, x_test, y_test, 4, fitted.config, seed=0)
    served = head_probabilities(fitted.head, x_test)
    assert np.abs(served - head_probabilities(again.head, x_test)).max() < 2e-3

    # And it serves the balanced traffic better than the same recipe without the correction.
    uncorrected = fit_head(data, HeadRecipe(config=HeadConfig(c=1.0),
                                            search=SearchOptions("none"),
                                            choose_prior_correction=False),
                           head_only_source(), SilentReporter())
    assert uncorrected.config.prior_correction == 0.0

    def served_macro_f1(head):
        return macro_f1(y_test, head_probabilities(head, x_test).argmax(axis=1), 4)

    assert served_macro_f1(fitted.head) > served_macro_f1(uncorrected.head) + 0.02
    # The selection fit's validation scores, as the manifest reports them, include it too.
    assert fitted.trained.val_macro_f1 > uncorrected.trained.val_macro_f1


def test_the_search_chooses_the_strength_on_out_of_fold_scores():
    # Small data: the search scores by 5-fold cross-validation on train + validation, and the
    # strength is chosen on the chosen trial's out-of-fold predictions of every one of those rows.
    data = splits([200, 10, 10, 10], [60, 60, 60, 60], spread=1.6)
    fitted = fit_head(data, HeadRecipe(), head_only_source(), SilentReporter())
    correction = fitted.search["prior_correction"]
    rows = len(data.y("train")) + len(data.y("validation"))
    assert correction["scoring"].startswith(f"mean of accuracy and macro-F1 on {rows} held-out")
    assert fitted.config.prior_correction == correction["strength"]


def test_a_retrain_chooses_the_strength_afresh():
    # A retrain starts from the champion's recorded configuration; its strength is not inherited:
    # with even classes there is nothing to correct, and none is applied.
    data = splits(EVEN, EVEN, spread=1.6)
    recipe = HeadRecipe(config=HeadConfig(c=1.0, prior_correction=1.0),
                        search=SearchOptions("none"))
    fitted = fit_head(data, recipe, head_only_source(), SilentReporter())
    assert fitted.config.prior_correction == 0.0
    # Without held-out data nothing can be chosen, and the configured strength is applied as is.
    fixed = HeadRecipe(config=HeadConfig(c=1.0, prior_correction=1.0),
                       search=SearchOptions("none"), choose_prior_correction=False)
    given = fit_head(data, fixed, head_only_source(), SilentReporter())
    assert given.config.prior_correction == 1.0
