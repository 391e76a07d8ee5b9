"""Where the drift job's latest result and report live: the store every replica reads.

The drift job writes its latest result (JSON) and Evidently's HTML report as two rows of the
``drift_results`` table, in the same database as predictions and feedback; every worker of every
replica serves ``/drift`` and ``/drift/report`` from there, so all of them show the same thing
(with files in a replica's own data folder, only the replica running the job would). Each write
replaces one row in one transaction: a reader sees the old result or the new one, never a mix.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Column, Float, LargeBinary, MetaData, String, Table, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

metadata = MetaData()

drift_results = Table(
    "drift_results",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("updated_at", Float, nullable=False),
    Column("body", LargeBinary, nullable=False),
)

LATEST = "latest"
REPORT = "report"


class DriftResultStore:
    """The latest drift result and report, shared by every replica through the store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        for attempt in range(5):  # workers start at once: creating the table can race
            try:
                metadata.create_all(engine)
                break
            except (OperationalError, ProgrammingError, IntegrityError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _put(self, name: str, body: bytes) -> None:
        values = {"updated_at": time.time(), "body": body}
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(drift_results).where(drift_results.c.name == name).values(**values)
            ).rowcount
            if not changed:
                conn.execute(insert(drift_results).values(name=name, **values))

    def save_result(self, result: dict[str, Any]) -> None:
        self._put(LATEST, json.dumps(result).encode())

    def save_report(self, html: bytes) -> None:
        self._put(REPORT, html)

    def latest(self) -> dict[str, Any] | None:
        """The latest result, or ``None`` before the first run."""
        with self.engine.connect() as conn:
            body = conn.execute(
                select(drift_results.c.body).where(drift_results.c.name == LATEST)
            ).scalar()
        if body is None:
            return None
        result: dict[str, Any] = json.loads(bytes(body))
        return result

    def report_version(self) -> float | None:
        """When the report was last written (``None``: never): a cheap check before reading it."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(drift_results.c.updated_at).where(drift_results.c.name == REPORT)
            ).scalar()
        return None if value is None else float(value)

    def report(self) -> tuple[float, bytes] | None:
        """The latest report's HTML with its write time, or ``None`` before the first report."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(drift_results.c.updated_at, drift_results.c.body)
                .where(drift_results.c.name == REPORT)
            ).first()
        return None if row is None else (float(row[0]), bytes(row[1]))
