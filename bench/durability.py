"""Durable jobs: takeover latency, events lost in a takeover, the lease heartbeat's cost.

Takeover: two ``aqimodels serve`` replicas on one fresh PostgreSQL database on the local server
(SQLite when none answers), a real worker process, an LSTM retrain through replica A with a
watcher on replica B. A is killed (SIGKILL) or stopped (SIGTERM) at epoch 3; measured from that
moment: until B holds the job's lease (``claimed``) and until B's watcher gets the first event
recorded after A stopped (``followed``, the job followed again). Lost events: after the job ends,
the worker's own sequence numbers of the training (GetWorkerInfo) against the progress events
the store replays: missing or duplicated ones (target 0 and 0). Kill runs use the default lease
(15 s) unless ``lease_seconds`` says otherwise: the expiry is most of that figure by design.

Heartbeat: one job store (the real ``JobStore`` and ``LeaseKeeper.scan``) with 1 and with 50 of
its jobs running, on the same database: the time of one scan (renewal included) and the
database time per second that the lease thread costs (scans every second, renewal every third
of the lease).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench import common

SMALL = "synthetic:stations=4,days=30,seed=3"


def _database(folder: Path) -> tuple[str, Any]:
    """A fresh migrated database: PostgreSQL on 127.0.0.1:5432 when it answers, else SQLite."""
    try:
        import psycopg

        name = f"aqimodels_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True,
                             connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        uri = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

        def drop() -> None:
            with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:  # noqa: BLE001 - no local PostgreSQL: the replicas share a SQLite file
        uri = f"sqlite:///{folder}/durability.db"

        def drop() -> None:
            pass
    code = ("from mlflow.tracking import MlflowClient; import sys; MlflowClient(tracking_uri=sys.argv[1])"
            ".search_experiments(); from aqimodels.server.db import Database; Database(sys.argv[1]).create_tables()")
    subprocess.run([sys.executable, "-c", code, uri], check=True, capture_output=True, timeout=300,
                   env=common.base_env())
    return uri, drop


def _worker(uri: str, folder: Path) -> tuple[subprocess.Popen[Any], str]:
    port_file = folder / f"worker-{time.monotonic_ns()}.port"
    log = open(folder / "worker.log", "a")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "aqimodels.training.main", "--host", "127.0.0.1", "--port", "0",
                             "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=common.base_env(MLFLOW_TRACKING_URI=uri,
                                                                        AQIMODELS_LOG_FORMAT="json"))
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker did not start")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def _owner_and_last(uri: str, job_id: str) -> tuple[str, int]:
    import sqlalchemy as sa

    from aqimodels.server.db import job_events_table, jobs_table

    engine = sa.create_engine(uri)
    try:
        with engine.connect() as conn:
            owner = conn.execute(sa.select(jobs_table.c.owner).where(jobs_table.c.job_id == job_id)).scalar()
            last = conn.execute(sa.select(sa.func.max(job_events_table.c.sequence)).where(
                job_events_table.c.job_id == job_id)).scalar()
        return str(owner), int(last or 0)
    finally:
        engine.dispose()


def takeover_once(uri: str, folder: Path, worker: str, how: str, lease: float) -> dict[str, float]:
    import grpc

    from aqimodels.api.training.v1 import worker_pb2 as wpb
    from aqimodels.api.training.v1 import worker_pb2_grpc
    from aqimodels.client import RegistryClient

    env = {"AQIMODELS_JOB_LEASE_SECONDS": str(lease)}
    a, ta, _ = common.start_registry(uri, folder, workers=worker, **env)
    b, tb, _ = common.start_registry(uri, folder, workers=worker, **env)
    try:
        with RegistryClient(ta, timeout=60) as ca, RegistryClient(tb, timeout=60) as cb:
            deadline = time.monotonic() + 60
            while not all(w.healthy for w in ca.status().workers):
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker never turned healthy")
                time.sleep(0.2)
            params = wpb.TrainParams(max_epochs=400, early_stopping_patience=400, hidden_size=8, batch_size=256)
            stream = ca.retrain(["lstm"], dataset=SMALL, params=params)
            job_id = ""
            for ev in stream:
                job_id = ev.job_id
                if ev.progress.WhichOneof("event") == "epoch" and ev.progress.epoch.epoch >= 3:
                    break
            seen: list[tuple[float, float]] = []  # (arrival on B's watcher, registry time stamp of the event)
            follower = threading.Thread(target=lambda: seen.extend(
                (time.monotonic(), e.time.ToNanoseconds() / 1e9) for e in cb.watch_job(job_id)), daemon=True)
            follower.start()
            owner_a, _ = _owner_and_last(uri, job_id)
            time.sleep(0.3)
            stopped, stopped_wall = time.monotonic(), time.time()
            os.killpg(a.pid, signal.SIGKILL if how == "kill" else signal.SIGTERM)
            claimed = float("nan")
            while time.monotonic() - stopped < lease + 30:
                owner, _ = _owner_and_last(uri, job_id)
                if owner != owner_a:
                    claimed = time.monotonic() - stopped
                    break
                time.sleep(0.02)
            # followed again: the first event B's watcher gets that was recorded after A stopped
            # (A emits nothing after that moment: killed, or let go of its jobs at SIGTERM)
            while not any(w > stopped_wall for _, w in seen) and time.monotonic() - stopped < lease + 40:
                time.sleep(0.02)
            followed = next((t - stopped for t, w in seen if w > stopped_wall), float("nan"))
            a.wait(30)
            time.sleep(1.0)
            cb.cancel_job(job_id, reason="benchmark done")
            follower.join(60)
            with grpc.insecure_channel(worker) as channel:
                info = worker_pb2_grpc.TrainingWorkerStub(channel).GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=5)
            worker_last = next(t.last_sequence for t in info.trainings if t.job_id == job_id)
            replay = list(cb.watch_job(job_id))
            progress = [e.progress.sequence for e in replay if e.WhichOneof("event") == "progress"]
            lost = len(set(range(1, worker_last + 1)) - set(progress))
            duplicated = len(progress) - len(set(progress))
            gaps = int([e.sequence for e in replay] != list(range(1, len(replay) + 1)))
            return {"claimed_s": claimed, "followed_s": followed, "lost": float(lost), "duplicated": float(duplicated),
                    "registry_sequence_gaps": float(gaps), "events": float(len(replay))}
    finally:
        common.stop(a)
        common.stop(b)


def heartbeat_cost(uri: str, jobs: int, seconds: float = 3.0) -> dict[str, float]:
    """Time of one lease scan (with renewal) with ``jobs`` running jobs owned by this process."""
    from aqimodels.api.registry.v1 import registry_pb2 as pb
    from aqimodels.api.training.v1 import worker_pb2 as wpb
    from aqimodels.server import convert
    from aqimodels.server.db import Database, jobs_table
    from aqimodels.server.job_leases import LeaseKeeper
    from aqimodels.server.job_store import JobStore

    db = Database(uri)
    owner = uuid.uuid4().hex[:12]
    store = JobStore(db, owner, 15_000)
    ids = []
    for i in range(jobs):
        job_id = f"job-bench-{owner}-{i}"
        proto = pb.RetrainJob(job_id=job_id, model_type=wpb.MODEL_TYPE_LSTM, model_name=f"bench_{owner}_{i}",
                              state=pb.JOB_STATE_RUNNING, worker="127.0.0.1:1", epoch=7, total_epochs=50)
        proto.create_time.CopyFrom(convert.ts_from_ms(int(time.time() * 1000)))
        store.insert(proto, wpb.TrainRequest(job_id=job_id), "", {"auto_promote": False}, [])
        ids.append(job_id)
    keeper = LeaseKeeper(store, local=lambda: set(ids), adopt=lambda _j: None, let_go=lambda _j: None,
                         cancel=lambda _j, _r: None)
    scans, renews = [], []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            store.renew()
            renews.append(time.perf_counter() - t)
            keeper._last_renew = time.monotonic()  # this scan: without the renewal, measured apart
            t = time.perf_counter()
            keeper.scan()
            scans.append(time.perf_counter() - t)
    finally:
        with db.begin() as conn:
            conn.execute(jobs_table.delete().where(jobs_table.c.job_id.in_(ids)))
        db.engine.dispose()
    scan_ms, renew_ms = statistics.median(scans) * 1000, statistics.median(renews) * 1000
    # per second: one scan per scan interval (1 s at the default lease), a renewal every 5 s
    per_second = scan_ms / keeper.scan_seconds + renew_ms / (keeper.lease_seconds / 3)
    return {"scan_ms": scan_ms, "renew_ms": renew_ms, "db_ms_per_second": per_second,
            "scan_p99_ms": common.pct(scans, 0.99) * 1000}


def run(folder: Path, runs: int = 3, lease_seconds: float = 15.0) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    uri, drop = _database(folder)
    worker_proc = None
    try:
        worker_proc, worker = _worker(uri, folder)
        samples: dict[str, list[dict[str, float]]] = {"kill": [], "sigterm": []}
        for i in range(runs):
            for how in ("sigterm", "kill"):
                r = takeover_once(uri, folder, worker, how, lease_seconds)
                samples[how].append(r)
                print(f"  takeover run {i + 1} ({how}): claimed {r['claimed_s']:.2f} s, followed "
                      f"{r['followed_s']:.2f} s, lost {r['lost']:.0f}, duplicated {r['duplicated']:.0f}", flush=True)
        beats: dict[int, list[dict[str, float]]] = {1: [], 50: []}
        for _ in range(runs):
            for n in (1, 50):
                beats[n].append(heartbeat_cost(uri, n))
        print("  heartbeat: " + ", ".join(f"{n} jobs scan {v[-1]['scan_ms']:.2f} ms, "
                                          f"{v[-1]['db_ms_per_second']:.2f} ms/s" for n, v in beats.items()), flush=True)
        out: dict[str, Any] = {"backend": uri.split(":", 1)[0], "lease_seconds": lease_seconds}
        for how, v in samples.items():
            out[f"takeover_{how}"] = {k: common.figure([s[k] for s in v], u, 3) for k, u in (
                ("claimed_s", "s"), ("followed_s", "s"), ("lost", "events"), ("duplicated", "events"),
                ("registry_sequence_gaps", "jobs"), ("events", "events"))}
            out[f"takeover_{how}"]["lost_total"] = sum(s["lost"] + s["duplicated"] for s in v)
        for n, v in beats.items():
            out[f"heartbeat_{n}"] = {k: common.figure([s[k] for s in v], u, 3) for k, u in (
                ("scan_ms", "ms"), ("renew_ms", "ms"), ("db_ms_per_second", "ms/s"), ("scan_p99_ms", "ms"))}
        return out
    finally:
        common.stop(worker_proc)
        drop()
