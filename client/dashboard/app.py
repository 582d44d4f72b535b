"""The dashboard's ASGI app (Starlette): pages, form posts, Server-Sent Events, login and CSRF.

Starlette rather than FastAPI: the dashboard serves HTML pages, form posts and event streams, and
needs none of FastAPI's request models or OpenAPI; Starlette is the part of FastAPI it would use.
Templates are Jinja2 with autoescaping on, so every value from the registry (model names,
reasons, tags, messages) is escaped; JavaScript writes data with ``textContent`` only, and the
Content-Security-Policy allows no inline script.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import grpc
import jinja2
import structlog
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client import render
from aqimodels.client.client import MODEL_TYPES, stage_name
from aqimodels.client.dashboard.config import DashboardConfig
from aqimodels.client.dashboard.feeds import TERMINAL, Hub, StatusFeed, num, state_name
from aqimodels.client.dashboard.registry import AsyncRegistry, Identity
from aqimodels.client.errors import (
    AqiModelsError,
    InvalidArgumentError,
    UnauthenticatedError,
    UnimplementedError,
)
from aqimodels.client.tokens import ROLES
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger(__name__)
T = TypeVar("T")

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "aqimodels_dashboard"
PAGE_SIZES = (10, 25, 50, 100)
HEADLINE = ("rmse", "skill", "rmse_h1", "rmse_h6", "rmse_h24")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# HTTP status of a page that shows a registry error, by gRPC code.
HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class LoginRequired(Exception):
    """The registry wants a token and this browser has not given one."""


class CsrfError(Exception):
    """A form post without this session's CSRF token, or from another origin."""


@dataclass
class Login:
    token: str
    name: str
    role: str
    expires: float


@dataclass(frozen=True)
class User:
    """The browser's caller: its token (None: anonymous), name and role as the registry sees them."""

    token: str | None
    name: str
    role: str
    logged_in: bool
    csrf: str

    def can(self, role: str) -> bool:
        return ROLES.get(self.role, 0) >= ROLES[role]


class SecurityHeaders:
    """Adds the Content-Security-Policy and friends to every response (pure ASGI: streams pass through)."""

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app = app
        self.headers = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"same-origin"), (b"x-frame-options", b"DENY")]
        if hsts:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, wrapped)


# ---- values for templates ----

def ts_text(ts: Any) -> str:
    return render.absolute_time(ts) if ts is not None and render.has_time(ts) else "—"


def ts_ms(ts: Any) -> int | None:
    return int(ts.seconds * 1000 + ts.nanos // 1_000_000) if ts is not None and render.has_time(ts) else None


def metric_text(metrics: Any, name: str) -> str:
    value = metric_value(metrics, name)
    return render.fmt_metric(name, value) if value is not None else "—"


def metric_value(metrics: Any, name: str) -> float | None:
    """A metric of a version; ``skill`` (against persistence) from rmse and the baseline when not logged."""
    if name in metrics:
        return float(metrics[name])
    if name == "skill" and "rmse" in metrics and metrics.get(render.BASELINE_METRIC):
        return 1.0 - float(metrics["rmse"]) / float(metrics[render.BASELINE_METRIC])
    return None


def health_name(health: int) -> str:
    return pb.ModelHealth.Name(pb.ModelHealth.ValueType(health)).removeprefix("MODEL_HEALTH_").lower() if health else "unknown"


def lineage(mv: pb.ModelVersion) -> list[tuple[str, str]]:
    """The tags that say where a version came from (job, data, previous production, members...)."""
    keys = ("job_id", "dataset", "data_fingerprint", "aqimodels.previous_production")
    out = [(k.removeprefix("aqimodels."), mv.tags[k]) for k in keys if mv.tags.get(k)]
    out += [(k.removeprefix("aqimodels."), v) for k, v in sorted(mv.tags.items())
            if any(w in k for w in ("lineage", "parent", "member", "source_version")) and k not in keys]
    return out


def model_url(name: str) -> str:
    return "/models/" + quote(name, safe="")


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(ts=ts_text, ts_ms=ts_ms, metric=metric_text, stage=stage_name, health=health_name,
                       job_state=state_name, promotion=render.promotion_text, lineage=lineage,
                       model_types=list(MODEL_TYPES), headline=HEADLINE, terminal=TERMINAL,
                       fmt=render.fmt_metric, urlencode=urlencode, model_url=model_url)
    return env


class Dashboard:
    """The app's state: the registry connection, the shared feeds, the logins and the templates."""

    def __init__(self, config: DashboardConfig) -> None:
        self.config = config
        self.secret = config.secret or secrets.token_urlsafe(32)
        self.env = _templates()
        self.logins: dict[str, Login] = {}
        self._open: tuple[float, Identity | None] = (0.0, None)
        self._jobs: dict[tuple[str | None, str], tuple[float, pb.RetrainJob]] = {}
        self.registry: AsyncRegistry
        self.hub: Hub
        self.status_feed: StatusFeed

    async def startup(self) -> None:
        c = self.config
        self.registry = AsyncRegistry(c.target, timeout=c.timeout, ca_cert=c.ca_cert, client_cert=c.client_cert,
                                      client_key=c.client_key)
        self.hub = Hub(self.registry, c.token)
        self.hub.start()
        self.status_feed = StatusFeed(self.registry, self.hub, c.token, c.status_interval_seconds)
        self.hub.extra.append(self.status_feed)

    async def shutdown(self) -> None:
        self.status_feed.stop()
        self.hub.stop()
        await self.registry.close()

    async def job_for(self, token: str | None, job_id: str) -> pb.RetrainJob:
        """GetRetrainJob with the caller's token, answered from a 2-second cache: a storm of browsers
        (re)connecting to one job with the same token costs the registry one call."""
        key = (token, job_id)
        hit = self._jobs.get(key)
        if hit is not None and time.monotonic() - hit[0] < 2.0:
            return hit[1]
        job = await self.registry.get_job(token, job_id)
        if len(self._jobs) > 1000:
            self._jobs.clear()
        self._jobs[key] = (time.monotonic(), job)
        return job

    # ---- who is calling ----

    async def user(self, request: Request) -> User:
        session = request.session
        csrf = session.setdefault("csrf", secrets.token_urlsafe(24))
        login = self.logins.get(session.get("sid", ""))
        if login is not None and login.expires > time.time():
            return User(login.token, login.name, login.role, True, csrf)
        identity = await self.open_identity()
        if identity is None:
            raise LoginRequired()
        return User(None, identity.name, identity.role, False, csrf)

    async def open_identity(self) -> Identity | None:
        """Who an anonymous caller is at the registry, or None when it wants a token (cached 5 s)."""
        checked, identity = self._open
        if time.monotonic() - checked < 5.0:
            return identity
        try:
            identity = await self.registry.identify(None)
        except UnauthenticatedError:
            identity = None
        self._open = (time.monotonic(), identity)
        return identity

    def page(self, request: Request, template: str, user: User | None, status_code: int = 200,
             **context: Any) -> HTMLResponse:
        flash = request.session.pop("flash", None) if "flash" in request.session else None
        tmpl = self.env.get_template(template)
        return PageResponse(lambda: tmpl.generate(request=request, user=user, flash=flash, path=request.url.path,
                                                  target=self.config.target, **context), status_code)


SLICE_SECONDS = 0.002  # the longest stretch a page's work holds the event loop (and every SSE stream)


async def sliced(items: Iterable[T]) -> AsyncIterator[T]:
    """``items``, letting the event loop run about every :data:`SLICE_SECONDS` of the caller's work."""
    until = time.perf_counter() + SLICE_SECONDS
    for item in items:
        yield item
        if time.perf_counter() > until:
            await asyncio.sleep(0)
            until = time.perf_counter() + SLICE_SECONDS


class PageResponse(HTMLResponse):
    """An HTML page rendered as it is sent, on the event loop in slices of at most about 2 ms.

    A model page at 1,000 versions (130 KB) renders for tens of ms; in one piece on the loop every
    SSE stream stood still meanwhile (50 clients on one job with a model page loaded every 0.2 s:
    the first SSE client after a direct gRPC watcher p99 20-21 ms). A worker thread is no cure: the
    render holds the interpreter lock and takes it back at every socket write of the fan-out, each
    write then waiting up to the 5 ms switch interval (p99 20-47 ms in the benchmark). So the
    template's output is generated piece by piece and the loop runs between slices.
    """

    def __init__(self, generate: Callable[[], Iterator[str]], status_code: int = 200) -> None:
        self._generate = generate
        super().__init__(b"", status_code=status_code, headers={"cache-control": "no-store"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = [piece async for piece in sliced(self._generate())]  # the SSE fan-out runs between slices
        self.body = "".join(parts).encode(self.charset)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.raw_headers.append((b"content-length", str(len(self.body)).encode("latin-1")))
        await super().__call__(scope, receive, send)


def _flash(request: Request, kind: str, text: str) -> None:
    request.session["flash"] = [kind, text]


def _int(form: FormData | Any, key: str, default: int | None = None, *, minimum: int = 0) -> int:
    raw = str(form.get(key, "") or "").strip()
    if not raw and default is not None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgumentError(f"{key} must be a whole number, got {raw!r}", field=key) from None
    if value < minimum:
        raise InvalidArgumentError(f"{key} must be at least {minimum}, got {value}", field=key)
    return value


async def checked_form(request: Request) -> FormData:
    """The posted form, once its CSRF token matches this session's and its origin is this site."""
    form = await request.form()
    origin = request.headers.get("origin")
    if origin and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise CsrfError(f"a form from {origin} may not post here")
    expected = request.session.get("csrf", "")
    sent = str(form.get("csrf", ""))
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfError("the form's CSRF token does not match this session: reload the page and try again")
    return form


def _last_event_id(request: Request) -> str:
    return (request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "").strip()


def create_app(config: DashboardConfig) -> Starlette:
    """The dashboard as an ASGI app (serve it with uvicorn; :func:`aqimodels.client.dashboard.server.run`)."""
    d = Dashboard(config)
    Handler = Callable[[Request, User], Awaitable[Response]]

    def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A page: the caller resolved, registry errors shown as an error page with their HTTP status."""

        async def endpoint(request: Request) -> Response:
            user: User | None = None
            try:
                user = await d.user(request)
                if request.method == "POST":
                    request.state.form = await checked_form(request)
                return await handler(request, user)
            except LoginRequired:
                if request.url.path.startswith("/events/") or request.method == "POST":
                    return PlainTextResponse("log in first", status_code=401)
                return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)
            except CsrfError as exc:
                return d.page(request, "error.html", user, 403, title="Refused", code="CSRF", message=str(exc))
            except AqiModelsError as exc:
                if exc.code == grpc.StatusCode.UNAUTHENTICATED and user is not None and user.logged_in:
                    d.logins.pop(request.session.get("sid", ""), None)  # the token stopped working
                if request.url.path.startswith("/events/"):
                    return PlainTextResponse(f"{exc.code.name}: {exc.message}",
                                             status_code=HTTP_STATUS.get(exc.code, 502))
                return d.page(request, "error.html", user, HTTP_STATUS.get(exc.code, 502), title="Registry error",
                              code=exc.code.name, message=exc.message)

        return endpoint

    # ---- overview ----

    async def overview(request: Request, user: User) -> Response:
        status, jobs = await asyncio.gather(d.registry.status(user.token), _recent_jobs(user))
        degraded = [ms.model.name for ms in status.models if ms.health == pb.MODEL_HEALTH_DEGRADED]
        reasons = dict(zip(degraded, await asyncio.gather(*(_degraded_reason(user, n) for n in degraded)),
                           strict=True))
        return d.page(request, "overview.html", user, status=status, jobs=jobs, reasons=reasons)

    async def _recent_jobs(user: User) -> list[pb.RetrainJob]:
        try:
            return list((await d.registry.list_jobs(user.token, page_size=10)).jobs)
        except UnimplementedError:  # a registry started without a job manager
            return []

    async def _degraded_reason(user: User, name: str) -> str:
        events = await d.registry.audit_events(user.token, model_name=name, page_size=50)
        return next((e.message for e in events.events if e.action == "DegradationAlert"), "")

    # ---- model ----

    async def model(request: Request, user: User, error: AqiModelsError | None = None,
                    preview: pb.CleanupModelVersionsResponse | None = None, keep_last: int = 0) -> Response:
        name = request.path_params["name"]
        q = request.query_params if request.method == "GET" else {}
        page_size = _int(q, "page_size", 25, minimum=1)
        page_size = page_size if page_size in PAGE_SIZES else 25
        back = q.getlist("back") if hasattr(q, "getlist") else []
        stage = str(q.get("stage", "") or "")
        order_by = str(q.get("order_by", "") or "")
        metric = str(q.get("metric", "") or "rmse")
        compare_ids = sorted({int(v) for v in (q.getlist("v") if hasattr(q, "getlist") else []) if v.isdigit()})
        calls: list[Awaitable[Any]] = [
            d.registry.status(user.token),
            d.registry.list_versions(user.token, name, stage=stage or None, order_by=order_by, page_size=page_size,
                                     page_token=str(q.get("page_token", "") or "")),
            d.registry.history(user.token, name, metric)]
        if len(compare_ids) >= 2:
            calls.append(d.registry.compare(user.token, name, compare_ids, metric))
        results = await asyncio.gather(*calls)
        status, versions, history = results[0], results[1], results[2]
        comparison = results[3] if len(results) > 3 else None
        ms = next((m for m in status.models if m.model.name == name), None)
        chosen = history.metric or metric
        points: list[dict[str, Any]] = []
        names: set[str] = set()
        async for p in sliced(history.points):  # 1,000 versions: ~5 ms of protobuf maps, not in one piece
            names.update(p.metrics)
            points.append({"version": p.version, "time": ts_ms(p.create_time),
                           "value": num(p.metrics[chosen]) if chosen in p.metrics else None,
                           "stage": stage_name(p.stage)})
        chart = {"metric": chosen, "points": points,
                 "periods": [{"version": p.version, "start": ts_ms(p.start_time), "end": ts_ms(p.end_time)}
                             for p in history.production_periods]}
        metric_names = sorted(names) or ["rmse"]
        base = {"page_size": page_size, "stage": stage, "order_by": order_by, "metric": metric}
        current_token = str(q.get("page_token", "") or "")
        next_link = ("?" + urlencode({**base, "page_token": versions.next_page_token,
                                      "back": [*back, current_token]}, doseq=True)) if versions.next_page_token else ""
        prev_link = ("?" + urlencode({**base, "page_token": back[-1], "back": back[:-1]}, doseq=True)) if back else ""
        return d.page(request, "model.html", user, HTTP_STATUS.get(error.code, 502) if error else 200,
                      name=name, ms=ms, versions=versions, chart=chart,
                      metric_names=metric_names, chosen_metric=metric, comparison=comparison, compare_ids=compare_ids,
                      next_link=next_link, prev_link=prev_link, offset=len(back) * page_size, base=base,
                      page_sizes=PAGE_SIZES, error=error, preview=preview, keep_last=keep_last,
                      stages=("", "production", "staging", "none", "archived"))

    async def model_page(request: Request, user: User) -> Response:
        """GET: the model's page; POST: one of its actions (a name may hold any character, "/" too)."""
        if request.method == "GET":
            return await model(request, user)
        actions = {"promote": promote, "rollback": rollback, "cleanup": cleanup}
        action = actions.get(str(request.state.form.get("action", "")))
        if action is None:
            return await model(request, user, InvalidArgumentError("unknown action", field="action"))
        return await action(request, user)

    async def promote(request: Request, user: User) -> Response:
        f = request.state.form
        name = request.path_params["name"]
        version, stage = _int(f, "version", minimum=1), str(f.get("stage", "production"))
        try:
            expected = _int(f, "expected", 0) if str(f.get("expected", "")).strip() else None
            resp = await d.registry.promote(user.token, name, version, stage, expected_current_version=expected,
                                            reason=str(f.get("reason", "") or f"from the dashboard by {user.name}"))
        except AqiModelsError as exc:
            return await model(request, user, exc)
        if resp.HasField("promotion_request"):  # the model is under the two-person rule: nothing moved yet
            req = resp.promotion_request
            _flash(request, "ok", f"{name} v{req.version} to production needs another admin's approval: "
                                  f"promotion request {req.id} (aqimodels approve {req.id})")
            return RedirectResponse(model_url(name), status_code=303)
        was = f" (was v{resp.previous_version})" if resp.previous_version else ""
        _flash(request, "ok", f"{name} v{resp.version.version} is now {stage_name(resp.version.stage)}{was}")
        return RedirectResponse(model_url(name), status_code=303)

    async def rollback(request: Request, user: User) -> Response:
        f = request.state.form
        name = request.path_params["name"]
        try:
            resp = await d.registry.rollback(user.token, name, expected_current_version=_int(f, "expected", 0),
                                             reason=str(f.get("reason", "") or f"from the dashboard by {user.name}"))
        except AqiModelsError as exc:
            return await model(request, user, exc)
        _flash(request, "ok", f"{name} rolled back to v{resp.version.version} (v{resp.replaced_version} archived)")
        return RedirectResponse(model_url(name), status_code=303)

    async def cleanup(request: Request, user: User) -> Response:
        """First a dry run that lists what would go; the confirmation deletes exactly those versions."""
        f = request.state.form
        name = request.path_params["name"]
        try:
            if f.get("confirm") != "yes":
                keep = _int(f, "keep_last", 0)
                preview = await d.registry.cleanup(user.token, name, keep_last=keep, dry_run=True)
                return await model(request, user, preview=preview, keep_last=keep)
            chosen = [int(v) for v in f.getlist("versions") if str(v).isdigit()]
            if not chosen:
                raise InvalidArgumentError("nothing to delete: the dry run listed no versions", field="versions")
            resp = await d.registry.cleanup(user.token, name, versions=chosen, dry_run=False)
        except AqiModelsError as exc:
            return await model(request, user, exc)
        _flash(request, "ok", f"deleted {len(resp.deleted_versions)} versions of {name}: "
                              + ", ".join(f"v{v}" for v in resp.deleted_versions))
        return RedirectResponse(model_url(name), status_code=303)

    # ---- jobs ----

    async def job(request: Request, user: User) -> Response:
        j = await d.registry.get_job(user.token, request.path_params["job_id"])
        return d.page(request, "job.html", user, job=j, metrics=sorted(j.metrics.items()))

    async def cancel(request: Request, user: User) -> Response:
        job_id = request.path_params["job_id"]
        try:
            j = await d.registry.cancel_job(user.token, job_id, str(request.state.form.get("reason", "")
                                                                   or f"from the dashboard by {user.name}"))
            _flash(request, "ok", f"job {job_id}: {state_name(j.state)}")
        except AqiModelsError as exc:
            _flash(request, "error", f"{exc.code.name}: {exc.message}")
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    async def retrain(request: Request, user: User) -> Response:
        f = request.state.form
        types = [str(t) for t in f.getlist("model_type") if str(t)]
        try:
            if not types:
                raise InvalidArgumentError("choose at least one model type", field="model_types")
            ids = await d.registry.start_retrain(user.token, types, dataset=str(f.get("dataset", "") or ""),
                                                 max_epochs=_int(f, "max_epochs", 0),
                                                 auto_promote=f.get("auto_promote") == "on")
        except AqiModelsError as exc:
            _flash(request, "error", f"{exc.code.name}: {exc.message}")
            back = str(f.get("back", "/"))
            return RedirectResponse(back if back.startswith("/") and not back.startswith("//") else "/",
                                    status_code=303)
        _flash(request, "ok", f"started {len(ids)} job(s): " + ", ".join(ids))
        return RedirectResponse(f"/jobs/{ids[0]}" if ids else "/", status_code=303)

    # ---- alerts and audit ----

    async def alerts(request: Request, user: User) -> Response:
        events = await d.registry.audit_events(user.token, page_size=200)
        past = [e for e in events.events if e.action == "DegradationAlert"]
        return d.page(request, "alerts.html", user, past=past)

    async def audit(request: Request, user: User) -> Response:
        q = request.query_params
        model_name, actor = q.get("model", "").strip(), q.get("actor", "").strip()
        page_size = _int(q, "page_size", 50, minimum=1)
        page_size = page_size if page_size in PAGE_SIZES else 50
        back = q.getlist("back")
        token = q.get("page_token", "")
        resp = await d.registry.audit_events(user.token, model_name=model_name, actor=actor, page_size=page_size,
                                             page_token=token)
        base = {"model": model_name, "actor": actor, "page_size": page_size}
        next_link = ("?" + urlencode({**base, "page_token": resp.next_page_token, "back": [*back, token]},
                                     doseq=True)) if resp.next_page_token else ""
        prev_link = ("?" + urlencode({**base, "page_token": back[-1], "back": back[:-1]}, doseq=True)) if back else ""
        rows = [(e, json.dumps(MessageToDict(e.before), sort_keys=True) if e.before.fields else "",
                 json.dumps(MessageToDict(e.after), sort_keys=True) if e.after.fields else "") for e in resp.events]
        return d.page(request, "audit.html", user, rows=rows, model_name=model_name, actor=actor,
                      next_link=next_link, prev_link=prev_link, offset=len(back) * page_size, page_size=page_size,
                      page_sizes=PAGE_SIZES)

    # ---- login ----

    async def login_page(request: Request) -> Response:
        request.session.setdefault("csrf", secrets.token_urlsafe(24))
        if request.method == "GET":
            if await _open_or_none() is not None:
                return RedirectResponse("/", status_code=303)
            return d.page(request, "login.html", None, next=_safe_next(request.query_params.get("next", "/")),
                          error="")
        try:
            form = await checked_form(request)
        except CsrfError as exc:
            return d.page(request, "login.html", None, 403, next="/", error=str(exc))
        token = str(form.get("token", "")).strip()
        nxt = _safe_next(str(form.get("next", "/")))
        try:
            identity = await d.registry.identify(token) if token else None
        except AqiModelsError as exc:
            return d.page(request, "login.html", None, 401 if exc.code == grpc.StatusCode.UNAUTHENTICATED else 503,
                          next=nxt, error=f"{exc.code.name}: {exc.message}")
        if identity is None:
            return d.page(request, "login.html", None, 400, next=nxt, error="enter a token")
        d.logins.pop(request.session.get("sid", ""), None)
        sid = secrets.token_urlsafe(24)  # a new session id and CSRF token at login: no session fixation
        d.logins[sid] = Login(token, identity.name, identity.role, time.time() + d.config.session_hours * 3600)
        request.session.update(sid=sid, csrf=secrets.token_urlsafe(24))
        log.info("dashboard_login", actor=identity.name, role=identity.role)
        return RedirectResponse(nxt, status_code=303)

    async def _open_or_none() -> Identity | None:
        try:
            return await d.open_identity()
        except AqiModelsError:
            return None

    async def logout(request: Request) -> Response:
        try:
            await checked_form(request)
        except CsrfError as exc:
            return PlainTextResponse(str(exc), status_code=403)
        d.logins.pop(request.session.get("sid", ""), None)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---- live streams ----

    async def job_events(request: Request, user: User) -> Response:
        job_id = request.path_params["job_id"]
        j = await d.job_for(user.token, job_id)  # the browser's own token: may it see this job?
        raw = _last_event_id(request)
        after = int(raw) if raw.isdigit() else 0
        known = d.hub.jobs.get(job_id)
        ended = known is not None and known.feed.closed and not known.failed and after >= known.feed.last_seq
        if ended or (j.state in TERMINAL and j.last_sequence and after >= j.last_sequence):
            return Response(status_code=204)  # nothing more will come: EventSource stops reconnecting
        feed = d.hub.job(job_id, user.token)
        return _event_stream(feed.feed.follow(after), feed.release)

    async def alert_events(request: Request, user: User) -> Response:
        feed = d.hub.alert_feed(user.token)
        after = feed.after(_last_event_id(request))
        return _event_stream(feed.feed.follow(after), feed.release)

    async def overview_events(request: Request, user: User) -> Response:
        sf = d.status_feed
        sf.acquire(user.token)
        return _event_stream(sf.feed.follow(sf.start_after()), sf.release)

    async def healthz(request: Request) -> Response:
        try:
            await d.open_identity()
            registry = "reachable"
        except AqiModelsError as exc:
            registry = f"{exc.code.name}: {exc.message}"
        return JSONResponse({"status": "ok", "registry": registry, "target": d.config.target})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await d.startup()
        try:
            yield
        finally:
            await d.shutdown()

    routes = [
        Route("/", page(overview)),
        Route("/models/{name:path}", page(model_page), methods=["GET", "POST"]),
        Route("/jobs/{job_id:str}", page(job)),
        Route("/jobs/{job_id:str}/cancel", page(cancel), methods=["POST"]),
        Route("/retrain", page(retrain), methods=["POST"]),
        Route("/alerts", page(alerts)),
        Route("/audit", page(audit)),
        Route("/login", login_page, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/events/jobs/{job_id:str}", page(job_events)),
        Route("/events/alerts", page(alert_events)),
        Route("/events/overview", page(overview_events)),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders, hsts=config.tls),
        Middleware(SessionMiddleware, secret_key=d.secret, session_cookie=SESSION_COOKIE,
                   max_age=int(config.session_hours * 3600), same_site="strict", https_only=config.tls),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.dashboard = d
    return app


def _event_stream(frames: AsyncIterator[bytes], release: Callable[[], None]) -> StreamingResponse:
    """A text/event-stream response of a shared feed's frames (Starlette's StreamingResponse: each frame
    is one write; no per-frame work beyond it, which is what 50 browsers on one job cost)."""
    return StreamingResponse(_released(frames, release), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


async def _released(frames: AsyncIterator[bytes], release: Callable[[], None]) -> AsyncIterator[bytes]:
    """The frames of a shared feed; the follower is released however the browser goes away."""
    try:
        async for data in frames:
            yield data
    finally:
        release()


def _safe_next(raw: str) -> str:
    """Only a path on this site (never ``//host`` or a scheme) after login."""
    return raw if raw.startswith("/") and not raw.startswith("//") and "\\" not in raw else "/"
