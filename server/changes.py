"""Changes made of several MLflow writes (promotion, rollback, archive, cleanup), recoverable at any point.

Every change runs one skeleton (:meth:`Changes.run`): refuse when the registry is stopping ->
take the model's lock (a wait that ends with the caller's deadline, cancellation or the drain)
-> answer a repeated request id with its first outcome -> settle any change of this model left
half-done -> probe and plan -> check the caller still waits (else nothing is written, audited
``abandoned``) -> write the audit intent with the whole plan (state before, state after, every
write with the value it replaces) -> make the writes one by one -> complete the record.

A plan names one write as its *commit point* (a promotion's alias move). After a failure,
recovery looks at the store: when the commit write is in place the rest is written (rolled
forward: archive and previous-production tags), else the writes made before it are put back
(undone), and the record is completed with outcome ``recovered`` and what was done. A process
that fails in the middle recovers at once (a failure *at* the commit write is undone: its caller
is told the change failed, so an in-doubt write must not stand); what it cannot (the database is
down) its background pass retries, and a process that died leaves its intent to the
:class:`Reconciler` of any replica: at start, before every change of that model, and in the
background for intents older than ``reconcile_after_seconds`` whose model lock is free (the
lock is held for the whole change, so a free lock means no process is still acting on it).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog
from aqimodels.client.errors import (
    BackendUnavailableError,
    CancelledError,
    DeadlineExceededError,
    ModelNotFoundError,
)
from aqimodels.process import deadlines
from aqimodels.server.db import Database
from aqimodels.server.domain import ModelVersion, RegisteredModel

log = structlog.get_logger(__name__)

CHANGE_ACTIONS = ("PromoteModelVersion", "RollbackModel", "CleanupModelVersions")
PROCESS_ID = uuid.uuid4().hex[:16]


class Writer(Protocol):
    """The store's write calls (the service's recorder of them, which updates the read model)."""

    def set_alias(self, name: str, alias: str, version: int) -> None: ...
    def delete_alias(self, name: str, alias: str) -> None: ...
    def set_tag(self, name: str, version: int, key: str, value: str) -> None: ...
    def delete_tag(self, name: str, version: int, key: str) -> None: ...
    def delete_version(self, name: str, version: int) -> None: ...


class Reader(Protocol):
    def load_model(self, name: str) -> tuple[RegisteredModel, list[ModelVersion]]: ...


@dataclass(frozen=True)
class Write:
    """One write: an alias (``key``) or a version's tag (``key``) set to ``to`` (None: removed),
    replacing ``was``; or (op ``delete_version``) a version deleted."""

    op: str  # "alias" | "tag" | "delete_version"
    key: str = ""
    version: int = 0
    to: str | None = None
    was: str | None = None

    def apply(self, name: str, w: Writer, value: str | None) -> None:
        if self.op == "alias":
            if value is None:
                w.delete_alias(name, self.key)
            else:
                w.set_alias(name, self.key, int(value))
        elif self.op == "tag":
            if value is None:
                w.delete_tag(name, self.version, self.key)
            else:
                w.set_tag(name, self.version, self.key, value)
        elif self.op == "delete_version":
            w.delete_version(name, self.version)
        else:
            raise ValueError(f"unknown write {self.op!r}")

    def current(self, model: RegisteredModel, versions: dict[int, ModelVersion]) -> str | None:
        """This write's target as the store has it now."""
        if self.op == "alias":
            number = model.aliases.get(self.key)
            return str(number) if number else None
        if self.op == "tag":
            v = versions.get(self.version)
            return v.tags.get(self.key) if v is not None else None
        return "present" if self.version in versions else None

    def describe(self, value: str | None) -> str:
        if self.op == "delete_version":
            return f"delete version {self.version}"
        where = f"alias {self.key}" if self.op == "alias" else f"tag {self.key} of version {self.version}"
        return f"{where} = {value}" if value is not None else f"remove {where}"


@dataclass
class Plan:
    """What a change will do: states before and after, its writes, the commit point, its answer."""

    action: str
    model: str
    version: int
    writes: list[Write]
    commit: int = 0  # index of the write that makes the change visible
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # what a replay answers (the service's shape)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "model": self.model, "version": self.version, "commit": self.commit,
                "writes": [asdict(w) for w in self.writes], "after": self.after, "result": self.result,
                "owner": PROCESS_ID}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(data["action"], data["model"], int(data.get("version", 0)),
                   [Write(**w) for w in data["writes"]], int(data.get("commit", 0)), {},
                   data.get("after", {}), data.get("result", {}))


@dataclass(frozen=True)
class Outcome:
    """A change's end: its plan (None: a replay of ``result``), audit id, and how it ended."""

    plan: Plan | None
    audit_id: str
    outcome: str  # "ok" | "recovered" | "replayed" | "none" (nothing to write)
    result: dict[str, Any]


class Abandoned(Exception):
    """Internal: the caller left before the commit write; never raised past this module."""


@dataclass
class _Failed:
    audit_id: str
    plan: Plan
    request_id: str
    undo: bool  # True: put back (the caller was told it failed); False: roll forward


class Changes:
    """The change skeleton and the recovery of half-done changes (see the module docstring)."""

    def __init__(self, db: Database, store: Reader, writer: Callable[[], Writer], *,
                 reconcile_after_seconds: float = 30.0, fault_point: str = "",
                 on_recovered: Callable[[str], None] | None = None,
                 on_committed: Callable[[Plan], None] | None = None) -> None:
        """``on_committed(plan)``: called under the lock once every write of a change stands, before
        its record is completed (also by recovery rolling it forward); raising there leaves the
        change to recovery, which calls it again (it must be idempotent)."""
        self.db = db
        self.store = store
        self.writer = writer
        self.reconcile_after = reconcile_after_seconds
        # tests: fault(action, index) runs before each write; raising there is a failed write
        self.fault: Callable[[str, int], None] | None = _kill_at(fault_point) if fault_point else None
        self.on_recovered = on_recovered or (lambda _name: None)
        self.on_committed = on_committed or (lambda _plan: None)
        self._failed: dict[str, _Failed] = {}  # audit id -> a change of ours that failed midway
        self._failed_lock = threading.Lock()
        self._drain_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- stopping ----

    def drain(self, grace_seconds: float) -> None:
        """SIGTERM: no new change starts; one waiting for its lock waits at most until the grace ends."""
        self._drain_at = time.monotonic() + max(0.0, grace_seconds - min(1.0, 0.2 * grace_seconds))

    def _stopping_check(self) -> None:
        if self._drain_at is not None and time.monotonic() >= self._drain_at:
            raise BackendUnavailableError("the registry is shutting down; retry on another replica")

    def _lock_check(self, deadline: deadlines.Deadline) -> Callable[[], None]:
        def check() -> None:
            deadline.check("the model's lock was free")
            self._stopping_check()
        return check

    # ---- the skeleton ----

    def run(self, *, action: str, name: str, actor: str, role: str, request_id: str,
            deadline: deadlines.Deadline, plan: Callable[[], Plan | None],
            finish: Callable[[Plan, Writer], dict[str, Any]]) -> Outcome:
        """Runs one change; ``plan`` probes and validates under the lock (None: nothing to write),
        ``finish`` applies the writes to the read model and returns the state after."""
        if self._drain_at is not None:
            raise BackendUnavailableError("the registry is shutting down; no new change starts")
        intent = False
        try:
            with self.db.model_lock(name, check=self._lock_check(deadline)):
                self.settle(name)  # before the replay: settling may complete this very request
                replayed = self._replay(action, request_id)
                if replayed is not None:
                    return replayed
                p = plan()
                if p is None:
                    return Outcome(None, "", "none", {})
                deadline.check("its first write")  # abandoned: audited below, nothing written
                self._stopping_check()
                audit_id = self.db.audit_begin(
                    actor=actor, role=role, action=action, model_name=name, version=p.version, before=p.before,
                    request_id=request_id, message=p.message, after={"plan": p.to_json()})
                intent = True
                return self._act(audit_id, p, request_id, deadline, finish)
        except (DeadlineExceededError, CancelledError) as exc:
            if not intent:
                self._record_abandoned(action, name, actor, role, request_id, exc.message)
            raise

    def _act(self, audit_id: str, p: Plan, request_id: str, deadline: deadlines.Deadline,
             finish: Callable[[Plan, Writer], dict[str, Any]]) -> Outcome:
        name = p.model
        w = self.writer()
        index = 0
        try:
            for index, write in enumerate(p.writes):
                if index == p.commit and index > 0 and deadline.problem():
                    raise Abandoned(deadline.problem())
                if self.fault is not None:
                    self.fault(p.action, index)
                write.apply(name, w, write.to)
        except Abandoned:
            # The caller left before the change became visible: its first writes are put back.
            self._undo_prefix(name, p, index, w)
            self.db.audit_finish(audit_id, outcome="abandoned", after=p.before,
                                 message="the caller stopped waiting before the change became visible; "
                                         "its first writes were put back")
            deadline.check("the change became visible")
            raise
        except Exception as exc:
            failed = _Failed(audit_id, p, request_id, undo=index <= p.commit)
            if not self._recover_failed(failed, exc) or failed.undo:
                raise
            return Outcome(p, audit_id, "recovered", p.result)
        try:
            self.on_committed(p)
            after = finish(p, w)
            self.db.audit_finish(audit_id, outcome="ok", after=after)
            self.db.remember(p.action, request_id, json.dumps({**p.result, "audit": audit_id}).encode())
        except Exception:
            # Every write is in place but the record could not be completed: completed later.
            with self._failed_lock:
                self._failed[audit_id] = _Failed(audit_id, p, request_id, undo=False)
            raise
        return Outcome(p, audit_id, "ok", p.result)

    def _replay(self, action: str, request_id: str) -> Outcome | None:
        raw = self.db.remembered(action, request_id)
        if raw is None:
            return None
        data = json.loads(raw)
        return Outcome(None, data.get("audit", ""), "replayed", data)

    def _record_abandoned(self, action: str, name: str, actor: str, role: str, request_id: str,
                          message: str) -> None:
        try:
            with deadlines.bound(deadlines.Deadline.after(2.0)):
                self.db.audit_record(actor=actor, role=role, action=action, model_name=name, version=0,
                                     before={}, after={}, outcome="abandoned", request_id=request_id,
                                     message=message[:500])
        except Exception as exc:  # noqa: BLE001 - the database is down: the log keeps it
            log.warning("abandoned_change_not_audited", model=name, action=action, error=str(exc)[:200])

    def _undo_prefix(self, name: str, p: Plan, upto: int, w: Writer) -> None:
        for write in reversed(p.writes[:upto]):
            write.apply(name, w, write.was)

    # ---- recovery ----

    def _recover_failed(self, failed: _Failed, exc: BaseException) -> bool:
        """Recovers a change of ours at once; False (kept for the background pass) when it cannot."""
        log.warning("change_failed_midway", model=failed.plan.model, action=failed.plan.action,
                    audit_id=failed.audit_id, error=str(exc)[:200], undo=failed.undo)
        try:
            self._recover(failed.audit_id, failed.plan, failed.request_id, undo=failed.undo)
            return True
        except Exception as again:  # noqa: BLE001 - the store is still failing: retried in the background
            log.warning("change_recovery_deferred", model=failed.plan.model, audit_id=failed.audit_id,
                        error=str(again)[:200])
            with self._failed_lock:
                self._failed[failed.audit_id] = failed
            return False

    def _recover(self, audit_id: str, p: Plan, request_id: str, *, undo: bool | None) -> str:
        """Completes (roll forward) or undoes ``p`` against the store's state now; completes the record.

        ``undo`` None: decided by the store (the commit write in place -> roll forward).
        Call with the model's lock held. Returns what was done.
        """
        name = p.model
        try:
            model, versions = self.store.load_model(name)
        except ModelNotFoundError:
            self.db.audit_finish(audit_id, outcome="recovered", after={"recovery": {"action": "none"}},
                                 message=f"recovered: model {name!r} no longer exists; nothing to do")
            return "none"
        by_number = {v.version: v for v in versions}
        commit = p.writes[p.commit] if p.writes else None
        committed = commit is not None and commit.current(model, by_number) == commit.to
        if undo is None:
            undo = not committed
        w = self.writer()
        done: list[str] = []
        if undo:
            for write in reversed(p.writes[:p.commit + 1]):
                if write.op == "delete_version":
                    continue  # cannot be undone; a cleanup's commit point is its first delete
                if write.current(model, by_number) != write.was and (write.op == "alias" or write.version in by_number):
                    write.apply(name, w, write.was)
                    done.append(write.describe(write.was))
            action = "undone"
        else:
            for write in p.writes:
                if write.op == "delete_version":
                    v = by_number.get(write.version)
                    if v is None or v.aliases:
                        continue  # gone already, or aliased since: kept
                elif write.current(model, by_number) == write.to or (
                        write.op == "tag" and write.version not in by_number):
                    continue
                write.apply(name, w, write.to)
                done.append(write.describe(write.to))
            action = "rolled_forward"
            self.on_committed(p)
        self.on_recovered(name)
        model, versions = self.store.load_model(name)
        after = {"production": model.aliases.get("production"), "staging": model.aliases.get("staging"),
                 "recovery": {"action": action, "writes": done, "by": PROCESS_ID}}
        self.db.audit_finish(audit_id, outcome="recovered", after=after,
                             message=f"recovered ({action.replace('_', ' ')}): " + ("; ".join(done) or "nothing left to write"))
        if action == "rolled_forward":
            self.db.remember(p.action, request_id, json.dumps({**p.result, "audit": audit_id}).encode())
        log.info("change_recovered", model=name, change=p.action, audit_id=audit_id, recovery=action, writes=done)
        with self._failed_lock:
            self._failed.pop(audit_id, None)
        return action

    def settle(self, name: str) -> int:
        """Recovers every half-done change of ``name``; call with its lock held. Returns how many."""
        count = 0
        for row in self.db.audit_pending(CHANGE_ACTIONS, model_name=name):
            count += self._settle_row(row)
        return count

    def _settle_row(self, row: dict[str, Any]) -> int:
        # Called with the model's lock held: nobody acts on the model, so a pending change is orphaned.
        with self._failed_lock:
            mine = self._failed.get(row["id"])
        try:
            after = json.loads(row["after"]) if isinstance(row["after"], str) else row["after"]
        except ValueError:
            after = {}
        raw: dict[str, Any] | None = after.get("plan") if isinstance(after, dict) else None
        if mine is None and raw is None:
            self.db.audit_finish(row["id"], outcome="recovered", message="recovered: the change recorded no plan "
                                 "(written by an older registry); its state is as the store shows it")
            return 1
        plan = mine.plan if mine is not None else Plan.from_json(raw or {})  # raw is set when mine is not
        self._recover(row["id"], plan, row["request_id"], undo=mine.undo if mine is not None else None)
        return 1

    def reconcile(self, *, older_than_seconds: float | None) -> int:
        """One pass over pending changes whose lock is free (``older_than_seconds`` None: all)."""
        with self._failed_lock:
            ours = list(self._failed.values())
        names = {f.plan.model for f in ours}
        cutoff = None if older_than_seconds is None else int((time.time() - older_than_seconds) * 1000)
        for row in self.db.audit_pending(CHANGE_ACTIONS, older_than_ms=cutoff):
            names.add(row["model_name"])
        count = 0
        for name in sorted(names):
            try:
                with (deadlines.bound(deadlines.Deadline.after(1.0)), self.db.model_lock(name),
                      deadlines.bound(deadlines.Deadline.after(max(10.0, self.reconcile_after)))):
                    count += self.settle(name)
            except DeadlineExceededError:
                continue  # another process holds the lock: it is acting on the model now
            except Exception as exc:  # noqa: BLE001 - the store is down: the next pass retries
                log.warning("reconcile_failed", model=name, error=str(exc)[:200])
        return count

    def reconcile_at_start(self) -> int:
        """Settles every half-done change whose lock is free, before the registry serves."""
        started = time.monotonic()
        try:
            took = self.reconcile(older_than_seconds=None)
        except Exception as exc:  # noqa: BLE001 - the database is down at start: the background pass retries
            log.warning("reconcile_failed", error=str(exc)[:200])
            return 0
        if took:
            log.info("changes_reconciled_at_start", count=took, seconds=round(time.monotonic() - started, 3))
        return took

    def start(self) -> None:
        """Reconciles in the background every few seconds (intents older than the bound, and our own)."""
        interval = max(0.2, min(5.0, self.reconcile_after / 3))

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reconcile(older_than_seconds=self.reconcile_after)
                except Exception as exc:  # noqa: BLE001 - the next round retries; nothing is lost
                    log.debug("reconcile_failed", error=str(exc)[:200])

        self._thread = threading.Thread(target=run, name="change-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def _kill_at(point: str) -> Callable[[str, int], None]:
    """AQIMODELS_FAULT_POINT=<action>:<index>: the process SIGKILLs itself before that write (tests)."""
    action, _, index = point.partition(":")

    def fault(at_action: str, at_index: int) -> None:
        if at_action == action and at_index == int(index):
            log.warning("fault_point_reached", action=action, index=at_index)
            os.kill(os.getpid(), signal.SIGKILL)

    return fault
