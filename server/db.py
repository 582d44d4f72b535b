"""aqimodels' own tables (audit, idempotency, jobs and their events) and the per-model lock.

They live in the same database as MLflow's tables when MLflow runs on a database, so that
several registry replicas share them. The per-model lock is held at database level across
processes: a PostgreSQL advisory lock, or an exclusive file lock beside a SQLite database.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, ProgrammingError

from aqimodels.client.errors import BackendUnavailableError
from aqimodels.process import deadlines
from aqimodels.server.config import sqlite_path
from aqimodels.server.dbtimeouts import DbTimeouts, bound_engine
from aqimodels.server.domain import AuditRecord

metadata = sa.MetaData()

audit_table = sa.Table(
    "aqimodels_audit",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("time_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("actor", sa.String(200), nullable=False, index=True),
    sa.Column("role", sa.String(50), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("model_name", sa.String(500), nullable=False, index=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("before", sa.Text, nullable=False),
    sa.Column("after", sa.Text, nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("request_id", sa.String(200), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
)

# Pending records (changes begun, not completed) are looked up before every change of a model
# (server/changes.py): an index on the outcome keeps that lookup off the model's whole history.
pending_index = sa.Index("ix_aqimodels_audit_outcome_model", audit_table.c.outcome, audit_table.c.model_name)

idempotency_table = sa.Table(
    "aqimodels_idempotency",
    metadata,
    sa.Column("action", sa.String(100), primary_key=True),
    sa.Column("request_id", sa.String(200), primary_key=True),
    sa.Column("time_ms", sa.BigInteger, nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=False),
)

jobs_table = sa.Table(
    "aqimodels_jobs",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("model_type", sa.String(32), nullable=False),
    sa.Column("model_name", sa.String(500), nullable=False, index=True),
    sa.Column("state", sa.Integer, nullable=False, index=True),
    sa.Column("create_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.Column("request_id", sa.String(200), nullable=False, index=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("job", sa.LargeBinary, nullable=False),  # the RetrainJob message
    sa.Column("request", sa.LargeBinary, nullable=False),  # the TrainRequest to dispatch
    # Added with durable jobs (databases of the previous release get them in create_tables):
    # the lease of ``owner`` (a registry process) ends at lease_expires_ms unless renewed.
    sa.Column("lease_expires_ms", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("cancel_reason", sa.Text, nullable=False, server_default=sa.text("''")),  # cancel asked by any replica
    sa.Column("settings", sa.Text, nullable=False, server_default=sa.text("'{}'")),  # promotion settings (JSON)
    sa.Column("depends_on", sa.Text, nullable=False, server_default=sa.text("'[]'")),  # ensemble members' jobs
)

job_events_table = sa.Table(
    "aqimodels_job_events",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("sequence", sa.BigInteger, primary_key=True),
    sa.Column("event", sa.LargeBinary, nullable=False),  # the RetrainEvent message
)


class EventSignal(threading.Condition):
    """Wakes the followers of the event log (server/events.py): ``latest`` is the newest sequence
    known committed."""

    latest = 0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _try_flock(fh: Any) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _poll(attempt: Callable[[], bool], still_wanted: Callable[[], None]) -> None:
    """Calls ``attempt`` until it succeeds, backing off from 1 to 50 ms, checking ``still_wanted`` between."""
    pause = 0.001
    while not attempt():
        still_wanted()
        time.sleep(pause)
        pause = min(0.05, pause * 2)


def add_missing_columns(engine: sa.Engine, table: sa.Table) -> list[str]:
    """Adds the columns of ``table`` that an existing table of an older release lacks; returns them.

    ``create_all`` creates missing tables only. Every added column has a server default, so one
    ``ALTER TABLE ... ADD COLUMN`` fills the existing rows; it is idempotent (run at every start;
    a replica that starts at the same moment and adds the column first is no error).
    """
    present = {c["name"] for c in sa.inspect(engine).get_columns(table.name)}
    added = []
    for column in table.columns:
        if column.name in present:
            continue
        ddl = sa.schema.CreateColumn(column).compile(dialect=engine.dialect)
        exists = " IF NOT EXISTS" if engine.dialect.name == "postgresql" else ""
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN{exists} {ddl}"))
        except OperationalError as exc:  # SQLite: added concurrently by another process
            if "duplicate column" not in str(exc.orig).lower():
                raise
        added.append(column.name)
    return added


class Database:
    """The engine over aqimodels' tables, with translation of connection failures."""

    def __init__(self, url: str, timeouts: DbTimeouts | None = None, pool_size: int = 10) -> None:
        """``pool_size``: pooled connections to PostgreSQL (twice as many more as overflow)."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgres = url.startswith("postgresql")
        self.timeouts = timeouts or DbTimeouts()
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": self.timeouts.lock, "check_same_thread": False}
            path = sqlite_path(url)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_size=pool_size, max_overflow=2 * pool_size, pool_recycle=300)
        self.engine = sa.create_engine(url, **kwargs)
        bound_engine(self.engine, self.timeouts)  # connect, statement, lock (busy) and pool-wait timeouts
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._created = False
        self.events_signal = EventSignal()

    def event_committed(self, sequence: int) -> None:
        """Tells the followers of the event log that ``sequence`` (and every one below) is committed."""
        if sequence > self.events_signal.latest:
            with self.events_signal:
                if sequence > self.events_signal.latest:
                    self.events_signal.latest = sequence
                    self.events_signal.notify_all()

    def create_tables(self) -> None:
        from aqimodels.server import events  # its tables are defined on this module's metadata

        with self.guard():
            metadata.create_all(self.engine, checkfirst=True)
            events.create_counter(self.engine)
            try:  # tables made before the index existed; a replica starting at the same time may win
                pending_index.create(self.engine, checkfirst=True)
            except (ProgrammingError, IntegrityError):
                pass
            add_missing_columns(self.engine, jobs_table)
        self._created = True

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turns a database that does not answer into BackendUnavailableError."""
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            raise BackendUnavailableError(f"aqimodels database unavailable: {str(exc.orig)[:200]}") from exc
        except sa.exc.TimeoutError as exc:  # no pooled connection came free within the bound
            raise BackendUnavailableError("aqimodels database unavailable: no pooled connection came free within "
                                          f"the call's bound ({str(exc).splitlines()[0][:160]})") from exc

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self.guard(), self.engine.begin() as conn:
            yield conn

    # ---- the per-model lock ----

    @contextlib.contextmanager
    def model_lock(self, name: str, check: Callable[[], None] | None = None) -> Iterator[None]:
        """Serialises changes to one model across threads, processes and replicas.

        The wait polls (a try-lock with back-off) so that it ends as soon as ``check`` raises
        (the caller's deadline passed, it cancelled, the registry is stopping) or the current
        call's budget runs out (DeadlineExceededError); a blocking lock call would wait on in the
        database after its caller was answered, and be granted then.
        """
        def still_wanted() -> None:
            if check is not None:
                check()
            deadlines.current().check("the model's lock was free")

        with self._locks_guard:
            local = self._locks.setdefault(name, threading.Lock())
        while not local.acquire(timeout=0.05):
            still_wanted()
        try:
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            if self.is_postgres:
                with self._pg_lock(key, still_wanted):
                    yield
            elif self.is_sqlite and sqlite_path(self.url) is not None:
                lock_dir = Path(str(sqlite_path(self.url)) + ".locks")
                lock_dir.mkdir(parents=True, exist_ok=True)
                with open(lock_dir / f"{key & 0xFFFFFFFFFFFF:x}.lock", "a+") as fh:
                    _poll(lambda: _try_flock(fh), still_wanted)
                    try:
                        yield
                    finally:
                        fcntl.flock(fh, fcntl.LOCK_UN)
            else:
                yield
        finally:
            local.release()

    @contextlib.contextmanager
    def _pg_lock(self, key: int, still_wanted: Callable[[], None]) -> Iterator[None]:
        # A session-level advisory lock on an autocommit connection: no transaction stays open
        # while the change is made through MLflow's own connections.
        with self.guard():
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            with self.guard():
                _poll(lambda: bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()),
                      still_wanted)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.invalidate()  # a lock granted after we stopped asking ends with the session
                conn.close()
            raise
        try:
            yield
        finally:
            # Never turns a finished change into an error: a lock that cannot be released
            # is released by the server when the session ends (the connection is dropped).
            try:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.close()
            except Exception:  # noqa: BLE001 - a broken session: dropped instead of returned to the pool
                with contextlib.suppress(Exception):
                    conn.invalidate()
                    conn.close()

    # ---- audit ----

    def audit_begin(self, *, actor: str, role: str, action: str, model_name: str, version: int,
                    before: dict[str, Any], request_id: str, message: str = "",
                    after: dict[str, Any] | None = None) -> str:
        """Writes the record of a change before it is made (outcome ``pending``); returns its id.

        ``after``: while pending, the intent (a change's plan, see server/changes.py).
        """
        audit_id = uuid.uuid4().hex
        with self.begin() as conn:
            conn.execute(audit_table.insert().values(
                id=audit_id, time_ms=_now_ms(), actor=actor, role=role, action=action,
                model_name=model_name, version=version, before=json.dumps(before, sort_keys=True),
                after=json.dumps(after or {}, sort_keys=True), outcome="pending", request_id=request_id,
                message=message))
        return audit_id

    def audit_pending(self, actions: tuple[str, ...], *, model_name: str | None = None,
                      older_than_ms: int | None = None) -> list[dict[str, Any]]:
        """Pending records of ``actions`` (oldest first): changes begun and not completed."""
        t = audit_table
        q = sa.select(t.c.id, t.c.time_ms, t.c.action, t.c.model_name, t.c.after, t.c.request_id).where(
            t.c.outcome == "pending", t.c.action.in_(actions)).order_by(t.c.seq)
        if model_name is not None:
            q = q.where(t.c.model_name == model_name)
        if older_than_ms is not None:
            q = q.where(t.c.time_ms < older_than_ms)
        with self.begin() as conn:
            return [dict(r) for r in conn.execute(q).mappings().all()]

    def audit_finish(self, audit_id: str, *, outcome: str, after: dict[str, Any] | None = None,
                     message: str | None = None, version: int | None = None) -> None:
        values: dict[str, Any] = {"outcome": outcome}
        if after is not None:
            values["after"] = json.dumps(after, sort_keys=True)
        if message is not None:
            values["message"] = message
        if version is not None:
            values["version"] = version
        with self.begin() as conn:
            row = conn.execute(sa.select(audit_table).where(audit_table.c.id == audit_id)).mappings().first()
            conn.execute(audit_table.update().where(audit_table.c.id == audit_id).values(**values))
            last = 0 if row is None else self._append_events(
                conn, audit_id=audit_id, action=row["action"], outcome=outcome, model_name=row["model_name"],
                version=row["version"] if version is None else version, actor=row["actor"],
                request_id=row["request_id"], before=json.loads(row["before"]),
                after=after if after is not None else json.loads(row["after"]), intent=json.loads(row["after"]),
                message=row["message"] if message is None else message)
        self.event_committed(last)

    def audit_record(self, *, actor: str, role: str, action: str, model_name: str, version: int,
                     before: dict[str, Any], after: dict[str, Any], outcome: str, request_id: str,
                     message: str = "") -> str:
        """Writes a complete record in one statement (denials, dry runs, job events)."""
        with self.begin() as conn:
            audit_id, last = self.audit_insert(conn, actor=actor, role=role, action=action, model_name=model_name,
                                               version=version, before=before, after=after, outcome=outcome,
                                               request_id=request_id, message=message)
        self.event_committed(last)
        return audit_id

    def audit_insert(self, conn: sa.Connection, *, actor: str, role: str, action: str, model_name: str,
                     version: int, before: dict[str, Any], after: dict[str, Any], outcome: str, request_id: str,
                     message: str = "") -> tuple[str, int]:
        """A complete record and its events in the caller's transaction: (its id, the last event sequence).

        For changes that write rows of their own in the same transaction; once it commits, the
        caller passes the sequence to :meth:`event_committed`.
        """
        audit_id = uuid.uuid4().hex
        conn.execute(audit_table.insert().values(
            id=audit_id, time_ms=_now_ms(), actor=actor, role=role, action=action,
            model_name=model_name, version=version, before=json.dumps(before, sort_keys=True),
            after=json.dumps(after, sort_keys=True), outcome=outcome, request_id=request_id,
            message=message))
        last = self._append_events(conn, audit_id=audit_id, action=action, outcome=outcome,
                                   model_name=model_name, version=version, actor=actor, request_id=request_id,
                                   before=before, after=after, intent={}, message=message)
        return audit_id, last

    def _append_events(self, conn: sa.Connection, **record: Any) -> int:
        """Appends the events of a completed audit record in its transaction (server/events.py)."""
        from aqimodels.server import events  # it builds on this module's tables

        return events.append(conn, events.AuditFacts(**record))

    def audit_page(self, *, limit: int, before_seq: int | None, model_name: str = "", actor: str = "",
                   start_ms: int | None = None, end_ms: int | None = None) -> list[AuditRecord]:
        """Audit records newest first, below ``before_seq`` when given."""
        t = audit_table
        q = sa.select(t).order_by(t.c.seq.desc()).limit(limit)
        if before_seq is not None:
            q = q.where(t.c.seq < before_seq)
        if model_name:
            q = q.where(t.c.model_name == model_name)
        if actor:
            q = q.where(t.c.actor == actor)
        if start_ms is not None:
            q = q.where(t.c.time_ms >= start_ms)
        if end_ms is not None:
            q = q.where(t.c.time_ms < end_ms)
        with self.begin() as conn:
            rows = conn.execute(q).mappings().all()
        return [AuditRecord(id=r["id"], sequence=r["seq"], time_ms=r["time_ms"], actor=r["actor"],
                            role=r["role"], action=r["action"], model_name=r["model_name"],
                            version=r["version"], before=json.loads(r["before"]),
                            after=json.loads(r["after"]), outcome=r["outcome"],
                            request_id=r["request_id"], message=r["message"]) for r in rows]

    # ---- idempotency ----

    def audit_recorded(self, action: str, request_id: str) -> bool:
        """Whether a completed (``ok``) record of ``action`` with this request id exists."""
        t = audit_table
        with self.begin() as conn:
            return conn.execute(sa.select(t.c.seq).where(
                t.c.action == action, t.c.request_id == request_id, t.c.outcome == "ok").limit(1)).first() is not None

    def remembered(self, action: str, request_id: str) -> bytes | None:
        if not request_id:
            return None
        t = idempotency_table
        with self.begin() as conn:
            row = conn.execute(sa.select(t.c.response).where(
                t.c.action == action, t.c.request_id == request_id)).first()
        return bytes(row[0]) if row else None

    def remember(self, action: str, request_id: str, response: bytes) -> None:
        if not request_id:
            return
        try:
            with self.begin() as conn:
                conn.execute(idempotency_table.insert().values(
                    action=action, request_id=request_id, time_ms=_now_ms(), response=response))
        except IntegrityError:
            pass  # a concurrent identical request stored it first
