"""What a retrain's events say about each of its jobs: the state the CLI's progress view follows.

``apply_event`` folds one ``RetrainEvent`` into a :class:`JobProgress`; rendering it (bars, lines,
the summary table) is ``render``'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.domain import model_type_name
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.client.values import promotion_text

JOB_STATES: dict[str, int] = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
    "interrupted": pb.JOB_STATE_INTERRUPTED,
}
TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED,
                             pb.JOB_STATE_INTERRUPTED})


def job_state_value(state: str | None) -> int:
    """The proto enum number of a job state given by name ("running"); 0 for none."""
    if not state:
        return pb.JOB_STATE_UNSPECIFIED
    try:
        return JOB_STATES[state.strip().lower()]
    except KeyError:
        raise InvalidArgumentError(f"unknown job state {state!r}; use one of {', '.join(JOB_STATES)}",
                                   field="state") from None


def job_state_name(value: int) -> str:
    return {v: k for k, v in JOB_STATES.items()}.get(value, "unspecified")


@dataclass
class JobProgress:
    """What the CLI knows about one retrain job from the events seen so far."""

    job_id: str
    model_type: str = "unspecified"
    state: int = pb.JOB_STATE_UNSPECIFIED
    phase: str = "waiting"
    member: str = ""
    epoch: int = 0
    total: int = 0
    loss: float | None = None
    validation_rmse: float | None = None
    elapsed: float | None = None
    worker: str = ""
    run_id: str = ""
    version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    promotion: str = ""
    error: str = ""
    last_sequence: int = 0
    stopped_early: bool = False
    best_epoch: int = 0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def description(self) -> str:
        return f"{self.model_type:<9} {self.phase}"

    @property
    def completed(self) -> int:
        return self.epoch


def apply_event(jobs: dict[str, JobProgress], event: pb.RetrainEvent) -> JobProgress:
    """Folds one RetrainEvent into the job's progress (creating it on its first event) and returns it."""
    job = jobs.get(event.job_id)
    if job is None:
        job = jobs[event.job_id] = JobProgress(event.job_id)
    if event.model_type:
        job.model_type = model_type_name(event.model_type)
    if event.state:
        job.state = event.state
    job.last_sequence = max(job.last_sequence, event.sequence)
    kind = event.WhichOneof("event")
    if kind == "queued":
        q = event.queued
        job.phase = f"queued #{q.position}" if q.position else "queued"
        if q.reason and q.reason != "queued":
            job.phase += f" ({q.reason})"
    elif kind == "dispatched":
        job.worker = event.dispatched.worker
        job.phase = f"dispatched to {job.worker}"
    elif kind == "progress":
        _apply_train_event(job, event.progress)
    elif kind == "succeeded":
        s = event.succeeded
        job.version = s.version.version or job.version
        if s.version.metrics:
            job.metrics = dict(s.version.metrics)
        job.promotion = promotion_text(s.promotion)
        job.phase = f"succeeded → v{job.version}" if job.version else "succeeded"
        _note_early_stop(job)
        if not event.state:
            job.state = pb.JOB_STATE_SUCCEEDED
    elif kind == "ended":
        e = event.ended
        if e.state:
            job.state = e.state
        job.error = e.reason or job.error
        job.phase = job_state_name(job.state) + (f": {e.reason}" if e.reason else "")
    return job


def _apply_train_event(job: JobProgress, ev: wpb.TrainEvent) -> None:
    kind = ev.WhichOneof("event")
    if kind == "started":
        job.run_id = ev.started.run_id
        job.total = ev.started.total_steps or job.total
        job.phase = "started"
        if ev.started.worker_id and not job.worker:
            job.worker = ev.started.worker_id
    elif kind == "data_loaded":
        d = ev.data_loaded
        job.phase = f"data loaded: {d.stations} stations, {d.hours} h"
    elif kind == "epoch":
        e = ev.epoch
        if e.member != job.member:
            job.member = e.member
        job.epoch = e.epoch
        job.total = e.total_epochs or job.total
        job.loss = e.loss
        job.validation_rmse = e.validation_rmse
        job.elapsed = e.elapsed_seconds
        job.phase = f"training {e.member}" if e.member else "training"
    elif kind == "evaluating":
        job.phase = "evaluating"  # the bar keeps the epochs that ran: an early stop is not a completion
    elif kind == "registering":
        job.phase = "registering"
    elif kind == "finished":
        f = ev.finished
        job.version = f.version
        job.metrics = dict(f.metrics)
        job.elapsed = f.training_seconds or job.elapsed
        job.phase = f"registered v{f.version}"
        _note_early_stop(job)
    elif kind == "failed":
        job.error = ev.failed.reason
        job.phase = "failed" + (f" ({ev.failed.code})" if ev.failed.code else "")
    elif kind == "cancelled":
        job.error = ev.cancelled.reason
        job.phase = "cancelled"


def _note_early_stop(job: JobProgress) -> None:
    """From the run's convergence metrics: how many epochs ran and whether training stopped early."""
    ran, best = job.metrics.get("epochs_run"), job.metrics.get("best_epoch")
    if ran is not None and not math.isnan(ran):
        job.epoch = int(ran)
    if best is not None and not math.isnan(best):
        job.best_epoch = int(best)
    job.stopped_early = bool(job.metrics.get("early_stopped")) or (job.total > 0 and 0 < job.epoch < job.total
                                                                   and ran is not None)
    if job.stopped_early and job.total:
        job.phase += f" · {job.epoch}/{job.total}, stopped early" + (
            f", best epoch {job.best_epoch}" if job.best_epoch else "")


def eta_seconds(job: JobProgress) -> float | None:
    """The time left at the rate so far (epochs per elapsed second), once there is a rate."""
    if job.done or not job.total or job.epoch <= 0 or not job.elapsed or job.epoch >= job.total:
        return None
    return (job.total - job.epoch) * job.elapsed / job.epoch
