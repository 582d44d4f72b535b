"""TrainingWorker servicer: runs trainings on threads and streams their progress.

Each Train call takes one of ``capacity`` slots (RESOURCE_EXHAUSTED when none is free), runs
:func:`aqimodels.training.runner.run_training` on a thread, and streams its events. A cancelled
call sets the stop event: the trainer stops at its next check, the MLflow run ends KILLED and
nothing is registered. Data problems found before training starts are answered as
INVALID_ARGUMENT; failures after the run started arrive as a ``failed`` event.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import structlog

from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.api.training.v1 import worker_pb2_grpc
from aqimodels.client.errors import AqiModelsError, InvalidArgumentError, ResourceExhaustedError, quote
from aqimodels.training import core

log = structlog.get_logger(__name__)

TYPES = {wpb.MODEL_TYPE_XGBOOST: "xgboost", wpb.MODEL_TYPE_LSTM: "lstm", wpb.MODEL_TYPE_GNN: "gnn",
         wpb.MODEL_TYPE_ENSEMBLE: "ensemble"}


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
    registry_token: str = ""  # the token of the registry that started this worker (AQIMODELS_REGISTRY_TOKEN)


@dataclass
class _Running:
    job_id: str
    stop: threading.Event
    started: float = field(default_factory=time.time)


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
        start_time=_ts(request.dataset.start_time if request.dataset.HasField("start_time") else None),
        end_time=_ts(request.dataset.end_time if request.dataset.HasField("end_time") else None, "dataset.end_time"))


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
            metrics={k: float(v) for k, v in ev.metrics.items() if v == v}, training_seconds=ev.training_seconds))
    else:  # pragma: no cover - a new event type without a converter is a bug
        raise TypeError(f"unknown progress event {ev!r}")
    return out


class TrainingWorkerServicer(worker_pb2_grpc.TrainingWorkerServicer):
    """Trains on request, ``capacity`` trainings at a time."""

    def __init__(self, config: WorkerConfig, worker_id: str = "") -> None:
        self.config = config
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._slots = threading.BoundedSemaphore(config.capacity)
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._start = time.time()

    def stop_all(self) -> None:
        with self._lock:
            for running in self._running.values():
                running.stop.set()

    def Train(self, request: wpb.TrainRequest, context: grpc.ServicerContext) -> Iterator[wpb.TrainEvent]:
        job = job_from_proto(request, self.config.experiment_name)
        if not self._slots.acquire(blocking=False):
            with self._lock:
                busy = ", ".join(self._running)
            raise ResourceExhaustedError(f"worker {self.worker_id} is at its capacity of {self.config.capacity} "
                                         f"training(s) (running: {busy})")
        stop = threading.Event()
        if not context.add_callback(stop.set):  # False: the caller is already gone
            stop.set()
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        with self._lock:
            self._running[job.job_id] = _Running(job.job_id, stop)

        def run() -> None:
            from aqimodels.training.runner import run_training

            try:
                for ev in run_training(job, stop, tracking_uri=self.config.tracking_uri,
                                       artifact_location=self.config.artifact_location):
                    events.put(("event", ev))
                events.put(("done", None))
            except core.TrainingCancelled:
                events.put(("cancelled", None))
            except AqiModelsError as exc:
                events.put(("error", exc))
            except Exception as exc:  # noqa: BLE001 - reported as a failed event with the reason
                log.exception("training_failed", job_id=job.job_id)
                events.put(("crash", exc))
            finally:
                with self._lock:
                    self._running.pop(job.job_id, None)
                self._slots.release()

        threading.Thread(target=run, name=f"train-{job.job_id}", daemon=True).start()
        log.info("training_started", job_id=job.job_id, model_type=job.model_type, dataset=job.dataset)
        seq = 0
        started = False
        while True:
            try:
                kind, payload = events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    stop.set()
                    return
                continue
            if kind == "event":
                seq += 1
                started = started or isinstance(payload, core.Started)
                yield event_to_proto(payload, seq)
            elif kind == "done":
                log.info("training_finished", job_id=job.job_id)
                return
            elif kind == "cancelled":
                seq += 1
                ev = wpb.TrainEvent(sequence=seq, cancelled=wpb.TrainCancelled(reason="the training was cancelled"))
                ev.time.GetCurrentTime()
                log.info("training_cancelled", job_id=job.job_id)
                yield ev
                return
            else:
                exc = payload
                if kind == "error" and not started:
                    raise exc  # e.g. INVALID_ARGUMENT: bad data, found before any training
                seq += 1
                code = exc.code.name if isinstance(exc, AqiModelsError) else "INTERNAL"
                reason = exc.message if isinstance(exc, AqiModelsError) else f"{type(exc).__name__}: {exc}"
                ev = wpb.TrainEvent(sequence=seq, failed=wpb.TrainFailed(reason=reason[:2000], code=code))
                ev.time.GetCurrentTime()
                yield ev
                return

    def GetWorkerInfo(self, request: wpb.GetWorkerInfoRequest, context: grpc.ServicerContext) -> wpb.GetWorkerInfoResponse:
        with self._lock:
            running = list(self._running)
        out = wpb.GetWorkerInfoResponse(worker_id=self.worker_id, model_types=list(TYPES),
                                        capacity=self.config.capacity, running=len(running),
                                        running_job_ids=running, versions=_versions())
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
                                "dataset.end_time"))
        need = min_hours(window)
        if data.n_hours < need:
            raise InvalidArgumentError(
                f"dataset {quote(request.dataset.spec or 'synthetic')} has {data.n_hours} hours; a {window}-hour window "
                f"and the 24-hour horizon need at least {need}", field="dataset")
        build_features(data, window=window, stride=24)  # every check of training, at 1/24 of the memory
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
