"""Builds and runs the registry server: gRPC, health, reflection, background health probe, drain."""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aqimodels.api.registry.v1 import registry_pb2, registry_pb2_grpc
from aqimodels.client.errors import BackendUnavailableError
from aqimodels.process.shutdown import wait_for_stop_signal
from aqimodels.process import deadlines
from aqimodels.process.auth import bind as bind_port
from aqimodels.process.auth import server_credentials
from aqimodels.server import auth
from aqimodels.server.approvals import Approvals
from aqimodels.server.config import ServerConfig
from aqimodels.server.db import Database
from aqimodels.server.events import EventLog
from aqimodels.process.health import HealthServicer
from aqimodels.process.interceptors import ServerInterceptor
from aqimodels.process.metrics import Metrics, endpoint_host
from aqimodels.server.mlflow_store import MlflowModelStore
from aqimodels.server.monitoring import Monitor
from aqimodels.server.service import RegistryService
from aqimodels.server.servicer import ModelRegistryServicer
from aqimodels.server.webhook_delivery import DeliverySettings, WebhookDispatcher
from aqimodels.server.webhooks import WebhookService, WebhookStore

if TYPE_CHECKING:
    from aqimodels.client.domain import Caller
    from aqimodels.server.automation import Clock
    from aqimodels.server.jobs import JobManager
    from aqimodels.server.workers import WorkerPool

# Builds the job manager and its worker pool (``jobs.jobs_factory``); kept out of the import of this
# module, which ``aqimodels serve`` pays for before it knows whether retraining is on.
JobsFactory = Callable[[ServerConfig, RegistryService, Database], "tuple[JobManager, WorkerPool]"]

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
    jobs: JobManager | None = None
    workers: WorkerPool | None = None
    monitor: Monitor | None = None
    events: EventLog | None = None
    metrics: Metrics | None = None  # metrics.port: the bound Prometheus port
    webhooks: WebhookDispatcher | None = None  # background delivery
    _stop_probe: threading.Event = field(default_factory=threading.Event)
    _probe: threading.Thread | None = None
    _backend_ok: bool = False
    _health_lock: threading.Lock = field(default_factory=threading.Lock)

    def set_serving(self, serving: bool) -> None:
        """Liveness ("") follows the store; readiness (the registry's own service name, what a
        k8s readiness probe asks) also waits for a warm read model, so that a replica takes no
        traffic it would answer from a cold start (seconds at 4 x 10,000 versions)."""
        with self._health_lock:
            self._backend_ok = serving
            self._publish()

    def _publish(self) -> None:
        up, down = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", up if self._backend_ok else down)
        self.health.set(SERVICE_NAME, up if self._backend_ok and self.service.warm else down)

    def on_warm_change(self, _warm: bool) -> None:
        with self._health_lock:
            self._publish()

    def start_probe(self) -> None:
        """Probes MLflow every interval: SERVING only while the store answers."""

        def run() -> None:
            last: bool | None = None
            while not self._stop_probe.is_set():
                with deadlines.within(self.config.health_timeout):  # a frozen store answers no within it
                    ok = self.service.backend_health().healthy
                if ok != last:
                    self.set_serving(ok)
                    log.info("backend_health_changed", healthy=ok)
                    if ok and last is False:  # back after an outage (not the first probe: nothing is stale)
                        self.service.invalidate()
                    last = ok
                self._stop_probe.wait(self.config.health_interval_seconds)

        self._probe = threading.Thread(target=run, name="health-probe", daemon=True)
        self._probe.start()

    def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING first, in-flight RPCs finish within the grace period, then stop."""
        self._stop_probe.set()
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        self.service.changes.drain(grace)  # no new change starts; lock waiters give up within the grace
        self.service.stop_refresher()
        self.set_serving(False)
        if self.monitor is not None:
            self.monitor.stop()
        if self.webhooks is not None:
            self.webhooks.stop()  # before the event log its threads read
        if self.events is not None:
            self.events.stop()
        if self.jobs is not None:
            self.jobs.shutdown()
        self.server.stop(grace).wait()
        self.service.changes.stop()
        self.service.approvals.stop()
        if self.workers is not None:
            self.workers.close()
        if self.metrics is not None:
            self.metrics.close()


def _wait_for_databases(config: ServerConfig, store: MlflowModelStore, db: Database) -> None:
    """Start-up: MLflow's store (its migrations on a new database first), then our tables.

    (A tracking server over REST that does not answer yet is not waited for: the registry
    starts NOT_SERVING and turns SERVING when it answers, as before.)

    A database frozen or unreachable at start is tried again, every attempt bounded by the
    connect timeout, for ``db_start_timeout_seconds`` (a database that starts a little after
    the registry is met); after that the start fails with BackendUnavailableError, which
    ``aqimodels serve`` reports in one line and exits 1 on, for the orchestrator to restart it
    and show why. Never a silent hang, and never a registry that serves without its tables.
    """
    sql_store = not config.tracking_uri.startswith(("http://", "https://"))  # REST: only our tables are needed
    end = time.monotonic() + config.db_start_timeout_seconds
    attempt = 0
    while True:
        attempt += 1
        health = store.ping()  # runs MLflow's migrations on a new database before our tables join it
        problem = "" if health.healthy or not sql_store else health.message
        if not problem:
            try:
                db.create_tables()
                return
            except BackendUnavailableError as exc:
                problem = exc.message
        left = end - time.monotonic()
        if left <= 0:
            raise BackendUnavailableError(
                f"the database did not answer within {config.db_start_timeout_seconds:g} s of start "
                f"({attempt} attempts): {problem.splitlines()[0] if problem else 'no answer'}")
        log.warning("database_unavailable_at_start", attempt=attempt, retry_within_s=round(left, 1),
                    error=(problem.splitlines()[0] if problem else "")[:300])
        time.sleep(min(1.0, left))


def create_server(config: ServerConfig, bind: str | None = None, *, jobs_factory: JobsFactory | None = None,
                  clock: Clock | None = None) -> RegistryServer:
    """Builds and starts the registry without blocking; returns it with its bound port.

    Args:
        config: the server configuration.
        bind: address to bind, e.g. ``127.0.0.1:0`` for an ephemeral port (default: config.bind).
        jobs_factory: builds the job manager from (config, service, db); None disables retraining.
        clock: the time of the retrain schedule and the retention policy (tests inject one).
    """
    db = Database(config.own_database_url, config.db_timeouts, pool_size=config.db_pool_size)
    rest = config.tracking_uri.startswith(("http://", "https://"))
    store = MlflowModelStore(config.tracking_uri, timeouts=config.db_timeouts,
                             http_timeout_seconds=config.mlflow_http_timeout_seconds if rest else None,
                             http_max_retries=config.mlflow_http_max_retries if rest else None)
    metrics = Metrics("registry") if config.metrics_port is not None else None
    if metrics is not None:
        store.observer = metrics.observe_mlflow
    _wait_for_databases(config, store, db)
    jobs: JobManager | None = None  # set below; the service asks it for running jobs only once serving
    workers: WorkerPool | None = None
    service = RegistryService(store, db, cache_ttl_seconds=config.cache_ttl_seconds,
                              health_max_age_seconds=max(2.0, 2.5 * config.health_interval_seconds),
                              reconcile_after_seconds=config.reconcile_after_seconds, fault_point=config.fault_point,
                              approvals=Approvals(db, config.approval_models, config.approval_expiry_seconds),
                              running_jobs=lambda: jobs.running_by_model() if jobs is not None else {})
    service.changes.reconcile_at_start()  # half-done promotions are settled before anything is served
    if jobs_factory is not None:
        jobs, workers = jobs_factory(config, service, db)
        if metrics is not None:
            jobs.add_event_hook(metrics.on_retrain_event)
    monitor = Monitor(config, service, db, jobs, clock=clock)
    events = EventLog(db, poll_seconds=min(0.5, config.monitor_poll_seconds))
    webhook_service, dispatcher = _webhooks(config, db, events)
    if metrics is not None:
        metrics.watch_models(lambda: _model_health(service), monitor.alert_counts)
    def audit_denial(actor: str, role: str, rpc: str, message: str) -> None:
        from aqimodels.process.interceptors import current_request_id

        db.audit_record(actor=actor, role=role, action=rpc, model_name="", version=0, before={}, after={},
                        outcome="denied", request_id=current_request_id(), message=message)

    def audit_rejection(caller: Caller | None, rpc: str, message: str) -> None:
        """A change refused at the edge (its bytes are not the request) is on the audit trail."""
        if rpc not in auth.MUTATING_RPCS:
            return
        from aqimodels.process.interceptors import current_request_id

        db.audit_record(actor=caller.name if caller else "anonymous", role=caller.role if caller else "", action=rpc,
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
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(
        ModelRegistryServicer(service, jobs, workers, monitor, events, webhook_service), server)
    health_servicer = HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = bind_port(server, bind or config.bind,
                     server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    if metrics is not None and config.metrics_port is not None:
        metrics.serve(config.metrics_port, endpoint_host(config.host))
    server.start()
    rs = RegistryServer(server, port, config, service, health_servicer, jobs, workers, monitor, events, metrics,
                        webhooks=dispatcher)
    service.on_warm_change(rs.on_warm_change)
    rs.set_serving(service.backend_health().healthy)
    rs.start_probe()
    service.start_refresher()
    service.changes.start()  # half-done changes of processes gone, in the background
    service.approvals.start()  # promotion requests past their expiry, in the background
    if jobs is not None:
        jobs.start()
    monitor.start()
    events.start()
    dispatcher.start()
    return rs


def _webhooks(config: ServerConfig, db: Database, events: EventLog) -> tuple[WebhookService, WebhookDispatcher]:
    """The webhook RPCs' service and this process's delivery threads, over the event log."""
    dispatcher = WebhookDispatcher(WebhookStore(db), events, DeliverySettings.of(config))
    return WebhookService(db, events, dispatcher.sender.send_now), dispatcher


def _model_health(service: RegistryService) -> list[tuple[str, str, int]]:
    """(model, health, production version) of every model, from the read model (no MLflow call)."""
    page, _ = service.status()  # every model: size 0 is one page of all
    out = []
    for v in page.items:
        production = v.snapshot.alias("production")
        health = "degraded" if v.degraded else "healthy" if production is not None else "no_production"
        out.append((v.snapshot.model.name, health, production.version if production is not None else 0))
    return out


def serve(config: ServerConfig, jobs_factory: JobsFactory | None = None) -> int:
    """Runs until SIGTERM or SIGINT, then drains and exits 0."""
    started = time.perf_counter()
    rs = create_server(config, jobs_factory=jobs_factory)
    log.info("registry_started", address=f"{config.host}:{rs.port}", tracking_uri=rs.service.store.tracking_uri,
             startup_ms=round((time.perf_counter() - started) * 1000),
             metrics_port=rs.metrics.port if rs.metrics is not None else None)
    wait_for_stop_signal()
    rs.stop()
    log.info("registry_stopped")
    # Everything is drained and closed: skip the interpreter's teardown of its modules (0.5-0.8 s
    # with MLflow loaded, measured), which would push the exit past the grace period.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
