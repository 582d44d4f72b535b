"""Model monitoring: performance history, live performance reports, degradation alerts.

History: every version's test metrics in creation order, and the production periods read from the
audit log (successful PromoteModelVersion, RollbackModel and AutoPromotion records, whose before
and after states hold ``production``).

Live performance: serving services report a window's rmse/mae and sample count (or raw
predicted/actual pairs, aggregated here) for a version. Reports are kept in
``aqimodels_performance_reports`` so that every replica judges the same window: the newest reports
of the version, within ``degradation_window_hours``, until they cover ``degradation_min_samples``
samples. Reports about the version in production decide the model's health: once the window holds
enough samples, the model is DEGRADED while the window's rmse exceeds the version's test rmse
times ``degradation_ratio``, and healthy again when it no longer does. Each change is one alert:
kept in ``aqimodels_alerts``, audited (``DegradationAlert``), logged, and delivered to the
``WatchAlerts`` subscribers of every replica (at once on the replica that took the report, within
``monitor_poll_seconds`` on the others). The state is kept in ``aqimodels_model_health`` so a
restarted registry, or another replica, still knows.
"""

from __future__ import annotations

import enum
import json
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.domain import (
    Caller,
    model_type_of,
    model_type_value,
    validate_metric,
    validate_name,
    validate_version,
)
from aqimodels.client.errors import (
    AqiModelsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    VersionNotFoundError,
)
from aqimodels.server.automation import Clock, RetentionPolicy, RetrainScheduler, utc_now
from aqimodels.server.config import ServerConfig
from aqimodels.server.db import Database, audit_table, metadata
from aqimodels.server.domain import (
    PRODUCTION_ALIAS,
    PROMOTED_TIME_TAG,
    STAGING_ALIAS,
    ModelVersion,
    Stage,
    tag_time,
    tag_time_ms,
)
from aqimodels.server.service import CleanupResult, RegistryService
from aqimodels.server.subscriptions import follow

if TYPE_CHECKING:
    from aqimodels.server.jobs import JobManager

log = structlog.get_logger(__name__)

PRODUCTION_ACTIONS = ("PromoteModelVersion", "RollbackModel", "AutoPromotion")
MAX_WINDOW_ROWS = 10_000

reports_table = sa.Table(
    "aqimodels_performance_reports",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(500), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("time_ms", sa.BigInteger, nullable=False),
    sa.Column("window_end_ms", sa.BigInteger, nullable=False),
    sa.Column("rmse", sa.Float, nullable=False),
    sa.Column("mae", sa.Float, nullable=False),
    sa.Column("sample_count", sa.BigInteger, nullable=False),
    sa.Column("reporter", sa.String(200), nullable=False),
    sa.Index("ix_aqimodels_reports_model_version", "model_name", "version", "seq"),
)

health_table = sa.Table(
    "aqimodels_model_health",
    metadata,
    sa.Column("model_name", sa.String(500), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("degraded", sa.Boolean, nullable=False),
    sa.Column("ratio", sa.Float, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)

alerts_table = sa.Table(
    "aqimodels_alerts",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("time_ms", sa.BigInteger, nullable=False),
    sa.Column("model_name", sa.String(500), nullable=False, index=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("health", sa.Integer, nullable=False),
    sa.Column("ratio", sa.Float, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
)


class Health(enum.Enum):
    """A model's health (proto enum numbers)."""

    HEALTHY = 1
    NO_PRODUCTION = 2
    DEGRADED = 3


@dataclass(frozen=True)
class HistoryPoint:
    version: int
    create_time_ms: int
    metrics: dict[str, float]
    stage: Stage


@dataclass(frozen=True)
class ProductionPeriod:
    version: int
    start_ms: int
    end_ms: int  # 0: still in production


@dataclass(frozen=True)
class HeldStage:
    """A version that held a stage at a point in time, from ``start_ms`` until ``end_ms`` (0: still)."""

    version: ModelVersion
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class History:
    name: str
    metric: str
    points: list[HistoryPoint]
    periods: list[ProductionPeriod]


@dataclass(frozen=True)
class Alert:
    id: str
    time_ms: int
    model_name: str
    version: int
    health: Health
    ratio: float
    message: str


@dataclass(frozen=True)
class ReportOutcome:
    health: Health
    ratio: float
    live_rmse: float
    test_rmse: float
    window_samples: int
    alert: Alert | None


def _now_ms() -> int:
    return int(time.time() * 1000)


def aggregate(rmse: float, mae: float, sample_count: int,
              pairs: Sequence[tuple[float, float]]) -> tuple[float, float, int]:
    """Validates a report; returns (rmse, mae, samples). Raises InvalidArgumentError naming the field."""
    if pairs:
        if rmse or mae or sample_count:
            raise InvalidArgumentError("give either rmse/mae/sample_count or pairs, not both", field="pairs")
        sq = ab = 0.0
        for i, (predicted, actual) in enumerate(pairs):
            for name, value in (("predicted", predicted), ("actual", actual)):
                if not math.isfinite(value):
                    raise InvalidArgumentError(f"pairs[{i}].{name} is not a finite number", field=f"pairs[{i}].{name}")
            sq += (predicted - actual) ** 2
            ab += abs(predicted - actual)
        return math.sqrt(sq / len(pairs)), ab / len(pairs), len(pairs)
    if sample_count < 0:
        raise InvalidArgumentError(f"sample_count must not be negative, got {sample_count}", field="sample_count")
    for name, value in (("rmse", rmse), ("mae", mae)):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value}", field=name)
    if sample_count == 0:
        raise InvalidArgumentError("the report is empty: give rmse (and mae) with sample_count > 0, or pairs",
                                   field="sample_count")
    return rmse, mae, sample_count


class Monitor:
    """History, live performance and alerts; owns the schedule and the retention policy.

    Args:
        jobs: the job manager (``submit``, ``add_success_hook``), or None without retraining.
        clock: the time of the schedule and the retention policy (injectable for tests).
    """

    def __init__(self, config: ServerConfig, service: RegistryService, db: Database, jobs: JobManager | None = None,
                 clock: Clock | None = None) -> None:
        clock = clock or utc_now
        self.config = config
        self.service = service
        self.db = db
        self.jobs = jobs
        self.retention = RetentionPolicy(config, service, clock)
        self.scheduler = (RetrainScheduler(config, db, jobs, clock)
                          if config.retrain_schedule and jobs is not None else None)
        if jobs is not None and self.retention.configured:
            jobs.add_success_hook(self.retention.after_retrain)
        self._subscribers: list[tuple[str, queue.Queue[Alert | None]]] = []
        self._subs_lock = threading.Lock()
        self._delivered: deque[str] = deque(maxlen=10_000)
        self._delivered_set: set[str] = set()
        self._last_alert_seq = self._max_alert_seq()
        self._marked: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)
        self._thread.start()
        if self.scheduler is not None:
            self.scheduler.start()

    def stop(self) -> None:
        self._stop.set()
        if self.scheduler is not None:
            self.scheduler.stop()
        with self._subs_lock:
            for _, q in self._subscribers:
                q.put(None)
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.monitor_poll_seconds):
            try:
                self.refresh()
                self._tail_alerts()
            except Exception:
                log.warning("monitor_refresh_failed", exc_info=True)

    def refresh(self) -> None:
        """Marks DEGRADED the models whose production version the shared health table says is degraded."""
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(health_table.c.model_name, health_table.c.version).where(
                health_table.c.degraded.is_(True))).all()
        degraded: set[str] = set()
        for name, version in rows:
            try:
                production = self.service.snapshot(name).model.aliases.get(PRODUCTION_ALIAS)
            except AqiModelsError:
                continue
            if production == version:
                degraded.add(name)
        for name in degraded | self._marked:
            self.service.set_degraded(name, name in degraded)
        self._marked = degraded

    # ---- history ----

    def history(self, name: str, metric: str) -> History:
        metric = validate_metric(metric)
        snap = self.service.snapshot(name)
        versions = sorted(snap.versions, key=lambda v: (v.create_time_ms, v.version))
        known = {k for v in versions for k in v.metrics}
        if versions and known and metric not in known:
            raise InvalidArgumentError(f"metric {metric!r} is not logged for any version of {name!r}; known "
                                       f"metrics: {', '.join(sorted(known)[:20])}", field="metric")
        points = [HistoryPoint(v.version, v.create_time_ms, dict(v.metrics), v.stage) for v in versions]
        return History(name, metric, points, self._production_periods(name, snap))

    def _production_periods(self, name: str, snap: Any, alias: str = PRODUCTION_ALIAS) -> list[ProductionPeriod]:
        """The periods each version held ``alias`` (production or staging), from the audit records."""
        t = audit_table
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t.c.time_ms, t.c.before, t.c.after).where(
                t.c.model_name == name, t.c.outcome.in_(("ok", "recovered")),
                t.c.action.in_(PRODUCTION_ACTIONS)).order_by(t.c.seq)).all()
        periods: list[ProductionPeriod] = []
        current, start = 0, 0
        for time_ms, before_raw, after_raw in rows:
            before, after = json.loads(before_raw), json.loads(after_raw)
            if alias not in after:
                continue
            if not current and before.get(alias):
                # the alias was set before any record of ours (e.g. by a plain MLflow client)
                current, start = int(before[alias]), 0
            new = int(after[alias] or 0)
            if new == current:
                continue
            if current:
                periods.append(ProductionPeriod(current, start, time_ms))
            current, start = new, time_ms
        holder = snap.model.aliases.get(alias, 0)
        if current and current != holder:
            periods.append(ProductionPeriod(current, start, _now_ms()))  # changed outside the registry
            current = 0
        if holder and not current:
            v = next((v for v in snap.versions if v.version == holder), None)
            raw = v.tags.get(PROMOTED_TIME_TAG, "") if v and alias == PRODUCTION_ALIAS else ""
            promoted = tag_time_ms(raw)
            current, start = holder, promoted if promoted is not None else (v.create_time_ms if v else 0)
        if current:
            periods.append(ProductionPeriod(current, start, 0))
        return periods

    def version_at(self, name: str, version: int, stage: Stage | None, at_ms: int | None) -> HeldStage:
        """GetModelVersion at a point in time: the version that held ``stage`` at ``at_ms``, and when."""
        validate_name(name)
        if version:
            raise InvalidArgumentError("give either version or stage and at, not both", field="version")
        if stage is None:
            raise InvalidArgumentError("stage is required with at: production or staging", field="stage")
        if stage not in (Stage.PRODUCTION, Stage.STAGING):
            raise InvalidArgumentError(f"stage must be production or staging with at, not {stage.name.lower()} "
                                       "(archived and none are not held by one version)", field="stage")
        if at_ms is None:
            raise InvalidArgumentError("at is required with stage: the time asked about", field="at")
        if at_ms > _now_ms() + 60_000:
            raise InvalidArgumentError("at is in the future: the history is known up to now", field="at")
        alias = PRODUCTION_ALIAS if stage == Stage.PRODUCTION else STAGING_ALIAS
        snap = self.service.snapshot(name)
        when = tag_time(at_ms)
        for p in self._production_periods(name, snap, alias):
            if p.start_ms <= at_ms and (p.end_ms == 0 or at_ms < p.end_ms):
                v = next((v for v in snap.versions if v.version == p.version), None)
                if v is None:
                    raise VersionNotFoundError(f"version {p.version} of {name!r} held {alias} at {when} but has "
                                               "since been deleted")
                return HeldStage(v, p.start_ms, p.end_ms)
        raise NotFoundError(f"no version of {name!r} held {alias} at {when} (by the recorded history)")

    # ---- live performance ----

    def report(self, caller: Caller, name: str, version: int, rmse: float, mae: float, sample_count: int,
               pairs: Sequence[tuple[float, float]], window_end_ms: int, request_id: str = "") -> ReportOutcome:
        """Takes a live performance report; turns the model DEGRADED or healthy when the window says so.

        ``request_id``: a repeated one is not counted again and answers the first report's outcome.
        """
        validate_name(name)
        validate_version(version)
        rmse, mae, samples = aggregate(rmse, mae, sample_count, pairs)
        mv = self.service.get_version(name, version)
        test_rmse = mv.metrics.get("rmse", math.nan)
        if not math.isfinite(test_rmse) or test_rmse <= 0:
            raise FailedPreconditionError(f"version {version} of {name!r} has no test rmse to compare live "
                                          "performance with")
        now = _now_ms()
        alert: Alert | None = None
        with self.db.model_lock(f"health:{name}"):
            first = self.db.remembered("ReportPerformance", request_id)
            if first is not None:
                kept = json.loads(first)
                return ReportOutcome(Health[kept["health"]], kept["ratio"], kept["live_rmse"], kept["test_rmse"],
                                     kept["window_samples"], None)
            with self.db.begin() as conn:
                conn.execute(reports_table.insert().values(
                    model_name=name, version=version, time_ms=now, window_end_ms=window_end_ms or now,
                    rmse=rmse, mae=mae, sample_count=samples, reporter=caller.name[:200]))
            live_rmse, window_samples = self._window(name, version, now)
            ratio = live_rmse / test_rmse
            production = self.service.snapshot(name, fresh=True).model.aliases.get(PRODUCTION_ALIAS, 0)
            with self.db.begin() as conn:
                row = conn.execute(sa.select(health_table.c.version, health_table.c.degraded).where(
                    health_table.c.model_name == name)).first()
            was_degraded = bool(row and row[1] and row[0] == version)
            enough = window_samples >= self.config.degradation_min_samples
            degraded = ratio > self.config.degradation_ratio if enough else was_degraded
            if version == production:
                self._save_health(name, version, degraded, ratio, exists=row is not None)
                if degraded != was_degraded:
                    alert = self._raise_alert(caller, name, version, degraded, ratio, live_rmse, test_rmse,
                                              window_samples)
            self.db.audit_record(
                actor=caller.name, role=caller.role, action="ReportPerformance", model_name=name, version=version,
                before={}, after={"rmse": rmse, "mae": mae, "samples": samples, "window_rmse": live_rmse,
                                  "window_samples": window_samples, "ratio": ratio, "degraded": degraded},
                outcome="ok", request_id=caller.request_id, message=f"{samples} samples, rmse {rmse:.4g}")
            self.db.remember("ReportPerformance", request_id, json.dumps({
                "health": "DEGRADED" if degraded else "HEALTHY", "ratio": ratio, "live_rmse": live_rmse,
                "test_rmse": test_rmse, "window_samples": window_samples}).encode())
        if version == production:
            self.service.set_degraded(name, degraded)
            if degraded:
                self._marked.add(name)
        if alert is not None:
            self._deliver(alert)
            if degraded and self.config.retrain_on_degradation:
                self._retrain(name, alert)
        return ReportOutcome(Health.DEGRADED if degraded else Health.HEALTHY, ratio, live_rmse, test_rmse,
                             window_samples, alert)

    def _window(self, name: str, version: int, now: int) -> tuple[float, int]:
        """(rmse, samples) of the newest reports until they cover the minimum sample count."""
        t = reports_table
        since = now - int(self.config.degradation_window_hours * 3_600_000)
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t.c.rmse, t.c.sample_count).where(
                t.c.model_name == name, t.c.version == version, t.c.time_ms >= since).order_by(
                t.c.seq.desc()).limit(MAX_WINDOW_ROWS)).all()
        squares, samples = 0.0, 0
        for rmse, n in rows:
            squares += rmse * rmse * n
            samples += n
            if samples >= self.config.degradation_min_samples:
                break
        return (math.sqrt(squares / samples) if samples else 0.0), samples

    def _save_health(self, name: str, version: int, degraded: bool, ratio: float, *, exists: bool) -> None:
        values = {"version": version, "degraded": degraded, "ratio": ratio, "updated_ms": _now_ms()}
        with self.db.begin() as conn:
            if exists:
                conn.execute(health_table.update().where(health_table.c.model_name == name).values(**values))
            else:
                conn.execute(health_table.insert().values(model_name=name, **values))

    def _raise_alert(self, caller: Caller, name: str, version: int, degraded: bool, ratio: float,
                     live_rmse: float, test_rmse: float, samples: int) -> Alert:
        limit = self.config.degradation_ratio
        if degraded:
            message = (f"{name} v{version} is DEGRADED: live rmse {live_rmse:.4g} over {samples} samples is "
                       f"{ratio:.2f}x its test rmse {test_rmse:.4g} (limit {limit:g}x)")
        else:
            message = (f"{name} v{version} is healthy again: live rmse {live_rmse:.4g} over {samples} samples is "
                       f"{ratio:.2f}x its test rmse {test_rmse:.4g} (limit {limit:g}x)")
        alert = Alert(uuid.uuid4().hex, _now_ms(), name, version, Health.DEGRADED if degraded else Health.HEALTHY,
                      ratio, message)
        with self.db.begin() as conn:
            conn.execute(alerts_table.insert().values(
                id=alert.id, time_ms=alert.time_ms, model_name=name, version=version, health=alert.health.value,
                ratio=ratio, message=message))
        self.db.audit_record(
            actor=caller.name, role=caller.role, action="DegradationAlert", model_name=name, version=version,
            before={"health": "healthy" if degraded else "degraded"},
            after={"health": "degraded" if degraded else "healthy", "ratio": ratio, "live_rmse": live_rmse,
                   "test_rmse": test_rmse, "samples": samples, "limit": limit, "alert_id": alert.id},
            outcome="ok", request_id=caller.request_id, message=message)
        (log.warning if degraded else log.info)("model_health_changed", model=name, version=version,
                                                health=alert.health.name.lower(), ratio=round(ratio, 4),
                                                alert_id=alert.id)
        return alert

    def _retrain(self, name: str, alert: Alert) -> None:
        """The degradation policy: retrain the model (in the background: submitting asks a worker)."""
        type_name, jobs = model_type_of(name), self.jobs
        if type_name is None or jobs is None:
            log.warning("degradation_retrain_impossible", model=name,
                        reason="not a model the workers train" if type_name else "no job manager")
            return

        def run() -> None:
            request = pb.RetrainRequest(model_types=[model_type_value(type_name)],
                                        dataset=wpb.DatasetSpec(spec=self.config.retrain_dataset))
            try:
                job_ids = jobs.submit(request, Caller("degradation-policy", "admin", alert.id))
                log.info("degradation_retrain_started", model=name, job_ids=job_ids, alert_id=alert.id)
            except AqiModelsError as exc:
                log.warning("degradation_retrain_not_started", model=name, reason=exc.message)

        threading.Thread(target=run, name=f"degradation-retrain-{name}", daemon=True).start()

    # ---- alerts ----

    def _max_alert_seq(self) -> int:
        with self.db.begin() as conn:
            return int(conn.execute(sa.select(sa.func.max(alerts_table.c.seq))).scalar() or 0)

    def _deliver(self, alert: Alert) -> None:
        with self._subs_lock:
            if alert.id in self._delivered_set:
                return
            if len(self._delivered) == self._delivered.maxlen:
                self._delivered_set.discard(self._delivered[0])
            self._delivered.append(alert.id)
            self._delivered_set.add(alert.id)
            for model, q in self._subscribers:
                if not model or model == alert.model_name:
                    q.put(alert)

    def _tail_alerts(self) -> None:
        """Delivers the alerts other replicas raised."""
        t = alerts_table
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t).where(t.c.seq > self._last_alert_seq).order_by(t.c.seq)).mappings().all()
        for r in rows:
            self._last_alert_seq = max(self._last_alert_seq, r["seq"])
            self._deliver(Alert(r["id"], r["time_ms"], r["model_name"], r["version"], Health(r["health"]),
                                r["ratio"], r["message"]))

    def alert_counts(self) -> list[tuple[str, str, int]]:
        """(model, health name, count) of every alert raised, for the Prometheus endpoint."""
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(alerts_table.c.model_name, alerts_table.c.health, sa.func.count())
                                .group_by(alerts_table.c.model_name, alerts_table.c.health)).all()
        return [(str(m), Health(h).name.lower(), int(n)) for m, h, n in rows]

    def subscriber_count(self) -> int:
        with self._subs_lock:
            return len(self._subscribers)

    def watch(self, model_name: str, context: Any) -> Iterator[Alert]:
        """Alerts as they are raised, until the caller cancels (or the server stops)."""
        if model_name:
            validate_name(model_name, "model_name")
        q: queue.Queue[Alert | None] = queue.Queue()
        entry = (model_name, q)
        if not context.add_callback(lambda: q.put(None)):  # False: the caller is already gone
            q.put(None)
        with self._subs_lock:
            self._subscribers.append(entry)
        try:
            for alert in follow(q, lambda: context.is_active() and not self._stop.is_set(), 1.0):
                if alert is not None:
                    yield alert
        finally:
            with self._subs_lock:
                self._subscribers.remove(entry)

    # ---- cleanup with the retention policy ----

    def cleanup(self, caller: Caller, name: str, keep_last: int, versions: list[int], dry_run: bool) -> CleanupResult:
        """CleanupModelVersions; with keep_last 0 and no versions, the configured retention policy."""
        if keep_last == 0 and not versions:
            if not self.retention.configured:
                raise InvalidArgumentError(
                    "no retention policy is configured on this registry (AQIMODELS_RETENTION, e.g. "
                    "keep_last=5,older_than_days=30); give keep_last or the versions to delete instead",
                    field="keep_last")
            return self.retention.apply(caller, name, dry_run)
        return self.service.cleanup(caller, name, keep_last, versions, dry_run)
