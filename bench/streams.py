"""Section 2: retrain streams relayed worker -> registry -> client, against the worker directly.

The worker is :mod:`bench.fake_worker` (synthetic events, no training), so the figures are the
relay's own: per-event latency (client receive time minus the worker's send time, both on this
machine's clock) paced at ``PACED_MS`` between events, and events per second back to back; then
50 watchers of one job against one watcher (latency and the registry's CPU per event).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench import common, data

PACED_MS = 5.0


def _ts(t: Any) -> float:
    return t.seconds + t.nanos / 1e9


def _start_fake(folder: Path) -> tuple[subprocess.Popen[Any], str]:
    port_file = folder / "fake-worker.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([str(common.BIN / "python"), "-m", "bench.fake_worker", "--port-file", str(port_file)],
                            cwd=common.ROOT, env=common.base_env(), start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, f"127.0.0.1:{int(port_file.read_text())}"
        time.sleep(0.05)
    common.stop(proc)
    raise RuntimeError("fake worker did not start")


def _params(n: int, interval_ms: float) -> Any:
    from aqimodels.api.training.v1 import worker_pb2 as wpb

    return wpb.TrainParams(max_epochs=n, extra={"bench.interval_ms": str(interval_ms), "bench.version": "1"})


def direct(worker: str, n: int, interval_ms: float) -> dict[str, float]:
    import grpc

    from aqimodels.api.training.v1 import worker_pb2 as wpb
    from aqimodels.api.training.v1 import worker_pb2_grpc

    with grpc.insecure_channel(worker) as ch:
        stub = worker_pb2_grpc.TrainingWorkerStub(ch)
        lat, times = [], []
        for ev in stub.Train(wpb.TrainRequest(job_id="direct", model_type=wpb.MODEL_TYPE_XGBOOST,
                                              params=_params(n, interval_ms)), timeout=300):
            now = time.time()
            if ev.WhichOneof("event") == "epoch":
                lat.append(now - _ts(ev.time))
                times.append(now)
    return _stream_stats(lat, times)


def _stream_stats(lat: list[float], times: list[float]) -> dict[str, float]:
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {"p50_ms": common.pct(lat, .5) * 1000, "p99_ms": common.pct(lat, .99) * 1000,
            "events_per_second": (len(times) - 1) / span if span else float("nan"), "events": len(times)}


def relayed(target: str, n: int, interval_ms: float) -> dict[str, float]:
    from aqimodels.client import RegistryClient

    lat, times = [], []
    with RegistryClient(target, timeout=60) as client:
        for ev in client.retrain(["xgboost"], dataset="synthetic", params=_params(n, interval_ms), timeout=600):
            now = time.time()
            if ev.WhichOneof("event") == "progress" and ev.progress.WhichOneof("event") == "epoch":
                lat.append(now - _ts(ev.progress.time))
                times.append(now)
    return _stream_stats(lat, times)


def watchers(target: str, reg_pid: int, count: int, n: int, interval_ms: float) -> dict[str, Any]:
    """``count`` WatchRetrainJob streams on one job; latency of live events and registry CPU per event."""
    import grpc
    import psutil

    from aqimodels.api.registry.v1 import registry_pb2 as pb
    from aqimodels.api.registry.v1 import registry_pb2_grpc
    from aqimodels.client import RegistryClient

    reg = psutil.Process(reg_pid)
    client = RegistryClient(target, timeout=60)
    stream = client.retrain(["xgboost"], dataset="synthetic", params=_params(n, interval_ms), timeout=600)
    job_id = next(iter(stream)).job_id
    channels = [grpc.insecure_channel(target) for _ in range(max(1, count // 10))]
    lat: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(count + 1)
    received = [0]

    def watch(i: int) -> None:
        stub = registry_pb2_grpc.ModelRegistryStub(channels[i % len(channels)])
        local = []
        call = stub.WatchRetrainJob(pb.WatchRetrainJobRequest(job_id=job_id), timeout=600)
        ready.wait()
        start = time.time()
        k = 0
        for ev in call:
            k += 1
            if ev.WhichOneof("event") == "progress" and ev.progress.WhichOneof("event") == "epoch":
                sent = _ts(ev.progress.time)
                if sent > start:
                    local.append(time.time() - sent)
        with lock:
            lat.extend(local)
            received[0] += k

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    ready.wait()
    cpu0 = sum(reg.cpu_times()[:2])
    t0 = time.time()
    for _ in stream:  # the retrain caller itself follows to the end
        pass
    for t in threads:
        t.join(120)
    wall = time.time() - t0
    cpu = sum(reg.cpu_times()[:2]) - cpu0
    for ch in channels:
        ch.close()
    client.close()
    return {"watchers": count, "p50_ms": common.pct(lat, .5) * 1000, "p99_ms": common.pct(lat, .99) * 1000,
            "events_delivered": received[0], "registry_cpu_seconds": cpu,
            "registry_cpu_percent": 100 * cpu / wall if wall else float("nan"),
            "registry_cpu_us_per_delivered_event": 1e6 * cpu / received[0] if received[0] else float("nan")}


def run(folder: Path, runs: int = 3, n_fast: int = 2000, n_paced: int = 400) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "streams.db"
    data.build_sql(db, 20, folder)
    fake, worker = _start_fake(folder)
    reg = None
    try:
        reg, target, _ = common.start_registry(f"sqlite:///{db}", folder, workers=worker)
        from aqimodels.client import RegistryClient

        with RegistryClient(target, timeout=30) as c:
            deadline = time.monotonic() + 60
            while not any(w.healthy for w in c.status().workers):
                if time.monotonic() > deadline:
                    raise RuntimeError("the registry never saw the fake worker healthy")
                time.sleep(0.2)
        relayed(target, 20, 0)  # warm-up
        direct(worker, 20, 0)
        samples: dict[str, list[dict[str, float]]] = {}
        for _ in range(runs):
            for label, fn in (("direct_paced", lambda: direct(worker, n_paced, PACED_MS)),
                              ("relayed_paced", lambda: relayed(target, n_paced, PACED_MS)),
                              ("direct_fast", lambda: direct(worker, n_fast, 0)),
                              ("relayed_fast", lambda: relayed(target, n_fast, 0))):
                samples.setdefault(label, []).append(fn())
            print("  streams run: " + ", ".join(f"{k} p99 {v[-1]['p99_ms']:.2f} ms {v[-1]['events_per_second']:.0f}/s"
                                                for k, v in samples.items()), flush=True)
        out: dict[str, Any] = {"paced_interval_ms": PACED_MS, "events_fast": n_fast, "events_paced": n_paced}
        for label, v in samples.items():
            out[label] = {k: common.figure([s[k] for s in v], u, 2) for k, u in
                          (("p50_ms", "ms"), ("p99_ms", "ms"), ("events_per_second", "events/s"))}
        out["added_p50_ms"] = common.figure([r["p50_ms"] - d["p50_ms"] for r, d in
                                             zip(samples["relayed_paced"], samples["direct_paced"], strict=True)], "ms", 2)
        out["added_p99_ms"] = common.figure([r["p99_ms"] - d["p99_ms"] for r, d in
                                             zip(samples["relayed_paced"], samples["direct_paced"], strict=True)], "ms", 2)
        out["relay_over_direct_events_per_second"] = common.figure(
            [r["events_per_second"] / d["events_per_second"] for r, d in
             zip(samples["relayed_fast"], samples["direct_fast"], strict=True)], "x", 3)
        w: dict[str, list[dict[str, Any]]] = {}
        for _ in range(max(1, runs - 1)):
            for count in (1, 50):
                w.setdefault(str(count), []).append(watchers(target, reg.pid, count, 300, 10))
            print(f"  watchers: 1 p99 {w['1'][-1]['p99_ms']:.1f} ms, 50 p99 {w['50'][-1]['p99_ms']:.1f} ms, "
                  f"cpu {w['1'][-1]['registry_cpu_percent']:.0f}% vs {w['50'][-1]['registry_cpu_percent']:.0f}%",
                  flush=True)
        out["watchers"] = {c: {k: common.figure([s[k] for s in v], u, 2) for k, u in
                               (("p50_ms", "ms"), ("p99_ms", "ms"), ("registry_cpu_percent", "%"),
                                ("registry_cpu_us_per_delivered_event", "us"), ("events_delivered", "events"))}
                           for c, v in w.items()}
        return out
    finally:
        common.stop(reg)
        common.stop(fake)
        shutil.rmtree(folder / "artifacts", ignore_errors=True)
