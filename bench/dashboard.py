"""Section 5: the web dashboard, each part in its own process (registry, fake worker, dashboard).

- Overview (and a model page) at 4 x 1,000 versions in Debian's Chromium: time to first byte and to
  fully rendered (the load event, after the page's CSS, uPlot and script ran), from the browser's
  Navigation Timing; with the browser cache warm (a wall screen reloading) and cold (a new profile).
- Server-Sent Events: 1 and 50 SSE clients on one running job (300 events, 10 ms apart, from
  :mod:`bench.fake_worker`), side by side with a direct gRPC WatchRetrainJob watcher on the same job:
  the registry's CPU time above its idle rate (measured first; a slower run must not be charged
  for its background), in total and per event delivered to the SSE clients, and the latency of an
  event from the worker's send time to the client (both on this machine's clock) once every client
  is connected (and, separately, including the connection storm), and the added latency of the
  dashboard hop = SSE client p99 - direct gRPC watcher p99 in the same run.

Usage: ``python -m bench.run --sections dashboard,report`` (about 2 minutes).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench import common, data
from bench.streams import _params, _start_fake

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")


def start_dashboard(target: str, folder: Path) -> tuple[subprocess.Popen[Any], str]:
    port = common.free_port()
    log = open(folder / f"dashboard-{port}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([str(common.BIN / "aqimodels"), "--target", target, "dashboard", "--port", str(port)],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=common.base_env(AQIMODELS_LOG_FORMAT="json"))
    url = f"http://127.0.0.1:{port}/"
    common.wait_http(url + "healthz", 60, proc)
    return proc, url


def page_loads(url: str, paths: dict[str, str], loads: int) -> dict[str, Any]:
    """Navigation Timing of each page: warm (one browser profile, reloading) and cold (a new profile each)."""
    from playwright.sync_api import sync_playwright

    js = "JSON.stringify(performance.getEntriesByType('navigation')[0].toJSON())"
    out: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for label, path in paths.items():
                for mode in ("warm", "cold"):
                    ttfb, dom, load, size = [], [], [], 0
                    context = browser.new_context()
                    page = context.new_page()
                    page.goto(url + path, wait_until="load")  # warm-up: the dashboard's and registry's caches
                    for _ in range(loads):
                        if mode == "cold":
                            context.close()
                            context = browser.new_context()
                            page = context.new_page()
                        page.goto(url + path, wait_until="load")
                        nav = json.loads(page.evaluate(js))
                        ttfb.append(nav["responseStart"] - nav["startTime"])
                        dom.append(nav["domContentLoadedEventEnd"] - nav["startTime"])
                        load.append(nav["loadEventEnd"] - nav["startTime"])
                        size = nav.get("decodedBodySize", 0)
                    context.close()
                    out[f"{label}_{mode}"] = {"ttfb_ms": _stats(ttfb), "dom_content_loaded_ms": _stats(dom),
                                              "rendered_ms": _stats(load), "html_bytes": size}
        finally:
            browser.close()
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": round(common.pct(values, .5), 2), "p90": round(common.pct(values, .9), 2),
            "max": round(max(values), 2), "n": len(values)}


async def _sse_client(host: str, port: int, path: str, start: float, lat: list[tuple[float, float]],
                      first: list[float], arrivals: dict[int, list[float]]) -> int:
    """One browser-worth of EventSource: reads frames to the terminal one; returns how many it got.

    ``lat`` gets (worker send time, latency) of every live epoch event, ``first`` the time of its first
    frame, ``arrivals`` each live epoch event's arrival times by sequence (one per client).
    """
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    frames = 0
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            if not line.startswith(b"data: {"):
                continue
            now = time.time()
            ev = json.loads(line[6:])
            if not frames:
                first.append(now)
            frames += 1
            sent = ev.get("worker_time_us")
            if ev.get("kind") == "epoch" and sent and sent / 1e6 > start:
                lat.append((sent / 1e6, now - sent / 1e6))
                arrivals.setdefault(ev["seq"], []).append(now)
            if ev.get("state") in TERMINAL:
                break
    finally:
        writer.close()
    return frames


def _grpc_watch(target: str, job_id: str, start: float, lat: list[float], arrivals: dict[int, float]) -> None:
    from aqimodels.client import RegistryClient

    with RegistryClient(target, timeout=60) as c:
        for ev in c.watch_job(job_id, timeout=600):
            now = time.time()
            p = ev.progress
            if ev.WhichOneof("event") == "progress" and p.WhichOneof("event") == "epoch":
                sent = p.time.seconds + p.time.nanos / 1e9
                if sent > start:
                    lat.append(now - sent)
                    arrivals[ev.sequence] = now


def idle_cpu_rate(pid: int, seconds: float = 3.0) -> float:
    """The registry's CPU seconds per second with nothing to do (health probes, refreshers)."""
    import psutil

    proc = psutil.Process(pid)
    cpu0, t0 = sum(proc.cpu_times()[:2]), time.time()
    time.sleep(seconds)
    return (sum(proc.cpu_times()[:2]) - cpu0) / (time.time() - t0)


def _load_pages(url: str, stop: threading.Event, every: float, took: list[float]) -> None:
    """A user browsing meanwhile: one model page (1,000 versions, 130 KB) every ``every`` seconds."""
    import urllib.request

    while not stop.is_set():
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
        took.append(time.perf_counter() - t0)
        stop.wait(every)


def sse_fanout(url: str, target: str, reg_pid: int, dash_pid: int, clients: int, n: int,
               interval_ms: float, idle_rate: float = 0.0, page: str = "") -> dict[str, Any]:
    import psutil
    from aqimodels.client import RegistryClient

    reg, dash = psutil.Process(reg_pid), psutil.Process(dash_pid)
    with RegistryClient(target, timeout=60) as c:
        stream = c.retrain(["xgboost"], dataset="synthetic", params=_params(n, interval_ms), timeout=600)
        job_id = next(iter(stream)).job_id
        stream.close()  # type: ignore[attr-defined]  # the job goes on; only the watchers below follow it
    host, port = url.split("//")[1].rstrip("/").split(":")
    sse_pairs: list[tuple[float, float]] = []
    first: list[float] = []
    direct_lat: list[float] = []
    sse_at: dict[int, list[float]] = {}
    direct_at: dict[int, float] = {}
    start = time.time()
    cpu0 = sum(reg.cpu_times()[:2])
    dcpu0 = sum(dash.cpu_times()[:2])
    direct = threading.Thread(target=_grpc_watch, args=(target, job_id, start, direct_lat, direct_at), daemon=True)
    direct.start()
    stop = threading.Event()
    page_ms: list[float] = []
    pages = threading.Thread(target=_load_pages, args=(url + page, stop, 0.2, page_ms), daemon=True)
    if page:
        pages.start()

    async def all_clients() -> list[int]:
        return await asyncio.gather(*(_sse_client(host, int(port), f"/events/jobs/{job_id}", start, sse_pairs,
                                                  first, sse_at) for _ in range(clients)))

    frames = asyncio.run(all_clients())
    direct.join(120)
    stop.set()
    wall = time.time() - start
    cpu = sum(reg.cpu_times()[:2]) - cpu0
    dcpu = sum(dash.cpu_times()[:2]) - dcpu0
    delivered = sum(frames)
    # Steady state: events the worker sent once every client was connected and had its first frame
    # (the connection storm, 50 requests at once, is the connect figure).
    connected = max(first)
    sse_lat = [d for sent, d in sse_pairs if sent > connected]
    all_lat = [d for _, d in sse_pairs]
    # Per event once all were connected: the first client's arrival after the direct watcher's (the hop
    # through the dashboard) and the last client's after the first (the fan-out, plus this one process
    # reading 50 sockets in turn: an upper bound of the dashboard's share).
    steady = [(seq, ts) for seq, ts in sse_at.items() if len(ts) == clients and seq in direct_at and min(ts) > connected]
    hop = [min(ts) - direct_at[seq] for seq, ts in steady]
    spread = [max(ts) - min(ts) for _, ts in steady]
    busy = max(cpu - idle_rate * wall, 1e-6)  # what the job's events cost, the idle background taken out
    return {"clients": clients, "events_delivered": delivered, "wall_seconds": wall,
            "registry_cpu_seconds": cpu, "registry_busy_cpu_seconds": busy,
            "registry_cpu_us_per_delivered_event": 1e6 * busy / delivered,
            "dashboard_cpu_seconds": dcpu, "dashboard_cpu_us_per_delivered_event": 1e6 * dcpu / delivered,
            "sse_p50_ms": common.pct(sse_lat, .5) * 1000, "sse_p99_ms": common.pct(sse_lat, .99) * 1000,
            "direct_p50_ms": common.pct(direct_lat, .5) * 1000, "direct_p99_ms": common.pct(direct_lat, .99) * 1000,
            "added_p99_ms": (common.pct(sse_lat, .99) - common.pct(direct_lat, .99)) * 1000,
            "hop_p50_ms": common.pct(hop, .5) * 1000, "hop_p99_ms": common.pct(hop, .99) * 1000,
            "fanout_spread_p50_ms": common.pct(spread, .5) * 1000,
            "fanout_spread_p99_ms": common.pct(spread, .99) * 1000,
            "latency_samples": len(sse_lat), "page_loads": len(page_ms),
            "page_load_p50_ms": common.pct(page_ms, .5) * 1000 if page_ms else None, "connect_all_ms": (connected - start) * 1000,
            "sse_p99_ms_including_connect": common.pct(all_lat, .99) * 1000}


def run(folder: Path, runs: int = 3, versions: int = 1000, loads: int = 15) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "dashboard.db"
    build = data.build_sql(db, versions, folder)
    fake, worker = _start_fake(folder)
    reg = dash = None
    try:
        reg, target, _ = common.start_registry(f"sqlite:///{db}", folder, workers=worker)
        dash, url = start_dashboard(target, folder)
        from aqimodels.client import RegistryClient

        with RegistryClient(target, timeout=30) as c:
            deadline = time.monotonic() + 60
            while not any(w.healthy for w in c.status().workers):
                if time.monotonic() > deadline:
                    raise RuntimeError("the registry never saw the fake worker healthy")
                time.sleep(0.2)
        out: dict[str, Any] = {"versions_per_model": versions, "models": len(data.MODELS),
                               "build_seconds": round(build["seconds"], 2)}
        out["pages"] = page_loads(url, {"overview": "", "model": "models/aqi_predictor_lstm"}, loads)
        print("  pages: " + ", ".join(f"{k} ttfb {v['ttfb_ms']['p50']:.0f} ms rendered {v['rendered_ms']['p50']:.0f} ms"
                                      for k, v in out["pages"].items()), flush=True)
        sse_fanout(url, target, reg.pid, dash.pid, 1, 30, 5)  # warm-up
        idle = idle_cpu_rate(reg.pid)
        out["registry_idle_cpu_percent"] = round(100 * idle, 2)
        samples: dict[str, list[dict[str, Any]]] = {"1": [], "50": [], "50, a model page loading every 0.2 s": []}
        for _ in range(runs):
            for count in (1, 50):
                samples[str(count)].append(sse_fanout(url, target, reg.pid, dash.pid, count, 300, 10, idle))
            # The fan-out while a user browses: a page render must not stop the streams.
            browsing = sse_fanout(url, target, reg.pid, dash.pid, 50, 300, 10, idle, page="models/aqi_predictor_lstm")
            samples["50, a model page loading every 0.2 s"].append(browsing)
            print(f"  sse with a model page every 0.2 s ({browsing['page_loads']} loads, p50 "
                  f"{browsing['page_load_p50_ms']:.0f} ms): p99 {browsing['sse_p99_ms']:.1f} ms (direct gRPC "
                  f"{browsing['direct_p99_ms']:.1f} ms; first SSE client after direct p99 {browsing['hop_p99_ms']:.1f} ms)",
                  flush=True)
            one, fifty = samples["1"][-1], samples["50"][-1]
            print(f"  sse: registry cpu above idle 1 client {one['registry_busy_cpu_seconds']:.3f} s, 50 clients "
                  f"{fifty['registry_busy_cpu_seconds']:.3f} s (walls {one['wall_seconds']:.1f}, "
                  f"{fifty['wall_seconds']:.1f} s); p99 worker->client {fifty['sse_p99_ms']:.1f} ms "
                  f"(direct gRPC {fifty['direct_p99_ms']:.1f} ms; first SSE client after direct p50/p99 "
                  f"{fifty['hop_p50_ms']:.1f}/{fifty['hop_p99_ms']:.1f} ms, last after first "
                  f"{fifty['fanout_spread_p50_ms']:.1f}/{fifty['fanout_spread_p99_ms']:.1f} ms; with the connections "
                  f"{fifty['sse_p99_ms_including_connect']:.1f} ms); dashboard cpu per delivered event "
                  f"{fifty['dashboard_cpu_us_per_delivered_event']:.1f} us", flush=True)
        keys = (("registry_cpu_seconds", "s"), ("registry_busy_cpu_seconds", "s"),
                ("registry_cpu_us_per_delivered_event", "us"), ("wall_seconds", "s"),
                ("dashboard_cpu_us_per_delivered_event", "us"), ("events_delivered", "events"),
                ("sse_p50_ms", "ms"), ("sse_p99_ms", "ms"), ("direct_p99_ms", "ms"), ("added_p99_ms", "ms"),
                ("hop_p50_ms", "ms"), ("hop_p99_ms", "ms"), ("fanout_spread_p50_ms", "ms"),
                ("fanout_spread_p99_ms", "ms"), ("direct_p50_ms", "ms"), ("connect_all_ms", "ms"), ("sse_p99_ms_including_connect", "ms"))
        out["sse"] = {c: {k: common.figure([s[k] for s in v], u, 3) for k, u in keys} for c, v in samples.items()}
        pairs = list(zip(samples["1"], samples["50"], strict=True))
        out["sse_registry_cpu_50_over_1"] = common.figure(
            [b["registry_busy_cpu_seconds"] / a["registry_busy_cpu_seconds"] for a, b in pairs], "x", 3)
        out["sse_registry_cpu_50_over_1_with_idle"] = common.figure(
            [b["registry_cpu_seconds"] / a["registry_cpu_seconds"] for a, b in pairs], "x", 3)
        out["sse_registry_cpu_per_event_50_over_1"] = common.figure(
            [b["registry_cpu_us_per_delivered_event"] / a["registry_cpu_us_per_delivered_event"] for a, b in pairs],
            "x", 3)
        return out
    finally:
        common.stop(dash)
        common.stop(reg)
        common.stop(fake)
        shutil.rmtree(folder / "artifacts", ignore_errors=True)


if __name__ == "__main__":
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="aqimodels-bench-dashboard-"))
    try:
        print(json.dumps(run(tmp / "dashboard", runs=1, loads=5), indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
