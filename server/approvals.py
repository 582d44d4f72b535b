"""Two-person approval of production promotions: the policy, the promotion requests and their states.

A model is under the policy when ``AQIMODELS_APPROVAL_MODELS`` names it (or is ``*``), or when the
policy stored in the database (set over RPC, seen by every replica) says so: its entry for the
model, else its ``*`` entry. The environment is a floor the RPC cannot lower. Under the policy a
promotion to production creates a request (PENDING) instead of moving the alias; an admin other
than the requester approves it (the promotion is then made through the recoverable change path,
with the compare-and-set against the production version the request expected), or rejects it;
it expires after ``expiry_seconds``. Every state change is one conditional UPDATE from PENDING,
in the same transaction as its audit record, and made under the model's lock: a request is
closed once, by one caller or replica, and never while an approval of it is being made.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
import structlog
from aqimodels.client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    StaleVersionError,
)
from aqimodels.process import deadlines
from aqimodels.server.db import Database, idempotency_table, metadata
from aqimodels.server.domain import Page
from aqimodels.server.paging import decode_token, encode_token, page_size

log = structlog.get_logger(__name__)

PENDING, APPROVED, REJECTED, EXPIRED, ABORTED_STALE = "PENDING", "APPROVED", "REJECTED", "EXPIRED", "ABORTED_STALE"
STATES = (PENDING, APPROVED, REJECTED, EXPIRED, ABORTED_STALE)
ALL_MODELS = "*"
DEFAULT_EXPIRY_SECONDS = 7 * 24 * 3600.0
EXPIRY_ACTOR = "expiry"

requests_table = sa.Table(
    "aqimodels_promotion_requests",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # the listing's order
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("model_name", sa.String(500), nullable=False, index=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("expected_current", sa.BigInteger, nullable=False),  # 0: production was empty
    sa.Column("requested_by", sa.String(200), nullable=False),
    sa.Column("requester_role", sa.String(50), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("allow_data_change", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(20), nullable=False, index=True),
    sa.Column("create_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("expire_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("closed_by", sa.String(200), nullable=False, server_default=sa.text("''")),
    sa.Column("close_reason", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("close_ms", sa.BigInteger, nullable=False, server_default=sa.text("0")),
)

policy_table = sa.Table(
    "aqimodels_approval_policy",
    metadata,
    sa.Column("model_name", sa.String(500), primary_key=True),  # a model, or "*"
    sa.Column("required", sa.Boolean, nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=False),
    sa.Column("update_ms", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class PromotionRequest:
    id: str
    model_name: str
    version: int
    expected_current: int
    requested_by: str
    requester_role: str
    reason: str
    allow_data_change: bool
    state: str
    create_ms: int
    expire_ms: int
    closed_by: str = ""
    close_reason: str = ""
    close_ms: int = 0
    seq: int = 0
    audit_event_id: str = ""  # the audit record of the change that made it what it is (when just made)

    def summary(self) -> dict[str, Any]:
        """The ``promotion_request`` of its audit records."""
        return {"id": self.id, "state": self.state, "stage": "production", "version": self.version,
                "expected_current_version": self.expected_current, "requested_by": self.requested_by,
                "reason": self.reason, "model_name": self.model_name, "expire_ms": self.expire_ms,
                "closed_by": self.closed_by, "close_reason": self.close_reason}


@dataclass(frozen=True)
class PolicyEntry:
    model_name: str
    required: bool
    updated_by: str
    update_ms: int
    audit_event_id: str = ""


@dataclass(frozen=True)
class Policy:
    environment: tuple[str, ...]
    stored: list[PolicyEntry]
    required: bool
    source: str  # why ``required`` is what it is, for people


def _now_ms() -> int:
    return int(time.time() * 1000)


def _row(r: Any) -> PromotionRequest:
    return PromotionRequest(r["id"], r["model_name"], int(r["version"]), int(r["expected_current"]),
                            r["requested_by"], r["requester_role"], r["reason"], bool(r["allow_data_change"]),
                            r["state"], int(r["create_ms"]), int(r["expire_ms"]), r["closed_by"],
                            r["close_reason"], int(r["close_ms"]), int(r["seq"]))


def _versions(expected: int) -> str:
    return f"version {expected}" if expected else "empty"


class Approvals:
    """The approval policy and the promotion requests, in the registry's database."""

    def __init__(self, db: Database, environment: tuple[str, ...] = (),
                 expiry_seconds: float = DEFAULT_EXPIRY_SECONDS) -> None:
        self.db = db
        self.environment = environment
        self.expiry_seconds = expiry_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the policy ----

    def _stored(self, names: tuple[str, ...] | None = None) -> list[PolicyEntry]:
        t = policy_table
        q = sa.select(t).order_by(t.c.model_name)
        if names is not None:
            q = q.where(t.c.model_name.in_(names))
        with self.db.begin() as conn:
            rows = conn.execute(q).mappings().all()
        return [PolicyEntry(r["model_name"], bool(r["required"]), r["updated_by"], int(r["update_ms"])) for r in rows]

    def policy(self, name: str = "") -> Policy:
        """The policy, and for ``name`` whether its production promotions need an approval and why."""
        stored = self._stored()
        if not name:
            return Policy(self.environment, stored, False, "")
        if ALL_MODELS in self.environment or name in self.environment:
            return Policy(self.environment, stored, True, "AQIMODELS_APPROVAL_MODELS")
        by_name = {e.model_name: e for e in stored}
        entry = by_name.get(name) or by_name.get(ALL_MODELS)
        if entry is None:
            return Policy(self.environment, stored, False, "no policy names the model")
        where = "its stored policy" if entry.model_name == name else "the stored policy for every model (*)"
        return Policy(self.environment, stored, entry.required, f"{where}, set by {entry.updated_by}")

    def required(self, name: str) -> bool:
        if ALL_MODELS in self.environment or name in self.environment:
            return True
        by_name = {e.model_name: e for e in self._stored((name, ALL_MODELS))}
        entry = by_name.get(name) or by_name.get(ALL_MODELS)
        return entry is not None and entry.required

    def set_policy(self, actor: str, role: str, request_id: str, name: str, required: bool,
                   reason: str) -> PolicyEntry:
        """Stores the policy of ``name`` (or ``*``); audited ``SetApprovalPolicy`` in the same transaction."""
        if not name.strip() or len(name) > 256 or any(ord(c) < 32 for c in name):
            raise InvalidArgumentError("model_name must be a model name (at most 256 printable characters) or *",
                                       field="model_name")
        now = _now_ms()
        t = policy_table
        with self.db.begin() as conn:
            before = conn.execute(sa.select(t.c.required).where(t.c.model_name == name)).first()
            if before is None:
                conn.execute(t.insert().values(model_name=name, required=required, updated_by=actor, update_ms=now))
            else:
                conn.execute(t.update().where(t.c.model_name == name).values(
                    required=required, updated_by=actor, update_ms=now))
            audit_id, last = self._audit(
                conn, actor=actor, role=role, action="SetApprovalPolicy", model_name=name, version=0,
                before={"approval_required": bool(before[0]) if before else None},
                after={"approval_required": required, "environment_models": list(self.environment)},
                request_id=request_id,
                message=f"approval {'required' if required else 'not required'} for "
                        f"{'every model' if name == ALL_MODELS else repr(name)}" + (f": {reason}" if reason else ""))
        self.db.event_committed(last)
        log.info("approval_policy_set", model=name, required=required, by=actor)
        return PolicyEntry(name, required, actor, now, audit_id)

    # ---- requests ----

    def get(self, request_id: str) -> PromotionRequest:
        if not request_id or not request_id.strip():
            raise InvalidArgumentError("id (the promotion request's) is required", field="id")
        with self.db.begin() as conn:
            row = conn.execute(sa.select(requests_table).where(requests_table.c.id == request_id[:64])).mappings().first()
        if row is None:
            raise NotFoundError(f"no promotion request {request_id[:64]!r}")
        return _row(row)

    def list(self, state: str, model_name: str, size: int, token: str) -> Page:
        """Requests newest first; ``state``/``model_name`` empty: all."""
        if state and state not in STATES:
            raise InvalidArgumentError(f"state {state!r} is not a promotion request state", field="state")
        size = page_size(size)
        query = ("promotion_requests", state, model_name)
        last = decode_token(token, query)
        if last is not None and (len(last) != 1 or not isinstance(last[0], int)):
            raise InvalidArgumentError("page_token is invalid", field="page_token")
        t = requests_table
        q = sa.select(t).order_by(t.c.seq.desc()).limit(size + 1)
        if state:
            q = q.where(t.c.state == state)
        if model_name:
            q = q.where(t.c.model_name == model_name)
        if last is not None:
            q = q.where(t.c.seq < last[0])
        with self.db.begin() as conn:
            rows = [_row(r) for r in conn.execute(q).mappings().all()]
        page = rows[:size]
        next_token = encode_token([page[-1].seq], query) if len(rows) > size else ""
        return Page(page, next_token, -1)

    def create(self, actor: str, role: str, request_id: str, name: str, version: int, expected_current: int,
               reason: str, allow_data_change: bool, remembered: dict[str, Any]) -> PromotionRequest:
        """A PENDING request, its ``RequestPromotion`` record and the promotion's replay, in one transaction.

        Call with the model's lock held (the promotion's plan). ``remembered``: what a repeated
        promotion with the same request id answers (the request's id is added).
        """
        now = _now_ms()
        req = PromotionRequest(uuid.uuid4().hex, name, version, expected_current, actor, role, reason,
                               allow_data_change, PENDING, now, now + int(self.expiry_seconds * 1000))
        with self.db.begin() as conn:
            conn.execute(requests_table.insert().values(
                id=req.id, model_name=name, version=version, expected_current=expected_current, requested_by=actor,
                requester_role=role, reason=reason, allow_data_change=allow_data_change, state=PENDING,
                create_ms=req.create_ms, expire_ms=req.expire_ms))
            audit_id, last = self._audit(conn, actor=actor, role=role, action="RequestPromotion", model_name=name,
                                         version=version, before={"production": expected_current or None},
                                         after={"promotion_request": req.summary()}, request_id=request_id,
                                         message=f"production of v{version} requested; needs an approval by another "
                                                 "admin" + (f": {reason}" if reason else ""))
            if request_id:
                conn.execute(idempotency_table.insert().values(
                    action="PromoteModelVersion", request_id=request_id, time_ms=now, response=json.dumps(
                        {**remembered, "promotion_request": req.id, "audit": audit_id}).encode()))
        self.db.event_committed(last)
        log.info("promotion_requested", model=name, version=version, request=req.id, by=actor)
        return _with_audit(req, audit_id)

    def check_approver(self, actor: str, role: str, req: PromotionRequest) -> None:
        """The two-person rule (an admin, not the requester) and the request still open."""
        if role != "admin":
            raise PermissionDeniedError(f"approving or rejecting a promotion needs the admin role; {actor!r} is "
                                        f"{role}")
        self._check_open(req)
        if actor == req.requested_by:
            raise PermissionDeniedError(
                f"two-person rule: {actor!r} requested promotion request {req.id} and cannot approve it; "
                "another admin must approve it")

    def _check_open(self, req: PromotionRequest) -> None:
        if req.state != PENDING:
            raise FailedPreconditionError(
                f"promotion request {req.id} is {req.state.lower().replace('_', ' ')}"
                + (f" (by {req.closed_by})" if req.closed_by else "") + "; only a pending request can be "
                "approved or rejected")

    def recheck(self, req_id: str, current: int, actor: str, role: str, request_id: str) -> PromotionRequest:
        """Under the model's lock, in the approval's plan: still pending, not expired, not stale.

        An expired request is closed EXPIRED, a stale one ABORTED_STALE (each with its record),
        then the approval is refused; nothing moves.
        """
        req = self.get(req_id)
        self._check_open(req)
        if req.expire_ms <= _now_ms():
            self._close(req, EXPIRED, EXPIRY_ACTOR, "system", "", "ExpirePromotion", "expired",
                        f"not approved within {self.expiry_seconds:g} s")
            raise FailedPreconditionError(f"promotion request {req.id} expired before it was approved "
                                          f"(requests expire after {self.expiry_seconds:g} s)")
        if current != req.expected_current:
            self._close(req, ABORTED_STALE, actor, role, request_id, "ApprovePromotion", "aborted_stale",
                        f"production is {_versions(current)}, not the expected {_versions(req.expected_current)}")
            raise StaleVersionError(
                f"promotion request {req.id} is stale: production of {req.model_name!r} is {_versions(current)}, "
                f"not the {_versions(req.expected_current)} the request expected to replace with version "
                f"{req.version}; the request is closed ABORTED_STALE and nothing moved")
        return req

    def approved(self, req_id: str, approver: str, role: str, reason: str, request_id: str,
                 promotion: dict[str, Any]) -> None:
        """The promotion is in place: the request is closed APPROVED with its ``ApprovePromotion`` record.

        Called with the model's lock held once the promotion's commit write stands (also by the
        recovery of a promotion left half-done); a request closed already is left as it is.
        """
        try:
            req = self.get(req_id)
        except NotFoundError:
            log.warning("approved_request_missing", request=req_id)
            return
        if req.state != PENDING:
            return
        self._close(req, APPROVED, approver, role, request_id, "ApprovePromotion", "ok", reason,
                    extra={"promotion": promotion}, required=False)

    def reject(self, actor: str, role: str, request_id: str, req_id: str, reason: str,
               deadline: deadlines.Deadline) -> PromotionRequest:
        req = self.get(req_id)
        if role != "admin":
            raise PermissionDeniedError(f"rejecting a promotion needs the admin role; {actor!r} is {role}")
        self._check_open(req)
        with self.db.model_lock(req.model_name, check=lambda: deadline.check("the model's lock was free")):
            return self._close(self.get(req_id), REJECTED, actor, role, request_id, "RejectPromotion", "ok", reason)

    def _close(self, req: PromotionRequest, state: str, actor: str, role: str, request_id: str, action: str,
               outcome: str, reason: str, *, extra: dict[str, Any] | None = None,
               required: bool = True) -> PromotionRequest:
        """PENDING -> ``state`` (a conditional UPDATE) and its audit record, in one transaction."""
        now = _now_ms()
        closed = replace(req, state=state, closed_by=actor, close_reason=reason, close_ms=now)
        t = requests_table
        with self.db.begin() as conn:
            moved = conn.execute(t.update().where(t.c.id == req.id, t.c.state == PENDING).values(
                state=state, closed_by=actor, close_reason=reason, close_ms=now)).rowcount
            if moved != 1:
                if not required:
                    return req
                raise FailedPreconditionError(f"promotion request {req.id} was closed meanwhile; only a pending "
                                              "request can be approved or rejected")
            audit_id, last = self._audit(conn, actor=actor, role=role, action=action, model_name=req.model_name,
                                         version=req.version, before={"promotion_request": req.summary()},
                                         after={"promotion_request": closed.summary(), **(extra or {})},
                                         outcome=outcome, request_id=request_id,
                                         message=f"promotion request {req.id} {state.lower().replace('_', ' ')}"
                                                 + (f": {reason}" if reason else ""))
        self.db.event_committed(last)
        log.info("promotion_request_closed", model=req.model_name, request=req.id, state=state, by=actor)
        return _with_audit(closed, audit_id)

    def _audit(self, conn: sa.Connection, *, actor: str, role: str, action: str, model_name: str, version: int,
               before: dict[str, Any], after: dict[str, Any], request_id: str, message: str,
               outcome: str = "ok") -> tuple[str, int]:
        """The record and its events in ``conn``'s transaction: (audit id, last event sequence)."""
        return self.db.audit_insert(conn, actor=actor, role=role, action=action, model_name=model_name,
                                    version=version, before=before, after=after, outcome=outcome,
                                    request_id=request_id, message=message[:2000])

    # ---- expiry ----

    def expire_due(self) -> int:
        """Closes every pending request past its expiry (``ExpirePromotion``); returns how many this call closed.

        Each under its model's lock (skipped while another process holds it: the next pass
        retries); the conditional UPDATE makes one replica the one that records it.
        """
        t = requests_table
        with self.db.begin() as conn:
            due = [_row(r) for r in conn.execute(sa.select(t).where(
                t.c.state == PENDING, t.c.expire_ms <= _now_ms()).order_by(t.c.expire_ms).limit(100)).mappings()]
        count = 0
        for req in due:
            try:
                with deadlines.bound(deadlines.Deadline.after(1.0)), self.db.model_lock(req.model_name):
                    closed = self._close(req, EXPIRED, EXPIRY_ACTOR, "system", "", "ExpirePromotion", "expired",
                                         f"not approved within {self.expiry_seconds:g} s", required=False)
                count += closed.state == EXPIRED
            except Exception as exc:  # noqa: BLE001 - lock busy or database down: the next pass retries
                log.debug("promotion_expiry_deferred", request=req.id, error=str(exc)[:200])
        return count

    def start(self) -> None:
        """Expires due requests in the background (every quarter of the expiry time, 0.2 to 5 s)."""
        interval = max(0.2, min(5.0, self.expiry_seconds / 4))

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.expire_due()
                except Exception as exc:  # noqa: BLE001
                    log.debug("promotion_expiry_failed", error=str(exc)[:200])

        self._thread = threading.Thread(target=run, name="promotion-expiry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def _with_audit(req: PromotionRequest, audit_id: str) -> PromotionRequest:
    return replace(req, audit_event_id=audit_id)


def on_committed(approvals: Approvals) -> Callable[[Any], None]:
    """The hook of the change skeleton: a promotion made for a request closes it APPROVED."""
    def hook(plan: Any) -> None:
        approval = plan.result.get("approval") if isinstance(plan.result, dict) else None
        if plan.action == "PromoteModelVersion" and isinstance(approval, dict):
            approvals.approved(approval["request"], approval["by"], approval["role"], approval["reason"],
                               approval.get("request_id", ""),
                               {"model_name": plan.model, "version": plan.version,
                                "replaced": plan.result.get("previous")})
    return hook


__all__ = [
    "ABORTED_STALE",
    "ALL_MODELS",
    "APPROVED",
    "EXPIRED",
    "PENDING",
    "REJECTED",
    "STATES",
    "Approvals",
    "Policy",
    "PolicyEntry",
    "PromotionRequest",
    "on_committed",
]
