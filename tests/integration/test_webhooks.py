"""Webhooks against a real HTTP receiver started by the test (http.server on an ephemeral port).

Signatures are checked with the README's own receiver code; retries, the delivery log, a hanging
receiver next to promotions, two replicas on one PostgreSQL database, validation, roles and the
secret's absence from every answer, log line and audit record.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client import RegistryClient
from aqimodels.client.errors import AqiModelsError
from aqimodels.client.tokens import ROLES, new_token, toml_entry
from conftest import Registry, realistic_metrics, start_registry
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
LSTM = "aqi_predictor_lstm"
XGB = "aqi_predictor_xgboost"
SECRET = "0123456789abcdef-test-secret-" + "x" * 10
FAST = {"webhook_backoff_seconds": 0.05, "webhook_backoff_max_seconds": 0.2, "webhook_poll_seconds": 0.1}


def readme_verifier() -> Callable[..., bool]:
    """The README's receiver check, run as written."""
    text = (ROOT / "README.md").read_text()
    (code,) = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE) if "def verify_aqimodels_signature" in b]
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)  # the README's own code is what is tested
    return scope["verify_aqimodels_signature"]  # type: ignore[no-any-return]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def sequence(self) -> int:
        return int(self.headers["X-Aqimodels-Event-Sequence"])

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """An HTTP server that records every POST and answers what ``answers`` says (then 200)."""

    answers: list[int] = field(default_factory=list)
    hang: threading.Event | None = None  # set: hold every request until it is cleared... see hold()
    received: list[Received] = field(default_factory=list)
    holding: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def ok(self) -> list[Received]:
        """The requests answered 2xx."""
        with self.lock:
            return [r for r in self.received if r.headers.get("x-answered") == "200"]

    def wait_for(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < end, f"timed out; received {[(r.sequence, r.headers.get('x-answered')) for r in self.received]}"
            time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if rec.hang is not None and not rec.hang.is_set():
                with rec.lock:
                    rec.holding += 1
                rec.hang.wait(60)
            with rec.lock:
                code = rec.answers.pop(0) if rec.answers else 200
                headers = dict(self.headers.items())
                headers["x-answered"] = str(code)
                rec.received.append(Received(headers, body))
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: Any) -> None:
            pass

    rec.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.server.daemon_threads = True
    threading.Thread(target=rec.server.serve_forever, daemon=True).start()
    yield rec
    if rec.hang is not None:
        rec.hang.set()
    rec.server.shutdown()
    rec.server.server_close()


def _stop(*regs: Registry) -> None:
    for reg in regs:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


def _client(reg: Registry) -> RegistryClient:
    return reg.client  # type: ignore[return-value]


def _deliveries(reg: Registry, hook_id: str) -> list[pb.WebhookDelivery]:
    return list(reversed(list(_client(reg).iter_webhook_deliveries(hook_id))))  # oldest first


def test_deliveries_are_signed_and_verify_with_the_readme_check(sqlite_uri: str, receiver: Receiver) -> None:
    verify = readme_verifier()
    reg = start_registry(sqlite_uri, **FAST)
    try:
        client = _client(reg)
        v1, v2 = reg.seed(LSTM, [realistic_metrics(0), realistic_metrics(1)])
        hook = client.create_webhook(receiver.url, ["stage_changed"], secret=SECRET, model_name=LSTM)
        assert hook.delivered_sequence >= 0 and list(hook.event_types) == [pb.REGISTRY_EVENT_TYPE_STAGE_CHANGED]
        client.promote(LSTM, v1, "production")
        client.promote(LSTM, v2, "production")
        receiver.wait_for(lambda: len(receiver.ok()) >= 2)  # v1 to production; v2 to production, v1 archived
        got = receiver.ok()
        for r in got:
            assert verify(SECRET.encode(), r.body, r.headers["X-Aqimodels-Timestamp"], r.headers["X-Aqimodels-Signature"])
            assert r.event["sequence"] == r.sequence and r.event["type"] == "STAGE_CHANGED"
            assert r.event["model_name"] == LSTM and r.headers["X-Aqimodels-Webhook"] == hook.id
            assert r.headers["Content-Type"] == "application/json"
        sequences = [r.sequence for r in got]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
        assert [(r.event["version"], r.event["details"]["to_stage"]) for r in got] == [
            (v1, "production"), (v2, "production")]
        assert got[1].event["details"]["archived_versions"] == [v1]
        # the check refuses what it must: a changed body, a wrong secret, an old (replayed) timestamp
        r = got[0]
        stamp, signature = r.headers["X-Aqimodels-Timestamp"], r.headers["X-Aqimodels-Signature"]
        assert not verify(SECRET.encode(), r.body + b" ", stamp, signature)
        assert not verify(b"another secret of enough length", r.body, stamp, signature)
        assert not verify(SECRET.encode(), r.body, str(int(stamp) - 1), signature)
        assert not verify(SECRET.encode(), r.body, stamp, signature, tolerance_seconds=-1)
        # the log holds one delivered attempt per event, and the cursor passed them
        log = _deliveries(reg, hook.id)
        assert [(d.event_sequence, d.attempt, d.outcome, d.status_code) for d in log] == [
            (s, 1, pb.WEBHOOK_DELIVERY_OUTCOME_DELIVERED, 200) for s in sequences]
        assert {d.id for d in log} == {r.headers["X-Aqimodels-Delivery"] for r in got}
        receiver.wait_for(lambda: client.list_webhooks()[0].delivered_sequence == sequences[-1])
        # events of other models or types are not sent
        (x1,) = reg.seed(XGB, [realistic_metrics(2)])
        client.promote(XGB, x1, "staging")
        client.rollback(LSTM)  # a ROLLBACK event of the webhook's model: not of its types
        client.promote(LSTM, v2, "staging")
        receiver.wait_for(lambda: any(r.event["details"].get("to_stage") == "staging" for r in receiver.ok()))
        assert len(receiver.received) == 3
        assert all(r.event["model_name"] == LSTM and r.event["type"] == "STAGE_CHANGED" for r in receiver.ok())
    finally:
        _stop(reg)


def test_a_receiver_answering_500_three_times_gets_the_event_once_logged_after_retries(
        sqlite_uri: str, receiver: Receiver) -> None:
    receiver.answers = [500, 500, 500]
    reg = start_registry(sqlite_uri, **FAST)
    try:
        client = _client(reg)
        (v1,) = reg.seed(LSTM, [realistic_metrics(0)])
        hook = client.create_webhook(receiver.url, ["stage_changed"], secret=SECRET)
        client.promote(LSTM, v1, "staging")
        receiver.wait_for(lambda: len(receiver.ok()) == 1)
        assert len(receiver.received) == 4 and len({r.sequence for r in receiver.received}) == 1
        (sequence,) = {r.sequence for r in receiver.received}
        log = _deliveries(reg, hook.id)
        assert [(d.attempt, d.status_code, d.outcome) for d in log] == [
            (1, 500, pb.WEBHOOK_DELIVERY_OUTCOME_RETRYING), (2, 500, pb.WEBHOOK_DELIVERY_OUTCOME_RETRYING),
            (3, 500, pb.WEBHOOK_DELIVERY_OUTCOME_RETRYING), (4, 200, pb.WEBHOOK_DELIVERY_OUTCOME_DELIVERED)]
        assert all(d.event_sequence == sequence and d.kind == pb.WEBHOOK_DELIVERY_KIND_EVENT for d in log)
        assert "HTTP 500" in log[0].error and log[-1].error == ""
        # the backoff doubles between attempts (50, 100, 200 ms): the attempts are spread out, not a burst
        times = [d.time.ToMilliseconds() for d in log]
        assert times[-1] - times[0] >= 300
        receiver.wait_for(lambda: client.list_webhooks()[0].delivered_sequence == sequence)
        # the same event sent again on request: once more, logged as a redelivery; the cursor stays
        again = client.redeliver_webhook(hook.id, event_sequence=sequence)
        assert again.outcome == pb.WEBHOOK_DELIVERY_OUTCOME_DELIVERED and again.kind == pb.WEBHOOK_DELIVERY_KIND_REDELIVERY
        assert again.attempt == 5 and receiver.ok()[-1].sequence == sequence and len(receiver.ok()) == 2
        by_delivery = client.redeliver_webhook(hook.id, delivery_id=log[0].id)
        assert by_delivery.event_sequence == sequence
        assert client.list_webhooks()[0].delivered_sequence == sequence
        assert [d.id for d in client.webhook_deliveries(hook.id, event_sequence=sequence, page_size=2).deliveries] == [
            by_delivery.id, again.id]
    finally:
        _stop(reg)


def test_an_event_whose_retries_run_out_is_logged_failed_and_the_next_one_goes(
        sqlite_uri: str, receiver: Receiver) -> None:
    receiver.answers = [503] * 1000
    reg = start_registry(sqlite_uri, **FAST, webhook_retry_seconds=0.6)
    try:
        client = _client(reg)
        v1, v2 = reg.seed(LSTM, [realistic_metrics(0), realistic_metrics(1)])
        hook = client.create_webhook(receiver.url, ["stage_changed"], secret=SECRET)
        client.promote(LSTM, v1, "staging")
        receiver.wait_for(lambda: any(d.outcome == pb.WEBHOOK_DELIVERY_OUTCOME_FAILED
                                      for d in _deliveries(reg, hook.id)))
        first = _deliveries(reg, hook.id)
        assert first[-1].outcome == pb.WEBHOOK_DELIVERY_OUTCOME_FAILED and len(first) >= 3
        assert all(d.outcome == pb.WEBHOOK_DELIVERY_OUTCOME_RETRYING for d in first[:-1])
        receiver.answers.clear()
        client.promote(LSTM, v2, "staging")  # the next event is delivered; the failed one is not sent again
        receiver.wait_for(lambda: len(receiver.ok()) == 1)
        assert receiver.ok()[0].sequence > first[0].event_sequence
    finally:
        _stop(reg)


def test_a_hanging_receiver_does_not_delay_promotions(sqlite_uri: str, receiver: Receiver) -> None:
    """Promotions answer while the receiver holds a delivery (which lasts 20 s: the send timeout).

    The latencies are measured with and without the hanging receiver; the bound asserted is one
    of order of magnitude only (a promotion that waited for the receiver would take 20 s).
    """
    receiver.hang = threading.Event()
    reg = start_registry(sqlite_uri, **FAST, webhook_timeout_seconds=20.0, webhook_lease_seconds=60.0)
    try:
        client = _client(reg)
        versions = reg.seed(LSTM, [realistic_metrics(i) for i in range(8)])

        def promote_all(vs: list[int]) -> list[float]:
            took = []
            for v in vs:
                started = time.perf_counter()
                client.promote(LSTM, v, "production")
                took.append(time.perf_counter() - started)
            return took

        without = promote_all(versions[:4])
        client.create_webhook(receiver.url, [], secret=SECRET)
        with_hang = promote_all(versions[4:5])
        receiver.wait_for(lambda: receiver.holding >= 1)  # the dispatcher is stuck in a POST now
        with_hang += promote_all(versions[5:])
        assert receiver.holding >= 1 and not receiver.received  # still held while the promotions answered
        assert max(with_hang) < 5.0, (without, with_hang)
        assert max(with_hang) < 20 * max(without) + 1.0, (without, with_hang)
        assert client.get_version(LSTM, versions[-1]).stage == pb.STAGE_PRODUCTION
        receiver.hang.set()  # released: the held events arrive, in order
        receiver.wait_for(lambda: len(receiver.ok()) >= 4)
        sequences = [r.sequence for r in receiver.ok()]
        assert sequences == sorted(set(sequences))
    finally:
        receiver.hang.set()
        _stop(reg)


def test_two_replicas_on_postgres_deliver_each_event_exactly_once(postgres_url: str, receiver: Receiver) -> None:
    settings = {**FAST, "webhook_lease_seconds": 3.0, "webhook_timeout_seconds": 1.0}
    a = start_registry(postgres_url, **settings)
    b = start_registry(postgres_url, **settings)
    try:
        versions = a.seed(LSTM, [realistic_metrics(i) for i in range(10)])
        b.server.service.invalidate(LSTM)  # type: ignore[attr-defined]
        hook = _client(a).create_webhook(receiver.url, ["stage_changed"], secret=SECRET)
        for i, v in enumerate(versions[:6]):
            _client(a if i % 2 else b).promote(LSTM, v, "staging")
        expected = {e.sequence for e in a.server.webhooks.events.read_after(hook.delivered_sequence, 1000)}  # type: ignore[attr-defined]
        assert len(expected) >= 6
        receiver.wait_for(lambda: {r.sequence for r in receiver.ok()} >= expected)
        receiver.wait_for(lambda: _client(a).list_webhooks()[0].delivered_sequence >= max(expected))
        owners = {_client(a).list_webhooks()[0].owner}
        assert owners <= {a.server.webhooks.owner, b.server.webhooks.owner}  # type: ignore[attr-defined]
        # the owner stops (its leases released): the other replica goes on from the cursor
        owner, other = (a, b) if owners == {a.server.webhooks.owner} else (b, a)  # type: ignore[attr-defined]
        owner.server.stop(1)  # type: ignore[attr-defined]
        for v in versions[6:]:
            _client(other).promote(LSTM, v, "staging")
        expected = {e.sequence for e in other.server.webhooks.events.read_after(hook.delivered_sequence, 1000)}  # type: ignore[attr-defined]
        receiver.wait_for(lambda: {r.sequence for r in receiver.ok()} >= expected)
        time.sleep(0.5)  # anything sent twice would have arrived by now
        sequences = [r.sequence for r in receiver.received]
        assert sorted(sequences) == sorted(expected), sequences  # each event once, none twice
        assert sequences == sorted(sequences)
        assert _client(other).list_webhooks()[0].owner == other.server.webhooks.owner  # type: ignore[attr-defined]
    finally:
        for reg in (a, b):
            reg.client.close()  # type: ignore[attr-defined]
        b.server.stop(1)  # type: ignore[attr-defined]
        a.server.stop(1)  # type: ignore[attr-defined]


def _code(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(AqiModelsError) as info:
        call()
    return info.value.code.name, info.value.message


def test_invalid_requests_are_refused_naming_the_problem(sqlite_uri: str, receiver: Receiver) -> None:
    reg = start_registry(sqlite_uri, **FAST)
    try:
        client = _client(reg)
        bad_urls = {"": "url is required", "ftp://example.com/x": "scheme 'ftp'", "example.com/hook": "scheme",
                    "http:///nohost": "names no host", "https://user:pw@example.com/": "user name or password",
                    "http://exa mple.com/": "spaces", "http://example.com:99999/": "not a valid URL",
                    "http://example.com/#frag": "fragment", "https://example.com/" + "a" * 300: "longer than 256"}
        for url, problem in bad_urls.items():
            code, message = _code(lambda url=url: client.create_webhook(url, [], secret=SECRET))  # type: ignore[misc]
            assert code == "INVALID_ARGUMENT" and problem in message, (url, message)
        assert _code(lambda: client.create_webhook(receiver.url, [], secret="short")) [0] == "INVALID_ARGUMENT"
        code, message = _code(lambda: client.create_webhook(receiver.url, [99], secret=SECRET))
        assert code == "INVALID_ARGUMENT" and "event_types" in message
        code, message = _code(lambda: client.create_webhook(receiver.url, [0], secret=SECRET))
        assert code == "INVALID_ARGUMENT" and "event_types" in message
        with pytest.raises(AqiModelsError, match="unknown event type 'promoted'"):
            client.create_webhook(receiver.url, ["promoted"], secret=SECRET)
        assert _code(lambda: client.create_webhook(receiver.url, [], secret=SECRET, model_name="bad\x01name"))[0] \
            == "INVALID_ARGUMENT"
        assert _code(lambda: client.delete_webhook("not-an-id")) == (
            "INVALID_ARGUMENT", "webhook_id 'not-an-id' is not a webhook id (32 hex digits)")
        assert _code(lambda: client.test_webhook("0" * 32))[0] == "NOT_FOUND"
        assert _code(lambda: client.webhook_deliveries("0" * 32))[0] == "NOT_FOUND"
        hook = client.create_webhook(receiver.url, [], secret=SECRET)
        assert _code(lambda: client.redeliver_webhook(hook.id))[0] == "INVALID_ARGUMENT"
        assert _code(lambda: client.redeliver_webhook(hook.id, event_sequence=5, delivery_id="x"))[0] == "INVALID_ARGUMENT"
        assert _code(lambda: client.redeliver_webhook(hook.id, event_sequence=10**6)) == (
            "NOT_FOUND", f"event {10**6} is not in the event log")
        assert _code(lambda: client.webhook_deliveries(hook.id, page_token="garbage"))[0] == "INVALID_ARGUMENT"
        assert len(client.list_webhooks()) == 1  # nothing half-made by the refused requests
        test = client.test_webhook(hook.id)
        assert test.outcome == pb.WEBHOOK_DELIVERY_OUTCOME_DELIVERED and test.event_sequence == 0
        assert receiver.ok()[0].event["test"] is True
        assert _code(lambda: client.redeliver_webhook(hook.id, delivery_id=test.id))[0] == "FAILED_PRECONDITION"
        client.delete_webhook(hook.id)
        assert client.list_webhooks() == [] and _code(lambda: client.delete_webhook(hook.id))[0] == "NOT_FOUND"
    finally:
        _stop(reg)


def test_webhooks_are_admin_only_audited_and_never_show_the_secret(
        tmp_path: Path, sqlite_uri: str, receiver: Receiver, capfd: pytest.CaptureFixture[str]) -> None:
    tokens = {role: new_token() for role in ROLES}
    path = tmp_path / "tokens.toml"
    path.write_text("".join(toml_entry(f"{role}-bot", role, tok) for role, tok in tokens.items()))
    reg = start_registry(sqlite_uri, **FAST, tokens_file=str(path))
    clients = {role: RegistryClient(reg.target, token=tok) for role, tok in tokens.items()}
    try:
        admin = clients["admin"]
        (v1,) = reg.seed(LSTM, [realistic_metrics(0)])
        hook = admin.create_webhook(receiver.url, ["stage_changed"], secret=SECRET)
        for role in ("viewer", "operator"):
            c = clients[role]
            calls: list[Callable[[], object]] = [
                lambda c=c: c.create_webhook(receiver.url, [], secret=SECRET), c.list_webhooks,  # type: ignore[misc]
                lambda c=c: c.delete_webhook(hook.id), lambda c=c: c.test_webhook(hook.id),  # type: ignore[misc]
                lambda c=c: c.webhook_deliveries(hook.id),  # type: ignore[misc]
                lambda c=c: c.redeliver_webhook(hook.id, event_sequence=1)]  # type: ignore[misc]
            for call in calls:
                code, message = _code(call)
                assert code == "PERMISSION_DENIED" and "admin" in message, message
        admin.promote(LSTM, v1, "staging")
        receiver.wait_for(lambda: len(receiver.ok()) == 1)
        test = admin.test_webhook(hook.id)
        again = admin.redeliver_webhook(hook.id, event_sequence=receiver.ok()[0].sequence)
        answers = [hook, *admin.list_webhooks(), test, again,
                   *admin.webhook_deliveries(hook.id).deliveries, admin.delete_webhook(hook.id)]
        records = [e for e in admin.iter_audit_events() if "Webhook" in e.action and e.outcome != "denied"]
        assert [(e.action, e.actor, e.outcome) for e in reversed(records)] == [
            ("CreateWebhook", "admin-bot", "ok"), ("TestWebhook", "admin-bot", "ok"),
            ("RedeliverWebhook", "admin-bot", "ok"), ("DeleteWebhook", "admin-bot", "ok")]
        denied = [e for e in admin.iter_audit_events() if e.outcome == "denied" and "Webhook" in e.action]
        assert len(denied) == 12
        for answer in [*answers, *records]:
            assert SECRET not in str(answer) and SECRET.encode() not in answer.SerializeToString()
        out, err = capfd.readouterr()
        assert "webhook_claimed" in out + err  # the server's log was captured, and it has no secret
        assert SECRET not in out + err
    finally:
        for c in clients.values():
            c.close()
        _stop(reg)


def test_the_cli_manages_webhooks(sqlite_uri: str, receiver: Receiver, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog
    from aqimodels.client.cli import app

    reg = start_registry(sqlite_uri, **FAST)
    runner = CliRunner()
    logs = structlog.testing.capture_logs()  # the in-process server's log stays out of the CLI's output
    logs.__enter__()
    monkeypatch.setenv("AQIMODELS_TARGET", reg.target)
    monkeypatch.delenv("AQIMODELS_WEBHOOK_SECRET", raising=False)
    try:
        empty = runner.invoke(app, ["webhooks", "list"])
        assert empty.exit_code == 0 and "No webhooks." in empty.stdout, empty.output
        quiet = runner.invoke(app, ["events", "--after", "5"])
        assert quiet.exit_code == 0 and "No registry events after 5 match." in quiet.stdout, quiet.output
        secret_file = tmp_path / "webhook.secret"
        secret_file.write_text(SECRET + "\n")
        done = runner.invoke(app, ["webhooks", "create", receiver.url, "--events", "stage_changed,rollback",
                                   "--model", LSTM, "--secret-file", str(secret_file), "--json"])
        assert done.exit_code == 0, done.output
        created = json.loads(done.stdout)
        assert set(created["event_types"]) == {"REGISTRY_EVENT_TYPE_STAGE_CHANGED", "REGISTRY_EVENT_TYPE_ROLLBACK"}
        assert SECRET not in done.stdout
        no_secret = runner.invoke(app, ["webhooks", "create", receiver.url])
        assert no_secret.exit_code == 2 and "AQIMODELS_WEBHOOK_SECRET" in no_secret.stderr
        monkeypatch.setenv("AQIMODELS_WEBHOOK_SECRET", SECRET)
        assert runner.invoke(app, ["webhooks", "create", receiver.url, "--events", "alert_raised"]).exit_code == 0
        bad = runner.invoke(app, ["webhooks", "create", "ftp://x", "--events", "stage_changed"])
        assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.stderr and "ftp" in bad.stderr
        listed = json.loads(runner.invoke(app, ["webhooks", "list", "--json"]).stdout)["webhooks"]
        assert listed[0]["id"] == created["id"] and len(listed) == 2
        table = runner.invoke(app, ["webhooks", "list"])
        assert created["id"][:8] in table.stdout and SECRET not in table.stdout
        tested = runner.invoke(app, ["webhooks", "test", created["id"]])
        assert tested.exit_code == 0 and "delivered" in tested.stdout and "HTTP 200" in tested.stdout
        shown = json.loads(runner.invoke(app, ["webhooks", "deliveries", created["id"], "--json"]).stdout)
        assert shown["deliveries"][0]["kind"] == "WEBHOOK_DELIVERY_KIND_TEST"
        receiver.answers = [500]
        failed = runner.invoke(app, ["webhooks", "test", created["id"]])
        assert failed.exit_code == 1 and "HTTP 500" in failed.stdout
        assert runner.invoke(app, ["webhooks", "delete", created["id"]]).exit_code == 0
        assert len(json.loads(runner.invoke(app, ["webhooks", "list", "--json"]).stdout)["webhooks"]) == 1
    finally:
        logs.__exit__(None, None, None)
        _stop(reg)


def test_the_readme_create_line_works_as_written(sqlite_uri: str, tmp_path: Path) -> None:
    """The README's `openssl ... | aqimodels webhooks create ... --secret-file -` line (not run by
    test_readme.py, which runs lines that start with `aqimodels`)."""
    import os
    import sys

    text = (ROOT / "README.md").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("openssl rand") and "webhooks create" in x]
    reg = start_registry(sqlite_uri, **FAST)
    try:
        env = {**os.environ, "AQIMODELS_TARGET": reg.target,
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        (hook,) = _client(reg).list_webhooks()
        assert hook.model_name == LSTM and hook.url == "http://127.0.0.1:8080/aqimodels"
        assert len((tmp_path / "webhook.secret").read_text().strip()) == 64
    finally:
        _stop(reg)


def test_a_killed_replica_s_webhooks_are_taken_over_once_its_lease_expired(
        postgres_url: str, receiver: Receiver, tmp_path: Path) -> None:
    """Replica A (its own process) holds the webhook and is SIGKILLed: B delivers once A's lease
    (3 s) has expired, from A's cursor, and nothing A delivered arrives twice."""
    from conftest import serve_process

    env = {"MLFLOW_TRACKING_URI": postgres_url, "AQIMODELS_WORKERS": "none", "AQIMODELS_WEBHOOK_LEASE_SECONDS": "3",
           "AQIMODELS_WEBHOOK_TIMEOUT_SECONDS": "1", "AQIMODELS_WEBHOOK_POLL_SECONDS": "0.1",
           "AQIMODELS_WEBHOOK_BACKOFF_SECONDS": "0.05"}
    proc, port = serve_process(env, cwd=tmp_path)
    b: Registry | None = None
    try:
        with RegistryClient(f"127.0.0.1:{port}", timeout=60) as a:
            hook = a.create_webhook(receiver.url, ["stage_changed"], secret=SECRET)
            receiver.wait_for(lambda: a.list_webhooks()[0].owner != "")
            a_owner = a.list_webhooks()[0].owner
        b = start_registry(postgres_url, **FAST, webhook_lease_seconds=3.0, webhook_timeout_seconds=1.0)
        client = _client(b)
        versions = b.seed(LSTM, [realistic_metrics(i) for i in range(4)])
        client.promote(LSTM, versions[0], "staging")
        receiver.wait_for(lambda: len(receiver.ok()) == 1)  # delivered by A, the owner
        first = receiver.ok()[0].sequence
        receiver.wait_for(lambda: client.list_webhooks()[0].delivered_sequence >= first)  # and A's cursor is past it
        assert client.list_webhooks()[0].owner == a_owner
        proc.kill()
        proc.wait(10)
        killed = time.monotonic()
        for v in versions[1:]:
            client.promote(LSTM, v, "staging")
        receiver.wait_for(lambda: len(receiver.ok()) == 4)
        took_over_after = time.monotonic() - killed
        assert client.list_webhooks()[0].owner == b.server.webhooks.owner  # type: ignore[attr-defined]
        time.sleep(0.5)
        sequences = [r.sequence for r in receiver.received]
        assert sequences == sorted(set(sequences)) and len(sequences) == 4, sequences
        assert took_over_after < 20, took_over_after  # the lease (3 s) and a scan, on a loaded machine
        assert hook.id == client.list_webhooks()[0].id
    finally:
        if proc.poll() is None:
            proc.kill()
        if b is not None:
            _stop(b)
