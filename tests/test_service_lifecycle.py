"""Server start-up: readiness follows the registry; bad settings stop start-up clearly."""

from __future__ import annotations

import shutil
import time

import pytest

from adapters.registry import ModelRegistry
from tests.servers import ServiceProcess

pytestmark = pytest.mark.server


def test_not_ready_without_a_model_then_ready_once_promoted(tmp_path, trained_registry):

    empty = ModelRegistry(tmp_path / "registry")
    service = ServiceProcess(registry=empty.root, data_dir=tmp_path / "var", workers=1).start(wait_ready=False)
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
