"""Production shapes: an MLflow tracking server on PostgreSQL with proxied artifacts, several
workers sharing the load. Everything real: PostgreSQL on 127.0.0.1:5432, `mlflow server`,
registry, worker processes, all on loopback ports."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start_registry, start_worker, stop_worker, wait_for_worker
from test_retrain import SMALL

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.server.jobs import jobs_factory

FAST = wpb.TrainParams(max_epochs=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tracking_server(postgres_url: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a fresh PostgreSQL database, artifacts proxied (no shared disk)."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    with open(tmp_path / "mlflow.log", "w") as mlflow_log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", postgres_url, "--serve-artifacts",
                                 "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=mlflow_log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"mlflow server did not start: {(tmp_path / 'mlflow.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_tracking_server_mode_with_two_workers(tracking_server: str, postgres_url: str, tmp_path: Path) -> None:
    """Registry and workers on `MLFLOW_TRACKING_URI=http://...` unchanged: retrain two model types,
    promote, and load the production model by URI through the tracking server."""
    workers = []
    folders = []
    for i in range(2):
        folder = tmp_path / f"worker{i}"  # separate folders: nothing is shared on disk
        folder.mkdir()
        folders.append(folder)
        workers.append(start_worker(tracking_server, folder))
    reg = start_registry(tracking_server, database_url=postgres_url, workers=tuple(t for _, t in workers),
                         jobs_factory=jobs_factory)
    try:
        wait_for_worker(reg)
        events = list(reg.client.retrain(["xgboost", "lstm"], dataset=SMALL, params=FAST))  # type: ignore[attr-defined]
        finals = [e for e in events if e.WhichOneof("event") == "succeeded"]
        assert len(finals) == 2, [e for e in events if e.WhichOneof("event") == "ended"]
        dispatched = {e.dispatched.worker for e in events if e.WhichOneof("event") == "dispatched"}
        assert dispatched <= {t for _, t in workers}
        reg.client.promote("aqi_predictor_lstm", finals[0].succeeded.version.version  # type: ignore[attr-defined]
                           if finals[0].succeeded.version.name == "aqi_predictor_lstm"
                           else finals[1].succeeded.version.version, "production")
        code = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); "
                "m = mlflow.pyfunc.load_model('models:/aqi_predictor_lstm@production'); "
                "from aqimodels.training.data import load_dataset; import pandas as pd; "
                "f = load_dataset(sys.argv[2]).frame; f = f[f['time'] > f['time'].max() - pd.Timedelta(hours=72)]; "
                "out = m.predict(f); assert len(out) == 4 * 24 and out['pm25'].notna().all(); print('ok', len(out))")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        result = subprocess.run([sys.executable, "-c", code, tracking_server, SMALL], cwd=elsewhere,
                                capture_output=True, text=True, timeout=180, check=False,
                                env={**os.environ, "MLFLOW_TRACKING_URI": tracking_server})
        assert result.returncode == 0 and "ok 96" in result.stdout, result.stderr[-3000:]
        assert not list(tmp_path.glob("**/mlruns")), "artifacts must travel through the tracking server"
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(2)  # type: ignore[attr-defined]
        for proc, _ in workers:
            stop_worker(proc)


@pytest.mark.slow
def test_two_workers_share_four_retrains(tmp_path: Path, _sqlite_template: Path) -> None:
    """Four concurrent retrains of different models on two workers: all finish, never two at once on
    one worker, both workers train at the same time; wall time printed against the same four one
    after another."""
    shutil.copy(_sqlite_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    workers = [start_worker(uri, tmp_path) for _ in range(2)]
    reg = start_registry(uri, workers=tuple(t for _, t in workers), jobs_factory=jobs_factory)
    try:
        wait_for_worker(reg)
        # members first, so that the ensemble of the batch below has something to combine
        list(reg.client.retrain(["xgboost"], dataset=SMALL, params=FAST))  # type: ignore[attr-defined]
        import concurrent.futures

        from aqimodels.client import RegistryClient

        def one(model_type: str) -> list[pb.RetrainEvent]:
            with RegistryClient(reg.target, timeout=600) as own:
                return list(own.retrain([model_type], dataset=SMALL,
                                        params=wpb.TrainParams(max_epochs=6, early_stopping_patience=100)))

        kinds = ["xgboost", "lstm", "gnn", "ensemble"]
        started = time.monotonic()
        for kind in kinds:
            assert one(kind)[-1].WhichOneof("event") == "succeeded"
        sequential = time.monotonic() - started
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, kinds))
        wall = time.monotonic() - started
        jobs = [reg.client.get_job(events[0].job_id) for events in results]  # type: ignore[attr-defined]
        assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in jobs), [(j.model_name, j.error) for j in jobs]
        spans: dict[str, list[tuple[int, int]]] = {}
        for j in jobs:
            spans.setdefault(j.worker, []).append((j.start_time.ToNanoseconds(), j.end_time.ToNanoseconds()))
        assert len(spans) == 2  # both workers were used
        for intervals in spans.values():
            intervals.sort()
            for (_, end), (start, _) in itertools.pairwise(intervals):
                assert start >= end - 50_000_000, "two jobs overlapped on one worker"
        print(f"four retrains: one after another {sequential:.1f} s, concurrently on two workers {wall:.1f} s")
        # The two workers trained at the same time. (Wall time against the sequential run is
        # printed, not asserted: on 2 cores two CPU-bound trainings gain 0-30% depending on what
        # else runs, and a timing assertion here failed CI at 15.4 s against 13.4 s.)
        (_w1, a), (_w2, b) = spans.items()
        overlap = sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b) / 1e9
        assert overlap > 1.0, f"the two workers never trained at the same time ({overlap:.2f} s overlap)"
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(2)  # type: ignore[attr-defined]
        for proc, _ in workers:
            stop_worker(proc)


def test_the_registry_moves_on_when_a_worker_dies_before_starting(tmp_path: Path, _sqlite_template: Path) -> None:
    shutil.copy(_sqlite_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    doomed, doomed_target = start_worker(uri, tmp_path)
    live, live_target = start_worker(uri, tmp_path)
    reg = start_registry(uri, workers=(doomed_target, live_target), jobs_factory=jobs_factory)
    try:
        wait_for_worker(reg)
        doomed.kill()  # still healthy in the registry's last probe: the first in line for the next job
        doomed.wait()
        events = list(reg.client.retrain(["xgboost"], dataset=SMALL, params=FAST))  # type: ignore[attr-defined]
        assert events[-1].WhichOneof("event") == "succeeded"
        dispatched = [e.dispatched.worker for e in events if e.WhichOneof("event") == "dispatched"]
        assert dispatched[-1] == live_target
        workers = {w.target: w for w in reg.client.status().workers}  # type: ignore[attr-defined]
        assert not workers[doomed_target].healthy and workers[live_target].healthy
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]
        stop_worker(live)
