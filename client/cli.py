"""``aqimodels``: the operator's command line over the ModelRegistry API.

Every command talks to the registry through :class:`aqimodels.client.RegistryClient`. Read commands
take ``--json`` and then print JSON only on stdout. A failed call prints ``<STATUS>: <message>`` on
stderr and exits 1. ``serve`` and ``worker`` import the server and training packages lazily: the base
install is the client alone.

Examples::

    aqimodels status
    aqimodels compare aqi_predictor_lstm --metric rmse
    aqimodels promote aqi_predictor_lstm 7 --expect-current 6 --reason "better rmse"
    aqimodels retrain lstm gnn --epochs 20 --auto-promote
"""

from __future__ import annotations

import importlib
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import grpc
import typer
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import render
from aqimodels.client.client import (
    DEFAULT_TARGET,
    MODEL_TYPES,
    RegistryClient,
    model_type_value,
    stage_name,
    stage_value,
)
from aqimodels.client.errors import AqiModelsError, InvalidArgumentError
from aqimodels.client.render import escape

if TYPE_CHECKING:
    from rich.console import Console, RenderableType


def _plain_kind(annotation: Any) -> type | None:
    """str, int, float or bool, also ``X | None``; ``list`` for ``list[str]`` (``| None``); None for
    anything else."""
    import types

    if isinstance(annotation, types.UnionType):
        args = [a for a in annotation.__args__ if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    if isinstance(annotation, types.GenericAlias) and annotation.__origin__ is list and annotation.__args__ == (str,):
        return list
    return annotation if annotation in (str, int, float, bool) else None


def _install_plain_coercion() -> None:
    """typer 0.29 coerces every parameter through a pydantic TypeAdapter. Importing pydantic and
    building the adapters was ~250 ms of every CLI start, more than all the rest of it (bench/
    cli_start.py); importing pydantic alone is ~65 ms. The CLI's parameters are plain str/int/float/
    bool (or None) or lists of str (repeated options, variadic arguments): those are coerced
    here with pydantic's wording; anything else (other lists, choices, files) keeps typer's own path.
    Written by hand because typer offers no switch for it; typer is pinned exactly."""
    from typer import _coercion, core
    from typer._click.exceptions import BadParameter

    original = _coercion.build_runtime_param
    if getattr(getattr(core, "build_runtime_param", None), "aqimodels_plain", False):
        return
    words = {int: ("a valid integer", "an integer"), float: ("a valid number", "a number")}

    @dataclass(frozen=True)
    class PlainRuntimeParam(_coercion.RuntimeParam):
        kind: type

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            out: Any
            if self.kind is list:  # list[str]: a repeated option or a variadic argument (a tuple of str)
                return [str(item) for item in value]
            if self.kind in (str, bool) or (isinstance(value, self.kind) and not isinstance(value, bool)):
                out = value if self.kind is not str else str(value)
            else:
                try:
                    out = self.kind(str(value).strip())
                except ValueError:
                    what, parse = words[self.kind]
                    raise BadParameter(f"Input should be {what}, unable to parse string as {parse}", ctx=ctx,
                                       param=param) from None
            info = self.parameter_info
            if self.kind in (int, float):
                if info.min is not None and out < info.min:
                    if not info.clamp:
                        raise BadParameter(f"Input should be greater than or equal to {info.min}", ctx=ctx,
                                           param=param)
                    out = info.min
                if info.max is not None and out > info.max:
                    if not info.clamp:
                        raise BadParameter(f"Input should be less than or equal to {info.max}", ctx=ctx, param=param)
                    out = info.max
            return out

    def build(descriptor: Any) -> Any:
        kind = _plain_kind(descriptor.annotation)
        if kind is None or descriptor.file_annotation is not None or descriptor.is_choice:
            return original(descriptor)
        return PlainRuntimeParam(parameter_info=descriptor.parameter_info, annotation=descriptor.annotation, kind=kind)

    build.aqimodels_plain = True  # type: ignore[attr-defined]  # a marker on typer's function, read back by this module
    setattr(core, "build_runtime_param", build)  # noqa: B010 - typer.core does not export the name


_install_plain_coercion()

app = typer.Typer(
    name="aqimodels",
    help="Operate the aqimodels registry: status, list, compare, promote, rollback, retrain, jobs, audit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
jobs_app = typer.Typer(help="Retrain jobs: list them (default), watch one live, cancel one.")
app.add_typer(jobs_app, name="jobs")
token_app = typer.Typer(help="Bearer tokens for the registry's token file (AQIMODELS_TOKENS_FILE).",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")
webhooks_app = typer.Typer(help="Webhooks (admin): registry events POSTed, signed, to URLs; their delivery log.",
                           no_args_is_help=True)
app.add_typer(webhooks_app, name="webhooks")

# Substrings of the transport's own UNAVAILABLE messages (as opposed to the server reporting that
# its MLflow backend is down, which is also UNAVAILABLE but comes with the server's own words).
_CONNECT_FAILURES = ("failed to connect", "connection refused", "dns resolution failed", "connect failed",
                     "name resolution", "no route to host", "network is unreachable", "socket closed",
                     "handshake failed", "connection reset")


@dataclass(frozen=True)
class _Settings:
    target: str
    token: str | None
    ca_cert: str | None
    client_cert: str | None
    client_key: str | None
    timeout: float


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout, nothing else.")]


@app.callback()
def _global_options(
    ctx: typer.Context,
    target: Annotated[str, typer.Option(envvar="AQIMODELS_TARGET", help="host:port of the registry.")]
    = DEFAULT_TARGET,
    token: Annotated[str | None, typer.Option(envvar="AQIMODELS_TOKEN", help="Bearer token.",
                                              show_default=False)] = None,
    ca_cert: Annotated[str | None, typer.Option(envvar="AQIMODELS_CA_CERT",
                                                help="PEM CA bundle: use TLS.")] = None,
    client_cert: Annotated[str | None, typer.Option(envvar="AQIMODELS_CLIENT_CERT",
                                                    help="PEM client certificate (mutual TLS).")] = None,
    client_key: Annotated[str | None, typer.Option(envvar="AQIMODELS_CLIENT_KEY",
                                                   help="PEM client key (mutual TLS).")] = None,
    timeout: Annotated[float, typer.Option(envvar="AQIMODELS_TIMEOUT",
                                           help="Deadline of each unary call, seconds.")] = 30.0,
) -> None:
    ctx.obj = _Settings(target, token, ca_cert, client_cert, client_key, timeout)


# ---- plumbing ----

def _settings(ctx: typer.Context) -> _Settings:
    obj = ctx.find_root().obj
    if isinstance(obj, _Settings):
        return obj
    return _Settings(DEFAULT_TARGET, None, None, None, None, 30.0)


# Off a terminal (a pipe, a file) nothing is cut to 80 columns: tables take their natural width.
PIPE_WIDTH = 4096


def _console() -> Console:
    # Built per command so that it writes to the sys.stdout of the moment (tests swap it).
    from rich.console import Console

    if not sys.stdout.isatty():
        return Console(highlight=False, width=PIPE_WIDTH)
    return Console(highlight=False)


def _plain_output() -> bool:
    """Output to a pipe or a file that rich would not colour either (FORCE_COLOR / TTY_COMPATIBLE=1
    make it): there the commands that can print plain text do so without loading rich."""
    import os

    return (not sys.stdout.isatty() and not os.environ.get("FORCE_COLOR")
            and os.environ.get("TTY_COMPATIBLE", "") != "1")


def _print(renderable: RenderableType) -> None:
    _console().print(renderable)


def _print_plain(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_json(data: Any) -> None:
    sys.stdout.write(render.to_json(data) + "\n")
    sys.stdout.flush()


def _err(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def _from_server(exc: AqiModelsError) -> bool:
    """The server itself answered (its interceptor echoes a request id on every answer)."""
    return bool(getattr(exc, "request_id", ""))


def _is_connect_failure(exc: AqiModelsError) -> bool:
    text = exc.message.lower()
    return (exc.code == grpc.StatusCode.UNAVAILABLE and not _from_server(exc)
            and any(s in text for s in _CONNECT_FAILURES))


def _fail(exc: AqiModelsError, settings: _Settings) -> NoReturn:
    name = exc.code.name if isinstance(exc.code, grpc.StatusCode) else str(exc.code)
    if exc.code == grpc.StatusCode.UNAVAILABLE and _from_server(exc):
        _err(f"{name}: the registry at {settings.target} answers, but its backend does not: {exc.message}\n"
             "Check the database or MLflow store it points to (`aqimodels status` shows the backend); "
             "the registry recovers by itself when it is back.")
    elif _is_connect_failure(exc) or (exc.code == grpc.StatusCode.DEADLINE_EXCEEDED
                                      and exc.message.strip().lower() == "deadline exceeded"):
        _err(f"{name}: the registry server at {settings.target} does not answer ({exc.message}).\n"
             f"Start one with `make run` or `aqimodels serve`, or point --target / AQIMODELS_TARGET at a running "
             f"registry.")
    else:
        _err(f"{name}: {exc.message}")
    raise typer.Exit(1)


def _settings_problem(s: _Settings) -> str:
    """Why the connection settings cannot work (naming the option and its variable), or ""."""
    import re
    from pathlib import Path

    target = s.target.strip()
    if not re.match(r"^(dns|unix|unix-abstract|ipv4|ipv6|vsock):", target):
        host, sep, port = target.rpartition(":")
        if (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536
                or re.search(r"[\s/]", host) or host.strip("[]").count(":") == 1):
            return f"--target / AQIMODELS_TARGET {target[:80]!r} is not host:port (e.g. 127.0.0.1:50051)"
    if s.token is not None and not re.fullmatch(r"[\x21-\x7e]{1,4096}", s.token):
        return "--token / AQIMODELS_TOKEN holds spaces, control or non-ASCII characters; a token is printable ASCII"
    for option, variable, path, kind in (("--ca-cert", "AQIMODELS_CA_CERT", s.ca_cert, "CERTIFICATE"),
                                         ("--client-cert", "AQIMODELS_CLIENT_CERT", s.client_cert, "CERTIFICATE"),
                                         ("--client-key", "AQIMODELS_CLIENT_KEY", s.client_key, "PRIVATE KEY")):
        if not path:
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return f"{option} / {variable} {path[:80]!r} cannot be read: {exc.strerror or exc}"
        if not re.search(rb"-----BEGIN [A-Z ]*" + kind.encode() + rb"-----", data):
            return f"{option} / {variable} {path[:80]!r} is not a PEM {kind.lower()}"
    return ""


@contextmanager
def _registry(ctx: typer.Context) -> Iterator[RegistryClient]:
    """A connected client; any AqiModelsError inside the block becomes ``STATUS: message`` and exit 1.

    Connection settings that cannot work stop first: ``configuration error: ...`` and exit 2.
    """
    s = _settings(ctx)
    problem = _settings_problem(s)
    if problem:
        _err(f"configuration error: {problem}")
        raise typer.Exit(2)
    try:
        with RegistryClient(s.target, token=s.token, timeout=s.timeout, ca_cert=s.ca_cert,
                            client_cert=s.client_cert, client_key=s.client_key) as client:
            yield client
    except AqiModelsError as exc:
        _fail(exc, s)
    except OSError as exc:  # unreadable TLS files
        _err(f"INVALID_ARGUMENT: {exc}")
        raise typer.Exit(1) from None


# ---- processes ----

@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default: AQIMODELS_HOST or the config's).",
                                             show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: AQIMODELS_PORT or 50051).",
                                             show_default=False)] = None,
) -> None:
    """Run the registry server (and a local training worker unless AQIMODELS_WORKERS is set)."""
    _run_process("serve", "server", "aqimodels.server.main", host, port)


@app.command()
def worker(
    host: Annotated[str | None, typer.Option(help="Listen address.", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.", show_default=False)] = None,
) -> None:
    """Run a training worker."""
    _run_process("worker", "training", "aqimodels.training.main", host, port)


def _run_process(command: str, extra: str, module: str, host: str | None, port: int | None) -> None:
    """Runs the ``main`` of a server process (registry or worker) and exits with its code.

    Its modules load here, after the configuration is read: a module missing anywhere in that
    start-up is the missing extra, said so, not a traceback.
    """
    kwargs = {name: value for name, value in (("host", host), ("port", port)) if value is not None}
    try:
        process_main: Callable[..., int] = importlib.import_module(module).main
        code = process_main(**kwargs)
    except ModuleNotFoundError as exc:
        _err(f"`aqimodels {command}` needs the {extra} extra: pip install 'aqimodels[{extra}]' "
             f"(missing module {(exc.name or str(exc)).split('.')[0]})")
        raise typer.Exit(2) from None
    raise typer.Exit(code or 0)


@app.command()
def dashboard(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Listen address (default: AQIMODELS_DASHBOARD_HOST or "
                                                  "127.0.0.1).", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: AQIMODELS_DASHBOARD_PORT or 8080; "
                                                  "0: any free port).", show_default=False)] = None,
) -> None:
    """Run the web dashboard over the registry at --target (live over Server-Sent Events)."""
    try:
        from aqimodels.client.dashboard.config import DashboardConfig, DashboardConfigError
        from aqimodels.client.dashboard.server import run as dashboard_main
    except ImportError as exc:
        _err(f"`aqimodels dashboard` needs the dashboard extra: pip install 'aqimodels[dashboard]' ({exc})")
        raise typer.Exit(2) from None
    s = _settings(ctx)
    try:
        config = DashboardConfig.from_env(target=s.target, token=s.token, ca_cert=s.ca_cert,
                                          client_cert=s.client_cert, client_key=s.client_key, timeout=s.timeout,
                                          host=host, port=port)
        raise typer.Exit(dashboard_main(config) or 0)
    except DashboardConfigError as exc:
        _err(f"INVALID_ARGUMENT: {exc}")
        raise typer.Exit(2) from None


# ---- read commands ----

@app.command()
def health(
    ctx: typer.Context,
    service: Annotated[str, typer.Option(
        help="The service to ask about: empty for the process (liveness), "
             "aqimodels.api.registry.v1.ModelRegistry for the registry's readiness (SERVING once its "
             "read model is warm).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Print SERVING or NOT_SERVING; exit 0 only when SERVING (a container HEALTHCHECK, a k8s probe)."""
    with _registry(ctx) as client:
        state = client.health(service, timeout=min(_settings(ctx).timeout, 10.0))
    if as_json:
        _print_json({"target": _settings(ctx).target, "service": service, "status": state})
    else:
        sys.stdout.write(state + "\n")
    if state != "SERVING":
        raise typer.Exit(1)


@app.command()
def status(
    ctx: typer.Context,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only this model (repeatable).",
                                                    show_default=False)] = None,
    prefix: Annotated[str, typer.Option(help="Only models whose name starts with this.")] = "",
    as_json: JsonOpt = False,
    wide: Annotated[bool, typer.Option("--wide", help="One table per model: pointers with their metrics.")]
    = False,
) -> None:
    """Every model's production, staging and latest versions, jobs, backend and workers (one line a model).

    Exits 1 when the MLflow backend is unhealthy or the server is not serving, so scripts can tell.
    """
    with _registry(ctx) as client:
        resp = client.status(names=model or (), name_prefix=prefix)
    if as_json:
        _print_json(resp)
    elif not wide and _plain_output():
        _print_plain(render.plain_status(resp))
    else:
        _print(render.status_view(resp, wide=wide))
    if not resp.backend.healthy:
        raise typer.Exit(1)


@app.command("list")
def list_(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="A model: list its versions.", show_default=False)] = None,
    stage: Annotated[str | None, typer.Option(help="Only versions in this stage (none, staging, production, "
                                                   "archived).", show_default=False)] = None,
    order_by: Annotated[str, typer.Option(help="version, create_time or metric.<name>, with asc/desc.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Registered models, or the versions of MODEL (with --stage without MODEL: that stage everywhere)."""
    with _registry(ctx) as client:
        page = min(limit, 100)
        if model is None and stage is None:
            models = list(itertools.islice(client.iter_models(page_size=page), limit))
            if as_json:
                _print_json({"models": [render.to_dict(m) for m in models]})
            else:
                _print(render.models_table(models))
            return
        stage_value(stage)  # rejects a bad stage before any call
        if model is None:
            versions: list[pb.ModelVersion] = []
            for m in client.iter_models():
                versions += client.iter_versions(m.name, stage=stage, order_by=order_by, page_size=page)
            versions = versions[:limit]
            title = f"{stage} versions"
        else:
            versions = list(itertools.islice(
                client.iter_versions(model, stage=stage, order_by=order_by, page_size=page), limit))
            title = model + (f" ({stage})" if stage else "")
    if as_json:
        _print_json({"versions": [render.to_dict(v) for v in versions]})
    else:
        _print(render.versions_table(versions, title))


@app.command()
def show(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Argument(help="Version number (omit with --stage and --at).")] = 0,
    stage: Annotated[str, typer.Option(help="With --at: the stage held then (production or staging).")] = "",
    at: Annotated[str, typer.Option(help="With --stage: a time, ISO-8601 (e.g. 2026-11-30T12:00:00Z; "
                                        "without a zone: UTC).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """One version: stage, aliases, run, URI, times, metrics, tags (--stage --at T: the one then).

    With --stage and --at: the version that held that stage at that time, and since when
    and until when it held it.
    """
    if stage or at:
        with _registry(ctx) as client:
            held = client.version_at(model, stage, render.parse_time(at, "at") if at else None, version=version)
        if as_json:
            _print_json(held)
        else:
            _print(render.held_view(held, stage))
        return
    with _registry(ctx) as client:
        mv = client.get_version(model, version)
    if as_json:
        _print_json(mv)
    else:
        _print(render.version_view(mv))


@app.command()
def compare(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    metric: Annotated[str, typer.Option(help="Metric that ranks the versions.")] = "rmse",
    versions: Annotated[str | None, typer.Option(help="Only these versions, e.g. 1,2,3 (default: all).",
                                                 show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Versions of MODEL side by side; the best one by --metric is marked."""
    with _registry(ctx) as client:
        resp = client.compare(model, render.parse_versions(versions), metric)
    if as_json:
        _print_json(resp)
    else:
        console = _console()
        console.print(render.compare_table(model, resp, console.width if console.is_terminal else None))


@app.command()
def audit(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Only events about this model.")] = "",
    actor: Annotated[str, typer.Option(help="Only events by this actor.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="At most this many events.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The audit trail of mutations and denied attempts, newest first."""
    with _registry(ctx) as client:
        events = list(itertools.islice(
            client.iter_audit_events(model_name=model, actor=actor, page_size=min(limit, 200)), limit))
    if as_json:
        _print_json({"events": [render.to_dict(e) for e in events]})
    else:
        _print(render.audit_table(events))


# ---- lifecycle ----

@app.command()
def promote(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int | None, typer.Argument(help="The version to move (or --best).",
                                                  show_default=False)] = None,
    stage: Annotated[str, typer.Option(help="production, staging or archived.")] = "production",
    best: Annotated[bool, typer.Option("--best", help="Promote the best version by --metric.")] = False,
    metric: Annotated[str, typer.Option(help="Metric for --best.")] = "rmse",
    expect_current: Annotated[int | None, typer.Option(
        help="Compare-and-set: the version that must hold the stage now (0: none).", show_default=False)] = None,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    request_id: Annotated[str, typer.Option(help="Idempotency key.")] = "",
    allow_data_change: Annotated[bool, typer.Option(
        "--allow-data-change", help="Let a version of another station set or target replace production.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move VERSION (or the best one) to a stage; promoting to production archives the one replaced."""
    with _registry(ctx) as client:
        if best == (version is not None):
            raise InvalidArgumentError("give either VERSION or --best", field="version")
        if best:  # the best one may hold the stage already: that is an answer, not an error
            chosen = client.compare(model, metric=metric).best_version
            held = next((v.version for v in client.iter_versions(model, stage=stage)), 0)
            if chosen and held == chosen:
                if as_json:
                    _print_json({"name": model, "version": chosen, "stage": stage, "unchanged": True})
                else:
                    _print(f"{model}: v{chosen} is the best by {metric} and already {stage}; nothing to do.")
                return
        resp = client.promote(model, version or 0, stage, expected_current_version=expect_current,
                              select_best_by=metric if best else "", request_id=request_id, reason=reason,
                              allow_data_change=allow_data_change)
    if resp.HasField("promotion_request"):  # the approval policy: nothing moved (exit 3)
        _promotion_requested(resp.promotion_request, as_json)
    if as_json:
        _print_json(resp)
        return
    mv = resp.version
    target_stage = stage_name(mv.stage)
    line = f"{model}: v{mv.version} is now [bold]{target_stage}[/]"
    if best:
        line += f" (best by {metric})"
    if resp.previous_version and resp.previous_version != mv.version:
        line += f"; it replaces v{resp.previous_version}"
    elif not resp.previous_version:
        line += f"; no version held {target_stage} before"
    else:
        line += " (unchanged)"
    _print(line + ".")
    if resp.archived_versions:
        _print("archived: " + ", ".join(f"v{v}" for v in resp.archived_versions))
    if resp.audit_event_id:
        _print(f"[dim]audit event {resp.audit_event_id}[/]")


APPROVAL_NEEDED = 3  # the exit code of a promotion the approval policy turned into a request


def _promotion_requested(req: pb.PromotionRequest, as_json: bool) -> NoReturn:
    if as_json:
        _print_json({"promotion_request": render.to_dict(req), "approval_needed": True})
    else:
        _print(f"{req.model_name}: v{req.version} is NOT promoted yet: the model's approval policy needs a second "
               f"admin.\npromotion request [bold]{req.id}[/] is pending (replaces "
               f"{('v' + str(req.expected_current_version)) if req.expected_current_version else 'no version'}); "
               f"another admin runs: aqimodels approve {req.id}")
    raise typer.Exit(APPROVAL_NEEDED)


@app.command()
def requests(
    ctx: typer.Context,
    state: Annotated[str, typer.Option(help="pending, approved, rejected, expired or aborted_stale (default: all).")]
    = "",
    model: Annotated[str, typer.Option(help="Only requests about this model.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="At most this many requests.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Promotion requests of models under the approval policy, newest first."""
    with _registry(ctx) as client:
        found = list(itertools.islice(client.iter_promotion_requests(state=state, model_name=model,
                                                                     page_size=min(limit, 200)), limit))
    if as_json:
        _print_json({"requests": [render.to_dict(r) for r in found]})
    else:
        _print(render.requests_table(found))


@app.command()
def approve(
    ctx: typer.Context,
    request: Annotated[str, typer.Argument(help="The promotion request's id (see `aqimodels requests`).")],
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Approve a promotion request of another admin: the promotion is made now."""
    with _registry(ctx) as client:
        resp = client.approve_promotion(request, reason=reason)
    if as_json:
        _print_json(resp)
        return
    r, p = resp.promotion_request, resp.promotion
    _print(f"{r.model_name}: request {r.id} approved; v{p.version.version} is now [bold]production[/]"
           + (f", replacing v{p.previous_version}." if p.previous_version else "."))
    if p.audit_event_id:
        _print(f"[dim]audit event {p.audit_event_id}[/]")


@app.command()
def reject(
    ctx: typer.Context,
    request: Annotated[str, typer.Argument(help="The promotion request's id (see `aqimodels requests`).")],
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Reject a pending promotion request: nothing moves."""
    with _registry(ctx) as client:
        resp = client.reject_promotion(request, reason=reason)
    if as_json:
        _print_json(resp)
        return
    r = resp.promotion_request
    _print(f"{r.model_name}: request {r.id} (v{r.version}) rejected; nothing moved.")


@app.command()
def rollback(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    expect_current: Annotated[int | None, typer.Option(
        help="Compare-and-set on the current production version.", show_default=False)] = None,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    request_id: Annotated[str, typer.Option(help="Idempotency key.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Move production back to the version that held it before."""
    with _registry(ctx) as client:
        resp = client.rollback(model, expected_current_version=expect_current, request_id=request_id,
                               reason=reason)
    if as_json:
        _print_json(resp)
        return
    _print(f"{model}: production rolled back to [bold]v{resp.version.version}[/]"
           + (f"; v{resp.replaced_version} archived." if resp.replaced_version else "."))
    if resp.audit_event_id:
        _print(f"[dim]audit event {resp.audit_event_id}[/]")


@app.command()
def cleanup(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    keep: Annotated[int, typer.Option(min=0, help="Keep the newest N versions (aliased ones are always kept).")]
    = 0,
    versions: Annotated[str | None, typer.Option(help="Delete exactly these versions instead, e.g. 1,2.",
                                                 show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be deleted.")] = False,
    policy: Annotated[bool, typer.Option("--policy", help="Apply the server's retention policy "
                                                          "(AQIMODELS_RETENTION); with --dry-run, preview it.")]
    = False,
    request_id: Annotated[str, typer.Option(help="Idempotency key.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Delete old versions of MODEL, never one that production or staging points to."""
    with _registry(ctx) as client:
        chosen = render.parse_versions(versions)
        if policy and (chosen or keep):
            raise InvalidArgumentError("--policy takes neither --keep nor --versions", field="keep_last")
        if not chosen and keep <= 0 and not policy:
            raise InvalidArgumentError("give --keep N (N >= 1), --versions or --policy", field="keep_last")
        resp = client.cleanup(model, keep, versions=chosen, dry_run=dry_run, request_id=request_id)
    if as_json:
        _print_json(resp)
        return

    def vs(values: Any) -> str:
        return ", ".join(f"v{v}" for v in values) or "none"

    verb = "would delete" if resp.dry_run else "deleted"
    _print(f"{model}: {verb} {vs(resp.deleted_versions)}")
    _print(f"kept: {vs(resp.kept_versions)}; protected by an alias: {vs(resp.protected_versions)}")
    if resp.dry_run:
        _print("[dim]dry run: nothing was deleted.[/]")


# ---- monitoring ----

@app.command()
def history(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    metric: Annotated[str, typer.Option(help="The metric to show and plot.")] = "rmse",
    plot: Annotated[str | None, typer.Option(help="Also write a PNG chart here (needs matplotlib).",
                                             show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """MODEL's metric across versions (table and sparkline) with its production periods."""
    with _registry(ctx) as client:
        resp = client.history(model, metric)
        if plot:
            from aqimodels.client.plot import plot_history

            plot_history(model, resp, plot)
    if as_json:
        _print_json(resp)
        return
    _print(render.history_view(model, resp))
    if plot:
        _print(f"chart written to {escape(plot)}")


@app.command()
def alerts(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Only alerts about this model.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Follow degradation alerts as they are raised (Ctrl-C stops)."""
    with _registry(ctx) as client:
        if not as_json:
            about = f" about {model}" if model else ""
            _err(f"Waiting for degradation alerts{about} from {_settings(ctx).target} (Ctrl-C stops)...")
        try:
            for alert in client.watch_alerts(model):
                if as_json:
                    sys.stdout.write(render.to_json(alert, indent=None) + "\n")
                    sys.stdout.flush()
                else:
                    health = pb.ModelHealth.Name(alert.health).removeprefix("MODEL_HEALTH_")
                    _print(f"{render.absolute_time(alert.time)}  [bold]{health}[/]  {escape(alert.message)}")
        except KeyboardInterrupt:
            pass


@app.command()
def events(
    ctx: typer.Context,
    model: Annotated[list[str] | None, typer.Option(help="Only events of this model (repeatable).",
                                                    show_default=False)] = None,
    type_: Annotated[list[str] | None, typer.Option("--type", help="Only events of this type (repeatable), e.g. "
                                                    "stage_changed, rollback, alert_raised.",
                                                    show_default=False)] = None,
    after: Annotated[int, typer.Option(min=0, help="Only events after this sequence number.")] = 0,
    follow: Annotated[bool, typer.Option("--follow", help="Keep following new events (Ctrl-C stops).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Registry events (promotions, rollbacks, deletions, retrains, alerts, approvals) in sequence order.

    Prints the stored events after --after; with --follow, then every new one as it happens.
    Resume later with --after set to the last sequence printed. --json prints one JSON object a line.
    """
    with _registry(ctx) as client:
        if follow and not as_json:
            _err(f"Following registry events from {_settings(ctx).target} (Ctrl-C stops)...")
        shown = 0
        try:
            for event in client.watch_events(after, model_names=model or (), types=type_ or (), follow=follow):
                shown += 1
                if as_json:
                    sys.stdout.write(render.to_json(event, indent=None) + "\n")
                    sys.stdout.flush()
                else:
                    _print(render.registry_event_line(event))
        except KeyboardInterrupt:
            pass
        if not shown and not follow and not as_json:
            _print(f"No registry events{' after ' + str(after) if after else ''} match.")


# ---- retrain and jobs ----

def _follow(ctx: typer.Context, events: Iterator[pb.RetrainEvent], as_json: bool, order: Sequence[str] = ()) -> None:
    """Shows events (bars or JSON lines) until the stream ends; Ctrl-C detaches (the jobs named in
    ``order`` are offered in that order, not in the order their streams happened to answer)."""
    jobs: dict[str, render.JobProgress] = {}
    console = _console()
    try:
        if as_json:
            for ev in events:
                render.apply_event(jobs, ev)
                sys.stdout.write(render.to_json(ev, indent=None) + "\n")
                sys.stdout.flush()
        else:
            with render.RetrainView(console) as view:
                jobs = view.jobs
                for ev in events:
                    view.update(ev)
    except KeyboardInterrupt:
        close = getattr(events, "close", None)
        if close is not None:
            close()
        running = sorted((job for job in jobs.values() if not job.done),
                         key=lambda job: order.index(job.job_id) if job.job_id in order else len(order))
        if len(running) == 1:
            _err("\nDetached: the job goes on on the server. Watch it again with:\n"
                 f"  aqimodels jobs watch {running[0].job_id} --after {running[0].last_sequence}")
        elif running:
            _err("\nDetached: the jobs go on on the server. Watch them all again with:\n"
                 "  aqimodels jobs watch " + " ".join(job.job_id for job in running))
        else:
            _err("\nDetached.")
        raise typer.Exit(130) from None
    if not as_json and jobs:
        console.print(render.summary_table(jobs.values()))
    failed = [j for j in jobs.values() if j.state != pb.JOB_STATE_SUCCEEDED]
    if failed:
        _err(f"{len(failed)} of {len(jobs)} job(s) did not succeed: "
             + "; ".join(f"{j.model_type} {j.job_id} {render.job_state_name(j.state)}"
                         + (f" ({j.error})" if j.error else "") for j in failed))
        raise typer.Exit(1)


@app.command()
def retrain(
    ctx: typer.Context,
    model_types: Annotated[list[str] | None, typer.Argument(
        help=f"Model types to train ({', '.join(MODEL_TYPES)}); none means all four.", show_default=False)] = None,
    data: Annotated[str, typer.Option(help="Dataset spec: synthetic[:k=v,...], beijing:<folder> or a file.")]
    = "",
    auto_promote: Annotated[bool, typer.Option("--auto-promote", help="Promote a new version that beats "
                                                                      "production.")] = False,
    metric: Annotated[str, typer.Option(help="Metric for auto-promotion.")] = "rmse",
    margin: Annotated[float, typer.Option(min=0.0, help="Required relative improvement, e.g. 0.02.")] = 0.0,
    epochs: Annotated[int, typer.Option(min=0, help="Maximum epochs or boosting rounds (0: trainer default).")]
    = 0,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Follow progress until the jobs end, or "
                                                                      "print the job ids and return.")] = True,
    request_id: Annotated[str, typer.Option(help="Idempotency key.")] = "",
    target: Annotated[str, typer.Option(help="Pollutant to forecast: pm25, pm10, no2 or o3 (other than pm25: "
                                              "registered as aqi_predictor_<type>_<target>).")] = "pm25",
    allow_data_change: Annotated[bool, typer.Option(
        "--allow-data-change", help="Let auto-promotion replace production by a version of another station set "
                                    "or target.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train new versions (one job per model type) with live progress bars and a summary."""
    with _registry(ctx) as client:
        types = [model_type_value(t) for t in (model_types or [])]
        params = wpb.TrainParams(max_epochs=epochs)
        events = client.retrain(types, dataset=data, auto_promote=auto_promote, params=params,
                                promotion_metric=metric, promotion_margin=margin, request_id=request_id,
                                target="" if target == "pm25" else target, allow_data_change=allow_data_change)
        if follow:
            _follow(ctx, events, as_json)
            return
        expected = len(set(types)) or len(MODEL_TYPES)
        seen: dict[str, render.JobProgress] = {}
        for ev in events:
            if ev.job_id in seen:
                continue
            job = render.apply_event(seen, ev)
            if as_json:
                sys.stdout.write(render.to_json({"job_id": job.job_id, "model_type": job.model_type,
                                                 "state": render.job_state_name(job.state)}, indent=None) + "\n")
            else:
                sys.stdout.write(f"{job.job_id}  {job.model_type:<9} {render.job_state_name(job.state)}\n")
            sys.stdout.flush()
            if len(seen) >= expected:
                break
        close = getattr(events, "close", None)
        if close is not None:
            close()  # disconnects; the jobs go on on the server
    if not as_json and seen:
        _err("The jobs run on the server. Follow one with `aqimodels jobs watch JOB`, list them with "
             "`aqimodels jobs`.")


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state (queued, running, succeeded, failed, "
                                                   "cancelled, interrupted).", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="Only jobs of this registered model.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="At most this many jobs.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List retrain jobs, newest first (default), or watch / cancel one."""
    if ctx.invoked_subcommand is not None:
        return
    with _registry(ctx) as client:
        state_number = render.job_state_value(state)
        found: list[pb.RetrainJob] = []
        token = ""
        while len(found) < limit:
            page = client.list_jobs(state=state_number, model_name=model, page_size=min(limit, 100),
                                    page_token=token)
            found += page.jobs
            token = page.next_page_token
            if not token:
                break
        found = found[:limit]
    if as_json:
        _print_json({"jobs": [render.to_dict(j) for j in found]})
    else:
        _print(render.jobs_table(found))


class _Merged:
    """Events of several streams as they arrive (one thread per stream); close() cancels them all."""

    def __init__(self, streams: list[Any]) -> None:
        import queue
        import threading

        self._streams = streams
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._ended = 0
        for stream in streams:
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        try:
            for event in stream:
                self._queue.put(("event", event))
            self._queue.put(("end", None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            self._queue.put(("error", exc))

    def __iter__(self) -> _Merged:
        return self

    def __next__(self) -> pb.RetrainEvent:
        while self._ended < len(self._streams):
            kind, payload = self._queue.get()
            if kind == "event":
                return payload  # type: ignore[no-any-return]  # the queue holds (kind, payload) of three kinds
            if kind == "error":
                raise payload
            self._ended += 1
        raise StopIteration

    def close(self) -> None:
        """Nothing to do here: the streams belong to the pump threads (a generator cannot be closed
        from another thread while it runs); closing the client's channel cancels every call."""


@jobs_app.command("watch")
def jobs_watch(
    ctx: typer.Context,
    job_ids: Annotated[list[str], typer.Argument(metavar="JOB...", help="One job id or several.")],
    after: Annotated[int, typer.Option(min=0, help="Replay only events after this sequence number (one job).")]
    = 0,
    as_json: JsonOpt = False,
) -> None:
    """Replay the events of one or several jobs, then follow them live until they end."""
    with _registry(ctx) as client:
        if len(job_ids) == 1:
            _follow(ctx, client.watch_job(job_ids[0], after_sequence=after), as_json)
            return
        if after:
            raise InvalidArgumentError("--after takes one job; several are replayed from their start",
                                       field="after_sequence")
        unique = list(dict.fromkeys(job_ids))
        _follow(ctx, _Merged([client.watch_job(job_id) for job_id in unique]), as_json, order=unique)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job id.")],
    as_json: JsonOpt = False,
) -> None:
    """One retrain job."""
    with _registry(ctx) as client:
        job = client.get_job(job_id)
    if as_json:
        _print_json(job)
    else:
        _print(render.jobs_table([job]))


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job id.")],
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Cancel a queued or running job."""
    with _registry(ctx) as client:
        job = client.cancel_job(job_id, reason)
    if as_json:
        _print_json(job)
    else:
        _print(f"{escape(job.job_id)} ({job.model_name}): {render.job_state_name(job.state)}")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who the token is for (recorded as the actor in the audit log).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
) -> None:
    """Print a fresh token on the first line, then the TOML entry to append to the token file."""
    from aqimodels.client.tokens import new_token, toml_entry

    token = new_token()
    try:
        entry = toml_entry(name, role, token)
    except ValueError as exc:
        print(f"INVALID_ARGUMENT: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(token)
    print(f"# append to AQIMODELS_TOKENS_FILE (the server keeps only the hash):\n{entry}", end="")


_GLOBAL_OPTIONS = ("--target", "--token", "--ca-cert", "--client-cert", "--client-key", "--timeout")


# ---- webhooks ----

SECRET_VARIABLE = "AQIMODELS_WEBHOOK_SECRET"


def _webhook_secret(secret_file: str) -> str:
    """The secret from --secret-file (``-``: standard input), else from AQIMODELS_WEBHOOK_SECRET; never an
    argument, which would sit in the shell history and the process list."""
    import os
    from pathlib import Path

    if secret_file:
        try:
            secret = sys.stdin.read() if secret_file == "-" else Path(secret_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            _err(f"configuration error: --secret-file {secret_file[:80]!r} cannot be read: "
                 f"{getattr(exc, 'strerror', None) or exc}")
            raise typer.Exit(2) from None
    else:
        secret = os.environ.get(SECRET_VARIABLE, "")
    if not secret.strip():
        _err(f"configuration error: no secret: give --secret-file FILE (or -, standard input) or set {SECRET_VARIABLE}")
        raise typer.Exit(2)
    return secret.strip()


def _delivery_line(d: pb.WebhookDelivery) -> str:
    outcome = pb.WebhookDeliveryOutcome.Name(d.outcome).removeprefix("WEBHOOK_DELIVERY_OUTCOME_").lower()
    answer = f"HTTP {d.status_code}" if d.status_code else "no answer"
    why = f": {d.error}" if d.error else ""
    return f"{d.id}  event {d.event_sequence} attempt {d.attempt}  {outcome}  {answer}  {d.latency_ms:.1f} ms{why}"


def _webhook_table(hooks: Sequence[pb.Webhook]) -> RenderableType:
    from rich.table import Table

    table = Table("id", "url", "events", "model", "delivered up to", "owner", "created by")
    for h in hooks:
        types = ",".join(pb.RegistryEventType.Name(t).removeprefix("REGISTRY_EVENT_TYPE_").lower()
                         for t in h.event_types) or "all"
        table.add_row(h.id, escape(h.url), types, escape(h.model_name) or "all", str(h.delivered_sequence),
                      escape(h.owner) or "-", escape(h.created_by))
    return table


@webhooks_app.command("create")
def webhooks_create(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The http:// or https:// URL to POST the events to.")],
    events: Annotated[str, typer.Option(help="Comma-separated event types, e.g. stage_changed,rollback "
                                             "(default: all).")] = "",
    model: Annotated[str, typer.Option(help="Only events of this model (default: every model).")] = "",
    secret_file: Annotated[str, typer.Option(help="File holding the signing secret (- : standard input); "
                                                  f"default: ${SECRET_VARIABLE}.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Add a webhook: the events committed from now on are POSTed to URL, signed with the secret."""
    from aqimodels.client.client import webhook_event_types

    secret = _webhook_secret(secret_file)
    with _registry(ctx) as client:
        hook = client.create_webhook(url, webhook_event_types([e for e in events.split(",") if e.strip()]),
                                     secret=secret, model_name=model)
    if as_json:
        _print_json(hook)
    else:
        _print_plain(f"webhook {hook.id} created: events from sequence {hook.delivered_sequence + 1} on go to "
                     f"{hook.url}\n")


@webhooks_app.command("list")
def webhooks_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every webhook (never its secret)."""
    with _registry(ctx) as client:
        hooks = client.list_webhooks()
    if as_json:
        _print_json({"webhooks": [render.to_dict(h) for h in hooks]})
    elif not hooks:
        _print("No webhooks. Add one with `aqimodels webhooks create URL --secret-file F`.")
    else:
        _print(_webhook_table(hooks))


@webhooks_app.command("delete")
def webhooks_delete(
    ctx: typer.Context,
    webhook_id: Annotated[str, typer.Argument(metavar="ID", help="The webhook id.")],
    as_json: JsonOpt = False,
) -> None:
    """Remove a webhook and its delivery log."""
    with _registry(ctx) as client:
        hook = client.delete_webhook(webhook_id)
    if as_json:
        _print_json(hook)
    else:
        _print_plain(f"webhook {hook.id} to {hook.url} deleted\n")


def _print_delivery(d: pb.WebhookDelivery, as_json: bool) -> None:
    if as_json:
        _print_json(d)
    else:
        _print_plain(_delivery_line(d) + "\n")
    if d.outcome != pb.WEBHOOK_DELIVERY_OUTCOME_DELIVERED:
        raise typer.Exit(1)


@webhooks_app.command("test")
def webhooks_test(
    ctx: typer.Context,
    webhook_id: Annotated[str, typer.Argument(metavar="ID", help="The webhook id.")],
    as_json: JsonOpt = False,
) -> None:
    """Send a test delivery now and show how it went (exit 1 unless the receiver answered 2xx)."""
    with _registry(ctx) as client:
        delivery = client.test_webhook(webhook_id)
    _print_delivery(delivery, as_json)


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    ctx: typer.Context,
    webhook_id: Annotated[str, typer.Argument(metavar="ID", help="The webhook id.")],
    event: Annotated[int, typer.Option(min=0, help="Only the attempts at this event sequence.")] = 0,
    limit: Annotated[int, typer.Option(min=1, help="At most this many attempts.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The delivery log of a webhook, newest first: event, attempt, outcome, status code, latency, error."""
    with _registry(ctx) as client:
        found = list(itertools.islice(client.iter_webhook_deliveries(webhook_id, event_sequence=event,
                                                                     page_size=min(limit, 200)), limit))
    if as_json:
        _print_json({"deliveries": [render.to_dict(d) for d in found]})
    else:
        _print_plain("".join(_delivery_line(d) + "\n" for d in found) or "no deliveries\n")


@webhooks_app.command("redeliver")
def webhooks_redeliver(
    ctx: typer.Context,
    webhook_id: Annotated[str, typer.Argument(metavar="ID", help="The webhook id.")],
    event: Annotated[int, typer.Option(min=0, help="The event sequence to send again.")] = 0,
    delivery: Annotated[str, typer.Option(help="Or: send the event of this logged delivery again.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Send one event to the webhook again now (exit 1 unless the receiver answered 2xx)."""
    with _registry(ctx) as client:
        attempt = client.redeliver_webhook(webhook_id, event_sequence=event, delivery_id=delivery)
    _print_delivery(attempt, as_json)


def hoist_global_options(argv: list[str]) -> list[str]:
    """Moves the connection options to the front, so ``aqimodels status --target X`` works too."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg == "--":
            rest += argv[i:]
            break
        if name in _GLOBAL_OPTIONS:
            if "=" in arg:
                front.append(arg)
            else:
                front += argv[i:i + 2]
                i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def _only_the_invoked_command(args: list[str]) -> None:
    """Keeps only the command being run in the app: typer builds (and evaluates the annotations
    of) every registered command on each start, a third of a fast command's own time. Help, no
    command or an unknown one keep them all (for the listing and "did you mean")."""
    rest = args[len(args) - len(hoist_rest(args)):]
    name = rest[0] if rest else ""
    commands = {(c.name or (c.callback.__name__ if c.callback else "")).replace("_", "-"): c
                for c in app.registered_commands}
    groups = {g.name: g for g in app.registered_groups}
    if name in commands:
        app.registered_commands = [commands[name]]
        app.registered_groups = []
    elif name in groups:
        app.registered_commands = []
        app.registered_groups = [groups[name]]


def hoist_rest(args: list[str]) -> list[str]:
    """``args`` after the leading connection options (as hoist_global_options leaves them)."""
    i = 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name not in _GLOBAL_OPTIONS:
            break
        i += 1 if "=" in args[i] else 2
    return args[i:]


# The processes end the ordinary way. Every other command, once its output is flushed, ends at
# once (os._exit): after a gRPC call the interpreter's teardown (grpc's core shutdown and its
# threads) is 20-40 ms of a one-call command (bench/cli_start.py), and nothing is left to clean up.
_ORDINARY_EXIT = frozenset({"serve", "worker", "dashboard"})


def _exit_now(code: int | str | None) -> NoReturn:
    """Flushes stdout and stderr and ends the process with ``code`` as SystemExit would."""
    import os

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more can be said
            pass
    os._exit(status)


def main() -> None:
    """The ``aqimodels`` console script; Ctrl-C anywhere exits 130 without a traceback."""
    import signal

    if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # commands handle KeyboardInterrupt
    rest: list[str] = []
    code: int | str | None = 0
    try:
        args = hoist_global_options(sys.argv[1:])
        rest = hoist_rest(args)
        _only_the_invoked_command(args)
        app(args=args, prog_name="aqimodels", standalone_mode=True)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        code = 130
    except SystemExit as exc:
        code = exc.code
    if rest and rest[0] in _ORDINARY_EXIT:
        raise SystemExit(code)
    _exit_now(code)


if __name__ == "__main__":
    main()
