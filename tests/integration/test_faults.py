"""Faults: a worker killed mid-training, the registry stopped during a retrain, the MLflow database
gone and back, and a client deadline passing on a retrain stream.

Real processes throughout: training workers are ``python -m aqimodels.training.main``
subprocesses, the restarted registry is ``aqimodels serve``, and the unreachable database is a
throwaway PostgreSQL cluster of this test's own, stopped and started again with ``pg_ctl``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import RegistryClient
from aqimodels.client.errors import AqiModelsError, DeadlineExceededError, NotFoundError
from aqimodels.server.db import Database
from aqimodels.server.jobs import jobs_factory
from conftest import realistic_metrics, serve_process, start_registry
from grpc_health.v1 import health_pb2, health_pb2_grpc

SMALL = "synthetic:stations=4,days=30,seed=3"
SLOW = wpb.TrainParams(max_epochs=500, early_stopping_patience=500)
FAST = wpb.TrainParams(max_epochs=2)
AQIMODELS = str(Path(sys.executable).with_name("aqimodels"))
PG_BIN = Path("/usr/lib/postgresql/15/bin")


# ---- helpers ----

def start_workers(tracking_uri: str, folder: Path, count: int) -> list[tuple[subprocess.Popen[bytes], str]]:
    """Starts ``count`` worker processes at once and waits for all their ports."""
    started = []
    for i in range(count):
        port_file = folder / f"worker-{i}-{time.monotonic_ns()}.port"
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "AQIMODELS_LOG_FORMAT": "json"}
        proc = subprocess.Popen([sys.executable, "-m", "aqimodels.training.main", "--host", "127.0.0.1", "--port",
                                 "0", "--port-file", str(port_file)], env=env, stderr=subprocess.DEVNULL)
        started.append((proc, port_file))
    out = []
    deadline = time.monotonic() + 120
    for proc, port_file in started:
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        out.append((proc, f"127.0.0.1:{port_file.read_text().strip()}"))
    return out


def stop_process(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_healthy_workers(client: RegistryClient, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = client.status().workers
        if len(workers) == count and all(w.healthy for w in workers):
            return
        time.sleep(0.2)
    raise AssertionError(f"workers never all turned healthy: {client.status().workers}")


def serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    return serve_process(env)


def run_status(tracking_uri: str, run_id: str, wanted: str, timeout: float = 20) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    deadline = time.monotonic() + timeout
    status = client.get_run(run_id).info.status
    while status != wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client.get_run(run_id).info.status
    return status


@pytest.fixture
def store(tmp_path: Path, _sqlite_template: Path) -> str:
    shutil.copy(_sqlite_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


# ---- a worker killed mid-training ----

def test_a_worker_killed_mid_training_fails_the_job_and_a_live_worker_takes_the_next(store: str,
                                                                                    tmp_path: Path) -> None:
    workers = start_workers(store, tmp_path, 2)
    by_target = {target: proc for proc, target in workers}
    reg = start_registry(store, workers=tuple(by_target), jobs_factory=jobs_factory)
    client: RegistryClient = reg.client  # type: ignore[assignment]
    try:
        wait_healthy_workers(client, 2)
        stream = client.retrain(["lstm"], dataset=SMALL, params=SLOW)
        job_id = victim = ""
        for ev in stream:
            job_id = ev.job_id
            if ev.WhichOneof("event") == "dispatched":
                victim = ev.dispatched.worker
            if ev.progress.WhichOneof("event") == "epoch":
                break
        assert victim in by_target
        killed = time.monotonic()
        by_target[victim].send_signal(signal.SIGKILL)
        rest = list(stream)
        failed_after = time.monotonic() - killed
        print(f"\nSIGKILL -> job FAILED in {failed_after:.2f} s")
        assert rest[-1].WhichOneof("event") == "ended" and rest[-1].ended.state == pb.JOB_STATE_FAILED
        assert failed_after < 10
        job = client.get_job(job_id)
        assert job.state == pb.JOB_STATE_FAILED and victim in job.error and job.run_id, job.error
        assert run_status(store, job.run_id, "FAILED") == "FAILED"
        with pytest.raises(NotFoundError):
            client.list_versions("aqi_predictor_lstm")
        # the registry keeps serving, and the live worker takes the next retrain of the same model
        assert client.health() == "SERVING" and client.status().backend.healthy
        events = list(client.retrain(["lstm"], dataset=SMALL, params=FAST))
        assert events[-1].WhichOneof("event") == "succeeded", events[-1]
        dispatched = [e.dispatched.worker for e in events if e.WhichOneof("event") == "dispatched"]
        assert dispatched and dispatched[-1] != victim
        assert [v.version for v in client.iter_versions("aqi_predictor_lstm")] == [1]
    finally:
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]
        for proc, _ in workers:
            stop_process(proc)


# ---- the registry stopped with SIGTERM during a retrain ----

def test_sigterm_during_a_retrain_drains_and_the_restarted_registry_continues_the_job(
        store: str, tmp_path: Path) -> None:
    (worker, target), = start_workers(store, tmp_path, 1)
    from aqimodels.server.mlflow_store import MlflowModelStore

    version = MlflowModelStore(store).create_version("aqi_predictor_xgboost", realistic_metrics(1))
    env = {"MLFLOW_TRACKING_URI": store, "AQIMODELS_WORKERS": target, "AQIMODELS_SHUTDOWN_GRACE_SECONDS": "10"}
    first, port = serve(env)
    second = None
    db = Database(store)
    try:
        client = RegistryClient(f"127.0.0.1:{port}", timeout=60)
        wait_healthy_workers(client, 1)
        events: list[pb.RetrainEvent] = []
        epoch = threading.Event()

        def follow() -> None:
            try:
                for ev in client.retrain(["lstm"], dataset=SMALL, params=SLOW):
                    events.append(ev)
                    if ev.progress.WhichOneof("event") == "epoch":
                        epoch.set()
            except AqiModelsError as exc:
                events.append(exc)  # type: ignore[arg-type]

        threading.Thread(target=follow, daemon=True).start()
        assert epoch.wait(120), events
        job_id = events[0].job_id

        statuses: list[str] = []
        watch = health_pb2_grpc.HealthStub(client._channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)

        def watch_health() -> None:
            try:
                for reply in watch:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.RpcError:
                pass

        threading.Thread(target=watch_health, daemon=True).start()
        # An in-flight unary call: a promotion held up by the model's lock (taken here, in a
        # third process's connection) when SIGTERM arrives.
        outcome: list[object] = []
        with db.model_lock("aqi_predictor_xgboost"):
            def promote() -> None:
                try:
                    outcome.append(client.promote("aqi_predictor_xgboost", version, "staging"))
                except AqiModelsError as exc:
                    outcome.append(exc)

            inflight = threading.Thread(target=promote)
            inflight.start()
            time.sleep(0.5)
            first.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while "NOT_SERVING" not in statuses and time.monotonic() < deadline:
                time.sleep(0.05)
            assert statuses[:1] == ["SERVING"] and "NOT_SERVING" in statuses, statuses
            assert outcome == []
            time.sleep(0.5)
        inflight.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], pb.PromoteModelVersionResponse), outcome
        assert first.wait(30) == 0
        # SIGTERM released the job's lease instead of ending it: the training goes on on its worker
        assert not [e for e in events if isinstance(e, pb.RetrainEvent) and e.state == pb.JOB_STATE_INTERRUPTED]
        client.close()

        second, port2 = serve({**env, "AQIMODELS_WORKERS": "none"})
        with RegistryClient(f"127.0.0.1:{port2}", timeout=60) as again:
            # the restarted registry took the job over and follows it (its worker is not even in its list)
            start = again.get_job(job_id)
            assert start.state == pb.JOB_STATE_RUNNING, start
            deadline = time.monotonic() + 60
            while again.get_job(job_id).epoch <= start.epoch:
                assert time.monotonic() < deadline, again.get_job(job_id)
                time.sleep(0.2)
            job = again.cancel_job(job_id, reason="test over")
            assert job.state == pb.JOB_STATE_CANCELLED and job.error == "test over", job
            assert again.get_version("aqi_predictor_xgboost", version).stage == pb.STAGE_STAGING
    finally:
        db.engine.dispose()
        for proc in (first, second, worker):
            if proc is not None:
                stop_process(proc)


# ---- the MLflow database unreachable, then back ----

class ThrowawayPostgres:
    """A PostgreSQL cluster of this test's own on a free port, stopped and started at will."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="aqimodels-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self._su(f"{PG_BIN}/initdb -D {self.data} -U postgres --auth=trust -E UTF8 >/dev/null")
        for _ in range(10):
            self.port = random.randint(40000, 60000)
            try:
                self.start()
                break
            except subprocess.CalledProcessError:
                continue
        else:
            raise RuntimeError("no port for the throwaway PostgreSQL cluster")
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-qc",
                        "CREATE DATABASE mlflow"], check=True, capture_output=True)
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mlflow"

    def _su(self, command: str) -> None:
        subprocess.run(["su", "postgres", "-c", command], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._su(f"{PG_BIN}/pg_ctl -D {self.data} -o '-p {self.port} -k {self.dir} "
                 f"-c listen_addresses=127.0.0.1' -l {self.dir}/pg.log -w start")

    def stop(self) -> None:
        self._su(f"{PG_BIN}/pg_ctl -D {self.data} -m fast -w stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _code(call: object) -> str:
    try:
        call()  # type: ignore[operator]
        return "OK"
    except AqiModelsError as exc:
        return exc.code.name


def test_an_unreachable_database_answers_unavailable_and_both_recover_without_a_restart(
        throwaway_postgres: ThrowawayPostgres) -> None:
    pg = throwaway_postgres
    reg = start_registry(pg.url, jobs_factory=jobs_factory)
    client: RegistryClient = reg.client  # type: ignore[assignment]
    try:
        name = "aqi_predictor_xgboost"
        v1, v2 = reg.seed(name, [realistic_metrics(1), realistic_metrics(2)])
        assert client.health() == "SERVING"
        client.promote(name, v1, "production")
        calls = {
            "GetStatus": client.status,
            "ListModels": client.list_models,
            "ListModelVersions": lambda: client.list_versions(name),
            "GetModelVersion": lambda: client.get_version(name, v1),
            "CompareModelVersions": lambda: client.compare(name),
            "PromoteModelVersion": lambda: client.promote(name, v2, "staging"),
            "RollbackModel": lambda: client.rollback(name),
            "CleanupModelVersions": lambda: client.cleanup(name, keep_last=1, dry_run=True),
            "ListAuditEvents": client.audit_events,
            "ListRetrainJobs": client.list_jobs,
            "GetRetrainJob": lambda: client.get_job("job-000000000000"),
            "Retrain": lambda: next(iter(client.retrain(["xgboost"], dataset=SMALL))),
        }
        pg.stop()
        stopped = time.monotonic()
        while client.health() != "NOT_SERVING":
            assert time.monotonic() - stopped < 10, "health never turned NOT_SERVING"
            time.sleep(0.1)
        not_serving_after = time.monotonic() - stopped
        time.sleep(reg.server.config.cache_ttl_seconds + 0.2)  # type: ignore[attr-defined]
        codes = {rpc: _code(call) for rpc, call in calls.items()}
        print(f"\ndatabase down: NOT_SERVING after {not_serving_after:.2f} s; codes {codes}")
        # GetStatus reports the outage itself (its backend field) rather than failing
        status = codes.pop("GetStatus")
        assert status == "UNAVAILABLE" or not client.status().backend.healthy
        assert set(codes.values()) == {"UNAVAILABLE"}, codes
        # The CLI tells a registry whose database is down from a registry that does not answer,
        # and a status with the backend down exits non-zero (issue 13).
        from aqimodels.client.cli import app as cli_app
        from typer.testing import CliRunner

        cli = CliRunner()
        shown = cli.invoke(cli_app, ["--target", reg.target, "status"])
        assert shown.exit_code == 1, shown.output
        assert "UNHEALTHY" in shown.stdout or "answers, but its backend does not" in shown.stderr, shown.output
        listed = cli.invoke(cli_app, ["--target", reg.target, "list"])
        assert listed.exit_code == 1, listed.output  # (the in-process server's own MLflow log lines share stderr)
        assert f"UNAVAILABLE: the registry at {reg.target} answers, but its backend does not" in listed.stderr
        assert "make run" not in listed.stderr

        pg.start()
        back = time.monotonic()
        while True:
            ok = client.health() == "SERVING" and all(_code(calls[r]) == "OK" for r in
                                                      ("ListModels", "ListModelVersions", "GetModelVersion"))
            if ok:
                break
            assert time.monotonic() - back < 30, "the registry did not recover within 30 s"
            time.sleep(0.1)
        recovered = time.monotonic() - back
        print(f"database back: SERVING and answering again after {recovered:.2f} s")
        assert client.promote(name, v2, "production", expected_current_version=v1).version.version == v2
        assert client.status().backend.healthy
    finally:
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]


# ---- a client deadline on a retrain stream ----

def test_a_retrain_stream_past_its_deadline_is_cancelled_and_the_job_goes_on(store: str, tmp_path: Path) -> None:
    (worker, target), = start_workers(store, tmp_path, 1)
    reg = start_registry(store, workers=(target,), jobs_factory=jobs_factory)
    client: RegistryClient = reg.client  # type: ignore[assignment]
    try:
        wait_healthy_workers(client, 1)
        seen: list[pb.RetrainEvent] = []
        with pytest.raises(DeadlineExceededError):
            for ev in client.retrain(["lstm"], dataset=SMALL, params=wpb.TrainParams(max_epochs=6), timeout=1.5):
                seen.append(ev)
        assert seen, "no event arrived before the deadline"
        job_id = seen[0].job_id
        rest = list(client.watch_job(job_id, after_sequence=seen[-1].sequence, timeout=120))
        assert rest[-1].WhichOneof("event") == "succeeded", rest[-1]
        assert client.get_job(job_id).state == pb.JOB_STATE_SUCCEEDED
    finally:
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]
        stop_process(worker)
