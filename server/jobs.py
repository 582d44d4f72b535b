"""Retrain jobs: creation, dispatch to workers, relay of their events, persistence, watching.

Each job runs on a thread of the registry, independent of the caller's stream: a caller that
disconnects does not stop it. Every event gets the job id and a sequence number, is kept in
memory for live watchers and written to ``aqimodels_job_events`` so that a late or reconnecting
watcher (on this replica or another) replays what it missed, and a restarted registry still
reports finished jobs. Live watchers get progress events at once; a writer thread stores them in
batches (every ``PERSIST_INTERVAL`` seconds, one transaction) so that the relay is not bound by
the database's commit rate (one commit per event capped it at about 170 events/s on SQLite).
Events that change a job's state (queued, running, ended) are stored before anyone sees them.
One queued or running job per model, checked under the model's database-level lock so replicas
agree.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import sqlalchemy as sa
import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    JobNotFoundError,
)
from aqimodels.server import convert, promotion_policy
from aqimodels.server.config import ServerConfig
from aqimodels.server.db import Database, job_events_table, jobs_table
from aqimodels.server.domain import MODEL_TYPE_TAG, Stage
from aqimodels.server.paging import decode_token, encode_token, page_size
from aqimodels.server.service import Caller, RegistryService, validate_metric
from aqimodels.server.workers import WorkerHandle, WorkerPool

log = structlog.get_logger(__name__)

TYPE_NAMES = {wpb.MODEL_TYPE_XGBOOST: "xgboost", wpb.MODEL_TYPE_LSTM: "lstm", wpb.MODEL_TYPE_GNN: "gnn",
              wpb.MODEL_TYPE_ENSEMBLE: "ensemble"}
MEMBER_TYPES = (wpb.MODEL_TYPE_XGBOOST, wpb.MODEL_TYPE_LSTM, wpb.MODEL_TYPE_GNN)
ACTIVE = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_INTERRUPTED)
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_MS = 60_000
DECISION_TAG = "aqimodels.promotion_decision"
MAX_DISPATCH_ATTEMPTS = 3


def model_name_for(model_type: int, target: str = "") -> str:
    """``aqi_predictor_<type>``; another target than PM2.5 as a suffix, ``aqi_predictor_<type>_no2``."""
    name = f"aqi_predictor_{TYPE_NAMES[model_type]}"
    target = target.strip().lower()
    return name if target in ("", "pm25") else f"{name}_{target}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Replay(Exception):
    """The request id already created jobs: the retry gets those instead of new ones."""

    def __init__(self, job_ids: list[str]) -> None:
        super().__init__("replay")
        self.job_ids = job_ids


@dataclass
class _Job:
    """A job owned by this registry process."""

    proto: pb.RetrainJob
    train_request: wpb.TrainRequest
    settings: dict[str, Any]
    events: list[pb.RetrainEvent] = field(default_factory=list)
    listeners: list[queue.Queue[pb.RetrainEvent | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    call: Any = None
    depends_on: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None


PERSIST_INTERVAL = 0.05  # seconds between batched writes of progress events


class JobManager:
    """The retrain RPCs' logic."""

    def __init__(self, config: ServerConfig, service: RegistryService, db: Database, pool: WorkerPool) -> None:
        self.config = config
        self.service = service
        self.db = db
        self.pool = pool
        self.owner = uuid.uuid4().hex[:12]
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._waiting: list[str] = []  # job ids waiting for a worker, FIFO
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._success_hooks: list[Callable[[str, int], None]] = []
        self._event_hooks: list[Callable[[pb.RetrainJob, pb.RetrainEvent], None]] = []
        # (job id, state, job bytes, sequence, event bytes) not yet stored, in emission order
        self._pending: list[tuple[str, int, bytes, int, bytes]] = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._writer: threading.Thread | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        self.pool.start()
        self._interrupt_stale()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True, name="job-heartbeat")
        self._heartbeat.start()
        self._writer = threading.Thread(target=self._writer_loop, daemon=True, name="job-event-writer")
        self._writer.start()

    def shutdown(self) -> None:
        """Marks this registry's unfinished jobs INTERRUPTED and stops their worker calls."""
        self._stop.set()
        with self._jobs_lock:
            jobs = [j for j in self._jobs.values() if j.proto.state in ACTIVE]
        for job in jobs:
            job.cancel_reason = "interrupted"
            job.cancel.set()
            if job.call is not None:
                job.call.cancel()
            self._end(job, pb.JOB_STATE_INTERRUPTED, "the registry shut down while the job ran")
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout=5)
        self._flush()

    def _interrupt_stale(self) -> None:
        cutoff = _now_ms() - STALE_AFTER_MS
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(jobs_table.c.job_id, jobs_table.c.job).where(
                jobs_table.c.state.in_(ACTIVE), jobs_table.c.updated_ms < cutoff)).all()
        for job_id, raw in rows:
            proto = pb.RetrainJob.FromString(raw)
            proto.state = pb.JOB_STATE_INTERRUPTED
            proto.error = "the registry that ran this job stopped before it ended"
            proto.end_time.CopyFrom(convert.ts_from_ms(_now_ms()))
            event = pb.RetrainEvent(job_id=job_id, sequence=proto.last_sequence + 1, model_type=proto.model_type,
                                    state=proto.state, ended=pb.JobEnded(state=proto.state, reason=proto.error))
            event.time.GetCurrentTime()
            proto.last_sequence = event.sequence
            self._queue_persist(proto, event)
            self._flush()
            log.warning("job_interrupted", job_id=job_id, model=proto.model_name)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._jobs_lock:
                ids = [j.proto.job_id for j in self._jobs.values() if j.proto.state in ACTIVE]
            if ids:
                try:
                    with self.db.begin() as conn:
                        conn.execute(jobs_table.update().where(jobs_table.c.job_id.in_(ids)).values(
                            updated_ms=_now_ms()))
                except Exception:  # noqa: BLE001 - a missed heartbeat is retried next time
                    log.warning("job_heartbeat_failed", jobs=ids)

    # ---- persistence ----

    def _insert(self, proto: pb.RetrainJob, request: wpb.TrainRequest, request_id: str) -> None:
        """Stores a new job (its later states and events go through _queue_persist and _flush)."""
        with self.db.begin() as conn:
            conn.execute(jobs_table.insert().values(
                job_id=proto.job_id, model_type=TYPE_NAMES[proto.model_type], model_name=proto.model_name,
                create_ms=convert.ms_from_ts(proto.create_time), request_id=request_id, owner=self.owner,
                request=request.SerializeToString(), state=int(proto.state), updated_ms=_now_ms(),
                job=proto.SerializeToString()))

    def _queue_persist(self, proto: pb.RetrainJob, event: pb.RetrainEvent) -> None:
        with self._pending_lock:
            self._pending.append((proto.job_id, int(proto.state), proto.SerializeToString(), event.sequence,
                                  event.SerializeToString()))

    def _flush(self) -> None:
        """Stores the queued events and each job's latest state in one transaction, in order."""
        with self._flush_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            latest = {job_id: (state, raw) for job_id, state, raw, _, _ in batch}
            try:
                with self.db.begin() as conn:
                    conn.execute(job_events_table.insert(),
                                 [dict(job_id=j, sequence=seq, event=ev) for j, _, _, seq, ev in batch])
                    now = _now_ms()
                    for job_id, (state, raw) in latest.items():
                        conn.execute(jobs_table.update().where(jobs_table.c.job_id == job_id).values(
                            state=state, updated_ms=now, job=raw))
            except Exception:
                with self._pending_lock:  # kept, in order, for the next attempt
                    self._pending[:0] = batch
                raise

    def _writer_loop(self) -> None:
        while not self._stop.wait(PERSIST_INTERVAL):
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - the database is down: retried next time
                log.warning("job_events_write_failed", error=str(exc)[:200], pending=len(self._pending))

    def _load(self, job_id: str) -> pb.RetrainJob:
        if not job_id or len(job_id) > 64:
            raise InvalidArgumentError("job_id is required (at most 64 characters)", field="job_id")
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is not None:
            with job.lock:
                return _copy(job.proto)
        with self.db.begin() as conn:
            row = conn.execute(sa.select(jobs_table.c.job).where(jobs_table.c.job_id == job_id)).first()
        if row is None:
            raise JobNotFoundError(f"retrain job {job_id!r} does not exist")
        return pb.RetrainJob.FromString(row[0])

    def _events_after(self, job_id: str, after: int) -> list[pb.RetrainEvent]:
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(job_events_table.c.event).where(
                job_events_table.c.job_id == job_id, job_events_table.c.sequence > after).order_by(
                job_events_table.c.sequence)).all()
        return [pb.RetrainEvent.FromString(r[0]) for r in rows]

    # ---- events ----

    def _emit(self, job: _Job, state: int, **payload: Any) -> pb.RetrainEvent:
        with job.lock:
            seq = job.proto.last_sequence + 1
            event = pb.RetrainEvent(job_id=job.proto.job_id, sequence=seq, model_type=job.proto.model_type,
                                    state=state, **payload)
            event.time.GetCurrentTime()
            changed = job.proto.state != state
            job.proto.last_sequence = seq
            job.proto.state = state
            self._queue_persist(job.proto, event)
            if changed or state in TERMINAL or self._writer is None or self._stop.is_set():
                self._flush()  # a new state is stored before anyone sees it
            job.events.append(event)
            for listener in job.listeners:
                listener.put(event)
            if state in TERMINAL:
                for listener in job.listeners:
                    listener.put(None)
            for hook in self._event_hooks:
                try:
                    hook(job.proto, event)
                except Exception:  # noqa: BLE001 - an observer must never break a job
                    log.exception("event_hook_failed", job_id=job.proto.job_id)
        return event

    def _end(self, job: _Job, state: int, reason: str) -> None:
        with job.lock:
            if job.proto.state in TERMINAL:
                return
            job.proto.error = reason
            job.proto.end_time.CopyFrom(convert.ts_from_ms(_now_ms()))
        self._emit(job, state, ended=pb.JobEnded(state=state, reason=reason))
        log.info("job_ended", job_id=job.proto.job_id, model=job.proto.model_name,
                 state=pb.JobState.Name(state), reason=reason)
        self._audit_end(job, state, reason)

    def _audit_end(self, job: _Job, state: int, reason: str) -> None:
        self.db.audit_record(
            actor=job.proto.requested_by or "anonymous", role="", action="RetrainJob",
            model_name=job.proto.model_name, version=job.proto.version, before={"job_id": job.proto.job_id},
            after={"state": pb.JobState.Name(state), "version": job.proto.version or None},
            outcome={pb.JOB_STATE_SUCCEEDED: "ok", pb.JOB_STATE_CANCELLED: "cancelled"}.get(state, "failed"),
            request_id=job.proto.job_id, message=reason[:500])

    def _subscribe(self, job: _Job, after: int) -> tuple[list[pb.RetrainEvent], queue.Queue[pb.RetrainEvent | None]]:
        q: queue.Queue[pb.RetrainEvent | None] = queue.Queue()
        with job.lock:
            replay = [e for e in job.events if e.sequence > after]
            if job.proto.state in TERMINAL:
                q.put(None)
            else:
                job.listeners.append(q)
        return replay, q

    def _unsubscribe(self, job: _Job, q: queue.Queue[pb.RetrainEvent | None]) -> None:
        with job.lock:
            if q in job.listeners:
                job.listeners.remove(q)

    # ---- RPCs ----

    def retrain(self, request: pb.RetrainRequest, caller: Caller, context: grpc.ServicerContext) -> Iterator[pb.RetrainEvent]:
        if request.request_id:
            raw = self.db.remembered("Retrain", request.request_id)
            if raw is not None:
                yield from self._follow(json.loads(raw), context)
                return
        job_ids = self.submit(request, caller)
        yield from self._follow(job_ids, context)

    def submit(self, request: pb.RetrainRequest, caller: Caller) -> list[str]:
        """Validates a retrain request, creates its jobs and starts them; returns the job ids.

        Used by the Retrain RPC and by automation (schedules, degradation policy).
        """
        types = self._requested_types(request)
        settings = self._promotion_settings(request)
        window = request.params.window_hours
        if window < 0 or window > 24 * 30:
            raise InvalidArgumentError("params.window_hours must be between 1 and 720", field="params.window_hours")
        if request.params.max_epochs < 0 or request.params.max_epochs > 10_000:
            raise InvalidArgumentError("params.max_epochs must be between 1 and 10000", field="params.max_epochs")
        if len(request.dataset.spec) > 4096:
            raise InvalidArgumentError("dataset.spec is longer than 4096 characters", field="dataset.spec")
        if request.dataset.target.strip().lower() not in promotion_policy.TARGETS:
            raise InvalidArgumentError(f"dataset.target {request.dataset.target!r} is not one of "
                                       f"{', '.join(t for t in promotion_policy.TARGETS if t)}", field="dataset.target")
        checked = self.pool.validate(request.dataset, window)  # INVALID_ARGUMENT here, before any job exists
        if wpb.MODEL_TYPE_ENSEMBLE in types and checked is not None:  # members trained elsewhere: refused now
            promotion_policy.check_members(self.service, self._resolve_members(None, request.dataset.target, types),
                                           checked.fingerprint, request.dataset.spec or "synthetic")
        try:
            jobs = self._create_jobs(types, request, caller, settings)
        except _Replay as replay:
            return replay.job_ids
        job_ids = [j.proto.job_id for j in jobs]
        if request.request_id:
            self.db.remember("Retrain", request.request_id, json.dumps(job_ids).encode())
        for job in jobs:
            job.thread = threading.Thread(target=self._run, args=(job,), daemon=True,
                                          name=f"job-{job.proto.job_id}")
            job.thread.start()
        return job_ids

    def add_success_hook(self, hook: Callable[[str, int], None]) -> None:
        """Calls ``hook(model_name, version)`` after every successful job (retention, for one)."""
        self._success_hooks.append(hook)

    def add_event_hook(self, hook: Callable[[pb.RetrainJob, pb.RetrainEvent], None]) -> None:
        """Calls ``hook(job, event)`` for every event of every job of this process, under the job's lock
        (metrics, for one); the hook must be quick and must not touch the job manager."""
        self._event_hooks.append(hook)

    def _requested_types(self, request: pb.RetrainRequest) -> list[int]:
        types: list[int] = []
        for t in request.model_types:
            if t not in TYPE_NAMES:
                raise InvalidArgumentError(f"model_types holds an unknown model type {t}; use xgboost, lstm, "
                                           "gnn or ensemble", field="model_types")
            if t not in types:
                types.append(t)
        if not types:
            types = list(TYPE_NAMES)
        # the ensemble after its members
        return sorted(types, key=lambda t: t == wpb.MODEL_TYPE_ENSEMBLE)

    def _promotion_settings(self, request: pb.RetrainRequest) -> dict[str, Any]:
        metric = validate_metric(request.promotion_metric or self.config.promotion_metric, "promotion_metric")
        margin = request.promotion_margin or self.config.promotion_margin
        if not math.isfinite(margin) or margin < 0 or margin > 10:
            raise InvalidArgumentError("promotion_margin must be between 0 and 10", field="promotion_margin")
        return {"auto_promote": request.auto_promote or self.config.auto_promotion, "metric": metric,
                "margin": margin, "allow_data_change": request.allow_data_change}

    def _create_jobs(self, types: list[int], request: pb.RetrainRequest, caller: Caller,
                     settings: dict[str, Any]) -> list[_Job]:
        names = sorted(model_name_for(t, request.dataset.target) for t in types)
        locks = [self.db.model_lock(f"retrain:{n}") for n in names]
        for lock in locks:
            lock.__enter__()
        try:
            if request.request_id:
                # A retry that raced the first call past the idempotency check: the first call's
                # jobs exist by now (created under these same locks), so answer with them.
                with self.db.begin() as conn:
                    earlier = conn.execute(sa.select(jobs_table.c.job_id).where(
                        jobs_table.c.request_id == request.request_id).order_by(
                        jobs_table.c.create_ms, jobs_table.c.job_id)).all()
                if earlier:
                    raise _Replay([r[0] for r in earlier])
            with self.db.begin() as conn:
                rows = conn.execute(sa.select(jobs_table.c.job_id, jobs_table.c.model_name, jobs_table.c.state).where(
                    jobs_table.c.model_name.in_(names), jobs_table.c.state.in_(ACTIVE))).all()
            if rows:
                job_id, name, state = rows[0]
                raise AlreadyExistsError(
                    f"{name} already has a {pb.JobState.Name(state).removeprefix('JOB_STATE_').lower()} "
                    f"retrain job {job_id}; watch it with `aqimodels jobs watch {job_id}` or cancel it first")
            jobs: list[_Job] = []
            now = _now_ms()
            for t in types:
                job_id = "job-" + uuid.uuid4().hex[:12]
                proto = pb.RetrainJob(job_id=job_id, model_type=t, model_name=model_name_for(t, request.dataset.target),
                                      state=pb.JOB_STATE_QUEUED, dataset=request.dataset.spec or "synthetic",
                                      requested_by=caller.name)
                proto.create_time.CopyFrom(convert.ts_from_ms(now))
                proto.promotion.metric = settings["metric"]
                train_request = wpb.TrainRequest(job_id=job_id, model_type=t, dataset=request.dataset,
                                                 params=request.params, experiment_name=self.config.experiment_name,
                                                 registered_model_name=proto.model_name,
                                                 tags={"requested_by": caller.name})
                job = _Job(proto=proto, train_request=train_request, settings=settings)
                if t == wpb.MODEL_TYPE_ENSEMBLE:
                    job.depends_on = [j.proto.job_id for j in jobs if j.proto.model_type in MEMBER_TYPES]
                self._insert(proto, train_request, request.request_id)
                self.db.audit_record(actor=caller.name, role=caller.role, action="Retrain",
                                     model_name=proto.model_name, version=0, before={},
                                     after={"job_id": job_id, "dataset": proto.dataset,
                                            "auto_promote": settings["auto_promote"]},
                                     outcome="ok", request_id=caller.request_id, message=f"job {job_id} queued")
                with self._jobs_lock:
                    self._jobs[job_id] = job
                jobs.append(job)
        finally:
            for lock in reversed(locks):
                lock.__exit__(None, None, None)
        for job in jobs:
            reason = ("waiting for its members: " + ", ".join(job.depends_on)) if job.depends_on else "queued"
            self._emit(job, pb.JOB_STATE_QUEUED, queued=pb.JobQueued(position=0, reason=reason))
            log.info("job_queued", job_id=job.proto.job_id, model=job.proto.model_name)
        return jobs

    def _follow(self, job_ids: list[str], context: grpc.ServicerContext) -> Iterator[pb.RetrainEvent]:
        """Merges the events of several jobs (replayed, then live) until all have ended."""
        if len(job_ids) == 1:  # one job: its events straight from its queue, without a merging thread
            yield from self._stream(job_ids[0], 0, context)
            return
        stop = threading.Event()
        merged: queue.Queue[tuple[str, pb.RetrainEvent | None]] = queue.Queue()
        threads = []
        for job_id in job_ids:
            def pump(jid: str = job_id) -> None:
                try:
                    for ev in self._watch_iter(jid, 0, stop):
                        merged.put((jid, ev))
                finally:
                    merged.put((jid, None))

            t = threading.Thread(target=pump, daemon=True, name="follow")
            t.start()
            threads.append(t)
        open_jobs = set(job_ids)
        try:
            while open_jobs:
                if not context.is_active():
                    return
                try:
                    jid, ev = merged.get(timeout=0.5)
                except queue.Empty:
                    continue
                if ev is None:
                    open_jobs.discard(jid)
                else:
                    yield ev
        finally:
            stop.set()

    def _watch_iter(self, job_id: str, after: int, stop: threading.Event) -> Iterator[pb.RetrainEvent]:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            # Another replica's job, or one that ended before this registry started: poll the table.
            proto = self._load(job_id)
            last = after
            while not stop.is_set():
                for ev in self._events_after(job_id, last):
                    last = ev.sequence
                    yield ev
                    if ev.state in TERMINAL:
                        return
                proto = self._load(job_id)
                if proto.state in TERMINAL and proto.last_sequence <= last:
                    return
                stop.wait(0.5)
            return
        replay, q = self._subscribe(job, after)
        try:
            last = after
            for ev in replay:
                last = ev.sequence
                yield ev
            while not stop.is_set():
                try:
                    ev = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if ev is None:
                    return
                if ev.sequence > last:
                    last = ev.sequence
                    yield ev
        finally:
            self._unsubscribe(job, q)

    def watch(self, job_id: str, after: int, context: grpc.ServicerContext) -> Iterator[pb.RetrainEvent]:
        if after < 0:
            raise InvalidArgumentError("after_sequence must not be negative", field="after_sequence")
        self._load(job_id)  # NOT_FOUND before the stream starts
        yield from self._stream(job_id, after, context)

    def _stream(self, job_id: str, after: int, context: grpc.ServicerContext) -> Iterator[pb.RetrainEvent]:
        """One job's events after ``after``, until it ends or the caller goes away."""
        stop = threading.Event()
        if context.add_callback(stop.set):  # False: the caller is already gone
            yield from self._watch_iter(job_id, after, stop)

    def get(self, job_id: str) -> pb.RetrainJob:
        return self._with_position(self._load(job_id))

    def _with_position(self, proto: pb.RetrainJob) -> pb.RetrainJob:
        with self._jobs_lock:
            if proto.job_id in self._waiting:
                proto.queue_position = self._waiting.index(proto.job_id) + 1
        return proto

    def list_jobs(self, size: int, token: str, state: int, model_name: str) -> tuple[list[pb.RetrainJob], str]:
        size = page_size(size)
        if state and state not in pb.JobState.values():
            raise InvalidArgumentError(f"state {state} is not a known job state", field="state")
        query = ("jobs", state, model_name)
        last = decode_token(token, query)
        t = jobs_table
        q = sa.select(t.c.job, t.c.create_ms, t.c.job_id).order_by(t.c.create_ms.desc(), t.c.job_id.desc()).limit(size + 1)
        if state:
            q = q.where(t.c.state == state)
        if model_name:
            q = q.where(t.c.model_name == model_name)
        if last is not None:
            if len(last) != 2 or not isinstance(last[0], int) or not isinstance(last[1], str):
                raise InvalidArgumentError("page_token is invalid", field="page_token")
            q = q.where(sa.or_(t.c.create_ms < last[0], sa.and_(t.c.create_ms == last[0], t.c.job_id < last[1])))
        with self.db.begin() as conn:
            rows = conn.execute(q).all()
        page = rows[:size]
        jobs = []
        for raw, _c, job_id in page:
            with self._jobs_lock:
                live = self._jobs.get(job_id)
            jobs.append(self._with_position(_copy(live.proto) if live else pb.RetrainJob.FromString(raw)))
        next_token = encode_token([page[-1][1], page[-1][2]], query) if len(rows) > size else ""
        return jobs, next_token

    def cancel(self, job_id: str, reason: str, caller: Caller) -> pb.RetrainJob:
        proto = self._load(job_id)
        if proto.state in TERMINAL:
            raise FailedPreconditionError(
                f"job {job_id} has already ended ({pb.JobState.Name(proto.state).removeprefix('JOB_STATE_').lower()})")
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise FailedPreconditionError(f"job {job_id} runs on another registry replica; cancel it there")
        job.cancel_reason = reason or f"cancelled by {caller.name}"
        job.cancel.set()
        if job.call is not None:
            job.call.cancel()
        self.db.audit_record(actor=caller.name, role=caller.role, action="CancelRetrainJob",
                             model_name=proto.model_name, version=0, before={"state": pb.JobState.Name(proto.state)},
                             after={"state": "JOB_STATE_CANCELLED"}, outcome="ok", request_id=caller.request_id,
                             message=job.cancel_reason[:500])
        if job.thread is not None:
            job.thread.join(timeout=30)
        return self._load(job_id)

    def running_by_model(self) -> dict[str, list[pb.RetrainJob]]:
        out: dict[str, list[pb.RetrainJob]] = {}
        with self._jobs_lock:
            jobs = [_copy(j.proto) for j in self._jobs.values() if j.proto.state in ACTIVE]
        for proto in jobs:
            out.setdefault(proto.model_name, []).append(proto)
        return out

    # ---- running a job ----

    def _run(self, job: _Job) -> None:
        log_ = log.bind(job_id=job.proto.job_id, model=job.proto.model_name)
        try:
            if job.depends_on and not self._wait_for_members(job):
                return
            if job.proto.model_type == wpb.MODEL_TYPE_ENSEMBLE:
                members = self._resolve_members(job)
                if not members:
                    self._end(job, pb.JOB_STATE_FAILED, "the ensemble needs at least one trained member; "
                              "retrain xgboost, lstm or gnn first")
                    return
                del job.train_request.ensemble_members[:]
                job.train_request.ensemble_members.extend(members)
            if job.settings.get("auto_promote") and not job.train_request.champion_model_uri:
                champion = promotion_policy.champion_uri(self.service, job.proto.model_name)
                job.train_request.champion_model_uri = champion  # scored on the challenger's own test rows
            for attempt in range(1, MAX_DISPATCH_ATTEMPTS + 1):
                handle = self._wait_for_worker(job)
                if handle is None:
                    return
                try:
                    retry = self._dispatch(job, handle, attempt)
                finally:
                    self.pool.release(handle, job.proto.job_id)
                if not retry:
                    return
            self._end(job, pb.JOB_STATE_FAILED, f"no worker could start the job after {MAX_DISPATCH_ATTEMPTS} attempts")
        except Exception as exc:  # a bug must still end the job, never leave it running
            log_.exception("job_crashed")
            self._end(job, pb.JOB_STATE_FAILED, f"internal error: {exc}")
        finally:
            with self._jobs_lock:
                if job.proto.job_id in self._waiting:
                    self._waiting.remove(job.proto.job_id)

    def _wait_for_members(self, job: _Job) -> bool:
        while True:
            states = [self._load(j).state for j in job.depends_on]
            if all(s in TERMINAL for s in states):
                return True
            if job.cancel.wait(0.5):
                self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled")
                return False

    def _resolve_members(self, job: _Job | None = None, target: str = "",
                         retrained: list[int] | None = None) -> list[wpb.EnsembleMember]:
        # The members trained in the same Retrain request (the jobs it waited for), else production;
        # before the jobs exist (``retrained``: the request's types), the production members only.
        same_request = {}
        for job_id in (job.depends_on if job is not None else []):
            proto = self._load(job_id)
            if proto.state == pb.JOB_STATE_SUCCEEDED and proto.version:
                same_request[proto.model_type] = (proto.model_name, proto.version)
        members = []
        for t in MEMBER_TYPES:
            if retrained is not None and t in retrained:
                continue
            name = model_name_for(t, job.train_request.dataset.target if job is not None else target)
            if t in same_request:
                name, version = same_request[t]
            else:
                try:
                    snap = self.service.snapshot(name, fresh=True)
                except Exception:  # noqa: BLE001 - not registered yet: not a member
                    continue
                chosen = snap.alias("production") or (snap.versions[0] if snap.versions else None)
                if chosen is None:
                    continue
                version = chosen.version
            members.append(wpb.EnsembleMember(model_type=t, model_name=name, version=version,
                                              model_uri=f"models:/{name}/{version}"))
        return members

    def _wait_for_worker(self, job: _Job) -> WorkerHandle | None:
        with self._jobs_lock:
            self._waiting.append(job.proto.job_id)
        announced = ""
        try:
            while True:
                if job.cancel.is_set():
                    self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled")
                    return None
                with self._jobs_lock:
                    first = self._waiting[0] == job.proto.job_id if self._waiting else True
                handle = self.pool.acquire(job.proto.job_id, 0.5) if first else None
                if handle is not None:
                    return handle
                with self._jobs_lock:
                    position = self._waiting.index(job.proto.job_id) + 1
                reason = self.pool.waiting_reason()
                note = f"{position}:{reason}"
                if note != announced:
                    announced = note
                    with job.lock:
                        job.proto.queue_position = position
                    self._emit(job, pb.JOB_STATE_QUEUED, queued=pb.JobQueued(position=position, reason=reason))
                if not first:
                    time.sleep(0.2)
        finally:
            with self._jobs_lock:
                if job.proto.job_id in self._waiting:
                    self._waiting.remove(job.proto.job_id)

    def _dispatch(self, job: _Job, handle: WorkerHandle, attempt: int) -> bool:
        """Runs the job on one worker; True when it should be retried on another worker."""
        with job.lock:
            job.proto.worker = handle.target
            job.proto.queue_position = 0
            if not job.proto.HasField("start_time"):
                job.proto.start_time.CopyFrom(convert.ts_from_ms(_now_ms()))
        self._emit(job, pb.JOB_STATE_RUNNING, dispatched=pb.JobDispatched(worker=handle.target))
        started = False
        finished: wpb.TrainFinished | None = None
        try:
            call = handle.stub.Train(job.train_request, metadata=self.pool.metadata(("x-request-id", job.proto.job_id)))
            job.call = call
            if job.cancel.is_set():
                call.cancel()
            for ev in call:
                started = True
                kind = ev.WhichOneof("event")
                with job.lock:
                    if kind == "started":
                        job.proto.run_id = ev.started.run_id
                        job.proto.total_epochs = ev.started.total_steps
                    elif kind == "epoch":
                        job.proto.epoch = ev.epoch.epoch
                        job.proto.total_epochs = ev.epoch.total_epochs
                    elif kind == "finished":
                        finished = ev.finished
                        job.proto.version = ev.finished.version
                        job.proto.metrics.clear()
                        job.proto.metrics.update(ev.finished.metrics)
                self._emit(job, pb.JOB_STATE_RUNNING, progress=ev)
                if kind == "failed":
                    self._end(job, pb.JOB_STATE_FAILED, ev.failed.reason)
                    return False
                if kind == "cancelled":
                    self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or ev.cancelled.reason)
                    return False
        except grpc.RpcError as exc:
            code = exc.code()
            if job.cancel.is_set():
                if job.cancel_reason != "interrupted":
                    self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled")
                return False
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED or (code == grpc.StatusCode.UNAVAILABLE and not started):
                self.pool.mark_unhealthy(handle, f"{code.name}: {exc.details()}")
                log.warning("job_dispatch_failed", job_id=job.proto.job_id, worker=handle.target, code=code.name,
                            attempt=attempt)
                return True
            reason = (f"worker {handle.target} stopped answering during the training ({code.name}: {exc.details()})"
                      if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
                      else f"{code.name}: {exc.details()}")
            if code == grpc.StatusCode.UNAVAILABLE:
                self.pool.mark_unhealthy(handle, reason)
            self._mark_run_failed(job)
            self._end(job, pb.JOB_STATE_FAILED, reason)
            return False
        finally:
            job.call = None
        if finished is None:
            if job.cancel.is_set():
                if job.cancel_reason != "interrupted":
                    self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled")
            else:
                self._mark_run_failed(job)
                self._end(job, pb.JOB_STATE_FAILED, f"worker {handle.target} ended the stream without a result")
            return False
        self._succeed(job, finished)
        return False

    def _mark_run_failed(self, job: _Job) -> None:
        if job.proto.run_id and not job.proto.version:
            try:
                self.service.store.terminate_run(job.proto.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - best effort: the run may be unreachable too
                log.warning("run_not_marked_failed", run_id=job.proto.run_id)

    def _succeed(self, job: _Job, finished: wpb.TrainFinished) -> None:
        name = finished.model_name or job.proto.model_name
        self.service.invalidate(name)
        decision = self._decide_promotion(job, name, finished.version)
        with job.lock:
            job.proto.promotion.CopyFrom(decision)
            job.proto.end_time.CopyFrom(convert.ts_from_ms(_now_ms()))
        version = self.service.get_version(name, finished.version)
        self._emit(job, pb.JOB_STATE_SUCCEEDED, succeeded=pb.JobSucceeded(
            version=convert.model_version_to_proto(version), promotion=decision))
        log.info("job_succeeded", job_id=job.proto.job_id, model=name, version=finished.version,
                 promoted=decision.promoted)
        self._audit_end(job, pb.JOB_STATE_SUCCEEDED, f"registered version {finished.version}")
        for hook in self._success_hooks:
            try:
                hook(name, finished.version)
            except Exception:  # noqa: BLE001 - a failing policy must not fail the finished job
                log.exception("success_hook_failed", model=name, version=finished.version)

    def _decide_promotion(self, job: _Job, name: str, version: int) -> pb.PromotionDecision:
        settings = job.settings
        metric = settings["metric"]
        decision = pb.PromotionDecision(considered=bool(settings["auto_promote"]), metric=metric)
        try:
            self.service.store.set_tag(name, version, MODEL_TYPE_TAG, TYPE_NAMES[job.proto.model_type])
        except Exception:  # noqa: BLE001 - the tag is informative only
            pass
        if not settings["auto_promote"]:
            decision.reason = "auto-promotion was not asked for"
            return decision
        snap = self.service.snapshot(name, fresh=True)
        candidate = snap.version(version)
        production = snap.alias("production")
        verdict = promotion_policy.decide(name, candidate, production, metric, settings["margin"],
                                          bool(settings.get("allow_data_change")))
        decision.candidate_value, decision.production_value = verdict.candidate_value, verdict.production_value
        decision.production_version = production.version if production else 0
        decision.promoted, decision.reason, decision.evaluated_on = verdict.promoted, verdict.reason, verdict.on_data
        caller = Caller("auto-promotion", "admin", job.proto.job_id)
        if decision.promoted:
            try:
                self.service.promote(caller, name, version, Stage.PRODUCTION,
                                     decision.production_version or 0,
                                     allow_data_change=bool(settings.get("allow_data_change")))
            except Exception as exc:  # noqa: BLE001 - e.g. a concurrent manual promotion won the race
                decision.promoted = False
                decision.reason = f"promotion refused: {exc}"
        payload = {"promoted": decision.promoted, "metric": metric, "candidate": _num(decision.candidate_value),
                   "production": _num(decision.production_value),
                   "production_version": decision.production_version or None, "reason": decision.reason,
                   "evaluated_on": decision.evaluated_on}
        try:
            self.service.store.set_tag(name, version, DECISION_TAG, json.dumps(payload))
        except Exception:  # noqa: BLE001
            log.warning("decision_tag_failed", model=name, version=version)
        self.db.audit_record(actor=caller.name, role=caller.role, action="AutoPromotion", model_name=name,
                             version=version, before={"production": decision.production_version or None},
                             after={"production": version if decision.promoted else (decision.production_version or None),
                                    **payload}, outcome="ok" if decision.promoted else "declined",
                             request_id=job.proto.job_id, message=decision.reason)
        self.service.invalidate(name)
        return decision


def _num(value: float) -> float | None:
    return None if math.isnan(value) else value


def _copy(proto: pb.RetrainJob) -> pb.RetrainJob:
    out = pb.RetrainJob()
    out.CopyFrom(proto)
    return out


def jobs_factory(config: ServerConfig, service: RegistryService, db: Database) -> tuple[JobManager, WorkerPool]:
    """Builds the job manager and worker pool for ``create_server``."""
    pool = WorkerPool(config)
    return JobManager(config, service, db, pool), pool
