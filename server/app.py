"""Builds and runs the registry server: gRPC, health, reflection, background health probe, drain."""

from __future__ import annotations

import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aqimodels.api.registry.v1 import registry_pb2, registry_pb2_grpc
from aqimodels.server import auth
from aqimodels.server.config import ServerConfig
from aqimodels.server.db import Database
from aqimodels.server.health_service import HealthServicer
from aqimodels.server.interceptors import ServerInterceptor
from aqimodels.server.metrics import Metrics, endpoint_host
from aqimodels.server.mlflow_store import MlflowModelStore
from aqimodels.server.monitoring import Monitor
from aqimodels.server.service import RegistryService
from aqimodels.server.servicer import ModelRegistryServicer

log = structlog.get_logger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class RegistryServer:
    """A started registry: the gRPC server, its port and its parts (for tests and shutdown)."""

    server: grpc.Server
    port: int
    config: ServerConfig
    service: RegistryService
    health: health.HealthServicer
    jobs: Any = None
    workers: Any = None
    monitor: Any = None
    metrics: Metrics | None = None  # metrics.port: the bound Prometheus port
    _stop_probe: threading.Event = field(default_factory=threading.Event)
    _probe: threading.Thread | None = None

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start_probe(self) -> None:
        """Probes MLflow every interval: SERVING only while the store answers."""

        def run() -> None:
            last: bool | None = None
            while not self._stop_probe.is_set():
                ok = self.service.backend_health().healthy
                if ok != last:
                    self.set_serving(ok)
                    log.info("backend_health_changed", healthy=ok)
                    if ok:
                        self.service.invalidate()
                    last = ok
                self._stop_probe.wait(self.config.health_interval_seconds)

        self._probe = threading.Thread(target=run, name="health-probe", daemon=True)
        self._probe.start()

    def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING first, in-flight RPCs finish within the grace period, then stop."""
        self._stop_probe.set()
        self.service.stop_refresher()
        self.set_serving(False)
        if self.monitor is not None:
            self.monitor.stop()
        if self.jobs is not None:
            self.jobs.shutdown()
        self.server.stop(self.config.shutdown_grace_seconds if grace is None else grace).wait()
        if self.workers is not None:
            self.workers.close()
        if self.metrics is not None:
            self.metrics.close()


def create_server(config: ServerConfig, bind: str | None = None, *, jobs_factory: Any = None,
                  clock: Any = None) -> RegistryServer:
    """Builds and starts the registry without blocking; returns it with its bound port.

    Args:
        config: the server configuration.
        bind: address to bind, e.g. ``127.0.0.1:0`` for an ephemeral port (default: config.bind).
        jobs_factory: builds the job manager from (config, service, db); None disables retraining.
        clock: the time of the retrain schedule and the retention policy (tests inject one).
    """
    db = Database(config.own_database_url)
    store = MlflowModelStore(config.tracking_uri)
    metrics = Metrics("registry") if config.metrics_port is not None else None
    if metrics is not None:
        store.observer = metrics.observe_mlflow
    store.ping()  # runs MLflow's migrations on a new database before our tables join it
    db.create_tables()
    holder: dict[str, Any] = {}
    service = RegistryService(store, db, cache_ttl_seconds=config.cache_ttl_seconds,
                              health_max_age_seconds=max(2.0, 2.5 * config.health_interval_seconds),
                              running_jobs=lambda: holder["jobs"].running_by_model() if holder.get("jobs") else {})
    jobs = workers = None
    if jobs_factory is not None:
        jobs, workers = jobs_factory(config, service, db)
        if metrics is not None:
            jobs.add_event_hook(metrics.on_retrain_event)
        holder["jobs"] = jobs
    monitor = Monitor(config, service, db, jobs, clock=clock)
    def audit_denial(actor: str, role: str, rpc: str, message: str) -> None:
        from aqimodels.server.interceptors import current_request_id

        db.audit_record(actor=actor, role=role, action=rpc, model_name="", version=0, before={}, after={},
                        outcome="denied", request_id=current_request_id(), message=message)

    def audit_rejection(caller: Any, rpc: str, message: str) -> None:
        """A change refused at the edge (its bytes are not the request) is on the audit trail."""
        if rpc not in auth.MUTATING_RPCS:
            return
        from aqimodels.server.interceptors import current_request_id

        db.audit_record(actor=getattr(caller, "name", "anonymous"), role=getattr(caller, "role", ""), action=rpc,
                        model_name="", version=0, before={}, after={}, outcome="rejected",
                        request_id=current_request_id(), message=message)

    authenticate = auth.authenticator(config.tokens_file, audit_denial, "registry")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        interceptors=[ServerInterceptor(authenticate, metrics.observe_rpc if metrics is not None else None,
                                        audit_rejection)],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
    )
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(ModelRegistryServicer(service, jobs, workers, monitor),
                                                          server)
    health_servicer = HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = auth.bind(server, bind or config.bind,
                     auth.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    if metrics is not None and config.metrics_port is not None:
        metrics.serve(config.metrics_port, endpoint_host(config.host))
    server.start()
    rs = RegistryServer(server, port, config, service, health_servicer, jobs, workers, monitor, metrics)
    rs.set_serving(service.backend_health().healthy)
    rs.start_probe()
    service.start_refresher()
    if jobs is not None:
        jobs.start()
    monitor.start()
    return rs


def serve(config: ServerConfig, jobs_factory: Any = None) -> int:
    """Runs until SIGTERM or SIGINT, then drains and exits 0."""
    started = time.perf_counter()
    rs = create_server(config, jobs_factory=jobs_factory)
    log.info("registry_started", address=f"{config.host}:{rs.port}", tracking_uri=rs.service.store.tracking_uri,
             startup_ms=round((time.perf_counter() - started) * 1000),
             metrics_port=rs.metrics.port if rs.metrics is not None else None)
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    rs.stop()
    log.info("registry_stopped")
    return 0
