"""`AQIMODELS_WORKERS=dns:///name:port`: every address the name resolves to becomes a worker."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import start_registry, start_worker, stop_worker
from test_retrain import SMALL

from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.server.jobs import JobManager
from aqimodels.server.workers import WorkerPool, resolve_dns


def test_resolve_dns_gives_one_target_per_address() -> None:
    targets = resolve_dns("localhost", 50052)
    assert "127.0.0.1:50052" in targets
    assert all(t.endswith(":50052") for t in targets)


def test_workers_behind_a_dns_name_join_and_leave(sqlite_uri: str, tmp_path: Path) -> None:
    started = [start_worker(sqlite_uri, tmp_path) for _ in range(2)]
    answers = [t for _, t in started]
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:  # what a headless Service's DNS would answer
        asked.append((host, port))
        return list(answers)

    def factory(config, service, db):  # type: ignore[no-untyped-def]
        pool = WorkerPool(config, probe_interval=0.3, resolver=resolver)
        return JobManager(config, service, db, pool), pool

    reg = start_registry(sqlite_uri, workers=("dns:///aqimodels-worker.aqimodels.svc:50052",), jobs_factory=factory)
    try:
        deadline = time.monotonic() + 30
        while sum(w.healthy for w in reg.client.status().workers) < 2:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, reg.client.status().workers  # type: ignore[attr-defined]
            time.sleep(0.2)
        assert asked[0] == ("aqimodels-worker.aqimodels.svc", 50052)
        assert {w.target for w in reg.client.status().workers} == set(answers)  # type: ignore[attr-defined]
        events = list(reg.client.retrain(["xgboost"], dataset=SMALL, params=wpb.TrainParams(max_epochs=2)))  # type: ignore[attr-defined]
        assert events[-1].WhichOneof("event") == "succeeded"
        answers.pop()  # one pod goes away
        deadline = time.monotonic() + 10
        while len(reg.client.status().workers) != 1:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]
        for proc, _ in started:
            stop_worker(proc)
