"""Load test of the registry: N concurrent clients for T seconds of mixed reads, a promotion every
second and a retrain running, with throughput, p50/p99 latency per RPC and error counts.

Without ``--target`` it starts its own system on a temporary SQLite store (``aqimodels serve``
with one local training worker, in separate processes so that the clients do not share the
server's interpreter), seeds two models with versions, and stops everything at the end.

Usage::

    python -m bench.load --clients 16 --seconds 30
    python -m bench.load --clients 64 --seconds 30 --target 127.0.0.1:50051

Writes ``bench/results/load_<N>.json``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import RegistryClient
from aqimodels.client.errors import AqiModelsError

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("aqi_predictor_xgboost", "aqi_predictor_gnn")
VERSIONS_PER_MODEL = 12
READS = (("GetStatus", 2), ("ListModelVersions", 4), ("CompareModelVersions", 3), ("ListModels", 1),
         ("GetModelVersion", 3))


def _start_system(folder: Path) -> tuple[subprocess.Popen[str], str, str]:
    uri = f"sqlite:///{folder}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "AQIMODELS_PORT": "0", "AQIMODELS_LOG_FORMAT": "json",
           "AQIMODELS_WORKERS": "local", "MLFLOW_DISABLE_TELEMETRY": "true"}
    aqimodels = str(Path(sys.executable).with_name("aqimodels"))
    proc = subprocess.Popen([aqimodels, "serve"], env=env, cwd=folder, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"aqimodels serve exited with {proc.returncode}")
        if '"registry_started"' in line:
            port = int(json.loads(line)["address"].rsplit(":", 1)[1])
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return proc, f"127.0.0.1:{port}", uri
    proc.kill()
    raise SystemExit("aqimodels serve did not start within 180 s")


def _seed(uri: str, target: str) -> None:
    from aqimodels.server.mlflow_store import MlflowModelStore

    store = MlflowModelStore(uri)
    rng = random.Random(1)
    for name in MODELS:
        for _ in range(VERSIONS_PER_MODEL):
            rmse = 18 + rng.random() * 12
            store.create_version(name, {"rmse": rmse, "mae": rmse * 0.7, "r2": 0.9 - rmse / 100,
                                        "accuracy": 0.5 + rng.random() * 0.3})
    with RegistryClient(target) as client:
        for name in MODELS:
            client.promote(name, 1, "production")


def _wait_worker(client: RegistryClient, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = client.status().workers
        if workers and all(w.healthy for w in workers):
            return True
        time.sleep(0.5)
    return False


class Recorder:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, Counter[str]] = defaultdict(Counter)
        self.lock = threading.Lock()

    def timed(self, rpc: str, fn: Any) -> None:
        start = time.perf_counter()
        code = "OK"
        try:
            fn()
        except AqiModelsError as exc:
            code = exc.code.name
        except Exception as exc:  # noqa: BLE001 - counted, never fatal to the load
            code = type(exc).__name__
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latencies[rpc].append(elapsed)
            if code != "OK":
                self.errors[rpc][code] += 1


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(clients: int, seconds: float, target: str | None) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="aqimodels-load-"))
    proc = None
    try:
        if target is None:
            proc, target, uri = _start_system(folder)
            _seed(uri, target)
        control = RegistryClient(target, timeout=60)
        worker_ready = _wait_worker(control) if proc is not None else bool(control.status().workers)
        rec = Recorder()
        stop = threading.Event()
        versions = {name: [v.version for v in control.iter_versions(name)] for name in MODELS}
        versions = {n: v for n, v in versions.items() if v}
        if not versions:
            raise SystemExit(f"no versions of {', '.join(MODELS)} at {target}: seed it first")

        def reader(i: int) -> None:
            rng = random.Random(i)
            ops, weights = zip(*READS, strict=True)
            with RegistryClient(target, timeout=30) as client:
                while not stop.is_set():
                    op = rng.choices(ops, weights)[0]
                    name = rng.choice(list(versions))
                    if op == "GetStatus":
                        rec.timed(op, client.status)
                    elif op == "ListModels":
                        rec.timed(op, client.list_models)
                    elif op == "ListModelVersions":
                        rec.timed(op, functools.partial(client.list_versions, name, order_by="metric.rmse", page_size=20))
                    elif op == "CompareModelVersions":
                        rec.timed(op, functools.partial(client.compare, name, rng.sample(versions[name], 3), "rmse"))
                    else:
                        rec.timed(op, functools.partial(client.get_version, name, rng.choice(versions[name])))

        def promoter() -> None:
            rng = random.Random(99)
            with RegistryClient(target, timeout=30) as client:
                while not stop.wait(1.0):
                    name = rng.choice(list(versions))
                    rec.timed("PromoteModelVersion",
                              functools.partial(client.promote, name, rng.choice(versions[name]), "production"))

        retrain_events: list[str] = []

        def retrainer() -> None:
            with RegistryClient(target, timeout=30) as client:
                try:
                    for ev in client.retrain(["lstm"], dataset="synthetic:stations=4,days=30,seed=3",
                                             params=wpb.TrainParams(max_epochs=10_000, early_stopping_patience=10_000)):
                        retrain_events.append(ev.WhichOneof("event") or "")
                        if stop.is_set():
                            client.cancel_job(ev.job_id, "load test over")
                            return
                except AqiModelsError as exc:
                    retrain_events.append(f"error {exc.code.name}")

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(clients)]
        threads.append(threading.Thread(target=promoter, daemon=True))
        retrain_thread = threading.Thread(target=retrainer, daemon=True)
        retrain_thread.start()
        time.sleep(1.0)
        started = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(60)
        wall = time.perf_counter() - started
        retrain_thread.join(30)
        per_rpc = {}
        total = 0
        for rpc, lat in sorted(rec.latencies.items()):
            total += len(lat)
            per_rpc[rpc] = {"calls": len(lat), "per_second": round(len(lat) / wall, 1),
                            "p50_ms": round(_pct(lat, 0.50) * 1000, 2), "p99_ms": round(_pct(lat, 0.99) * 1000, 2),
                            "max_ms": round(max(lat) * 1000, 2), "errors": dict(rec.errors.get(rpc, {}))}
        result = {
            "clients": clients, "seconds": round(wall, 2), "target": target if proc is None else "self-started",
            "store": "sqlite (temporary)" if proc is not None else "external",
            "total_calls": total, "throughput_per_second": round(total / wall, 1),
            "error_count": sum(sum(c.values()) for c in rec.errors.values()),
            "rpcs": per_rpc,
            "retrain": {"worker_ready": worker_ready, "events": len(retrain_events),
                        "epochs": retrain_events.count("progress"), "last": retrain_events[-1:]},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        control.close()
        return result
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads (one channel each)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--target", help="host:port of a running registry (seeded with the bench models)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    result = run(args.clients, args.seconds, args.target)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"load_{args.clients}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.clients} clients, {result['seconds']} s: {result['throughput_per_second']} calls/s, "
          f"{result['error_count']} errors; retrain events {result['retrain']['events']}")
    print(f"{'rpc':24} {'calls':>7} {'per s':>7} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for rpc, row in result["rpcs"].items():
        print(f"{rpc:24} {row['calls']:7d} {row['per_second']:7.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}  "
              f"{row['errors'] or ''}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
