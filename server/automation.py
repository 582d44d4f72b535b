"""Automation the operator configures: scheduled retraining and the retention policy.

Scheduled retraining (``AQIMODELS_RETRAIN_SCHEDULE``, cron syntax in UTC) starts retrains through
the job manager. Every replica runs the schedule; a scheduled time runs once across all of them:
the replica that inserts the row keyed by (schedule, scheduled time) into
``aqimodels_schedule_claims`` runs it, the others see the unique key refuse their insert. A
replica that was down at a scheduled time does not catch up on it: missed times are skipped.

The retention policy (``AQIMODELS_RETENTION``) runs after each successful retrain, through
:meth:`RegistryService.cleanup`, so aliased versions are never touched and every deletion is
audited. With both rules a version goes only when both let it go: it is not among the newest N
and it is older than D days.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
import structlog
from croniter import croniter
from sqlalchemy.exc import IntegrityError

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.domain import Caller, model_type_value
from aqimodels.client.errors import AqiModelsError
from aqimodels.server.config import ServerConfig
from aqimodels.server.db import Database, metadata
from aqimodels.server.service import CleanupResult, RegistryService

if TYPE_CHECKING:
    from aqimodels.server.jobs import JobManager

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
RETRAIN_SCHEDULE = "retrain"

claims_table = sa.Table(
    "aqimodels_schedule_claims",
    metadata,
    sa.Column("schedule", sa.String(100), primary_key=True),
    sa.Column("scheduled_ms", sa.BigInteger, primary_key=True),
    sa.Column("replica", sa.String(64), nullable=False),
    sa.Column("claimed_ms", sa.BigInteger, nullable=False),
    sa.Column("job_ids", sa.Text, nullable=False, default=""),
)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


class RetrainScheduler:
    """Fires retrains at the cron schedule's times, once per time across replicas.

    Args:
        clock: returns the current time as an aware datetime (injectable for tests).
    """

    def __init__(self, config: ServerConfig, db: Database, jobs: JobManager, clock: Clock = utc_now) -> None:
        self.expression = config.retrain_schedule
        self.config = config
        self.db = db
        self.jobs = jobs
        self.clock = clock
        self.replica = uuid.uuid4().hex[:12]
        self.won: list[datetime] = []
        self.lost: list[datetime] = []
        # The first due time is fixed now, at construction, so that every replica started before a
        # scheduled time competes for it.
        self.next_time: datetime = croniter(self.expression, self.clock()).get_next(datetime)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retrain-scheduler", daemon=True)
        self._thread.start()
        log.info("retrain_schedule_started", schedule=self.expression, next_time=self.next_time.isoformat())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("retrain_schedule_tick_failed")
            self._stop.wait(self.config.monitor_poll_seconds)

    def tick(self) -> datetime | None:
        """Runs the due scheduled time, if any; returns it when this replica ran it."""
        with self._lock:
            now = self.clock()
            if now < self.next_time:
                return None
            due = self.next_time
            self.next_time = croniter(self.expression, now).get_next(datetime)
        if not self._claim(due):
            self.lost.append(due)
            log.info("scheduled_retrain_claimed_elsewhere", scheduled_time=due.isoformat())
            return None
        self.won.append(due)
        self._run(due)
        return due

    def _claim(self, due: datetime) -> bool:
        try:
            with self.db.begin() as conn:
                conn.execute(claims_table.insert().values(
                    schedule=RETRAIN_SCHEDULE, scheduled_ms=_ms(due), replica=self.replica,
                    claimed_ms=int(time.time() * 1000), job_ids=""))
        except IntegrityError:
            return False
        return True

    def _run(self, due: datetime) -> None:
        stamp = due.strftime("%Y-%m-%dT%H:%MZ")
        caller = Caller("scheduler", "admin", f"schedule-{stamp}")
        request = pb.RetrainRequest(model_types=[model_type_value(m) for m in self.config.retrain_models],
                                    dataset=wpb.DatasetSpec(spec=self.config.retrain_dataset))
        models = ",".join(self.config.retrain_models) or "all"
        # Intent first, as every other change: the record exists before the jobs do.
        audit_id = self.db.audit_begin(actor=caller.name, role=caller.role, action="ScheduledRetrain", model_name="",
                                       version=0, before={}, request_id=caller.request_id,
                                       message=f"schedule {self.expression!r}: retrain {models} at {stamp}")
        try:
            job_ids: list[str] = self.jobs.submit(request, caller)
        except AqiModelsError as exc:
            self.db.audit_finish(audit_id, outcome="skipped", after={"scheduled_time": stamp, "models": models},
                                 message=f"scheduled retrain at {stamp} not started: {exc.message}"[:500])
            log.warning("scheduled_retrain_skipped", scheduled_time=stamp, reason=exc.message)
            return
        except Exception as exc:
            self.db.audit_finish(audit_id, outcome="failed", after={"scheduled_time": stamp, "models": models},
                                 message=f"scheduled retrain at {stamp} failed: {exc}"[:500])
            raise
        with self.db.begin() as conn:
            conn.execute(claims_table.update().where(
                claims_table.c.schedule == RETRAIN_SCHEDULE, claims_table.c.scheduled_ms == _ms(due)).values(
                job_ids=",".join(job_ids)))
        self.db.audit_finish(audit_id, outcome="ok",
                             after={"scheduled_time": stamp, "models": models, "job_ids": job_ids,
                                    "auto_promote": self.config.auto_promotion},
                             message=f"schedule {self.expression!r}: started {', '.join(job_ids)}")
        log.info("scheduled_retrain_started", scheduled_time=stamp, job_ids=job_ids)


class RetentionPolicy:
    """Deletes old versions after each successful retrain, by ``keep_last`` and/or age."""

    def __init__(self, config: ServerConfig, service: RegistryService, clock: Clock = utc_now) -> None:
        self.keep_last = config.retention_keep_last
        self.older_than_days = config.retention_older_than_days
        self.service = service
        self.clock = clock

    @property
    def configured(self) -> bool:
        return bool(self.keep_last or self.older_than_days)

    def describe(self) -> str:
        parts = ([f"keep_last={self.keep_last}"] if self.keep_last else []) + (
            [f"older_than_days={self.older_than_days:g}"] if self.older_than_days else [])
        return ",".join(parts)

    def apply(self, caller: Caller, name: str, dry_run: bool) -> CleanupResult:
        """The policy's effect on one model (nothing deleted on a dry run)."""
        older_than_ms = (_ms(self.clock() - timedelta(days=self.older_than_days))
                         if self.older_than_days else None)
        return self.service.cleanup(caller, name, self.keep_last, [], dry_run, older_than_ms=older_than_ms)

    def after_retrain(self, name: str, version: int) -> None:
        """The job manager's success hook."""
        result = self.apply(Caller("retention-policy", "admin", f"retention-{name}-v{version}"), name, False)
        if result.deleted:
            log.info("retention_applied", model=name, policy=self.describe(), deleted=result.deleted,
                     kept=result.kept)
