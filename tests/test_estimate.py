"""Accuracy estimated without labels: the estimator, and its gauges on a real server."""

from __future__ import annotations

import sqlite3

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.serving.data import read_jsonl
from monitoring.estimate import Z_95, estimate, estimate_accuracy
from tests.servers import wait_for


def test_estimate_is_the_mean_confidence_with_a_poisson_binomial_interval() -> None:
    p = np.tile([0.9, 0.8, 0.95, 0.6, 0.99], 20)
    e = estimate(p)
    assert e.predictions == 100 and e.accuracy == pytest.approx(p.mean())
    half = Z_95 * np.sqrt((p * (1 - p)).sum()) / 100
    assert (e.lower, e.upper) == pytest.approx((p.mean() - half, p.mean() + half))
    assert e.upper < 1
    # Certain predictions: no spread. The interval stays within [0, 1].
    assert (estimate(np.ones(10)).lower, estimate(np.ones(10)).upper) == (1.0, 1.0)
    assert estimate(np.array([0.02])).lower == 0.0
    with pytest.raises(ValueError):
        estimate(np.array([]))


def test_the_interval_covers_the_realised_accuracy_of_calibrated_predictions() -> None:
    """What the interval promises: if confidences are calibrated, the share right falls inside
    it about 95% of the time."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        p = rng.beta(8, 1.5, size=300)
        realised = (rng.random(300) < p).mean()
        e = estimate(p)
        covered += e.lower <= realised <= e.upper
    assert 0.93 <= covered / 2000 <= 0.97


def test_estimate_per_predicted_label() -> None:
    result = estimate_accuracy(["a", "b", "a", "c"], [0.9, 0.5, 0.7, 1.0])
    assert result is not None
    assert result.overall.accuracy == pytest.approx(0.775)
    assert {label: e.accuracy for label, e in result.by_label.items()} == pytest.approx(
        {"a": 0.8, "b": 0.5, "c": 1.0}
    )
    assert result.by_label["a"].predictions == 2
    assert result.to_dict()["by_label"]["b"]["predictions"] == 1
    assert estimate_accuracy([], []) is None
    with pytest.raises(ValueError, match="2 labels but 1"):
        estimate_accuracy(["a", "b"], [0.5])


def gauges(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, labels without pid)."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            found[(sample.name, labels)] = sample.value
    return found


@pytest.mark.server
def test_estimated_accuracy_gauges_follow_the_logged_predictions(start_service) -> None:
    service = start_service("estimate", env={"REFIT_DRIFT_INTERVAL_S": "1"})
    version = service.registry / "versions" / "v1"
    texts = list(read_jsonl(version / "data" / "test.jsonl").texts)[:48]
    with service.client() as c:
        served = []
        for i in range(0, len(texts), 8):
            answer = c.post("/predict", json={"texts": texts[i:i + 8]})
            assert answer.status_code == 200
            served += answer.json()["predictions"]

    def estimated() -> dict | None:
        values = gauges(service.url)
        window = values.get(("refit_estimated_accuracy_window_predictions", ()))
        return values if window == len(texts) else None

    values = wait_for(estimated, 60, 0.5, "the estimate over every prediction made")

    # What the log holds (every worker's predictions), read straight from the database.
    with sqlite3.connect(service.data_dir / "refit.db") as db:
        logged = db.execute("select label, confidence from predictions").fetchall()
    assert len(logged) == len(texts)
    confidences = np.array([row[1] for row in logged])
    assert sorted(confidences) == pytest.approx(sorted(p["confidence"] for p in served))
    overall = values[("refit_estimated_accuracy_ratio", ())]
    assert 0 <= overall <= 1
    assert overall == pytest.approx(confidences.mean(), abs=1e-9)
    lower = values[("refit_estimated_accuracy_lower_ratio", ())]
    upper = values[("refit_estimated_accuracy_upper_ratio", ())]
    assert 0 <= lower <= overall <= upper <= 1 and upper - lower > 0
    for label in {row[0] for row in logged}:
        mean = np.mean([row[1] for row in logged if row[0] == label])
        assert values[("refit_estimated_accuracy_by_label_ratio", (("label", label),))] == (
            pytest.approx(mean, abs=1e-9)
        )

    # The same over HTTP, with the per-label counts and intervals.
    body = httpx.get(service.url + "/estimate").json()
    assert body["model_version"] == "v1" and body["window"] == 1000
    assert body["accuracy"]["predictions"] == len(texts)
    assert body["accuracy"]["accuracy"] == pytest.approx(overall, abs=1e-9)
    assert (body["accuracy"]["lower"], body["accuracy"]["upper"]) == pytest.approx((lower, upper))
    assert sum(e["predictions"] for e in body["by_label"]) == len(texts)
    per_label = [e["accuracy"] for e in body["by_label"]]
    assert per_label == sorted(per_label)
    assert body["window_start"] <= body["window_end"]

    # The serving version's own figures: the baseline of the alert and its calibration error.
    import json

    manifest = json.loads((version / "manifest.json").read_text())
    assert values[("refit_model_test_accuracy_ratio", ())] == pytest.approx(
        manifest["metrics"]["test"]["accuracy"]
    )
    for split in ("validation", "test"):
        assert values[("refit_model_calibration_error_ratio", (("split", split),))] == (
            pytest.approx(manifest["calibration"][split]["ece_after"])
        )
