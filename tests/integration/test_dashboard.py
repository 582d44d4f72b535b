"""The web dashboard in a real Chromium (Debian's, driven by Playwright) against a real registry and worker.

One module-wide system: a registry with a token file (admin, operator, viewer) and its Prometheus
endpoint, a training worker with its own, and the dashboard on uvicorn in a thread. Models are
seeded straight into MLflow (cheap); one tiny LSTM retrain really trains. Every test saves a
screenshot under its tmp_path.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import RegistryClient
from aqimodels.client.tokens import new_token, toml_entry
from conftest import Registry, realistic_metrics, start_registry

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MODELS = ("aqi_predictor_xgboost", "aqi_predictor_lstm", "aqi_predictor_gnn", "aqi_predictor_ensemble")
HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=1'
SMALL = "synthetic:stations=4,days=30,seed=3"
LSTM = "aqi_predictor_lstm"


@dataclass
class System:
    reg: Registry
    dashboard: Any
    tokens: dict[str, str]
    worker: Any
    worker_server: Any
    folder: Path
    finished_jobs: list[str] = field(default_factory=list)
    scraped: set[str] = field(default_factory=set)  # every sample name the two /metrics endpoints showed

    @property
    def url(self) -> str:
        return str(self.dashboard.url)

    def client(self, role: str = "admin") -> RegistryClient:
        return RegistryClient(self.reg.target, token=self.tokens[role], timeout=60)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> Iterator[System]:
    from aqimodels.client.dashboard.config import DashboardConfig
    from aqimodels.client.dashboard.server import start_in_thread
    from aqimodels.server.jobs import jobs_factory
    from aqimodels.training.main import create_worker
    from aqimodels.training.servicer import WorkerConfig

    folder = tmp_path_factory.mktemp("dashboard")
    shutil.copy(_sqlite_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    tokens = {role: new_token() for role in ("admin", "operator", "viewer")}
    (folder / "tokens.toml").write_text("".join(toml_entry(f"{role}-user", role, t) for role, t in tokens.items()))
    worker_server, worker_port, worker = create_worker(
        WorkerConfig(tracking_uri=uri, port=0, metrics_port=0, artifact_location=str(folder / "artifacts")),
        "127.0.0.1:0")
    reg = start_registry(uri, workers=(f"127.0.0.1:{worker_port}",), jobs_factory=jobs_factory, metrics_port=0,
                         tokens_file=str(folder / "tokens.toml"))
    dash = start_in_thread(DashboardConfig(target=reg.target, port=0, status_interval_seconds=0.5))
    system = System(reg, dash, tokens, worker, worker_server, folder)
    with system.client() as c:
        deadline = time.monotonic() + 60
        while not (c.status().workers and all(w.healthy for w in c.status().workers)):
            assert time.monotonic() < deadline, "the worker never turned healthy"
            time.sleep(0.2)
    for i, name in enumerate(MODELS):
        reg.seed(name, [realistic_metrics(k, seed=i) for k in range(3 + i)])
    reg.seed(HOSTILE, [realistic_metrics(0)])
    with system.client() as c:
        for i, name in enumerate(MODELS[:3]):
            c.promote(name, 2 + i, "production")
    stop = threading.Event()
    scraper = threading.Thread(target=_scrape_until, args=(system, stop), daemon=True)
    scraper.start()
    try:
        yield system
    finally:
        stop.set()
        scraper.join(5)
        dash.stop()
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(2)  # type: ignore[attr-defined]
        worker.stop_all()
        worker_server.stop(2).wait()
        worker.metrics.close()


def _scrape_until(system: System, stop: threading.Event) -> None:
    """Scrapes the registry's and the worker's endpoints through the module's traffic (a running job's
    progress series exist only while it runs)."""
    from test_metrics import scrape

    ports = (system.reg.server.metrics.port, system.worker.metrics.port)  # type: ignore[attr-defined]
    while not stop.wait(0.2):
        for port in ports:
            try:
                system.scraped |= {name for name, _ in scrape(port)}
            except OSError:
                pass


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page_for(browser: Any, system: System, tmp_path: Path) -> Iterator[Any]:
    """``page_for(role)``: a fresh browser context logged in with that role's token (None: not logged in)."""
    opened: list[Any] = []
    errors: list[str] = []

    def make(role: str | None) -> Any:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        # Script errors and CSP refusals; an error status is asserted where a test expects one.
        page.on("console", lambda m: errors.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        opened.append(context)
        if role is not None:
            login(page, system, system.tokens[role])
        return page

    yield make
    for i, context in enumerate(opened):
        for k, page in enumerate(context.pages):
            page.screenshot(path=str(tmp_path / f"screenshot-{i}-{k}.png"), full_page=True)
        context.close()
    assert not errors, f"errors in the page (script errors or CSP violations): {errors}"


def login(page: Any, system: System, token: str) -> None:
    page.goto(system.url + "login")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(system.url)


def production_alias(system: System, name: str) -> int:
    from mlflow.tracking import MlflowClient

    return int(MlflowClient(tracking_uri=system.reg.tracking_uri).get_model_version_by_alias(name, "production")
               .version)


# ---- pages ----

def test_overview_lists_every_model_with_its_production_version(page_for: Any, system: System) -> None:
    page = page_for("viewer")
    page.goto(system.url)
    with system.client("viewer") as c:
        status = c.status()
    assert len(status.models) == len(MODELS) + 1
    for ms in status.models:
        row = page.locator("#models tr[data-model]").filter(has=page.get_by_text(ms.model.name, exact=True))
        assert row.count() == 1, ms.model.name
        prod = ms.model.production_version
        assert row.locator("td.production").inner_text().strip() == (f"v{prod}" if prod else "—")
        if prod:
            assert row.locator("td.num").first.inner_text() == f"{ms.production.metrics['rmse']:.2f}"
    assert "healthy" in page.locator("#backend").inner_text()
    assert page.locator("#workers tbody tr").count() == 1
    assert page.locator("#retrain-form").count() == 0  # a viewer gets no retrain form


def test_a_model_name_holding_markup_is_shown_as_text(page_for: Any, system: System) -> None:
    page = page_for("admin")
    page.goto(system.url)
    link = page.locator("a.model-link", has_text="window.pwned")
    assert link.inner_text() == HOSTILE
    link.click()
    page.wait_for_load_state("load")
    assert page.locator("#model-name").inner_text() == HOSTILE
    assert page.title().startswith(HOSTILE)
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("img[src=x]").count() == 0
    assert "&lt;script&gt;" in page.content()


def test_login_is_asked_once_kept_in_a_strict_httponly_cookie_and_logout_clears_it(
        page_for: Any, system: System) -> None:
    page = page_for(None)
    page.goto(system.url + "models/aqi_predictor_lstm")
    assert urllib.parse.urlparse(page.url).path == "/login"  # the registry has tokens: a login form
    page.fill("input[name=token]", "not-a-token")
    page.click("button[type=submit]")
    assert "UNAUTHENTICATED" in page.locator("#error").inner_text()
    page.fill("input[name=token]", system.tokens["operator"])
    page.click("button[type=submit]")
    page.wait_for_url(system.url + "models/aqi_predictor_lstm")  # back where it was going
    assert page.locator(".who .user").inner_text() == "operator-user"
    cookie, = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert system.tokens["operator"] not in cookie["value"]  # the token stays on the dashboard's server
    assert page.locator("#admin-actions").count() == 0 and page.locator("#retrain-form").count() == 1
    page.click("text=Log out")
    page.wait_for_url(system.url + "login")
    page.goto(system.url)
    assert urllib.parse.urlparse(page.url).path == "/login"


def test_a_post_without_the_csrf_token_is_refused(page_for: Any, system: System) -> None:
    page = page_for("admin")
    before = production_alias(system, "aqi_predictor_gnn")
    reply = page.request.post(system.url + "models/aqi_predictor_gnn",
                              form={"action": "promote", "version": "1", "stage": "production",
                                    "expected": str(before)})
    assert reply.status == 403 and "CSRF" in reply.text()
    assert production_alias(system, "aqi_predictor_gnn") == before


def test_admin_promotes_from_the_page_and_a_stale_page_gets_aborted(page_for: Any, system: System) -> None:
    name = "aqi_predictor_xgboost"
    page = page_for("admin")
    page.goto(system.url + f"models/{name}")
    prod = production_alias(system, name)
    assert page.locator("#production-version").inner_text() == f"v{prod}"
    target = 1 if prod != 1 else 3
    page.locator(f"#versions tr[data-version='{target}'] button.promote-production").click()
    page.wait_for_load_state("load")
    assert f"{name} v{target} is now production (was v{prod})" in page.locator(".flash").inner_text()
    assert production_alias(system, name) == target  # MLflow's alias moved
    assert page.locator("#production-version").inner_text() == f"v{target}"

    # Another admin moves production while this page is open: the page's promote must not overwrite it.
    other = 3 if target != 3 else 2
    with system.client() as c:
        c.promote(name, other, "production", expected_current_version=target)
    stale = 2 if other != 2 else 1
    page.locator(f"#versions tr[data-version='{stale}'] button.promote-production").click()
    page.wait_for_load_state("load")
    error = page.locator("#error").inner_text()
    assert error.startswith("ABORTED") and f"{other}" in error
    assert production_alias(system, name) == other
    assert page.locator("#production-version").inner_text() == f"v{other}"  # the page now shows the truth


def test_a_promotion_under_the_two_person_rule_says_it_is_a_request(page_for: Any, system: System) -> None:
    name = MODELS[1]
    with system.client() as c:
        c.set_approval_policy(name, True, reason="dashboard test")
    try:
        page = page_for("admin")
        page.goto(system.url + f"models/{name}")
        prod = production_alias(system, name)
        target = next(v for v in (1, 2, 3) if v != prod)
        page.locator(f"#versions tr[data-version='{target}'] button.promote-production").click()
        page.wait_for_load_state("load")
        with system.client() as c:
            req, = c.iter_promotion_requests(state="pending", model_name=name)
            c.reject_promotion(req.id, reason="dashboard test")
        flash = page.locator(".flash").inner_text()
        assert f"v{target} to production needs another admin's approval" in flash and req.id in flash
        assert (req.version, production_alias(system, name)) == (target, prod)  # nothing moved
    finally:
        with system.client() as c:
            c.set_approval_policy(name, False, reason="dashboard test done")


def test_a_viewer_sees_no_mutation_button_and_is_refused_when_posting(page_for: Any, system: System) -> None:
    name = "aqi_predictor_lstm"
    page = page_for("viewer")
    page.goto(system.url + f"models/{name}")
    assert page.locator("#versions tbody tr").count() >= 3
    assert page.locator("button.promote-production").count() == 0
    assert page.locator("#admin-actions, #rollback-form, #cleanup-form, #retrain-form").count() == 0
    before = production_alias(system, name)
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    reply = page.request.post(system.url + f"models/{name}", form={
        "csrf": csrf, "action": "promote", "version": "1", "stage": "production", "expected": str(before)})
    assert reply.status == 403
    assert "PERMISSION_DENIED" in reply.text() and "needs role admin" in reply.text()
    assert production_alias(system, name) == before
    reply = page.request.post(system.url + "retrain", form={"csrf": csrf, "model_type": "lstm"})
    assert reply.ok and "PERMISSION_DENIED" in reply.text()  # back on the page, with the refusal


def test_cleanup_runs_a_dry_run_first_and_deletes_exactly_what_it_listed(page_for: Any, system: System) -> None:
    name = "aqi_predictor_ensemble"  # 6 versions, none aliased
    page = page_for("admin")
    page.goto(system.url + f"models/{name}")
    page.fill("#cleanup-form input[name=keep_last]", "4")
    page.click("#cleanup-form button")
    page.wait_for_load_state("load")
    preview = page.locator("#cleanup-preview").inner_text()
    assert "would delete 2 versions (v1, v2)" in preview
    with system.client() as c:
        assert c.list_versions(name).total_size == 6  # nothing deleted by the dry run
        page.click("#cleanup-preview button.danger")
        page.wait_for_load_state("load")
        assert "deleted 2 versions" in page.locator(".flash").inner_text()
        assert sorted(v.version for v in c.iter_versions(name)) == [3, 4, 5, 6]


def test_model_page_pages_versions_and_charts_history_and_compares(page_for: Any, system: System) -> None:
    name = "aqi_predictor_gnn"
    page = page_for("viewer")
    page.goto(system.url + f"models/{name}?page_size=10")
    with system.client("viewer") as c:
        total = c.list_versions(name).total_size
        history = c.history(name)
    assert page.locator("#versions tbody tr").count() == min(10, total)
    assert page.locator("#chart").get_attribute("data-points") == str(len(history.points))
    assert page.locator("#chart canvas").count() == 1
    page.check("#versions tr[data-version='1'] input[type=checkbox]")
    page.check("#versions tr[data-version='2'] input[type=checkbox]")
    page.click("#compare button")
    page.wait_for_load_state("load")
    assert "Compare v" in page.locator("#comparison h2").inner_text()
    assert page.locator("#comparison tbody tr").count() >= 4


# ---- live ----

def _start_lstm(system: System, epochs: int) -> str:
    with system.client("operator") as c:
        stream = c.retrain(["lstm"], dataset=SMALL, params=wpb.TrainParams(max_epochs=epochs,
                                                                           early_stopping_patience=epochs))
        job_id = next(iter(stream)).job_id
        stream.close()  # type: ignore[attr-defined]
    return job_id


def test_a_retrain_shows_live_progress_on_the_job_page_and_its_version_on_the_model_page(
        page_for: Any, system: System) -> None:
    page = page_for("viewer")
    overview = page.context.new_page()  # the overview, open beside it, shows the job's progress bar live
    overview.goto(system.url)
    overview.evaluate("window.notReloaded = true")
    job_id = _start_lstm(system, 20)
    page.goto(system.url + f"jobs/{job_id}")
    page.evaluate("window.notReloaded = true")
    seen: list[int] = []
    on_overview: list[int] = []
    bar = f"#running tr[data-job='{job_id}'] progress"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        value = int(page.evaluate("document.querySelector('#job-progress').value"))
        if not seen or value != seen[-1]:
            seen.append(value)
        shown = overview.evaluate(f"(document.querySelector(\"{bar}\") || {{value: -1}}).value")
        if shown >= 0 and (not on_overview or shown != on_overview[-1]):
            on_overview.append(int(shown))
        if page.locator("#job-state .badge").inner_text() in ("succeeded", "failed", "cancelled", "interrupted"):
            break
        time.sleep(0.05)
    assert page.locator("#job-state .badge").inner_text() == "succeeded", page.locator("#events").inner_text()
    assert page.evaluate("window.notReloaded") is True  # every update arrived without a reload
    assert overview.evaluate("window.notReloaded") is True
    assert len([v for v in on_overview if v > 0]) >= 2 and on_overview == sorted(on_overview), on_overview
    overview.wait_for_selector(bar, state="detached", timeout=10_000)  # gone from the running jobs once ended
    assert len([v for v in seen if v > 0]) >= 3 and seen == sorted(seen) and seen[-1] == 20, seen
    assert page.locator("#curves").get_attribute("data-points") == "20"
    sequences = page.evaluate("window.aqimodelsSeen")
    assert sequences == list(range(1, len(sequences) + 1))
    with system.client("viewer") as c:
        job = c.get_job(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.version
    assert page.locator("#job-version").inner_text() == f"v{job.version}"
    system.finished_jobs.append(job_id)
    page.click("#job-version a")
    page.wait_for_load_state("load")
    assert page.locator(f"#versions tr[data-version='{job.version}']").count() == 1


def _sse(system: System, cookie: str, path: str, last_event_id: str | None = None,
         limit: int | None = None) -> tuple[int, list[tuple[str, str, dict[str, Any]]]]:
    """Reads an SSE response frame by frame: (status, [(id, event, data)]), at most ``limit`` frames."""
    u = urllib.parse.urlparse(system.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    headers = {"Cookie": cookie, "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    conn.request("GET", path, headers=headers)
    reply = conn.getresponse()
    frames: list[tuple[str, str, dict[str, Any]]] = []
    current: dict[str, str] = {}
    try:
        if reply.status != 200:
            return reply.status, frames
        while limit is None or len(frames) < limit:
            line = reply.readline().decode()
            if not line:
                break
            line = line.rstrip("\r\n")
            if not line:
                if "data" in current:
                    frames.append((current.get("id", ""), current.get("event", "message"), json.loads(current["data"])))
                    if current.get("event") == "job" and frames[-1][2]["state"] in (
                            "succeeded", "failed", "cancelled", "interrupted"):
                        break
                current = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                current[key] = value.removeprefix(" ")
    finally:
        conn.close()
    return reply.status, frames


def _cookie(system: System, token: str) -> str:
    """Logs in over plain HTTP (CSRF token from the login form) and returns the session cookie."""
    u = urllib.parse.urlparse(system.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/login")
    reply = conn.getresponse()
    body = reply.read().decode()
    cookie = reply.getheader("set-cookie", "").split(";")[0]
    csrf = re.search(r'name="csrf" value="([^"]+)"', body).group(1)  # type: ignore[union-attr]
    conn.request("POST", "/login", body=urllib.parse.urlencode({"csrf": csrf, "token": token, "next": "/"}),
                 headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 303, reply.status
    conn.close()
    return str(reply.getheader("set-cookie", "")).split(";")[0]


def test_sse_reconnect_with_last_event_id_resumes_without_gap_or_duplicate(
        page_for: Any, system: System, tmp_path: Path) -> None:
    cookie = _cookie(system, system.tokens["viewer"])
    job_id = _start_lstm(system, 6)
    path = f"/events/jobs/{job_id}"
    status, first = _sse(system, cookie, path, limit=4)
    assert status == 200 and len(first) == 4
    cut = first[-1][0]
    # Meanwhile another browser follows the same job: the dashboard keeps one registry stream for both.
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(_sse(system, cookie, path)))
    t.start()
    status, rest = _sse(system, cookie, path, last_event_id=cut)
    t.join(240)
    assert status == 200
    ids = [int(i) for i, _, _ in first + rest]
    with system.client("viewer") as c:
        everything = [ev.sequence for ev in c.watch_job(job_id, timeout=120)]
    assert ids == everything  # no gap, no duplicate, in order
    assert [int(i) for i, _, _ in other[0][1]] == everything
    assert rest[-1][2]["state"] == "succeeded"
    # After the last event a reconnect is answered 204: EventSource stops reconnecting.
    assert _sse(system, cookie, path, last_event_id=str(everything[-1]))[0] == 204
    hub = system.dashboard.server.config.app.state.dashboard.hub  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10  # every follower let go (the overview's follows running jobs until its next poll)
    while hub.jobs[job_id].followers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.jobs[job_id].followers == 0
    system.finished_jobs.append(job_id)
    page = page_for("viewer")  # and the page of that job, for the record
    page.goto(system.url + f"jobs/{job_id}")
    page.wait_for_selector("#job-state .state-succeeded")


def test_the_registry_sees_one_watch_per_job_however_many_browsers(page_for: Any, system: System) -> None:
    from test_metrics import scrape, value

    assert system.finished_jobs, "runs after the retrain tests"
    port = system.reg.server.metrics.port  # type: ignore[attr-defined]

    def watches() -> float:
        return sum(value(scrape(port), "aqimodels_rpc_requests_total", method="WatchRetrainJob", code=code)
                   for code in ("OK", "CANCELLED"))

    job_id = system.finished_jobs[-1]
    hub = system.dashboard.server.config.app.state.dashboard.hub  # type: ignore[attr-defined]
    hub.jobs.pop(job_id, None)  # forget the job's feed: the next follower starts one registry watch
    before = watches()
    pages = [page_for("viewer") for _ in range(4)]
    for p in pages:
        p.goto(system.url + f"jobs/{job_id}")
    for p in pages:
        p.wait_for_selector("#job-state .state-succeeded")
        assert p.locator("#events tbody tr").count() == len(hub.jobs[job_id].feed._seqs)
    deadline = time.monotonic() + 10
    while watches() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watches() == before + 1


def test_alerts_stream_live_into_the_alerts_page(page_for: Any, system: System) -> None:
    name = "aqi_predictor_gnn"
    page = page_for("viewer")
    page.goto(system.url + "alerts")
    page.wait_for_selector("#stream-status:text('live')")
    deadline = time.monotonic() + 5
    hub = system.dashboard.server.config.app.state.dashboard.hub  # type: ignore[attr-defined]
    while not hub.alerts.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the registry's WatchAlerts has subscribed
    with system.client("operator") as c:
        prod = c.status()
        version = next(m.model.production_version for m in prod.models if m.model.name == name)
        test_rmse = c.get_version(name, version).metrics["rmse"]
        c.report_performance(name, version, rmse=test_rmse * 3, sample_count=10_000)
    row = page.locator("#live-alerts tr").first
    row.wait_for(timeout=15_000)
    assert name in row.inner_text() and "degraded" in row.inner_text()
    page.goto(system.url)
    model_row = page.locator("#models tr[data-model]").filter(has=page.get_by_text(name, exact=True))
    assert "DEGRADED" in model_row.locator(".reason").inner_text()  # the reason, from the alert's audit record


def test_audit_page_pages_and_filters_by_model_and_actor(page_for: Any, system: System) -> None:
    page = page_for("viewer")
    page.goto(system.url + "audit?page_size=10")
    assert page.locator("#audit tbody tr").count() == 10
    page.click("#next-page")
    page.wait_for_load_state("load")
    assert page.locator("#audit tbody tr").count() >= 1
    page.goto(system.url + "audit")
    page.fill("#audit-filter input[name=model]", "aqi_predictor_xgboost")
    page.fill("#audit-filter input[name=actor]", "admin-user")
    page.click("#audit-filter button")
    page.wait_for_load_state("load")
    rows = page.locator("#audit tbody tr")
    assert rows.count() >= 2
    for i in range(rows.count()):
        text = rows.nth(i).inner_text()
        assert "aqi_predictor_xgboost" in text and "admin-user" in text


# ---- Grafana ----

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "or", "and", "unless", "bool",
                 "offset", "le"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, ranges, grouping labels and functions left out)."""
    e = re.sub(r'"[^"]*"', "", expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)
    names = re.findall(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:])(?!\s*\()", e)
    return {n for n in names if n not in _PROMQL_WORDS}


def test_promql_metric_names_reads_only_metric_names() -> None:
    assert promql_metric_names('histogram_quantile(0.99, sum by (le, method) (rate(aqimodels_rpc_duration_seconds_bucket'
                               '{job="aqimodels-registry", method!~"Watch.*"}[5m])))') == {
        "aqimodels_rpc_duration_seconds_bucket"}
    assert promql_metric_names("sum(a_total) / clamp_min(sum(rate(b_total[5m])), 1e-9) or vector(0)") == {
        "a_total", "b_total"}


def grafana_dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "aqimodels.json").read_text())  # type: ignore[no-any-return]


def test_the_grafana_dashboard_is_provisioned_against_the_compose_prometheus() -> None:
    import yaml

    deploy = GRAFANA.parent
    dash = grafana_dashboard()
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    targets = [t for p in dash["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 20 and all(t["datasource"]["uid"] == uid for t in targets)
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())["services"]
    mounts = compose["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "aqimodels.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    prom = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    scrape = {c["job_name"]: c["static_configs"][0]["targets"] for c in prom["scrape_configs"]}
    registry_port = compose["registry"]["environment"]["AQIMODELS_METRICS_PORT"]
    worker_port = compose["worker-1"]["environment"]["AQIMODELS_WORKER_METRICS_PORT"]
    assert scrape == {"aqimodels-registry": [f"registry:{registry_port}"],
                      "aqimodels-worker": [f"worker-1:{worker_port}", f"worker-2:{worker_port}"]}
    for t in targets:  # every job a query names is one Prometheus scrapes
        for job in re.findall(r'job="([^"]+)"', t["expr"]):
            assert job in scrape, t["expr"]
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("rpc rate", "latency", "errors", "jobs by state", "training duration", "model health", "alerts"):
        assert topic in titles, topic


def test_every_metric_the_grafana_dashboard_queries_is_exported(page_for: Any, system: System) -> None:
    """Names from scrapes of the real registry and worker through this module's traffic."""
    if not system.finished_jobs:  # run alone: make the traffic here
        job_id = _start_lstm(system, 20)
        with system.client("viewer") as c:
            for _ in c.watch_job(job_id, timeout=240):
                pass
        system.finished_jobs.append(job_id)
    time.sleep(0.5)
    wanted = {n for p in grafana_dashboard()["panels"] for t in p.get("targets", [])
              for n in promql_metric_names(t["expr"])}
    assert {"aqimodels_rpc_requests_total", "aqimodels_job_progress_ratio", "aqimodels_model_health",
            "aqimodels_training_duration_seconds_bucket"} <= wanted
    missing = wanted - system.scraped
    if "aqimodels_alerts_total" in missing:  # alerts exist once one was raised (the alerts test raises one)
        with system.client("operator") as c:
            v = next(m.model.production_version for m in c.status().models if m.model.name == "aqi_predictor_lstm")
            c.report_performance("aqi_predictor_lstm", v, rmse=c.get_version("aqi_predictor_lstm", v).metrics["rmse"]
                                 * 3, sample_count=10_000)
        time.sleep(0.6)
        missing = wanted - system.scraped
    assert not missing, f"the Grafana dashboard queries metrics nothing exports: {sorted(missing)}"


# ---- refusing to listen open ----

def test_off_loopback_the_dashboard_needs_tls_and_a_registry_with_tokens(
        sqlite_registry: Registry, system: System, tmp_path: Path) -> None:
    import asyncio
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from aqimodels.client.dashboard.config import DashboardConfig, DashboardConfigError
    from aqimodels.client.dashboard.server import check_registry_exposure
    from conftest import make_certs

    def check(target: str) -> None:  # in a thread: Playwright's sync API keeps a loop running in this one
        config = DashboardConfig(target=target, **exposed).checked()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, check_registry_exposure(config)).result()

    certs = make_certs(tmp_path / "certs")
    exposed = {"host": "0.0.0.0", "tls_cert": certs.server_cert, "tls_key": certs.server_key}
    with pytest.raises(DashboardConfigError, match="accepts callers without a token"):
        check(sqlite_registry.target)
    check(system.reg.target)  # a registry with tokens: allowed
    aqimodels = str(Path(sys.executable).with_name("aqimodels"))
    proc = subprocess.run([aqimodels, "--target", sqlite_registry.target, "dashboard", "--host", "0.0.0.0",
                           "--port", "0"], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "AQIMODELS_DASHBOARD_HOST=0.0.0.0 listens beyond loopback without TLS" in proc.stderr
