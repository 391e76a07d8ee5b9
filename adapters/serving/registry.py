"""The model registry: a folder of immutable versions and one pointer to the serving version.

Layout::

    <root>/
      versions/v1/  manifest.json  model.onnx  tokenizer.json  labels.json  data/ ...
      versions/v2/  ...
      current.json  {"version": "v2", "previous": "v1", "promoted_at": "..."}
      .staging/     versions being written (never read by anyone but their writer)
      .lock         serialises writers (flock)

Invariants, which hold whatever instant a process dies at:

* A version is visible only once complete. It is written into ``.staging/``, every file and folder
  is fsynced, then the folder is renamed into ``versions/`` in one step. A crash leaves at most an
  orphaned staging folder, which :meth:`ModelRegistry.cleanup` removes.
* Versions are never modified after they appear.
* ``current.json`` is replaced atomically (temporary file, fsync, rename, fsync of the folder), and
  only ever names a version that is already visible, so it never dangles.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from refit.errors import ConflictError, RegistryError, VersionNotFoundError
from refit.files import atomic_write_json, fsync_path, fsync_tree
from refit.processes import pid_alive

_VERSION_NAME = re.compile(r"^v(\d+)$")
MANIFEST = "manifest.json"
POINTER = "current.json"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def version_number(version: str) -> int:
    match = _VERSION_NAME.match(version)
    if match is None:
        raise VersionNotFoundError(
            f"{version!r} is not a version name (versions are v1, v2, ...)", field="version"
        )
    return int(match.group(1))


@dataclass(frozen=True)
class ModelVersion:
    """A committed, immutable version folder."""

    name: str
    path: Path

    @property
    def number(self) -> int:
        return version_number(self.name)

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def encoder_id(self) -> str:
        """Identifies the encoder weights behind this version's embeddings.

        Embeddings computed under two versions with the same id are interchangeable, so a retrain
        reuses logged ones instead of encoding again. Manifests written before the ``id`` field
        existed name the encoder package's hash, which is what identified the weights then.
        """
        encoder = self.manifest["encoder"]
        return str(encoder.get("id", encoder["sha256"]))

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def int8_path(self) -> Path | None:
        """The version's int8 model, if it has one (versions since issue 11)."""
        record = self.manifest.get("int8")
        return self.path / record["file"] if isinstance(record, dict) else None


@dataclass(frozen=True)
class Pointer:
    version: str
    previous: str | None
    promoted_at: str


class StagedVersion:
    """A version being written. Put files under :attr:`path`, then :meth:`ModelRegistry.commit`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.committed: ModelVersion | None = None


class ModelRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / ".staging"
        self.pointer_path = self.root / POINTER

    # -- reading -----------------------------------------------------------------------------

    def list_versions(self) -> list[ModelVersion]:
        if not self.versions_dir.is_dir():
            return []
        found = [
            ModelVersion(entry.name, entry)
            for entry in self.versions_dir.iterdir()
            if _VERSION_NAME.match(entry.name) and (entry / MANIFEST).is_file()
        ]
        return sorted(found, key=lambda v: v.number)

    def get(self, version: str) -> ModelVersion:
        version_number(version)
        path = self.versions_dir / version
        if not (path / MANIFEST).is_file():
            known = ", ".join(v.name for v in self.list_versions()[-10:]) or "none"
            raise VersionNotFoundError(
                f"model version {version!r} is not in the registry "
                f"(known: {known})",
                field="version",
            )
        return ModelVersion(version, path)

    def pointer(self) -> Pointer | None:
        try:
            raw = json.loads(self.pointer_path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError) as exc:  # pragma: no cover - atomic writes
            raise RegistryError(
                f"the registry pointer {POINTER} is unreadable ({type(exc).__name__})"
            ) from exc
        return Pointer(raw["version"], raw.get("previous"), raw.get("promoted_at", ""))

    def current(self) -> ModelVersion | None:
        """The serving version, or ``None`` when nothing has been promoted yet."""
        pointer = self.pointer()
        return None if pointer is None else self.get(pointer.version)

    # -- writing -----------------------------------------------------------------------------

    def _ensure_layout(self) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_layout()
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def stage(self) -> Iterator[StagedVersion]:
        """A private folder to write a new version into; removed unless committed."""
        self._ensure_layout()
        path = self.staging_dir / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        staged = StagedVersion(path)
        try:
            yield staged
        finally:
            if staged.committed is None:
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, staged: StagedVersion, manifest: dict[str, Any]) -> ModelVersion:
        """Name the staged version, write its manifest and make it visible in one rename."""
        with self._locked():
            existing = self.list_versions()
            number = (existing[-1].number if existing else 0) + 1
            # A crashed writer may have left a folder without manifest under this number.
            while (self.versions_dir / f"v{number}").exists():
                number += 1
            name = f"v{number}"
            manifest = {"version": name, **{k: v for k, v in manifest.items() if k != "version"}}
            (staged.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            fsync_tree(staged.path)
            target = self.versions_dir / name
            os.rename(staged.path, target)
            fsync_path(self.versions_dir)
        version = ModelVersion(name, target)
        staged.committed = version
        return version

    def promote(self, version: str) -> Pointer:
        """Make ``version`` the serving version (a rollback is a promote of an older version)."""
        with self._locked():
            self.get(version)
            old = self.pointer()
            if old is not None and old.version == version:
                return old
            pointer = Pointer(version, old.version if old else None, utc_now())
            atomic_write_json(self.pointer_path, pointer.__dict__)
            return pointer

    def rollback(self) -> Pointer:
        """Promote the version that was serving before the current one."""
        pointer = self.pointer()
        if pointer is None or pointer.previous is None:
            raise ConflictError("there is no previous version to roll back to")
        return self.promote(pointer.previous)

    def cleanup(self) -> list[Path]:
        """Remove what crashed writers left behind; returns what was removed.

        That is staging folders whose writer process is gone, and temporary pointer files (safe
        to remove under the lock, which every pointer writer holds while its file exists).
        """
        removed: list[Path] = []
        if not self.staging_dir.is_dir():
            return removed
        for entry in self.staging_dir.iterdir():
            owner = entry.name.split("-", 1)[0]
            if owner.isdigit() and pid_alive(int(owner)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        with self._locked():
            for leftover in self.root.glob(f".{POINTER}.*"):
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
        return removed
