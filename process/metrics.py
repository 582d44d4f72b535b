"""Prometheus metrics of the registry and the training worker, on one HTTP endpoint per process.

Every metric lives in a :class:`Metrics` object with its own ``CollectorRegistry`` (never the
global default), so several servers in one test process do not clash. The objects only receive
observations; the processes wire them in: the gRPC interceptor's ``observe`` hook (RPC counts and
latencies), the MLflow adapter's observer (MLflow call latency), the job manager's event hook
(jobs by state, progress, training duration) on the registry, and the Train stream on the worker.
No MLflow import here.

Scrape with ``curl http://127.0.0.1:$AQIMODELS_METRICS_PORT/metrics``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aqimodels.api.registry.v1 import registry_pb2 as pb

log = structlog.get_logger(__name__)

# RPCs range from sub-millisecond reads to hour-long retrain streams.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
               1800.0, 7200.0)
MLFLOW_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRAINING_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0)
# The conventional endpoint ports of the deployment (deploy/): AQIMODELS_METRICS_PORT and
# AQIMODELS_WORKER_METRICS_PORT are unset (off) by default; these are what the manifests set.
REGISTRY_METRICS_PORT = 9464
WORKER_METRICS_PORT = 9465
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "interrupted"})


def state_name(state: int) -> str:
    """``JOB_STATE_SUCCEEDED`` -> ``succeeded``."""
    try:
        return str(pb.JobState.Name(pb.JobState.ValueType(state))).removeprefix("JOB_STATE_").lower()
    except ValueError:
        return "unspecified"


class Metrics:
    """The metrics of one process (``registry`` or ``worker``) and, once served, its HTTP endpoint.

    Attributes:
        registry: the process's own collector registry.
        port: the bound port of the endpoint once :meth:`serve` ran (0 before).
    """

    def __init__(self, process: str) -> None:
        self.process = process
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.rpc_requests = Counter("aqimodels_rpc_requests", "gRPC calls handled, by method and status code.",
                                    ("method", "code"), registry=r)
        self.rpc_seconds = Histogram("aqimodels_rpc_duration_seconds",
                                     "gRPC call latency (whole stream for server-streaming calls).",
                                     ("method", "code"), buckets=RPC_BUCKETS, registry=r)
        self.mlflow_seconds = Histogram("aqimodels_mlflow_call_duration_seconds",
                                        "Latency of calls to the MLflow tracking store and model registry.",
                                        ("operation",), buckets=MLFLOW_BUCKETS, registry=r)
        self.jobs = Gauge("aqimodels_jobs", "Retrain jobs (registry) or trainings (worker) this process has "
                          "handled since it started, by current state.", ("state",), registry=r)
        self.training_seconds = Histogram("aqimodels_training_duration_seconds",
                                          "Wall time of trainings that ended, from dispatch to end.",
                                          ("model", "state"), buckets=TRAINING_BUCKETS, registry=r)
        self.job_epoch = Gauge("aqimodels_job_epoch", "Current epoch (or boosting round) of a running job.",
                               ("job_id", "model"), registry=r)
        self.job_progress = Gauge("aqimodels_job_progress_ratio",
                                  "Progress of a running job, epoch / total epochs (0..1).", ("job_id", "model"),
                                  registry=r)
        for state in JOB_STATES:
            self.jobs.labels(state).set(0)
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---- observations ----

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """The interceptor's ``observe`` hook."""
        self.rpc_requests.labels(method, code).inc()
        self.rpc_seconds.labels(method, code).observe(seconds)

    def observe_mlflow(self, operation: str, seconds: float) -> None:
        """The MLflow adapter's observer."""
        self.mlflow_seconds.labels(operation).observe(seconds)

    def job_state(self, job_id: str, state: str) -> None:
        """Moves a job from its previous state's count to ``state``'s."""
        with self._lock:
            before = self._states.get(job_id)
            if before == state:
                return
            if before is not None:
                self.jobs.labels(before).dec()
            self._states[job_id] = state
            self.jobs.labels(state).inc()

    def job_epoch_done(self, job_id: str, model: str, epoch: int, total: int) -> None:
        self.job_epoch.labels(job_id, model).set(epoch)
        if total > 0:
            self.job_progress.labels(job_id, model).set(min(1.0, epoch / total))

    def job_ended(self, job_id: str, model: str, state: str, seconds: float | None) -> None:
        """Ends a job: its progress series go away, its duration is observed (when it ran at all)."""
        self.job_state(job_id, state)
        for gauge in (self.job_epoch, self.job_progress):
            try:
                gauge.remove(job_id, model)
            except KeyError:
                pass
        if seconds is not None and seconds >= 0:
            self.training_seconds.labels(model, state).observe(seconds)

    def on_retrain_event(self, job: pb.RetrainJob, event: pb.RetrainEvent) -> None:
        """The registry job manager's event hook (called for every event of every job)."""
        state = state_name(event.state)
        if state in _TERMINAL:
            seconds = None
            if job.HasField("start_time"):
                end = job.end_time.ToMilliseconds() if job.HasField("end_time") else int(time.time() * 1000)
                seconds = (end - job.start_time.ToMilliseconds()) / 1000
            self.job_ended(job.job_id, job.model_name, state, seconds)
            return
        self.job_state(job.job_id, state)
        if event.WhichOneof("event") == "progress" and event.progress.WhichOneof("event") == "epoch":
            epoch = event.progress.epoch
            self.job_epoch_done(job.job_id, job.model_name, epoch.epoch, epoch.total_epochs)

    def track_training(self, job_id: str, model: str, events: Iterator[Any]) -> Iterator[Any]:
        """Passes a worker's ``TrainEvent`` stream through, observing progress and the end."""
        start = time.monotonic()
        state = "failed"
        seen = False  # a call refused before its first event (busy, bad data) is no training
        try:
            for ev in events:
                if not seen:
                    seen = True
                    self.job_state(job_id, "running")
                kind = ev.WhichOneof("event")
                if kind == "epoch":
                    self.job_epoch_done(job_id, model, ev.epoch.epoch, ev.epoch.total_epochs)
                elif kind == "finished":
                    state = "succeeded"
                elif kind == "cancelled":
                    state = "cancelled"
                yield ev
        except GeneratorExit:
            state = "cancelled"
            raise
        finally:
            if seen:
                self.job_ended(job_id, model, state, time.monotonic() - start)

    def watch_models(self, health: Callable[[], Iterable[tuple[str, str, int]]],
                     alerts: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Exports each model's health and production version, and alerts raised, read at scrape time.

        Args:
            health: (model, health name, production version) of every model.
            alerts: (model, health name, count) of the alerts raised so far.
        """
        self.registry.register(_ModelCollector(health, alerts))

    # ---- the endpoint ----

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the HTTP endpoint (``/metrics``) on ``host:port`` (0: ephemeral); returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        log.info("metrics_endpoint_started", process=self.process, address=f"{host}:{self.port}")
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _ModelCollector(Collector):
    """Model health, production versions and alert counts, from the registry's own state at scrape time."""

    def __init__(self, health: Callable[[], Iterable[tuple[str, str, int]]],
                 alerts: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._health = health
        self._alerts = alerts

    def collect(self) -> Iterator[Any]:
        status = GaugeMetricFamily("aqimodels_model_health", "1 for each model's current health (healthy, "
                                   "no_production, degraded).", labels=["model", "health"])
        production = GaugeMetricFamily("aqimodels_model_production_version",
                                       "The version the production alias points to (0: none).", labels=["model"])
        alerts = CounterMetricFamily("aqimodels_alerts", "Degradation and recovery alerts raised, by model and "
                                     "the health they moved to.", labels=["model", "health"])
        try:
            for model, health, version in self._health():
                for name in ("healthy", "no_production", "degraded"):
                    status.add_metric([model, name], 1.0 if name == health else 0.0)
                production.add_metric([model], float(version))
            for model, health, count in self._alerts():
                alerts.add_metric([model, health], float(count))
        except Exception:
            log.warning("model_metrics_unavailable", exc_info=True)
        yield from (status, production, alerts)


def endpoint_host(listen_host: str) -> str:
    """Where the endpoint listens: loopback while gRPC does, else the gRPC listen address."""
    from aqimodels.process.settings import is_loopback

    return "127.0.0.1" if is_loopback(listen_host) else listen_host.strip("[]")
