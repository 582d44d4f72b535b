"""Races: concurrent promotions from separate channels (one registry, then two registry processes
on one PostgreSQL database), and idempotent retries of Promote and Retrain by request id.

Invariants after every storm: exactly one production version, an unbroken audit chain (each
successful promotion's ``before.production`` is the previous one's ``after.production``), and
every caller got success, ABORTED (stale compare-and-set) or FAILED_PRECONDITION — never
INTERNAL, UNKNOWN or UNAVAILABLE.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client import RegistryClient
from aqimodels.client.errors import AqiModelsError
from aqimodels.server.db import Database
from aqimodels.server.jobs import jobs_factory
from conftest import Registry, realistic_metrics, serve_process, start_registry

MODEL = "aqi_predictor_lstm"
CALLERS = 50
ACCEPTED = {"OK", "ABORTED", "FAILED_PRECONDITION"}
AQIMODELS = str(Path(sys.executable).with_name("aqimodels"))


def _seed_many(store: object, name: str, count: int) -> list[int]:
    return [store.create_version(name, realistic_metrics(i)) for i in range(count)]  # type: ignore[attr-defined]


def _storm(targets: Sequence[str], name: str, versions: list[int], seed: int = 1) -> Counter[str]:
    """CALLERS threads, each with its own channel, promote one distinct version each at once.

    Even callers promote plainly; odd callers read the current production version first and
    promote with compare-and-set against it (so most of them go stale and get ABORTED).
    """
    rng = random.Random(seed)
    chosen = rng.sample(versions, CALLERS)
    barrier = threading.Barrier(CALLERS)
    codes: list[str] = []
    guard = threading.Lock()

    def caller(i: int) -> None:
        with RegistryClient(targets[i % len(targets)], timeout=120) as client:
            expected: int | None = None
            if i % 2:
                prod = client.list_versions(name, stage="production").versions
                expected = prod[0].version if prod else 0
            barrier.wait(60)
            try:
                client.promote(name, chosen[i], "production", expected_current_version=expected,
                               reason=f"race caller {i}")
                code = "OK"
            except AqiModelsError as exc:
                code = exc.code.name
            except Exception as exc:  # noqa: BLE001 - anything else is a failure of the test
                code = f"{type(exc).__name__}: {exc}"
            with guard:
                codes.append(code)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(codes) == CALLERS, "some callers never returned"
    return Counter(codes)


def _check_invariants(client: RegistryClient, name: str, codes: Counter[str]) -> None:
    assert set(codes) <= ACCEPTED, codes
    assert codes["OK"] >= CALLERS // 2, codes  # every plain promotion of a distinct version succeeds
    prod = [v.version for v in client.iter_versions(name, stage="production")]
    assert len(prod) == 1, prod
    events = sorted((e for e in client.iter_audit_events(model_name=name)
                     if e.action == "PromoteModelVersion" and e.outcome == "ok"), key=lambda e: e.sequence)
    assert len(events) == codes["OK"]
    assert all(e.outcome != "pending" for e in client.iter_audit_events(model_name=name))
    previous = None
    for e in events:
        before = e.before.fields["production"]
        before_value = None if before.HasField("null_value") else int(before.number_value)
        assert before_value == previous, f"audit chain broken at sequence {e.sequence}"
        previous = int(e.after.fields["production"].number_value)
        assert previous == e.version
    assert previous == prod[0]
    archived = {v.version for v in client.iter_versions(name, stage="archived")}
    assert {e.version for e in events} - {prod[0]} <= archived


def test_fifty_concurrent_promotions_leave_one_production_and_an_unbroken_audit_chain(registry: Registry) -> None:
    versions = _seed_many(registry.store, MODEL, CALLERS)
    started = time.perf_counter()
    codes = _storm([registry.target], MODEL, versions)
    print(f"\n{registry.tracking_uri.split(':')[0]}: {CALLERS} promotions in "
          f"{time.perf_counter() - started:.2f} s: {dict(codes)}")
    _check_invariants(registry.client, MODEL, codes)  # type: ignore[arg-type]


# ---- two registry processes on one PostgreSQL database ----

def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    return serve_process({"AQIMODELS_WORKERS": "none", **env})


@pytest.fixture
def two_registries(postgres_url: str) -> Iterator[tuple[str, list[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        ports = []
        for _ in range(2):
            proc, port = _serve({"MLFLOW_TRACKING_URI": postgres_url})
            procs.append(proc)
            ports.append(port)
        yield postgres_url, [f"127.0.0.1:{p}" for p in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_two_registry_processes_on_one_postgres_database_serialise_promotions(
        two_registries: tuple[str, list[str]]) -> None:
    url, targets = two_registries
    reg = start_registry(url)  # only to seed through the adapter; promotions go to the two processes
    try:
        versions = _seed_many(reg.store, MODEL, CALLERS)
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(0)  # type: ignore[attr-defined]
    started = time.perf_counter()
    codes = _storm(targets, MODEL, versions, seed=2)
    print(f"\ntwo processes: {CALLERS} promotions in {time.perf_counter() - started:.2f} s: {dict(codes)}")
    with RegistryClient(targets[0], timeout=60) as client:
        _check_invariants(client, MODEL, codes)
        # Who wins the storm is a matter of timing: stage two versions it left outside production
        # and staging
        # (a production version cannot be sent to staging, which is not what this part tests).
        idle = [v.version for v in client.iter_versions(MODEL)
                if v.stage not in (pb.STAGE_PRODUCTION, pb.STAGE_STAGING)]

    # The lock is the database's: while this (third) process holds the model's advisory lock, a
    # promotion on either registry process waits, and it proceeds as soon as the lock is freed.
    db = Database(url)
    results: list[str] = []
    try:
        failures: list[str] = []
        with db.model_lock(MODEL):
            def promote(target: str, version: int) -> None:
                try:
                    with RegistryClient(target, timeout=60) as client:
                        client.promote(MODEL, version, "staging")
                        results.append(target)
                except Exception as exc:  # noqa: BLE001 - reported below, with the target
                    failures.append(f"{target}: {type(exc).__name__}: {exc}")

            waiting = [threading.Thread(target=promote, args=(t, v)) for t, v in zip(targets, idle[:2], strict=True)]
            for t in waiting:
                t.start()
            time.sleep(1.5)
            assert results == [], "a promotion went ahead while another process held the model's lock"
        for t in waiting:
            t.join(30)
        assert failures == []
        assert sorted(results) == sorted(targets)
    finally:
        db.engine.dispose()


# ---- idempotency ----

def test_a_repeated_promote_request_id_returns_the_first_result(registry: Registry) -> None:
    v1, v2 = registry.seed(MODEL, [realistic_metrics(1), realistic_metrics(2)])
    client: RegistryClient = registry.client  # type: ignore[assignment]
    request_id = uuid.uuid4().hex
    first = client.promote(MODEL, v1, "production", request_id=request_id)
    client.promote(MODEL, v2, "production")  # production moves on
    again = client.promote(MODEL, v1, "production", request_id=request_id)
    assert again.audit_event_id == first.audit_event_id
    assert again.previous_version == first.previous_version == 0
    assert again.version.version == v1
    assert [v.version for v in client.iter_versions(MODEL, stage="production")] == [v2]  # not acted twice
    events = [e for e in client.iter_audit_events(model_name=MODEL) if e.action == "PromoteModelVersion"]
    assert len(events) == 2
    # concurrent retries of one request id: one promotion, every caller gets the same answer
    v3, = registry.seed(MODEL, [realistic_metrics(3)])
    request_id = uuid.uuid4().hex
    answers: list[str] = []

    def retry() -> None:
        with RegistryClient(registry.target, timeout=60) as c:
            answers.append(c.promote(MODEL, v3, "production", request_id=request_id).audit_event_id)

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 8 and len(set(answers)) == 1
    events = [e for e in client.iter_audit_events(model_name=MODEL) if e.action == "PromoteModelVersion"]
    assert len(events) == 3


def test_a_repeated_retrain_request_id_streams_the_first_jobs(sqlite_uri: str) -> None:
    # No worker: the jobs stay queued, which is all this test needs to see them not doubled.
    reg = start_registry(sqlite_uri, jobs_factory=jobs_factory)
    client: RegistryClient = reg.client  # type: ignore[assignment]
    try:
        request_id = uuid.uuid4().hex
        first_stream = client.retrain(["xgboost", "lstm"], dataset="synthetic", request_id=request_id)
        first = {next(first_stream).job_id, next(first_stream).job_id}
        first_stream.close()
        # sequential retry, then concurrent retries: all get the first request's jobs
        again_stream = client.retrain(["xgboost", "lstm"], dataset="synthetic", request_id=request_id)
        again = {next(again_stream).job_id, next(again_stream).job_id}
        again_stream.close()
        assert again == first
        seen: list[set[str]] = []
        errors: list[BaseException] = []

        def retry() -> None:
            try:
                with RegistryClient(reg.target, timeout=60) as c:
                    s = c.retrain(["xgboost", "lstm"], dataset="synthetic", request_id=request_id)
                    seen.append({next(s).job_id, next(s).job_id})
                    s.close()
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread that joins
                errors.append(exc)

        threads = [threading.Thread(target=retry) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert all(s == first for s in seen) and len(seen) == 6
        jobs = client.list_jobs(page_size=100).jobs
        assert {j.job_id for j in jobs} == first
        audit = [e for e in client.iter_audit_events() if e.action == "Retrain"]
        assert len(audit) == 2
        for job_id in first:
            assert client.cancel_job(job_id, "test over").state == pb.JOB_STATE_CANCELLED
    finally:
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_concurrent_first_retrains_with_one_request_id_create_the_jobs_once(sqlite_uri: str) -> None:
    """The first call and its retry race (the client retried before any answer): one set of jobs."""
    reg = start_registry(sqlite_uri, jobs_factory=jobs_factory)
    try:
        request_id = uuid.uuid4().hex
        seen: list[str] = []
        barrier = threading.Barrier(6)

        def call() -> None:
            with RegistryClient(reg.target, timeout=60) as c:
                barrier.wait(30)
                try:
                    s = c.retrain(["gnn"], dataset="synthetic", request_id=request_id)
                    seen.append(next(s).job_id)
                    s.close()
                except AqiModelsError as exc:
                    seen.append(exc.code.name)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(seen) == 6 and len(set(seen)) == 1 and seen[0].startswith("job-"), seen
        assert len(reg.client.list_jobs().jobs) == 1  # type: ignore[attr-defined]
        reg.client.cancel_job(seen[0])  # type: ignore[attr-defined]
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


