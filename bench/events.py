"""Section 9: registry events. Two registry processes on one PostgreSQL database (SQLite when none
answers), a WatchRegistryEvents watcher on each; promotions through replica A, paced.

Latency: the watcher's receive time minus the event's commit time (the ``time`` the registry
stamps in the appending transaction; one machine, one clock), on the replica that made the
change (woken by its own commit) and on the other (woken by PostgreSQL's NOTIFY, or its poll).
Replay: events per second streamed from the log by ``watch_events(0, follow=False)``, the log
filled with ``EVENTS`` rows first.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.durability import _database

MODEL = "bench_events"
VERSIONS = 6
EVENTS = 20_000


def _watch(target: str, after: int, sink: list[tuple[float, int, int]], stop: threading.Event) -> Any:
    from aqimodels.client import RegistryClient

    client = RegistryClient(target, timeout=60)
    stream = client.watch_events(after, model_names=[MODEL])

    def run() -> None:
        try:
            for e in stream:
                sink.append((time.time(), e.sequence, e.time.ToMilliseconds()))
                if stop.is_set():
                    return
        except Exception:  # noqa: BLE001 - closed at the end of the run
            return

    threading.Thread(target=run, daemon=True).start()
    return client


def _latencies(sink: list[tuple[float, int, int]], sequences: set[int]) -> list[float]:
    return [(received * 1000 - committed) for received, seq, committed in sink if seq in sequences]


def _fill(uri: str, count: int) -> float:
    """Appends ``count`` events straight into the log (as many completed changes would); returns seconds."""
    import sqlalchemy as sa

    from aqimodels.server.db import Database
    from aqimodels.server.events import counter_table, events_table

    db = Database(uri)
    t0 = time.perf_counter()
    with db.begin() as conn:
        top = int(conn.execute(sa.select(counter_table.c.value).with_for_update()).scalar_one())
        now = int(time.time() * 1000)
        details = json.dumps({"from_stage": "staging", "to_stage": "production", "replaced_versions": [1],
                              "archived_versions": [1]})
        conn.execute(events_table.insert(), [
            {"sequence": top + i + 1, "time_ms": now, "type": "STAGE_CHANGED", "model_name": "bench_replay",
             "version": i % 50 + 1, "actor": "bench", "request_id": f"r{i}", "audit_id": f"{i:032x}",
             "payload": details} for i in range(count)])
        conn.execute(counter_table.update().values(value=top + count))
    db.engine.dispose()
    return time.perf_counter() - t0


def run(folder: Path, runs: int = 3, promotions: int = 40, pace_s: float = 0.05) -> dict[str, Any]:
    from aqimodels.client import RegistryClient
    from aqimodels.server.mlflow_store import MlflowModelStore

    folder.mkdir(parents=True, exist_ok=True)
    uri, drop = _database(folder)
    procs = []
    try:
        store = MlflowModelStore(uri)
        for i in range(VERSIONS):
            store.create_version(MODEL, {"rmse": 20.0 + i, "mae": 14.0 + i})
        a, target_a, _ = common.start_registry(uri, folder)
        procs.append(a)
        b, target_b, _ = common.start_registry(uri, folder)
        procs.append(b)
        same: list[float] = []
        other: list[float] = []
        promote_ms: list[float] = []
        with RegistryClient(target_a, timeout=60) as client:
            for r in range(runs):
                top = max([e.sequence for e in client.watch_events(0, follow=False)] or [0])
                on_a: list[tuple[float, int, int]] = []
                on_b: list[tuple[float, int, int]] = []
                stop = threading.Event()
                watchers = [_watch(target_a, top, on_a, stop), _watch(target_b, top, on_b, stop)]
                time.sleep(1.0)  # both streams open and caught up
                sequences: set[int] = set()
                for i in range(promotions):
                    t0 = time.perf_counter()
                    client.promote(MODEL, (r * promotions + i) % VERSIONS + 1, "production")
                    promote_ms.append((time.perf_counter() - t0) * 1000)
                    time.sleep(pace_s)
                deadline = time.monotonic() + 30
                while (len(on_a) < promotions or len(on_b) < promotions) and time.monotonic() < deadline:
                    time.sleep(0.05)
                sequences = {seq for _, seq, _ in on_a} | {seq for _, seq, _ in on_b}
                same += _latencies(on_a, sequences)
                other += _latencies(on_b, sequences)
                stop.set()
                for w in watchers:
                    w.close()
                print(f"   run {r + 1}: {len(on_a)} / {len(on_b)} events on A / B of {promotions}", flush=True)
            fill_s = _fill(uri, EVENTS)
            replay_s: list[float] = []
            for _ in range(runs):
                t0 = time.perf_counter()
                n = sum(1 for _ in client.watch_events(0, follow=False))
                replay_s.append(time.perf_counter() - t0)
        result = {
            "backend": "postgresql" if uri.startswith("postgresql") else "sqlite",
            "promotions_per_run": promotions, "pace_ms": pace_s * 1000,
            "same_replica_ms": {"p50": round(common.pct(same, 0.5), 2), "p99": round(common.pct(same, 0.99), 2),
                                "count": len(same)},
            "other_replica_ms": {"p50": round(common.pct(other, 0.5), 2), "p99": round(common.pct(other, 0.99), 2),
                                 "count": len(other)},
            "promote_ms": {"p50": round(common.pct(promote_ms, 0.5), 2), "p99": round(common.pct(promote_ms, 0.99), 2)},
            "replay": {"events": n, "events_per_second": common.figure([n / s for s in replay_s], "events/s", 0),
                       "fill_seconds": round(fill_s, 2)},
        }
        print(f"   {result}", flush=True)
        return result
    finally:
        for p in procs:
            common.stop(p)
        drop()
