"""The Prometheus endpoints of the registry and the worker: real servers, real traffic, scraped over HTTP."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import Registry, realistic_metrics, start_registry
from prometheus_client.parser import text_string_to_metric_families

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.api.training.v1 import worker_pb2_grpc
from aqimodels.client import NotFoundError
from aqimodels.server.config import ConfigError, ServerConfig
from aqimodels.server.jobs import jobs_factory
from aqimodels.process.metrics import Metrics
from aqimodels.training.main import MeteredWorkerServicer, config_from_env, create_worker
from aqimodels.training.servicer import WorkerConfig

LSTM = "aqi_predictor_lstm"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def eventually(port: int, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrapes until ``check`` holds (stream RPCs are counted when their handler ends)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


@pytest.fixture
def metered_registry(sqlite_uri: str) -> Registry:
    reg = start_registry(sqlite_uri, metrics_port=0, jobs_factory=jobs_factory)
    yield reg  # type: ignore[misc]
    reg.client.close()  # type: ignore[attr-defined]
    reg.server.stop(1)  # type: ignore[attr-defined]


def test_registry_metrics_move_with_real_traffic(metered_registry: Registry) -> None:
    reg = metered_registry
    port = reg.server.metrics.port  # type: ignore[attr-defined]
    assert port > 0 and port != reg.port
    before = scrape(port)
    assert value(before, "aqimodels_rpc_requests_total", method="ListModels", code="OK") == 0
    assert value(before, "aqimodels_jobs", state="queued") == 0  # every state is exported from the start

    reg.seed(LSTM, [realistic_metrics(i) for i in range(2)])
    c = reg.client
    c.status()  # type: ignore[attr-defined]
    c.list_models()  # type: ignore[attr-defined]
    c.list_models()  # type: ignore[attr-defined]
    c.promote(LSTM, 2, "production")  # type: ignore[attr-defined]
    with pytest.raises(NotFoundError):
        c.get_version("aqi_predictor_nope", 1)  # type: ignore[attr-defined]

    # A retrain with no worker configured queues; cancelling it ends it.
    stream = c.retrain(["xgboost"], dataset="synthetic")  # type: ignore[attr-defined]
    first = next(stream)
    assert first.state == pb.JOB_STATE_QUEUED
    queued = scrape(port)
    assert value(queued, "aqimodels_jobs", state="queued") == 1
    c.cancel_job(first.job_id, "metrics test")  # type: ignore[attr-defined]
    assert any(ev.state == pb.JOB_STATE_CANCELLED for ev in stream)

    s = eventually(port, lambda s: value(s, "aqimodels_rpc_requests_total", method="Retrain", code="OK") == 1)
    def count(method: str, code: str = "OK") -> float:
        return value(s, "aqimodels_rpc_requests_total", method=method, code=code)

    assert count("GetStatus") == 1
    assert count("ListModels") == 2
    assert count("PromoteModelVersion") == 1
    assert count("GetModelVersion", "NOT_FOUND") == 1
    assert count("GetModelVersion") == 0
    assert count("CancelRetrainJob") == 1 and count("Retrain") == 1
    # the latency histogram saw the same calls, with positive durations
    assert value(s, "aqimodels_rpc_duration_seconds_count", method="ListModels", code="OK") == 2
    assert value(s, "aqimodels_rpc_duration_seconds_sum", method="ListModels", code="OK") > 0
    assert value(s, "aqimodels_rpc_duration_seconds_bucket", method="ListModels", code="OK", le="+Inf") == 2
    assert value(s, "aqimodels_rpc_duration_seconds_count", method="GetModelVersion", code="NOT_FOUND") == 1
    # jobs by state: the job moved from queued to cancelled
    assert value(s, "aqimodels_jobs", state="queued") == 0
    assert value(s, "aqimodels_jobs", state="cancelled") == 1
    # MLflow call latency, by store operation (the promotion set the production alias)
    assert total(s, "aqimodels_mlflow_call_duration_seconds_count") > 0
    assert value(s, "aqimodels_mlflow_call_duration_seconds_count", operation="set_alias") >= 1
    assert value(s, "aqimodels_mlflow_call_duration_seconds_count", operation="ping") >= 1
    assert value(s, "aqimodels_mlflow_call_duration_seconds_sum", operation="set_alias") > 0
    # and the process collectors of this registry (not the global default registry)
    assert value(s, "process_resident_memory_bytes") > 0


def test_metrics_are_off_unless_asked(sqlite_registry: Registry) -> None:
    assert sqlite_registry.server.metrics is None  # type: ignore[attr-defined]
    assert sqlite_registry.store.observer is None  # type: ignore[attr-defined]


def test_two_registries_in_one_process_keep_their_own_counts(sqlite_uri: str, tmp_path: Path) -> None:
    a = start_registry(sqlite_uri, metrics_port=0)
    b = start_registry(sqlite_uri, metrics_port=0)
    try:
        a.client.status()  # type: ignore[attr-defined]
        a.client.status()  # type: ignore[attr-defined]
        b.client.status()  # type: ignore[attr-defined]
        pa, pb_ = a.server.metrics.port, b.server.metrics.port  # type: ignore[attr-defined]
        assert pa != pb_
        assert value(scrape(pa), "aqimodels_rpc_requests_total", method="GetStatus", code="OK") == 2
        assert value(scrape(pb_), "aqimodels_rpc_requests_total", method="GetStatus", code="OK") == 1
    finally:
        for reg in (a, b):
            reg.client.close()  # type: ignore[attr-defined]
            reg.server.stop(1)  # type: ignore[attr-defined]
    with pytest.raises(OSError):  # stop() closed the endpoint
        scrape(pa)


def test_job_progress_and_training_duration_follow_the_job_events() -> None:
    """The job manager's event hook: epochs set the progress gauges, the end observes the duration."""
    m = Metrics("registry")
    job = pb.RetrainJob(job_id="job-1", model_name=LSTM, state=pb.JOB_STATE_RUNNING)
    job.start_time.FromMilliseconds(1_000_000)

    def emit(state: int, **payload: object) -> None:
        m.on_retrain_event(job, pb.RetrainEvent(job_id="job-1", state=state, **payload))  # type: ignore[arg-type]

    emit(pb.JOB_STATE_QUEUED, queued=pb.JobQueued(position=1))
    emit(pb.JOB_STATE_RUNNING, dispatched=pb.JobDispatched(worker="w1"))
    emit(pb.JOB_STATE_RUNNING, progress=wpb.TrainEvent(epoch=wpb.EpochFinished(epoch=3, total_epochs=12)))
    s = m.registry
    labels = {"job_id": "job-1", "model": LSTM}
    assert s.get_sample_value("aqimodels_job_epoch", labels) == 3
    assert s.get_sample_value("aqimodels_job_progress_ratio", labels) == pytest.approx(0.25)
    assert s.get_sample_value("aqimodels_jobs", {"state": "running"}) == 1
    job.end_time.FromMilliseconds(1_042_000)
    emit(pb.JOB_STATE_SUCCEEDED, succeeded=pb.JobSucceeded())
    assert s.get_sample_value("aqimodels_job_epoch", labels) is None  # a finished job leaves no series behind
    assert s.get_sample_value("aqimodels_jobs", {"state": "running"}) == 0
    assert s.get_sample_value("aqimodels_jobs", {"state": "succeeded"}) == 1
    d = {"model": LSTM, "state": "succeeded"}
    assert s.get_sample_value("aqimodels_training_duration_seconds_count", d) == 1
    assert s.get_sample_value("aqimodels_training_duration_seconds_sum", d) == pytest.approx(42.0)


def test_the_worker_counts_its_rpcs_and_trainings(tmp_path: Path) -> None:
    server, port, servicer = create_worker(
        WorkerConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", port=0, metrics_port=0), "127.0.0.1:0")
    assert isinstance(servicer, MeteredWorkerServicer)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.TrainingWorkerStub(channel)
            stub.GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as err:  # refused before it starts: no training counted
                list(stub.Train(wpb.TrainRequest(job_id="job-x", model_type=0), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        mport = servicer.metrics.port
        s = eventually(mport, lambda s: value(s, "aqimodels_rpc_requests_total", method="Train",
                                              code="INVALID_ARGUMENT") == 1)
        assert value(s, "aqimodels_rpc_requests_total", method="GetWorkerInfo", code="OK") == 1
        assert value(s, "aqimodels_rpc_duration_seconds_count", method="GetWorkerInfo", code="OK") == 1
        assert value(s, "aqimodels_rpc_requests_total", method="Train", code="INVALID_ARGUMENT") == 1
        assert total(s, "aqimodels_jobs") == 0
    finally:
        server.stop(1).wait()
        servicer.metrics.close()


def test_the_worker_stream_observes_progress_and_duration() -> None:
    m = Metrics("worker")
    events = [wpb.TrainEvent(started=wpb.TrainStarted(total_steps=4)),
              wpb.TrainEvent(epoch=wpb.EpochFinished(epoch=1, total_epochs=4)),
              wpb.TrainEvent(finished=wpb.TrainFinished(version=1))]
    seen = []
    for ev in m.track_training("job-9", "aqi_predictor_gnn", iter(events)):
        seen.append(ev)
        if ev.WhichOneof("event") == "epoch":
            assert m.registry.get_sample_value("aqimodels_job_progress_ratio",
                                               {"job_id": "job-9", "model": "aqi_predictor_gnn"}) == 0.25
            assert m.registry.get_sample_value("aqimodels_jobs", {"state": "running"}) == 1
    assert seen == events
    assert m.registry.get_sample_value("aqimodels_jobs", {"state": "succeeded"}) == 1
    assert m.registry.get_sample_value("aqimodels_training_duration_seconds_count",
                                       {"model": "aqi_predictor_gnn", "state": "succeeded"}) == 1


@pytest.mark.parametrize("raw", ["abc", "-1", "70000", "50051"])
def test_a_bad_metrics_port_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="AQIMODELS_METRICS_PORT"):
        ServerConfig.from_env({"AQIMODELS_METRICS_PORT": raw})


def test_metrics_port_from_the_environment() -> None:
    assert ServerConfig.from_env({}).metrics_port is None
    assert ServerConfig.from_env({"AQIMODELS_METRICS_PORT": "0"}).metrics_port is None
    assert ServerConfig.from_env({"AQIMODELS_METRICS_PORT": "9464"}).metrics_port == 9464
    assert config_from_env({"AQIMODELS_WORKER_METRICS_PORT": "9465"}).metrics_port == 9465
    assert config_from_env({}).metrics_port is None
    with pytest.raises(ConfigError, match="AQIMODELS_WORKER_METRICS_PORT"):
        config_from_env({"AQIMODELS_WORKER_METRICS_PORT": "50052"})
