"""Retrain jobs: creation, their lifecycle across registry replicas, status and cancel.

Each job runs on a thread of the registry process that holds its lease, independent of the
caller's stream: a caller that disconnects does not stop it, and neither does the registry: a
killed replica's jobs are taken over by another one (or by itself, restarted) once their lease
expired, a replica that stops gracefully releases its leases at once. The training itself
belongs to the worker, which keeps it running when the stream breaks, so the new owner attaches
to it after the last stored worker sequence and finishes the job as the first owner would have.
Every event gets the job id and a sequence number, is kept in memory for live watchers and
written to ``aqimodels_job_events``, so that a late or reconnecting watcher (on this replica or
another) replays what it missed. One queued or running job per model, checked under the model's
database-level lock so replicas agree.

The parts: ``job_store`` (the tables), ``job_leases`` (renewal, takeover, remote cancel),
``job_relay`` (dispatch to a worker, relay, re-attach), ``job_watch`` (followers),
``job_decisions`` (the promotion decision and the ensemble's members).
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    JobNotFoundError,
)
from aqimodels.client.domain import (
    MEMBER_TYPES,
    TYPE_NAMES,
    Caller,
    ModelType,
    registered_model_name,
    validate_metric,
)
from aqimodels.server import convert, promotion_policy
from aqimodels.server.config import ServerConfig
from aqimodels.server.db import Database
from aqimodels.server.job_decisions import JobDecisions
from aqimodels.server.job_leases import LeaseKeeper
from aqimodels.server.job_relay import Job, WorkerRelay
from aqimodels.server.job_store import ACTIVE, PERSIST_INTERVAL, TERMINAL, JobStore, StoredJob, now_ms
from aqimodels.server.job_watch import JobWatching
from aqimodels.server.paging import decode_token, encode_token, page_size
from aqimodels.server.service import RegistryService
from aqimodels.server.workers import WorkerHandle, WorkerPool

__all__ = ["ACTIVE", "TERMINAL", "JobManager", "jobs_factory"]

log = structlog.get_logger(__name__)

MAX_DISPATCH_ATTEMPTS = 3


class _Replay(Exception):
    """The request id already created jobs: the retry gets those instead of new ones."""

    def __init__(self, job_ids: list[str]) -> None:
        super().__init__("replay")
        self.job_ids = job_ids


class JobManager(JobDecisions, WorkerRelay, JobWatching):
    """The retrain RPCs' logic."""

    def __init__(self, config: ServerConfig, service: RegistryService, db: Database, pool: WorkerPool) -> None:
        self.config = config
        self.service = service
        self.db = db
        self.pool = pool
        self.owner = uuid.uuid4().hex[:12]
        self.store = JobStore(db, self.owner, int(config.job_lease_seconds * 1000))
        self.leases = LeaseKeeper(self.store, local=self._local_active, adopt=self._adopt, let_go=self._let_go,
                                  cancel=self._cancel_requested)
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = threading.Lock()
        self._waiting: list[str] = []  # job ids waiting for a worker, FIFO
        self._stop = threading.Event()
        self._success_hooks: list[Callable[[str, int], None]] = []
        self._event_hooks: list[Callable[[pb.RetrainJob, pb.RetrainEvent], None]] = []
        self._writer: threading.Thread | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        self.pool.start()
        self._writer = threading.Thread(target=self._writer_loop, daemon=True, name="job-event-writer")
        self._writer.start()
        self.leases.start()

    def shutdown(self) -> None:
        """A graceful stop: lets go of this process's unfinished jobs and releases their leases at
        once, so that another replica (or this one, restarted) continues them; the trainings go on
        on their workers."""
        self._stop.set()
        self.leases.stop()
        with self._jobs_lock:
            jobs = [j for j in self._jobs.values() if j.proto.state in ACTIVE]
        for job in jobs:
            self._let_go_job(job)  # from here on nothing of these jobs is emitted by this process
        try:
            self._flush()
            self.store.release([j.proto.job_id for j in jobs])
            if jobs:
                log.info("job_leases_released", jobs=[j.proto.job_id for j in jobs])
        except Exception as exc:  # noqa: BLE001 - the leases then expire on their own
            log.warning("job_leases_not_released", error=str(exc)[:200])
        deadline = time.monotonic() + 5
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _local_active(self) -> set[str]:
        with self._jobs_lock:
            return {j for j, job in self._jobs.items() if job.proto.state in ACTIVE and not job.let_go.is_set()}

    def _let_go(self, job_id: str) -> None:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is not None:
            self._let_go_job(job)

    def _let_go_job(self, job: Job) -> None:
        with job.lock:
            job.let_go.set()
            for listener in job.listeners:
                listener.put(None)
        if job.call is not None:
            job.call.cancel()  # only the stream: the training goes on on its worker

    def _cancel_requested(self, job_id: str, reason: str) -> None:
        """A cancel asked on another replica, for a job this one runs."""
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None or job.cancel.is_set():
            return
        job.cancel_reason = reason
        job.cancel.set()
        if job.proto.state == pb.JOB_STATE_RUNNING:
            self._cancel_on_worker(job)

    def _adopt(self, job_id: str) -> None:
        """Takes over a job whose lease this process just claimed, and continues it."""
        stored = self.store.load_full(job_id)
        if stored is None or stored.proto.state in TERMINAL:
            return
        job = self._job_from_store(stored)
        with self._jobs_lock:
            old = self._jobs.get(job_id)
            if old is not None and old.thread is not None and old.thread.is_alive():
                old.let_go.set()  # this process let go of it earlier and now takes it back
            self._jobs[job_id] = job
        job.thread = threading.Thread(target=self._run, args=(job,), daemon=True, name=f"job-{job_id}")
        job.thread.start()

    def _job_from_store(self, stored: StoredJob) -> Job:
        settings = stored.settings or {"auto_promote": self.config.auto_promotion,
                                       "metric": self.config.promotion_metric, "margin": self.config.promotion_margin}
        job = Job(proto=stored.proto, train_request=stored.request, settings=settings,
                  depends_on=list(stored.depends_on))
        job.events = self.store.events_after(stored.proto.job_id, 0)
        for ev in job.events:
            if ev.WhichOneof("event") == "progress":
                job.worker_sequence = max(job.worker_sequence, ev.progress.sequence)
        if job.events and job.events[-1].sequence > job.proto.last_sequence:
            job.proto.last_sequence = job.events[-1].sequence
        if stored.cancel_reason:
            job.cancel_reason = stored.cancel_reason
            job.cancel.set()
        return job

    # ---- persistence ----

    def _flush(self) -> None:
        self.store.flush()

    def _writer_loop(self) -> None:
        while not self._stop.wait(PERSIST_INTERVAL):
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - the database is down: retried next time
                log.warning("job_events_write_failed", error=str(exc)[:200], pending=self.store.pending)

    def _load(self, job_id: str) -> pb.RetrainJob:
        if not job_id or len(job_id) > 64:
            raise InvalidArgumentError("job_id is required (at most 64 characters)", field="job_id")
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is not None and not job.let_go.is_set():
            with job.lock:
                return _copy(job.proto)
        proto = self.store.load(job_id)
        if proto is None:
            raise JobNotFoundError(f"retrain job {job_id!r} does not exist")
        return proto

    # ---- events ----

    def _emit(self, job: Job, state: pb.JobState.ValueType, **payload: Any) -> pb.RetrainEvent:
        with job.lock:
            if job.let_go.is_set():  # another replica runs the job now: it emits, not this one
                return pb.RetrainEvent(job_id=job.proto.job_id, sequence=job.proto.last_sequence, state=state)
            seq = job.proto.last_sequence + 1
            event = pb.RetrainEvent(job_id=job.proto.job_id, sequence=seq, model_type=job.proto.model_type,
                                    state=state, **payload)
            event.time.GetCurrentTime()
            changed = job.proto.state != state
            job.proto.last_sequence = seq
            job.proto.state = state
            self.store.queue(job.proto, event)
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
                except Exception:  # an observer must never break a job
                    log.exception("event_hook_failed", job_id=job.proto.job_id)
        return event

    def _end(self, job: Job, state: pb.JobState.ValueType, reason: str) -> None:
        with job.lock:
            if job.proto.state in TERMINAL or job.let_go.is_set():
                return
            job.proto.error = reason
            job.proto.end_time.CopyFrom(convert.ts_from_ms(now_ms()))
        # The closing record first: whoever sees the job end finds its record (and its event).
        self._audit_end(job, state, reason)
        self._emit(job, state, ended=pb.JobEnded(state=state, reason=reason))
        log.info("job_ended", job_id=job.proto.job_id, model=job.proto.model_name,
                 state=pb.JobState.Name(state), reason=reason)

    def _audit_end(self, job: Job, state: pb.JobState.ValueType, reason: str) -> None:
        self.db.audit_record(
            actor=job.proto.requested_by or "anonymous", role="", action="RetrainJob",
            model_name=job.proto.model_name, version=job.proto.version, before={"job_id": job.proto.job_id},
            after={"state": pb.JobState.Name(state), "version": job.proto.version or None},
            outcome={pb.JOB_STATE_SUCCEEDED: "ok", pb.JOB_STATE_CANCELLED: "cancelled"}.get(state, "failed"),
            request_id=job.proto.job_id, message=reason[:500])

    def _audit_registered(self, job: Job, name: str, version: int) -> None:
        """The version's registration, once per job (a replica that takes the job over finds it)."""
        job_id = job.proto.job_id
        if self.db.audit_recorded("RegisterModelVersion", job_id):
            return
        self.db.audit_record(
            actor=job.proto.requested_by or "anonymous", role="", action="RegisterModelVersion", model_name=name,
            version=version, before={"job_id": job_id}, after={"job_id": job_id, "version": version}, outcome="ok",
            request_id=job_id, message=f"retrain job {job_id} registered version {version}")

    # ---- RPCs ----

    def retrain(self, request: pb.RetrainRequest, caller: Caller, stop: threading.Event) -> Iterator[pb.RetrainEvent]:
        """Creates the jobs of a request and follows them until they end or ``stop`` is set."""
        if request.request_id:
            raw = self.db.remembered("Retrain", request.request_id)
            if raw is not None:
                yield from self.follow(json.loads(raw), stop)
                return
        job_ids = self.submit(request, caller)
        yield from self.follow(job_ids, stop)

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

    def _requested_types(self, request: pb.RetrainRequest) -> list[ModelType]:
        types: list[ModelType] = []
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

    def _create_jobs(self, types: list[ModelType], request: pb.RetrainRequest, caller: Caller,
                     settings: dict[str, Any]) -> list[Job]:
        names = sorted(registered_model_name(t, request.dataset.target) for t in types)
        locks = [self.db.model_lock(f"retrain:{n}") for n in names]
        for lock in locks:
            lock.__enter__()
        try:
            if request.request_id:
                # A retry that raced the first call past the idempotency check: the first call's
                # jobs exist by now (created under these same locks), so answer with them.
                earlier = self.store.job_ids_for_request(request.request_id)
                if earlier:
                    raise _Replay(earlier)
            rows = self.store.active_for_models(names)
            if rows:
                job_id, name, state = rows[0]
                raise AlreadyExistsError(
                    f"{name} already has a {pb.JobState.Name(state).removeprefix('JOB_STATE_').lower()} "
                    f"retrain job {job_id}; watch it with `aqimodels jobs watch {job_id}` or cancel it first")
            jobs: list[Job] = []
            now = now_ms()
            for t in types:
                job_id = "job-" + uuid.uuid4().hex[:12]
                proto = pb.RetrainJob(job_id=job_id, model_type=t, model_name=registered_model_name(t, request.dataset.target),
                                      state=pb.JOB_STATE_QUEUED, dataset=request.dataset.spec or "synthetic",
                                      requested_by=caller.name)
                proto.create_time.CopyFrom(convert.ts_from_ms(now))
                proto.promotion.metric = settings["metric"]
                train_request = wpb.TrainRequest(job_id=job_id, model_type=t, dataset=request.dataset,
                                                 params=request.params, experiment_name=self.config.experiment_name,
                                                 registered_model_name=proto.model_name,
                                                 tags={"requested_by": caller.name})
                job = Job(proto=proto, train_request=train_request, settings=settings)
                if t == wpb.MODEL_TYPE_ENSEMBLE:
                    job.depends_on = [j.proto.job_id for j in jobs if j.proto.model_type in MEMBER_TYPES]
                self.store.insert(proto, train_request, request.request_id, settings, job.depends_on)
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

    def watch(self, job_id: str, after: int, stop: threading.Event) -> Iterator[pb.RetrainEvent]:
        """One job's events after ``after`` until it ends or ``stop`` is set (any replica's job)."""
        if after < 0:
            raise InvalidArgumentError("after_sequence must not be negative", field="after_sequence")
        self._load(job_id)  # NOT_FOUND before the stream starts
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
        if last is not None and (len(last) != 2 or not isinstance(last[0], int) or not isinstance(last[1], str)):
            raise InvalidArgumentError("page_token is invalid", field="page_token")
        rows = self.store.page(size, state, model_name, last)
        page = rows[:size]
        jobs = []
        for raw, _c, job_id in page:
            with self._jobs_lock:
                live = self._jobs.get(job_id)
            fresh = live is not None and not live.let_go.is_set()
            jobs.append(self._with_position(_copy(live.proto) if live and fresh else pb.RetrainJob.FromString(raw)))
        next_token = encode_token([page[-1][1], page[-1][2]], query) if len(rows) > size else ""
        return jobs, next_token

    def cancel(self, job_id: str, reason: str, caller: Caller) -> pb.RetrainJob:
        """Cancels a job, whichever replica runs it: the owner's lease row carries the request, and
        the worker is asked to stop the training at once."""
        proto = self._load(job_id)
        if proto.state in TERMINAL:
            raise FailedPreconditionError(
                f"job {job_id} has already ended ({pb.JobState.Name(proto.state).removeprefix('JOB_STATE_').lower()})")
        reason = reason or f"cancelled by {caller.name}"
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is not None and job.let_go.is_set():
            job = None
        if not self.store.request_cancel(job_id, reason):
            proto = self._load(job_id)
            raise FailedPreconditionError(
                f"job {job_id} has already ended ({pb.JobState.Name(proto.state).removeprefix('JOB_STATE_').lower()})")
        if job is not None:
            job.cancel_reason = reason
            job.cancel.set()
            self._cancel_on_worker(job)
        elif proto.state == pb.JOB_STATE_RUNNING and proto.worker:
            self._cancel_on_worker(Job(proto=proto, train_request=wpb.TrainRequest(), settings={},
                                       cancel_reason=reason))
        self.db.audit_record(actor=caller.name, role=caller.role, action="CancelRetrainJob",
                             model_name=proto.model_name, version=0, before={"state": pb.JobState.Name(proto.state)},
                             after={"state": "JOB_STATE_CANCELLED"}, outcome="ok", request_id=caller.request_id,
                             message=reason[:500])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if job is not None and job.thread is not None:
                job.thread.join(timeout=0.2)
            else:
                time.sleep(0.2)
            proto = self._load(job_id)
            if proto.state in TERMINAL:
                break
        return proto

    def running_by_model(self) -> dict[str, list[pb.RetrainJob]]:
        """Queued and running jobs of every replica: this process's own live, the others' as read
        by the lease keeper at most ``FRESH_SECONDS`` ago."""
        shared = self.leases.active_jobs()
        out: dict[str, list[pb.RetrainJob]] = {}
        with self._jobs_lock:
            for job in self._jobs.values():
                if job.proto.state in ACTIVE and not job.let_go.is_set():
                    out.setdefault(job.proto.model_name, []).append(_copy(job.proto))
            for proto in shared:
                own = self._jobs.get(proto.job_id)
                if own is None or own.let_go.is_set():  # this process's own: its live state counts
                    out.setdefault(proto.model_name, []).append(proto)
        return out

    # ---- running a job ----

    def _run(self, job: Job) -> None:
        log_ = log.bind(job_id=job.proto.job_id, model=job.proto.model_name)
        try:
            if job.proto.state == pb.JOB_STATE_RUNNING and job.proto.worker:
                self._resume(job)  # taken over mid-training: attach to it where the store left off
                return
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
            if not job.let_go.is_set():
                self._end(job, pb.JOB_STATE_FAILED, f"no worker could start the job after {MAX_DISPATCH_ATTEMPTS} attempts")
        except Exception as exc:  # a bug must still end the job, never leave it running
            log_.exception("job_crashed")
            self._end(job, pb.JOB_STATE_FAILED, f"internal error: {exc}")
        finally:
            with self._jobs_lock:
                if job.proto.job_id in self._waiting:
                    self._waiting.remove(job.proto.job_id)

    def _wait_for_members(self, job: Job) -> bool:
        while True:
            states = [self._load(j).state for j in job.depends_on]
            if all(s in TERMINAL for s in states):
                return True
            if job.cancel.wait(0.5):
                self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled")
                return False
            if job.let_go.is_set():
                return False

    def _wait_for_worker(self, job: Job) -> WorkerHandle | None:
        with self._jobs_lock:
            self._waiting.append(job.proto.job_id)
        announced = ""
        try:
            while True:
                if job.cancel.is_set():
                    self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled")
                    return None
                if job.let_go.is_set():
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

    def _succeed(self, job: Job, finished: wpb.TrainFinished) -> None:
        name = finished.model_name or job.proto.model_name
        self.service.invalidate(name)
        self._audit_registered(job, name, finished.version)  # before any promotion of the version
        decision = self._decide_promotion(job, name, finished.version)
        with job.lock:
            job.proto.promotion.CopyFrom(decision)
            job.proto.end_time.CopyFrom(convert.ts_from_ms(now_ms()))
        version = self.service.get_version(name, finished.version)
        if job.let_go.is_set():
            return  # stopped meanwhile: the replica that takes the job over finishes it
        # The closing record first: whoever sees the job end finds its record (and its event).
        self._audit_end(job, pb.JOB_STATE_SUCCEEDED, f"registered version {finished.version}")
        self._emit(job, pb.JOB_STATE_SUCCEEDED, succeeded=pb.JobSucceeded(
            version=convert.model_version_to_proto(version), promotion=decision))
        log.info("job_succeeded", job_id=job.proto.job_id, model=name, version=finished.version,
                 promoted=decision.promoted)
        for hook in self._success_hooks:
            try:
                hook(name, finished.version)
            except Exception:  # a failing policy must not fail the finished job
                log.exception("success_hook_failed", model=name, version=finished.version)


def _copy(proto: pb.RetrainJob) -> pb.RetrainJob:
    out = pb.RetrainJob()
    out.CopyFrom(proto)
    return out


def jobs_factory(config: ServerConfig, service: RegistryService, db: Database) -> tuple[JobManager, WorkerPool]:
    """Builds the job manager and worker pool for ``create_server``."""
    pool = WorkerPool(config)
    return JobManager(config, service, db, pool), pool
