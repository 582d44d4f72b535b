"""Failure-safe changes (issue 11): promotions and rollbacks cut off between any two MLflow writes
(a failing write, and a kill -9 of the registry there), deadlines, cancellation and SIGTERM
honoured by mutations, and idempotent retries.

Real parts: in-process registries over a real MLflow store for the injected failures, and
``aqimodels serve`` processes that SIGKILL themselves at a configured write
(AQIMODELS_FAULT_POINT) and are restarted on the same store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client import RegistryClient
from aqimodels.client.errors import AqiModelsError, BackendUnavailableError
from aqimodels.server.db import Database
from aqimodels.server.domain import ARCHIVED_TAG, PREVIOUS_PRODUCTION_TAG
from aqimodels.server.jobs import jobs_factory
from aqimodels.server.mlflow_store import MlflowModelStore
from conftest import Registry, realistic_metrics, serve_process, start_registry
from test_faults import ThrowawayPostgres

PROMOTION_WRITES = 5  # previous-production tag, the alias (commit), archived + time of the old, promoted time
ROLLBACK_WRITES = 5  # the alias (commit), un-archive + promoted time of the previous, archive + time of the old


def seed_production(store: MlflowModelStore, client: RegistryClient, name: str) -> list[int]:
    """v1, v2, v3 registered; v1 then v2 promoted: production v2 (previous v1), v1 archived."""
    versions = [store.create_version(name, realistic_metrics(i)) for i in range(3)]
    client.promote(name, versions[0], "production")
    client.promote(name, versions[1], "production")
    return versions


def check_consistent(client: RegistryClient, name: str, rollback_possible: bool = True) -> dict[int, pb.ModelVersion]:
    """One production version, every replaced production version archived, rollback possible, no pending record."""
    versions = {v.version: v for v in client.iter_versions(name)}
    production = [v for v in versions.values() if v.stage == pb.STAGE_PRODUCTION]
    assert len(production) == 1, {v: pb.Stage.Name(m.stage) for v, m in versions.items()}
    prod = production[0]
    if rollback_possible:
        previous = int(prod.tags[PREVIOUS_PRODUCTION_TAG])
        assert versions[previous].stage == pb.STAGE_ARCHIVED, dict(versions[previous].tags)
    for v in versions.values():  # a version that is neither production nor archived carries no stale marks
        if v.stage == pb.STAGE_NONE:
            assert ARCHIVED_TAG not in v.tags, dict(v.tags)
    records = list(client.iter_audit_events(model_name=name))
    assert not [r for r in records if r.outcome == "pending"], [(r.action, r.outcome) for r in records]
    return versions


def rollback_works(client: RegistryClient, name: str) -> None:
    before = {v.version: v for v in client.iter_versions(name)}
    prod = next(v for v in before.values() if v.stage == pb.STAGE_PRODUCTION)
    previous = int(prod.tags[PREVIOUS_PRODUCTION_TAG])
    result = client.rollback(name, expected_current_version=prod.version)
    assert result.version.version == previous and result.replaced_version == prod.version
    after = {v.version: v for v in client.iter_versions(name)}
    assert after[previous].stage == pb.STAGE_PRODUCTION and after[prod.version].stage == pb.STAGE_ARCHIVED


def last_record(client: RegistryClient, name: str, action: str) -> pb.AuditEvent:
    return next(r for r in client.iter_audit_events(model_name=name) if r.action == action)


class Injected(BackendUnavailableError):
    pass


def fail_at(action: str, index: int) -> Any:
    def fault(at_action: str, at_index: int) -> None:
        if at_action == action and at_index == index:
            raise Injected(f"injected failure before write {index} of {action}")
    return fault


# ---- a write failing between any two writes ----

@pytest.mark.parametrize("index", range(PROMOTION_WRITES))
def test_a_promotion_failing_before_any_of_its_writes_is_recovered(sqlite_registry: Registry, index: int) -> None:
    reg, client = sqlite_registry, sqlite_registry.client
    name = "aqi_predictor_xgboost"
    _v1, v2, v3 = seed_production(reg.store, client, name)  # type: ignore[arg-type]
    reg.server.service.changes.fault = fail_at("PromoteModelVersion", index)  # type: ignore[attr-defined]
    try:
        answer: object = client.promote(name, v3, "production", expected_current_version=v2)  # type: ignore[attr-defined]
    except AqiModelsError as exc:
        answer = exc
    reg.server.service.changes.fault = None  # type: ignore[attr-defined]
    versions = check_consistent(client, name)  # type: ignore[arg-type]
    record = last_record(client, name, "PromoteModelVersion")  # type: ignore[arg-type]
    assert record.outcome == "recovered", record
    if index <= 1:  # up to the alias move: undone, and the caller told so
        assert isinstance(answer, BackendUnavailableError), answer
        assert versions[v2].stage == pb.STAGE_PRODUCTION and PREVIOUS_PRODUCTION_TAG not in versions[v3].tags
        assert record.after["recovery"]["action"] == "undone"
    else:  # after it: rolled forward, and the promotion answered as done
        assert isinstance(answer, pb.PromoteModelVersionResponse) and answer.version.version == v3, answer
        assert versions[v3].stage == pb.STAGE_PRODUCTION and versions[v2].stage == pb.STAGE_ARCHIVED
        assert record.after["recovery"]["action"] == "rolled_forward"
    rollback_works(client, name)  # type: ignore[arg-type]


@pytest.mark.parametrize("index", range(ROLLBACK_WRITES))
def test_a_rollback_failing_before_any_of_its_writes_is_recovered(sqlite_registry: Registry, index: int) -> None:
    reg, client = sqlite_registry, sqlite_registry.client
    name = "aqi_predictor_lstm"
    _v1, v2, v3 = seed_production(reg.store, client, name)  # type: ignore[arg-type]
    client.promote(name, v3, "production")  # type: ignore[attr-defined]  # production v3, previous v2
    reg.server.service.changes.fault = fail_at("RollbackModel", index)  # type: ignore[attr-defined]
    try:
        answer: object = client.rollback(name)  # type: ignore[attr-defined]
    except AqiModelsError as exc:
        answer = exc
    reg.server.service.changes.fault = None  # type: ignore[attr-defined]
    versions = check_consistent(client, name)  # type: ignore[arg-type]
    assert last_record(client, name, "RollbackModel").outcome == "recovered"  # type: ignore[arg-type]
    if index == 0:
        assert isinstance(answer, BackendUnavailableError)
        assert versions[v3].stage == pb.STAGE_PRODUCTION and versions[v2].stage == pb.STAGE_ARCHIVED
    else:
        assert isinstance(answer, pb.RollbackModelResponse) and answer.version.version == v2, answer
        assert versions[v2].stage == pb.STAGE_PRODUCTION and versions[v3].stage == pb.STAGE_ARCHIVED
    # and the model takes further changes: promote the other version
    other = v3 if versions[v2].stage == pb.STAGE_PRODUCTION else v2
    current = v2 if other == v3 else v3
    assert client.promote(name, other, "production", expected_current_version=current).version.version == other  # type: ignore[attr-defined]
    check_consistent(client, name)  # type: ignore[arg-type]


def test_an_archive_and_a_cleanup_failing_midway_are_completed(sqlite_registry: Registry) -> None:
    reg, client = sqlite_registry, sqlite_registry.client
    name = "aqi_predictor_gnn"
    v1, v2, v3, v4 = reg.seed(name, [realistic_metrics(i) for i in range(4)])
    client.promote(name, v4, "production")  # type: ignore[attr-defined]
    client.promote(name, v1, "staging")  # type: ignore[attr-defined]
    changes = reg.server.service.changes  # type: ignore[attr-defined]
    changes.fault = fail_at("PromoteModelVersion", 1)  # after the staging alias is removed
    archived = client.promote(name, v1, "archived")  # type: ignore[attr-defined]
    assert archived.version.stage == pb.STAGE_ARCHIVED
    changes.fault = fail_at("CleanupModelVersions", 1)  # after the first of two deletes
    cleaned = client.cleanup(name, versions=[v2, v3])  # type: ignore[attr-defined]
    changes.fault = None
    assert sorted(cleaned.deleted_versions) == [v2, v3]
    assert sorted(v.version for v in client.iter_versions(name)) == [v1, v4]  # type: ignore[attr-defined]
    records = list(client.iter_audit_events(model_name=name))  # type: ignore[attr-defined]
    assert [r.outcome for r in records][:2] == ["recovered", "recovered"], [(r.action, r.outcome) for r in records]
    assert not [r for r in records if r.outcome == "pending"]


# ---- kill -9 of the registry between any two writes ----

def _wait_settled(client: RegistryClient, name: str, timeout: float = 30) -> float:
    start = time.monotonic()
    while any(r.outcome == "pending" for r in client.iter_audit_events(model_name=name)):
        assert time.monotonic() - start < timeout, "the half-done change was never reconciled"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_registry_killed_between_any_two_writes_leaves_a_change_the_restart_completes_or_undoes(
        sqlite_uri: str, tmp_path: Path) -> None:
    """One registry process per fault point: each SIGKILLs itself at its write; the next one, started
    on the same store, reconciles it at start (and carries the next fault point)."""
    points = ([("PromoteModelVersion", i) for i in range(PROMOTION_WRITES)]
              + [("RollbackModel", i) for i in range(ROLLBACK_WRITES)])
    store = MlflowModelStore(sqlite_uri)
    env = {"MLFLOW_TRACKING_URI": sqlite_uri, "AQIMODELS_WORKERS": "none"}
    proc, port = serve_process(env)
    models: dict[tuple[str, int], tuple[str, list[int]]] = {}
    try:
        with RegistryClient(f"127.0.0.1:{port}", timeout=30) as client:
            for action, i in points:
                name = f"m_{action[:4].lower()}_{i}"
                versions = seed_production(store, client, name)
                if action == "RollbackModel":
                    client.promote(name, versions[2], "production")
                models[(action, i)] = (name, versions)
        proc.terminate()
        assert proc.wait(30) == 0
        previous: tuple[str, int] | None = None
        for point in points + [None]:  # type: ignore[operator]
            proc, port = serve_process({**env, "AQIMODELS_FAULT_POINT": f"{point[0]}:{point[1]}"} if point else env)
            with RegistryClient(f"127.0.0.1:{port}", timeout=30) as client:
                if previous is not None:  # the change the last process was killed in
                    name, (_v1, v2, v3) = models[previous]
                    took = _wait_settled(client, name)
                    versions = check_consistent(client, name)
                    record = last_record(client, name, previous[0])
                    assert record.outcome == "recovered", record
                    action, i = previous
                    moved = i >= 2 if action == "PromoteModelVersion" else i >= 1
                    expected = {("PromoteModelVersion", True): v3, ("PromoteModelVersion", False): v2,
                                ("RollbackModel", True): v2, ("RollbackModel", False): v3}[(action, moved)]
                    assert versions[expected].stage == pb.STAGE_PRODUCTION, (previous, record.after)
                    print(f"\n{previous}: reconciled {record.after['recovery']['action']} {took:.2f} s after start")
                if point is None:  # the last process carries no fault point: every model rolls back
                    for name, _ in models.values():
                        rollback_works(client, name)
                        check_consistent(client, name, rollback_possible=False)
                    break
                name, (_v1, v2, v3) = models[point]
                with pytest.raises(BackendUnavailableError):
                    if point[0] == "PromoteModelVersion":
                        client.promote(name, v3, "production", expected_current_version=v2)
                    else:
                        client.rollback(name, expected_current_version=v3)
            assert proc.wait(30) == -signal.SIGKILL
            # the intent left behind holds the whole plan: states before and after, every write, the commit point
            pending = Database(sqlite_uri).audit_pending(("PromoteModelVersion", "RollbackModel"))
            assert len(pending) == 1, pending
            plan = json.loads(pending[0]["after"])["plan"]
            assert len(plan["writes"]) == 5 and plan["writes"][plan["commit"]]["key"] == "production", plan
            assert plan["after"]["production"] == (v3 if point[0] == "PromoteModelVersion" else v2), plan
            previous = point
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


# ---- deadlines, cancellation and SIGTERM ----

def test_a_promotion_whose_deadline_passes_while_it_waits_for_the_lock_writes_nothing(sqlite_registry: Registry) -> None:
    reg = sqlite_registry
    name = "aqi_predictor_gnn"
    v1, = reg.seed(name, [realistic_metrics(1)])
    db = Database(reg.tracking_uri)
    impatient = RegistryClient(reg.target, timeout=1.0)
    try:
        with db.model_lock(name):
            started = time.monotonic()
            with pytest.raises(AqiModelsError) as caught:
                impatient.promote(name, v1, "staging")
            waited = time.monotonic() - started
            time.sleep(0.3)  # still holding the lock after the caller was answered
        assert caught.value.code.name == "DEADLINE_EXCEEDED" and waited < 1.5, (caught.value, waited)
        time.sleep(0.5)  # the lock is free: a promotion still waiting would now be applied
        assert reg.client.get_version(name, v1).stage == pb.STAGE_NONE  # type: ignore[attr-defined]
        assert "staging" not in MlflowModelStore(reg.tracking_uri).get_model(name).aliases
        records = list(reg.client.iter_audit_events(model_name=name))  # type: ignore[attr-defined]
        assert [r.outcome for r in records if r.action == "PromoteModelVersion"] == ["abandoned"], records
    finally:
        impatient.close()
        db.engine.dispose()


def test_a_promotion_cancelled_while_it_waits_for_the_lock_writes_nothing(sqlite_registry: Registry) -> None:
    reg = sqlite_registry
    name = "aqi_predictor_lstm"
    v1, = reg.seed(name, [realistic_metrics(1)])
    db = Database(reg.tracking_uri)
    try:
        with db.model_lock(name):
            call = reg.client._stub.PromoteModelVersion.future(  # type: ignore[attr-defined]
                pb.PromoteModelVersionRequest(name=name, version=v1, stage=pb.STAGE_STAGING), timeout=30)
            time.sleep(0.5)
            assert call.cancel()
            time.sleep(0.5)  # the handler notices the cancellation while it polls for the lock
        deadline = time.monotonic() + 5
        while True:
            records = list(reg.client.iter_audit_events(model_name=name))  # type: ignore[attr-defined]
            if records or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [(r.action, r.outcome) for r in records] == [("PromoteModelVersion", "abandoned")], records
        assert "cancelled" in records[0].message
        time.sleep(0.3)
        assert reg.client.get_version(name, v1).stage == pb.STAGE_NONE  # type: ignore[attr-defined]
    finally:
        db.engine.dispose()


def test_repeated_request_ids_return_the_first_outcome_of_promote_rollback_and_cleanup(
        sqlite_registry: Registry) -> None:
    reg, client = sqlite_registry, sqlite_registry.client
    name = "aqi_predictor_ensemble"
    v1, v2, v3, v4 = reg.seed(name, [realistic_metrics(i) for i in range(4)])
    first = client.promote(name, v1, "production", request_id="p-1")  # type: ignore[attr-defined]
    client.promote(name, v2, "production", request_id="p-2")  # type: ignore[attr-defined]
    again = client.promote(name, v1, "production", request_id="p-1")  # type: ignore[attr-defined]
    assert again.audit_event_id == first.audit_event_id and again.version.version == v1
    back = client.rollback(name, request_id="r-1")  # type: ignore[attr-defined]
    assert client.rollback(name, request_id="r-1").audit_event_id == back.audit_event_id  # type: ignore[attr-defined]
    assert client.get_version(name, v1).stage == pb.STAGE_PRODUCTION  # type: ignore[attr-defined]  # not rolled back twice
    cleaned = client.cleanup(name, keep_last=1, request_id="c-1")  # type: ignore[attr-defined]
    assert sorted(cleaned.deleted_versions) == [v2, v3], cleaned  # v4 the newest, v1 in production
    reg.seed(name, [realistic_metrics(9)])
    repeat = client.cleanup(name, keep_last=1, request_id="c-1")  # type: ignore[attr-defined]
    assert list(repeat.deleted_versions) == list(cleaned.deleted_versions)
    assert repeat.audit_event_id == cleaned.audit_event_id
    assert v4 in {v.version for v in client.iter_versions(name)}  # type: ignore[attr-defined]  # not cleaned again
    actions = [r.action for r in client.iter_audit_events(model_name=name)]  # type: ignore[attr-defined]
    assert actions.count("RollbackModel") == 1 and actions.count("CleanupModelVersions") == 1, actions


def test_a_repeated_report_performance_request_id_is_counted_once(sqlite_registry: Registry) -> None:
    reg, client = sqlite_registry, sqlite_registry.client
    name = "aqi_predictor_xgboost"
    v1, = reg.seed(name, [realistic_metrics(1)])
    client.promote(name, v1, "production")  # type: ignore[attr-defined]
    first = client.report_performance(name, v1, rmse=99.0, sample_count=500, request_id="rep-1")  # type: ignore[attr-defined]
    again = client.report_performance(name, v1, rmse=99.0, sample_count=500, request_id="rep-1")  # type: ignore[attr-defined]
    other = client.report_performance(name, v1, rmse=99.0, sample_count=500, request_id="rep-2")  # type: ignore[attr-defined]
    assert (again.health, again.ratio) == (first.health, first.ratio) and first.health == pb.MODEL_HEALTH_DEGRADED
    reports = [r for r in client.iter_audit_events(model_name=name) if r.action == "ReportPerformance"]  # type: ignore[attr-defined]
    assert len(reports) == 2 and other.health == first.health
    assert sorted(int(r.after["samples"]) for r in reports) == [500, 500]


def test_sigterm_with_a_promotion_blocked_on_the_lock_abandons_it_and_exits_within_the_grace(
        sqlite_uri: str) -> None:
    name = "aqi_predictor_xgboost"
    store = MlflowModelStore(sqlite_uri)
    version = store.create_version(name, realistic_metrics(1))
    grace = 3.0
    proc, port = serve_process({"MLFLOW_TRACKING_URI": sqlite_uri, "AQIMODELS_WORKERS": "none",
                                "AQIMODELS_SHUTDOWN_GRACE_SECONDS": str(grace)})
    db = Database(sqlite_uri)
    outcome: list[object] = []
    answered: list[float] = []
    try:
        client = RegistryClient(f"127.0.0.1:{port}", timeout=60)
        client.status()
        with db.model_lock(name):
            def promote() -> None:
                try:
                    outcome.append(client.promote(name, version, "staging"))
                except AqiModelsError as exc:
                    outcome.append(exc)
                answered.append(time.monotonic())

            thread = threading.Thread(target=promote)
            thread.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            refused: list[str] = []
            try:  # a new change during the drain does not start
                client.promote(name, version, "archived")
            except AqiModelsError as exc:
                refused.append(exc.code.name)
            thread.join(grace + 5)
            code = proc.wait(grace + 5)
            exited = time.monotonic() - signalled
            time.sleep(0.3)
        # the lock is free now: a promotion still waiting anywhere would now be applied
        time.sleep(0.5)
        print(f"\nSIGTERM: caller answered after {answered[0] - signalled:.2f} s, exit after {exited:.2f} s")
        assert code == 0 and exited < grace, exited
        assert len(outcome) == 1 and isinstance(outcome[0], AqiModelsError), outcome
        assert outcome[0].code.name == "UNAVAILABLE" and "shutting down" in outcome[0].message, outcome[0]
        assert answered[0] - signalled < grace
        assert refused == ["UNAVAILABLE"], refused
        assert "staging" not in store.get_model(name).aliases
        assert ARCHIVED_TAG not in store.get_version(name, version).tags
        client.close()
    finally:
        db.engine.dispose()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---- a private PostgreSQL cluster stopped mid-promotion, and frozen ----

def _cluster_pids(pg: ThrowawayPostgres) -> list[int]:
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True,
                              check=False).stdout.split()
    return [postmaster] + [int(c) for c in children]


def freeze(pg: ThrowawayPostgres) -> list[int]:
    """SIGSTOP of every process of the cluster (the postmaster and its backends): a stalled host."""
    pids = _cluster_pids(pg)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: list[int]) -> None:
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _timed_code(call: Any) -> tuple[str, float]:
    started = time.monotonic()
    try:
        call()
        code = "OK"
    except AqiModelsError as exc:
        code = exc.code.name
    return code, time.monotonic() - started


def test_postgres_stopped_mid_promotion_is_rolled_forward_when_it_is_back_and_a_retry_gets_the_first_outcome(
        throwaway_postgres: ThrowawayPostgres) -> None:
    pg = throwaway_postgres
    reg = start_registry(pg.url, reconcile_after_seconds=2.0)
    client: RegistryClient = reg.client  # type: ignore[assignment]
    try:
        name = "aqi_predictor_xgboost"
        _v1, _v2, v3, v4 = reg.seed(name, [realistic_metrics(i) for i in range(4)])
        client.promote(name, v3, "production")

        def stop_database(action: str, index: int) -> None:
            if action == "PromoteModelVersion" and index == 2:  # the alias has moved; the tags have not
                pg.stop()

        reg.server.service.changes.fault = stop_database  # type: ignore[attr-defined]
        with pytest.raises(BackendUnavailableError):
            client.promote(name, v4, "production", expected_current_version=v3, request_id="cut-off-1")
        reg.server.service.changes.fault = None  # type: ignore[attr-defined]
        pg.start()
        back = time.monotonic()
        while client.health() != "SERVING":
            assert time.monotonic() - back < 20
            time.sleep(0.05)
        took = _wait_settled(client, name)
        print(f"\nPostgreSQL back: the half-done promotion reconciled {time.monotonic() - back:.2f} s later")
        versions = check_consistent(client, name)
        assert versions[v4].stage == pb.STAGE_PRODUCTION and versions[v3].stage == pb.STAGE_ARCHIVED
        record = last_record(client, name, "PromoteModelVersion")
        assert record.outcome == "recovered" and record.after["recovery"]["action"] == "rolled_forward", record
        retry = client.promote(name, v4, "production", expected_current_version=v3, request_id="cut-off-1")
        assert retry.version.version == v4 and retry.audit_event_id == record.id and retry.previous_version == v3
        rollback_works(client, name)
        assert took < 20
    finally:
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_a_frozen_postgres_answers_unavailable_within_the_deadline_flips_health_and_applies_nothing_later(
        throwaway_postgres: ThrowawayPostgres) -> None:
    pg = throwaway_postgres
    reg = start_registry(pg.url, jobs_factory=jobs_factory)
    config = reg.server.config  # type: ignore[attr-defined]
    client: RegistryClient = reg.client  # type: ignore[assignment]
    deadline = 3.0
    impatient = RegistryClient(reg.target, timeout=deadline)
    pids: list[int] = []
    try:
        name = "aqi_predictor_lstm"
        v1, v2, v3 = reg.seed(name, [realistic_metrics(i) for i in range(3)])
        client.promote(name, v1, "production")
        assert client.health() == "SERVING"
        calls = {
            "GetStatus": impatient.status,
            "ListModels": impatient.list_models,
            "ListModelVersions": lambda: impatient.list_versions(name),
            "GetModelVersion": lambda: impatient.get_version(name, v1),
            "CompareModelVersions": lambda: impatient.compare(name),
            "PromoteModelVersion": lambda: impatient.promote(name, v2, "staging"),
            "PromoteToProduction": lambda: impatient.promote(name, v3, "production", expected_current_version=v1),
            "RollbackModel": lambda: impatient.rollback(name),
            "CleanupModelVersions": lambda: impatient.cleanup(name, keep_last=1),
            "ListAuditEvents": impatient.audit_events,
            "ListRetrainJobs": impatient.list_jobs,
            "GetRetrainJob": lambda: impatient.get_job("job-000000000000"),
        }
        pids = freeze(pg)
        frozen = time.monotonic()
        while client.health(timeout=1) != "NOT_SERVING":
            assert time.monotonic() - frozen < 10, "health never turned NOT_SERVING"
            time.sleep(0.02)
        flipped = time.monotonic() - frozen
        time.sleep(config.cache_ttl_seconds + 0.2)  # past the read model's bound: reads must ask the store
        with ThreadPoolExecutor(len(calls)) as pool:  # all at once, as callers would
            futures = {rpc: pool.submit(_timed_code, call) for rpc, call in calls.items()}
            results = {rpc: f.result() for rpc, f in futures.items()}
        print(f"\nfrozen: NOT_SERVING after {flipped:.2f} s (probe interval {config.health_interval_seconds} s); "
              + ", ".join(f"{rpc} {code} {t:.2f} s" for rpc, (code, t) in results.items()))
        assert flipped <= 2 * config.health_interval_seconds + 0.1, flipped
        status, _ = results.pop("GetStatus")  # GetStatus reports the outage in its backend field
        assert status == "UNAVAILABLE" or not impatient.status().backend.healthy
        assert {rpc: code for rpc, (code, _) in results.items()} == {rpc: "UNAVAILABLE" for rpc in results}
        assert max(t for _, t in results.values()) < deadline

        thaw(pids)
        pids = []
        thawed = time.monotonic()
        while not (client.health() == "SERVING"
                   and all(_timed_code(calls[r])[0] == "OK" for r in ("ListModelVersions", "ListAuditEvents"))):
            assert time.monotonic() - thawed < 30, "the registry did not recover within 30 s"
            time.sleep(0.05)
        print(f"thawed: SERVING and answering again after {time.monotonic() - thawed:.2f} s")
        time.sleep(1.0)  # anything the frozen server still held would be applied by now
        versions = {v.version: v for v in client.iter_versions(name)}
        assert versions[v1].stage == pb.STAGE_PRODUCTION and versions[v2].stage == pb.STAGE_NONE
        assert versions[v3].stage == pb.STAGE_NONE and len(versions) == 3
        records = list(client.iter_audit_events(model_name=name))
        assert not [r for r in records if r.outcome == "pending"], records
        changed = [(r.action, r.version) for r in records if r.outcome in ("ok", "recovered")]
        assert changed == [("PromoteModelVersion", v1)], changed  # only the change made before the freeze
        assert client.promote(name, v2, "production", expected_current_version=v1).version.version == v2
        check_consistent(client, name)
    finally:
        thaw(pids)
        impatient.close()
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_a_tracking_server_that_accepts_but_never_answers_is_reported_unavailable_within_the_http_timeout() -> None:
    """MLflow over REST: the configured request timeout and retries bound every call (no unbounded wait)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (the kernel does) and never answers a request
    keys = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        store = MlflowModelStore(f"http://127.0.0.1:{listener.getsockname()[1]}", http_timeout_seconds=1,
                                 http_max_retries=0)
        started = time.monotonic()
        health = store.ping()
        took = time.monotonic() - started
        assert not health.healthy and took < 5, (health, took)
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            store.list_models()
        assert time.monotonic() - started < 5
    finally:
        listener.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_more_calls_than_pooled_connections_on_a_frozen_postgres_each_answer_unavailable_within_its_deadline(
        throwaway_postgres: ThrowawayPostgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for a free pooled connection is bounded by each call's own deadline (ours and MLflow's pool).

    Both pools are made small (ours 1 + 2 overflow, MLflow's 1 + 1) and 16 calls with deadlines of
    2 and 4 s go at once: the calls that got a connection block on the frozen server, the others
    queue for the pool. Before the bound, a queued call waited SQLAlchemy's 30 s pool timeout.
    """
    pg = throwaway_postgres
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "1")  # read when the store's engine is built
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "1")
    reg = start_registry(pg.url, db_pool_size=1)
    config = reg.server.config  # type: ignore[attr-defined]
    client: RegistryClient = reg.client  # type: ignore[assignment]
    deadlines_s = (2.0, 4.0)
    callers = {d: RegistryClient(reg.target, timeout=d) for d in deadlines_s}
    pids: list[int] = []
    try:
        name = "aqi_predictor_xgboost"
        v1, _ = reg.seed(name, [realistic_metrics(i) for i in range(2)])
        client.promote(name, v1, "production")
        mlflow_pool = reg.store._client._tracking_client.store.engine.pool  # type: ignore[attr-defined]
        own_pool = reg.server.service.db.engine.pool  # type: ignore[attr-defined]
        assert (mlflow_pool.size(), own_pool.size()) == (1, 1)
        pids = freeze(pg)
        time.sleep(config.cache_ttl_seconds + 0.2)  # past the read model's bound: reads must ask the store
        calls: list[tuple[str, float, Any]] = []
        for i in range(16):
            d = deadlines_s[i % 2]
            c = callers[d]
            kind = ("ListModelVersions", "GetModelVersion", "ListAuditEvents", "ListAuditEvents")[i % 4]
            fn = {"ListModelVersions": lambda c=c: c.list_versions(name),
                  "GetModelVersion": lambda c=c: c.get_version(name, v1),
                  "ListAuditEvents": lambda c=c: c.audit_events()}[kind]
            calls.append((kind, d, fn))
        with ThreadPoolExecutor(len(calls)) as pool:
            results = [(kind, d, *f.result()) for kind, d, f in
                       [(kind, d, pool.submit(_timed_code, fn)) for kind, d, fn in calls]]
        print("\nfrozen, 16 calls on pools of 3 (ours) and 2 (MLflow's): "
              + ", ".join(f"{kind}@{d:g}s {code} {t:.2f} s" for kind, d, code, t in results))
        assert [code for *_, code, _ in results] == ["UNAVAILABLE"] * len(results), results
        late = [(kind, d, t) for kind, d, _, t in results if t >= d]
        assert not late, late
        thaw(pids)
        pids = []
        thawed = time.monotonic()
        while _timed_code(lambda: callers[4.0].list_versions(name))[0] != "OK" \
                or _timed_code(callers[4.0].audit_events)[0] != "OK":
            assert time.monotonic() - thawed < 30, "the registry did not recover within 30 s"
            time.sleep(0.05)
    finally:
        thaw(pids)
        for c in callers.values():
            c.close()
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", ["frozen", "stopped"])
def test_a_registry_started_on_a_frozen_or_stopped_postgres_exits_with_one_clear_line_within_its_start_bound(
        throwaway_postgres: ThrowawayPostgres, fault: str) -> None:
    """Start-up is bounded: MLflow's engine (and its own retry loop) never meets an unbounded connection.

    Before, MLflow built its engine in a loop of 10 attempts (102 s of back-off) around connections
    without a timeout: on a frozen database `aqimodels serve` hung (still there after 40 s).
    """
    pg = throwaway_postgres
    env = {**os.environ, "MLFLOW_TRACKING_URI": pg.url, "AQIMODELS_WORKERS": "none", "AQIMODELS_PORT": "0",
           "AQIMODELS_LOG_FORMAT": "json", "AQIMODELS_DB_CONNECT_TIMEOUT_SECONDS": "1",
           "AQIMODELS_DB_START_TIMEOUT_SECONDS": "3"}
    aqimodels = str(Path(sys.executable).with_name("aqimodels"))
    pids: list[int] = []
    if fault == "frozen":
        pids = freeze(pg)
    else:
        pg.stop()
    try:
        started = time.monotonic()
        proc = subprocess.run([aqimodels, "serve"], env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        took = time.monotonic() - started
        last = proc.stderr.strip().splitlines()[-1]
        attempts = proc.stderr.count('"database_unavailable_at_start"')
        print(f"\nstarted on a {fault} database: exit {proc.returncode} after {took:.2f} s, {attempts} retries "
              f"logged; {last}")
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert last.startswith("registry not started: the database did not answer within 3 s of start"), last
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert attempts >= 1
        # the process's own start (imports) is outside the bound; 3 s of retries + one 1 s connect inside it
        assert took < 60, took
    finally:
        thaw(pids)
        if fault == "stopped":
            pg.start()
    proc2, port = serve_process({"MLFLOW_TRACKING_URI": pg.url, "AQIMODELS_WORKERS": "none"})  # thawed: it starts
    try:
        with RegistryClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.health() == "SERVING"
    finally:
        proc2.terminate()
        proc2.wait(20)
