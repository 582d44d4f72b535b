"""Section 5: scale. Many models, a cold start that is ready when it says so, memory per version.

- Start to SERVING of the registry's own service name (readiness: the read model is warm) at
  4 x 1,000 and 4 x 10,000 versions, and the first GetStatus calls right after it (no cold
  read may be left for them).
- 100 models x 100 versions: GetStatus of every model at 1 in flight against the same answer
  assembled with MlflowClient in-process and over REST on the default ``mlflow server`` on the
  same database, interleaved run by run; a page of 20 models.
- The registry's CPU while idle after warm-up (its refresher, the health probe) at 100 x 100 and
  400 x 25 over 150 s, with the refresher's probes of every model and the full reloads of a
  model that fell in the window (from the registry's own metrics).
- Resident memory at 4 x 10,000 and 100 x 100 against a registry on an empty store in the same
  run: bytes per version above the idle process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import common, data, rpc

FIRST_CALLS = 50
SETTLE = 3.0
CPU_WINDOW = 150.0  # seconds: a model's full reload comes 30-45 s after its load, later on a busy machine


def _cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _start(uri: str, folder: Path) -> dict[str, Any]:
    """One start: seconds to SERVING, then the first GetStatus calls back to back."""
    proc, target, ready = common.start_registry(uri, folder)
    try:
        ops = rpc.GrpcOps(target)
        lat = []
        for _ in range(FIRST_CALLS):
            t0 = time.perf_counter()
            ops.status()
            lat.append(time.perf_counter() - t0)
        ops.close()
        return {"ready_seconds": ready, "first_status_ms": lat[0] * 1000,
                "first_calls_p99_ms": common.pct(lat, 0.99) * 1000, "first_calls_p50_ms": common.pct(lat, 0.5) * 1000}
    finally:
        common.stop(proc)


def _resident(uri: str, folder: Path) -> float:
    """RSS (MB) of a warm registry, SETTLE seconds after SERVING and one GetStatus."""
    proc, target, _ = common.start_registry(uri, folder)
    try:
        ops = rpc.GrpcOps(target)
        ops.status()
        ops.close()
        time.sleep(SETTLE)
        return common.tree_rss_mb(proc.pid)[0]
    finally:
        common.stop(proc)


def _store_calls(port: int) -> dict[str, float]:
    """The registry's MLflow calls so far by operation (its Prometheus endpoint)."""
    import urllib.request

    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("aqimodels_mlflow_call_duration_seconds_count{"):
                op = line.split('operation="', 1)[1].split('"', 1)[0]
                out[op] = float(line.rsplit(" ", 1)[1])
    return out


def _idle_cpu(uri: str, folder: Path, window: float) -> dict[str, float]:
    """The registry's CPU share of one core over ``window`` seconds idle after warm-up, with the
    store calls its refresher made meanwhile (probes of every model, full reloads of one)."""
    metrics_port = common.free_port()
    proc, _target, _ = common.start_registry(uri, folder, AQIMODELS_METRICS_PORT=str(metrics_port))
    try:
        time.sleep(1.0)
        calls0 = _store_calls(metrics_port)
        cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
        time.sleep(window)
        cpu, wall = _cpu_seconds(proc.pid) - cpu0, time.perf_counter() - t0
        calls = _store_calls(metrics_port)
        delta = {op: n - calls0.get(op, 0.0) for op, n in calls.items()}
        return {"cpu_percent": 100 * cpu / wall, "cpu_seconds": cpu, "window_seconds": wall,
                "probes_of_all_models": delta.get("probe_all", 0.0), "model_reloads": delta.get("load_model", 0.0),
                "health_pings": delta.get("ping", 0.0)}
    finally:
        common.stop(proc)


def _many_models(uri: str, folder: Path, models: tuple[str, ...], runs: int, seconds: float,
                 with_rest: bool) -> dict[str, Any]:
    """GetStatus of every model: the registry against MlflowClient in-process and over REST."""
    procs: list[Any] = []
    try:
        proc, target, _ = common.start_registry(uri, folder)
        procs.append(proc)
        aq = rpc.GrpcOps(target)
        systems: dict[str, Any] = {"aqimodels": aq.measured("status"), "inproc": rpc.MlflowOps(uri, models).status}
        if with_rest:
            p1, url, _ = common.start_mlflow_server(uri, folder)
            procs.append(p1)
            systems["rest"] = rpc.MlflowOps(url, models).status
        ops = {"GetStatus_all": systems, "GetStatus_page_20": {"aqimodels": aq.measured("status_page", 20)}}
        answer = aq.status()
        assert len(answer.models) == len(models), (len(answer.models), len(models))
        assert len(aq._send("status_page", 20).models) == 20
        out = rpc.measure_matrix(ops, {"aqimodels": [1], "inproc": [1], "rest": [1]}, runs, seconds,
                                 {"inproc": 20, "rest": 3})
        aq.close()
        return out
    finally:
        for p in procs:
            common.stop(p)


def run(folder: Path, runs: int = 3, seconds: float = 1.5, with_rest: bool = True,
        cpu_window: float = CPU_WINDOW) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"builds": {}, "start": {}, "idle_cpu": {}, "rss": {}}
    shapes = {"4x1000": (4, 1000), "4x10000": (4, 10000), "100x100": (100, 100), "400x25": (400, 25),
              "empty": (0, 0)}
    uris = {}
    for label, (m, n) in shapes.items():
        path = folder / f"scale_{label}.db"
        if m:
            b = data.build_sql(path, n, folder, models=m)
            data.verify(f"sqlite:///{path}", n, m)
            out["builds"][label] = b
            print(f"  built {label}: {b['versions']} versions in {b['seconds']:.1f} s", flush=True)
        else:
            path.write_bytes(data.migrated_template(folder).read_bytes())
        uris[label] = f"sqlite:///{path}"
    # start to SERVING and the first calls after it, interleaved by run
    samples: dict[str, list[dict[str, Any]]] = {}
    for _ in range(runs):
        for label in ("4x1000", "4x10000"):
            samples.setdefault(label, []).append(_start(uris[label], folder))
            s = samples[label][-1]
            print(f"  start {label}: SERVING {s['ready_seconds']:.2f} s, first GetStatus {s['first_status_ms']:.1f} ms, "
                  f"p99 of the first {FIRST_CALLS} {s['first_calls_p99_ms']:.1f} ms", flush=True)
    for label, v in samples.items():
        out["start"][label] = {k: common.figure([s[k] for s in v], "s" if k.endswith("seconds") else "ms", 3)
                               for k in v[0]}
        # every first call of every run: the p99 of all of them
        out["start"][label]["first_calls_p99_all_runs_ms"] = max(s["first_calls_p99_ms"] for s in v)
    # memory: a registry on an empty store, then the large ones, interleaved by run
    rss: dict[str, list[float]] = {}
    for _ in range(runs):
        for label in ("empty", "4x10000", "100x100"):
            rss.setdefault(label, []).append(_resident(uris[label], folder))
        print("  RSS: " + ", ".join(f"{k} {v[-1]:.0f} MB" for k, v in rss.items()), flush=True)
    for label, v in rss.items():
        out["rss"][label] = {"rss_mb": common.figure(v, "MB", 1)}
        if label != "empty":
            versions = shapes[label][0] * shapes[label][1]
            out["rss"][label]["bytes_per_version_above_idle"] = common.figure(
                [(r - e) * 2**20 / versions for r, e in zip(v, rss["empty"], strict=True)], "B", 0)
            out["rss"][label]["versions"] = versions
    # many models: GetStatus against MLflow's paths, and a page
    print("  GetStatus at 100 x 100", flush=True)
    out["many_models"] = _many_models(uris["100x100"], folder, data.model_names(100), runs, seconds, with_rest)
    # idle CPU after warm-up (one window each: they are long)
    for label in ("100x100", "400x25"):
        out["idle_cpu"][label] = _idle_cpu(uris[label], folder, cpu_window)
        c = out["idle_cpu"][label]
        print(f"  idle CPU {label}: {c['cpu_percent']:.2f} % of one core; {c['probes_of_all_models']:.0f} probes of "
              f"all models, {c['model_reloads']:.0f} model reloads in {c['window_seconds']:.0f} s", flush=True)
    return out
