"""Monitoring and automation end to end, on real registry servers over real MLflow stores.

History with production periods, live performance reports turning a model DEGRADED and back with
alerts streamed to WatchAlerts subscribers (on the replica that took the report and on another),
the retrain schedule firing once per scheduled time across two replicas (injected clock), and the
retention policy after real retrains by a real worker process.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client import RegistryClient
from aqimodels.client.cli import app
from aqimodels.client.errors import CancelledError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from aqimodels.server.app import create_server
from aqimodels.server.automation import claims_table
from aqimodels.server.config import ServerConfig
from aqimodels.server.jobs import jobs_factory
from conftest import Registry, realistic_metrics
from typer.testing import CliRunner

LSTM = "aqi_predictor_lstm"
XGB = "aqi_predictor_xgboost"


class FakeClock:
    """An injectable clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when


def start(tracking_uri: str, clock: Callable[[], datetime] | None = None, **overrides: Any) -> Registry:
    """Like conftest's start_registry, with an injected clock."""
    factory = overrides.pop("jobs_factory", None)
    config = replace(ServerConfig(tracking_uri=tracking_uri, workers=(), log_json=True, health_interval_seconds=0.5,
                                  shutdown_grace_seconds=2.0, monitor_poll_seconds=0.1), **overrides)
    rs = create_server(config, "127.0.0.1:0", jobs_factory=factory, clock=clock)
    return Registry(rs, rs.port, tracking_uri, RegistryClient(f"127.0.0.1:{rs.port}", timeout=60), rs.service.store)


def stop(*regs: Registry) -> None:
    for reg in regs:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def audit(reg: Registry, action: str, model: str = "") -> list[pb.AuditEvent]:
    return [e for e in reg.client.iter_audit_events(model_name=model) if e.action == action]  # type: ignore[attr-defined]


def health_of(reg: Registry, name: str) -> int:
    return next(m.health for m in reg.client.status().models if m.model.name == name)  # type: ignore[attr-defined]


# ---- history ----

def _history_fixture(reg: Registry) -> None:
    reg.seed(LSTM, [{**realistic_metrics(i), "rmse": r} for i, r in enumerate((25.0, 20.0, 22.0, 18.0))])
    c = reg.client
    c.promote(LSTM, 1, "production")  # type: ignore[attr-defined]
    c.promote(LSTM, 2, "production")  # type: ignore[attr-defined]
    c.promote(LSTM, 3, "staging")  # type: ignore[attr-defined]
    c.promote(LSTM, 4, "production")  # type: ignore[attr-defined]
    c.rollback(LSTM)  # type: ignore[attr-defined]


def test_history_orders_versions_and_marks_production_periods(sqlite_registry: Registry) -> None:
    _history_fixture(sqlite_registry)
    h = sqlite_registry.client.history(LSTM)  # type: ignore[attr-defined]
    assert h.metric == "rmse"
    assert [p.version for p in h.points] == [1, 2, 3, 4]
    assert [p.metrics["rmse"] for p in h.points] == [25.0, 20.0, 22.0, 18.0]
    times = [p.create_time.ToMilliseconds() for p in h.points]
    assert times == sorted(times)
    assert [p.stage for p in h.points] == [pb.STAGE_ARCHIVED, pb.STAGE_PRODUCTION, pb.STAGE_STAGING,
                                           pb.STAGE_ARCHIVED]
    periods = h.production_periods
    assert [p.version for p in periods] == [1, 2, 4, 2]  # promoted 1, 2, 4, then rolled back to 2
    for before, after in itertools.pairwise(periods):
        assert before.end_time.ToMilliseconds() == after.start_time.ToMilliseconds()
        assert before.start_time.ToMilliseconds() <= before.end_time.ToMilliseconds()
    assert not periods[-1].HasField("end_time")  # still in production
    assert h.points[0].create_time.ToMilliseconds() <= periods[0].start_time.ToMilliseconds()
    mae = sqlite_registry.client.history(LSTM, "mae")  # type: ignore[attr-defined]
    assert mae.metric == "mae" and len(mae.points) == 4
    with pytest.raises(InvalidArgumentError) as info:
        sqlite_registry.client.history(LSTM, "colour")  # type: ignore[attr-defined]
    assert info.value.field == "metric" or "metric" in info.value.message
    with pytest.raises(NotFoundError):
        sqlite_registry.client.history("no_such_model")  # type: ignore[attr-defined]


def test_cli_history_prints_a_table_and_sparkline_and_plots_a_png(sqlite_registry: Registry, tmp_path: Path) -> None:
    _history_fixture(sqlite_registry)
    runner = CliRunner(env={"COLUMNS": "220", "AQIMODELS_TARGET": None, "AQIMODELS_TOKEN": None})
    png = tmp_path / "history.png"
    with structlog.testing.capture_logs():
        result = runner.invoke(app, ["--target", sqlite_registry.target, "history", LSTM, "--plot", str(png)])
        as_json = runner.invoke(app, ["--target", sqlite_registry.target, "history", LSTM, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    out = result.stdout
    for v in ("v1", "v2", "v3", "v4"):
        assert v in out
    assert "25.00" in out and "18.00" in out
    assert "█▃▅▁" in out  # 25, 20, 22, 18 as a sparkline
    assert "→ now" in out and "chart written to" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] == 500 and image.shape[1] == 1000
    assert as_json.exit_code == 0 and '"production_periods"' in as_json.stdout


# ---- live performance and degradation ----

def _collect(reg: Registry, model: str, sink: list[tuple[float, pb.Alert]]) -> RegistryClient:
    """Follows WatchAlerts on a client of its own; closing that client cancels the stream."""
    client = RegistryClient(reg.target)
    stream = client.watch_alerts(model)

    def run() -> None:
        with contextlib.suppress(CancelledError):  # the stream ends so when the test closes the client
            for alert in stream:
                sink.append((time.perf_counter(), alert))

    threading.Thread(target=run, daemon=True).start()
    return client


def test_degradation_alert_streams_audits_persists_and_recovers(
        sqlite_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    a = start(sqlite_uri)
    b = start(sqlite_uri)  # a second replica on the same database
    try:
        a.seed(LSTM, [{"rmse": 10.0, "mae": 7.0}, {"rmse": 9.0, "mae": 6.0}])
        a.seed(XGB, [{"rmse": 10.0}])
        a.client.promote(LSTM, 1, "production")  # type: ignore[attr-defined]
        on_a: list[tuple[float, pb.Alert]] = []
        on_b: list[tuple[float, pb.Alert]] = []
        other: list[tuple[float, pb.Alert]] = []
        watchers = [_collect(a, LSTM, on_a), _collect(b, "", on_b), _collect(a, XGB, other)]
        wait_until(lambda: a.server.monitor.subscriber_count() == 2 and b.server.monitor.subscriber_count() == 1,
                   what="subscribers")  # type: ignore[attr-defined]

        first = a.client.report_performance(LSTM, 1, rmse=12.0, mae=8.0, sample_count=60)  # type: ignore[attr-defined]
        assert first.health == pb.MODEL_HEALTH_HEALTHY and first.ratio == pytest.approx(1.2)
        # a non-production version's reports do not change the model's health
        staging = a.client.report_performance(LSTM, 2, rmse=50.0, sample_count=500)  # type: ignore[attr-defined]
        assert staging.health == pb.MODEL_HEALTH_DEGRADED and health_of(a, LSTM) == pb.MODEL_HEALTH_HEALTHY

        sent = time.perf_counter()
        second = a.client.report_performance(LSTM, 1, rmse=20.0, mae=14.0, sample_count=60)  # type: ignore[attr-defined]
        returned = time.perf_counter()
        # window: the newest 120 samples, rmse sqrt((60*20^2 + 60*12^2)/120) = 16.49, 1.65x the test rmse
        assert second.health == pb.MODEL_HEALTH_DEGRADED
        assert second.ratio == pytest.approx(math.sqrt((60 * 400 + 60 * 144) / 120) / 10)
        wait_until(lambda: on_a, what="the alert on the reporting replica")
        received, alert = on_a[0]
        latency_ms = (received - returned) * 1000
        round_trip_ms = (received - sent) * 1000
        with capsys.disabled():
            print(f"\nalert latency: report sent -> alert streamed {round_trip_ms:.1f} ms; "
                  f"ReportPerformance returned -> alert streamed {latency_ms:+.1f} ms")
        assert round_trip_ms < 2000
        assert alert.model_name == LSTM and alert.version == 1 and alert.health == pb.MODEL_HEALTH_DEGRADED
        assert alert.ratio == pytest.approx(second.ratio) and "DEGRADED" in alert.message and alert.id
        assert health_of(a, LSTM) == pb.MODEL_HEALTH_DEGRADED
        wait_until(lambda: on_b, what="the alert on the other replica")
        assert on_b[0][1].id == alert.id
        with capsys.disabled():
            print(f"alert latency on another replica (database tail, poll 0.1 s): "
                  f"{(on_b[0][0] - returned) * 1000:+.1f} ms after ReportPerformance returned")
        wait_until(lambda: health_of(b, LSTM) == pb.MODEL_HEALTH_DEGRADED, what="replica b DEGRADED")
        records = audit(a, "DegradationAlert", LSTM)
        assert len(records) == 1 and records[0].after["health"] == "degraded" and records[0].outcome == "ok"
        assert records[0].after["alert_id"] == alert.id
        assert len(audit(a, "ReportPerformance", LSTM)) == 3

        # a restarted registry still knows
        c = start(sqlite_uri)
        try:
            assert health_of(c, LSTM) == pb.MODEL_HEALTH_DEGRADED
        finally:
            stop(c)

        # back within bounds, reported as raw pairs aggregated by the server: healthy again
        pairs = [(50.0 + (11.0 if i % 2 else -11.0), 50.0) for i in range(100)]
        back = a.client.report_performance(LSTM, 1, pairs=pairs)  # type: ignore[attr-defined]
        assert back.health == pb.MODEL_HEALTH_HEALTHY and back.ratio == pytest.approx(1.1)
        wait_until(lambda: len(on_a) == 2 and len(on_b) == 2, what="the recovery alert")
        assert on_a[1][1].health == pb.MODEL_HEALTH_HEALTHY and "healthy again" in on_a[1][1].message
        assert health_of(a, LSTM) == pb.MODEL_HEALTH_HEALTHY
        wait_until(lambda: health_of(b, LSTM) == pb.MODEL_HEALTH_HEALTHY, what="replica b healthy")
        assert [r.after["health"] for r in audit(a, "DegradationAlert", LSTM)] == ["healthy", "degraded"]
        assert other == []  # the XGB subscriber heard nothing about the LSTM
        for w in watchers:
            w.close()  # the caller goes away: the server ends its streams
        wait_until(lambda: a.server.monitor.subscriber_count() == 0 and b.server.monitor.subscriber_count() == 0,
                   what="subscribers to leave")  # type: ignore[attr-defined]
    finally:
        stop(a, b)


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [
    ({"name": "no_such_model", "version": 1, "rmse": 1.0, "sample_count": 10}, NotFoundError, "no_such_model"),
    ({"version": 9, "rmse": 1.0, "sample_count": 10}, NotFoundError, "9"),
    ({"version": 1, "rmse": -1.0, "sample_count": 10}, InvalidArgumentError, "rmse"),
    ({"version": 1, "rmse": 1.0, "mae": math.nan, "sample_count": 10}, InvalidArgumentError, "mae"),
    ({"version": 1, "rmse": 1.0, "sample_count": -5}, InvalidArgumentError, "sample_count"),
    ({"version": 1}, InvalidArgumentError, "sample_count"),
    ({"version": 1, "pairs": [(1.0, 2.0), (1.0, math.inf)]}, InvalidArgumentError, "pairs[1].actual"),
    ({"version": 1, "rmse": 1.0, "sample_count": 3, "pairs": [(1.0, 2.0)]}, InvalidArgumentError, "pairs"),
    ({"version": 0, "rmse": 1.0, "sample_count": 3}, InvalidArgumentError, "version"),
    ({"name": XGB, "version": 1, "rmse": 1.0, "sample_count": 3}, FailedPreconditionError, "test rmse"),
])
def test_report_performance_validation(sqlite_registry: Registry, kwargs: dict[str, Any], error: type,
                                       fragment: str) -> None:
    sqlite_registry.seed(LSTM, [{"rmse": 10.0}])
    sqlite_registry.seed(XGB, [{"mae": 3.0}])
    kwargs = {"name": LSTM, **kwargs}
    with pytest.raises(error) as info:
        sqlite_registry.client.report_performance(kwargs.pop("name"), kwargs.pop("version"), **kwargs)  # type: ignore[attr-defined]
    assert fragment in info.value.message, info.value.message


# ---- scheduled retraining ----

def test_schedule_fires_once_per_time_across_two_replicas(sqlite_uri: str) -> None:
    clock = FakeClock(datetime(2031, 1, 1, 0, 0, 30, tzinfo=UTC))
    settings = {"jobs_factory": jobs_factory, "retrain_schedule": "* * * * *", "retrain_models": ("xgboost",),
                "auto_promotion": True, "monitor_poll_seconds": 0.05}
    a = start(sqlite_uri, clock, **settings)
    b = start(sqlite_uri, clock, **settings)
    schedulers = [a.server.monitor.scheduler, b.server.monitor.scheduler]  # type: ignore[attr-defined]
    try:
        time.sleep(0.3)
        assert a.client.list_jobs().jobs == []  # type: ignore[attr-defined]

        clock.set(datetime(2031, 1, 1, 0, 1, 5, tzinfo=UTC))
        wait_until(lambda: all(s.won or s.lost for s in schedulers), what="both replicas to try the 00:01 run")
        assert sorted(len(s.won) for s in schedulers) == [0, 1] and sorted(len(s.lost) for s in schedulers) == [0, 1]
        jobs = a.client.list_jobs().jobs  # type: ignore[attr-defined]
        assert len(jobs) == 1 and jobs[0].model_name == XGB and jobs[0].requested_by == "scheduler"
        # the record is written before the job (pending) and completed just after it
        wait_until(lambda: [r.outcome for r in audit(a, "ScheduledRetrain")] == ["ok"], what="the 00:01 record")
        runs = audit(a, "ScheduledRetrain")
        assert len(runs) == 1 and runs[0].outcome == "ok" and runs[0].actor == "scheduler"
        assert runs[0].after["scheduled_time"] == "2031-01-01T00:01Z" and runs[0].after["auto_promote"] is True
        retrain = audit(a, "Retrain", XGB)
        assert len(retrain) == 1 and retrain[0].actor == "scheduler" and retrain[0].after["auto_promote"] is True

        time.sleep(0.3)  # nothing more happens until the next scheduled time
        assert len(a.client.list_jobs().jobs) == 1  # type: ignore[attr-defined]
        winner = a if schedulers[0].won else b  # a queued job is cancelled on the replica that runs it
        winner.client.cancel_job(jobs[0].job_id, reason="no worker in this test")  # type: ignore[attr-defined]

        clock.set(datetime(2031, 1, 1, 0, 2, 1, tzinfo=UTC))
        wait_until(lambda: sum(len(s.won) + len(s.lost) for s in schedulers) == 4, what="the 00:02 run")
        assert sum(len(s.won) for s in schedulers) == 2
        wait_until(lambda: len(a.client.list_jobs().jobs) == 2, what="the second job")  # type: ignore[attr-defined]
        # the claim's audit record is completed just after its job is submitted
        wait_until(lambda: [r.outcome for r in audit(a, "ScheduledRetrain")] == ["ok", "ok"],
                   what="the 00:02 audit record")
        assert [r.after["scheduled_time"] for r in audit(a, "ScheduledRetrain")] == ["2031-01-01T00:02Z",
                                                                                   "2031-01-01T00:01Z"]
        with a.server.service.db.engine.connect() as conn:  # type: ignore[attr-defined]
            claims = conn.execute(sa.select(claims_table.c.scheduled_ms, claims_table.c.job_ids)).all()
        assert len(claims) == 2 and all(job_ids for _, job_ids in claims)
    finally:
        stop(a, b)


def test_a_scheduled_retrain_that_cannot_start_is_audited_as_skipped(sqlite_uri: str) -> None:
    clock = FakeClock(datetime(2031, 1, 1, 0, 0, 30, tzinfo=UTC))
    reg = start(sqlite_uri, clock, jobs_factory=jobs_factory, retrain_schedule="* * * * *",
                retrain_models=("xgboost",), retrain_dataset="x" * 5000, monitor_poll_seconds=0.05)
    try:
        clock.set(datetime(2031, 1, 1, 0, 1, 5, tzinfo=UTC))
        wait_until(lambda: [r.outcome for r in audit(reg, "ScheduledRetrain")] == ["skipped"],
                   what="the skipped run's record")
        record = audit(reg, "ScheduledRetrain")[0]
        assert "dataset.spec is longer than 4096 characters" in record.message
        assert record.after["scheduled_time"] == "2031-01-01T00:01Z"
        assert reg.client.list_jobs().jobs == []  # type: ignore[attr-defined]
    finally:
        stop(reg)


# ---- retention ----

def test_retention_dry_run_by_age_and_count_with_an_injected_clock(sqlite_uri: str) -> None:
    clock = FakeClock(datetime.now(UTC))
    reg = start(sqlite_uri, clock, retention_keep_last=1, retention_older_than_days=30.0)
    try:
        reg.seed(LSTM, [realistic_metrics(i) for i in range(4)])
        reg.client.promote(LSTM, 2, "production")  # type: ignore[attr-defined]
        young = reg.client.cleanup(LSTM, 0, dry_run=True)  # type: ignore[attr-defined]
        assert list(young.deleted_versions) == [] and young.dry_run  # nothing is 30 days old yet
        clock.set(datetime.now(UTC) + timedelta(days=31))
        old = reg.client.cleanup(LSTM, 0, dry_run=True)  # type: ignore[attr-defined]
        assert list(old.deleted_versions) == [1, 3] and list(old.protected_versions) == [2]
        assert [v.version for v in reg.client.iter_versions(LSTM)] == [4, 3, 2, 1]  # type: ignore[attr-defined]
        explicit = reg.client.cleanup(LSTM, 3, dry_run=True)  # type: ignore[attr-defined]
        assert list(explicit.deleted_versions) == [1]  # an explicit keep_last still means what it says
        runner = CliRunner(env={"COLUMNS": "220", "AQIMODELS_TARGET": None, "AQIMODELS_TOKEN": None})
        with structlog.testing.capture_logs():
            result = runner.invoke(app, ["--target", reg.target, "cleanup", LSTM, "--policy", "--dry-run"])
        assert result.exit_code == 0, (result.stdout, result.stderr)
        assert "would delete v1, v3" in result.stdout and "protected by an alias: v2" in result.stdout
    finally:
        stop(reg)


def test_retention_after_retrains_keeps_aliased_versions_and_the_last_n(
        tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> None:
    from test_retrain import FAST, SMALL
    from conftest import start_worker, stop_worker, wait_for_worker

    folder = tmp_path_factory.mktemp("retention")
    shutil.copy(_sqlite_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    worker, target = start_worker(uri, folder)
    reg = start(uri, workers=(target,), jobs_factory=jobs_factory, retention_keep_last=2)
    try:
        wait_for_worker(reg)
        reg.seed(XGB, [realistic_metrics(i) for i in range(4)])
        reg.client.promote(XGB, 1, "production")  # type: ignore[attr-defined]
        reg.client.promote(XGB, 3, "staging")  # type: ignore[attr-defined]
        dry = reg.client.cleanup(XGB, 0, dry_run=True)  # type: ignore[attr-defined]
        assert list(dry.deleted_versions) == [2] and list(dry.protected_versions) == [1, 3]

        def versions() -> list[int]:
            return sorted(v.version for v in reg.client.iter_versions(XGB))  # type: ignore[attr-defined]

        assert versions() == [1, 2, 3, 4]
        for expected in ([1, 3, 4, 5], [1, 3, 5, 6]):
            events = list(reg.client.retrain(["xgboost"], dataset=SMALL, params=FAST))  # type: ignore[attr-defined]
            assert events[-1].WhichOneof("event") == "succeeded"
            wait_until(lambda e=expected: versions() == e, what=f"versions {expected}")  # type: ignore[misc]
        deletions = [e for e in audit(reg, "CleanupModelVersions", XGB) if e.actor == "retention-policy"]
        assert [e.outcome for e in deletions] == ["ok", "ok"]
        assert "[4]" in deletions[0].message and "[2]" in deletions[1].message
    finally:
        stop(reg)
        stop_worker(worker)
