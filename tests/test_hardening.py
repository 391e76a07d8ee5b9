"""Defects of issue 10 checked in-process or through the CLI: the drift report's policy, errors
that never show server paths, and a sequence length the encoder cannot take."""

from __future__ import annotations

import base64
import hashlib

from monitoring.drift_store import DriftResultStore, drift_results
from tests.conftest import run_cli

SCRIPT = b"document.title = 'drift';"
REPORT = b"<html><body><script>" + SCRIPT + b"</script><p>&lt;img src=x&gt;</p></body></html>"


def test_the_drift_report_runs_only_its_own_scripts_sandboxed(api, data_plane):
    # Where the drift job puts its report: the store every replica reads.
    results = DriftResultStore(data_plane.store.engine)
    results.save_report(REPORT)
    try:
        answer = api.get("/drift/report")
    finally:
        with data_plane.store.engine.begin() as conn:
            conn.execute(drift_results.delete())
    assert answer.status_code == 200 and answer.content == REPORT
    policy = answer.headers["content-security-policy"]
    digest = base64.b64encode(hashlib.sha256(SCRIPT).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy
    assert "sandbox allow-scripts" in policy and "connect-src 'none'" in policy
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["cache-control"] == "no-store"


def test_errors_never_show_server_paths(api, plane_settings):
    registry = str(plane_settings.registry_path)
    data = str(plane_settings.data_dir)
    for answer in (
        api.post("/models/promote", json={"version": "v999"}),
        api.get("/drift/report"),
        api.get("/no/such/path"),
        api.get("/retrain/job-20990101-000000-abcdef"),
    ):
        assert answer.status_code == 404, answer.text
        assert registry not in answer.text and data not in answer.text, answer.text


def test_docs_page_allows_its_own_assets_only(api):
    answer = api.get("/docs")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self' 'sha256-" in policy and "default-src 'none'" in policy


def test_a_sequence_length_the_encoder_cannot_take_is_a_usage_error(tmp_path, demo_data_path):
    for length in ("1000", "0", "513", "many"):
        proc = run_cli("train", "--data", str(demo_data_path), "--registry", str(tmp_path / "r"),
                       "--max-seq-length", length)
        assert proc.returncode == 2, (length, proc.stderr)
        assert "Traceback" not in proc.stderr and "--max-seq-length" in proc.stderr
    assert not (tmp_path / "r").exists()
