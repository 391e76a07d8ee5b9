"""The model registry: a folder of immutable versions and one pointer to the serving version.

Layout::

    <root>/
      versions/v1/  manifest.json  model.onnx  tokenizer.json  labels.json  data/ ...
      versions/v2/  ...
      current.json  {"version": "v2", "previous": "v1", "promoted_at": "..."}
      .staging/     versions being written (never read by anyone but their writer), each named
                    <writer's host key>-<pid>-<random>
      .lock         serialises writers (flock)

Invariants, which hold whatever instant a process dies at:

* A version is visible only once complete. It is written into ``.staging/``, every file and folder
  is fsynced, then the folder is renamed into ``versions/`` in one step. A crash leaves at most an
  orphaned staging folder, which :meth:`ModelRegistry.cleanup` removes. Several hosts may share
  the registry (replicas on one network volume): a staging folder names its writer's host and
  process, and clean-up removes only its own host's folders whose writer is gone, and other hosts'
  folders nobody has written to for a long time; never another host's work in progress.
* Versions are never modified after they appear.
* ``current.json`` is replaced atomically (temporary file, fsync, rename, fsync of the folder), and
  only ever names a version that is already visible, so it never dangles.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
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


STAGING_STALE_AFTER_S = 3600.0
"""Another host's staging folder untouched this long is presumed abandoned."""


def host_key() -> str:
    """Identifies the processes that share this process's ids: the host name, the machine's boot
    and the pid namespace (so two containers, or one container before and after a restart, never
    judge each other's writers by process id)."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(
                os.readlink(source) if source.endswith("/pid") else Path(source).read_text()
            )
        except OSError:
            parts.append("")
    return hashlib.sha256("\0".join(p.strip() for p in parts).encode()).hexdigest()[:12]


def last_written(root: Path) -> float:
    """The newest modification time of ``root`` and everything under it."""
    newest = 0.0
    for folder, _, files in os.walk(root):
        for path in (folder, *(os.path.join(folder, name) for name in files)):
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(path).st_mtime)
    return newest


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

    def lineage(self) -> Iterator[ModelVersion]:
        """This version, then its parent, its parent's parent, … (the manifests' ``parent``,
        folders beside this one), as far as the manifests are readable; a cycle ends it."""
        current: ModelVersion | None = self
        seen: set[Path] = set()
        while current is not None and current.path not in seen:
            seen.add(current.path)
            try:
                parent = current.manifest.get("parent")
            except (OSError, ValueError):
                return
            yield current
            current = (ModelVersion(str(parent), current.path.parent / str(parent))
                       if parent else None)

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
        path = self.staging_dir / f"{host_key()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
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

    def cleanup(self, stale_after_s: float = STAGING_STALE_AFTER_S) -> list[Path]:
        """Remove what crashed writers left behind; returns what was removed.

        That is staging folders of this host whose writer process is gone, staging folders of
        other hosts (whose process ids mean nothing here) untouched for ``stale_after_s``, and
        temporary pointer files (safe to remove under the lock, which every pointer writer holds
        while its file exists).
        """
        removed: list[Path] = []
        if not self.staging_dir.is_dir():
            return removed
        here = host_key()
        for entry in self.staging_dir.iterdir():
            parts = entry.name.split("-")
            if len(parts) == 2 and parts[0].isdigit():  # written before names carried the host
                host, pid = here, parts[0]
            elif len(parts) == 3 and parts[1].isdigit():
                host, pid = parts[0], parts[1]
            else:
                host, pid = "", ""
            if host == here:
                if pid_alive(int(pid)):
                    continue
            elif time.time() - last_written(entry) < stale_after_s:
                continue  # another host's, and maybe still being written
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        with self._locked():
            for leftover in self.root.glob(f".{POINTER}.*"):
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
        return removed
