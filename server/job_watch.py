"""Following retrain jobs: replay of stored events, then live ones, for Retrain and WatchRetrainJob.

A job this process runs is followed from memory (its events at once); any other job, run by
another replica or already ended, from the table, polled. A job this process lets go of (a
graceful stop, a takeover by another replica) switches its followers to the table, so a
follower sees every sequence number once, in order, whoever runs the job. ``JobWatching`` is
mixed into ``JobManager``, which provides ``store``, ``_jobs`` and ``_load``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.server.job_relay import Job
from aqimodels.server.job_store import TERMINAL, JobStore
from aqimodels.server.subscriptions import follow

POLL_SECONDS = 0.5


class JobWatching:
    """The followers of jobs (a mixin of JobManager)."""

    store: JobStore
    _jobs: dict[str, Job]
    _jobs_lock: threading.Lock

    def _load(self, job_id: str) -> pb.RetrainJob:
        raise NotImplementedError  # JobManager's

    def follow(self, job_ids: list[str], stop: threading.Event) -> Iterator[pb.RetrainEvent]:
        """Merges the events of several jobs (replayed, then live) until all have ended or ``stop`` is set."""
        if len(job_ids) == 1:  # one job: its events straight from its queue, without a merging thread
            yield from self._watch_iter(job_ids[0], 0, stop)
            return
        merged: queue.Queue[tuple[str, pb.RetrainEvent | None]] = queue.Queue()
        inner = threading.Event()
        for job_id in job_ids:
            def pump(jid: str = job_id) -> None:
                try:
                    for ev in self._watch_iter(jid, 0, inner):
                        merged.put((jid, ev))
                finally:
                    merged.put((jid, None))

            threading.Thread(target=pump, daemon=True, name="follow").start()
        open_jobs = set(job_ids)
        try:
            while open_jobs and not stop.is_set():
                try:
                    jid, ev = merged.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if ev is None:
                    open_jobs.discard(jid)
                else:
                    yield ev
        finally:
            inner.set()

    def _watch_iter(self, job_id: str, after: int, stop: threading.Event) -> Iterator[pb.RetrainEvent]:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            yield from self._poll(job_id, after, stop)
            return
        replay, q = self._subscribe(job, after)
        last = after
        try:
            for ev in replay:
                last = ev.sequence
                yield ev
            for live in follow(q, lambda: not stop.is_set(), POLL_SECONDS):
                if live is None:  # nothing for a poll: still this replica's job?
                    if job.let_go.is_set():
                        break
                elif live.sequence > last:
                    last = live.sequence
                    yield live
            else:  # the job's end here (or a stop): followed elsewhere only when let go of unfinished
                if not (job.let_go.is_set() and job.proto.state not in TERMINAL):
                    return
        finally:
            self._unsubscribe(job, q)
        if not stop.is_set():  # let go of: another replica continues the job, follow it there
            yield from self._poll(job_id, last, stop)

    def _poll(self, job_id: str, after: int, stop: threading.Event) -> Iterator[pb.RetrainEvent]:
        """A job another replica runs, or one that ended: its stored events, polled."""
        last = after
        while not stop.is_set():
            for ev in self.store.events_after(job_id, last):
                last = ev.sequence
                yield ev
                if ev.state in TERMINAL:
                    return
            proto = self._load(job_id)
            if proto.state in TERMINAL and proto.last_sequence <= last:
                return
            stop.wait(POLL_SECONDS)

    def _subscribe(self, job: Job, after: int) -> tuple[list[pb.RetrainEvent], queue.Queue[pb.RetrainEvent | None]]:
        q: queue.Queue[pb.RetrainEvent | None] = queue.Queue()
        with job.lock:
            replay = [e for e in job.events if e.sequence > after]
            if job.proto.state in TERMINAL or job.let_go.is_set():
                q.put(None)
            else:
                job.listeners.append(q)
        return replay, q

    def _unsubscribe(self, job: Job, q: queue.Queue[pb.RetrainEvent | None]) -> None:
        with job.lock:
            if q in job.listeners:
                job.listeners.remove(q)
