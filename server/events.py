"""The registry's event log: every completed change as a typed event with a global, gap-free sequence.

Events are derived from the audit trail, in the transaction that completes an audit record
(:meth:`Database.audit_record` with outcome ``ok``, :meth:`Database.audit_finish` with ``ok`` or
``recovered``): a change and its events commit together or not at all. :data:`EVENT_TYPES` is the
one table from an audit action to the events it gives; failed, denied, abandoned, undone and
dry-run records give none.

The sequence is allocated from the single row of ``aqimodels_event_counter``, incremented in that
same transaction. The increment locks the row until commit, so a second writer (another thread,
process or replica) waits for the first to commit or roll back before it takes the next number:
numbers are never skipped (a rolled-back transaction gives its number back) and they commit in
order (a reader that has seen sequence N will never later see a new event below N). An
autoincrement column gives neither on PostgreSQL (sequences are not transactional and commit out
of order).

Readers follow the log with a cursor (:meth:`EventLog.read_after`), so a slow reader costs no
memory and a resumed one neither misses nor repeats an event. :meth:`EventLog.wait_after` wakes at
once for events committed by this process, and within ``poll_seconds`` for those of other replicas
(a PostgreSQL ``LISTEN`` wakes it at once when the database is PostgreSQL).
"""

from __future__ import annotations

import contextlib
import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.server.db import metadata
from aqimodels.client.domain import validate_name

if TYPE_CHECKING:
    from aqimodels.server.db import Database

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "aqimodels_events"
MAX_READ = 1000

events_table = sa.Table(
    "aqimodels_events",
    metadata,
    sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("time_ms", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("model_name", sa.String(500), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("request_id", sa.String(200), nullable=False),
    sa.Column("audit_id", sa.String(32), nullable=False, index=True),
    sa.Column("payload", sa.Text, nullable=False),  # the event's details (JSON object)
)

counter_table = sa.Table(
    "aqimodels_event_counter",
    metadata,
    sa.Column("name", sa.String(40), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

_COUNTER = "events"


class EventType(enum.Enum):
    """An event's type; the proto enum value is ``REGISTRY_EVENT_TYPE_`` + the name."""

    VERSION_REGISTERED = "VERSION_REGISTERED"
    STAGE_CHANGED = "STAGE_CHANGED"
    VERSION_DELETED = "VERSION_DELETED"
    ROLLBACK = "ROLLBACK"
    RETRAIN_JOB_ENDED = "RETRAIN_JOB_ENDED"
    MODEL_HEALTH_CHANGED = "MODEL_HEALTH_CHANGED"
    ALERT_RAISED = "ALERT_RAISED"
    PROMOTION_REQUESTED = "PROMOTION_REQUESTED"
    PROMOTION_APPROVED = "PROMOTION_APPROVED"
    PROMOTION_REJECTED = "PROMOTION_REJECTED"
    PROMOTION_EXPIRED = "PROMOTION_EXPIRED"


@dataclass(frozen=True)
class Event:
    """One event of the log.

    ``details`` by type (absent keys: not applicable):

    - STAGE_CHANGED: ``from_stage``, ``to_stage`` (``none``/``staging``/``production``/``archived``),
      ``replaced_versions`` (the version that held the stage before), ``archived_versions``
    - ROLLBACK: ``from_stage``/``to_stage`` (production), ``replaced_versions`` (the production
      version rolled back), ``archived_versions``
    - VERSION_DELETED: one event per deleted version (``version``)
    - VERSION_REGISTERED: ``job_id`` (written before any promotion of the version)
    - RETRAIN_JOB_ENDED: ``job_id``, ``job_state`` (``JOB_STATE_SUCCEEDED`` ...)
    - MODEL_HEALTH_CHANGED: ``health``, ``previous_health`` (``healthy``/``degraded``), ``ratio``
    - ALERT_RAISED: ``alert_id``, ``health``, ``ratio``, ``message``
    - PROMOTION_*: ``promotion_request_id``, ``request_state``, ``stage``,
      ``expected_current_version``, ``requested_by``, ``reason``
    """

    sequence: int
    time_ms: int
    type: EventType
    model_name: str
    version: int
    actor: str
    request_id: str
    audit_id: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object (the webhook body)::

            {"sequence": 42, "time": "2026-12-01T23:10:00.123Z", "time_ms": 1796166600123,
             "type": "STAGE_CHANGED", "model_name": "aqi_predictor_lstm", "version": 7,
             "actor": "alice", "request_id": "...", "audit_event_id": "...",
             "details": {"from_stage": "staging", "to_stage": "production",
                         "replaced_versions": [6], "archived_versions": [6]}}
        """
        stamp = datetime.fromtimestamp(self.time_ms / 1000, tz=UTC)
        return {"sequence": self.sequence, "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.")
                + f"{self.time_ms % 1000:03d}Z", "time_ms": self.time_ms, "type": self.type.value,
                "model_name": self.model_name, "version": self.version, "actor": self.actor,
                "request_id": self.request_id, "audit_event_id": self.audit_id, "details": dict(self.details)}


@dataclass(frozen=True)
class AuditFacts:
    """What the mapping reads of a completed audit record."""

    action: str
    outcome: str
    model_name: str
    version: int
    actor: str
    request_id: str
    audit_id: str
    before: Mapping[str, Any]
    after: Mapping[str, Any]
    intent: Mapping[str, Any]  # the pending record's ``after`` (a change's plan), {} if none
    message: str = ""


Draft = tuple[EventType, int, dict[str, Any]]  # type, version, details


# ---- the mapping from audit records to events ----

def _stage_of(version: int, state: Mapping[str, Any]) -> str:
    if version and state.get("production") == version:
        return "production"
    if version and state.get("staging") == version:
        return "staging"
    return ""


def _promotion(f: AuditFacts) -> list[Draft]:
    plan = f.intent.get("plan") or {}
    writes = plan.get("writes") or []
    commit = writes[int(plan.get("commit", 0))] if writes else {}
    version = int(plan.get("version") or f.version)
    result = plan.get("result") or {}
    if commit.get("op") == "alias":
        to_stage = (commit["key"] if commit.get("to") else "archived")
    else:
        to_stage = "archived"
    unarchived = any(w.get("op") == "tag" and w.get("version") == version and w.get("key", "").endswith(".archived")
                     and w.get("was") == "true" and w.get("to") is None for w in writes)
    from_stage = _stage_of(version, f.before) or ("archived" if unarchived else "none")
    replaced = [int(commit["was"])] if commit.get("op") == "alias" and commit.get("to") and commit.get("was") else []
    details = {"from_stage": from_stage, "to_stage": to_stage, "replaced_versions": replaced,
               "archived_versions": [int(v) for v in result.get("archived") or []]}
    return [(EventType.STAGE_CHANGED, version, details)]


def _rollback(f: AuditFacts) -> list[Draft]:
    result = (f.intent.get("plan") or {}).get("result") or {}
    version = int(result.get("version") or f.version)
    replaced = int(result.get("previous") or f.before.get("production") or 0)
    return [(EventType.ROLLBACK, version, {
        "from_stage": _stage_of(version, f.before) or "archived", "to_stage": "production",
        "replaced_versions": [replaced] if replaced else [],
        "archived_versions": [int(v) for v in result.get("archived") or []]})]


def _cleanup(f: AuditFacts) -> list[Draft]:
    deleted = ((f.intent.get("plan") or {}).get("result") or {}).get("deleted") or []
    return [(EventType.VERSION_DELETED, int(v), {}) for v in deleted]


def _registered(f: AuditFacts) -> list[Draft]:
    return [(EventType.VERSION_REGISTERED, f.version, {"job_id": str(f.before.get("job_id", ""))})]


def _job_ended(f: AuditFacts) -> list[Draft]:
    details = {"job_id": str(f.before.get("job_id", "")), "job_state": str(f.after.get("state", ""))}
    return [(EventType.RETRAIN_JOB_ENDED, int(f.after.get("version") or 0), details)]


def _alert(f: AuditFacts) -> list[Draft]:
    health, previous = str(f.after.get("health", "")), str(f.before.get("health", ""))
    ratio = float(f.after.get("ratio") or 0.0)
    return [(EventType.ALERT_RAISED, f.version, {"alert_id": str(f.after.get("alert_id", "")), "health": health,
                                                  "ratio": ratio, "message": f.message}),
            (EventType.MODEL_HEALTH_CHANGED, f.version, {"health": health, "previous_health": previous,
                                                          "ratio": ratio})]


def _request(kind: EventType) -> Callable[[AuditFacts], list[Draft]]:
    def drafts(f: AuditFacts) -> list[Draft]:
        r = f.after.get("promotion_request") or {}
        return [(kind, int(r.get("version") or f.version), {
            "promotion_request_id": str(r.get("id", "")), "request_state": str(r.get("state", "")),
            "stage": str(r.get("stage", "")), "expected_current_version": int(r.get("expected_current_version") or 0),
            "requested_by": str(r.get("requested_by", "")), "reason": str(r.get("reason", ""))})]
    return drafts


def _approval(f: AuditFacts) -> list[Draft]:
    kind = EventType.PROMOTION_APPROVED if f.outcome == "ok" else EventType.PROMOTION_REJECTED
    return _request(kind)(f)


# action -> (the outcomes that are events, the events of such a record)
EVENT_TYPES: dict[str, tuple[frozenset[str], Callable[[AuditFacts], list[Draft]]]] = {
    "PromoteModelVersion": (frozenset({"ok", "recovered"}), _promotion),
    "RollbackModel": (frozenset({"ok", "recovered"}), _rollback),
    "CleanupModelVersions": (frozenset({"ok", "recovered"}), _cleanup),
    # a job that ended is an event whatever its end (a failed job is a fact, not a failed change)
    # written by the job before any promotion of the version it registered
    "RegisterModelVersion": (frozenset({"ok"}), _registered),
    "RetrainJob": (frozenset({"ok", "cancelled", "failed"}), _job_ended),
    "DegradationAlert": (frozenset({"ok"}), _alert),
    "RequestPromotion": (frozenset({"ok"}), _request(EventType.PROMOTION_REQUESTED)),
    # an approval that found production moved closes the request unpromoted: a rejection by the rule
    "ApprovePromotion": (frozenset({"ok", "aborted_stale"}), _approval),
    "RejectPromotion": (frozenset({"ok"}), _request(EventType.PROMOTION_REJECTED)),
    "ExpirePromotion": (frozenset({"ok", "expired"}), _request(EventType.PROMOTION_EXPIRED)),
}


def drafts_of(f: AuditFacts) -> list[Draft]:
    """The events of a completed audit record (none for other actions and outcomes)."""
    entry = EVENT_TYPES.get(f.action)
    if entry is None or f.outcome not in entry[0]:
        return []
    if f.outcome == "recovered":
        recovery = f.after.get("recovery") or {}
        if recovery.get("action") != "rolled_forward":
            return []  # undone, or nothing to do: no change took effect
    if f.action == "CleanupModelVersions" and "would_delete" in f.after:
        return []  # nothing was deleted
    return entry[1](f)


def append(conn: sa.Connection, f: AuditFacts) -> int:
    """Appends the events of ``f`` in the caller's transaction; returns the last sequence (0: none).

    Call as the transaction's last statement: the counter row stays locked until it commits.
    """
    drafts = drafts_of(f)
    if not drafts:
        return 0
    c = counter_table
    conn.execute(c.update().where(c.c.name == _COUNTER).values(value=c.c.value + len(drafts)))
    last = int(conn.execute(sa.select(c.c.value).where(c.c.name == _COUNTER)).scalar_one())
    now = int(time.time() * 1000)
    first = last - len(drafts) + 1
    conn.execute(events_table.insert(), [
        {"sequence": first + i, "time_ms": now, "type": kind.value, "model_name": f.model_name, "version": version,
         "actor": f.actor[:200], "request_id": f.request_id[:200], "audit_id": f.audit_id,
         "payload": json.dumps(details, sort_keys=True)} for i, (kind, version, details) in enumerate(drafts)])
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_notify(:c, :s)"), {"c": NOTIFY_CHANNEL, "s": str(last)})
    return last


def create_counter(engine: sa.Engine) -> None:
    """Makes the counter row (at its log's last sequence: a log kept from before the counter)."""
    with engine.begin() as conn:
        if conn.execute(sa.select(counter_table.c.value).where(counter_table.c.name == _COUNTER)).first():
            return
    # IntegrityError: a replica starting at the same time made it
    with contextlib.suppress(sa.exc.IntegrityError), engine.begin() as conn:
        top = conn.execute(sa.select(sa.func.max(events_table.c.sequence))).scalar() or 0
        conn.execute(counter_table.insert().values(name=_COUNTER, value=int(top)))


def _row_event(r: sa.RowMapping) -> Event:
    return Event(int(r["sequence"]), int(r["time_ms"]), EventType(r["type"]), r["model_name"], int(r["version"]),
                 r["actor"], r["request_id"], r["audit_id"], json.loads(r["payload"]))


class EventLog:
    """Reading and following the log (any number of readers; one follower thread per process).

    Args:
        poll_seconds: how often :meth:`start`'s thread looks for events of other replicas.
    """

    def __init__(self, db: Database, poll_seconds: float = 0.5) -> None:
        self.db = db
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Any = None

    # ---- reading ----

    def read_after(self, after_sequence: int, limit: int = MAX_READ, model_names: Iterable[str] = (),
                   types: Iterable[EventType] = ()) -> list[Event]:
        """Events with a sequence above ``after_sequence`` (oldest first, at most ``limit``), filtered."""
        t = events_table
        q = sa.select(t).where(t.c.sequence > after_sequence).order_by(t.c.sequence).limit(
            max(1, min(limit, MAX_READ)))
        names = list(model_names)
        kinds = [k.value for k in types]
        if names:
            q = q.where(t.c.model_name.in_(names))
        if kinds:
            q = q.where(t.c.type.in_(kinds))
        with self.db.begin() as conn:
            return [_row_event(r) for r in conn.execute(q).mappings().all()]

    def latest_sequence(self) -> int:
        """The sequence of the newest committed event (0: none yet)."""
        with self.db.begin() as conn:
            return int(conn.execute(sa.select(sa.func.max(events_table.c.sequence))).scalar() or 0)

    def wait_after(self, sequence: int, timeout: float) -> bool:
        """Blocks until an event above ``sequence`` is known to be committed, or ``timeout`` passes.

        True: there is one (read it with :meth:`read_after`). Without :meth:`start`, only events
        committed by this process wake it before the timeout.
        """
        signal = self.db.events_signal
        deadline = time.monotonic() + timeout
        with signal:
            while signal.latest <= sequence:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                signal.wait(left)
        return True

    def follow(self, after_sequence: int, stop: Callable[[], bool], model_names: Sequence[str] = (),
               types: Sequence[EventType] = (), batch: int = 200, live: bool = True) -> Iterable[Event]:
        """Events above ``after_sequence``: the stored ones, then (``live``) live ones, until ``stop()`` is true.

        One cursor from replay to live: nothing is missed or repeated at the switch. Memory is one
        batch whatever the reader's pace.
        """
        cursor = after_sequence
        while not stop():
            # Sequences commit in order: every event up to ``top`` is visible to the read below.
            top = self.db.events_signal.latest
            events = self.read_after(cursor, batch, model_names, types)
            yield from events
            if events:
                cursor = events[-1].sequence
                if len(events) == batch:
                    continue
            if not live:
                return
            cursor = max(cursor, top)  # nothing else up to ``top`` passes the filters
            self.wait_after(cursor, 1.0)

    def watch(self, after_sequence: int, model_names: Sequence[str], types: Sequence[EventType],
              ended: threading.Event, live: bool = True) -> Iterable[Event]:
        """WatchRegistryEvents: validated :meth:`follow` until the caller leaves or the registry stops."""
        if after_sequence < 0:
            raise InvalidArgumentError("after_sequence must not be negative", field="after_sequence")
        for name in model_names:
            validate_name(name, "model_names")
        yield from self.follow(after_sequence, lambda: ended.is_set() or self._stop.is_set(), model_names, types,
                               live=live)

    # ---- following other replicas ----

    def start(self) -> None:
        """Starts the thread that wakes waiters for events committed elsewhere."""
        self._thread = threading.Thread(target=self._run, name="event-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.db.events_signal:
            self.db.events_signal.notify_all()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()

    @property
    def listening(self) -> bool:
        """True while a PostgreSQL LISTEN wakes the waiters at once (else they see others' events by polling)."""
        return self._listener is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.db.event_committed(self.latest_sequence())  # also what a missed NOTIFY announced
                if self.db.is_postgres:
                    self._listen()
                else:
                    self._stop.wait(self.poll_seconds)
            except Exception as exc:  # noqa: BLE001 - the database is down: the next pass retries
                log.debug("event_follow_failed", error=str(exc)[:200])
                self._stop.wait(self.poll_seconds)

    def _listen(self) -> None:
        """Waits for a NOTIFY of another replica's commit (or ``poll_seconds``: a missed one)."""
        if self._listener is None:
            raw = self.db.engine.raw_connection()
            pg: Any = raw.driver_connection
            raw.detach()  # a connection of its own, never returned to the pool
            pg.rollback()  # the pool's ping may have left a transaction open
            pg.autocommit = True
            pg.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._listener = pg
        try:
            for note in self._listener.notifies(timeout=self.poll_seconds, stop_after=1):
                if note.payload.isdigit():
                    self.db.event_committed(int(note.payload))
        except Exception:
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None
            raise


_STAGES = {"none": pb.STAGE_NONE, "staging": pb.STAGE_STAGING, "production": pb.STAGE_PRODUCTION,
           "archived": pb.STAGE_ARCHIVED}
_HEALTH = {"healthy": pb.MODEL_HEALTH_HEALTHY, "degraded": pb.MODEL_HEALTH_DEGRADED}
_JOB_STATES = frozenset(pb.JobState.keys())


def types_from_proto(values: Iterable[int]) -> list[EventType]:
    """The event types of a request's filter (INVALID_ARGUMENT naming an unknown one)."""
    kinds = []
    for value in values:
        known = value in pb.RegistryEventType.values()
        name = pb.RegistryEventType.Name(pb.RegistryEventType.ValueType(value)) if known else ""
        if not name or value == pb.REGISTRY_EVENT_TYPE_UNSPECIFIED:
            raise InvalidArgumentError(f"types: {value} is not a registry event type", field="types")
        kinds.append(EventType(name.removeprefix("REGISTRY_EVENT_TYPE_")))
    return kinds


def to_proto(e: Event) -> pb.RegistryEvent:
    d = e.details
    msg = pb.RegistryEvent(
        sequence=e.sequence, type=pb.RegistryEventType.Value("REGISTRY_EVENT_TYPE_" + e.type.value),
        model_name=e.model_name, version=e.version, actor=e.actor, request_id=e.request_id,
        audit_event_id=e.audit_id, from_stage=_STAGES.get(str(d.get("from_stage", "")), pb.STAGE_UNSPECIFIED),
        to_stage=_STAGES.get(str(d.get("to_stage", "")), pb.STAGE_UNSPECIFIED),
        replaced_versions=[int(v) for v in d.get("replaced_versions", [])],
        archived_versions=[int(v) for v in d.get("archived_versions", [])], job_id=str(d.get("job_id", "")),
        job_state=pb.JobState.Value(d["job_state"]) if d.get("job_state") in _JOB_STATES
        else pb.JOB_STATE_UNSPECIFIED,
        health=_HEALTH.get(str(d.get("health", "")), pb.MODEL_HEALTH_UNSPECIFIED), alert_id=str(d.get("alert_id", "")),
        promotion_request_id=str(d.get("promotion_request_id", "")))
    msg.time.FromMilliseconds(e.time_ms)
    msg.details.update(dict(d))
    return msg
