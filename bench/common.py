"""Shared pieces of the benchmark suite: statistics, machine notes, load loops, process handling."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The Beijing data: $AQIMODELS_BEIJING_DATA, else ../shared beside the checkout, else /work/shared.
BEIJING = next((p for p in (Path(os.environ.get("AQIMODELS_BEIJING_DATA", "/nonexistent")),
                            ROOT.parent / "shared" / "data" / "beijing-multisite",
                            Path("/work/shared/data/beijing-multisite")) if p.is_dir()),
               ROOT.parent / "shared" / "data" / "beijing-multisite")


def machine() -> dict[str, Any]:
    from importlib import metadata

    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "grpcio": ver("grpcio"), "mlflow": ver("mlflow"), "protobuf": ver("protobuf"),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def figure(samples: list[float], unit: str, digits: int = 3) -> dict[str, Any]:
    """One figure over repeated runs: median, min, max and run count."""
    clean = [s for s in samples if not math.isnan(s)]
    if not clean:
        return {"median": None, "min": None, "max": None, "runs": len(samples), "unit": unit}
    return {"median": round(statistics.median(clean), digits), "min": round(min(clean), digits),
            "max": round(max(clean), digits), "runs": len(clean), "unit": unit}


def closed_loop(call: Callable[[], Any], concurrency: int, seconds: float, max_calls: int = 10**9,
                min_calls: int = 1) -> dict[str, Any]:
    """``concurrency`` threads calling ``call`` back to back for ``seconds`` (or ``max_calls``).

    Returns latencies (s), wall time, calls per second and errors.
    """
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    count = [0]

    def loop() -> None:
        local: list[float] = []
        while True:
            with lock:
                if count[0] >= max_calls or (time.perf_counter() >= stop_at and count[0] >= min_calls):
                    break
                count[0] += 1
            t0 = time.perf_counter()
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - counted
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            local.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return _load_result(latencies, errors, wall)


def _load_result(latencies: list[float], errors: list[str], wall: float) -> dict[str, Any]:
    return {"latencies": latencies, "wall": wall, "per_second": len(latencies) / wall if wall else 0.0,
            "errors": errors, "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000}


class AioLoad:
    """Closed-loop load from one asyncio event loop (its own thread) over a grpc.aio channel.

    A gRPC server's ceiling is measured with a client that costs little per call: eight Python
    threads on the synchronous stub spend more CPU per call than the server on this 2-core
    machine (a bare health Check: about 3,900 calls/s from threads, 4,500 from one event loop),
    so the gRPC systems are driven from here; MLflow's clients (threads) stay on closed_loop.
    """

    def __init__(self) -> None:
        import asyncio

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aio-load", daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        return self._asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def closed_loop(self, call: Callable[[], Any], concurrency: int, seconds: float, max_calls: int = 10**9,
                    min_calls: int = 1) -> dict[str, Any]:
        """Like closed_loop, with ``call`` returning an awaitable (a grpc.aio stub call)."""
        return self.run(self._closed_loop(call, concurrency, seconds, max_calls, min_calls))

    async def _closed_loop(self, call: Callable[[], Any], concurrency: int, seconds: float, max_calls: int,
                           min_calls: int) -> dict[str, Any]:
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = time.perf_counter() + seconds
        count = [0]

        async def loop() -> None:
            while count[0] < max_calls and (time.perf_counter() < stop_at or count[0] < min_calls):
                count[0] += 1
                t0 = time.perf_counter()
                try:
                    await call()
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await self._asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        return _load_result(latencies, errors, wall)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 20) -> None:
    """SIGTERM the process group we started (mlflow server forks workers), then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def tree_rss_mb(pid: int) -> tuple[float, int]:
    """RSS of a process and all its descendants (MB) and the process count."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan"), 0
    total = 0
    n = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            n += 1
        except psutil.NoSuchProcess:
            continue
    return total / 2**20, n


REGISTRY_SERVICE = "aqimodels.api.registry.v1.ModelRegistry"


def wait_grpc_serving(target: str, timeout: float = 120, proc: subprocess.Popen[Any] | None = None,
                      service: str = "") -> float:
    """Polls the gRPC health Check of ``service`` ("" = the process) until SERVING; returns the time it took."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.perf_counter()
    deadline = start + timeout
    # Reconnect within 20-50 ms: with grpc's default backoff (1 s, growing 1.6x) a channel that
    # tried before the port was open waits out its backoff, and that wait was counted as start-up.
    channel = grpc.insecure_channel(target, options=[("grpc.initial_reconnect_backoff_ms", 20),
                                                     ("grpc.min_reconnect_backoff_ms", 20),
                                                     ("grpc.max_reconnect_backoff_ms", 50)])
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        while time.perf_counter() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before SERVING")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=0.5).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - start
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    finally:
        channel.close()
    raise TimeoutError(f"{target} not SERVING within {timeout} s")


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen[Any] | None = None) -> float:
    import urllib.request

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_registry(uri: str, folder: Path, workers: str = "none", **env: str) -> tuple[subprocess.Popen[Any], str, float]:
    """``aqimodels serve`` on an ephemeral port (its own process); returns it, target, seconds to
    SERVING of the registry's own service name (readiness: the read model is warm)."""
    port = free_port()
    log = open(folder / f"registry-{port}.log", "w")  # noqa: SIM115 - closed with the process
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "aqimodels"), "serve"], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env=base_env(**{"MLFLOW_TRACKING_URI": uri, "AQIMODELS_PORT": str(port),
                                            "AQIMODELS_HOST": "127.0.0.1", "AQIMODELS_WORKERS": workers,
                                            "AQIMODELS_LOG_FORMAT": "json", "AQIMODELS_LOG_LEVEL": "warning", **env}))
    target = f"127.0.0.1:{port}"
    wait_grpc_serving(target, 180, proc, REGISTRY_SERVICE)
    return proc, target, time.perf_counter() - t0


def start_mlflow_server(uri: str, folder: Path, workers: int | None = None) -> tuple[subprocess.Popen[Any], str, float]:
    """``mlflow server`` on the same database with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
           "--default-artifact-root", str(folder / "artifacts")]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    log = open(folder / f"mlflow-{port}.log", "w")  # noqa: SIM115 - the server writes to it until it is stopped
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=base_env())
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 180, proc)
    return proc, url, time.perf_counter() - t0


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    data = {"name": name, "machine": machine(), **data}
    out.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return out
