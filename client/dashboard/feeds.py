"""Fan-out of registry streams to browsers: one registry stream per job and per alert feed.

Hand-written because it is the dashboard's own logic: each registry event is encoded once as an
SSE frame (``id`` = the job's event sequence), kept in a :class:`Feed`, and every browser follows
the feed from its Last-Event-ID, so a reconnect resumes after the last frame it saw with no gap
and no duplicate, and fifty browsers on one job cost the registry one WatchRetrainJob stream.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client.client import model_type_name
from aqimodels.client.dashboard.registry import AsyncRegistry
from aqimodels.client.errors import (
    AqiModelsError,
    BackendUnavailableError,
    CancelledError,
    DeadlineExceededError,
    PermissionDeniedError,
    UnauthenticatedError,
)

log = structlog.get_logger(__name__)

TERMINAL = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED,
                      pb.JOB_STATE_INTERRUPTED})
_RETRYABLE = (BackendUnavailableError, DeadlineExceededError, CancelledError)


def state_name(state: int) -> str:
    if state not in pb.JobState.values():
        return "unknown"
    return pb.JobState.Name(pb.JobState.ValueType(state)).removeprefix("JOB_STATE_").lower()


def num(x: float) -> float | None:
    """A float for JSON (NaN and infinities are not JSON)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def frame(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    """One SSE frame; JSON data is one line, so it needs no multi-line ``data:`` handling."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n".encode()


def _ms(ts: Any) -> int:
    return int(ts.seconds * 1000 + ts.nanos // 1_000_000)


def event_to_dict(ev: pb.RetrainEvent) -> dict[str, Any]:
    """A relayed job event as the browser sees it, with a line of text for the event log."""
    out: dict[str, Any] = {"seq": ev.sequence, "job_id": ev.job_id, "time": _ms(ev.time),
                           "state": state_name(ev.state), "model_type": model_type_name(ev.model_type)}
    kind = ev.WhichOneof("event") or "state"
    if kind == "queued":
        q = ev.queued
        out.update(kind="queued", position=q.position, reason=q.reason,
                   text="queued" + (f" at position {q.position}" if q.position else "")
                   + (f": {q.reason}" if q.reason and q.reason != "queued" else ""))
    elif kind == "dispatched":
        out.update(kind="dispatched", worker=ev.dispatched.worker, text=f"dispatched to {ev.dispatched.worker}")
    elif kind == "progress":
        p = ev.progress
        sub = p.WhichOneof("event") or "progress"
        out.update(kind=sub, worker_time=_ms(p.time) if p.HasField("time") else None,
                   worker_time_us=(p.time.seconds * 1_000_000 + p.time.nanos // 1000) if p.HasField("time") else None)
        if sub == "epoch":
            e = p.epoch
            out.update(epoch=e.epoch, total_epochs=e.total_epochs, loss=num(e.loss),
                       validation_rmse=num(e.validation_rmse), member=e.member,
                       text=(f"{e.member + ': ' if e.member else ''}epoch {e.epoch}/{e.total_epochs}"
                             f" loss {e.loss:.5g} validation rmse {e.validation_rmse:.5g}"))
        elif sub == "started":
            out.update(total_steps=p.started.total_steps, run_id=p.started.run_id,
                       text=f"started: run {p.started.run_id}, {p.started.total_steps} steps")
        elif sub == "data_loaded":
            d = p.data_loaded
            out.update(text=f"data loaded: {d.stations} stations, {d.hours} hours, {d.train_samples} train / "
                            f"{d.validation_samples} validation / {d.test_samples} test samples")
        elif sub == "finished":
            out.update(version=p.finished.version, metrics={k: num(v) for k, v in p.finished.metrics.items()},
                       text=f"finished: version {p.finished.version} registered")
        elif sub == "failed":
            out.update(reason=p.failed.reason, text=f"failed: {p.failed.reason}")
        elif sub == "cancelled":
            out.update(reason=p.cancelled.reason, text=f"cancelled: {p.cancelled.reason}")
        else:
            out.update(text=sub.replace("_", " "))
    elif kind == "succeeded":
        pd = ev.succeeded.promotion
        out.update(kind="succeeded", version=ev.succeeded.version.version,
                   promotion={"considered": pd.considered, "promoted": pd.promoted, "metric": pd.metric,
                              "candidate_value": num(pd.candidate_value),
                              "production_value": num(pd.production_value),
                              "production_version": pd.production_version, "reason": pd.reason},
                   text=f"succeeded: version {ev.succeeded.version.version}"
                        + (f"; promotion: {pd.reason}" if pd.reason else ""))
    elif kind == "ended":
        out.update(kind="ended", reason=ev.ended.reason, text=f"{state_name(ev.ended.state)}: {ev.ended.reason}")
    else:
        out.update(kind="state", text=state_name(ev.state))
    return out


class Feed:
    """Frames with increasing integer sequences, followed by any number of readers.

    Args:
        keep: the most frames kept (older ones are dropped; None keeps all, as a job's feed does).
    """

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep
        self._seqs: list[int] = []
        self._frames: list[bytes] = []
        self._wake = asyncio.Event()
        self._beat: asyncio.Event | None = None  # the wake-up that was a heartbeat, not a frame
        self.closed = False

    @property
    def last_seq(self) -> int:
        return self._seqs[-1] if self._seqs else 0

    def publish(self, seq: int, data: bytes) -> None:
        if self._seqs and seq <= self._seqs[-1]:
            return  # a replay after a reconnect to the registry: already here
        self._seqs.append(seq)
        self._frames.append(data)
        if self.keep is not None and len(self._seqs) > 2 * self.keep:
            del self._seqs[:-self.keep], self._frames[:-self.keep]
        self._notify()

    def close(self) -> None:
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    def heartbeat(self) -> None:
        """Wakes every follower without a frame: each writes a comment line (the Hub calls it every 15 s)."""
        self._beat = self._wake
        self._notify()

    async def follow(self, after: int) -> AsyncIterator[bytes]:
        """Every frame with a sequence above ``after``, then new ones as they come, until closed.

        No timer per follower: a shared :meth:`heartbeat` makes idle followers write a comment line.
        """
        while True:
            wake = self._wake  # taken before looking, so a publish in between is not missed
            i = bisect.bisect_right(self._seqs, after)
            if i < len(self._seqs):
                after = self._seqs[-1]
                # Everything pending in one write: a follower that fell behind (or replays) catches up
                # in one send instead of one per frame.
                yield self._frames[i] if i == len(self._frames) - 1 else b"".join(self._frames[i:])
                continue
            if self.closed:
                return
            await wake.wait()
            if self._beat and self._beat is wake:
                yield b": ping\n\n"  # a heartbeat woke it: keeps proxies open, finds gone browsers


class _Shared:
    """A registry stream run for its followers: started by the first, dropped a while after the last."""

    def __init__(self, registry: AsyncRegistry, token: str | None) -> None:
        self.registry = registry
        self.token = token
        self.followers = 0
        self.idle_since = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def acquire(self, token: str | None) -> None:
        self.followers += 1
        if token:
            self.token = token  # the newest follower's token: a revoked one is replaced on the next retry

    def release(self) -> None:
        self.followers -= 1
        if self.followers == 0:
            self.idle_since = time.monotonic()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class JobFeed(_Shared):
    """One WatchRetrainJob stream of one job and the frames of every event it relayed."""

    def __init__(self, registry: AsyncRegistry, job_id: str, token: str | None) -> None:
        super().__init__(registry, token)
        self.job_id = job_id
        self.feed = Feed()
        self.failed: str = ""
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"watch-{job_id}")

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                async for ev in self.registry.watch_job(self.token, self.job_id, self.feed.last_seq):
                    data = event_to_dict(ev)
                    self.feed.publish(ev.sequence, frame("job", data, str(ev.sequence)))
                    for listener in self.listeners:
                        listener(data)
                    delay = 0.2
                    if ev.state in TERMINAL:
                        break
                self.feed.close()  # the registry ends the stream when the job has ended
                return
            except _RETRYABLE as exc:
                log.info("job_watch_retrying", job_id=self.job_id, error=str(exc), delay_s=delay)
            except (UnauthenticatedError, PermissionDeniedError) as exc:
                if not self.followers:
                    self._fail(exc)
                    return
            except AqiModelsError as exc:
                self._fail(exc)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _fail(self, exc: AqiModelsError) -> None:
        self.failed = f"{exc.code.name}: {exc.message}"
        self.feed.publish(self.feed.last_seq + 1, frame("problem", {"message": self.failed}))
        self.feed.close()


class AlertFeed(_Shared):
    """One WatchAlerts stream (every model) and the latest alerts, with the dashboard's own sequence.

    Alerts carry no sequence of their own, so frames are numbered here; the id is ``<boot>.<n>``
    with a per-process boot tag, and an id from another dashboard process replays the whole buffer.
    """

    def __init__(self, registry: AsyncRegistry, token: str | None, keep: int = 500) -> None:
        super().__init__(registry, token)
        self.boot = secrets.token_hex(4)
        self.feed = Feed(keep)
        self.connected = False

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="watch-alerts")

    def after(self, last_event_id: str) -> int:
        boot, _, n = last_event_id.partition(".")
        return int(n) if boot == self.boot and n.isdigit() else 0

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                self.connected = True
                async for alert in self.registry.watch_alerts(self.token):
                    seq = self.feed.last_seq + 1
                    data = {"id": alert.id, "time": _ms(alert.time), "model_name": alert.model_name,
                            "version": alert.version, "ratio": num(alert.ratio), "message": alert.message,
                            "health": pb.ModelHealth.Name(alert.health).removeprefix("MODEL_HEALTH_").lower()}
                    self.feed.publish(seq, frame("alert", data, f"{self.boot}.{seq}"))
                    delay = 0.2
            except (UnauthenticatedError, PermissionDeniedError) as exc:
                log.warning("alert_watch_refused", error=str(exc))
                if not self.followers:
                    self.connected = False
                    return
            except AqiModelsError as exc:
                log.info("alert_watch_retrying", error=str(exc), delay_s=delay)
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


class Hub:
    """The dashboard's shared streams: job feeds by id (kept a while after their last follower) and alerts."""

    def __init__(self, registry: AsyncRegistry, token: str | None = None, linger_seconds: float = 120.0,
                 heartbeat_seconds: float = 15.0) -> None:
        self.registry = registry
        self.heartbeat_seconds = heartbeat_seconds
        self.extra: list[StatusFeed] = []  # other shared feeds that want heartbeats
        self.token = token  # the dashboard's own token, when it has one, runs the shared streams
        self.linger_seconds = linger_seconds
        self.jobs: dict[str, JobFeed] = {}
        self.alerts = AlertFeed(registry, token)
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="feed-sweeper")

    def stop(self) -> None:
        for shared in [*self.jobs.values(), self.alerts]:
            shared.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()

    def job(self, job_id: str, token: str | None) -> JobFeed:
        """The job's feed, started on first use; the caller must :meth:`JobFeed.release` it."""
        feed = self.jobs.get(job_id)
        if feed is None or (feed.failed and feed.followers == 0):
            feed = JobFeed(self.registry, job_id, self.token or token)
            self.jobs[job_id] = feed
        feed.acquire(None if self.token else token)
        return feed

    def alert_feed(self, token: str | None) -> AlertFeed:
        self.alerts.acquire(None if self.token else token)
        self.alerts.start()
        return self.alerts

    def feeds(self) -> list[Feed]:
        return [f.feed for f in self.jobs.values()] + [self.alerts.feed, *(f.feed for f in self.extra)]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            for f in self.feeds():
                f.heartbeat()
            now = time.monotonic()
            for job_id, job in list(self.jobs.items()):
                if job.followers == 0 and now - job.idle_since > self.linger_seconds:
                    job.stop()
                    del self.jobs[job_id]


def status_summary(status: pb.GetStatusResponse) -> dict[str, Any]:
    """What the overview updates live: running jobs, model health and pointers, backend and workers."""
    jobs = []
    models = []
    for ms in status.models:
        models.append({"name": ms.model.name, "health": pb.ModelHealth.Name(ms.health).removeprefix("MODEL_HEALTH_")
                       .lower(), "production": ms.model.production_version, "staging": ms.model.staging_version})
        for j in ms.running_jobs:
            jobs.append({"job_id": j.job_id, "model_name": j.model_name, "state": state_name(j.state),
                         "epoch": j.epoch, "total_epochs": j.total_epochs, "queue_position": j.queue_position,
                         "worker": j.worker})
    return {"jobs": jobs, "models": models,
            "backend": {"healthy": status.backend.healthy, "message": status.backend.message,
                        "latency_ms": num(round(status.backend.latency_ms, 2))},
            "workers": [{"target": w.target, "healthy": w.healthy, "running": w.running, "capacity": w.capacity,
                         "message": w.message} for w in status.workers]}


class StatusFeed(_Shared):
    """GetStatus polled once for every overview page open, plus the live epochs of the running jobs."""

    def __init__(self, registry: AsyncRegistry, hub: Hub, token: str | None, interval: float = 2.0) -> None:
        super().__init__(registry, token)
        self.hub = hub
        self.interval = interval
        self.feed = Feed(keep=200)
        self.status_seq = 0
        self._last: dict[str, Any] | None = None
        self._followed: dict[str, JobFeed] = {}

    def acquire(self, token: str | None) -> None:
        super().acquire(None if self.hub.token else token)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="status-poll")

    def start_after(self) -> int:
        """Where a new follower starts: at the latest status snapshot."""
        return self.status_seq - 1 if self.status_seq else self.feed.last_seq

    def _publish(self, event: str, data: dict[str, Any]) -> int:
        seq = self.feed.last_seq + 1
        self.feed.publish(seq, frame(event, data))
        return seq

    def _on_job_event(self, data: dict[str, Any]) -> None:
        if data.get("kind") == "epoch" or data.get("state") != "running":
            self._publish("progress", {k: data.get(k) for k in ("job_id", "state", "epoch", "total_epochs", "text")})

    async def _run(self) -> None:
        try:
            while self.followers > 0 or time.monotonic() - self.idle_since < 10:
                try:
                    summary = status_summary(await self.registry.status(self.hub.token or self.token))
                except AqiModelsError as exc:
                    summary = {"error": f"{exc.code.name}: {exc.message}"}
                if summary != self._last:
                    self._last = summary
                    self.status_seq = self._publish("status", summary)
                self._follow_jobs({j["job_id"] for j in summary.get("jobs", []) if j["state"] == "running"})
                await asyncio.sleep(self.interval)
        finally:
            self._follow_jobs(set())

    def _follow_jobs(self, running: set[str]) -> None:
        for job_id in running - self._followed.keys():
            feed = self.hub.job(job_id, self.token)
            feed.listeners.append(self._on_job_event)
            self._followed[job_id] = feed
        for job_id in self._followed.keys() - running:
            feed = self._followed.pop(job_id)
            if self._on_job_event in feed.listeners:
                feed.listeners.remove(self._on_job_event)
            feed.release()
