"""Shared fixtures, in layers: data → a trained registry → a running server; and, in-process,
settings → a toy registry → a data plane → the HTTP app under Starlette's test client.

Models are trained here, in the test session, from the demo data in the repository: nothing is
downloaded and nothing is read from a registry the developer happens to have.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "demo" / "intents.jsonl"


@pytest.fixture(scope="session")
def demo_data_path() -> Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory):
    """A registry with one promoted version trained on the demo data (no search, for speed)."""
    from adapters.serving.data import read_jsonl
    from adapters.serving.registry import ModelRegistry
    from adapters.training.pipeline import TrainingOptions, train_version
    from adapters.training.search import SearchOptions

    registry = ModelRegistry(tmp_path_factory.mktemp("registry"))
    train_version(
        registry,
        read_jsonl(DEMO_DATA),
        options=TrainingOptions(search=SearchOptions(strategy="none")),
        source=str(DEMO_DATA),
    )
    return registry


@pytest.fixture(scope="module")
def start_service(trained_registry, tmp_path_factory):
    """Start real ``bentoml serve`` processes on a copy of the trained registry; all of them
    stop when the module's tests are done. ``start_service(name, env={...}, workers=2)``."""
    from tests.servers import ServiceProcess, copy_registry

    started: list[ServiceProcess] = []

    def start(name: str, env: dict[str, str] | None = None, workers: int = 2) -> ServiceProcess:
        root = tmp_path_factory.mktemp(name)
        service = ServiceProcess(
            registry=copy_registry(trained_registry.root, root / "registry"),
            data_dir=root / "var", workers=workers, env=env or {},
        )
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run the installed ``refit`` command line in a subprocess, as a user would."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "refit.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="session")
def postgres_database_url():
    """A fresh PostgreSQL database, or a skip naming why PostgreSQL cannot run here."""
    from tests.servers import postgres_url

    url, reason = postgres_url("refit_test_session")
    if url is None:
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    return url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def database_url(backend, request, tmp_path_factory):
    if backend == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'refit.db'}"
    from tests.servers import postgres_url

    url, reason = postgres_url(f"refit_{request.module.__name__.split('.')[-1]}")
    if url is None:
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    return url


# -- in-process: a data plane over a toy ONNX model (tests/fixtures.py) ------------------------


@pytest.fixture(scope="module")
def toy_registry(tmp_path_factory):
    from adapters.serving.registry import ModelRegistry
    from tests.fixtures import write_toy_version

    registry = ModelRegistry(tmp_path_factory.mktemp("toy-registry"))
    write_toy_version(registry)
    return registry


@pytest.fixture(scope="module")
def plane_settings(toy_registry, tmp_path_factory):
    """The defaults a user gets, pointed at the toy registry and a fresh SQLite file."""
    from refit.settings import load_settings

    return load_settings(
        registry_path=toy_registry.root, data_dir=tmp_path_factory.mktemp("plane-var")
    )


@pytest.fixture(scope="module")
def data_plane(plane_settings):
    """A started data plane, built by the service's own composition root (no drift job)."""
    from service.composition import build_data_plane

    plane = build_data_plane(plane_settings, run_drift_job=False)
    plane.start_blocking()
    yield plane
    plane.stop_blocking()


@pytest.fixture(scope="module")
def api(data_plane, plane_settings):
    """The HTTP app over ``data_plane``, called in-process (no server, no BentoML)."""
    from starlette.testclient import TestClient

    from service.app import create_app

    # A client on the service's own machine, as `make serve` users are (roles unset: open).
    with TestClient(create_app(data_plane, plane_settings), client=("127.0.0.1", 50000)) as client:
        yield client
