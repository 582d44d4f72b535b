"""Rendering for the ``aqimodels`` CLI: tables, human times, metric formatting and retrain progress.

Everything here is pure (protos in, rich renderables or plain values out) so that it can be unit
tested without a server. The CLI in :mod:`aqimodels.client.cli` only fetches and prints.
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client.client import model_type_name, stage_name
from aqimodels.client.progress import JOB_STATES as JOB_STATES
from aqimodels.client.progress import TERMINAL_STATES as TERMINAL_STATES
from aqimodels.client.progress import JobProgress as JobProgress
from aqimodels.client.progress import apply_event as apply_event
from aqimodels.client.progress import eta_seconds as eta_seconds
from aqimodels.client.progress import job_state_name as job_state_name
from aqimodels.client.progress import job_state_value as job_state_value
from aqimodels.client.values import MISSING as _MISSING
from aqimodels.client.values import fmt_metric as fmt_metric
from aqimodels.client.values import promotion_text as promotion_text
from aqimodels.client.errors import InvalidArgumentError
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

# rich loads inside the functions that build renderables (~30 ms): `status` off a terminal
# (plain_status) and every --json answer print without it.
if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.progress import TaskID
    from rich.table import Table
    from rich.text import Text

# The metrics a person looks at first, in table order; horizons and the baseline follow when present.
KEY_METRICS: tuple[str, ...] = ("rmse", "mae", "r2", "accuracy")
HORIZON_METRICS: tuple[str, ...] = ("rmse_h1", "rmse_h6", "rmse_h24")
BASELINE_METRIC = "baseline_rmse"

_STAGE_STYLES = {"production": "bold green", "staging": "yellow", "archived": "dim", "none": ""}
_STATE_STYLES = {"queued": "cyan", "running": "blue", "succeeded": "green", "failed": "bold red",
                 "cancelled": "yellow", "interrupted": "magenta"}
_HEALTH = {
    pb.MODEL_HEALTH_HEALTHY: ("healthy", "green"),
    pb.MODEL_HEALTH_NO_PRODUCTION: ("no production version", "yellow"),
    pb.MODEL_HEALTH_DEGRADED: ("DEGRADED", "bold red"),
}
_SHORT_HEALTH = {
    pb.MODEL_HEALTH_HEALTHY: ("healthy", "green"),
    pb.MODEL_HEALTH_NO_PRODUCTION: ("no prod", "yellow"),
    pb.MODEL_HEALTH_DEGRADED: ("DEGRADED", "bold red"),
}


# ---- plain values ----

def escape(text: str) -> str:
    """``text`` with rich markup escaped (rich.markup loads on first use)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def parse_versions(text: str | None) -> list[int]:
    """``"1,2, 5"`` -> ``[1, 2, 5]``; raises InvalidArgumentError naming the field on anything else."""
    if not text:
        return []
    try:
        versions = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InvalidArgumentError(f"versions must be comma-separated numbers, got {text!r}",
                                   field="versions") from None
    if any(v <= 0 for v in versions):
        raise InvalidArgumentError(f"versions are 1-based, got {text!r}", field="versions")
    return versions


def has_time(ts: Timestamp) -> bool:
    return bool(ts.seconds or ts.nanos)


def to_datetime(ts: Timestamp) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


def human_delta(seconds: float) -> str:
    """A duration for people: ``42 s``, ``5 min``, ``3 h``, ``2 days``."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{int(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h"
    days = int(seconds // 86400)
    return f"{days} day" if days == 1 else f"{days} days"


def human_time(ts: Timestamp, now: datetime | None = None) -> str:
    """``3 min ago`` (or ``in 3 min`` for clock skew), ``just now``, and ``never`` when unset."""
    if not has_time(ts):
        return "never"
    now = now or datetime.now(tz=UTC)
    delta = (now - to_datetime(ts)).total_seconds()
    if abs(delta) < 5:
        return "just now"
    return f"{human_delta(delta)} ago" if delta > 0 else f"in {human_delta(delta)}"


def absolute_time(ts: Timestamp, now: datetime | None = None) -> str:
    """``2026-11-29 07:21:39 UTC (3 min ago)``, or ``—`` when unset."""
    if not has_time(ts):
        return _MISSING
    return f"{to_datetime(ts):%Y-%m-%d %H:%M:%S} UTC ({human_time(ts, now)})"


def metric_direction(direction: int) -> str:
    if direction == pb.METRIC_DIRECTION_LOWER_IS_BETTER:
        return "lower is better ↓"
    if direction == pb.METRIC_DIRECTION_HIGHER_IS_BETTER:
        return "higher is better ↑"
    return "direction unknown"


def stage_text(stage: int) -> Text:
    from rich.text import Text

    name = stage_name(stage)
    return Text(name, style=_STAGE_STYLES.get(name, ""))


def state_text(state: int) -> Text:
    from rich.text import Text

    name = job_state_name(state)
    return Text(name, style=_STATE_STYLES.get(name, ""))


def version_label(version: int) -> str:
    return f"v{version}" if version else _MISSING


def to_dict(message: Message) -> dict[str, Any]:
    """A proto as the JSON the CLI prints (field names as in the .proto).

    A google.protobuf.Struct holds every number as a double: whole ones inside it (the versions
    in an audit event's ``before``/``after``) print as integers, 3 and not 3.0.
    """
    from google.protobuf.json_format import MessageToDict  # only --json needs it: kept off the CLI's start

    data = MessageToDict(message, preserving_proto_field_name=True)
    _whole_numbers_in_structs(message, data)
    return data


def _as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _as_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_int(v) for v in value]
    return value


def _whole_numbers_in_structs(message: Message, data: dict[str, Any]) -> None:
    for fd, value in message.ListFields():
        if fd.message_type is None or fd.name not in data:
            continue
        if fd.message_type.full_name == "google.protobuf.Struct":
            data[fd.name] = _as_int(data[fd.name])
        elif fd.message_type.GetOptions().map_entry:
            continue
        elif fd.is_repeated:
            for item, out in zip(value, data[fd.name], strict=False):
                if isinstance(out, dict):
                    _whole_numbers_in_structs(item, out)
        elif isinstance(data[fd.name], dict):
            _whole_numbers_in_structs(value, data[fd.name])


def to_json(message: Message | Mapping[str, Any] | Sequence[Any], *, indent: int | None = 2) -> str:
    data = to_dict(message) if isinstance(message, Message) else message
    return json.dumps(data, indent=indent, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Message):
        return to_dict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def render_text(renderable: RenderableType, width: int = 160) -> str:
    """A renderable as plain text (for tests and logs)."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False,
                      legacy_windows=False)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]  # Console.file is the StringIO passed above
    return str(out)


# ---- tables ----

def _metric_cells(mv: pb.ModelVersion | None, names: Iterable[str]) -> list[str]:
    return [fmt_metric(n, mv.metrics[n]) if mv is not None and n in mv.metrics else _MISSING for n in names]


_NO_MODELS = "No models registered yet."
_NO_MODELS_NEXT = "Train them with `aqimodels retrain` (or `make demo`)."
_NO_MODELS_READ = "No models could be read: the MLflow backend is unhealthy (see below)."


def status_view(status: pb.GetStatusResponse, now: datetime | None = None, *, wide: bool = False) -> RenderableType:
    """The whole ``aqimodels status`` screen: one line per model (``wide``: one table per model),
    the backend line, the workers."""
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = []
    backend = status.backend
    if not status.models:
        if backend.healthy or not backend.tracking_uri:
            parts.append(Text.assemble((_NO_MODELS, "bold"), f" {_NO_MODELS_NEXT}"))
        else:
            parts.append(Text(_NO_MODELS_READ, style="bold red"))
    if wide:
        for ms in status.models:
            parts.append(model_status_table(ms, now))
    elif status.models:
        parts.append(models_status_table(status.models, now))
    parts.append(backend_line(backend))
    parts.append(workers_view(status.workers))
    if status.server_version:
        parts.append(Text(f"server {status.server_version}", style="dim"))
    return Group(*parts)


def _pointer_cell(mv: pb.ModelVersion | None, metric: str = "rmse") -> str:
    if mv is None or not mv.version:
        return _MISSING
    return f"v{mv.version} {fmt_metric(metric, mv.metrics[metric])}" if metric in mv.metrics else f"v{mv.version}"


def running_jobs_text(jobs: Sequence[pb.RetrainJob]) -> str:
    return ", ".join(f"{j.job_id} ({job_state_name(j.state)}"
                     + (f", epoch {j.epoch}/{j.total_epochs}" if j.total_epochs else "") + ")"
                     for j in jobs) or "none"


_STATUS_TITLE = "Models: version and rmse of each pointer (status --wide: all metrics)"
_STATUS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "left"), ("health", "left"), ("production", "right"), ("staging", "right"), ("latest", "right"),
    ("trained", "left"), ("jobs", "left"))


def _status_rows(models: Sequence[pb.ModelStatus], now: datetime | None) -> list[tuple[list[str], str]]:
    """The compact status rows: the cells of each model (as _STATUS_COLUMNS) and its health's style."""
    out = []
    for ms in models:
        health, style = _SHORT_HEALTH.get(ms.health, ("unknown", "dim"))
        out.append(([ms.model.name, health, _pointer_cell(ms.production if ms.HasField("production") else None),
                     _pointer_cell(ms.staging if ms.HasField("staging") else None),
                     _pointer_cell(ms.latest if ms.HasField("latest") else None),
                     human_time(ms.last_training_time, now), running_jobs_text(ms.running_jobs)], style))
    return out


def models_status_table(models: Sequence[pb.ModelStatus], now: datetime | None = None) -> RenderableType:
    """``aqimodels status``: one row per model (production, staging and latest with their rmse)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=_STATUS_TITLE, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
    for col, justify in _STATUS_COLUMNS:
        table.add_column(col, justify=justify, no_wrap=col != "jobs")  # type: ignore[arg-type]  # rich wants a Literal; the column tables hold its values as str
    for cells, style in _status_rows(models, now):
        table.add_row(escape(cells[0]), Text(cells[1], style=style), *cells[2:6], escape(cells[6]))
    return table


def plain_table(title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]]) -> str:
    """A borderless table as plain text, laid out as rich's SIMPLE_HEAD one (title, header, a rule,
    rows; two spaces between columns), never cut: for pipes and files, where rich is not needed."""
    widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, (name, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if justify == "right" else c.ljust(w)
                         for c, w, (_, justify) in zip(cells, widths, columns, strict=True)).rstrip()

    total = sum(widths) + 2 * (len(widths) - 1)
    return "\n".join([title, line([name for name, _ in columns]), "─" * total, *(line(r) for r in rows)])


def plain_status(status: pb.GetStatusResponse, now: datetime | None = None) -> str:
    """The compact ``aqimodels status`` screen as plain text: the lines status_view prints off a
    terminal (the workers table borderless), without loading rich (~30 ms of a piped status)."""
    parts: list[str] = []
    backend = status.backend
    if not status.models:
        if backend.healthy or not backend.tracking_uri:
            parts.append(f"{_NO_MODELS} {_NO_MODELS_NEXT}")
        else:
            parts.append(_NO_MODELS_READ)
    else:
        parts.append(plain_table(_STATUS_TITLE, _STATUS_COLUMNS, [cells for cells, _ in _status_rows(status.models, now)]))
    parts.append(_backend_text(backend))
    workers = status.workers
    if not workers:
        parts.append(_NO_WORKERS)
    else:
        columns, rows = _workers_rows(workers)
        parts.append(plain_table("Training workers", columns, rows))
    if status.server_version:
        parts.append(f"server {status.server_version}")
    return "\n".join(parts) + "\n"


def model_status_table(ms: pb.ModelStatus, now: datetime | None = None) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    model = ms.model
    health, style = _HEALTH.get(ms.health, ("unknown", "dim"))
    title = Text.assemble(
        (model.name, "bold"), "  ", (f"● {health}", style),
        f"  last trained {human_time(ms.last_training_time, now)}",
        f"  {model.version_count} version{'s' if model.version_count != 1 else ''}")
    table = Table(expand=False)
    table.add_column("pointer")
    table.add_column("version", justify="right")
    for name in KEY_METRICS:
        table.add_column(name, justify="right")
    table.add_column("registered")
    rows: list[tuple[str, pb.ModelVersion | None]] = [
        ("production", ms.production if ms.HasField("production") else None),
        ("staging", ms.staging if ms.HasField("staging") else None),
        ("latest", ms.latest if ms.HasField("latest") else None),
    ]
    for label, mv in rows:
        if mv is None:
            table.add_row(Text(label, style=_STAGE_STYLES.get(label, "")), _MISSING,
                          *[_MISSING] * len(KEY_METRICS), _MISSING)
            continue
        table.add_row(Text(label, style=_STAGE_STYLES.get(label, "")), version_label(mv.version),
                      *_metric_cells(mv, KEY_METRICS), human_time(mv.create_time, now))
    table.caption = f"running jobs: {running_jobs_text(ms.running_jobs)}"
    table.caption_justify = "left"
    return Group(Text(), title, table)


def _backend_text(backend: pb.BackendStatus) -> str:
    if backend.healthy:
        return f"MLflow backend: healthy  {backend.tracking_uri}  ({backend.latency_ms:.0f} ms)"
    return f"MLflow backend: UNHEALTHY  {backend.tracking_uri}  {backend.message}".rstrip()


def backend_line(backend: pb.BackendStatus) -> Text:
    from rich.text import Text

    if backend.healthy:
        return Text.assemble(("MLflow backend: ", "bold"), ("healthy", "green"),
                             f"  {backend.tracking_uri}  ({backend.latency_ms:.0f} ms)")
    return Text.assemble(("MLflow backend: ", "bold"), ("UNHEALTHY", "bold red"),
                         f"  {backend.tracking_uri}  {backend.message}".rstrip())


_NO_WORKERS = "Training workers: none configured (retrain needs one: `aqimodels worker`)."


def _workers_rows(workers: Sequence[pb.WorkerStatus]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """The workers table's columns (name, justify) and cells; a restarts column when any restarted."""
    restarted = any(w.restarts for w in workers)
    columns = [("worker", "left"), ("health", "left"), ("running", "right")]
    columns += [("restarts", "right")] if restarted else []
    columns += [("message", "left")]
    rows = [[w.target, "healthy" if w.healthy else "unhealthy", f"{w.running}/{w.capacity}",
             *([str(w.restarts)] if restarted else []), w.message] for w in workers]
    return columns, rows


def workers_view(workers: Sequence[pb.WorkerStatus]) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    if not workers:
        return Text(_NO_WORKERS, style="yellow")
    table = Table(title="Training workers", title_justify="left")
    columns, rows = _workers_rows(workers)
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]  # rich wants a Literal; the column tables hold its values as str
    for cells in rows:
        health = Text(cells[1], style="green" if cells[1] == "healthy" else "bold red")
        table.add_row(cells[0], health, *cells[2:-1], escape(cells[-1]))
    return table


def models_table(models: Sequence[pb.RegisteredModel], now: datetime | None = None) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    if not models:
        return Text.assemble((_NO_MODELS, "bold"), f" {_NO_MODELS_NEXT}")
    table = Table(title="Registered models", title_justify="left")
    for col, justify in (("model", "left"), ("versions", "right"), ("latest", "right"),
                         ("production", "right"), ("staging", "right"), ("updated", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]  # rich wants a Literal; the column tables hold its values as str
    for m in models:
        table.add_row(m.name, str(m.version_count), version_label(m.latest_version),
                      Text(version_label(m.production_version), style="bold green" if m.production_version else ""),
                      version_label(m.staging_version), human_time(m.update_time, now))
    return table


def versions_table(versions: Sequence[pb.ModelVersion], title: str = "",
                   now: datetime | None = None) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    if not versions:
        return Text(f"No versions{' of ' + title if title else ''} match.")
    with_model = len({v.name for v in versions}) > 1
    metrics = [m for m in (*KEY_METRICS, *HORIZON_METRICS) if any(m in v.metrics for v in versions)]
    table = Table(title=title or None, title_justify="left")
    if with_model:
        table.add_column("model")
    table.add_column("version", justify="right")
    table.add_column("stage")
    table.add_column("aliases")
    for m in metrics:
        table.add_column(m, justify="right")
    table.add_column("registered")
    for v in versions:
        row: list[Any] = [v.name] if with_model else []
        row += [version_label(v.version), stage_text(v.stage), ", ".join(v.aliases) or "",
                *_metric_cells(v, metrics), human_time(v.create_time, now)]
        table.add_row(*row)
    return table


def version_view(mv: pb.ModelVersion, now: datetime | None = None) -> RenderableType:
    """One version in full: identity, times, every metric sorted, tags."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("model", mv.name)
    info.add_row("version", str(mv.version))
    info.add_row("stage", stage_text(mv.stage))
    info.add_row("aliases", ", ".join(mv.aliases) or _MISSING)
    info.add_row("run id", mv.run_id or _MISSING)
    info.add_row("model uri", mv.model_uri or _MISSING)
    info.add_row("source", escape(mv.source) or _MISSING)
    info.add_row("registered", absolute_time(mv.create_time, now))
    info.add_row("updated", absolute_time(mv.update_time, now))
    if mv.job_id:
        info.add_row("job", mv.job_id)
    if mv.description:
        info.add_row("description", escape(mv.description))
    lin = mv.lineage
    if lin.dataset or lin.code_version:  # versions registered before evaluation tags have none
        info.add_row("dataset", escape(lin.dataset) + (f" (target {lin.target})" if lin.target else ""))
        info.add_row("data", f"fingerprint {lin.data_fingerprint[:16]}, stations {escape(lin.stations)}")
        info.add_row("test rows", f"{lin.test_start} .. {lin.test_end}, key {lin.test_key[:16]}")
        info.add_row("code", escape(lin.code_version) + (f" (git {lin.git_commit[:12]})" if lin.git_commit else ""))
        if lin.members:
            info.add_row("members", escape(", ".join(lin.members)))
    parts: list[RenderableType] = [info]
    metrics = Table(title="metrics", title_justify="left")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for name in sorted(mv.metrics):
        metrics.add_row(name, fmt_metric(name, mv.metrics[name]))
    parts.append(metrics if mv.metrics else Text("metrics: none"))
    if mv.tags:
        tags = Table(title="tags", title_justify="left")
        tags.add_column("tag")
        tags.add_column("value")
        for key in sorted(mv.tags):
            tags.add_row(escape(key), escape(mv.tags[key]))
        parts.append(tags)
    return Group(*parts)


def baseline_for(metric: str) -> str:
    """The persistence baseline matching a ranking metric: ``baseline_rmse_h6`` for ``rmse_h6``."""
    return f"baseline_{metric}" if metric.startswith(("rmse", "mae")) else BASELINE_METRIC


def compare_columns(metric: str, metric_names: Iterable[str]) -> list[str]:
    """The metric columns of a comparison: the ranking one first when it is not a key one, the key
    ones, horizons, and the baseline of the ranking metric (else the overall one), each once."""
    present = set(metric_names)
    cols = [m for m in KEY_METRICS if m in present]
    if metric and metric not in cols and metric in present:
        cols.insert(0, metric)
    cols += [m for m in HORIZON_METRICS if m in present and m not in cols]
    baseline = baseline_for(metric) if baseline_for(metric) in present else BASELINE_METRIC
    if baseline in present:
        cols.append(baseline)
    return cols


def _column_title(col: str) -> str:
    if col == BASELINE_METRIC:
        return "baseline"
    if col.startswith("baseline_"):
        return "baseline " + col.removeprefix("baseline_").replace("rmse_h", "+").replace("mae_h", "mae +") \
            + (" h" if col.removeprefix("baseline_").startswith(("rmse_h", "mae_h")) else "")
    return col


def compare_table(name: str, resp: pb.CompareModelVersionsResponse, width: int | None = None) -> RenderableType:
    """The comparison; below 120 columns (``width``) only the ranking metric, rmse/mae/r2 and the baseline."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    metric = resp.metric or "rmse"
    if not resp.versions:
        return Text(f"{name}: no versions to compare.")
    cols = compare_columns(metric, resp.metric_names)
    if width is not None and width < 120:
        cols = [c for c in cols if c in (metric, "rmse", "mae", "r2") or c.startswith("baseline")]
    table = Table(title=Text.assemble((name, "bold"), f" — ranked by {metric} ({metric_direction(resp.direction)})"),
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    table.add_column("rank", justify="right")
    table.add_column("version", justify="right")
    table.add_column("stage")
    for col in cols:
        table.add_column(_column_title(col) + (" *" if col == metric else ""), justify="right", no_wrap=True)
    table.add_column("Δ best", justify="right")
    table.add_column("dataset")
    table.add_column("best")
    for row in resp.versions:
        mv = row.version
        best = resp.best_version != 0 and mv.version == resp.best_version
        delta = _MISSING if row.rank == 0 or math.isnan(row.delta_to_best) else f"{row.delta_to_best * 100:+.1f}%"
        mark = (Text("★ best", style="bold green") if best
                else Text("not comparable", style="yellow") if not row.comparable else "")
        table.add_row(str(row.rank) if row.rank else _MISSING, version_label(mv.version), stage_text(mv.stage),
                      *_metric_cells(mv, cols), delta, escape(row.dataset), mark,
                      style="bold" if best else ("dim" if not row.comparable else None))
    table.caption = (f"best: v{resp.best_version} by {metric}" if resp.best_version
                     else f"no version has the metric {metric!r}")
    if resp.reference_dataset:
        table.caption += f"; ranked on {resp.reference_dataset}"
    if any(not r.comparable for r in resp.versions):
        table.caption += "; versions marked not comparable were evaluated on other test data"
    table.caption_justify = "left"
    return table


def audit_table(events: Sequence[pb.AuditEvent], now: datetime | None = None) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    if not events:
        return Text("No audit events match.")
    table = Table(title="Audit log (newest first)", title_justify="left")
    for col in ("time", "actor", "action", "model", "version", "outcome", "message"):
        table.add_column(col)
    for e in events:
        outcome_style = {"ok": "green", "denied": "bold red", "failed": "red", "dry_run": "cyan"}.get(e.outcome, "")
        table.add_row(absolute_time(e.time, now), f"{e.actor}" + (f" ({e.role})" if e.role else ""), e.action,
                      e.model_name, version_label(e.version), Text(e.outcome, style=outcome_style), escape(e.message))
    return table


def jobs_table(jobs: Sequence[pb.RetrainJob], now: datetime | None = None) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    if not jobs:
        return Text("No retrain jobs match.")
    table = Table(title="Retrain jobs (newest first)", title_justify="left")
    for col in ("job", "model", "state", "progress", "version", "rmse", "worker", "created", "note"):
        table.add_column(col)
    for j in jobs:
        progress = f"{j.epoch}/{j.total_epochs}" if j.total_epochs else _MISSING
        note = j.error or (promotion_text(j.promotion) if j.HasField("promotion") else "")
        table.add_row(j.job_id, j.model_name or model_type_name(j.model_type), state_text(j.state), progress,
                      version_label(j.version), fmt_metric("rmse", j.metrics["rmse"]) if "rmse" in j.metrics
                      else _MISSING, j.worker or _MISSING, human_time(j.create_time, now), escape(note))
    return table


def requests_table(requests: Sequence[pb.PromotionRequest], now: datetime | None = None) -> RenderableType:
    """Promotion requests awaiting (or closed by) a second admin."""
    from rich.table import Table
    from rich.text import Text

    if not requests:
        return Text("No promotion requests match.")
    table = Table(title="Promotion requests (newest first)", title_justify="left")
    for col in ("id", "model", "version", "replaces", "state", "requested by", "created", "expires / closed", "reason"):
        table.add_column(col)
    styles = {"pending": "yellow", "approved": "green", "rejected": "red", "expired": "dim", "aborted_stale": "red"}
    for r in requests:
        state = pb.PromotionRequestState.Name(r.state).removeprefix("PROMOTION_REQUEST_STATE_").lower()
        closed = (f"{human_time(r.close_time, now)} by {r.closed_by}" if has_time(r.close_time)
                  else absolute_time(r.expire_time, now))
        why = r.reason + (f" / {r.close_reason}" if r.close_reason else "")
        table.add_row(r.id, r.model_name, version_label(r.version), version_label(r.expected_current_version),
                      Text(state, style=styles.get(state, "")), escape(r.requested_by), human_time(r.create_time, now),
                      escape(closed), escape(why))
    return table


# ---- retrain progress ----

def progress_fields(job: JobProgress) -> dict[str, Any]:
    """The text fields of a job's progress bar."""
    eta = eta_seconds(job)
    return {
        "loss": f"loss {job.loss:.4f}" if job.loss is not None else "",
        "val": f"val rmse {job.validation_rmse:.2f}" if job.validation_rmse is not None else "",
        "elapsed": (f"{job.elapsed:.0f} s" if job.elapsed is not None else "")
        + (f", ETA {human_delta(eta)}" if eta is not None else ""),
    }


def progress_line(job: JobProgress) -> str:
    """One line of a job's progress, for logs and pipes."""
    f = progress_fields(job)
    steps = f"{job.epoch}/{job.total}" if job.total else ""
    return "  ".join(p for p in (f"{job.job_id} {job.model_type}: {job.phase}", steps, f["loss"], f["val"],
                                 f["elapsed"]) if p)


def event_line(job: JobProgress, event: pb.RetrainEvent) -> str | None:
    """A one-line log of a notable event (state changes), or None for routine progress."""
    kind = event.WhichOneof("event")
    if kind == "progress" and event.progress.WhichOneof("event") in ("epoch", "evaluating", "registering",
                                                                     "data_loaded"):
        return None
    return f"{job.job_id} {job.model_type}: {job.phase}"


class RetrainView:
    """One rich progress bar per job, fed with RetrainEvents.

    The bar and the numbers keep their room at any width: the description (model and phase)
    takes what is left and ends with "…" when it does not fit. Off a terminal, state changes are
    printed as lines, and every running job's progress at least every ``heartbeat_seconds``.
    """

    def __init__(self, console: Console, heartbeat_seconds: float = 10.0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn  # retrain/watch only
        from rich.table import Column

        self.console = console
        self.jobs: dict[str, JobProgress] = {}
        width = console.width
        bar = 12 if width < 100 else 24
        numbers = 6 + 12 + 15 + 16  # M/N, loss, val rmse, "123 s, ETA 10 min"
        description = max(14, min(60, width - bar - numbers - 6))
        self.progress = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                 min_width=14, max_width=description)),
            BarColumn(bar_width=bar), MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}", table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[val]}", table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[elapsed]}", table_column=Column(no_wrap=True)),
            console=console, transient=False)
        self.tasks: dict[str, TaskID] = {}
        self.heartbeat_seconds = heartbeat_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_line = time.monotonic()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._started:
            self.progress.stop()

    _started = False

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat_seconds)):
            with self._lock:
                if time.monotonic() - self._last_line < self.heartbeat_seconds:
                    continue
                for job in self.jobs.values():
                    if not job.done:
                        self.console.print(escape(progress_line(job)), highlight=False)
                self._last_line = time.monotonic()

    def update(self, event: pb.RetrainEvent) -> JobProgress:
        with self._lock:
            if not self._started:
                # Started on the first event, so that a stream failing at once leaves no empty display.
                self.progress.start()
                self._started = True
                if not self.console.is_terminal:
                    threading.Thread(target=self._heartbeat, name="progress-heartbeat", daemon=True).start()
            job = apply_event(self.jobs, event)
            task = self.tasks.get(job.job_id)
            if task is None:
                task = self.tasks[job.job_id] = self.progress.add_task(job.description, total=job.total or None,
                                                                       **progress_fields(job))
            self.progress.update(task, description=job.description, total=job.total or None,
                                 completed=job.completed, **progress_fields(job))
            line = event_line(job, event)
            if line is not None and not self.console.is_terminal:
                # On a terminal the bars say it all; in logs and pipes the bars only show at the end.
                self.console.print(escape(line), highlight=False)
                self._last_line = time.monotonic()
            return job


def summary_table(jobs: Iterable[JobProgress]) -> Table:
    from rich.table import Table

    table = Table(title="Retrain summary", title_justify="left")
    for col in ("job", "model", "state", "new version", "test rmse", "promotion"):
        table.add_column(col)
    for j in jobs:
        table.add_row(j.job_id, j.model_type, state_text(j.state), version_label(j.version),
                      fmt_metric("rmse", j.metrics.get("rmse")), escape(j.error or j.promotion or _MISSING))
    return table


# ---- history ----

_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float]) -> str:
    """One block character per value, scaled between the smallest and the largest; a space for NaN."""
    finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    if not finite:
        return " " * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in values:
        if math.isnan(v) or math.isinf(v):
            out.append(" ")
        else:
            out.append(_SPARK[0 if span == 0 else round((v - lo) / span * (len(_SPARK) - 1))])
    return "".join(out)


def production_spans(resp: pb.GetModelHistoryResponse) -> dict[int, list[tuple[datetime, datetime | None]]]:
    """Each version's production periods (end None: still in production)."""
    spans: dict[int, list[tuple[datetime, datetime | None]]] = {}
    for p in resp.production_periods:
        spans.setdefault(p.version, []).append(
            (to_datetime(p.start_time), to_datetime(p.end_time) if has_time(p.end_time) else None))
    return spans


def history_view(name: str, resp: pb.GetModelHistoryResponse, now: datetime | None = None) -> RenderableType:
    """The history table (one row per version, production periods marked) and a sparkline of the metric."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    metric = resp.metric or "rmse"
    if not resp.points:
        return Text(f"{name}: no versions yet.")
    spans = production_spans(resp)
    table = Table(title=Text.assemble((name, "bold"), f" — {metric} per version, oldest first"),
                  title_justify="left")
    for col, justify in (("version", "right"), ("registered", "left"), ("stage", "left"), (metric, "right"),
                         ("in production", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]  # rich wants a Literal; the column tables hold its values as str
    for p in resp.points:
        periods = spans.get(p.version, [])
        when = "; ".join(f"{s:%Y-%m-%d %H:%M:%S} → " + (f"{e:%Y-%m-%d %H:%M:%S}" if e else "now")
                         for s, e in periods) or ""
        table.add_row(version_label(p.version), absolute_time(p.create_time, now), stage_text(p.stage),
                      fmt_metric(metric, p.metrics[metric]) if metric in p.metrics else _MISSING,
                      Text(when, style="bold green" if any(e is None for _, e in periods) else ""))
    values = [p.metrics.get(metric, math.nan) for p in resp.points]
    finite = [v for v in values if not math.isnan(v)]
    line = Text.assemble(f"{metric} ", (sparkline(values), "bold cyan"),
                         f"  v{resp.points[0].version}…v{resp.points[-1].version}")
    if finite:
        line.append(f"  min {fmt_metric(metric, min(finite))}  max {fmt_metric(metric, max(finite))}")
    return Group(table, line)


# ---- registry events and points in time ----

def parse_time(text: str, field: str = "at") -> datetime:
    """An ISO-8601 time (``2026-11-30T12:00:00Z``; without a zone: UTC) as an aware datetime."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidArgumentError(f"{field} {text!r} is not an ISO-8601 time, e.g. 2026-11-30T12:00:00Z",
                                   field=field) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def registry_event_line(e: pb.RegistryEvent) -> str:
    """``#42  2026-12-01 23:10:00 UTC  STAGE_CHANGED  aqi_predictor_lstm v7  staging -> production ...  by alice``."""
    kind = pb.RegistryEventType.Name(e.type).removeprefix("REGISTRY_EVENT_TYPE_")
    what = f"{escape(e.model_name)} {version_label(e.version)}" if e.version else escape(e.model_name)
    detail = ""
    if e.type in (pb.REGISTRY_EVENT_TYPE_STAGE_CHANGED, pb.REGISTRY_EVENT_TYPE_ROLLBACK):
        detail = f"{stage_name(e.from_stage)} -> {stage_name(e.to_stage)}"
        if e.replaced_versions:
            detail += ", replaces " + ", ".join(version_label(v) for v in e.replaced_versions)
        if e.archived_versions:
            detail += ", archives " + ", ".join(version_label(v) for v in e.archived_versions)
    elif e.type in (pb.REGISTRY_EVENT_TYPE_RETRAIN_JOB_ENDED, pb.REGISTRY_EVENT_TYPE_VERSION_REGISTERED):
        detail = f"job {e.job_id}"
        if e.type == pb.REGISTRY_EVENT_TYPE_RETRAIN_JOB_ENDED:
            detail += " " + job_state_name(e.job_state)
    elif e.type in (pb.REGISTRY_EVENT_TYPE_MODEL_HEALTH_CHANGED, pb.REGISTRY_EVENT_TYPE_ALERT_RAISED):
        detail = pb.ModelHealth.Name(e.health).removeprefix("MODEL_HEALTH_").lower()
        if e.alert_id:
            detail += f" (alert {e.alert_id[:12]})"
    elif e.promotion_request_id:
        detail = f"request {escape(e.promotion_request_id)}"
    return (f"#{e.sequence}  {to_datetime(e.time):%Y-%m-%d %H:%M:%S} UTC  [bold]{kind}[/]  {what}"
            + (f"  {detail}" if detail else "") + (f"  by {escape(e.actor)}" if e.actor else ""))


def held_view(resp: pb.GetModelVersionResponse, stage: str, now: datetime | None = None) -> RenderableType:
    """The version that held a stage at a point in time, with the period, then the version in full."""
    from rich.console import Group

    mv = resp.version
    since = absolute_time(resp.held_from, now) if resp.HasField("held_from") else "before the recorded history"
    until = absolute_time(resp.held_until, now) if resp.HasField("held_until") else "now (still holds it)"
    head = (f"[bold]{escape(mv.name)} {version_label(mv.version)}[/] held {escape(stage.lower())}\n"
            f"  from  {since}\n  until {until}\n")
    return Group(head, version_view(mv, now))
