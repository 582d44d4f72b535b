"""Webhooks: the registry's events POSTed, signed, to URLs an admin configured.

A webhook is a URL, the event types it wants (none: all), an optional model and a secret. It has
a cursor, the sequence of the last event of the event log handled for it; delivery reads the
events after the cursor (:mod:`aqimodels.server.webhook_delivery`), so a webhook gets the events
committed after its creation, at least once and in sequence order.

Signature: ``X-Aqimodels-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
with ``X-Aqimodels-Timestamp: <unix seconds>``. The timestamp is inside the signed bytes, so a
captured request cannot be replayed later with a fresh timestamp: the receiver checks the HMAC
and refuses timestamps older than its tolerance (the README's check uses five minutes).

Secrets are kept as given, in the ``aqimodels_webhooks`` table of the registry's database: an
HMAC is computed from the secret itself, so it cannot be stored hashed the way bearer tokens are.
That is acceptable because that database is already the registry's trust root (whoever can write
it can move production aliases and rewrite the audit log), it is not reachable by clients, and a
webhook secret only lets its holder forge deliveries to that one receiver. No RPC answer, log line
or audit record carries a secret: answers are built from :class:`Webhook`, which has none, and the
audit records name the webhook by id and URL. A URL with a user name or password is refused, so
credentials do not sit in the URL either.

The delivery log (``aqimodels_webhook_deliveries``) has a row per attempt (event, test and
redelivery), kept ``webhook_log_retention_days`` and pruned once a minute by the delivery thread
of every replica; a deleted webhook's rows go with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import sqlalchemy as sa
from aqimodels.client.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, quote
from aqimodels.server import paging
from aqimodels.server.db import Database, audit_table, metadata
from aqimodels.server.domain import Page
from aqimodels.server.events import EventType
from aqimodels.client.domain import Caller, validate_name

MAX_URL_LENGTH = 256  # the edge's cap on a name or identifier field (server/interceptors.py)
MAX_SECRET_BYTES = 256
MIN_SECRET_BYTES = 16
MAX_WEBHOOKS = 100
MAX_ERROR_CHARS = 500

SIGNATURE_HEADER = "X-Aqimodels-Signature"
TIMESTAMP_HEADER = "X-Aqimodels-Timestamp"
SEQUENCE_HEADER = "X-Aqimodels-Event-Sequence"
DELIVERY_HEADER = "X-Aqimodels-Delivery"
WEBHOOK_HEADER = "X-Aqimodels-Webhook"

# Outcomes of an attempt (the proto's WebhookDeliveryOutcome names, lower case).
DELIVERED, RETRYING, FAILED = "delivered", "retrying", "failed"
# What an attempt delivered: an event of the log in order, a test, or an event again on request.
EVENT, TEST, REDELIVERY = "event", "test", "redelivery"

webhooks_table = sa.Table(
    "aqimodels_webhooks",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("url", sa.String(MAX_URL_LENGTH), nullable=False),
    sa.Column("event_types", sa.Text, nullable=False),  # JSON list of EventType names; [] = all
    sa.Column("model_name", sa.String(500), nullable=False),  # "" = every model
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("create_ms", sa.BigInteger, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("cursor", sa.BigInteger, nullable=False),  # the last event sequence handled
    sa.Column("lease_owner", sa.String(64), nullable=False),  # the process delivering it ("" none)
    sa.Column("lease_expires_ms", sa.BigInteger, nullable=False),
)

deliveries_table = sa.Table(
    "aqimodels_webhook_deliveries",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("webhook_id", sa.String(32), nullable=False),
    sa.Column("event_sequence", sa.BigInteger, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=False),  # 0: no HTTP answer (see error)
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("time_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Index("ix_aqimodels_webhook_deliveries_hook", "webhook_id", "event_sequence", "seq"),
)


class EventLike(Protocol):
    """An event of the log: its sequence and its JSON form (the body of a delivery)."""

    @property
    def sequence(self) -> int: ...

    def to_json(self) -> dict[str, Any]: ...


class EventSource(Protocol):
    """The durable event log (:class:`aqimodels.server.events.EventLog`), as webhooks read it."""

    def read_after(self, after_sequence: int, limit: int = ..., model_names: Iterable[str] = (),
                   types: Iterable[EventType] = ()) -> Sequence[EventLike]: ...

    def latest_sequence(self) -> int: ...

    def wait_after(self, sequence: int, timeout: float) -> bool: ...


@dataclass(frozen=True)
class Webhook:
    """A webhook as RPCs answer it: never its secret."""

    id: str
    url: str
    event_types: tuple[EventType, ...]
    model_name: str
    create_ms: int
    created_by: str
    cursor: int
    lease_owner: str
    lease_expires_ms: int


@dataclass(frozen=True)
class Delivery:
    """One attempt to deliver to a webhook."""

    id: str
    webhook_id: str
    event_sequence: int
    attempt: int
    status_code: int
    latency_ms: float
    error: str
    time_ms: int
    outcome: str
    kind: str
    seq: int = 0


def now_ms() -> int:
    return int(time.time() * 1000)


def body_of(event: EventLike) -> bytes:
    """The bytes POSTed for an event (compact, keys sorted: the same event gives the same body)."""
    return json.dumps(event.to_json(), separators=(",", ":"), sort_keys=True).encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Aqimodels-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds)."""
    return "sha256=" + hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def validate_url(url: str) -> str:
    """The URL, or INVALID_ARGUMENT naming what is wrong with it."""
    if not url:
        raise InvalidArgumentError("url is required", field="url")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgumentError(f"url is {len(url)} characters long; at most {MAX_URL_LENGTH}", field="url")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise InvalidArgumentError("url holds spaces or control characters", field="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError(f"url {quote(url)} is not a valid URL: {exc}", field="url") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgumentError(f"url {quote(url)} has the scheme {parts.scheme or 'none'!r}; "
                                   "use http:// or https://", field="url")
    if not parts.hostname:
        raise InvalidArgumentError(f"url {quote(url)} names no host", field="url")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgumentError("url holds a user name or password; put no credentials in the URL "
                                   "(the receiver checks the signature made with the secret)", field="url")
    if port == 0:
        raise InvalidArgumentError(f"url {quote(url)} names port 0", field="url")
    if parts.fragment:
        raise InvalidArgumentError(f"url {quote(url)} has a #fragment, which is never sent", field="url")
    return url


def validate_secret(secret: str) -> bytes:
    raw = secret.encode()
    if len(raw) < MIN_SECRET_BYTES:
        raise InvalidArgumentError(f"secret must be at least {MIN_SECRET_BYTES} bytes (got {len(raw)}); "
                                   "e.g. 32 random bytes in hex", field="secret")
    if len(raw) > MAX_SECRET_BYTES:
        raise InvalidArgumentError(f"secret must be at most {MAX_SECRET_BYTES} bytes", field="secret")
    return raw


def validate_id(webhook_id: str, field: str = "webhook_id") -> str:
    if not webhook_id:
        raise InvalidArgumentError(f"{field} is required", field=field)
    if len(webhook_id) != 32 or any(c not in "0123456789abcdef" for c in webhook_id):
        raise InvalidArgumentError(f"{field} {quote(webhook_id)} is not a webhook id (32 hex digits)", field=field)
    return webhook_id


def webhook_from_row(r: Any) -> Webhook:
    return Webhook(id=r["id"], url=r["url"], event_types=tuple(EventType(n) for n in json.loads(r["event_types"])),
                   model_name=r["model_name"], create_ms=r["create_ms"], created_by=r["created_by"],
                   cursor=r["cursor"], lease_owner=r["lease_owner"], lease_expires_ms=r["lease_expires_ms"])


def delivery_from_row(r: Any) -> Delivery:
    return Delivery(id=r["id"], webhook_id=r["webhook_id"], event_sequence=r["event_sequence"],
                    attempt=r["attempt"], status_code=r["status_code"], latency_ms=r["latency_ms"],
                    error=r["error"], time_ms=r["time_ms"], outcome=r["outcome"], kind=r["kind"], seq=r["seq"])


class WebhookStore:
    """The two tables: webhooks with their cursor and lease, and the delivery log."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, webhook_id: str) -> tuple[Webhook, bytes] | None:
        """A webhook and its secret (for delivery only)."""
        t = webhooks_table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == webhook_id)).mappings().first()
        return (webhook_from_row(row), row["secret"].encode()) if row is not None else None

    def all(self) -> list[Webhook]:
        t = webhooks_table
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.create_ms, t.c.id)).mappings().all()
        return [webhook_from_row(r) for r in rows]

    def log(self, delivery: Delivery, advance_owner: str = "") -> bool:
        """Logs an attempt; with ``advance_owner``, moves the cursor past its event in the same
        transaction (only while that owner holds the lease: False when it no longer does)."""
        t = webhooks_table
        with self.db.begin() as conn:
            conn.execute(deliveries_table.insert().values(
                id=delivery.id, webhook_id=delivery.webhook_id, event_sequence=delivery.event_sequence,
                attempt=delivery.attempt, status_code=delivery.status_code, latency_ms=delivery.latency_ms,
                error=delivery.error[:MAX_ERROR_CHARS], time_ms=delivery.time_ms, outcome=delivery.outcome,
                kind=delivery.kind))
            if not advance_owner:
                return True
            done = conn.execute(t.update().where(t.c.id == delivery.webhook_id, t.c.lease_owner == advance_owner,
                                                 t.c.cursor < delivery.event_sequence).values(
                cursor=delivery.event_sequence))
        return done.rowcount == 1

    def attempts(self, webhook_id: str, sequence: int) -> tuple[int, int]:
        """(attempts so far, time of the first) of an event's in-order delivery: a replica taking a
        webhook over goes on counting, and the retry bound runs from the first attempt."""
        t = deliveries_table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(sa.func.count(), sa.func.min(t.c.time_ms)).where(
                t.c.webhook_id == webhook_id, t.c.event_sequence == sequence, t.c.kind == EVENT)).first()
        return (int(row[0]), int(row[1])) if row is not None and row[0] else (0, 0)

    def claim(self, webhook_id: str, owner: str, lease_ms: int) -> bool:
        """Takes the webhook when its lease has expired (one conditional UPDATE: one replica wins)."""
        t, now = webhooks_table, now_ms()
        with self.db.begin() as conn:
            done = conn.execute(t.update().where(t.c.id == webhook_id, t.c.lease_expires_ms < now).values(
                lease_owner=owner, lease_expires_ms=now + lease_ms))
        return done.rowcount == 1

    def renew(self, owner: str, lease_ms: int) -> set[str]:
        """Extends this owner's leases; returns the webhooks it still holds."""
        t, now = webhooks_table, now_ms()
        with self.db.begin() as conn:
            conn.execute(t.update().where(t.c.lease_owner == owner, t.c.lease_expires_ms >= now).values(
                lease_expires_ms=now + lease_ms))
            rows = conn.execute(sa.select(t.c.id).where(t.c.lease_owner == owner,
                                                        t.c.lease_expires_ms >= now)).all()
        return {r[0] for r in rows}

    def release(self, owner: str) -> None:
        """Ends this owner's leases at once (a graceful stop): another replica takes over at its next scan."""
        t = webhooks_table
        with self.db.begin() as conn:
            conn.execute(t.update().where(t.c.lease_owner == owner).values(lease_owner="", lease_expires_ms=0))

    def advance(self, webhook_id: str, owner: str, sequence: int) -> bool:
        """Moves the cursor past ``sequence``, only while ``owner`` holds the lease."""
        t = webhooks_table
        with self.db.begin() as conn:
            done = conn.execute(t.update().where(t.c.id == webhook_id, t.c.lease_owner == owner,
                                                 t.c.cursor < sequence).values(cursor=sequence))
        return done.rowcount == 1

    def prune(self, older_than_ms: int) -> int:
        with self.db.begin() as conn:
            done = conn.execute(deliveries_table.delete().where(deliveries_table.c.time_ms < older_than_ms))
        return int(done.rowcount or 0)


def _audit_values(caller: Caller, action: str, model_name: str, after: dict[str, Any], outcome: str,
                  message: str) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "time_ms": now_ms(), "actor": caller.name, "role": caller.role,
            "action": action, "model_name": model_name, "version": 0, "before": "{}",
            "after": json.dumps(after, sort_keys=True), "outcome": outcome, "request_id": caller.request_id,
            "message": message}


def _described(hook: Webhook) -> dict[str, Any]:
    """What the audit trail says of a webhook (never its secret)."""
    return {"webhook_id": hook.id, "url": hook.url, "event_types": [t.value for t in hook.event_types],
            "model_name": hook.model_name}


class WebhookService:
    """The webhook RPCs' rules on domain values; delivery is the dispatcher's (background threads).

    Args:
        db: the registry's database.
        events: the event log (for a new webhook's starting cursor and for redeliveries).
        send: one attempt to POST an event's body to a webhook now (test and redelivery).
    """

    def __init__(self, db: Database, events: EventSource, send: Any) -> None:
        self.db = db
        self.store = WebhookStore(db)
        self.events = events
        self._send = send

    def create(self, caller: Caller, url: str, event_types: Iterable[EventType], model_name: str,
               secret: str) -> Webhook:
        validate_url(url)
        if model_name:
            validate_name(model_name, "model_name")
        raw = validate_secret(secret)
        chosen = sorted(set(event_types), key=lambda t: t.value)
        types = [t.value for t in chosen]
        hook = Webhook(id=uuid.uuid4().hex, url=url, event_types=tuple(chosen), model_name=model_name,
                       create_ms=now_ms(), created_by=caller.name, cursor=self.events.latest_sequence(),
                       lease_owner="", lease_expires_ms=0)
        t = webhooks_table
        with self.db.begin() as conn:  # the webhook and its audit record commit together
            count = conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() or 0
            if count >= MAX_WEBHOOKS:
                raise FailedPreconditionError(f"there are already {count} webhooks (at most {MAX_WEBHOOKS}); "
                                              "delete one first")
            conn.execute(t.insert().values(id=hook.id, url=url, event_types=json.dumps(types), model_name=model_name,
                                           secret=raw.decode(), create_ms=hook.create_ms, created_by=caller.name,
                                           cursor=hook.cursor, lease_owner="", lease_expires_ms=0))
            conn.execute(audit_table.insert().values(**_audit_values(
                caller, "CreateWebhook", model_name, _described(hook), "ok", f"webhook to {url}")))
        return hook

    def list(self) -> list[Webhook]:
        return self.store.all()

    def _existing(self, webhook_id: str) -> tuple[Webhook, bytes]:
        found = self.store.get(validate_id(webhook_id))
        if found is None:
            raise NotFoundError(f"webhook {webhook_id} not found")
        return found

    def delete(self, caller: Caller, webhook_id: str) -> Webhook:
        hook, _ = self._existing(webhook_id)
        with self.db.begin() as conn:
            gone = conn.execute(webhooks_table.delete().where(webhooks_table.c.id == hook.id)).rowcount
            if gone != 1:
                raise NotFoundError(f"webhook {webhook_id} not found")
            conn.execute(deliveries_table.delete().where(deliveries_table.c.webhook_id == hook.id))
            conn.execute(audit_table.insert().values(**_audit_values(
                caller, "DeleteWebhook", hook.model_name, _described(hook), "ok", f"webhook to {hook.url}")))
        return hook

    def test(self, caller: Caller, webhook_id: str) -> Delivery:
        """One test delivery now (sequence 0, body ``{"test": true, ...}``), logged and audited."""
        hook, secret = self._existing(webhook_id)
        body = json.dumps({"test": True, "webhook_id": hook.id, "time_ms": now_ms()},
                          separators=(",", ":"), sort_keys=True).encode()
        delivery = self._send(hook, secret, 0, body, 1, TEST, caller.deadline)
        self._audited(caller, "TestWebhook", hook, delivery)
        return delivery  # type: ignore[no-any-return]

    def redeliver(self, caller: Caller, webhook_id: str, event_sequence: int, delivery_id: str) -> Delivery:
        """The event of ``event_sequence`` (or of the logged ``delivery_id``) sent again now; the cursor stays."""
        hook, secret = self._existing(webhook_id)
        if bool(event_sequence) == bool(delivery_id):
            raise InvalidArgumentError("give exactly one of event_sequence and delivery_id", field="event_sequence")
        if event_sequence < 0:
            raise InvalidArgumentError(f"event_sequence must be positive, got {event_sequence}",
                                       field="event_sequence")
        if delivery_id:
            t = deliveries_table
            with self.db.begin() as conn:
                row = conn.execute(sa.select(t.c.event_sequence).where(
                    t.c.id == delivery_id, t.c.webhook_id == hook.id)).first()
            if row is None:
                raise NotFoundError(f"delivery {delivery_id} of webhook {hook.id} not found")
            event_sequence = int(row[0])
            if event_sequence == 0:
                raise FailedPreconditionError(f"delivery {delivery_id} was a test delivery; use TestWebhook")
        found = [e for e in self.events.read_after(event_sequence - 1, 1) if e.sequence == event_sequence]
        if not found:
            raise NotFoundError(f"event {event_sequence} is not in the event log")
        attempt = self.store.attempts(hook.id, event_sequence)[0] + 1
        delivery = self._send(hook, secret, event_sequence, body_of(found[0]), attempt, REDELIVERY, caller.deadline)
        self._audited(caller, "RedeliverWebhook", hook, delivery)
        return delivery  # type: ignore[no-any-return]

    def _audited(self, caller: Caller, action: str, hook: Webhook, delivery: Delivery) -> None:
        after = {**_described(hook), "delivery_id": delivery.id, "event_sequence": delivery.event_sequence,
                 "status_code": delivery.status_code}
        with self.db.begin() as conn:
            conn.execute(audit_table.insert().values(**_audit_values(
                caller, action, hook.model_name, after, "ok" if delivery.outcome == DELIVERED else "failed",
                delivery.error or f"HTTP {delivery.status_code}")))

    def deliveries(self, webhook_id: str, size: int, token: str, event_sequence: int = 0) -> Page:
        """The delivery log of a webhook, newest first, paged (keyset on the log's order)."""
        hook, _ = self._existing(webhook_id)
        query = ("webhook_deliveries", hook.id, event_sequence)
        limit = paging.page_size(size)
        last = paging.decode_token(token, query)
        t = deliveries_table
        q = sa.select(t).where(t.c.webhook_id == hook.id).order_by(t.c.seq.desc()).limit(limit + 1)
        if event_sequence:
            q = q.where(t.c.event_sequence == event_sequence)
        if last is not None:
            q = q.where(t.c.seq < int(last[0]))
        with self.db.begin() as conn:
            rows = [delivery_from_row(r) for r in conn.execute(q).mappings().all()]
        items = rows[:limit]
        more = len(rows) > limit
        return Page(items, paging.encode_token([items[-1].seq], query) if more and items else "", 0)
