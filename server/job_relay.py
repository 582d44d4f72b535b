"""Running a retrain job on a worker: dispatch, relay of its events, re-attach after a broken stream.

A training belongs to its worker, not to the stream: when the Train stream breaks (a network
blip, the registry replica replaced), the job re-attaches with ``AttachTraining`` after the last
worker sequence it relayed, so nothing is lost or relayed twice. A replica that took a job over
attaches the same way. The job fails when its worker is gone (the supervised local worker
exited, or the worker stays unreachable for ``REATTACH_SECONDS``), and ends INTERRUPTED when the
worker it is taken over on no longer knows the training. ``WorkerRelay`` is mixed into
``JobManager``, which provides ``pool``, ``service``, ``_emit``, ``_end`` and ``_succeed``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.server import convert
from aqimodels.server.job_store import now_ms

if TYPE_CHECKING:
    from aqimodels.server.service import RegistryService
    from aqimodels.server.workers import WorkerHandle, WorkerPool

log = structlog.get_logger(__name__)

REATTACH_SECONDS = 8.0  # how long an unreachable worker may stay unreachable before its job fails
# ... and one that refuses connections: nothing listens on its address any more, the process is
# gone (a worker started again on the same address would not know the training either)
REFUSED_SECONDS = 2.0
BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
          grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)


@dataclass
class Job:
    """A job this registry process runs (it holds the job's lease)."""

    proto: pb.RetrainJob
    train_request: wpb.TrainRequest
    settings: dict[str, Any]
    events: list[pb.RetrainEvent] = field(default_factory=list)
    listeners: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    call: Any = None
    depends_on: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None
    worker_sequence: int = 0  # the last worker event relayed (the worker's own numbering)
    worker_generation: int = 0  # which process of the local worker runs it
    handle: Any = None
    # Set when this process stops following the job without ending it: a graceful stop, or
    # another replica took it over. The job's thread returns; nothing more is emitted.
    let_go: threading.Event = field(default_factory=threading.Event)


class WorkerRelay:
    """Dispatch to a worker and relay of its events (a mixin of JobManager)."""

    pool: WorkerPool
    service: RegistryService

    def _emit(self, job: Job, state: pb.JobState.ValueType, **payload: Any) -> pb.RetrainEvent:
        raise NotImplementedError  # JobManager's

    def _end(self, job: Job, state: pb.JobState.ValueType, reason: str) -> None:
        raise NotImplementedError  # JobManager's

    def _succeed(self, job: Job, finished: wpb.TrainFinished) -> None:
        raise NotImplementedError  # JobManager's

    def _dispatch(self, job: Job, handle: WorkerHandle, attempt: int) -> bool:
        """Runs the job on one worker; True when it should be retried on another worker."""
        with job.lock:
            job.proto.worker = handle.target
            job.proto.queue_position = 0
            if not job.proto.HasField("start_time"):
                job.proto.start_time.CopyFrom(convert.ts_from_ms(now_ms()))
        job.handle, job.worker_generation = handle, handle.generation
        self._emit(job, pb.JOB_STATE_RUNNING, dispatched=pb.JobDispatched(worker=handle.target))
        try:
            call = handle.connected().Train(job.train_request, metadata=self.pool.metadata(("x-request-id", job.proto.job_id)))
            if self._relay(job, call):
                return False
        except grpc.RpcError as exc:
            if job.let_go.is_set():
                return False
            code = exc.code()
            if job.worker_sequence == 0 and (code == grpc.StatusCode.RESOURCE_EXHAUSTED or (
                    code == grpc.StatusCode.UNAVAILABLE and not job.cancel.is_set())):
                self.pool.mark_unhealthy(handle, f"{code.name}: {exc.details()}")
                log.warning("job_dispatch_failed", job_id=job.proto.job_id, worker=handle.target, code=code.name,
                            attempt=attempt)
                return True
            if code not in BROKEN:
                self._mark_run_failed(job)
                self._end(job, pb.JOB_STATE_FAILED, f"{code.name}: {exc.details()}")
                return False
            log.warning("job_stream_broken", job_id=job.proto.job_id, worker=handle.target, code=code.name,
                        after_sequence=job.worker_sequence)
        self._reattach(job, handle, taken_over=False)
        return False

    def _resume(self, job: Job) -> None:
        """Follows a job taken over from another replica on the worker that runs it."""
        handle = self.pool.handle_for(job.proto.worker)
        self.pool.claim(handle, job.proto.job_id)
        job.handle, job.worker_generation = handle, handle.generation
        try:
            if job.cancel.is_set():
                self._cancel_on_worker(job)
            self._reattach(job, handle, taken_over=True)
        finally:
            self.pool.release(handle, job.proto.job_id)

    def _reattach(self, job: Job, handle: WorkerHandle, *, taken_over: bool) -> None:
        """Attaches to the job's training after the last relayed event until it ends."""
        started = time.monotonic()
        deadline = started + REATTACH_SECONDS
        last_error = "the worker ended the stream without a result"
        while not job.let_go.is_set():
            gone = self.pool.exit_reason(handle, job.worker_generation)
            if gone:
                self._mark_run_failed(job)
                self._end(job, pb.JOB_STATE_CANCELLED if job.cancel.is_set() else pb.JOB_STATE_FAILED,
                          job.cancel_reason if job.cancel.is_set() else f"{gone} during the training")
                return
            try:
                call = handle.connected().AttachTraining(
                    wpb.AttachTrainingRequest(job_id=job.proto.job_id, after_sequence=job.worker_sequence),
                    metadata=self.pool.metadata(("x-request-id", job.proto.job_id)))
                if self._relay(job, call):
                    return
            except grpc.RpcError as exc:
                if job.let_go.is_set():
                    return
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self._mark_run_failed(job)
                    if job.cancel.is_set():
                        self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled")
                    elif taken_over:
                        self._end(job, pb.JOB_STATE_INTERRUPTED,
                                  f"taken over from a registry replica that stopped, but worker {handle.target} no "
                                  f"longer holds the training ({exc.details()})")
                    else:
                        self._end(job, pb.JOB_STATE_FAILED, f"worker {handle.target} lost the training "
                                  f"(it restarted?): {exc.details()}")
                    return
                last_error = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self.pool.mark_unhealthy(handle, last_error)
                    if "connection refused" in (exc.details() or "").lower():
                        deadline = min(deadline, started + REFUSED_SECONDS)
            if time.monotonic() > deadline:
                self._mark_run_failed(job)
                if job.cancel.is_set():
                    self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or "cancelled")
                else:
                    self._end(job, pb.JOB_STATE_FAILED, f"worker {handle.target} stopped answering during the "
                              f"training for {time.monotonic() - started:.0f} s ({last_error})")
                return
            job.let_go.wait(0.3)

    def _relay(self, job: Job, call: Any) -> bool:
        """Relays one worker stream; True when the job got its outcome, False when the stream
        ended without one. Raises grpc.RpcError when the stream breaks."""
        job.call = call
        try:
            if job.let_go.is_set():
                call.cancel()
            for ev in call:
                if job.let_go.is_set():
                    call.cancel()
                    return True
                if ev.sequence <= job.worker_sequence:
                    continue  # relayed already (a re-attach replays only later ones; this is a guard)
                kind = ev.WhichOneof("event")
                with job.lock:
                    job.worker_sequence = ev.sequence
                    if kind == "started":
                        job.proto.run_id = ev.started.run_id
                        job.proto.total_epochs = ev.started.total_steps
                    elif kind == "epoch":
                        job.proto.epoch = ev.epoch.epoch
                        job.proto.total_epochs = ev.epoch.total_epochs
                    elif kind == "finished":
                        job.proto.version = ev.finished.version
                        job.proto.metrics.clear()
                        job.proto.metrics.update(ev.finished.metrics)
                self._emit(job, pb.JOB_STATE_RUNNING, progress=ev)
                if kind == "failed":
                    self._end(job, pb.JOB_STATE_FAILED, ev.failed.reason)
                    return True
                if kind == "cancelled":
                    self._end(job, pb.JOB_STATE_CANCELLED, job.cancel_reason or ev.cancelled.reason)
                    return True
                if kind == "finished":
                    self._succeed(job, ev.finished)
                    return True
            return job.let_go.is_set()
        finally:
            job.call = None

    def _cancel_on_worker(self, job: Job) -> None:
        """Asks the job's worker to stop the training (its stream then ends with ``cancelled``)."""
        handle = job.handle or (self.pool.handle_for(job.proto.worker) if job.proto.worker else None)
        if handle is None or handle.stub is None:
            return
        try:
            handle.stub.CancelTraining(wpb.CancelTrainingRequest(job_id=job.proto.job_id, reason=job.cancel_reason),
                                       timeout=5, metadata=self.pool.metadata(("x-request-id", job.proto.job_id)))
        except grpc.RpcError as exc:  # the stream's end (or the re-attach) settles the job
            log.warning("job_cancel_on_worker_failed", job_id=job.proto.job_id, code=exc.code().name)

    def _mark_run_failed(self, job: Job) -> None:
        if job.proto.run_id and not job.proto.version:
            try:
                self.service.store.terminate_run(job.proto.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - best effort: the run may be unreachable too
                log.warning("run_not_marked_failed", run_id=job.proto.run_id)
