"""The registry's view of its training workers: targets, health, capacity, and dispatch slots.

``local`` in the target list starts a worker subprocess (``python -m aqimodels.training.main``)
on an ephemeral port sharing the registry's MLflow store, so ``make run`` is a complete system;
a supervisor thread starts it again whenever it exits (backoff 0.5 s doubling to 30 s, logged as
``local_worker_exited``, counted in the worker's ``restarts`` in ``status``).
A probe thread asks every worker for ``GetWorkerInfo`` every few seconds; only healthy workers
with a free slot (registry-side count below the capacity they report) receive jobs.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2, worker_pb2_grpc
from aqimodels.client.errors import error_from_rpc
from aqimodels.server.config import LOCAL_WORKER, ServerConfig

log = structlog.get_logger(__name__)


@dataclass
class WorkerHandle:
    target: str
    channel: grpc.Channel | None = None
    stub: worker_pb2_grpc.TrainingWorkerStub | None = None
    capacity: int = 1
    running: int = 0
    healthy: bool = False
    message: str = "not probed yet"
    process: subprocess.Popen[bytes] | None = None
    info: worker_pb2.GetWorkerInfoResponse | None = None
    job_ids: set[str] = field(default_factory=set)
    dns_name: str = ""
    generation: int = 0  # the local worker: which process this is (1, 2, ... after each restart)
    restarts: int = 0
    exits: dict[int, str] = field(default_factory=dict)  # generation -> why that process is gone

    def connect(self, target: str, creds: grpc.ChannelCredentials | None = None) -> None:
        if self.channel is not None:
            self.channel.close()
        self.target = target
        options = [("grpc.max_receive_message_length", 16 << 20)]
        self.channel = (grpc.secure_channel(target, creds, options=options) if creds is not None
                        else grpc.insecure_channel(target, options=options))
        self.stub = worker_pb2_grpc.TrainingWorkerStub(self.channel)

    def connected(self) -> worker_pb2_grpc.TrainingWorkerStub:
        """The stub of a worker that jobs are dispatched to (only connected handles are)."""
        if self.stub is None:
            raise RuntimeError(f"worker {self.target} was dispatched to before it was connected")
        return self.stub


class WorkerPool:
    """Dispatch slots over the configured workers."""

    def __init__(self, config: ServerConfig, *, probe_interval: float = 2.0,
                 resolver: Resolver | None = None) -> None:
        self.config = config
        self._resolver = resolver or resolve_dns
        self._dns_names = [t for t in config.workers if t.startswith("dns:///")]
        self.probe_interval = probe_interval
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.workers: list[WorkerHandle] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="aqimodels-worker-")
        # The registry authenticates to its workers with its own token, over TLS when configured.
        self._creds = _worker_credentials(config)
        # A local worker it starts trusts this token too (AQIMODELS_REGISTRY_TOKEN, below): without a
        # configured one, a fresh per-process token, so a token file shared with it locks nothing out.
        self._local_token = config.worker_token or secrets.token_urlsafe(32)
        self._token_md: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {self._local_token}"),)
        for target in config.workers:
            if target.startswith("dns:///"):
                continue  # expanded into one handle per address by refresh_dns()
            handle = WorkerHandle(target=target)
            if target != LOCAL_WORKER:
                handle.connect(target, self._creds)
            self.workers.append(handle)
        self._probe_thread: threading.Thread | None = None
        self._adhoc: dict[str, WorkerHandle] = {}

    @property
    def configured(self) -> bool:
        return bool(self.workers) or bool(self._dns_names)

    def refresh_dns(self) -> None:
        """Re-resolves each ``dns:///host:port`` target: new addresses join, vanished idle ones leave."""
        for name in self._dns_names:
            host, _, port = name[len("dns:///"):].rpartition(":")
            try:
                targets = set(self._resolver(host, int(port)))
            except (OSError, ValueError) as exc:
                log.warning("worker_dns_failed", name=name, error=str(exc))
                continue
            with self._cond:
                known = {w.target: w for w in self.workers if w.dns_name == name}
                for target in sorted(targets - set(known)):
                    handle = WorkerHandle(target=target, dns_name=name)
                    handle.connect(target, self._creds)
                    self.workers.append(handle)
                    log.info("worker_discovered", name=name, worker=target)
                for target, handle in known.items():
                    if target not in targets and handle.running == 0:
                        self.workers.remove(handle)
                        if handle.channel is not None:
                            handle.channel.close()
                        log.info("worker_gone", name=name, worker=target)
                self._cond.notify_all()

    def start(self) -> None:
        self.refresh_dns()
        for i, handle in enumerate(self.workers):
            if handle.target == LOCAL_WORKER:
                threading.Thread(target=self._supervise_local, args=(handle, i), daemon=True,
                                 name="local-worker-supervisor").start()
        self._probe_thread = threading.Thread(target=self._probe_loop, daemon=True, name="worker-probe")
        self._probe_thread.start()

    def _supervise_local(self, handle: WorkerHandle, index: int) -> None:
        """Starts the local worker and starts it again whenever it exits, with a growing backoff."""
        failures = 0
        while not self._stop.is_set():
            began = time.monotonic()
            if self._start_local(handle, index):
                assert handle.process is not None
                while handle.process.poll() is None and not self._stop.wait(0.2):
                    pass
            if self._stop.is_set():
                return
            code = handle.process.returncode if handle.process is not None else None
            reason = f"the local worker (pid {handle.process.pid if handle.process else '?'}) exited with code {code}"
            with self._cond:
                handle.exits[handle.generation] = reason
                handle.healthy = False
                self._cond.notify_all()
            failures = 0 if time.monotonic() - began > RESTART_RESET_SECONDS else failures + 1
            delay = min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2 ** max(0, failures - 1))
            handle.restarts += 1
            handle.message = f"{reason}; restarting in {delay:.1f} s (restart {handle.restarts})"
            log.error("local_worker_exited", code=code, restart_in_s=delay, restarts=handle.restarts)
            if self._stop.wait(delay):
                return

    def _start_local(self, handle: WorkerHandle, index: int) -> bool:
        """Spawns one local worker process and connects to it; False when it did not come up."""
        port_file = Path(self._tmp.name) / f"worker-{index}.port"
        port_file.unlink(missing_ok=True)
        handle.message = "starting local worker"
        handle.process = spawn_local_worker(self.config, port_file, self._local_token)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not self._stop.is_set():
            if handle.process.poll() is not None:
                log.error("local_worker_failed", code=handle.process.returncode)
                return False
            if port_file.exists() and port_file.read_text().strip():
                port = int(port_file.read_text().strip())
                with self._cond:
                    handle.connect(f"127.0.0.1:{port}")
                    handle.generation += 1
                log.info("local_worker_started", target=handle.target, pid=handle.process.pid,
                         generation=handle.generation)
                self.probe_once()
                return True
            time.sleep(0.1)
        if handle.process.poll() is None:
            handle.process.kill()
            handle.process.wait(10)
        return False

    def exit_reason(self, handle: WorkerHandle, generation: int) -> str:
        """Why the local worker process of ``generation`` is gone ("" while it runs, or for remote workers)."""
        with self._cond:
            return handle.exits.get(generation, "")

    def handle_for(self, target: str) -> WorkerHandle:
        """The pool's handle of ``target``, or a new connection to it (a job taken over from another
        replica may run on a worker this one is not configured with)."""
        with self._cond:
            for known in self.workers:
                if known.target == target:
                    return known
            handle = self._adhoc.get(target)
            if handle is None:
                handle = self._adhoc[target] = WorkerHandle(target=target, healthy=True, message="")
                handle.connect(target, self._creds)
            return handle

    def claim(self, handle: WorkerHandle, job_id: str) -> None:
        """Counts a job taken over on ``handle`` as one of its running trainings."""
        with self._cond:
            handle.running += 1
            handle.job_ids.add(job_id)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_interval):
            self.refresh_dns()
            self.probe_once()

    def probe_once(self) -> None:
        for handle in list(self.workers):
            if handle.stub is None:
                continue
            try:
                info = handle.stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=3,
                                                 metadata=self.metadata())
            except grpc.RpcError as exc:
                self._set_health(handle, False, f"{exc.code().name}: {exc.details()}")
                continue
            handle.info = info
            handle.capacity = max(1, info.capacity)
            self._set_health(handle, True, "")

    def _set_health(self, handle: WorkerHandle, healthy: bool, message: str) -> None:
        with self._cond:
            if handle.healthy != healthy:
                log.info("worker_health_changed", worker=handle.target, healthy=healthy, message=message)
            handle.healthy = healthy
            handle.message = message
            self._cond.notify_all()

    def mark_unhealthy(self, handle: WorkerHandle, message: str) -> None:
        self._set_health(handle, False, message)

    def acquire(self, job_id: str, timeout: float) -> WorkerHandle | None:
        """A healthy worker with a free slot (least loaded first), or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                free = [w for w in self.workers if w.healthy and w.stub is not None and w.running < w.capacity]
                if free:
                    handle = min(free, key=lambda w: w.running / w.capacity)
                    handle.running += 1
                    handle.job_ids.add(job_id)
                    return handle
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def release(self, handle: WorkerHandle, job_id: str) -> None:
        with self._cond:
            handle.running = max(0, handle.running - 1)
            handle.job_ids.discard(job_id)
            self._cond.notify_all()

    def waiting_reason(self) -> str:
        if not self.workers and self._dns_names:
            return f"no training worker found behind {', '.join(self._dns_names)} yet"
        if not self.workers:
            return ("no training worker is configured (AQIMODELS_WORKERS=none); the job waits until the "
                    "registry is started with workers")
        if not any(w.healthy for w in self.workers):
            return "no training worker is available yet: " + "; ".join(
                f"{w.target}: {w.message}" for w in self.workers)
        return "all training workers are busy"

    def validate(self, dataset: worker_pb2.DatasetSpec, window_hours: int) -> worker_pb2.ValidateDatasetResponse | None:
        """Asks a healthy worker to validate a dataset; None when no worker is available to ask."""
        for handle, stub in [(w, w.stub) for w in self.workers if w.healthy and w.stub is not None]:
            try:
                return stub.ValidateDataset(
                    worker_pb2.ValidateDatasetRequest(dataset=dataset, window_hours=window_hours), timeout=300,
                    metadata=self.metadata())
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.mark_unhealthy(handle, f"{exc.code().name}: {exc.details()}")
                    continue
                raise error_from_rpc(exc) from None
        return None

    def metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        """Call metadata for a worker: the registry's token, plus ``extra``."""
        return (*self._token_md, *extra)

    def status(self) -> list[pb.WorkerStatus]:
        with self._cond:
            return [pb.WorkerStatus(target=w.target, healthy=w.healthy, capacity=w.capacity, running=w.running,
                                    message=w.message, restarts=w.restarts) for w in self.workers]

    def close(self) -> None:
        self._stop.set()
        for handle in [*self.workers, *self._adhoc.values()]:
            if handle.channel is not None:
                handle.channel.close()
            if handle.process is not None and handle.process.poll() is None:
                handle.process.terminate()
                try:
                    handle.process.wait(15)
                except subprocess.TimeoutExpired:
                    handle.process.kill()
        self._tmp.cleanup()


RESTART_FIRST_SECONDS = 0.5  # backoff of the local worker's restarts: 0.5, 1, 2, ... 30 s
RESTART_MAX_SECONDS = 30.0
RESTART_RESET_SECONDS = 60.0  # a worker that ran this long starts the backoff again from the first step


def spawn_local_worker(config: ServerConfig, port_file: Path, token: str) -> subprocess.Popen[bytes]:
    """Starts the local worker process on an ephemeral port, sharing the registry's MLflow store.

    The one place that builds its command and environment (the supervisor calls it at every start).
    ``token`` is the per-process credential the worker trusts as this registry's (operator role),
    so a token file shared with the registry never locks its own worker out.
    """
    env = dict(os.environ)
    env.update({"MLFLOW_TRACKING_URI": config.tracking_uri,
                "MLFLOW_EXPERIMENT_NAME": config.experiment_name,
                "MLFLOW_DISABLE_TELEMETRY": env.get("MLFLOW_DISABLE_TELEMETRY", "true")})
    if config.artifact_location:
        env["AQIMODELS_ARTIFACT_LOCATION"] = config.artifact_location
    env["AQIMODELS_REGISTRY_TOKEN"] = token
    cmd = [sys.executable, "-m", "aqimodels.training.main", "--host", "127.0.0.1", "--port", "0",
           "--port-file", str(port_file)]
    return subprocess.Popen(cmd, env=env)


Resolver = Callable[[str, int], list[str]]


def resolve_dns(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, as ``ip:port`` targets (a headless Service's pods)."""
    out = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(sockaddr[0])
        out.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(set(out))


def _worker_credentials(config: ServerConfig) -> grpc.ChannelCredentials | None:
    if not (config.worker_ca_cert or config.worker_client_cert):
        return None

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(config.worker_ca_cert), read(config.worker_client_key),
                                        read(config.worker_client_cert))
