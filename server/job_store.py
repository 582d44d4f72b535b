"""The jobs table and its events: persistence of retrain jobs, their leases and cancel requests.

Live watchers get progress events at once; a writer thread stores them in batches (every
``PERSIST_INTERVAL`` seconds, one transaction) so that the relay is not bound by the database's
commit rate (one commit per event capped it at about 170 events/s on SQLite). Events that change
a job's state are stored before anyone sees them (``flush``). A job's row is written only by the
replica that holds its lease (``owner``); a replica that lost the lease cannot overwrite the
row of the one that took the job over.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.server import convert
from aqimodels.server.db import Database, job_events_table, jobs_table
from aqimodels.client.domain import TYPE_NAMES

log = structlog.get_logger(__name__)

ACTIVE = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_INTERRUPTED)
PERSIST_INTERVAL = 0.05  # seconds between batched writes of progress events


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class StoredJob:
    """A job's row: what a replica needs to take it over."""

    proto: pb.RetrainJob
    request: wpb.TrainRequest
    settings: dict[str, Any]
    depends_on: list[str]
    owner: str
    lease_expires_ms: int
    cancel_reason: str


@dataclass(frozen=True)
class ActiveRow:
    """One queued or running job as the lease keeper sees it."""

    job_id: str
    owner: str
    lease_expires_ms: int
    cancel_reason: str
    job: bytes


class JobStore:
    """Reads and writes the jobs and job-events tables for one registry process (``owner``)."""

    def __init__(self, db: Database, owner: str, lease_ms: int) -> None:
        self.db = db
        self.owner = owner
        self.lease_ms = lease_ms
        # (job id, state, job bytes, sequence, event bytes) not yet stored, in emission order
        self._pending: list[tuple[str, int, bytes, int, bytes]] = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()

    # ---- writes ----

    def insert(self, proto: pb.RetrainJob, request: wpb.TrainRequest, request_id: str, settings: dict[str, Any],
               depends_on: list[str]) -> None:
        """Stores a new job, leased to this process."""
        now = now_ms()
        with self.db.begin() as conn:
            conn.execute(jobs_table.insert().values(
                job_id=proto.job_id, model_type=TYPE_NAMES[proto.model_type],
                model_name=proto.model_name, create_ms=convert.ms_from_ts(proto.create_time), request_id=request_id,
                owner=self.owner, request=request.SerializeToString(), state=int(proto.state), updated_ms=now,
                job=proto.SerializeToString(), lease_expires_ms=now + self.lease_ms,
                settings=json.dumps(settings, sort_keys=True), depends_on=json.dumps(depends_on), cancel_reason=""))

    def queue(self, proto: pb.RetrainJob, event: pb.RetrainEvent) -> None:
        with self._pending_lock:
            self._pending.append((proto.job_id, int(proto.state), proto.SerializeToString(), event.sequence,
                                  event.SerializeToString()))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Stores the queued events and each job's latest state in one transaction, in order."""
        with self._flush_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                self._write(batch)
            except IntegrityError:
                # An event another replica stored already (this one lost the job's lease): store
                # the rest one by one, never the duplicate, instead of retrying the batch forever.
                for item in batch:
                    try:
                        self._write([item])
                    except IntegrityError:
                        log.warning("job_event_duplicate_dropped", job_id=item[0], sequence=item[3])
            except Exception:
                with self._pending_lock:  # kept, in order, for the next attempt
                    self._pending[:0] = batch
                raise

    def _write(self, batch: list[tuple[str, int, bytes, int, bytes]]) -> None:
        latest = {job_id: (state, raw) for job_id, state, raw, _, _ in batch}
        with self.db.begin() as conn:
            conn.execute(job_events_table.insert(),
                         [dict(job_id=j, sequence=seq, event=ev) for j, _, _, seq, ev in batch])
            now = now_ms()
            for job_id, (state, raw) in latest.items():
                conn.execute(jobs_table.update().where(
                    jobs_table.c.job_id == job_id, jobs_table.c.owner == self.owner).values(
                    state=state, updated_ms=now, job=raw))

    # ---- reads ----

    def load(self, job_id: str) -> pb.RetrainJob | None:
        with self.db.begin() as conn:
            row = conn.execute(sa.select(jobs_table.c.job).where(jobs_table.c.job_id == job_id)).first()
        return None if row is None else pb.RetrainJob.FromString(row[0])

    def load_full(self, job_id: str) -> StoredJob | None:
        t = jobs_table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t.c.job, t.c.request, t.c.settings, t.c.depends_on, t.c.owner,
                                         t.c.lease_expires_ms, t.c.cancel_reason).where(t.c.job_id == job_id)).first()
        if row is None:
            return None
        return StoredJob(pb.RetrainJob.FromString(row[0]), wpb.TrainRequest.FromString(row[1]),
                         json.loads(row[2] or "{}"), json.loads(row[3] or "[]"), row[4], int(row[5] or 0),
                         row[6] or "")

    def events_after(self, job_id: str, after: int) -> list[pb.RetrainEvent]:
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(job_events_table.c.event).where(
                job_events_table.c.job_id == job_id, job_events_table.c.sequence > after).order_by(
                job_events_table.c.sequence)).all()
        return [pb.RetrainEvent.FromString(r[0]) for r in rows]

    def active(self) -> list[ActiveRow]:
        """Every queued or running job, with its lease (one indexed query)."""
        t = jobs_table
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t.c.job_id, t.c.owner, t.c.lease_expires_ms, t.c.cancel_reason, t.c.job)
                                .where(t.c.state.in_(ACTIVE))).all()
        return [ActiveRow(r[0], r[1], int(r[2] or 0), r[3] or "", r[4]) for r in rows]

    def job_ids_for_request(self, request_id: str) -> list[str]:
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(jobs_table.c.job_id).where(jobs_table.c.request_id == request_id)
                                .order_by(jobs_table.c.create_ms, jobs_table.c.job_id)).all()
        return [r[0] for r in rows]

    def active_for_models(self, names: list[str]) -> list[tuple[str, str, pb.JobState.ValueType]]:
        t = jobs_table
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t.c.job_id, t.c.model_name, t.c.state).where(
                t.c.model_name.in_(names), t.c.state.in_(ACTIVE))).all()
        return [(r[0], r[1], pb.JobState.ValueType(r[2])) for r in rows]

    def page(self, size: int, state: int, model_name: str, last: list[Any] | None) -> list[tuple[bytes, int, str]]:
        t = jobs_table
        q = sa.select(t.c.job, t.c.create_ms, t.c.job_id).order_by(t.c.create_ms.desc(), t.c.job_id.desc()).limit(size + 1)
        if state:
            q = q.where(t.c.state == state)
        if model_name:
            q = q.where(t.c.model_name == model_name)
        if last is not None:
            q = q.where(sa.or_(t.c.create_ms < last[0], sa.and_(t.c.create_ms == last[0], t.c.job_id < last[1])))
        with self.db.begin() as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(q).all()]

    # ---- leases ----

    def renew(self) -> int:
        """Extends the lease of every active job this process owns (one statement); returns how many."""
        with self.db.begin() as conn:
            result = conn.execute(jobs_table.update().where(
                jobs_table.c.owner == self.owner, jobs_table.c.state.in_(ACTIVE)).values(
                lease_expires_ms=now_ms() + self.lease_ms))
        return int(result.rowcount or 0)

    def claim(self, row: ActiveRow) -> bool:
        """Takes over a job whose lease expired; False when another replica was quicker."""
        t = jobs_table
        with self.db.begin() as conn:
            result = conn.execute(t.update().where(
                t.c.job_id == row.job_id, t.c.owner == row.owner, t.c.lease_expires_ms == row.lease_expires_ms,
                t.c.state.in_(ACTIVE)).values(owner=self.owner, lease_expires_ms=now_ms() + self.lease_ms))
        return int(result.rowcount or 0) == 1

    def release(self, job_ids: list[str]) -> None:
        """Gives up this process's leases of these jobs at once (a graceful stop)."""
        if not job_ids:
            return
        with self.db.begin() as conn:
            conn.execute(jobs_table.update().where(
                jobs_table.c.job_id.in_(job_ids), jobs_table.c.owner == self.owner).values(lease_expires_ms=0))

    def request_cancel(self, job_id: str, reason: str) -> bool:
        """Marks an active job for cancelling by its owner; False when it is no longer active."""
        with self.db.begin() as conn:
            result = conn.execute(jobs_table.update().where(
                jobs_table.c.job_id == job_id, jobs_table.c.state.in_(ACTIVE)).values(cancel_reason=reason or "cancelled"))
        return int(result.rowcount or 0) == 1
