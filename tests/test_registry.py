"""The registry's invariants, including under crashes at awkward instants (real processes,
SIGKILL)."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adapters.serving.registry import ModelRegistry
from refit.errors import ConflictError, VersionNotFoundError

ROOT = Path(__file__).resolve().parent.parent


def commit_dummy(registry: ModelRegistry, payload: bytes = b"weights") -> str:
    with registry.stage() as staged:
        (staged.path / "model.onnx").write_bytes(payload)
        version = registry.commit(
            staged, {"labels": ["a", "b"], "payload_sha256": hashlib.sha256(payload).hexdigest()}
        )
    return version.name


def test_versions_are_numbered_and_listed_in_order(tmp_path):
    registry = ModelRegistry(tmp_path)
    names = [commit_dummy(registry) for _ in range(3)]
    assert names == ["v1", "v2", "v3"]
    assert [v.name for v in registry.list_versions()] == names
    assert registry.get("v2").manifest["version"] == "v2"
    assert registry.current() is None


def test_promote_and_rollback(tmp_path):
    registry = ModelRegistry(tmp_path)
    commit_dummy(registry)
    commit_dummy(registry)
    with pytest.raises(ConflictError):
        registry.rollback()
    registry.promote("v1")
    registry.promote("v2")
    assert registry.pointer().version == "v2"
    assert registry.pointer().previous == "v1"
    assert registry.rollback().version == "v1"
    assert registry.current().name == "v1"
    with pytest.raises(VersionNotFoundError, match="v9"):
        registry.promote("v9")
    with pytest.raises(VersionNotFoundError, match="not a version name"):
        registry.get("../etc")
    assert registry.current().name == "v1"


def test_encoder_id_names_the_weights_or_for_old_manifests_the_package(tmp_path):
    registry = ModelRegistry(tmp_path)
    for encoder in ({"sha256": "p" * 64, "id": "w" * 64}, {"sha256": "p" * 64}):
        with registry.stage() as staged:
            registry.commit(staged, {"labels": ["a"], "encoder": encoder})
    assert [v.encoder_id for v in registry.list_versions()] == ["w" * 64, "p" * 64]


def test_failed_write_leaves_nothing(tmp_path):
    registry = ModelRegistry(tmp_path)
    with pytest.raises(RuntimeError), registry.stage() as staged:
        (staged.path / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert registry.list_versions() == []
    assert list(registry.staging_dir.iterdir()) == []


CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from adapters.serving import registry as reg
    from adapters.serving.registry import ModelRegistry
    r = ModelRegistry(sys.argv[1])
    point = sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "before-rename":
        reg.os.rename = die
    if point == "pointer-replace":
        reg.os.replace = die
    if point == "manifest-fsync":
        reg.fsync_tree = die
    with r.stage() as staged:
        (staged.path / "model.onnx").write_bytes(b"x" * 100000)
        if point == "mid-files":
            die()
        v = r.commit(staged, {{"labels": ["a"]}})
    r.promote(v.name)
    """
)


@pytest.mark.parametrize(
    "point", ["mid-files", "manifest-fsync", "before-rename", "pointer-replace"]
)
def test_crash_at_each_step_leaves_registry_and_pointer_intact(tmp_path, point):
    registry = ModelRegistry(tmp_path)
    commit_dummy(registry)
    registry.promote("v1")
    script = tmp_path / "crash.py"
    script.write_text(CRASHER.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), point], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    visible = [v.name for v in registry.list_versions()]
    if point == "pointer-replace":
        # The version was committed before the crash; only the promotion was lost.
        assert visible == ["v1", "v2"]
    else:
        assert visible == ["v1"]
    assert registry.pointer().version == "v1"
    assert registry.current().manifest["labels"] == ["a", "b"]
    removed = registry.cleanup()
    assert list(registry.staging_dir.iterdir()) == []
    if point != "pointer-replace":
        assert len(removed) == 1
    # The registry keeps working after the crash.
    assert commit_dummy(registry) == f"v{len(visible) + 1}"


LOOPER = textwrap.dedent(
    """
    import hashlib, os, sys
    sys.path.insert(0, {root!r})
    from adapters.serving.registry import ModelRegistry
    r = ModelRegistry(sys.argv[1])
    i = 0
    while True:
        i += 1
        payload = os.urandom(200000 + i)
        with r.stage() as staged:
            (staged.path / "model.onnx").write_bytes(payload)
            digest = hashlib.sha256(payload).hexdigest()
            v = r.commit(staged, {{"labels": ["a"], "payload_sha256": digest}})
        r.promote(v.name)
    """
)


def test_random_sigkill_never_exposes_a_partial_version(tmp_path):
    """Kill a writer that commits and promotes in a loop at random instants; check invariants."""
    registry = ModelRegistry(tmp_path)
    script = tmp_path / "loop.py"
    script.write_text(LOOPER.format(root=str(ROOT)))
    rng = random.Random(1)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
        time.sleep(0.4 + rng.random() * 0.6)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for version in registry.list_versions():
            manifest = json.loads((version.path / "manifest.json").read_text())
            payload = (version.path / "model.onnx").read_bytes()
            assert hashlib.sha256(payload).hexdigest() == manifest["payload_sha256"], version.name
        pointer = registry.pointer()
        if pointer is not None:
            assert registry.get(pointer.version).path.is_dir()
    assert len(registry.list_versions()) > 0
    registry.cleanup()
    assert list(registry.staging_dir.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".current")] == []
