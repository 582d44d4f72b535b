"""Leases of retrain jobs: renewal, takeover of jobs whose owner is gone, cancel requests.

Every job is owned by one registry process through a lease in its row. One thread per process
scans the active jobs every ``scan_seconds`` (at most 1 s, one indexed query): it renews this
process's leases every third of the lease, takes over jobs whose lease expired (their owner was
killed or its host lost; a graceful stop expires its leases at once), hands cancel requests made
on other replicas to the jobs it owns, lets go of jobs another replica took from it, and keeps
the scan's result as the shared view of running jobs (``status`` reads it: at most one query per
``FRESH_SECONDS``, not one per call).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.server.job_store import ActiveRow, JobStore, now_ms

log = structlog.get_logger(__name__)

FRESH_SECONDS = 0.2  # how old the shared view of running jobs may be when status reads it


class LeaseKeeper:
    """The lease thread of one registry process.

    Args:
        store: the job store (its ``owner`` is this process).
        local: the ids of the active jobs this process runs.
        adopt: takes over a job whose lease this process just claimed.
        let_go: stops following a job another replica took over (without ending it).
        cancel: hands a cancel request (job id, reason) to a job this process runs.
    """

    def __init__(self, store: JobStore, *, local: Callable[[], set[str]], adopt: Callable[[str], None],
                 let_go: Callable[[str], None], cancel: Callable[[str, str], None]) -> None:
        self.store = store
        self.lease_seconds = store.lease_ms / 1000
        self.scan_seconds = min(1.0, self.lease_seconds / 3)
        self._local = local
        self._adopt = adopt
        self._let_go = let_go
        self._cancel = cancel
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_renew = 0.0
        self._snapshot: list[pb.RetrainJob] = []
        self._snapshot_at = -1e9
        self._read_lock = threading.Lock()
        self.renewals = 0  # counters for the benchmark and the logs
        self.scans = 0
        self.takeovers = 0

    def start(self) -> None:
        try:
            self.scan()  # jobs left by a killed predecessor are taken over before the first request
        except Exception as exc:  # noqa: BLE001 - the database is down: the loop retries
            log.warning("job_lease_scan_failed", error=str(exc)[:200])
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-leases")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def active_jobs(self, max_age: float = FRESH_SECONDS) -> list[pb.RetrainJob]:
        """The queued and running jobs of every replica, at most ``max_age`` seconds old (read again
        when the last read is older: one query per ``max_age`` however often status is asked)."""
        with self._read_lock:
            if time.monotonic() - self._snapshot_at > max_age:
                try:
                    self._set_snapshot(self.store.active())
                except Exception as exc:  # noqa: BLE001 - the database is down: the last answer stands
                    log.warning("job_lease_read_failed", error=str(exc)[:200])
            return list(self._snapshot)

    def _set_snapshot(self, rows: list[ActiveRow]) -> None:
        self._snapshot = [pb.RetrainJob.FromString(r.job) for r in rows]
        self._snapshot_at = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.scan_seconds):
            try:
                self.scan()
            except Exception as exc:  # noqa: BLE001 - the database is down: the next scan retries
                log.warning("job_lease_scan_failed", error=str(exc)[:200])

    def scan(self) -> None:
        if time.monotonic() - self._last_renew >= self.lease_seconds / 3:
            self.store.renew()
            self.renewals += 1
            self._last_renew = time.monotonic()
        rows = self.store.active()
        self.scans += 1
        self._set_snapshot(rows)
        local = self._local()
        now = now_ms()
        me = self.store.owner
        for row in rows:
            if row.job_id in local:
                if row.owner != me:
                    log.warning("job_lease_lost", job_id=row.job_id, new_owner=row.owner)
                    self._let_go(row.job_id)
                elif row.cancel_reason:
                    self._cancel(row.job_id, row.cancel_reason)
            elif row.lease_expires_ms < now and not self._stop.is_set():
                self._take_over(row, now)

    def _take_over(self, row: ActiveRow, now: int) -> None:
        if not self.store.claim(row):
            return  # another replica was quicker
        self.takeovers += 1
        log.info("job_taken_over", job_id=row.job_id, previous_owner=row.owner,
                 lease_expired_ms_ago=now - row.lease_expires_ms if row.lease_expires_ms else None)
        self._adopt(row.job_id)
