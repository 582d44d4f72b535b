"""Delivery of webhooks on background threads: leases, in-order delivery with retries, the HTTP sender.

Every registry process runs one lease thread and one delivery thread per webhook it holds; no
RPC waits on a receiver except TestWebhook and RedeliverWebhook, whose purpose is to wait for one
(bounded by the send timeout and the caller's deadline).

One replica at a time per webhook: the lease thread claims a webhook whose lease expired with a
conditional UPDATE (one replica wins), renews its leases every third of
``webhook_lease_seconds``, and stops the delivery thread of a webhook it no longer holds (taken
over, or deleted). A delivery thread starts an attempt only while its lease has more than the
send timeout left, and moves the cursor with an UPDATE that holds only while it is the owner, so
two replicas never both deliver an event, except when a replica stalls longer than the lease
in the middle of an attempt: the one that takes over then sends that event again (at least once).
A graceful stop releases the leases at once.

In order, at least once: the thread reads the events after the webhook's cursor (filtered by its
types and model) and delivers them one by one; the cursor moves past an event after a 2xx
answer, or after its retries ran out: attempts are retried with exponential backoff (from
``webhook_backoff_seconds``, doubling, at most ``webhook_backoff_max_seconds``) for
``webhook_retry_seconds`` from the first attempt; then the last attempt is logged ``failed`` and
the cursor moves on (the event can still be sent again with RedeliverWebhook). A webhook taken
over keeps counting from the attempts already logged.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import httpx
import structlog
from aqimodels.server.changes import PROCESS_ID
from aqimodels.server.config import ServerConfig
from aqimodels.process.deadlines import Deadline
from aqimodels.server.webhooks import (
    DELIVERED,
    DELIVERY_HEADER,
    EVENT,
    FAILED,
    RETRYING,
    SEQUENCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WEBHOOK_HEADER,
    Delivery,
    EventSource,
    Webhook,
    WebhookStore,
    body_of,
    now_ms,
    sign,
)

log = structlog.get_logger(__name__)

BATCH = 100  # events read per query
PRUNE_EVERY_SECONDS = 60.0
USER_AGENT = "aqimodels-webhooks/0.1"


@dataclass(frozen=True)
class DeliverySettings:
    """The delivery part of ServerConfig (its defaults and checks are there: ``webhooks_from_env``)."""

    retry_seconds: float
    backoff_seconds: float
    backoff_max_seconds: float
    timeout_seconds: float
    lease_seconds: float
    poll_seconds: float
    log_retention_days: float

    @classmethod
    def of(cls, config: ServerConfig) -> DeliverySettings:
        return cls(config.webhook_retry_seconds, config.webhook_backoff_seconds, config.webhook_backoff_max_seconds,
                   config.webhook_timeout_seconds, config.webhook_lease_seconds, config.webhook_poll_seconds,
                   config.webhook_log_retention_days)

    def timeout(self, seconds: float | None = None) -> httpx.Timeout:
        total = self.timeout_seconds if seconds is None else max(0.05, min(seconds, self.timeout_seconds))
        return httpx.Timeout(total, connect=min(5.0, total))


class Sender:
    """POSTs signed bodies; logs every attempt in the delivery log."""

    def __init__(self, store: WebhookStore, settings: DeliverySettings) -> None:
        self.store = store
        self.settings = settings

    def post(self, client: httpx.Client, hook: Webhook, secret: bytes, sequence: int, body: bytes,
             delivery_id: str, timeout: httpx.Timeout | None = None) -> tuple[int, float, str]:
        """One POST: (status code or 0, latency in ms, error or "")."""
        stamp = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   SIGNATURE_HEADER: sign(secret, stamp, body), TIMESTAMP_HEADER: str(stamp),
                   SEQUENCE_HEADER: str(sequence), DELIVERY_HEADER: delivery_id, WEBHOOK_HEADER: hook.id}
        started = time.perf_counter()
        try:
            answer = client.post(hook.url, content=body, headers=headers,
                                 timeout=timeout or self.settings.timeout())
        except httpx.HTTPError as exc:
            return 0, (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"[:500]
        latency = (time.perf_counter() - started) * 1000
        if 200 <= answer.status_code < 300:
            return answer.status_code, latency, ""
        return answer.status_code, latency, f"HTTP {answer.status_code}: {answer.text[:200]}"

    def send_now(self, hook: Webhook, secret: bytes, sequence: int, body: bytes, attempt: int, kind: str,
                 deadline: Deadline) -> Delivery:
        """One attempt on the caller's thread (TestWebhook, RedeliverWebhook), within its deadline; logged."""
        left = deadline.remaining()
        delivery_id = uuid.uuid4().hex
        with httpx.Client(follow_redirects=False) as client:
            status, latency, error = self.post(client, hook, secret, sequence, body, delivery_id,
                                               self.settings.timeout(None if left is None else left - 0.5))
        delivery = Delivery(delivery_id, hook.id, sequence, attempt, status, round(latency, 3), error, now_ms(),
                            DELIVERED if not error else FAILED, kind)
        self.store.log(delivery)
        return delivery


class _Worker:
    """The delivery thread of one webhook this process holds."""

    def __init__(self, dispatcher: WebhookDispatcher, webhook_id: str) -> None:
        self.d = dispatcher
        self.id = webhook_id
        self.quit = threading.Event()
        self.valid_until = 0.0  # monotonic end of the lease as this process knows it
        self.thread = threading.Thread(target=self._run, name=f"webhook-{webhook_id[:8]}", daemon=True)

    def _stopping(self) -> bool:
        return self.quit.is_set() or self.d.stopped.is_set()

    def _run(self) -> None:
        with httpx.Client(follow_redirects=False) as client:
            while not self._stopping():
                try:
                    cursor = self._batch(client)
                    if cursor is not None:  # none after the cursor: wait for the next commit (at once
                        self.d.events.wait_after(cursor, self.d.settings.poll_seconds)  # when local)
                except Exception as exc:  # noqa: BLE001 - the database is down: try again after a pause
                    log.warning("webhook_delivery_error", webhook_id=self.id, error=str(exc)[:200])
                    self.quit.wait(max(1.0, self.d.settings.poll_seconds))

    def _batch(self, client: httpx.Client) -> int | None:
        """Delivers the events after the cursor; the sequence to wait after when it is up to date, else None."""
        found = self.d.store.get(self.id)
        if found is None:
            self.quit.set()
            return None
        hook, secret = found
        latest = self.d.events.latest_sequence()  # committed in sequence order: all of them up to it are in
        events = self.d.events.read_after(hook.cursor, BATCH, (hook.model_name,) if hook.model_name else (),
                                          hook.event_types)
        for event in events:
            moved = self._deliver(client, hook, secret, event.sequence, body_of(event)) if not self._stopping() else None
            if moved is None:
                return None
            if not moved:
                log.warning("webhook_lease_lost", webhook_id=hook.id, sequence=event.sequence)
                self.quit.set()
                return None
        if len(events) == BATCH:
            return None  # maybe more: read on at once
        if events:
            # Up to date: wait for a commit after the last one delivered instead of reading the
            # webhook and the log again at once (that second round of reads competed with the
            # next change's writes on SQLite for every event).
            return events[-1].sequence
        if latest > hook.cursor:  # none of the events up to latest is for this webhook
            self.d.store.advance(hook.id, self.d.owner, latest)
        return latest

    def _wait_for_lease(self) -> bool:
        """Waits until the lease has more than the send timeout left; False when the worker should stop."""
        need = self.d.settings.timeout_seconds + 1.0
        while self.valid_until - time.monotonic() < need:
            if self._stopping():
                return False
            self.quit.wait(0.05)
        return not self._stopping()

    def _deliver(self, client: httpx.Client, hook: Webhook, secret: bytes, sequence: int, body: bytes) -> bool | None:
        """Attempts until a 2xx or the retry time is over (then logged failed), the last attempt logged with
        the cursor moved past the event in one transaction: True; False: the lease was lost; None: stopped."""
        s = self.d.settings
        attempt, first_ms = self.d.store.attempts(hook.id, sequence)
        first_ms = first_ms or now_ms()
        delay = s.backoff_seconds
        while self._wait_for_lease():
            attempt += 1
            delivery_id = uuid.uuid4().hex
            status, latency, error = self.d.sender.post(client, hook, secret, sequence, body, delivery_id)
            over = now_ms() - first_ms >= s.retry_seconds * 1000
            outcome = DELIVERED if not error else FAILED if over else RETRYING
            if outcome != DELIVERED:
                log.warning("webhook_attempt_failed", webhook_id=hook.id, url=hook.url, sequence=sequence,
                            attempt=attempt, status_code=status, error=error[:200], outcome=outcome)
            moved = self.d.store.log(Delivery(delivery_id, hook.id, sequence, attempt, status, round(latency, 3),
                                              error, now_ms(), outcome, EVENT),
                                     advance_owner=self.d.owner if outcome != RETRYING else "")
            if outcome != RETRYING:
                return moved
            left = s.retry_seconds - (now_ms() - first_ms) / 1000
            if self.quit.wait(max(0.0, min(delay, left))) or self.d.stopped.is_set():
                return None
            delay = min(delay * 2, s.backoff_max_seconds)
        return None


class WebhookDispatcher:
    """This process's share of webhook delivery: the lease thread and the delivery threads."""

    def __init__(self, store: WebhookStore, events: EventSource, settings: DeliverySettings,
                 owner: str = "") -> None:
        self.store = store
        self.events = events
        self.settings = settings
        self.sender = Sender(store, settings)
        self.owner = owner or f"{PROCESS_ID}-{uuid.uuid4().hex[:8]}"
        self.stopped = threading.Event()
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self.scan_seconds = min(1.0, settings.lease_seconds / 3)

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_seconds * 1000)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="webhook-leases", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self.scan()
            except Exception as exc:  # noqa: BLE001 - the database is down: the next scan retries
                log.warning("webhook_lease_scan_failed", error=str(exc)[:200])
            self.stopped.wait(self.scan_seconds)

    def scan(self) -> None:
        started = time.monotonic()
        renewed = self.store.renew(self.owner, self.lease_ms)
        hooks = self.store.all()
        now = now_ms()
        with self._lock:
            for hook_id, w in list(self._workers.items()):
                if hook_id in renewed and w.thread.is_alive() and not w.quit.is_set():
                    w.valid_until = started + self.settings.lease_seconds
                else:
                    w.quit.set()
                    del self._workers[hook_id]
            for hook in hooks:
                if self.stopped.is_set() or hook.id in self._workers or hook.lease_expires_ms >= now:
                    continue
                if self.store.claim(hook.id, self.owner, self.lease_ms):
                    w = _Worker(self, hook.id)
                    w.valid_until = time.monotonic() + self.settings.lease_seconds - 0.5
                    self._workers[hook.id] = w
                    log.info("webhook_claimed", webhook_id=hook.id, previous_owner=hook.lease_owner or None)
                    w.thread.start()
        if time.monotonic() - self._last_prune >= PRUNE_EVERY_SECONDS:
            self._last_prune = time.monotonic()
            pruned = self.store.prune(now_ms() - int(self.settings.log_retention_days * 86_400_000))
            if pruned:
                log.info("webhook_log_pruned", rows=pruned)

    def stop(self, timeout: float = 2.0) -> None:
        """Stops delivering and releases the leases (another replica takes over at its next scan)."""
        self.stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.quit.set()
        end = time.monotonic() + timeout
        for w in workers:
            w.thread.join(max(0.0, end - time.monotonic()))
        try:
            self.store.release(self.owner)
        except Exception as exc:  # noqa: BLE001 - the leases then expire by themselves
            log.warning("webhook_lease_release_failed", error=str(exc)[:200])
