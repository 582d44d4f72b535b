"""TrainingWorker servicer: runs trainings on threads and streams their progress.

Each new training takes one of ``capacity`` slots (RESOURCE_EXHAUSTED when none is free) and runs
:func:`aqimodels.training.runner.run_training` on a thread of its own. The training belongs to
the worker, not to the call that started it: a broken Train stream (a registry killed or
redeployed) does not stop it, and any registry replica follows it again with AttachTraining after
the last sequence number it stored. Only CancelTraining or the worker's own stop ends it early
(the MLflow run ends KILLED, nothing is registered). Data problems found before training starts
are answered as INVALID_ARGUMENT; failures after the run started arrive as a ``failed`` event.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import structlog

from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.api.training.v1 import worker_pb2_grpc
from aqimodels.client.errors import AqiModelsError, InvalidArgumentError, JobNotFoundError, ResourceExhaustedError, quote
from aqimodels.client.domain import TYPE_NAMES
from aqimodels.training import core

log = structlog.get_logger(__name__)

TYPES = TYPE_NAMES


@dataclass(frozen=True)
class WorkerConfig:
    tracking_uri: str
    experiment_name: str = "aqi-predictor"
    artifact_location: str | None = None
    capacity: int = 1
    host: str = "127.0.0.1"
    port: int = 50052
    tokens_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    metrics_port: int | None = None  # Prometheus endpoint: None = off, 0 = ephemeral (tests)
    retain_seconds: float = 1800.0  # how long an ended training's outcome stays attachable
    registry_token: str = ""  # the token of the registry that started this worker (AQIMODELS_REGISTRY_TOKEN)


def _ts(value: Any, field: str = "dataset.start_time") -> np.datetime64 | None:
    if value is None or (not value.seconds and not value.nanos):
        return None
    try:
        return np.datetime64(value.ToDatetime().replace(tzinfo=None), "ns")
    except (ValueError, OverflowError):
        raise InvalidArgumentError(f"{field} is not a valid timestamp (seconds {value.seconds}, nanos "
                                   f"{value.nanos})", field=field) from None


def job_from_proto(request: wpb.TrainRequest, experiment_name: str) -> core.TrainJob:
    """The TrainJob of a request; INVALID_ARGUMENT naming the field when it is malformed."""
    if request.model_type not in TYPES:
        raise InvalidArgumentError(f"model_type {request.model_type} is not one of xgboost, lstm, gnn, ensemble",
                                   field="model_type")
    if not request.job_id or len(request.job_id) > 64:
        raise InvalidArgumentError("job_id is required (at most 64 characters)", field="job_id")
    p = request.params
    for name, value, lo, hi in (("max_epochs", p.max_epochs, 0, 10_000), ("window_hours", p.window_hours, 0, 720),
                                ("batch_size", p.batch_size, 0, 65_536), ("hidden_size", p.hidden_size, 0, 4096),
                                ("early_stopping_patience", p.early_stopping_patience, 0, 10_000)):
        if not lo <= value <= hi:
            raise InvalidArgumentError(f"params.{name} must be between {lo} and {hi}, got {value}",
                                       field=f"params.{name}")
    if p.learning_rate < 0 or p.learning_rate > 10 or p.learning_rate != p.learning_rate:
        raise InvalidArgumentError("params.learning_rate must be between 0 and 10", field="params.learning_rate")
    config = core.TrainConfig(
        max_epochs=p.max_epochs or None, window_hours=p.window_hours or 24, learning_rate=p.learning_rate or None,
        batch_size=p.batch_size or None, early_stopping_patience=p.early_stopping_patience or None,
        seed=p.seed or 42, hidden_size=p.hidden_size or None, extra=dict(p.extra))
    members = tuple(core.EnsembleMemberRef(TYPES.get(m.model_type, ""), m.model_name, m.version, m.model_uri)
                    for m in request.ensemble_members)
    return core.TrainJob(
        job_id=request.job_id, model_type=TYPES[request.model_type], dataset=request.dataset.spec or "synthetic",
        config=config, experiment_name=request.experiment_name or experiment_name,
        registered_model_name=request.registered_model_name, ensemble_members=members, tags=dict(request.tags),
        target=_target(request.dataset.target), champion_model_uri=request.champion_model_uri,
        start_time=_ts(request.dataset.start_time if request.dataset.HasField("start_time") else None),
        end_time=_ts(request.dataset.end_time if request.dataset.HasField("end_time") else None, "dataset.end_time"))


def _target(value: str) -> str:
    from aqimodels.training.runtime.aqi import AQI_POLLUTANTS

    target = (value or "pm25").strip().lower()
    if target not in AQI_POLLUTANTS:
        raise InvalidArgumentError(f"dataset.target {value!r} is not one of {', '.join(AQI_POLLUTANTS)}",
                                   field="dataset.target")
    return target


def event_to_proto(ev: core.ProgressEvent, seq: int) -> wpb.TrainEvent:
    out = wpb.TrainEvent(sequence=seq)
    out.time.GetCurrentTime()
    if isinstance(ev, core.Started):
        out.started.CopyFrom(wpb.TrainStarted(run_id=ev.run_id, experiment_id=ev.experiment_id,
                                              total_steps=ev.total_steps, worker_id=socket.gethostname()))
    elif isinstance(ev, core.DataLoaded):
        out.data_loaded.CopyFrom(wpb.DataLoaded(stations=ev.stations, hours=ev.hours, train_samples=ev.train_samples,
                                                validation_samples=ev.validation_samples,
                                                test_samples=ev.test_samples, fingerprint=ev.fingerprint))
    elif isinstance(ev, core.EpochFinished):
        out.epoch.CopyFrom(wpb.EpochFinished(epoch=ev.epoch, total_epochs=ev.total_epochs, loss=ev.loss,
                                             validation_rmse=ev.validation_rmse, member=ev.member,
                                             elapsed_seconds=ev.elapsed_seconds))
    elif isinstance(ev, core.Evaluating):
        out.evaluating.CopyFrom(wpb.Evaluating(test_samples=ev.test_samples))
    elif isinstance(ev, core.Registering):
        out.registering.CopyFrom(wpb.Registering(model_name=ev.model_name))
    elif isinstance(ev, core.Finished):
        out.finished.CopyFrom(wpb.TrainFinished(
            model_name=ev.model_name, version=ev.version, run_id=ev.run_id, model_uri=ev.model_uri,
            metrics={k: float(v) for k, v in ev.metrics.items() if not math.isnan(v)}, training_seconds=ev.training_seconds))
    else:  # pragma: no cover - a new event type without a converter is a bug
        raise TypeError(f"unknown progress event {ev!r}")
    return out


class _Held:
    """One training the worker holds: its events so far, then its outcome, for every follower."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.stop = threading.Event()
        self.cancel_reason = ""
        self.events: list[wpb.TrainEvent] = []
        self.state = wpb.TRAINING_STATE_RUNNING
        self.early_error: AqiModelsError | None = None  # bad input found before the run started
        self.started = time.time()
        self.ended: float | None = None
        self.cond = threading.Condition()

    def add(self, ev: wpb.TrainEvent) -> None:
        with self.cond:
            self.events.append(ev)
            kind = ev.WhichOneof("event")
            if kind in _END_STATES:
                self.state = _END_STATES[kind]
            self.cond.notify_all()

    def end(self, early_error: AqiModelsError | None = None) -> None:
        with self.cond:
            self.early_error = early_error
            if self.state == wpb.TRAINING_STATE_RUNNING:
                self.state = wpb.TRAINING_STATE_FAILED
            self.ended = time.time()
            self.cond.notify_all()

    def follow(self, after: int, active: Callable[[], bool]) -> Iterator[wpb.TrainEvent]:
        """The events after ``after`` (replayed, then live) until the outcome or ``active()`` is False."""
        index = 0
        while True:
            with self.cond:
                while index >= len(self.events) and self.ended is None:
                    if not self.cond.wait(0.5) and not active():
                        return
                batch = self.events[index:]
                index = len(self.events)
                done = self.ended is not None and index >= len(self.events)
                early = self.early_error
            for ev in batch:
                if ev.sequence > after:
                    yield ev
            if done:
                if early is not None and not batch and not self.events:
                    raise early  # e.g. INVALID_ARGUMENT: bad data, found before any training
                return

    def describe(self) -> wpb.HeldTraining:
        with self.cond:
            out = wpb.HeldTraining(job_id=self.job_id, state=self.state,
                                   last_sequence=self.events[-1].sequence if self.events else 0)
            out.start_time.FromNanoseconds(int(self.started * 1e9))
            if self.ended is not None:
                out.end_time.FromNanoseconds(int(self.ended * 1e9))
        return out


_END_STATES = {"finished": wpb.TRAINING_STATE_FINISHED, "failed": wpb.TRAINING_STATE_FAILED,
               "cancelled": wpb.TRAINING_STATE_CANCELLED}


class TrainingWorkerServicer(worker_pb2_grpc.TrainingWorkerServicer):
    """Trains on request, ``capacity`` trainings at a time.

    A training runs on a thread of its own and outlives the call that started it: its events are
    kept (with the job's own sequence numbers) so that any caller can attach again after a
    sequence number, and its outcome stays attachable for ``retain_seconds`` after it ended.
    """

    def __init__(self, config: WorkerConfig, worker_id: str = "") -> None:
        self.config = config
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._slots = threading.BoundedSemaphore(config.capacity)
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._start = time.time()

    def stop_all(self) -> None:
        with self._lock:
            for held in self._held.values():
                held.stop.set()

    def _forget_expired(self) -> None:
        cutoff = time.time() - self.config.retain_seconds
        with self._lock:
            for job_id in [j for j, h in self._held.items() if h.ended is not None and h.ended < cutoff]:
                del self._held[job_id]

    def _get(self, job_id: str) -> _Held:
        self._forget_expired()
        with self._lock:
            held = self._held.get(job_id)
        if held is None:
            raise JobNotFoundError(f"worker {self.worker_id} holds no training for job {job_id!r} (it never ran "
                                "here, the worker restarted, or its outcome passed the retention time)")
        return held

    def Train(self, request: wpb.TrainRequest, context: grpc.ServicerContext) -> Iterator[wpb.TrainEvent]:
        job = job_from_proto(request, self.config.experiment_name)
        self._forget_expired()
        with self._lock:
            held = self._held.get(job.job_id)
            if held is None:
                if not self._slots.acquire(blocking=False):
                    busy = ", ".join(j for j, h in self._held.items() if h.ended is None)
                    raise ResourceExhaustedError(f"worker {self.worker_id} is at its capacity of "
                                                 f"{self.config.capacity} training(s) (running: {busy})")
                held = self._held[job.job_id] = _Held(job.job_id)
                threading.Thread(target=self._run, args=(job, held, request), name=f"train-{job.job_id}",
                                 daemon=True).start()
                log.info("training_started", job_id=job.job_id, model_type=job.model_type, dataset=job.dataset)
            else:  # a retry of a dispatch that reached us: the same training, not a second one
                log.info("training_reattached", job_id=job.job_id, after_sequence=0)
        yield from held.follow(0, context.is_active)

    def AttachTraining(self, request: wpb.AttachTrainingRequest,
                       context: grpc.ServicerContext) -> Iterator[wpb.TrainEvent]:
        if request.after_sequence < 0:
            raise InvalidArgumentError("after_sequence must not be negative", field="after_sequence")
        held = self._get(request.job_id)
        log.info("training_reattached", job_id=request.job_id, after_sequence=request.after_sequence)
        yield from held.follow(request.after_sequence, context.is_active)

    def CancelTraining(self, request: wpb.CancelTrainingRequest,
                       context: grpc.ServicerContext) -> wpb.CancelTrainingResponse:
        held = self._get(request.job_id)
        if held.ended is None:
            held.cancel_reason = request.reason[:500]
            held.stop.set()
            log.info("training_cancel_requested", job_id=request.job_id)
        return wpb.CancelTrainingResponse(training=held.describe())

    def _observe(self, job_id: str, model: str, events: Iterator[wpb.TrainEvent]) -> Iterator[wpb.TrainEvent]:
        """A hook over a training's events (metrics, in MeteredWorkerServicer)."""
        return events

    def _run(self, job: core.TrainJob, held: _Held, request: wpb.TrainRequest) -> None:
        model = request.registered_model_name or TYPES.get(request.model_type, "unknown")
        early: AqiModelsError | None = None
        try:
            for ev in self._observe(job.job_id, model, self._events(job, held)):
                held.add(ev)
        except AqiModelsError as exc:
            early = exc
        finally:
            held.end(early)
            if early is not None:  # no training happened: nothing to attach to later
                with self._lock:
                    self._held.pop(job.job_id, None)
            self._slots.release()

    def _events(self, job: core.TrainJob, held: _Held) -> Iterator[wpb.TrainEvent]:
        """The training as TrainEvents, its outcome last; raises only for bad input found before it started."""
        from aqimodels.training.runner import run_training

        seq = 0
        started = False
        try:
            for ev in run_training(job, held.stop, tracking_uri=self.config.tracking_uri,
                                   artifact_location=self.config.artifact_location):
                seq += 1
                started = started or isinstance(ev, core.Started)
                yield event_to_proto(ev, seq)
            log.info("training_finished", job_id=job.job_id)
            return
        except core.TrainingCancelled:
            out = wpb.TrainEvent(sequence=seq + 1, cancelled=wpb.TrainCancelled(
                reason=held.cancel_reason or "the training was cancelled"))
            log.info("training_cancelled", job_id=job.job_id)
        except AqiModelsError as exc:
            if not started:
                raise
            out = wpb.TrainEvent(sequence=seq + 1, failed=wpb.TrainFailed(reason=exc.message[:2000],
                                                                          code=exc.code.name))
        except Exception as exc:  # reported as a failed event with the reason
            log.exception("training_failed", job_id=job.job_id)
            out = wpb.TrainEvent(sequence=seq + 1, failed=wpb.TrainFailed(
                reason=f"{type(exc).__name__}: {exc}"[:2000], code="INTERNAL"))
        out.time.GetCurrentTime()
        yield out

    def GetWorkerInfo(self, request: wpb.GetWorkerInfoRequest, context: grpc.ServicerContext) -> wpb.GetWorkerInfoResponse:
        self._forget_expired()
        with self._lock:
            held = list(self._held.values())
        running = [h.job_id for h in held if h.ended is None]
        out = wpb.GetWorkerInfoResponse(worker_id=self.worker_id, model_types=list(TYPES),
                                        capacity=self.config.capacity, running=len(running),
                                        running_job_ids=running, versions=_versions(),
                                        trainings=[h.describe() for h in held])
        out.start_time.FromSeconds(int(self._start))
        return out

    def ValidateDataset(self, request: wpb.ValidateDatasetRequest,
                        context: grpc.ServicerContext) -> wpb.ValidateDatasetResponse:
        from aqimodels.training.data import load_dataset
        from aqimodels.training.features import build_features, min_hours

        window = request.window_hours or 24
        data = load_dataset(request.dataset.spec or "synthetic",
                            _ts(request.dataset.start_time if request.dataset.HasField("start_time") else None),
                            _ts(request.dataset.end_time if request.dataset.HasField("end_time") else None,
                                "dataset.end_time"), target=_target(request.dataset.target))
        need = min_hours(window)
        if data.n_hours < need:
            raise InvalidArgumentError(
                f"dataset {quote(request.dataset.spec or 'synthetic')} has {data.n_hours} hours; a {window}-hour window "
                f"and the 24-hour horizon need at least {need}", field="dataset")
        build_features(data, window=window, stride=24, target=data.target)  # every check of training, at 1/24 of the memory
        times = data.times
        out = wpb.ValidateDatasetResponse(stations=len(data.station_names), hours=data.n_hours,
                                          fingerprint=data.fingerprint())
        out.start_time.FromNanoseconds(int(times[0].astype("datetime64[ns]").astype(np.int64)))
        out.end_time.FromNanoseconds(int(times[-1].astype("datetime64[ns]").astype(np.int64)))
        return out


_VERSIONS: dict[str, str] = {}


def _versions() -> dict[str, str]:
    if not _VERSIONS:
        from importlib import metadata

        for dist in ("aqimodels", "torch", "torch-geometric", "xgboost-cpu", "mlflow", "scikit-learn", "numpy",
                     "pandas", "grpcio"):
            try:
                _VERSIONS[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    return dict(_VERSIONS)
