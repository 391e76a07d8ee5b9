"""The store of predictions, feedback and retrain jobs: SQLite by default, PostgreSQL by URL.

SQLAlchemy 2 Core, no ORM: the rows are simple and the hot path (batched prediction inserts) wants
``executemany``. SQLite runs in WAL mode with ``synchronous=FULL``, so a committed transaction
survives a crash of the process or the machine; every write is one transaction.

Embeddings are float32 vectors stored as bytes, tagged with the id of the encoder that produced
them (``encoder_id``): retraining reuses an embedding only when its encoder is the one it trains on.

Every change to feedback (insert, relabel, deletion, an earlier label replaced by a newer one) also
appends a row to ``feedback_events`` in the same transaction: a change feed, ordered by ``seq``,
that every serving worker follows to keep its feedback memory current
(:meth:`Store.feedback_changes`). On PostgreSQL the writers of events take one transaction-level
advisory lock first, so sequence numbers are handed out in commit order and a follower reading
"everything after seq N" can never skip a change committed late.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sqlalchemy import (
    Column,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.types import TypeDecorator

from refit.errors import ConflictError, NotFoundError, StoreUnavailableError
from refit.jobs import TERMINAL_PHASES, Job, RetrainOptions

# A text column's escape marker: a noncharacter no real text starts with. Texts holding NUL (which
# PostgreSQL's ``text`` rejects) or starting with the marker are stored as the marker followed by
# their JSON string literal, which spells NUL as \u0000; every other text is stored as it is.
_ESCAPED = "\uffff"


class RowsRejectedError(Exception):
    """The database refused the rows themselves (a bad value, a constraint), not the connection."""


class LosslessText(TypeDecorator[str]):
    """Text that round-trips exactly on every backend, NUL characters included."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and ("\x00" in value or value.startswith(_ESCAPED)):
            return _ESCAPED + json.dumps(value, ensure_ascii=False)
        return value

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and value.startswith(_ESCAPED):
            decoded: str = json.loads(value[len(_ESCAPED):])
            return decoded
        return value

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("created_at", Float, nullable=False, index=True),
    Column("model_version", String(32), nullable=False),
    Column("text", LosslessText, nullable=False),
    Column("label", String(200), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("embedding", LargeBinary, nullable=False),
    # Top-1 less top-2 model probability (the review queue's `margin` strategy); NULL on rows
    # logged before it was recorded.
    Column("margin", Float, nullable=True),
    # The review queue walks these in order: (version, score, id) answers "the least confident
    # unlabelled predictions of this version" from the index, stopping after the first few;
    # created_at in the index lets expired rows be skipped, and the queue's size be counted,
    # without reading the rows themselves.
    Index("ix_predictions_review_confidence", "model_version", "confidence", "id", "created_at"),
    Index("ix_predictions_review_margin", "model_version", "margin", "id", "created_at"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False, index=True),
    Column("prediction_id", String(40), nullable=True, index=True),
    Column("text", LosslessText, nullable=False),
    Column("label", String(200), nullable=False),
    Column("predicted_label", String(200), nullable=True),
    Column("model_version", String(32), nullable=True),
    Column("embedding", LargeBinary, nullable=True),
    Column("encoder_id", String(64), nullable=True),
)

feedback_events = Table(
    "feedback_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("feedback_id", Integer, nullable=False),
    # The item's label after the change; NULL: the item was deleted.
    Column("label", String(200), nullable=True),
    Column("created_at", Float, nullable=False),
)

# Any constant: the key of the advisory lock that orders feedback events on PostgreSQL.
_EVENTS_LOCK_KEY = 0x7265666974  # "refit"

retrain_jobs = Table(
    "retrain_jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("phase", String(20), nullable=False),
    # 1 while the job is running, NULL once it ended: the UNIQUE constraint admits one running job.
    Column("running", Integer, nullable=True, unique=True),
    Column("pid", Integer, nullable=True),
    Column("host", String(255), nullable=True),
    Column("options", Text, nullable=False),
    Column("progress", Text, nullable=True),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
)

@dataclass(frozen=True)
class PredictionRecord:
    id: str
    created_at: float
    model_version: str
    text: str
    label: str
    confidence: float
    embedding: bytes
    margin: float | None = None
    """The model's top-1 less top-2 probability (``None`` on rows logged before it was kept)."""


@dataclass(frozen=True)
class ReviewCandidate:
    """An unlabelled logged prediction, as the review queue considers it."""

    id: str
    created_at: float
    text: str
    label: str
    confidence: float
    margin: float | None
    embedding: np.ndarray | None
    """Only when asked for (the ``diverse`` strategy clusters them)."""


@dataclass(frozen=True)
class FeedbackSubmission:
    """One feedback item as a client gives it: a logged prediction's id or a text, and a label."""

    prediction_id: str | None
    text: str | None
    label: str


@dataclass(frozen=True)
class FeedbackRecord:
    prediction_id: str | None
    text: str
    label: str
    predicted_label: str | None = None
    model_version: str | None = None
    embedding: bytes | None = None
    encoder_id: str | None = None


@dataclass(frozen=True)
class ReplacedFeedback:
    """An earlier feedback item on the same prediction, removed because a newer label wins."""

    prediction_id: str
    previous_label: str
    feedback_id: int


@dataclass(frozen=True)
class FeedbackInsert:
    """What an insert did: the new ids in order, and the earlier items the newer labels replaced."""

    ids: list[int]
    replaced: list[ReplacedFeedback]


@dataclass(frozen=True)
class FeedbackEntry:
    """A feedback item as listed (without its embedding)."""

    id: int
    created_at: float
    prediction_id: str | None
    text: str
    label: str
    predicted_label: str | None
    model_version: str | None


@dataclass(frozen=True)
class FeedbackQuery:
    """Which feedback to list: newest first, ``limit`` items with ids below ``before_id``."""

    label: str | None = None
    since: float | None = None
    source: Literal["prediction_id", "text"] | None = None
    limit: int = 100
    before_id: int | None = None


@dataclass(frozen=True)
class LabelFeedbackStats:
    """Feedback on one label: how many items, how many on logged predictions, and how many of
    those the model had predicted right."""

    items: int
    on_predictions: int
    predicted_right: int


@dataclass(frozen=True)
class FeedbackEvent:
    """One change to feedback, as the change feed reports it.

    ``label`` is the item's label after the change, ``None`` when it was deleted. ``text``,
    ``embedding`` and ``encoder_id`` are the item's as stored now (``text`` is ``None`` when the
    item is gone: a later event deletes it).
    """

    seq: int
    feedback_id: int
    label: str | None
    text: str | None
    embedding: np.ndarray | None
    encoder_id: str | None


@dataclass(frozen=True)
class StoredFeedback:
    id: int
    created_at: float
    prediction_id: str | None
    text: str
    label: str
    predicted_label: str | None
    model_version: str | None
    embedding: np.ndarray | None
    encoder_id: str | None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _unavailable_on_disconnect(context: Any) -> None:
    """Turn "cannot reach the database" into :class:`StoreUnavailableError` (a 503 at the edge).

    Connection failures (refused, reset, timed out, server shut down) surface from the driver as
    ``OperationalError``/``InterfaceError`` or as a disconnect; data errors (a bad value, a
    constraint) are left alone, so they keep their own handling.
    """
    original = context.original_exception
    sqlalchemy_error = context.sqlalchemy_exception
    name = type(original).__name__
    disconnect = bool(getattr(context, "is_disconnect", False))
    if disconnect or name in ("OperationalError", "InterfaceError", "ConnectionTimeout"):
        message = str(original).lower()
        # SQLite: only a locked or unreadable file is "unavailable"; syntax/schema errors
        # are OperationalError too and are real bugs.
        if (
            context.dialect is not None
            and context.dialect.name == "sqlite"
            and not disconnect
            and "locked" not in message
            and "unable to open" not in message
        ):
            return
        raise StoreUnavailableError(
            "the database is unreachable; try again shortly"
        ) from (sqlalchemy_error or original)


def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def bytes_vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)


class Store:
    """All persistent state besides the model registry."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Several workers start at once: creating the tables can race; the loser retries and
        # then finds them.
        for attempt in range(5):
            try:
                metadata.create_all(engine)
                _upgrade_schema(engine)
                break
            except (OperationalError, ProgrammingError, IntegrityError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @classmethod
    def from_url(cls, url: str) -> Store:
        if url.startswith("sqlite"):
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                from pathlib import Path

                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(
                url, pool_size=4, max_overflow=4, pool_pre_ping=True,
                # Fail fast while the server is down rather than hold a request for minutes.
                connect_args={"connect_timeout": 3},
            )
        event.listen(engine, "handle_error", _unavailable_on_disconnect)
        return cls(engine)

    def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the database answers a trivial query."""
        with self.engine.connect() as conn:
            conn.execute(select(1))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # -- predictions ------------------------------------------------------------------------

    def insert_predictions(self, rows: Sequence[PredictionRecord]) -> None:
        if not rows:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(predictions), [row.__dict__ for row in rows])
        except (DataError, IntegrityError) as exc:
            raise RowsRejectedError(str(exc.orig or exc)) from exc

    def get_predictions(self, ids: Iterable[str]) -> dict[str, PredictionRecord]:
        wanted = list(set(ids))
        if not wanted:
            return {}
        with self.engine.connect() as conn:
            result = conn.execute(select(predictions).where(predictions.c.id.in_(wanted)))
            return {row.id: PredictionRecord(**row._asdict()) for row in result}

    def recent_predictions(
        self, limit: int, model_version: str | None = None
    ) -> list[PredictionRecord]:
        """The newest ``limit`` predictions (of one model version if given), oldest first."""
        query = select(predictions).order_by(predictions.c.created_at.desc()).limit(limit)
        if model_version is not None:
            query = query.where(predictions.c.model_version == model_version)
        with self.engine.connect() as conn:
            rows = [PredictionRecord(**row._asdict()) for row in conn.execute(query)]
        rows.reverse()
        return rows

    def recent_confidences(
        self, limit: int, model_version: str
    ) -> list[tuple[str, float, float]]:
        """(label, confidence, created_at) of the newest ``limit`` predictions of one version,
        oldest first: what the accuracy estimate reads (no texts, no embeddings)."""
        query = (
            select(predictions.c.label, predictions.c.confidence, predictions.c.created_at)
            .where(predictions.c.model_version == model_version)
            .order_by(predictions.c.created_at.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            rows = [(row[0], float(row[1]), float(row[2])) for row in conn.execute(query)]
        rows.reverse()
        return rows

    def enforce_retention(self, max_rows: int, max_age_seconds: float) -> int:
        """Delete predictions beyond the newest ``max_rows`` or older than the age limit."""
        cutoff = time.time() - max_age_seconds
        with self.engine.begin() as conn:
            deleted = conn.execute(
                delete(predictions).where(predictions.c.created_at < cutoff)
            ).rowcount
            boundary = conn.execute(
                select(predictions.c.created_at)
                .order_by(predictions.c.created_at.desc())
                .offset(max_rows)
                .limit(1)
            ).scalar()
            if boundary is not None:
                deleted += conn.execute(
                    delete(predictions).where(predictions.c.created_at <= boundary)
                ).rowcount
        return int(deleted or 0)

    # -- review queue ---------------------------------------------------------------------------

    def review_candidates(
        self,
        model_version: str,
        order_by: Literal["confidence", "margin"],
        not_before: float,
        limit: int,
        with_embeddings: bool = False,
    ) -> list[ReviewCandidate]:
        """The ``limit`` unlabelled predictions of ``model_version`` logged at or after
        ``not_before`` with the lowest ``order_by`` (ties by id), lowest first.

        "Unlabelled": no feedback item names the prediction's id. Served by the index on
        ``(model_version, <order_by>, id)``: the scan stops once ``limit`` rows qualify, skipping
        only the labelled and the expired (which retention deletes within a minute).
        """
        score = predictions.c[order_by]
        labelled = select(feedback.c.id).where(feedback.c.prediction_id == predictions.c.id)
        columns = [predictions.c[name] for name in
                   ("id", "created_at", "text", "label", "confidence", "margin")]
        if with_embeddings:
            columns.append(predictions.c.embedding)
        statement = (
            select(*columns)
            .where(
                predictions.c.model_version == model_version,
                score.is_not(None),
                predictions.c.created_at >= not_before,
                ~labelled.exists(),
            )
            .order_by(score, predictions.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                ReviewCandidate(
                    row.id, row.created_at, row.text, row.label, row.confidence, row.margin,
                    bytes_vector(row.embedding) if with_embeddings else None,
                )
                for row in conn.execute(statement)
            ]

    def labelled_texts(self, texts: Iterable[str]) -> set[str]:
        """Those of ``texts`` that some feedback item already labels (by id or as text)."""
        wanted = list(set(texts))
        if not wanted:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(select(feedback.c.text).where(feedback.c.text.in_(wanted)))
            return {row.text for row in rows}

    def count_review_queue(
        self, model_version: str, below_confidence: float, not_before: float
    ) -> int:
        """Unlabelled predictions of ``model_version`` logged at or after ``not_before`` whose
        confidence is below ``below_confidence`` (an index range scan)."""
        labelled = select(feedback.c.id).where(feedback.c.prediction_id == predictions.c.id)
        statement = select(func.count()).select_from(predictions).where(
            predictions.c.model_version == model_version,
            predictions.c.confidence < below_confidence,
            predictions.c.created_at >= not_before,
            ~labelled.exists(),
        )
        with self.engine.connect() as conn:
            return int(conn.execute(statement).scalar_one())

    # -- feedback -----------------------------------------------------------------------------

    def insert_feedback(self, items: Sequence[FeedbackRecord]) -> FeedbackInsert:
        """Insert all items in one transaction; returns their ids in order.

        A label for a prediction that already has one replaces it (the latest label wins, also
        within ``items``): the earlier row is deleted, and reported in ``replaced``.
        """
        now = time.time()
        ids: list[int] = []
        replaced: list[ReplacedFeedback] = []
        with self.engine.begin() as conn:
            self._lock_events(conn)
            events: list[dict[str, Any]] = []
            for item in items:
                if item.prediction_id is not None:
                    earlier = conn.execute(
                        select(feedback.c.id, feedback.c.label)
                        .where(feedback.c.prediction_id == item.prediction_id)
                        .order_by(feedback.c.id)
                    ).all()
                    if earlier:
                        conn.execute(
                            delete(feedback).where(feedback.c.id.in_([row.id for row in earlier]))
                        )
                        replaced += [
                            ReplacedFeedback(item.prediction_id, row.label, int(row.id))
                            for row in earlier
                        ]
                        events += [_event(int(row.id), None, now) for row in earlier]
                result = conn.execute(insert(feedback).values(created_at=now, **item.__dict__))
                key = result.inserted_primary_key
                if key is None:  # SQLAlchemy sets it for every single-row INSERT
                    raise RuntimeError("inserting feedback returned no primary key")
                ids.append(int(key[0]))
                events.append(_event(ids[-1], item.label, now))
            if events:
                conn.execute(insert(feedback_events), events)
        # ``ids`` stays aligned with ``items``: an item a later one in the same call replaced
        # keeps its (now deleted) id there, and is listed in ``replaced`` too.
        return FeedbackInsert(ids, replaced)

    def list_feedback(self, query: FeedbackQuery) -> list[FeedbackEntry]:
        """Feedback matching ``query``, newest first (by id)."""
        columns = [feedback.c[name] for name in FeedbackEntry.__dataclass_fields__]
        statement = select(*columns).order_by(feedback.c.id.desc()).limit(query.limit)
        if query.label is not None:
            statement = statement.where(feedback.c.label == query.label)
        if query.since is not None:
            statement = statement.where(feedback.c.created_at >= query.since)
        if query.source == "prediction_id":
            statement = statement.where(feedback.c.prediction_id.is_not(None))
        elif query.source == "text":
            statement = statement.where(feedback.c.prediction_id.is_(None))
        if query.before_id is not None:
            statement = statement.where(feedback.c.id < query.before_id)
        with self.engine.connect() as conn:
            return [FeedbackEntry(**row._asdict()) for row in conn.execute(statement)]

    def relabel_feedback(self, feedback_id: int, label: str) -> FeedbackEntry:
        """Give feedback item ``feedback_id`` another label; 404 if there is no such item."""
        with self.engine.begin() as conn:
            self._lock_events(conn)
            changed = conn.execute(
                update(feedback).where(feedback.c.id == feedback_id).values(label=label)
            ).rowcount
            if changed:
                conn.execute(insert(feedback_events), [_event(feedback_id, label, time.time())])
        if not changed:
            raise NotFoundError(f"no feedback item {feedback_id}", field="feedback_id")
        [entry] = self.list_feedback(FeedbackQuery(limit=1, before_id=feedback_id + 1))
        return entry

    def delete_feedback(self, feedback_id: int) -> None:
        """Delete feedback item ``feedback_id``; 404 if there is no such item."""
        with self.engine.begin() as conn:
            self._lock_events(conn)
            deleted = conn.execute(delete(feedback).where(feedback.c.id == feedback_id)).rowcount
            if deleted:
                conn.execute(insert(feedback_events), [_event(feedback_id, None, time.time())])
        if not deleted:
            raise NotFoundError(f"no feedback item {feedback_id}", field="feedback_id")

    def _lock_events(self, conn: Connection) -> None:
        """Order this transaction's feedback events after every earlier commit's (PostgreSQL).

        A sequence hands out numbers at insert time, not at commit: without the lock, a
        transaction holding seq 5 could commit after one holding seq 6, and a follower that had
        already read up to 6 would never see 5. The lock is held to the end of the transaction.
        SQLite serialises writers anyway.
        """
        if self.dialect == "postgresql":
            conn.execute(sql_text("SELECT pg_advisory_xact_lock(:key)"), {"key": _EVENTS_LOCK_KEY})

    def feedback_changes(self, after_seq: int, limit: int = 1000) -> list[FeedbackEvent]:
        """Changes to feedback with ``seq`` greater than ``after_seq``, in ``seq`` order (at
        most ``limit``), each with the item's text and embedding as stored now."""
        statement = (
            select(
                feedback_events.c.seq, feedback_events.c.feedback_id, feedback_events.c.label,
                feedback.c.text, feedback.c.embedding, feedback.c.encoder_id,
            )
            .select_from(
                feedback_events.outerjoin(feedback, feedback.c.id == feedback_events.c.feedback_id)
            )
            .where(feedback_events.c.seq > after_seq)
            .order_by(feedback_events.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                FeedbackEvent(
                    int(row.seq), int(row.feedback_id), row.label, row.text,
                    bytes_vector(row.embedding), row.encoder_id,
                )
                for row in conn.execute(statement)
            ]

    def latest_feedback_seq(self) -> int:
        """The sequence number of the latest change to feedback (0 before any)."""
        with self.engine.connect() as conn:
            value = conn.execute(select(func.max(feedback_events.c.seq))).scalar()
        return int(value or 0)

    def feedback_label_stats(self) -> dict[str, LabelFeedbackStats]:
        """Per label given by feedback: items, items on logged predictions, and how many of
        those the model predicted right (the label's recall as feedback shows it)."""
        on_prediction = feedback.c.predicted_label.is_not(None)
        right = and_(on_prediction, feedback.c.predicted_label == feedback.c.label)
        statement = select(
            feedback.c.label,
            func.count(),
            func.sum(case((on_prediction, 1), else_=0)),
            func.sum(case((right, 1), else_=0)),
        ).group_by(feedback.c.label)
        with self.engine.connect() as conn:
            return {
                label: LabelFeedbackStats(int(n), int(on or 0), int(hits or 0))
                for label, n, on, hits in conn.execute(statement)
            }

    def count_feedback(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(feedback)).scalar_one())

    def all_feedback(self) -> list[StoredFeedback]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(feedback).order_by(feedback.c.id))
            return [
                StoredFeedback(**{**row._asdict(), "embedding": bytes_vector(row.embedding)})
                for row in rows
            ]

    def cache_feedback_embeddings(
        self, vectors: dict[int, np.ndarray], encoder_id: str
    ) -> None:
        """Remember embeddings computed for feedback given by text, so they are computed once."""
        if not vectors:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(feedback)
                .where(feedback.c.id == bindparam("fid"))
                .values(embedding=bindparam("vec"), encoder_id=encoder_id),
                [{"fid": fid, "vec": vector_bytes(v)} for fid, v in vectors.items()],
            )

    def online_accuracy(
        self, window: int
    ) -> tuple[int, float | None, dict[str, tuple[int, float]]]:
        """Accuracy of the serving model as feedback reveals it.

        Over the newest ``window`` feedback items given on logged predictions: how many there are,
        the share the model got right, and per true label (items, share right).
        """
        query = (
            select(feedback.c.label, feedback.c.predicted_label)
            .where(feedback.c.predicted_label.is_not(None))
            .order_by(feedback.c.id.desc())
            .limit(window)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return 0, None, {}
        per_label: dict[str, list[int]] = {}
        right = 0
        for label, predicted in rows:
            hit = int(label == predicted)
            right += hit
            entry = per_label.setdefault(label, [0, 0])
            entry[0] += 1
            entry[1] += hit
        return (
            len(rows),
            right / len(rows),
            {label: (n, hits / n) for label, (n, hits) in per_label.items()},
        )

    # -- retrain jobs ------------------------------------------------------------------------

    def create_job(self, job_id: str, options: RetrainOptions) -> None:
        """Record a new running job; raises ConflictError naming the job already running."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(retrain_jobs).values(
                        id=job_id, created_at=now, updated_at=now, phase="queued", running=1,
                        options=json.dumps(options.to_dict()),
                    )
                )
        except IntegrityError:
            running = self.running_job()
            raise ConflictError(
                f"a retrain job is already running: {running.job_id if running else 'unknown'}",
                running_job_id=running.job_id if running else None,
            ) from None

    def update_job(self, job_id: str, **fields: Any) -> None:
        values: dict[str, Any] = {"updated_at": time.time()}
        for key, value in fields.items():
            values[key] = json.dumps(value) if key in ("progress", "result") else value
        if values.get("phase") in TERMINAL_PHASES:
            values["running"] = None
        with self.engine.begin() as conn:
            conn.execute(update(retrain_jobs).where(retrain_jobs.c.id == job_id).values(**values))

    def heartbeat_job(self, job_id: str) -> bool:
        """Renew a running job's heartbeat (its ``updated_at``); ``False`` if the job is no longer
        running (it ended, or another replica declared it dead)."""
        with self.engine.begin() as conn:
            renewed = conn.execute(
                update(retrain_jobs)
                .where(retrain_jobs.c.id == job_id, retrain_jobs.c.running == 1)
                .values(updated_at=time.time())
            ).rowcount
        return bool(renewed)

    def fail_running_job(self, job_id: str, seen_updated_at: float, error: str) -> bool:
        """Mark a running job failed, unless it changed since it was read with ``updated_at ==
        seen_updated_at`` (a heartbeat arrived in between); whether it was marked."""
        with self.engine.begin() as conn:
            marked = conn.execute(
                update(retrain_jobs)
                .where(
                    retrain_jobs.c.id == job_id, retrain_jobs.c.running == 1,
                    retrain_jobs.c.updated_at == seen_updated_at,
                )
                .values(phase="failed", running=None, error=error, updated_at=time.time())
            ).rowcount
        return bool(marked)

    def get_job(self, job_id: str) -> Job:
        with self.engine.connect() as conn:
            row = conn.execute(select(retrain_jobs).where(retrain_jobs.c.id == job_id)).first()
        if row is None:
            raise NotFoundError(f"no retrain job {job_id!r}", field="job_id")
        return _job(row._asdict())

    def running_job(self) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(retrain_jobs).where(retrain_jobs.c.running == 1)).first()
        return None if row is None else _job(row._asdict())

    def list_jobs(self, limit: int = 20) -> list[Job]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(retrain_jobs).order_by(retrain_jobs.c.created_at.desc()).limit(limit)
            ).all()
        return [_job(row._asdict()) for row in rows]


def _upgrade_schema(engine: Engine) -> None:
    """Bring a database made by an older refit up to date: columns and indexes added since.

    ``create_all`` creates missing tables only. Idempotent, and safe when several workers start
    at once: a column or index another worker just added is not an error.
    """
    from sqlalchemy import inspect

    columns = {column["name"] for column in inspect(engine).get_columns("predictions")}
    if "margin" not in columns:
        try:
            with engine.begin() as conn:
                conn.execute(sql_text("ALTER TABLE predictions ADD COLUMN margin FLOAT"))
        except (OperationalError, ProgrammingError):
            columns = {column["name"] for column in inspect(engine).get_columns("predictions")}
            if "margin" not in columns:
                raise
    for index in predictions.indexes:
        try:
            index.create(engine, checkfirst=True)
        except (OperationalError, ProgrammingError, IntegrityError):
            existing = {i["name"] for i in inspect(engine).get_indexes("predictions")}
            if index.name not in existing:
                raise


def _event(feedback_id: int, label: str | None, at: float) -> dict[str, Any]:
    return {"feedback_id": feedback_id, "label": label, "created_at": at}


def _job(row: dict[str, Any]) -> Job:
    return Job(
        job_id=row["id"],
        phase=row["phase"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        pid=row["pid"],
        host=row["host"],
        options=RetrainOptions.from_dict(json.loads(row["options"])),
        progress=json.loads(row["progress"]) if row["progress"] else None,
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
    )
