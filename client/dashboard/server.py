"""Runs the dashboard on uvicorn: ``aqimodels dashboard`` in the foreground, or in a thread for tests."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
from dataclasses import dataclass
from typing import cast

import structlog
import uvicorn
from aqimodels.client import logs
from aqimodels.client.dashboard.app import create_app
from aqimodels.client.addresses import is_loopback
from aqimodels.client.dashboard.config import DashboardConfig, DashboardConfigError
from aqimodels.client.dashboard.registry import AsyncRegistry
from aqimodels.client.errors import AqiModelsError, UnauthenticatedError
from starlette.applications import Starlette

log = structlog.get_logger(__name__)


async def check_registry_exposure(config: DashboardConfig, wait_seconds: float = 30.0) -> None:
    """Off loopback, the registry must want tokens (else every visitor would act as its admin)."""
    if is_loopback(config.host):
        return
    registry = AsyncRegistry(config.target, timeout=5, ca_cert=config.ca_cert, client_cert=config.client_cert,
                             client_key=config.client_key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    try:
        while True:
            try:
                await registry.identify(None)
            except UnauthenticatedError:
                return
            except AqiModelsError as exc:
                if loop.time() > deadline:
                    raise DashboardConfigError(
                        f"AQIMODELS_DASHBOARD_HOST={config.host}: cannot check that the registry at "
                        f"{config.target} requires tokens ({exc.code.name}: {exc.message}); refusing to listen "
                        "beyond loopback") from None
                await asyncio.sleep(1.0)
                continue
            raise DashboardConfigError(
                f"AQIMODELS_DASHBOARD_HOST={config.host} listens beyond loopback but the registry at "
                f"{config.target} accepts callers without a token (no AQIMODELS_TOKENS_FILE): every visitor "
                "would act as its admin. Give the registry a token file")
    finally:
        await registry.close()


def bind(config: DashboardConfig) -> socket.socket:
    """The listening socket (port 0: an ephemeral port, reported by the ``dashboard_started`` line)."""
    family = socket.AF_INET6 if ":" in config.host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host.strip("[]"), config.port))
    except OSError as exc:
        sock.close()
        raise DashboardConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(config: DashboardConfig, sock: socket.socket) -> str:
    host = config.host if ":" not in config.host else f"[{config.host.strip('[]')}]"
    return f"{'https' if config.tls else 'http'}://{host}:{sock.getsockname()[1]}/"


def _uvicorn(config: DashboardConfig, **extra: object) -> uvicorn.Server:
    app = create_app(config)
    ssl = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key} if config.tls else {}
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                         timeout_graceful_shutdown=3, **ssl, **extra))  # type: ignore[arg-type]  # uvicorn.Config's keywords, passed through


def settle_heap(server: uvicorn.Server) -> None:
    """Compiles every template, then freezes what the process holds out of the cyclic collector's sight.

    Everything imported and built at start lives as long as the process; left in the collector's view,
    every full collection walks it (about 50,000 objects: a 26-85 ms pause of the event loop, measured
    with 50 SSE clients on one job, stalling every live stream at once). Reference counting still frees
    them; only cycles among them would never be collected, and start-up objects form none that die.
    """
    app = cast(Starlette, server.config.app)
    env = app.state.dashboard.env
    for name in env.list_templates():
        env.get_template(name)
    gc.collect()
    gc.freeze()


def run(config: DashboardConfig) -> int:
    """Serves until SIGINT/SIGTERM; returns the exit code."""
    fmt = os.environ.get("AQIMODELS_LOG_FORMAT", "").strip().lower()
    logs.configure(json={"json": True, "console": False}.get(fmt))
    asyncio.run(check_registry_exposure(config))
    sock = bind(config)
    server = _uvicorn(config)
    settle_heap(server)
    log.info("dashboard_started", url=url_of(config, sock), target=config.target, tls=config.tls)
    server.run(sockets=[sock])
    log.info("dashboard_stopped")
    return 0


@dataclass
class RunningDashboard:
    """A dashboard served from a thread of this process (tests, benchmarks)."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def start_in_thread(config: DashboardConfig) -> RunningDashboard:
    """Starts the dashboard on ``config.host:config.port`` (0: ephemeral) and returns once it serves."""
    sock = bind(config)
    server = _uvicorn(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dashboard", daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started:
            break
        if not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        threading.Event().wait(0.01)
    return RunningDashboard(url_of(config, sock), server, thread)
