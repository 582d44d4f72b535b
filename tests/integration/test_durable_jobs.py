"""Durable retrain jobs (issue 11), tried as production would: separate processes, kill -9, SIGTERM.

A training belongs to its worker; a job belongs to the registry replica holding its lease, and
another replica (or the restarted one) takes it over when the owner is gone. Registries here are
real `aqimodels serve` processes with short leases; the worker is a real worker process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from conftest import serve_process, start_worker, stop_worker
from test_retrain import SMALL

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.api.training.v1 import worker_pb2_grpc
from aqimodels.client import RegistryClient
from aqimodels.server.db import jobs_table

LSTM = "aqi_predictor_lstm"
LEASE = 2.0
# An LSTM that trains for some seconds (tens of epochs on small data), so a kill lands mid-training.
SLOW = wpb.TrainParams(max_epochs=100, early_stopping_patience=100, hidden_size=8, batch_size=256)
FAST = wpb.TrainParams(max_epochs=2)


def _registry(uri: str, worker: str, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], RegistryClient]:
    proc, port = serve_process({"MLFLOW_TRACKING_URI": uri, "AQIMODELS_WORKERS": worker,
                                "AQIMODELS_JOB_LEASE_SECONDS": str(LEASE), **env}, cwd=tmp_path)
    return proc, RegistryClient(f"127.0.0.1:{port}", timeout=60)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _until_epoch(stream: Iterator[pb.RetrainEvent], epoch: int) -> list[pb.RetrainEvent]:
    seen = []
    for ev in stream:
        seen.append(ev)
        if ev.progress.WhichOneof("event") == "epoch" and ev.progress.epoch.epoch >= epoch:
            return seen
    raise AssertionError(f"the job ended before epoch {epoch}: {seen[-1] if seen else None}")


def _until_status_shows(client: RegistryClient, job_ids: list[str], timeout: float = 5) -> None:
    """Status of this replica lists exactly these running jobs, within the read model's bound (a
    replica's model list may be older than the job's first version by up to its cache bound)."""
    deadline = time.monotonic() + timeout
    while (running := [j.job_id for m in client.status().models for j in m.running_jobs]) != job_ids:
        assert time.monotonic() < deadline, running
        time.sleep(0.1)


def _wait_healthy(client: RegistryClient, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not (client.status().workers and all(w.healthy for w in client.status().workers)):
        assert time.monotonic() < deadline, client.status().workers
        time.sleep(0.2)


def _versions(uri: str, name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(int(v.version) for v in MlflowClient(tracking_uri=uri, registry_uri=uri)
                  .search_model_versions(f"name='{name}'"))


def _assert_complete(events: list[pb.RetrainEvent]) -> None:
    """1..N without gap or duplicate, and the worker's own progress numbers likewise."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    progress = [e.progress.sequence for e in events if e.WhichOneof("event") == "progress"]
    assert progress == list(range(1, len(progress) + 1)), progress


def _owner(uri: str, job_id: str) -> str:
    engine = sa.create_engine(uri)
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.select(jobs_table.c.owner).where(jobs_table.c.job_id == job_id)).scalar())
    finally:
        engine.dispose()


def test_a_training_outlives_its_stream_and_can_be_attached_and_cancelled(sqlite_uri: str) -> None:
    """The worker alone: the Train stream cancelled, the training goes on; attach after a sequence
    replays the rest and the outcome; the held training is listed; cancel stops another one."""
    from aqimodels.training.main import create_worker
    from aqimodels.training.servicer import WorkerConfig

    server, port, _ = create_worker(WorkerConfig(tracking_uri=sqlite_uri, port=0, capacity=2), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.TrainingWorkerStub(channel)
            request = wpb.TrainRequest(job_id="job-outlive", model_type=wpb.MODEL_TYPE_LSTM,
                                       dataset=wpb.DatasetSpec(spec=SMALL), params=wpb.TrainParams(max_epochs=4))
            call = stub.Train(request)
            first = [next(call), next(call)]
            call.cancel()  # the registry went away
            rest = list(stub.AttachTraining(wpb.AttachTrainingRequest(job_id="job-outlive", after_sequence=2)))
            assert [e.sequence for e in first + rest] == list(range(1, len(rest) + 3))
            assert rest[-1].WhichOneof("event") == "finished" and rest[-1].finished.version == 1
            # the outcome stays attachable, and a repeated Train is the same training, not a second one
            again = list(stub.AttachTraining(wpb.AttachTrainingRequest(job_id="job-outlive", after_sequence=0)))
            assert [e.sequence for e in again] == [e.sequence for e in first + rest]
            assert list(stub.Train(request))[-1].finished.version == 1
            info = stub.GetWorkerInfo(wpb.GetWorkerInfoRequest())
            held = {t.job_id: t for t in info.trainings}
            assert held["job-outlive"].state == wpb.TRAINING_STATE_FINISHED
            assert held["job-outlive"].last_sequence == rest[-1].sequence
            # cancel: the training stops with a `cancelled` event, nothing registered
            slow = wpb.TrainRequest(job_id="job-cancel", model_type=wpb.MODEL_TYPE_LSTM,
                                    dataset=wpb.DatasetSpec(spec=SMALL),
                                    params=wpb.TrainParams(max_epochs=500, early_stopping_patience=500))
            call = stub.Train(slow)
            next(call)
            call.cancel()
            answer = stub.CancelTraining(wpb.CancelTrainingRequest(job_id="job-cancel", reason="test"))
            assert answer.training.job_id == "job-cancel"
            tail = list(stub.AttachTraining(wpb.AttachTrainingRequest(job_id="job-cancel")))
            assert tail[-1].WhichOneof("event") == "cancelled" and tail[-1].cancelled.reason == "test"
            for rpc, req in ((stub.CancelTraining, wpb.CancelTrainingRequest(job_id="job-nope")),
                             (lambda r: list(stub.AttachTraining(r)), wpb.AttachTrainingRequest(job_id="job-nope"))):
                with pytest.raises(grpc.RpcError) as info_:
                    rpc(req)
                assert info_.value.code() == grpc.StatusCode.NOT_FOUND and "job-nope" in info_.value.details()
    finally:
        server.stop(0)


@pytest.mark.slow
def test_registry_kill_9_mid_training_the_restarted_registry_finishes_the_job(sqlite_uri: str, tmp_path: Path) -> None:
    worker, target = start_worker(sqlite_uri, tmp_path)
    first, client = _registry(sqlite_uri, target, tmp_path)
    second = None
    try:
        _wait_healthy(client)
        assert list(client.retrain(["lstm"], dataset=SMALL, params=FAST))[-1].succeeded.version.version == 1
        seen = _until_epoch(client.retrain(["lstm"], dataset=SMALL, params=SLOW), 2)
        job_id = seen[0].job_id
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        client.close()
        second, client = _registry(sqlite_uri, target, tmp_path)
        running = [j.job_id for m in client.status().models for j in m.running_jobs]
        assert running == [job_id]  # the restarted registry reports the job it is about to take over
        events = list(client.watch_job(job_id, after_sequence=0))
        assert events[-1].WhichOneof("event") == "succeeded", events[-1]
        _assert_complete(events)
        assert [e.SerializeToString() for e in events[:len(seen) - 2]] == [
            e.SerializeToString() for e in seen[:len(seen) - 2]]  # what the first one stored is kept as it was
        job = client.get_job(job_id)
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.version == 2
        assert _versions(sqlite_uri, LSTM) == [1, 2]  # exactly one version more
        assert not [j for m in client.status().models for j in m.running_jobs]
        closing = [e for e in client.iter_audit_events(model_name=LSTM)
                   if e.action == "RetrainJob" and dict(e.before)["job_id"] == job_id]
        assert len(closing) == 1 and closing[0].outcome == "ok"
        # the model is free again
        again = list(client.retrain(["lstm"], dataset=SMALL, params=FAST))
        assert again[-1].WhichOneof("event") == "succeeded"
    finally:
        client.close()
        for proc in (first, second):
            if proc is not None:
                _stop(proc)
        stop_worker(worker)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_two_replicas_the_other_takes_the_job_over(how: str, postgres_url: str, tmp_path: Path) -> None:
    worker, target = start_worker(postgres_url, tmp_path)
    a, ca = _registry(postgres_url, target, tmp_path)
    b, cb = _registry(postgres_url, target, tmp_path)
    try:
        _wait_healthy(ca)
        assert list(ca.retrain(["lstm"], dataset=SMALL, params=FAST))[-1].succeeded.version.version == 1
        stream = ca.retrain(["lstm"], dataset=SMALL, params=SLOW)
        seen = _until_epoch(stream, 2)
        job_id = seen[0].job_id
        owner_a = _owner(postgres_url, job_id)
        # B follows the job from its start while A runs it, and keeps following through the takeover
        followed: list[pb.RetrainEvent] = []
        follower = threading.Thread(target=lambda: followed.extend(cb.watch_job(job_id)), daemon=True)
        follower.start()
        _until_status_shows(cb, [job_id])  # one answer: B's status shows the job A runs
        stopped = time.monotonic()
        a.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
        while _owner(postgres_url, job_id) == owner_a:
            assert time.monotonic() - stopped < LEASE + 5, "B did not take the job over"
            time.sleep(0.05)
        taken = time.monotonic() - stopped
        if how == "SIGTERM":
            assert taken < 2.0, taken  # released at once, not expired
            assert a.wait(15) == 0
        follower.join(120)
        assert followed and followed[-1].WhichOneof("event") == "succeeded", followed[-1:]
        _assert_complete(followed)
        assert not any(e.state == pb.JOB_STATE_INTERRUPTED for e in followed)
        assert cb.get_job(job_id).state == pb.JOB_STATE_SUCCEEDED
        assert _versions(postgres_url, LSTM) == [1, 2]
        again = list(cb.retrain(["lstm"], dataset=SMALL, params=FAST))
        assert again[-1].WhichOneof("event") == "succeeded"
    finally:
        for c in (ca, cb):
            c.close()
        for proc in (a, b):
            _stop(proc)
        stop_worker(worker)


def _worker_on(uri: str, port: int) -> subprocess.Popen[bytes]:
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "aqimodels.training.main", "--host", "127.0.0.1", "--port",
                             str(port)], env={**os.environ, "MLFLOW_TRACKING_URI": uri, "AQIMODELS_LOG_FORMAT": "json"})
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_pb2_grpc.TrainingWorkerStub(channel)
        while True:
            try:
                stub.GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=1)
                return proc
            except grpc.RpcError:
                assert proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
                time.sleep(0.2)


@pytest.mark.slow
def test_a_job_whose_worker_forgot_it_ends_interrupted_with_the_reason(postgres_url: str, tmp_path: Path) -> None:
    """The owner and the worker both killed, the worker back on its address without the training:
    the replica that takes the job over ends it INTERRUPTED, says why, and closes its audit record."""
    worker, target = start_worker(postgres_url, tmp_path)
    a, ca = _registry(postgres_url, target, tmp_path)
    b = None
    try:
        _wait_healthy(ca)
        job_id = _until_epoch(ca.retrain(["lstm"], dataset=SMALL, params=SLOW), 1)[0].job_id
        a.send_signal(signal.SIGKILL)
        worker.send_signal(signal.SIGKILL)
        a.wait(10), worker.wait(10)
        ca.close()
        worker = _worker_on(postgres_url, int(target.rsplit(":", 1)[1]))
        b, cb = _registry(postgres_url, target, tmp_path)
        events = list(cb.watch_job(job_id))
        job = cb.get_job(job_id)
        assert job.state == pb.JOB_STATE_INTERRUPTED, job
        assert f"worker {target} no longer holds the training" in job.error, job.error
        assert events[-1].WhichOneof("event") == "ended" and events[-1].ended.state == pb.JOB_STATE_INTERRUPTED
        _assert_complete(events)
        closing = [e for e in cb.iter_audit_events(model_name=LSTM) if e.action == "RetrainJob"]
        assert len(closing) == 1 and closing[0].outcome == "failed" and "no longer holds" in closing[0].message
        # the model is free again
        assert list(cb.retrain(["lstm"], dataset=SMALL, params=FAST))[-1].WhichOneof("event") == "succeeded"
        cb.close()
    finally:
        for proc in (a, b):
            if proc is not None:
                _stop(proc)
        stop_worker(worker)


@pytest.mark.slow
def test_the_local_worker_killed_mid_training_fails_its_job_and_comes_back(tmp_path: Path) -> None:
    proc, port = serve_process({"AQIMODELS_JOB_LEASE_SECONDS": str(LEASE)}, cwd=tmp_path)
    client = RegistryClient(f"127.0.0.1:{port}", timeout=60)
    try:
        _wait_healthy(client)
        target = client.status().workers[0].target
        with grpc.insecure_channel(target) as channel:
            info = worker_pb2_grpc.TrainingWorkerStub(channel).GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=5)
        pid = int(info.worker_id.rsplit(":", 1)[1])
        stream = client.retrain(["lstm"], dataset=SMALL, params=SLOW)
        job_id = _until_epoch(stream, 1)[0].job_id
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rest = list(stream)
        assert time.monotonic() - killed < 10
        assert rest[-1].WhichOneof("event") == "ended" and rest[-1].ended.state == pb.JOB_STATE_FAILED
        job = client.get_job(job_id)
        assert job.state == pb.JOB_STATE_FAILED and "exited with code -9" in job.error, job.error
        _wait_healthy(client)
        worker = client.status().workers[0]
        assert worker.restarts == 1 and worker.target != target
        again = list(client.retrain(["xgboost"], dataset=SMALL, params=FAST))
        assert again[-1].WhichOneof("event") == "succeeded"
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_jobs_table_of_the_previous_release_gets_the_new_columns(tmp_path: Path) -> None:
    from aqimodels.server.db import Database

    url = f"sqlite:///{tmp_path}/old.db"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the previous release's table, with one running job in it
        conn.execute(sa.text(
            "CREATE TABLE aqimodels_jobs (job_id VARCHAR(64) PRIMARY KEY, model_type VARCHAR(32) NOT NULL, "
            "model_name VARCHAR(500) NOT NULL, state INTEGER NOT NULL, create_ms BIGINT NOT NULL, "
            "updated_ms BIGINT NOT NULL, request_id VARCHAR(200) NOT NULL, owner VARCHAR(200) NOT NULL, "
            "job BLOB NOT NULL, request BLOB NOT NULL)"))
        conn.execute(sa.text("INSERT INTO aqimodels_jobs VALUES ('job-old', 'lstm', 'aqi_predictor_lstm', 2, 1, 1, "
                             "'', 'gone', x'', x'')"))
    engine.dispose()
    for _ in range(2):  # idempotent: a second start adds nothing and fails on nothing
        db = Database(url)
        db.create_tables()
        db.engine.dispose()
    db = Database(url)
    with db.begin() as conn:
        row = conn.execute(sa.select(jobs_table).where(jobs_table.c.job_id == "job-old")).mappings().one()
    db.engine.dispose()
    assert row["lease_expires_ms"] == 0 and row["cancel_reason"] == "" and row["settings"] == "{}"
    assert row["depends_on"] == "[]"


def _in_process(uri: str, workers: tuple[str, ...]) -> Any:
    from conftest import start_registry

    from aqimodels.server.jobs import jobs_factory

    return start_registry(uri, workers=workers, jobs_factory=jobs_factory, job_lease_seconds=1.0)


def _state_becomes(client: RegistryClient, job_id: str, state: int, timeout: float = 30) -> pb.RetrainJob:
    deadline = time.monotonic() + timeout
    while (job := client.get_job(job_id)).state != state:
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def test_a_queued_job_is_taken_over_by_the_replica_that_has_a_worker(sqlite_uri: str, tmp_path: Path) -> None:
    """A job waiting for a worker on a replica that stops is continued by another, which has one."""
    worker, target = start_worker(sqlite_uri, tmp_path)
    a = _in_process(sqlite_uri, ())
    b = None
    try:
        stream = a.client.retrain(["xgboost"], dataset=SMALL, params=FAST)
        job_id = next(stream).job_id
        assert a.client.get_job(job_id).state == pb.JOB_STATE_QUEUED
        b = _in_process(sqlite_uri, (target,))
        a.server.stop(1)  # a graceful stop: the lease is released, the job is not ended
        job = _state_becomes(b.client, job_id, pb.JOB_STATE_SUCCEEDED, 90)
        assert job.worker == target and job.version == 1
        events = list(b.client.watch_job(job_id))
        _assert_complete(events)
        assert next(e.queued.reason for e in events if e.WhichOneof("event") == "queued") == "queued"
    finally:
        for reg in (a, b):
            if reg is not None:
                reg.client.close()
                reg.server.stop(0)
        stop_worker(worker)


def test_cancel_works_from_any_replica(sqlite_uri: str) -> None:
    a = _in_process(sqlite_uri, ())
    b = _in_process(sqlite_uri, ())
    try:
        job_id = next(a.client.retrain(["lstm"], dataset=SMALL, params=FAST)).job_id
        assert [j.job_id for j in b.client.list_jobs(state=pb.JOB_STATE_QUEUED).jobs] == [job_id]
        started = time.monotonic()
        job = b.client.cancel_job(job_id, reason="not today")  # B does not run it: A does
        assert job.state == pb.JOB_STATE_CANCELLED and job.error == "not today", job
        assert time.monotonic() - started < 5
        assert a.client.get_job(job_id).state == pb.JOB_STATE_CANCELLED
        cancels = [e for e in a.client.iter_audit_events(model_name=LSTM) if e.action == "CancelRetrainJob"]
        assert len(cancels) == 1
        closing = [e for e in a.client.iter_audit_events(model_name=LSTM) if e.action == "RetrainJob"]
        assert len(closing) == 1 and closing[0].outcome == "cancelled"
    finally:
        for reg in (a, b):
            reg.client.close()
            reg.server.stop(0)


def test_an_ended_training_stays_attachable_for_the_retention_time_only(sqlite_uri: str) -> None:
    from aqimodels.server.config import ConfigError
    from aqimodels.training.main import config_from_env, create_worker
    from aqimodels.training.servicer import WorkerConfig

    assert config_from_env({}).retain_seconds == 1800.0
    with pytest.raises(ConfigError, match="AQIMODELS_WORKER_RETAIN_SECONDS"):
        config_from_env({"AQIMODELS_WORKER_RETAIN_SECONDS": "0"})
    server, port, _ = create_worker(WorkerConfig(tracking_uri=sqlite_uri, port=0, retain_seconds=1.0), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.TrainingWorkerStub(channel)
            done = list(stub.Train(wpb.TrainRequest(job_id="job-brief", model_type=wpb.MODEL_TYPE_XGBOOST,
                                                    dataset=wpb.DatasetSpec(spec=SMALL), params=FAST)))
            assert done[-1].WhichOneof("event") == "finished"
            assert list(stub.AttachTraining(wpb.AttachTrainingRequest(job_id="job-brief", after_sequence=0)))
            time.sleep(1.5)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.AttachTraining(wpb.AttachTrainingRequest(job_id="job-brief")))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert not stub.GetWorkerInfo(wpb.GetWorkerInfoRequest()).trainings
    finally:
        server.stop(0)
