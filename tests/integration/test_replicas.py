"""Two registry replicas on one PostgreSQL-backed store: jobs, promotions and audit are shared."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import pytest
from conftest import realistic_metrics, start_registry, start_worker, stop_worker, wait_for_worker
from test_retrain import SMALL

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import FailedPreconditionError, RegistryClient, StaleVersionError
from aqimodels.server.jobs import jobs_factory

LSTM = "aqi_predictor_lstm"


@pytest.mark.slow
def test_a_job_started_on_one_replica_is_visible_from_the_other(postgres_url: str, tmp_path: Path) -> None:
    worker, target = start_worker(postgres_url, tmp_path)
    a = start_registry(postgres_url, workers=(target,), jobs_factory=jobs_factory)
    b = start_registry(postgres_url, workers=(), jobs_factory=jobs_factory)
    try:
        wait_for_worker(a)
        stream = a.client.retrain(["xgboost"], dataset=SMALL, params=wpb.TrainParams(max_epochs=3))  # type: ignore[attr-defined]
        first = next(stream)
        job_id = first.job_id
        seen_on_b = b.client.get_job(job_id)  # type: ignore[attr-defined]
        assert seen_on_b.model_name == "aqi_predictor_xgboost"
        assert seen_on_b.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
        # a watcher on the other replica follows it to the end
        watched = list(b.client.watch_job(job_id))  # type: ignore[attr-defined]
        rest = list(stream)
        assert watched[-1].WhichOneof("event") == "succeeded"
        assert [e.sequence for e in watched] == list(range(1, len(watched) + 1))
        assert watched[-1].sequence == rest[-1].sequence
        final = b.client.get_job(job_id)  # type: ignore[attr-defined]
        assert final.state == pb.JOB_STATE_SUCCEEDED and final.version == rest[-1].succeeded.version.version
        assert job_id in {j.job_id for j in b.client.list_jobs().jobs}  # type: ignore[attr-defined]
        # one running job per model across replicas: B refuses while A runs one
        slow = a.client.retrain(["xgboost"], dataset=SMALL, params=wpb.TrainParams(max_epochs=3))  # type: ignore[attr-defined]
        running = next(slow).job_id
        with pytest.raises(Exception) as info:
            list(b.client.retrain(["xgboost"], dataset=SMALL))  # type: ignore[attr-defined]
        assert info.value.code.name == "ALREADY_EXISTS" and running in str(info.value)  # type: ignore[attr-defined]
        list(slow)
    finally:
        for reg in (a, b):
            reg.client.close()  # type: ignore[attr-defined]
            reg.server.stop(1)  # type: ignore[attr-defined]
        stop_worker(worker)


def test_promotions_through_two_replicas_serialise_into_one_audit_chain(postgres_url: str) -> None:
    a = start_registry(postgres_url)
    b = start_registry(postgres_url)
    try:
        a.seed(LSTM, [realistic_metrics(i) for i in range(20)])
        barrier = threading.Barrier(20)

        def promote(version: int) -> str:
            target = (a if version % 2 else b).target
            with RegistryClient(target, timeout=120) as own:
                barrier.wait()
                try:
                    own.promote(LSTM, version, "production")
                    return "OK"
                except (StaleVersionError, FailedPreconditionError) as exc:
                    return exc.code.name

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(promote, range(1, 21)))
        assert codes.count("OK") == 20
        chain = list(reversed([e for e in a.client.iter_audit_events(model_name=LSTM)  # type: ignore[attr-defined]
                               if e.action == "PromoteModelVersion"]))
        assert len(chain) == 20
        previous = None
        for e in chain:
            assert dict(e.before)["production"] == previous
            previous = dict(e.after)["production"]
        time.sleep(a.server.config.cache_ttl_seconds)  # type: ignore[attr-defined]
        for reg in (a, b):
            production = [v.version for v in reg.client.iter_versions(LSTM, stage="production")]  # type: ignore[attr-defined]
            assert production == [int(previous)]
    finally:
        for reg in (a, b):
            reg.client.close()  # type: ignore[attr-defined]
            reg.server.stop(1)  # type: ignore[attr-defined]
