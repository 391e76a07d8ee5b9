"""The Kubernetes manifests (deploy/kubernetes) and the image's start command,
deploy/entrypoint.sh.

Manifests: every overlay is rendered with ``kubectl kustomize`` (no cluster needed) from a copy
of the repository files, after ``write-secrets.sh`` wrote its Secret files as a user would; every
object is checked against the Kubernetes 1.32 schemas (``kubernetes-validate``), custom
resources against their essential fields; checkov runs on the rendered output with only the
checks of deploy/kubernetes/checkov-skips.yaml allowed to fail. The PrometheusRule and the
dashboard ConfigMap must carry exactly what monitoring/ holds.

Entry point: run for real, with an empty or broken registry (it must stop with one clear line
and a non-zero exit) and with a trained one (it must exec a real ``bentoml serve`` that gets
ready).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import copy_registry, free_port

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the manifests")

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
OVERLAYS = ("dev", "production")
KUBECTL = "/usr/bin/kubectl"
KUBERNETES_VERSION = "1.32"
CHECKOV_SKIPS = KUBERNETES / "checkov-skips.yaml"
VENV_BIN = Path(sys.executable).parent
EXTERNAL_DATABASE_URL = "postgresql+psycopg://refit:example@db.example.internal:5432/refit"


# -- rendering ---------------------------------------------------------------------------------


def kubectl() -> str:
    if not Path(KUBECTL).exists():
        pytest.skip(f"{KUBECTL} (kubectl with kustomize) is not installed: cannot render overlays")
    return KUBECTL


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each overlay's objects, rendered from a copy in which write-secrets.sh wrote the secrets."""
    tool = kubectl()
    copy = tmp_path_factory.mktemp("repo")
    shutil.copytree(KUBERNETES, copy / "deploy" / "kubernetes",
                    ignore=shutil.ignore_patterns("*.env"))
    shutil.copytree(ROOT / "monitoring", copy / "monitoring",
                    ignore=shutil.ignore_patterns("__pycache__"))
    objects = {}
    for overlay in OVERLAYS:
        written = subprocess.run(
            ["sh", str(copy / "deploy" / "kubernetes" / "write-secrets.sh"), overlay],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "REFIT_DATABASE_URL": EXTERNAL_DATABASE_URL},
        )
        assert written.returncode == 0, written.stderr
        result = subprocess.run(
            [tool, "kustomize", str(copy / "deploy" / "kubernetes" / "overlays" / overlay)],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        (copy / f"{overlay}.yaml").write_text(result.stdout, encoding="utf-8")
        objects[overlay] = [obj for obj in yaml.safe_load_all(result.stdout) if obj]
    objects["_dir"] = copy  # type: ignore[assignment]
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def secret_name(objects: list[dict[str, Any]], prefix: str) -> str:
    names = [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"
             and o["metadata"]["name"].rsplit("-", 1)[0] == prefix]
    assert len(names) == 1, f"Secret {prefix}-<hash>: {names}"
    return names[0]


# -- schemas -----------------------------------------------------------------------------------


def check_custom_resource(obj: dict[str, Any]) -> None:
    """The fields the Prometheus Operator needs (kubernetes-validate has no schema for them)."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"]
    if obj["kind"] == "ServiceMonitor":
        spec = obj["spec"]
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] and endpoint["path"].startswith("/")
    elif obj["kind"] == "PrometheusRule":
        for group in obj["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule) and rule["expr"]
    else:
        raise AssertionError(f"unexpected custom resource {obj['kind']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_matches_the_kubernetes_schemas(rendered, overlay: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kinds = set()
    for obj in rendered[overlay]:
        kinds.add(obj["kind"])
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            check_custom_resource(obj)
    expected = {"Namespace", "ServiceAccount", "Deployment", "Service", "PodDisruptionBudget",
                "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Secret", "ConfigMap", "Job",
                "NetworkPolicy", "ServiceMonitor", "PrometheusRule"}
    assert expected <= kinds, expected - kinds
    assert ("StatefulSet" in kinds) == (overlay == "dev"), "only dev runs its own PostgreSQL"


def test_an_invalid_object_is_caught() -> None:
    """The schema check can fail: a Deployment with a misspelt field is rejected."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = yaml.safe_load((KUBERNETES / "base" / "deployment.yaml").read_text())
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# -- one source for the monitoring objects -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheusrule_carries_the_alerts_file(rendered, overlay: str) -> None:
    alerts = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text(encoding="utf-8"))
    rule = find(rendered[overlay], "PrometheusRule", "refit")
    assert rule["spec"]["groups"] == alerts["groups"], (
        "deploy/kubernetes/base/prometheusrule.yaml differs from monitoring/alerts.yml: run "
        "python deploy/kubernetes/sync_prometheusrule.py"
    )


def test_prometheusrule_file_is_what_the_sync_script_writes() -> None:
    sys.path.insert(0, str(KUBERNETES))
    try:
        import sync_prometheusrule
    finally:
        sys.path.remove(str(KUBERNETES))
    committed = (KUBERNETES / "base" / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == sync_prometheusrule.render(), (
        "run python deploy/kubernetes/sync_prometheusrule.py"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_is_the_dashboard_file(rendered, overlay: str) -> None:
    source = ROOT / "monitoring" / "grafana" / "dashboards" / "refit-overview.json"
    config_map = find(rendered[overlay], "ConfigMap", "refit-grafana-dashboard")
    assert config_map["data"] == {source.name: source.read_text(encoding="utf-8")}
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(config_map["data"][source.name])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scrape_job_is_the_one_the_alerts_select(rendered, overlay: str) -> None:
    """Alerts select job="refit"; the Operator names the job after the Service."""
    service = find(rendered[overlay], "Service", "refit")
    monitor = find(rendered[overlay], "ServiceMonitor", "refit")
    assert "jobLabel" not in monitor["spec"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# -- the Deployment ----------------------------------------------------------------------------


def assert_locked_down(container: dict[str, Any]) -> None:
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_is_secure_drains_and_probes(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    deployment = find(objects, "Deployment", "refit")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] >= 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    (server,) = pod["containers"]
    for container in pod["containers"] + pod["initContainers"]:
        assert_locked_down(container)
    # Writable paths are volumes: per-pod emptyDirs and the shared registry claim.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in server["volumeMounts"]}
    assert "emptyDir" in mounts["/data"] and "emptyDir" in mounts["/tmp"]
    claim = mounts["/data/model_registry"]["persistentVolumeClaim"]["claimName"]
    pvc = find(objects, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == (
        ["ReadWriteOnce"] if overlay == "dev" else ["ReadWriteMany"])
    env = {e["name"]: e for e in server["env"]}
    assert env["REFIT_REGISTRY_PATH"]["value"] == "/data/model_registry"
    assert env["REFIT_DATA_DIR"]["value"].startswith("/data/")
    assert env["BENTOML_HOME"]["value"].startswith("/data/")
    # Secrets: both roles must be set (unset, they answer loopback clients only) and the store
    # must be PostgreSQL, all from the generated Secret.
    secret = secret_name(objects, "refit")
    for variable, key in (("REFIT_ADMIN_TOKEN", "admin-token"),
                          ("REFIT_FEEDBACK_KEY", "feedback-key"),
                          ("REFIT_DATABASE_URL", "database-url")):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret, "key": key}
    # Requests, limits, probes, drain.
    assert set(server["resources"]) == {"requests", "limits"}
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(server["resources"][part])
    assert server["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert [p["containerPort"] for p in server["ports"]] == [3000]
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    longest_request_s = 120  # service/app.py: traffic timeout
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + longest_request_s
    assert server["command"] == ["sh", "/app/deploy/entrypoint.sh", "serve"]
    assert pod["initContainers"][0]["command"] == ["sh", "/app/deploy/entrypoint.sh", "wait"]
    # The image is named once, by the overlay's `images:`.
    images = {c["image"] for c in pod["containers"] + pod["initContainers"]}
    job = find(objects, "Job", "refit-init")
    images |= {c["image"] for c in job["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1 and ":" in images.pop()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_and_disruption_objects_target_the_deployment(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    labels = find(objects, "Deployment", "refit")["spec"]["template"]["metadata"]["labels"]
    hpa = find(objects, "HorizontalPodAutoscaler", "refit")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "refit"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = find(objects, "PodDisruptionBudget", "refit")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert find(objects, "Service", "refit")["spec"]["selector"].items() <= labels.items()


def test_init_job_trains_the_first_version_into_the_shared_registry(rendered) -> None:
    objects = rendered["dev"]
    job = find(objects, "Job", "refit-init")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "/app/deploy/entrypoint.sh", "init"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ENTRYPOINT_TRAIN_DATA"] == "data/demo/intents.jsonl"
    assert (ROOT / env["ENTRYPOINT_TRAIN_DATA"]).is_file()
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/data/model_registry"]["persistentVolumeClaim"]["claimName"] == "refit-registry"
    assert_locked_down(container)


def test_dev_database_url_points_at_the_dev_postgres(rendered) -> None:
    objects = rendered["dev"]
    import base64

    secret = find(objects, "Secret", secret_name(objects, "refit"))
    url = base64.b64decode(secret["data"]["database-url"]).decode()
    password = base64.b64decode(
        find(objects, "Secret", secret_name(objects, "refit-postgres"))["data"]["postgres-password"]
    ).decode()
    assert url == f"postgresql+psycopg://refit:{password}@refit-postgres:5432/refit"
    assert len(password) >= 32
    find(objects, "StatefulSet", "refit-postgres")
    find(objects, "Service", "refit-postgres")
    for key in ("admin-token", "feedback-key"):
        assert len(base64.b64decode(secret["data"][key])) >= 16
    production = rendered["production"]
    secret = find(production, "Secret", secret_name(production, "refit"))
    assert base64.b64decode(secret["data"]["database-url"]).decode() == EXTERNAL_DATABASE_URL


# -- checkov -----------------------------------------------------------------------------------


def checkov() -> str:
    """checkov lives in its own venv (make test-prereqs): its pins clash with the project's."""
    candidates = [os.environ.get("CHECKOV", ""), str(ROOT / ".venv-tools" / "bin" / "checkov"),
                  str(VENV_BIN.parent.parent / ".venv-tools" / "bin" / "checkov"),
                  shutil.which("checkov") or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("checkov is not installed (make test-prereqs puts it in .venv-tools)")


def test_checkov_fails_only_the_explained_checks(rendered) -> None:
    tool = checkov()
    skips = yaml.safe_load(CHECKOV_SKIPS.read_text(encoding="utf-8"))
    assert all(isinstance(reason, str) and len(reason) > 40 for reason in skips.values())
    failed: dict[str, set[str]] = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [tool, "--file", str(rendered["_dir"] / f"{overlay}.yaml"), "--framework",
             "kubernetes", "--output", "json", "--quiet", "--compact"],
            capture_output=True, text=True, timeout=300,
        )
        report = json.loads(result.stdout)
        assert report["summary"]["passed"] > 100, report["summary"]
        for check in report["results"]["failed_checks"]:
            failed.setdefault(check["check_id"], set()).add(f"{overlay}: {check['resource']}")
    unexplained = {check: where for check, where in failed.items() if check not in skips}
    assert not unexplained, f"failed checkov checks not in checkov-skips.yaml: {unexplained}"
    stale = set(skips) - set(failed)
    assert not stale, f"checkov-skips.yaml lists checks that pass now: {stale}"


# -- the entry point ---------------------------------------------------------------------------


def entrypoint_env(registry: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "REFIT_REGISTRY_PATH": str(registry),
        "REFIT_DATA_DIR": str(data_dir),
        "BENTOML_HOME": str(data_dir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        **extra,
    }


def run_entrypoint(mode: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["serve", "init"])
def test_entrypoint_stops_when_it_can_neither_find_nor_train_a_model(tmp_path, mode) -> None:
    env = entrypoint_env(tmp_path / "registry", tmp_path / "var",
                         ENTRYPOINT_TRAIN_DATA=str(tmp_path / "missing.jsonl"))
    result = run_entrypoint(mode, env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (f"refit entrypoint: registry {tmp_path / 'registry'} has no model and "
                        f"the training data {tmp_path / 'missing.jsonl'} is not a readable file")


def test_entrypoint_stops_when_training_fails(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "only one line, no label"}\n', encoding="utf-8")
    result = run_entrypoint("serve", entrypoint_env(tmp_path / "registry", tmp_path / "var",
                                                   ENTRYPOINT_TRAIN_DATA=str(bad)))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"refit entrypoint: registry {tmp_path / 'registry'} has no model and "
        f"'refit train --data {bad}' failed (see above)")


def test_entrypoint_stops_on_an_unreadable_registry(tmp_path) -> None:
    registry = tmp_path / "registry"
    registry.write_text("not a folder", encoding="utf-8")
    result = run_entrypoint("serve", entrypoint_env(registry, tmp_path / "var"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"refit entrypoint: cannot read the model registry at {registry} (see above)")


def test_entrypoint_wait_gives_up_with_a_clear_line(tmp_path) -> None:
    result = run_entrypoint("wait", entrypoint_env(tmp_path / "registry", tmp_path / "var",
                                                  ENTRYPOINT_WAIT_SECONDS="0"))
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"refit entrypoint: no model in registry {tmp_path / 'registry'} after 0s "
        "(is the refit-init Job failing?)")


def test_entrypoint_with_a_model_execs_a_server_that_gets_ready(trained_registry, tmp_path) -> None:
    registry = copy_registry(trained_registry.root, tmp_path / "registry")
    version = trained_registry.pointer().version
    env = entrypoint_env(registry, tmp_path / "var", ENTRYPOINT_PORT=str(port := free_port()),
                         REFIT_WORKERS="1")
    for mode in ("init", "wait"):
        result = run_entrypoint(mode, env)
        assert result.returncode == 0, result.stderr
        assert f"serves version {version}" in result.stdout
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)
        log_text = (tmp_path / "serve.log").read_text(errors="replace")
        assert ready, f"not ready (exit {proc.poll()}):\n{log_text[-4000:]}"
        # exec: the process started as sh is now bentoml itself, so it gets the pod's SIGTERM.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(part.endswith(b"bentoml") for part in cmdline[:2]), cmdline
        assert f"registry {registry} serves version {version}" in log_text
    finally:
        # SIGTERM to the bentoml process itself: its workers are in sessions of their own.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
