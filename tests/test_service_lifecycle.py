"""Server start-up: readiness follows the registry; bad settings stop start-up clearly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from adapters.serving.registry import ModelRegistry
from tests.servers import ROOT, ServiceProcess

pytestmark = pytest.mark.server


def test_not_ready_without_a_model_then_ready_once_promoted(tmp_path, trained_registry):

    empty = ModelRegistry(tmp_path / "registry")
    service = ServiceProcess(registry=empty.root, data_dir=tmp_path / "var", workers=1).start(
        wait_ready=False
    )
    try:
        with service.client() as c:
            assert c.get("/readyz").status_code == 503
            response = c.post("/predict", json={"texts": ["hello"]})
            assert response.status_code == 503 and "no model is loaded" in response.json()["error"]
            shutil.copytree(trained_registry.current().path, empty.versions_dir / "v1")
            empty.promote("v1")
            for _ in range(60):
                if c.get("/readyz").status_code == 200:
                    break
                time.sleep(0.25)
            assert c.post("/predict", json={"texts": ["hello"]}).status_code == 200
    finally:
        service.stop()


def test_bad_setting_stops_start_up_with_a_clear_message(tmp_path):
    service = ServiceProcess(registry=tmp_path / "r", data_dir=tmp_path / "var",
                             env={"REFIT_MAX_TEXTS_PER_REQUEST": "lots"})
    with pytest.raises(RuntimeError) as failure:
        service.start(timeout=60)
    assert "REFIT_MAX_TEXTS_PER_REQUEST" in str(failure.value)


def test_a_clean_shutdown_writes_every_accepted_prediction(tmp_path, trained_registry):
    """With a flush interval far longer than the test, only the shutdown flush can write them."""
    from sqlalchemy import create_engine, text

    db = tmp_path / "refit.db"
    service = ServiceProcess(
        registry=trained_registry.root, data_dir=tmp_path / "var", workers=1,
        env={"REFIT_LOG_FLUSH_INTERVAL_MS": "60000", "REFIT_DATABASE_URL": f"sqlite:///{db}"},
    ).start()
    ids = []
    try:
        with service.client() as c:
            for i in range(5):
                body = c.post(
                    "/predict", json={"texts": [f"shutdown test {i}", "where is my order"]}
                ).json()
                ids += [p["prediction_id"] for p in body["predictions"]]
        engine = create_engine(f"sqlite:///{db}")
        with engine.connect() as conn:
            assert conn.execute(text("select count(*) from predictions")).scalar_one() == 0
    finally:
        assert service.stop() is not None
    with engine.connect() as conn:
        stored = {row[0] for row in conn.execute(text("select id from predictions"))}
    engine.dispose()
    assert stored == set(ids)


def test_serving_code_never_imports_torch_or_transformers(tmp_path, trained_registry):
    """The serving path is onnxruntime + tokenizers: importing the service and predicting with
    the registry's model must not pull in torch or transformers."""
    script = (
        "import sys\n"
        "import service.app\n"
        "from adapters.serving.runtime import OnnxClassifier\n"
        f"OnnxClassifier({str(trained_registry.current().path)!r}).predict(['where is my order'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}\n"
        "             & {'torch', 'transformers', 'sklearn'}))\n"
    )
    env = {"REFIT_REGISTRY_PATH": str(trained_registry.root), "REFIT_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
