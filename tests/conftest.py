"""Shared fixtures, in layers: data → a trained registry → (later) a running server.

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
    from adapters.training.search import SearchOptions
    from adapters.training.pipeline import TrainingOptions, train_version

    registry = ModelRegistry(tmp_path_factory.mktemp("registry"))
    train_version(
        registry,
        read_jsonl(DEMO_DATA),
        options=TrainingOptions(search=SearchOptions(strategy="none")),
        source=str(DEMO_DATA),
    )
    return registry


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
