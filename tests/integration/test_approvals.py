"""Two-person approval of production promotions: a promotion of a model under the policy is a
request that an admin other than the requester approves (the promotion then runs through the
recoverable change path) or rejects, or that expires. Real registries with real tokens over a
real MLflow store (SQLite and PostgreSQL), two replicas on one PostgreSQL database, a real worker
for the auto-promotion.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import RegistryClient
from aqimodels.client.cli import APPROVAL_NEEDED, app
from aqimodels.client.errors import (
    AqiModelsError,
    BackendUnavailableError,
    FailedPreconditionError,
    PermissionDeniedError,
    StaleVersionError,
)
from aqimodels.client.tokens import new_token, toml_entry
from aqimodels.server.jobs import jobs_factory
from aqimodels.server.mlflow_store import MlflowModelStore
from conftest import Registry, realistic_metrics, serve_process, start_registry, start_worker, stop_worker
from google.protobuf.json_format import MessageToDict
from test_changes import PROMOTION_WRITES, check_consistent, fail_at
from typer.testing import CliRunner

NAME = "aqi_predictor_lstm"
PEOPLE = {"alice": "admin", "bob": "admin", "carol": "admin", "oscar": "operator", "vera": "viewer"}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """A token file with three admins, an operator and a viewer; returns its path and name -> token."""
    by_name = {name: new_token() for name in PEOPLE}
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    path.write_text("".join(toml_entry(name, PEOPLE[name], tok) for name, tok in by_name.items()))
    return str(path), by_name


class Team:
    """A registry under the approval policy for NAME, and one client per person."""

    def __init__(self, reg: Registry, tokens: dict[str, str]) -> None:
        self.reg = reg
        self.clients = {name: RegistryClient(reg.target, token=tok, timeout=60) for name, tok in tokens.items()}

    def __getattr__(self, name: str) -> RegistryClient:
        return self.clients[name]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.reg.client.close()
        self.reg.server.stop(1)


def team_on(uri: str, tokens: tuple[str, dict[str, str]], **overrides: Any) -> Team:
    overrides.setdefault("approval_models", (NAME,))
    return Team(start_registry(uri, tokens_file=tokens[0], **overrides), tokens[1])


@pytest.fixture
def team(store_uri: str, tokens: tuple[str, dict[str, str]]) -> Iterator[Team]:
    t = team_on(store_uri, tokens)
    try:
        yield t
    finally:
        t.close()


def production(client: RegistryClient, name: str = NAME) -> int:
    return next((v.version for v in client.iter_versions(name, stage="production")), 0)


def records(client: RegistryClient, action: str, name: str = NAME) -> list[pb.AuditEvent]:
    return [r for r in client.iter_audit_events(model_name=name) if r.action == action]


def seed(team: Team, count: int = 3) -> list[int]:
    versions: list[int] = team.reg.seed(NAME, [realistic_metrics(i) for i in range(count)])
    return versions


def after(record: pb.AuditEvent) -> dict[str, Any]:
    """An audit record's state after, as plain data (numbers as floats)."""
    return MessageToDict(record.after)


def test_the_whole_flow_request_approve_reject_list(team: Team) -> None:
    v1, v2, v3 = seed(team)
    # a model under the policy: promoting to production creates a request, nothing moves
    resp = team.alice.promote(NAME, v1, "production", reason="first production")
    req = resp.promotion_request
    assert req.id and req.state == pb.PROMOTION_REQUEST_STATE_PENDING, resp
    assert (req.version, req.expected_current_version, req.requested_by, req.reason) == (v1, 0, "alice",
                                                                                        "first production")
    assert req.expire_time.seconds - req.create_time.seconds == 7 * 24 * 3600  # the default expiry
    assert production(team.alice) == 0
    # staging is not governed
    assert not team.alice.promote(NAME, v3, "staging").HasField("promotion_request")

    approved = team.bob.approve_promotion(req.id, reason="looks right")
    assert approved.promotion_request.state == pb.PROMOTION_REQUEST_STATE_APPROVED
    assert approved.promotion_request.closed_by == "bob" and approved.promotion_request.close_reason == "looks right"
    assert approved.promotion.version.version == v1 and approved.promotion.version.stage == pb.STAGE_PRODUCTION
    assert production(team.vera) == v1

    # the records the event log turns into events, and the promotion as a normal stage change
    requested, = records(team.vera, "RequestPromotion")
    assert requested.actor == "alice" and requested.outcome == "ok"
    assert after(requested)["promotion_request"]["id"] == req.id
    assert after(requested)["promotion_request"]["state"] == "PENDING"
    assert after(requested)["promotion_request"]["stage"] == "production"
    promoted = [r for r in records(team.vera, "PromoteModelVersion") if r.version == v1]
    assert len(promoted) == 1 and promoted[0].actor == "bob" and promoted[0].outcome == "ok"
    assert after(promoted[0])["production"] == v1 and after(promoted[0])["promotion_request"] == req.id
    approval, = records(team.vera, "ApprovePromotion")
    summary = after(approval)["promotion_request"]
    assert approval.actor == "bob" and approval.outcome == "ok"
    assert {k: summary[k] for k in ("id", "state", "stage", "version", "expected_current_version", "requested_by",
                                    "reason")} == {"id": req.id, "state": "APPROVED", "stage": "production",
                                                   "version": v1, "expected_current_version": 0,
                                                   "requested_by": "alice", "reason": "first production"}
    assert approval.sequence > promoted[0].sequence > requested.sequence
    # ... and the events they are: requested, then approved (the request closes as soon as the
    # promotion's writes stand) and the stage change (when the change's record completes)
    kinds = [(e.type, e.version, e.promotion_request_id)
             for e in team.vera.watch_events(model_names=[NAME], follow=False)
             if e.type != pb.REGISTRY_EVENT_TYPE_STAGE_CHANGED or e.version == v1]
    assert kinds == [(pb.REGISTRY_EVENT_TYPE_PROMOTION_REQUESTED, v1, req.id),
                     (pb.REGISTRY_EVENT_TYPE_PROMOTION_APPROVED, v1, req.id),
                     (pb.REGISTRY_EVENT_TYPE_STAGE_CHANGED, v1, "")]

    # approving again: one approval per request
    with pytest.raises(FailedPreconditionError, match="approved"):
        team.carol.approve_promotion(req.id)

    second = team.bob.promote(NAME, v2, "production", expected_current_version=v1).promotion_request
    assert second.expected_current_version == v1 and second.requested_by == "bob"
    rejected = team.alice.reject_promotion(second.id, reason="not this week").promotion_request
    assert rejected.state == pb.PROMOTION_REQUEST_STATE_REJECTED and rejected.closed_by == "alice"
    assert production(team.alice) == v1
    rejection, = records(team.vera, "RejectPromotion")
    assert after(rejection)["promotion_request"]["state"] == "REJECTED"
    with pytest.raises(FailedPreconditionError, match="rejected"):
        team.carol.approve_promotion(second.id)

    # listing: newest first, by state, paged; a viewer may read it
    third = team.carol.promote(NAME, v2, "production").promotion_request
    assert [r.id for r in team.vera.iter_promotion_requests(page_size=1)] == [third.id, second.id, req.id]
    assert [r.id for r in team.vera.iter_promotion_requests(state="pending")] == [third.id]
    assert [r.id for r in team.vera.iter_promotion_requests(state="approved", model_name=NAME)] == [req.id]
    assert team.vera.promotion_requests(page_size=2).next_page_token


def test_self_approval_is_refused_naming_the_rule(team: Team) -> None:
    v1, _, _ = seed(team)
    req = team.alice.promote(NAME, v1, "production").promotion_request
    with pytest.raises(PermissionDeniedError, match="two-person rule") as info:
        team.alice.approve_promotion(req.id)
    assert "alice" in str(info.value)
    assert production(team.alice) == 0
    assert team.alice.promotion_requests(state="pending").requests[0].id == req.id


def test_a_stale_approval_is_refused_and_nothing_moves(team: Team) -> None:
    v1, v2, v3 = seed(team)
    team.bob.approve_promotion(team.alice.promote(NAME, v1, "production").promotion_request.id)
    old = team.alice.promote(NAME, v2, "production").promotion_request  # expects v1
    newer = team.carol.promote(NAME, v3, "production").promotion_request  # expects v1 too
    team.bob.approve_promotion(newer.id)
    assert production(team.bob) == v3
    with pytest.raises(StaleVersionError) as info:
        team.bob.approve_promotion(old.id)
    assert f"version {v3}" in str(info.value) and f"version {v1}" in str(info.value)
    assert production(team.bob) == v3
    closed = next(r for r in team.bob.iter_promotion_requests() if r.id == old.id)
    assert closed.state == pb.PROMOTION_REQUEST_STATE_ABORTED_STALE and closed.closed_by == "bob"
    assert [r.outcome for r in records(team.bob, "ApprovePromotion")] == ["aborted_stale", "ok", "ok"]
    # a request closed stale is streamed as a rejection by the rule, with its state
    last = list(team.vera.watch_events(model_names=[NAME], follow=False))[-1]
    assert (last.type, last.promotion_request_id, last.details["request_state"]) == (
        pb.REGISTRY_EVENT_TYPE_PROMOTION_REJECTED, old.id, "ABORTED_STALE")
    assert len([r for r in records(team.bob, "PromoteModelVersion") if r.version == v2]) == 0
    with pytest.raises(FailedPreconditionError, match="aborted stale"):
        team.carol.approve_promotion(old.id)


def test_a_request_expires_once_and_cannot_be_approved(sqlite_uri: str, tokens: tuple[str, dict[str, str]]) -> None:
    team = team_on(sqlite_uri, tokens, approval_expiry_seconds=1.0)
    try:
        v1, _, _ = seed(team)
        req = team.alice.promote(NAME, v1, "production").promotion_request
        assert req.expire_time.ToMilliseconds() - req.create_time.ToMilliseconds() == 1000
        deadline = time.monotonic() + 15
        while team.vera.promotion_requests(state="expired").requests == [] and time.monotonic() < deadline:
            time.sleep(0.1)
        expired, = team.vera.promotion_requests(state="expired").requests
        assert expired.id == req.id and expired.closed_by == "expiry"
        with pytest.raises(FailedPreconditionError, match="expired"):
            team.bob.approve_promotion(req.id)
        with pytest.raises(FailedPreconditionError, match="expired"):
            team.bob.reject_promotion(req.id)
        time.sleep(0.6)  # more passes of the expiry: still one record
        record, = records(team.vera, "ExpirePromotion")
        assert record.outcome == "expired" and after(record)["promotion_request"]["state"] == "EXPIRED"
        assert production(team.vera) == 0
        kinds = [(e.type, e.promotion_request_id) for e in team.vera.watch_events(model_names=[NAME], follow=False)]
        assert kinds == [(pb.REGISTRY_EVENT_TYPE_PROMOTION_REQUESTED, req.id),
                         (pb.REGISTRY_EVENT_TYPE_PROMOTION_EXPIRED, req.id)]
    finally:
        team.close()


def test_viewers_and_operators_may_list_but_not_approve_or_reject(team: Team) -> None:
    v1, _, _ = seed(team)
    req = team.alice.promote(NAME, v1, "production").promotion_request
    for who in ("vera", "oscar"):
        with pytest.raises(PermissionDeniedError, match="admin"):
            team.clients[who].approve_promotion(req.id)
        with pytest.raises(PermissionDeniedError, match="admin"):
            team.clients[who].reject_promotion(req.id)
        with pytest.raises(PermissionDeniedError):
            team.clients[who].set_approval_policy("*", False)
        assert [r.id for r in team.clients[who].iter_promotion_requests()] == [req.id]
    assert team.vera.approval_policy(NAME).required
    assert production(team.alice) == 0


def test_rollback_under_the_policy_needs_no_approval_and_is_marked_emergency(team: Team) -> None:
    v1, v2, _ = seed(team)
    team.bob.approve_promotion(team.alice.promote(NAME, v1, "production").promotion_request.id)
    team.alice.approve_promotion(team.bob.promote(NAME, v2, "production").promotion_request.id)
    assert production(team.alice) == v2
    back = team.alice.rollback(NAME, reason="bad forecasts")
    assert back.version.version == v1 and production(team.alice) == v1
    record = records(team.alice, "RollbackModel")[0]
    assert record.actor == "alice" and record.outcome == "ok" and record.message.startswith("emergency rollback")
    assert "approval_bypassed" in record.after and after(record)["production"] == v1


def test_the_stored_policy_and_the_environment(team: Team) -> None:
    other = "aqi_predictor_gnn"
    (v,) = team.reg.seed(other, [realistic_metrics(0)])
    assert not team.alice.approval_policy(other).required
    set_ = team.alice.set_approval_policy("*", True, reason="change freeze")
    assert set_.entry.required and set_.entry.updated_by == "alice"
    policy = team.vera.approval_policy(other)
    assert policy.required and "*" in policy.source and list(policy.environment_models) == [NAME]
    assert team.alice.promote(other, v, "production").HasField("promotion_request")
    team.alice.set_approval_policy(other, False)
    assert not team.alice.approval_policy(other).required
    # the environment is a floor the RPC cannot lower
    team.alice.set_approval_policy(NAME, False)
    policy = team.vera.approval_policy(NAME)
    assert policy.required and policy.source == "AQIMODELS_APPROVAL_MODELS"
    assert [after(r)["approval_required"] for r in team.vera.iter_audit_events()
            if r.action == "SetApprovalPolicy"] == [False, False, True]


@pytest.mark.parametrize("index", range(PROMOTION_WRITES))
def test_an_approval_failing_before_any_write_moves_nothing_or_completes(
        sqlite_uri: str, tokens: tuple[str, dict[str, str]], index: int) -> None:
    """The database (here: a write) fails midway through the approval's promotion: either the
    promotion is undone and the request stays pending, or it is rolled forward and the request
    is closed approved; never a moved alias with an open request, never a pending record."""
    team = team_on(sqlite_uri, tokens)
    try:
        v1, v2, _ = seed(team)
        team.bob.approve_promotion(team.alice.promote(NAME, v1, "production").promotion_request.id)
        req = team.alice.promote(NAME, v2, "production", expected_current_version=v1).promotion_request
        team.reg.server.service.changes.fault = fail_at("PromoteModelVersion", index)
        try:
            answer: object = team.bob.approve_promotion(req.id)
        except AqiModelsError as exc:
            answer = exc
        team.reg.server.service.changes.fault = None
        versions = check_consistent(team.bob, NAME, rollback_possible=index > 1)  # v1 replaced nothing
        state = next(r for r in team.bob.iter_promotion_requests() if r.id == req.id).state
        if index <= 1:  # before the alias move stands: undone, the request still open for an approval
            assert isinstance(answer, BackendUnavailableError), answer
            assert versions[v1].stage == pb.STAGE_PRODUCTION and state == pb.PROMOTION_REQUEST_STATE_PENDING
            assert len(records(team.bob, "ApprovePromotion")) == 1
            team.carol.approve_promotion(req.id)  # and it can be approved again
        else:  # after it: completed, and the request closed
            assert isinstance(answer, pb.ApprovePromotionResponse), answer
            assert state == pb.PROMOTION_REQUEST_STATE_APPROVED
        assert production(team.bob) == v2
        assert len(records(team.bob, "ApprovePromotion")) == 2
    finally:
        team.close()


def test_an_approval_whose_request_cannot_be_closed_is_completed_by_the_reconciler(
        sqlite_uri: str, tokens: tuple[str, dict[str, str]]) -> None:
    """The database fails just after the promotion's writes, when the request is to be closed: the
    caller is told UNAVAILABLE, and the background pass completes the change and closes the request
    (one ApprovePromotion record, the promotion's record recovered)."""
    team = team_on(sqlite_uri, tokens, reconcile_after_seconds=0.6)
    try:
        v1, _, _ = seed(team)
        req = team.alice.promote(NAME, v1, "production").promotion_request
        changes = team.reg.server.service.changes
        close = changes.on_committed
        failures = [BackendUnavailableError("injected: the database went away while closing the request")]

        def failing_once(plan: Any) -> None:
            if failures:
                raise failures.pop()
            close(plan)

        changes.on_committed = failing_once
        with pytest.raises(BackendUnavailableError, match="injected"):
            team.bob.approve_promotion(req.id)
        deadline = time.monotonic() + 20
        while (team.vera.promotion_requests(state="approved").requests == []
               and time.monotonic() < deadline):
            time.sleep(0.1)
        closed, = team.vera.promotion_requests(state="approved").requests
        assert closed.id == req.id and closed.closed_by == "bob"
        assert production(team.vera) == v1
        promoted = [r for r in records(team.vera, "PromoteModelVersion") if r.version == v1]
        assert [r.outcome for r in promoted] == ["recovered"]
        assert len(records(team.vera, "ApprovePromotion")) == 1
    finally:
        team.close()


def test_a_registry_killed_during_an_approval_is_completed_and_closed_by_the_next(
        sqlite_uri: str, tokens: tuple[str, dict[str, str]]) -> None:
    """`aqimodels serve` under the policy (set by its environment) SIGKILLs itself before write
    ``index`` of the approval's promotion (production was empty: 0 is the alias move, 1 the write after
    it); the next process on
    the same store reconciles at start: undone with the request still pending, or completed with
    the request approved."""
    store = MlflowModelStore(sqlite_uri)
    versions = [store.create_version(NAME, realistic_metrics(i)) for i in range(2)]
    env = {"MLFLOW_TRACKING_URI": sqlite_uri, "AQIMODELS_WORKERS": "none", "AQIMODELS_TOKENS_FILE": tokens[0],
           "AQIMODELS_APPROVAL_MODELS": f"other_model, {NAME}"}
    people = tokens[1]
    proc, port = serve_process({**env, "AQIMODELS_FAULT_POINT": "PromoteModelVersion:1"})
    try:
        with (RegistryClient(f"127.0.0.1:{port}", token=people["alice"]) as alice,
              RegistryClient(f"127.0.0.1:{port}", token=people["bob"]) as bob):
            req = alice.promote(NAME, versions[0], "production").promotion_request
            assert req.state == pb.PROMOTION_REQUEST_STATE_PENDING
            with pytest.raises(AqiModelsError):
                bob.approve_promotion(req.id)
        assert proc.wait(30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, port = serve_process(env)
    try:
        with RegistryClient(f"127.0.0.1:{port}", token=people["vera"]) as vera:
            state = next(r for r in vera.iter_promotion_requests() if r.id == req.id).state
            record = next(r for r in records(vera, "PromoteModelVersion") if r.version == versions[0])
            assert record.outcome == "recovered", record
            assert production(vera) == versions[0] and state == pb.PROMOTION_REQUEST_STATE_APPROVED
            assert after(record)["recovery"]["action"] == "rolled_forward"
            approval, = records(vera, "ApprovePromotion")
            assert approval.actor == "bob" and after(approval)["promotion_request"]["state"] == "APPROVED"
    finally:
        proc.terminate()
        proc.wait(30)


def approve_at_once(request_id: str, approvers: list[tuple[str, Team]]) -> dict[str, object]:
    """Each (person, replica) approves ``request_id`` at the same moment; person -> answer or error."""
    barrier = threading.Barrier(len(approvers))
    results: dict[str, object] = {}

    def approve(who: str, team: Team) -> None:
        barrier.wait()
        try:
            results[who] = team.clients[who].approve_promotion(request_id)
        except AqiModelsError as exc:
            results[who] = exc

    threads = [threading.Thread(target=approve, args=pair) for pair in approvers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_two_replicas_on_postgres_approving_the_same_request_make_one_promotion(
        postgres_url: str, tokens: tuple[str, dict[str, str]]) -> None:
    one = team_on(postgres_url, tokens, approval_expiry_seconds=3600.0)
    two = team_on(postgres_url, tokens, approval_expiry_seconds=3600.0)
    try:
        versions = one.reg.seed(NAME, [realistic_metrics(i) for i in range(4)])
        two.reg.server.service.invalidate(NAME)
        for round_, v in enumerate(versions[:3]):
            req = one.alice.promote(NAME, v, "production").promotion_request
            results = approve_at_once(req.id, [("bob", one), ("carol", two)])
            won = [w for w, r in results.items() if isinstance(r, pb.ApprovePromotionResponse)]
            lost = [r for r in results.values() if not isinstance(r, pb.ApprovePromotionResponse)]
            assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], FailedPreconditionError), results
            assert production(one.vera) == v == production(two.vera)
            approvals = [r for r in records(one.vera, "ApprovePromotion")
                         if after(r)["promotion_request"]["id"] == req.id]
            assert len(approvals) == 1 and approvals[0].actor == won[0], (round_, approvals)
            assert len([r for r in records(one.vera, "PromoteModelVersion") if r.version == v]) == 1
        # the policy set on one replica holds on the other
        one.alice.set_approval_policy("aqi_predictor_gnn", True)
        assert two.vera.approval_policy("aqi_predictor_gnn").required
    finally:
        one.close()
        two.close()


def test_two_replicas_record_an_expiry_once(postgres_url: str, tokens: tuple[str, dict[str, str]]) -> None:
    one = team_on(postgres_url, tokens, approval_expiry_seconds=0.5)
    two = team_on(postgres_url, tokens, approval_expiry_seconds=0.5)
    try:
        versions = one.reg.seed(NAME, [realistic_metrics(i) for i in range(3)])
        ids = [one.alice.promote(NAME, v, "production").promotion_request.id for v in versions[1:]]
        deadline = time.monotonic() + 15
        while len(two.vera.promotion_requests(state="expired").requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        expiries = records(one.vera, "ExpirePromotion")
        assert sorted(after(r)["promotion_request"]["id"] for r in expiries) == sorted(ids)
    finally:
        one.close()
        two.close()


# ---- auto-promotion after a retrain ----

@pytest.fixture
def trained(tmp_path: Path, _sqlite_template: Path, tokens: tuple[str, dict[str, str]]) -> Iterator[Team]:
    shutil.copy(_sqlite_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    worker, target = start_worker(uri, tmp_path)
    team = team_on(uri, tokens, workers=(target,), jobs_factory=jobs_factory, approval_models=("*",))
    try:
        deadline = time.monotonic() + 60
        while not [w for w in team.vera.status().workers if w.healthy] and time.monotonic() < deadline:
            time.sleep(0.2)
        yield team
    finally:
        team.close()
        stop_worker(worker)


def test_auto_promotion_under_the_policy_creates_a_request(trained: Team) -> None:
    name = "aqi_predictor_xgboost"
    events = list(trained.oscar.retrain(["xgboost"], dataset="synthetic:stations=4,days=20,seed=3",
                                        params=wpb.TrainParams(max_epochs=3, window_hours=12), auto_promote=True))
    done = events[-1].succeeded
    assert not done.promotion.promoted and "promotion request" in done.promotion.reason, done.promotion
    assert production(trained.vera, name) == 0
    req, = trained.vera.iter_promotion_requests(state="pending")
    assert (req.model_name, req.version, req.requested_by) == (name, done.version.version, "auto-promotion")
    assert req.id in done.promotion.reason
    decision = next(r for r in trained.vera.iter_audit_events(model_name=name) if r.action == "AutoPromotion")
    assert decision.outcome == "requested" and after(decision)["promotion_request"] == req.id
    trained.alice.approve_promotion(req.id)
    assert production(trained.vera, name) == done.version.version
    # the stream tells the version's registration before anything that promotes it
    kinds = [pb.RegistryEventType.Name(e.type).removeprefix("REGISTRY_EVENT_TYPE_")
             for e in trained.vera.watch_events(model_names=[name], follow=False)]
    assert kinds == ["VERSION_REGISTERED", "PROMOTION_REQUESTED", "RETRAIN_JOB_ENDED", "PROMOTION_APPROVED",
                     "STAGE_CHANGED"], kinds


# ---- the command line ----

def test_the_cli_says_approval_is_needed_and_approves(sqlite_uri: str, tokens: tuple[str, dict[str, str]]) -> None:
    team = team_on(sqlite_uri, tokens)
    runner = CliRunner(env={"COLUMNS": "220", "AQIMODELS_TARGET": None, "AQIMODELS_TOKEN": None})

    def cli(who: str, *args: str) -> Any:
        with structlog.testing.capture_logs():
            return runner.invoke(app, ["--target", team.reg.target, "--token", tokens[1][who], *args])

    try:
        v1, v2, _ = seed(team)
        asked = cli("alice", "promote", NAME, str(v1), "--reason", "weekly")
        assert asked.exit_code == APPROVAL_NEEDED == 3, (asked.stdout, asked.stderr)
        req_id = team.vera.promotion_requests().requests[0].id
        assert req_id in asked.stdout and "approval" in asked.stdout and "aqimodels approve" in asked.stdout
        as_json = cli("alice", "promote", NAME, str(v2), "--json")
        assert as_json.exit_code == 3 and json.loads(as_json.stdout)["promotion_request"]["state"] == \
            "PROMOTION_REQUEST_STATE_PENDING"
        listed = cli("vera", "requests", "--state", "pending", "--json")
        assert listed.exit_code == 0
        assert [r["id"] for r in json.loads(listed.stdout)["requests"]][-1] == req_id
        assert req_id in cli("vera", "requests").stdout
        self_approval = cli("alice", "approve", req_id)
        assert self_approval.exit_code == 1 and self_approval.stderr.startswith("PERMISSION_DENIED: two-person rule")
        approved = cli("bob", "approve", req_id, "--reason", "checked")
        assert approved.exit_code == 0 and "approved" in approved.stdout and "production" in approved.stdout
        assert production(team.vera) == v1
        other = json.loads(as_json.stdout)["promotion_request"]["id"]
        rejected = cli("carol", "reject", other, "--reason", "no")
        assert rejected.exit_code == 0 and "rejected" in rejected.stdout
        assert cli("vera", "requests", "--state", "bogus").exit_code == 1
    finally:
        team.close()
