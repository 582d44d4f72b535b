"""Converters between domain dataclasses and protobuf messages (``x_to_proto`` / ``x_from_proto``)."""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.server.domain import AuditRecord, BackendHealth, ModelVersion, RegisteredModel, Stage
from aqimodels.process.interceptors import Wire
from aqimodels.server.monitoring import Alert, Health, History
from aqimodels.server import promotion_policy
from aqimodels.server.service import Comparison, ModelStatusView


def ts_from_ms(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if ms:
        ts.FromMilliseconds(ms)
    return ts


def ms_from_ts(ts: timestamp_pb2.Timestamp, field: str = "time") -> int:
    """Milliseconds since the epoch; INVALID_ARGUMENT for a timestamp outside protobuf's valid range."""
    try:
        return int(ts.ToMilliseconds())
    except (ValueError, OverflowError):
        raise InvalidArgumentError(f"{field} is not a valid timestamp (seconds {ts.seconds}, nanos {ts.nanos})",
                                   field=field) from None


def stage_to_proto(stage: Stage) -> pb.Stage.ValueType:
    return pb.Stage.ValueType(stage.value)


def stage_from_proto(value: int) -> Stage | None:
    """None for STAGE_UNSPECIFIED (no filter); unknown numbers map to None too and are checked by callers."""
    try:
        return Stage(value)
    except ValueError:
        return None


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def model_version_to_proto(v: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion.FromString(_version_bytes(v))


def _version_bytes(v: ModelVersion) -> bytes:
    """The version's message in wire format, built per answer (about 5 us with 27 metrics).

    The bytes were once kept on every version: about 750 bytes each, more than the rest of the
    version, to save 5 us a version; a model's status keeps its three versions' bytes instead
    (``model_status_field``), pages and comparisons build theirs (bench/NOTES.md).
    """
    return pb.ModelVersion(
        name=v.name, version=v.version, stage=stage_to_proto(v.stage), aliases=list(v.aliases),
        run_id=v.run_id, model_uri=v.model_uri, source=v.source,
        create_time=ts_from_ms(v.create_time_ms), update_time=ts_from_ms(v.update_time_ms),
        metrics=_finite(v.metrics), tags=v.tags, description=v.description,
        job_id=v.job_id, lineage=lineage_to_proto(v)).SerializeToString()


def lineage_to_proto(v: ModelVersion) -> pb.VersionLineage:
    """The version's lineage, read from the tags the worker wrote (``promotion_policy.LINEAGE_TAGS``)."""
    fields = {k: v.tags.get(tag, "") for k, tag in promotion_policy.LINEAGE_TAGS.items() if k != "members"}
    members = [m for m in v.tags.get(promotion_policy.LINEAGE_TAGS["members"], "").split(",") if m]
    return pb.VersionLineage(run_id=v.run_id, members=members, **fields)


def versions_page_wire(versions: list[ModelVersion], next_page_token: str, total_size: int) -> Wire:
    """A ListModelVersionsResponse in wire format, written around each version's kept bytes."""
    return Wire(b"".join(_field(1, _version_bytes(v)) for v in versions)  # versions = 1
                + pb.ListModelVersionsResponse(next_page_token=next_page_token,
                                               total_size=total_size).SerializeToString())


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a nested message) in wire format."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def registered_model_to_proto(m: RegisteredModel) -> pb.RegisteredModel:
    return pb.RegisteredModel(
        name=m.name, description=m.description, create_time=ts_from_ms(m.create_time_ms),
        update_time=ts_from_ms(m.update_time_ms), version_count=m.version_count,
        latest_version=m.latest_version, production_version=m.production_version,
        staging_version=m.staging_version)


def backend_to_proto(h: BackendHealth) -> pb.BackendStatus:
    return pb.BackendStatus(healthy=h.healthy, tracking_uri=h.tracking_uri, message=h.message,
                            latency_ms=h.latency_ms)


def model_status_to_proto(view: ModelStatusView) -> pb.ModelStatus:
    snap = view.snapshot
    prod, staging = snap.alias("production"), snap.alias("staging")
    latest = snap.versions[0] if snap.versions else None
    if view.degraded:
        health = pb.MODEL_HEALTH_DEGRADED
    elif prod is None:
        health = pb.MODEL_HEALTH_NO_PRODUCTION
    else:
        health = pb.MODEL_HEALTH_HEALTHY
    status = pb.ModelStatus(model=registered_model_to_proto(snap.model), health=health,
                            running_jobs=list(view.running_jobs))
    if prod is not None:
        status.production.MergeFromString(_version_bytes(prod))
    if staging is not None:
        status.staging.MergeFromString(_version_bytes(staging))
    if latest is not None:
        status.latest.MergeFromString(_version_bytes(latest))
        status.last_training_time.CopyFrom(ts_from_ms(latest.create_time_ms))
    return status


def model_status_field(view: ModelStatusView) -> bytes:
    """The model's status as a ``models`` field (number 1) of GetStatusResponse, in wire format;
    kept on its (immutable) snapshot while no job runs for the model."""
    kept: tuple[bool, bytes] | None = view.snapshot.__dict__.get("_status_field")
    if kept is not None and kept[0] == view.degraded and not view.running_jobs:
        return kept[1]
    data = _field(1, model_status_to_proto(view).SerializeToString())
    if not view.running_jobs:  # their progress moves: built each time while jobs run
        object.__setattr__(view.snapshot, "_status_field", (view.degraded, data))  # frozen: a cache, not a field
    return data


def status_wire(views: list[ModelStatusView], health: BackendHealth, workers: list[pb.WorkerStatus],
                server_version: str, next_page_token: str = "", total_size: int = 0) -> Wire:
    """A GetStatusResponse in wire format: every model's kept status, then the parts that move."""
    now = time.time_ns()
    rest = pb.GetStatusResponse(backend=backend_to_proto(health), workers=workers, server_version=server_version,
                                time=timestamp_pb2.Timestamp(seconds=now // 1_000_000_000, nanos=now % 1_000_000_000),
                                next_page_token=next_page_token, total_size=total_size)
    return Wire(b"".join([model_status_field(v) for v in views]) + rest.SerializeToString())


def comparison_wire(c: Comparison) -> Wire:
    """A CompareModelVersionsResponse in wire format, written around each version's kept bytes.

    Building 1,000 nested messages in Python was most of the RPC's time, then parsing the
    written bytes into a message and serialising it back for grpc most of the rest.
    """
    # VersionComparison: version = 1 (message), rank = 2 (varint), value = 3, delta_to_best = 4 (doubles),
    # comparable = 5 (varint), dataset = 6 (string).
    parts = []
    for v, rank, value, delta in c.rows:
        entry = _field(1, _version_bytes(v)) + b"\x10" + _varint(rank & 0xFFFFFFFFFFFFFFFF) + \
            _DOUBLES.pack(0x19, value, 0x21, delta) + \
            (b"\x28\x01" if v.version not in c.not_comparable else b"") + \
            _field(6, promotion_policy.dataset_label(v).encode())
        parts.append(_field(1, entry))  # versions = 1
    parts.append(pb.CompareModelVersionsResponse(
        metric=c.metric,
        direction=(pb.METRIC_DIRECTION_HIGHER_IS_BETTER if c.higher_is_better
                   else pb.METRIC_DIRECTION_LOWER_IS_BETTER),
        best_version=c.best_version, metric_names=c.metric_names,
        reference_dataset=c.reference_dataset).SerializeToString())
    return Wire(b"".join(parts))


_DOUBLES = struct.Struct("<BdBd")


def struct_from_dict(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()})
    return s


def audit_to_proto(r: AuditRecord) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=r.id, time=ts_from_ms(r.time_ms), actor=r.actor, role=r.role, action=r.action,
        model_name=r.model_name, version=r.version, before=struct_from_dict(r.before),
        after=struct_from_dict(r.after), outcome=r.outcome, request_id=r.request_id, message=r.message,
        sequence=r.sequence)


def history_to_proto(h: History) -> pb.GetModelHistoryResponse:
    return pb.GetModelHistoryResponse(
        metric=h.metric,
        points=[pb.HistoryPoint(version=p.version, create_time=ts_from_ms(p.create_time_ms),
                                metrics=_finite(p.metrics), stage=stage_to_proto(p.stage)) for p in h.points],
        production_periods=[pb.ProductionPeriod(version=p.version, start_time=ts_from_ms(p.start_ms),
                                                end_time=ts_from_ms(p.end_ms) if p.end_ms else None)
                            for p in h.periods])


def health_to_proto(health: Health) -> pb.ModelHealth.ValueType:
    return pb.ModelHealth.ValueType(health.value)


def alert_to_proto(a: Alert) -> pb.Alert:
    return pb.Alert(id=a.id, time=ts_from_ms(a.time_ms), model_name=a.model_name, version=a.version,
                    health=health_to_proto(a.health), ratio=a.ratio, message=a.message)
