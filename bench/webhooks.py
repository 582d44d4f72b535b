"""Webhooks: the cost of webhooks on promotion latency, and delivery latency from commit to receiver.

Three ``aqimodels serve`` processes, each on its own copy of one built SQLite registry (4 x 100
versions): one without a webhook, one with a webhook to a healthy receiver (answers 200 at once),
one with a webhook to a hanging receiver (holds every request 30 s; the registry's send timeout
is 5 s, so its delivery thread is always inside an attempt or a backoff). The receivers are HTTP
servers in processes of their own. Runs alternate between the three (and which goes first), ``calls``
promotions to production each (two versions in turn), so that the machine's load falls on all
three alike: promotion p50/p99 per registry, side by side (target: the hanging receiver adds no
p99). Delivery latency: for every event the healthy receiver gets, its arrival time minus the
event's ``time_ms`` (set in the transaction that commits the change): commit -> receiver p50/p99.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench import common, data

SECRET = "bench-secret-" + "0" * 32
CONFIGS = ("none", "healthy", "hanging")


def _serve(hang_seconds: float, conn: Connection) -> None:
    """The receiver process: serves until told to stop, then sends back what it recorded."""
    arrivals: list[tuple[float, int]] = []  # (arrival unix ms, event time_ms)
    requests = [0]
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            arrived = time.time() * 1000
            requests[0] += 1
            if hang_seconds:
                release.wait(hang_seconds)
            event = json.loads(body)
            if "time_ms" in event and "sequence" in event:
                arrivals.append((arrived, int(event["time_ms"])))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn.send(server.server_port)
    conn.recv()  # stop
    release.set()
    server.shutdown()
    conn.send((arrivals, requests[0]))


class _Receiver:
    """An HTTP server in a process of its own that records when each event arrived (hanging: holds
    each request first); its own process, so that its work does not share the interpreter lock of
    the client that times the promotions."""

    def __init__(self, hang_seconds: float = 0.0) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self.requests = 0
        self._conn, child = multiprocessing.get_context("spawn").Pipe()
        self._proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(hang_seconds, child),
                                                                 daemon=True)
        self._proc.start()
        self.port = int(self._conn.recv())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self._conn.send("stop")
        self.arrivals, self.requests = self._conn.recv()
        self._proc.join(10)


def run(folder: Path, runs: int = 3, calls: int = 30) -> dict[str, Any]:
    from aqimodels.client import RegistryClient

    folder.mkdir(parents=True, exist_ok=True)
    built = folder / "webhooks.db"
    data.build_sql(built, 100, folder)
    name, pair = data.MODELS[0], (11, 12)
    receivers = {"healthy": _Receiver(), "hanging": _Receiver(hang_seconds=30.0)}
    env = {"AQIMODELS_WEBHOOK_TIMEOUT_SECONDS": "5", "AQIMODELS_WEBHOOK_LEASE_SECONDS": "15"}
    systems: dict[str, dict[str, Any]] = {}
    try:
        for label in CONFIGS:
            db = folder / f"webhooks-{label}.db"
            shutil.copy(built, db)
            proc, target, _ = common.start_registry(f"sqlite:///{db}", folder, **env)
            client = RegistryClient(target, timeout=60)
            if label in receivers:
                client.create_webhook(receivers[label].url, [], secret=SECRET)
            client.promote(name, pair[0], "production")
            systems[label] = {"proc": proc, "client": client, "current": pair[0], "p50": [], "p99": [], "all": []}
        time.sleep(2.0)  # the webhooks are claimed (and the hanging one is inside its first attempt)
        for r in range(runs):
            order = CONFIGS[r % 3:] + CONFIGS[:r % 3]
            for label in order:
                s = systems[label]
                lat = []
                for _ in range(calls):
                    v = pair[1] if s["current"] == pair[0] else pair[0]
                    t0 = time.perf_counter()
                    s["client"].promote(name, v, "production")
                    lat.append((time.perf_counter() - t0) * 1000)
                    s["current"] = v
                s["p50"].append(common.pct(lat, .5))
                s["p99"].append(common.pct(lat, .99))
                s["all"] += lat
        time.sleep(1.0)  # the last events reach the healthy receiver
    finally:
        for s in systems.values():
            s["client"].close()
            common.stop(s["proc"])
        for rec in receivers.values():
            rec.close()
    out: dict[str, Any] = {"calls_per_run": calls, "versions": "4 x 100", "send_timeout_s": 5}
    for label, s in systems.items():
        out[label] = {"promote_p50_ms": common.figure(s["p50"], "ms", 2),
                      "promote_p99_ms": common.figure(s["p99"], "ms", 2),
                      "promote_p99_all_ms": round(common.pct(s["all"], .99), 2)}
    base = systems["none"]
    for label in ("healthy", "hanging"):
        out[f"{label}_over_none_p99"] = common.figure(
            [a / b for a, b in zip(systems[label]["p99"], base["p99"], strict=True)], "x", 2)
        out[f"{label}_over_none_p50"] = common.figure(
            [a / b for a, b in zip(systems[label]["p50"], base["p50"], strict=True)], "x", 2)
    delays = [arrived - committed for arrived, committed in receivers["healthy"].arrivals]
    out["delivery_events"] = len(delays)
    out["delivery_p50_ms"] = round(common.pct(delays, .5), 1)
    out["delivery_p99_ms"] = round(common.pct(delays, .99), 1)
    out["hanging_receiver_requests"] = receivers["hanging"].requests  # each held 30 s, given up after 5
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), runs=1, calls=10), indent=2))
