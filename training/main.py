"""``aqimodels worker``: the training worker process (TrainingWorker service, health, reflection)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aqimodels.api.training.v1 import worker_pb2, worker_pb2_grpc
from aqimodels.client import logs
from aqimodels.process import auth
from aqimodels.process.health import HealthServicer
from aqimodels.process.interceptors import ServerInterceptor
from aqimodels.process.metrics import Metrics, endpoint_host
from aqimodels.process.settings import (
    DEFAULT_TRACKING_URI,
    ConfigError,
    absolute_sqlite_uri,
    check_artifact_location,
    check_exposure,
    check_host,
    check_tracking_uri,
    experiment_from_env,
    metrics_port_from_env,
    parse_float,
    parse_int,
    security_from_env,
)
from aqimodels.process.shutdown import wait_for_stop_signal
from aqimodels.training.servicer import TrainingWorkerServicer, WorkerConfig

log = structlog.get_logger(__name__)
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["TrainingWorker"].full_name


def config_from_env(env: Mapping[str, str] = os.environ) -> WorkerConfig:
    """The worker's configuration; a bad value raises ConfigError naming the variable."""
    config = WorkerConfig(
        tracking_uri=check_tracking_uri(absolute_sqlite_uri(env.get("MLFLOW_TRACKING_URI", "").strip()
                                                            or DEFAULT_TRACKING_URI)),
        experiment_name=experiment_from_env(env),
        artifact_location=check_artifact_location(env.get("AQIMODELS_ARTIFACT_LOCATION", "").strip()) or None,
        capacity=parse_int(env, "AQIMODELS_WORKER_CAPACITY", 1, 1, 64),
        host=check_host(env.get("AQIMODELS_WORKER_HOST", "").strip() or "127.0.0.1", "AQIMODELS_WORKER_HOST"),
        port=parse_int(env, "AQIMODELS_WORKER_PORT", 50052, 0, 65535),
        metrics_port=metrics_port_from_env(env, "AQIMODELS_WORKER_METRICS_PORT", "AQIMODELS_WORKER_PORT", 50052),
        retain_seconds=parse_float(env, "AQIMODELS_WORKER_RETAIN_SECONDS", 1800.0, 1.0),
        registry_token=env.get("AQIMODELS_REGISTRY_TOKEN", "").strip(),
        **security_from_env(env),
    )
    check_exposure(config.host, config.tokens_file, "AQIMODELS_WORKER_HOST")
    return config


def create_worker(config: WorkerConfig, bind: str | None = None) -> tuple[grpc.Server, int, TrainingWorkerServicer]:
    """Builds and starts a worker server without blocking; returns it with its bound port.

    With ``config.metrics_port`` set, the servicer is a :class:`MeteredWorkerServicer` whose
    ``metrics.port`` is the bound Prometheus port (stopped by ``servicer.metrics.close()``).
    """
    metrics = Metrics("worker") if config.metrics_port is not None else None
    servicer = TrainingWorkerServicer(config) if metrics is None else MeteredWorkerServicer(config, metrics)
    authenticate = auth.authenticator(config.tokens_file, None, "worker", auth.WORKER_RPC_ROLES, config.registry_token)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="worker-rpc"),
                         interceptors=[ServerInterceptor(authenticate, metrics.observe_rpc if metrics else None)],
                         options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)])
    worker_pb2_grpc.add_TrainingWorkerServicer_to_server(servicer, server)
    health_servicer = HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    port = auth.bind(server, bind or f"{host}:{config.port}",
                     auth.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    if metrics is not None and config.metrics_port is not None:
        metrics.serve(config.metrics_port, endpoint_host(config.host))
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, servicer


class MeteredWorkerServicer(TrainingWorkerServicer):
    """The worker servicer with its trainings observed (progress, duration, state) for Prometheus."""

    def __init__(self, config: WorkerConfig, metrics: Metrics) -> None:
        super().__init__(config)
        self.metrics = metrics

    def _observe(self, job_id: str, model: str, events: Iterator[Any]) -> Iterator[Any]:
        return self.metrics.track_training(job_id, model, events)


def main(host: str | None = None, port: int | None = None, port_file: str | None = None) -> int:
    """Runs the worker until SIGTERM/SIGINT; running trainings are stopped (runs end KILLED).

    A broken Train stream does not stop a training: only CancelTraining or this stop does.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        config = config_from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    os.environ.pop("AQIMODELS_REGISTRY_TOKEN", None)  # read once; nothing this process starts inherits it
    if host:
        config = WorkerConfig(**{**config.__dict__, "host": host})
    if port is not None:
        config = WorkerConfig(**{**config.__dict__, "port": port})
    try:
        check_host(config.host, "--host")
        check_exposure(config.host, config.tokens_file, "--host")
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(json=(os.environ.get("AQIMODELS_LOG_FORMAT", "") == "json") or not sys.stderr.isatty())
    try:
        server, bound, servicer = create_worker(config)
    except ConfigError as exc:  # found while starting (e.g. a token file entry without a role)
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if port_file:
        Path(port_file).write_text(str(bound))
    log.info("worker_started", address=f"{config.host}:{bound}", capacity=config.capacity,
             metrics_port=servicer.metrics.port if isinstance(servicer, MeteredWorkerServicer) else None,
             tracking_uri=config.tracking_uri)
    wait_for_stop_signal()
    servicer.stop_all()
    server.stop(10).wait()
    if isinstance(servicer, MeteredWorkerServicer):
        servicer.metrics.close()
    log.info("worker_stopped")
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aqimodels-worker", description=__doc__)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--port-file", help="write the bound port here (used by a registry's local worker)")
    args = parser.parse_args(argv)
    return main(args.host, args.port, args.port_file)


if __name__ == "__main__":
    sys.exit(_cli())
