"""Named leases in the store: how replicas sharing one database agree on who does a job alone.

A lease is one row (``name``, ``holder``, ``expires_at``). :meth:`LeaseStore.acquire` takes a free
or expired lease, or renews one its caller already holds, in a single atomic statement; the holder
keeps it by renewing it more often than its time to live. When the holder dies, its lease simply
expires and the next caller takes it over. Expiry is judged by the *database's* clock, never by
the replicas', so clock skew between machines cannot give a lease to two holders at once.

This is what elects the one drift job of a cluster on PostgreSQL (``monitoring.leader``). A lease
row works through connection poolers and needs no connection held open, unlike a session-level
advisory lock; its price is that a dead holder is noticed only when its lease expires.
"""

from __future__ import annotations

import time

from sqlalchemy import Column, Float, MetaData, String, Table, delete, select
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

metadata = MetaData()

leases = Table(
    "refit_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),
    # Seconds since the epoch, by the database's clock.
    Column("expires_at", Float, nullable=False),
)

# The database's own clock, in seconds since the epoch.
_NOW = {
    "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())::double precision",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}

_ACQUIRE = """
INSERT INTO refit_leases (name, holder, expires_at) VALUES (:name, :holder, {now} + :ttl)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
WHERE refit_leases.holder = excluded.holder OR refit_leases.expires_at < {now}
RETURNING holder
"""


class LeaseStore:
    """Acquire, renew, release and read named leases (PostgreSQL or SQLite)."""

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name not in _NOW:
            raise ValueError(f"leases need PostgreSQL or SQLite, not {engine.dialect.name}")
        self.engine = engine
        self._now = _NOW[engine.dialect.name]
        for attempt in range(5):  # replicas start at once: creating the table can race
            try:
                metadata.create_all(engine)
                break
            except (OperationalError, ProgrammingError, IntegrityError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def acquire(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take lease ``name`` for ``ttl_s`` seconds if it is free, expired or already
        ``holder``'s (then it is renewed); whether ``holder`` holds it now."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sql_text(_ACQUIRE.format(now=self._now)),
                {"name": name, "holder": holder, "ttl": float(ttl_s)},
            ).first()
        return row is not None and row[0] == holder

    def release(self, name: str, holder: str) -> None:
        """Give the lease up at once (a clean stop), so the next holder need not wait it out."""
        with self.engine.begin() as conn:
            conn.execute(delete(leases).where(leases.c.name == name, leases.c.holder == holder))

    def holder(self, name: str) -> str | None:
        """Who holds lease ``name`` now (``None`` when it is free or expired)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(leases.c.holder).where(
                    leases.c.name == name, leases.c.expires_at >= sql_text(self._now)
                )
            ).first()
        return None if row is None else str(row[0])
