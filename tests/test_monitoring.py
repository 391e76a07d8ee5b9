"""Monitoring end to end: a real Prometheus scrapes the running service; drift on live traffic.

Every PromQL expression of the dashboards and alert rules must be valid, and every metric and
label it selects must be present in what Prometheus scraped from the service after some traffic.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from adapters.serving.data import read_jsonl
from tests.offtopic import offtopic_texts
from tests.servers import PrometheusProcess, wait_for

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="Prometheus not installed (make test-prereqs installs Debian's package)",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
DRIFT_WINDOW = 150

PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "by", "on", "without", "ignoring", "unless", "and", "or",
    "histogram_quantile", "count", "max", "min", "avg", "time", "le", "bool", "group_left",
    "group_right", "offset", "topk", "bottomk", "abs", "clamp_min", "clamp_max", "vector",
}


def expressions() -> list[str]:
    exprs = []
    rules = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    for group in rules["groups"]:
        exprs.extend(rule["expr"] for rule in group["rules"])

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for path in (ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        exprs.extend(
            t["expr"]
            for p in panels(dashboard["panels"])
            for t in p.get("targets", [])
            if t.get("expr")
        )
    return exprs


def selectors(expr: str) -> list[tuple[str, dict[str, str], set[str]]]:
    """(metric, {label: value} for '=' matchers, all label names matched) per vector selector."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations like [5m]
    stripped = re.sub(r'"[^"]*"', '""', expr)
    found = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr):
        name = match.group(1)
        start = match.start(1)
        if name in PROMQL_WORDS or (start > 0 and expr[start - 1] in "\"'"):
            continue
        # Skip label names inside by(...)/on(...) clauses and inside braces.
        before = stripped[:start]
        if before.count("{") > before.count("}"):
            continue
        if re.search(r"(by|on|without|ignoring)\s*\([^)]*$", expr[:start]):
            continue
        if re.match(r"\s*\(", expr[match.end(1):]) and match.group(2) is None:
            continue  # a function call
        equals: dict[str, str] = {}
        labels: set[str] = set()
        for matcher in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', match.group(2) or ""):
            labels.add(matcher.group(1))
            if matcher.group(2) == "=":
                equals[matcher.group(1)] = matcher.group(3)
        found.append((name, equals, labels))
    return found


@pytest.fixture(scope="module")
def stack(start_service, tmp_path_factory):
    service = start_service(
        "monitoring",
        env={"REFIT_DRIFT_INTERVAL_S": "1", "REFIT_DRIFT_WINDOW": str(DRIFT_WINDOW),
             "REFIT_DRIFT_MIN_WINDOW": "100", "REFIT_ONLINE_ACCURACY_WINDOW": "100"},
    )
    prometheus = PrometheusProcess(
        tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{service.port}"
    ).start()
    yield service, prometheus
    prometheus.stop()


def held_out_texts(registry_root: Path) -> list[str]:
    from adapters.serving.registry import ModelRegistry

    version = ModelRegistry(registry_root).current()
    return list(read_jsonl(version.path / "data" / "test.jsonl").texts
                + read_jsonl(version.path / "data" / "validation.jsonl").texts)


def wait_drift(client: httpx.Client, after: float, timeout: float = 60) -> dict:
    def finished() -> dict | None:
        body = client.get("/drift").json()
        return body if body.get("status") == "ok" and body["computed_at"] > after else None

    return wait_for(finished, timeout, 0.5, f"a drift result computed after {after}")


def test_drift_flag_follows_the_traffic(stack):
    service, _ = stack
    texts = held_out_texts(service.registry)
    assert len(texts) >= 100
    with service.client() as c:
        assert c.get("/drift").json()["status"] in ("pending", "insufficient_data")
        assert c.get("/drift/report").status_code == 404
        for i in range(0, len(texts), 16):
            assert c.post("/predict", json={"texts": texts[i:i + 16]}).status_code == 200
        calm = wait_drift(c, time.time() + 0.5)
        assert calm["window"]["size"] == len(texts)
        assert calm["drift_detected"] is False, calm["signals"]
        assert calm["reference_version"] == "v1"
        for signal in ("label", "confidence", "embedding", "text_length"):
            entry = calm["signals"][signal]
            assert {"method", "score", "threshold", "drifted"} <= set(entry)

        shifted = offtopic_texts(DRIFT_WINDOW)
        for i in range(0, len(shifted), 16):
            assert c.post("/predict", json={"texts": shifted[i:i + 16]}).status_code == 200
        alarm = wait_drift(c, time.time() + 0.5)
        assert alarm["drift_detected"] is True
        assert alarm["signals"]["embedding"]["drifted"] and alarm["signals"]["label"]["drifted"]

        report = c.get("/drift/report")
        assert report.status_code == 200
        assert report.headers["content-type"].startswith("text/html")
        # The report of the latest window: the three tabular signals by column name.
        assert all(
            column in report.text for column in ("predicted_label", "confidence", "text_length")
        )
        assert len(report.text) > 10_000


def test_every_dashboard_and_alert_expression_resolves_in_prometheus(stack):
    service, prometheus = stack
    texts = held_out_texts(service.registry)
    with service.client() as c:
        # Traffic of every kind: predictions, feedback on them (right and wrong), errors, models.
        predictions = []
        for i in range(0, 64, 8):
            predictions += c.post("/predict", json={"texts": texts[i:i + 8]}).json()["predictions"]
        items = [
            {"prediction_id": p["prediction_id"], "label": p["label"] if n % 4 else "talk_to_human"}
            for n, p in enumerate(predictions)
        ]
        items.append({"text": "do you ship abroad", "label": "shipping"})
        assert c.post("/feedback", json={"items": items}).status_code == 200
        assert c.post("/predict", json={"texts": []}).status_code == 422
        c.get("/models")
        wait_drift(c, 0)
    time.sleep(8)  # several scrapes, so rate() has points

    scraped = httpx.get(service.url + "/metrics").text
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=scraped, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    problems = []
    for expr in expressions():
        answer = prometheus.query(expr)
        if answer.get("status") != "success":
            problems.append(f"invalid: {expr}: {answer}")
            continue
        for name, equals, labels in selectors(expr):
            series = prometheus.query(f"last_over_time({name}[5m])")["data"]["result"]
            if not series:
                problems.append(f"no series for {name} (in {expr})")
                continue
            present = {label for s in series for label in s["metric"]}
            for label in labels - present:
                problems.append(f"{name} has no label {label!r} (in {expr})")
            for label, value in equals.items():
                if label in present and not any(s["metric"].get(label) == value for s in series):
                    problems.append(f"{name} has no series with {label}={value!r} (in {expr})")
    assert not problems, "\n".join(problems)

    # Spot checks of values the scenario fixed.
    workers = prometheus.query('refit_model_info == 1')["data"]["result"]
    assert {s["metric"]["model_version"] for s in workers} == {"v1"} and len(workers) == 2
    accuracy = float(
        prometheus.query("refit_online_accuracy_ratio")["data"]["result"][0]["value"][1]
    )
    assert 0.5 <= accuracy <= 0.85  # a quarter of the feedback said the model was wrong
