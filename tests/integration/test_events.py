"""Registry events and points in time, end to end on real registries over real MLflow stores.

Promotions, a rollback, a cleanup, a retrain by a real worker process and a degradation alert give
their typed events in order; a watcher that disconnects and resumes with ``after_sequence`` sees
every event once; a second replica on PostgreSQL streams the same events; changes on two replicas
at once number their events without a gap; GetModelVersion at a time answers from the history.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import RegistryClient
from aqimodels.client.cli import app
from aqimodels.client.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from aqimodels.server.events import EventLog, events_table
from conftest import Registry, realistic_metrics, registry_with_worker, start_registry
from test_readme import README_TARGET
from test_readme import blocks as readme_blocks
from test_retrain import SMALL
from typer.testing import CliRunner

M = "events_model"
XGB = "aqi_predictor_xgboost"
T = pb.RegistryEventType


def _stop(reg: Registry) -> None:
    reg.client.close()
    reg.server.stop(1)


def _stored(reg: Registry, after: int = 0, **filters: object) -> list[pb.RegistryEvent]:
    return list(reg.client.watch_events(after, follow=False, **filters))


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def _server_logs_stay_out_of_cli_output() -> Iterator[None]:
    """The in-process server logs to the sys.stdout of the moment, which CliRunner swaps for its capture."""
    with structlog.testing.capture_logs():
        yield


class Watcher:
    """Follows WatchRegistryEvents in a thread, collecting what arrives."""

    def __init__(self, target: str, after: int = 0, **filters: object) -> None:
        self.events: list[pb.RegistryEvent] = []
        self.client = RegistryClient(target, timeout=60)
        self.stream = self.client.watch_events(after, **filters)  # type: ignore[arg-type]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.stream:
                self.events.append(event)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_for(self, count: int) -> list[pb.RegistryEvent]:
        _wait_until(lambda: len(self.events) >= count or self.error is not None, f"{count} events")
        assert self.error is None, self.error
        return self.events

    def close(self) -> None:
        self.client.close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def with_worker(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> Iterator[Registry]:
    yield from registry_with_worker(tmp_path_factory.mktemp("events"), _sqlite_template)


def test_changes_give_their_typed_events_in_order(with_worker: Registry) -> None:
    reg, c = with_worker, with_worker.client
    reg.seed(M, [{**realistic_metrics(i), "rmse": 10.0 + i} for i in range(4)])
    start = c.promote(M, 1, "staging")
    c.promote(M, 1, "production")
    c.promote(M, 2, "staging")
    second = c.promote(M, 2, "production")
    rollback = c.rollback(M, reason="v2 misbehaves")
    # refused, dry-run and nothing-to-do records are no events
    with pytest.raises(FailedPreconditionError):
        c.promote(M, 1, "production")
    c.cleanup(M, versions=[3, 4], dry_run=True)
    cleanup = c.cleanup(M, versions=[3, 4])
    assert list(cleanup.deleted_versions) == [3, 4]
    retrain = list(c.retrain(["xgboost"], dataset=SMALL, params=wpb.TrainParams(max_epochs=3)))
    job = retrain[-1].succeeded.version
    # the model in production turns DEGRADED: live rmse 20 over 200 samples is 2x its test rmse 10
    assert c.report_performance(M, 1, rmse=20.0, mae=14.0, sample_count=200).health == pb.MODEL_HEALTH_DEGRADED

    events = [e for e in _stored(reg) if e.model_name in (M, XGB)]
    assert [e.sequence for e in _stored(reg)] == list(range(1, len(_stored(reg)) + 1))  # gap-free from 1
    got = [(T.Name(e.type).removeprefix("REGISTRY_EVENT_TYPE_"), e.model_name, e.version) for e in events]
    assert got == [
        ("STAGE_CHANGED", M, 1), ("STAGE_CHANGED", M, 1), ("STAGE_CHANGED", M, 2), ("STAGE_CHANGED", M, 2),
        ("ROLLBACK", M, 1), ("VERSION_DELETED", M, 3), ("VERSION_DELETED", M, 4),
        ("VERSION_REGISTERED", XGB, job.version), ("RETRAIN_JOB_ENDED", XGB, job.version),
        ("ALERT_RAISED", M, 1), ("MODEL_HEALTH_CHANGED", M, 1)]
    to_staging, to_production, v2_staging, v2_production, back = events[:5]
    assert (to_staging.from_stage, to_staging.to_stage) == (pb.STAGE_NONE, pb.STAGE_STAGING)
    assert (to_production.from_stage, to_production.to_stage) == (pb.STAGE_STAGING, pb.STAGE_PRODUCTION)
    assert list(to_production.replaced_versions) == [] and list(v2_staging.replaced_versions) == []
    assert (v2_production.from_stage, v2_production.to_stage) == (pb.STAGE_STAGING, pb.STAGE_PRODUCTION)
    assert list(v2_production.replaced_versions) == [1] and list(v2_production.archived_versions) == [1]
    assert (back.from_stage, back.to_stage) == (pb.STAGE_ARCHIVED, pb.STAGE_PRODUCTION)
    assert list(back.replaced_versions) == [2] and list(back.archived_versions) == [2]
    assert to_staging.audit_event_id == start.audit_event_id and v2_production.audit_event_id == second.audit_event_id
    assert back.audit_event_id == rollback.audit_event_id and back.details["to_stage"] == "production"
    registered, ended, alert, health = events[7:]
    assert registered.job_id == ended.job_id == retrain[-1].job_id and ended.job_state == pb.JOB_STATE_SUCCEEDED
    assert alert.health == pb.MODEL_HEALTH_DEGRADED and alert.alert_id
    assert health.health == pb.MODEL_HEALTH_DEGRADED and health.details["previous_health"] == "healthy"
    assert all(e.actor and e.HasField("time") for e in events)
    # every event points at an ok audit record of its change
    audit = {a.id: a for a in c.iter_audit_events()}
    assert all(audit[e.audit_event_id].outcome == "ok" for e in events)

    # filters by model and type, and the CLI over the same stream
    assert [e.version for e in _stored(reg, model_names=[M], types=["rollback"])] == [1]
    assert {e.model_name for e in _stored(reg, model_names=[XGB])} == {XGB}
    runner = CliRunner(env={"COLUMNS": "220", "AQIMODELS_TARGET": None, "AQIMODELS_TOKEN": None})
    out = runner.invoke(app, ["--target", reg.target, "events", "--model", M, "--type", "stage_changed", "--json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(d["version"], d["to_stage"]) for d in lines] == [("1", "STAGE_STAGING"), ("1", "STAGE_PRODUCTION"),
                                                              ("2", "STAGE_STAGING"), ("2", "STAGE_PRODUCTION")]
    plain = runner.invoke(app, ["--target", reg.target, "events", "--model", M, "--after", str(back.sequence - 1)])
    assert plain.exit_code == 0 and "ROLLBACK" in plain.stdout and "archived -> production" in plain.stdout
    assert "STAGE_CHANGED" not in plain.stdout
    bad = runner.invoke(app, ["--target", reg.target, "events", "--type", "nonsense"])
    assert bad.exit_code == 1 and "unknown event type 'nonsense'" in bad.stderr


def test_the_readme_service_reloads_when_production_changes(with_worker: Registry, tmp_path: Path) -> None:
    """The README's reloading service, run as written (on the xgboost model, which has real artifacts)."""
    reg, c = with_worker, with_worker.client
    body = next(b for b in readme_blocks("python") if "# runs until stopped" in b)
    while len(versions := [v.version for v in c.iter_versions(XGB) if v.model_uri]) < 2:
        list(c.retrain(["xgboost"], dataset=SMALL, params=wpb.TrainParams(max_epochs=3)))
    c.promote(XGB, versions[0], "production")
    code = body.replace(README_TARGET, reg.target).replace('"aqi_predictor_lstm"', f'"{XGB}"')
    env = {**os.environ, "MLFLOW_TRACKING_URI": reg.tracking_uri}
    out = tmp_path / "service.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        flip = 1
        while "reloaded" not in out.read_text():  # a change made before it follows is loaded, not reloaded
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            c.promote(XGB, versions[flip % 2], "production")
            flip += 1
            time.sleep(2.0)
        assert f"reloaded {XGB} v" in out.read_text()
    finally:
        proc.kill()
        proc.wait(10)


def test_events_are_appended_with_their_audit_record_and_only_then(sqlite_registry: Registry) -> None:
    """The Python API the webhooks read: the JSON body, waiting, and an unknown filter refused."""
    reg = sqlite_registry
    reg.seed(M, [realistic_metrics(i) for i in range(2)])
    log = EventLog(reg.server.service.db)
    top = log.latest_sequence()
    assert not log.wait_after(top, 0.05)
    threading.Timer(0.2, lambda: reg.client.promote(M, 2, "production")).start()
    assert log.wait_after(top, 10.0)
    (event,) = log.read_after(top)
    body = event.to_json()
    assert body["type"] == "STAGE_CHANGED" and body["sequence"] == top + 1 and body["version"] == 2
    assert body["details"] == {"from_stage": "none", "to_stage": "production", "replaced_versions": [],
                               "archived_versions": []}
    assert body["time"].endswith("Z") and datetime.fromisoformat(body["time"]).timestamp() * 1000 == pytest.approx(
        body["time_ms"], abs=1)
    with pytest.raises(InvalidArgumentError, match="after_sequence must not be negative"):
        list(reg.client.watch_events(-1, follow=False))
    with pytest.raises(InvalidArgumentError, match="types: 99 is not a registry event type"):
        list(reg.client.watch_events(0, types=[99], follow=False))


def test_a_watcher_that_resumes_after_a_disconnect_misses_and_repeats_nothing(store_uri: str) -> None:
    reg = start_registry(store_uri)
    try:
        reg.seed(M, [realistic_metrics(i) for i in range(12)])
        stop = threading.Event()

        def churn() -> None:  # changes all along: replay -> live switches happen while events commit
            v = 1
            while not stop.is_set():
                reg.client.promote(M, v % 12 + 1, "production")
                v += 1

        threading.Thread(target=churn, daemon=True).start()
        seen: list[int] = []
        cursor = 0
        for _ in range(4):  # four connections, each dropped after a few events, resumed from the last seen
            watcher = Watcher(reg.target, cursor)
            got = watcher.wait_for(5)[:5]
            watcher.close()
            seen += [e.sequence for e in got]
            cursor = got[-1].sequence
        stop.set()
        time.sleep(0.3)
        seen += [e.sequence for e in _stored(reg, cursor)]
        assert seen == list(range(1, len(seen) + 1))
        assert len(seen) >= 20
    finally:
        _stop(reg)


def test_a_second_replica_on_postgres_streams_the_same_events(postgres_url: str) -> None:
    a = start_registry(postgres_url)
    b = start_registry(postgres_url)
    try:
        a.seed(M, [realistic_metrics(i) for i in range(6)])
        on_b = Watcher(b.target, model_names=[M])
        on_a = Watcher(a.target, model_names=[M])
        for v in range(1, 7):
            a.client.promote(M, v, "production")
        from_b = on_b.wait_for(6)
        from_a = on_a.wait_for(6)
        assert [e.SerializeToString() for e in from_b] == [e.SerializeToString() for e in from_a]
        assert [e.version for e in from_b] == [1, 2, 3, 4, 5, 6]
        assert b.server.events.listening  # woken by A's NOTIFY, not only by its poll
        on_a.close()
        on_b.close()
    finally:
        _stop(a)
        _stop(b)


def test_changes_on_two_replicas_at_once_number_their_events_without_a_gap(postgres_url: str) -> None:
    a = start_registry(postgres_url)
    b = start_registry(postgres_url)
    try:
        models = [f"{M}_{i}" for i in range(6)]
        for name in models:
            a.seed(name, [realistic_metrics(i) for i in range(5)])
        b.server.service.invalidate()
        barrier = threading.Barrier(len(models))

        def promote_all(i: int) -> int:
            name = models[i]
            with RegistryClient((a if i % 2 else b).target, timeout=120) as own:
                barrier.wait()
                for v in range(1, 6):
                    own.promote(name, v, "production")
            return 5

        with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
            changes = sum(pool.map(promote_all, range(len(models))))
        events = _stored(a)
        assert [e.sequence for e in events] == list(range(1, changes + 1))
        for name in models:  # per model in the order of its changes
            assert [e.version for e in events if e.model_name == name] == [1, 2, 3, 4, 5]
        # the table holds exactly what the stream gave: no sequence was skipped or taken twice
        engine = sa.create_engine(postgres_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.select(events_table.c.sequence).order_by(events_table.c.sequence)).scalars()
                assert list(rows) == list(range(1, changes + 1))
        finally:
            engine.dispose()
    finally:
        _stop(a)
        _stop(b)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_the_version_that_held_a_stage_at_a_time(sqlite_registry: Registry) -> None:
    reg, c = sqlite_registry, sqlite_registry.client
    reg.seed(M, [realistic_metrics(i) for i in range(3)])
    before = int(time.time() * 1000) - 5
    time.sleep(0.05)
    c.promote(M, 1, "production")
    c.promote(M, 3, "staging")
    time.sleep(0.05)
    c.promote(M, 2, "production")
    time.sleep(0.05)
    c.rollback(M)
    # the history's times are those of the changes' audit records (each event names its record)
    audit = {a.id: a.time.ToMilliseconds() for a in c.iter_audit_events(model_name=M)}
    t1, _, t2, t3 = (audit[e.audit_event_id] for e in _stored(reg, model_names=[M]))

    def at(ms: int, stage: str = "production") -> pb.GetModelVersionResponse:
        return c.version_at(M, stage, datetime.fromtimestamp(ms / 1000, tz=UTC))  # type: ignore[no-any-return]

    first = at(t1 + 10)
    assert first.version.version == 1
    assert first.held_from.ToMilliseconds() == t1 and first.held_until.ToMilliseconds() == t2
    second = at(t2)  # a period holds from its start, inclusive
    assert second.version.version == 2 and second.held_until.ToMilliseconds() == t3
    now = at(t3 + 10)
    assert now.version.version == 1 and now.held_from.ToMilliseconds() == t3 and not now.HasField("held_until")
    assert at(t2 + 10, "staging").version.version == 3
    with pytest.raises(NotFoundError, match="no version of 'events_model' held production at"):
        at(before)

    with pytest.raises(InvalidArgumentError, match="either version or stage and at"):
        c.version_at(M, "production", datetime.now(UTC), version=2)
    with pytest.raises(InvalidArgumentError, match="at is required with stage"):
        c.version_at(M, "production", None)
    with pytest.raises(InvalidArgumentError, match="stage is required with at"):
        c.version_at(M, "", datetime.now(UTC))
    with pytest.raises(InvalidArgumentError, match="stage must be production or staging"):
        c.version_at(M, "archived", datetime.now(UTC))
    with pytest.raises(InvalidArgumentError, match="at is in the future"):
        c.version_at(M, "production", datetime.now(UTC) + timedelta(days=1))
    with pytest.raises(NotFoundError):
        c.version_at("no_such_model", "production", datetime.now(UTC))

    runner = CliRunner(env={"COLUMNS": "220", "AQIMODELS_TARGET": None, "AQIMODELS_TOKEN": None})
    out = runner.invoke(app, ["--target", reg.target, "show", M, "--stage", "production", "--at", _iso(t2 + 10)])
    assert out.exit_code == 0, out.output
    assert "v2 held production" in out.stdout and _iso(t2)[:19].replace("T", " ") in out.stdout
    as_json = runner.invoke(app, ["--target", reg.target, "show", M, "--stage", "production", "--at",
                                  _iso(t1 + 10), "--json"])
    data = json.loads(as_json.stdout)
    assert data["version"]["version"] == "1" and data["held_until"].startswith(_iso(t2)[:19])
    bad = runner.invoke(app, ["--target", reg.target, "show", M, "--stage", "production", "--at", "yesterday"])
    assert bad.exit_code == 1 and "at 'yesterday' is not an ISO-8601 time" in bad.stderr


def test_approval_records_and_recovered_changes_map_to_events(tmp_path: Path) -> None:
    """The audit shapes other parts write (approvals) and recovery's outcomes, through the one table."""
    from aqimodels.server.db import Database

    db = Database(f"sqlite:///{tmp_path}/events.db")
    db.create_tables()
    log = EventLog(db)
    request = {"id": "req1", "state": "PENDING", "stage": "production", "version": 7,
               "expected_current_version": 6, "requested_by": "alice", "reason": "better rmse"}
    for action in ("RequestPromotion", "ApprovePromotion", "RejectPromotion", "ExpirePromotion"):
        db.audit_record(actor="bob", role="admin", action=action, model_name=M, version=7, before={},
                        after={"promotion_request": request}, outcome="ok", request_id="r")
    db.audit_record(actor="bob", role="admin", action="ApprovePromotion", model_name=M, version=7, before={},
                    after={}, outcome="denied", request_id="r")  # a refusal is no event
    plan = {"version": 7, "commit": 0, "result": {"archived": [6], "previous": 6},
            "writes": [{"op": "alias", "key": "production", "version": 0, "to": "7", "was": "6"}]}
    for recovery in ("rolled_forward", "undone"):
        audit_id = db.audit_begin(actor="bob", role="admin", action="PromoteModelVersion", model_name=M, version=7,
                                  before={"production": 6, "staging": 7}, request_id="r", after={"plan": plan})
        db.audit_finish(audit_id, outcome="recovered", after={"production": 7, "recovery": {"action": recovery}})
    events = log.read_after(0)
    assert [e.type.value for e in events] == ["PROMOTION_REQUESTED", "PROMOTION_APPROVED", "PROMOTION_REJECTED",
                                              "PROMOTION_EXPIRED", "STAGE_CHANGED"]
    assert events[0].details == {"promotion_request_id": "req1", "request_state": "PENDING", "stage": "production",
                                 "expected_current_version": 6, "requested_by": "alice", "reason": "better rmse"}
    assert events[0].version == 7 and events[0].actor == "bob"
    assert events[-1].details == {"from_stage": "staging", "to_stage": "production", "replaced_versions": [6],
                                  "archived_versions": [6]}
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5] and log.latest_sequence() == 5
    assert [e.sequence for e in log.read_after(2, limit=2)] == [3, 4]
    db.engine.dispose()
