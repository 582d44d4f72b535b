"""Section 3: process costs. Time from process start to health SERVING (gRPC health Check for the
registry and the worker, ``/health`` for ``mlflow server``), idle memory (RSS of the process and
all its children, 3 s after ready) and loaded memory (after 3 s of reads at 8 in flight)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import common, data, rpc

SETTLE = 3.0


def _load(call: Any) -> None:
    common.closed_loop(call, 8, 3.0)


def _registry(db: Path, folder: Path) -> dict[str, float]:
    proc, target, ready = common.start_registry(f"sqlite:///{db}", folder)
    try:
        time.sleep(SETTLE)
        idle, nproc = common.tree_rss_mb(proc.pid)
        ops = rpc.GrpcOps(target)
        name = data.MODELS[1]
        calls = [ops.status, lambda: ops.list_page(name), lambda: ops.compare(name)]
        _load(lambda: [c() for c in calls])
        loaded, _ = common.tree_rss_mb(proc.pid)
        ops.close()
        return {"ready_seconds": ready, "idle_rss_mb": idle, "loaded_rss_mb": loaded, "processes": nproc}
    finally:
        common.stop(proc)


def _worker(db: Path, folder: Path) -> dict[str, float]:
    port_file = folder / "worker.port"
    port_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(common.BIN / "python"), "-m", "aqimodels.training.main", "--host", "127.0.0.1",
                             "--port", "0", "--port-file", str(port_file)], cwd=folder, start_new_session=True,
                            env=common.base_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}", AQIMODELS_LOG_LEVEL="warning"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError("worker did not start")
            time.sleep(0.02)
        common.wait_grpc_serving(f"127.0.0.1:{int(port_file.read_text())}", 60, proc)
        ready = time.perf_counter() - t0
        time.sleep(SETTLE)
        idle, nproc = common.tree_rss_mb(proc.pid)
        return {"ready_seconds": ready, "idle_rss_mb": idle, "processes": nproc}
    finally:
        common.stop(proc)


def _mlflow(db: Path, folder: Path, workers: int | None) -> dict[str, float]:
    proc, url, ready = common.start_mlflow_server(f"sqlite:///{db}", folder, workers)
    try:
        time.sleep(SETTLE)
        idle, nproc = common.tree_rss_mb(proc.pid)
        ops = rpc.MlflowOps(url)
        _load(ops.status)
        loaded, _ = common.tree_rss_mb(proc.pid)
        return {"ready_seconds": ready, "idle_rss_mb": idle, "loaded_rss_mb": loaded, "processes": nproc}
    finally:
        common.stop(proc)


def run(folder: Path, runs: int = 3) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "process.db"
    data.build_sql(db, 1000, folder)
    samples: dict[str, list[dict[str, float]]] = {}
    for _ in range(runs):
        for label, fn in (("registry", lambda: _registry(db, folder)), ("worker", lambda: _worker(db, folder)),
                          ("mlflow_server_default", lambda: _mlflow(db, folder, None)),
                          ("mlflow_server_workers_1", lambda: _mlflow(db, folder, 1))):
            samples.setdefault(label, []).append(fn())
        print("  process run: " + ", ".join(f"{k} ready {v[-1]['ready_seconds']:.2f} s idle "
                                            f"{v[-1]['idle_rss_mb']:.0f} MB" for k, v in samples.items()), flush=True)
    out: dict[str, Any] = {}
    for label, v in samples.items():
        out[label] = {k: common.figure([s[k] for s in v], u, 2) for k, u in
                      (("ready_seconds", "s"), ("idle_rss_mb", "MB"), ("loaded_rss_mb", "MB"), ("processes", ""))
                      if k in v[0]}
    out["ratio_mlflow_default_idle_over_registry"] = common.figure(
        [m["idle_rss_mb"] / r["idle_rss_mb"] for m, r in zip(samples["mlflow_server_default"], samples["registry"], strict=True)],
        "x", 2)
    out["ratio_mlflow_default_ready_over_registry"] = common.figure(
        [m["ready_seconds"] / r["ready_seconds"] for m, r in
         zip(samples["mlflow_server_default"], samples["registry"], strict=True)], "x", 2)
    shutil.rmtree(folder / "artifacts", ignore_errors=True)
    return out
