"""Bad input: hypothesis sends every ModelRegistry RPC (and every TrainingWorker RPC) random and
hostile requests through the generated stubs and accepts only documented status codes.

Requests are built by reflection from each RPC's request descriptor, so an RPC added to the
proto is fuzzed without a change here: strings get empty, huge, unicode, path-like and
SQL-looking values (and the seeded model's name, to reach deeper code), integers their extremes,
enums unknown numbers, page tokens forged base64 and valid-looking JSON, timestamps any seconds.
Read-only RPCs must leave the registry exactly as it was; no RPC may answer INTERNAL or UNKNOWN,
and the server answers health checks throughout.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.server.jobs import jobs_factory
from conftest import Registry, realistic_metrics, start_registry
from google.protobuf import descriptor as _d
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "aqi_predictor_xgboost"
EXAMPLES = 60
QUIET_SECONDS = 0.25
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ABORTED", "ALREADY_EXISTS",
              "UNIMPLEMENTED", "RESOURCE_EXHAUSTED"}
STREAM_ONLY = {"DEADLINE_EXCEEDED"}  # a stream that is open and quiet when the test stops waiting
READ_ONLY = ("GetStatus", "ListModels", "ListModelVersions", "GetModelVersion", "CompareModelVersions",
             "ListAuditEvents", "GetRetrainJob", "ListRetrainJobs", "WatchRetrainJob", "GetModelHistory",
             "WatchAlerts")
REGISTRY = pb.DESCRIPTOR.services_by_name["ModelRegistry"]
WORKER = wpb.DESCRIPTOR.services_by_name["TrainingWorker"]
OVERSIZE = 17 * 1024 * 1024  # above the registry's 16 MiB receive limit
RAN: Counter[str] = Counter()

HOSTILE_NAMES = ["", " ", "../../etc/passwd", "..\\..\\windows\\system32", "/", ".", "..", "a/b/c", "%2e%2e%2f",
                 "name\x00null", "line\nbreak", "'; DROP TABLE aqimodels_audit; --", "\" OR 1=1 --",
                 "models:/aqi_predictor_xgboost@production", "runs:/x/model", "ünïcødé-模型-🚀", "\u202etxt.exe",
                 "x" * 257, "x" * 5000, MODEL, MODEL + " ", MODEL.upper(), "*", "%", "_"]
BAD_SPECS = ["../../etc/passwd", "/etc/passwd", "/dev/zero", "file:///etc/shadow", "synthetic:stations=0",
             "synthetic:stations=51", "synthetic:days=1", "synthetic:days=999999", "synthetic:bogus=1",
             "synthetic:stations=abc", "beijing:/nonexistent", "http://127.0.0.1:1/x.csv", "s3://bucket/x",
             "csv:" + "x" * 3000, "ünïcødé", "synthetic:stations=4,days=2,seed=-99999999999999999999"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


names = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=40),
                  st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=600))
tokens = st.one_of(
    st.just(""), st.text(max_size=60), st.binary(max_size=200).map(_b64),
    st.builds(lambda k, q: _b64(json.dumps({"k": k, "q": q}).encode()),
              st.lists(st.one_of(st.integers(), st.text(max_size=10), st.floats(allow_nan=False), st.none(),
                                 st.booleans()), max_size=4),
              st.one_of(st.text(max_size=16), st.integers())),
    st.builds(lambda v: _b64(json.dumps(v).encode()), st.one_of(st.integers(), st.lists(st.integers()), st.none())),
    st.just("A" * 3000))
int32s = st.one_of(st.sampled_from([0, -1, 1, 2, 3, 1000, 1001, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
int64s = st.one_of(int32s, st.sampled_from([2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308, -1e-308]))


def _scalar(field: _d.FieldDescriptor, overrides: dict[str, Any]) -> st.SearchStrategy[Any]:
    if field.name in overrides:
        return overrides[field.name]  # type: ignore[no-any-return]
    t = field.type
    if field.name == "page_token":
        return tokens
    if t == _d.FieldDescriptor.TYPE_STRING:
        return names
    if t == _d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=100)
    if t == _d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == _d.FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), int32s)
    if t in (_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT):
        return floats if t == _d.FieldDescriptor.TYPE_DOUBLE else st.floats(width=32)
    if t in (_d.FieldDescriptor.TYPE_INT64, _d.FieldDescriptor.TYPE_SINT64, _d.FieldDescriptor.TYPE_SFIXED64):
        return int64s
    if t in (_d.FieldDescriptor.TYPE_UINT64, _d.FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (_d.FieldDescriptor.TYPE_UINT32, _d.FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    return int32s


def message_strategy(desc: _d.Descriptor, cls: type[Message], depth: int = 0,
                     overrides: dict[str, Any] | None = None) -> st.SearchStrategy[Message]:
    """Any message of ``desc``: every field either unset or set to a hostile value."""
    overrides = overrides or {}
    if desc.full_name == "google.protobuf.Timestamp":
        return st.builds(lambda s, n: cls(seconds=s, nanos=n), int64s, int32s)
    if desc.full_name == "google.protobuf.Struct":
        return st.just(cls())
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"], {})
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                continue
            parts[field.name] = st.dictionaries(key, _scalar(value_field, {}), max_size=4)
            continue
        if field.message_type is not None:
            if depth >= 2:
                continue
            sub_cls = _message_class(field.message_type)
            sub = message_strategy(field.message_type, sub_cls, depth + 1, overrides)
        else:
            sub = _scalar(field, overrides)
        if field.is_repeated:
            sub = st.lists(sub, max_size=5)
        parts[field.name] = st.one_of(st.none(), sub)

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = desc.fields_by_name[name]
            try:
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    getattr(msg, name).update(value)
                elif field.is_repeated:
                    if field.message_type is not None:
                        for item in value:
                            getattr(msg, name).add().CopyFrom(item)
                    else:
                        getattr(msg, name).extend(value)
                elif field.message_type is not None:
                    getattr(msg, name).CopyFrom(value)
                else:
                    setattr(msg, name, value)
            except (ValueError, TypeError):
                continue  # a value the Python protobuf refuses to hold (e.g. a float out of float32)
        return msg

    return st.fixed_dictionaries(parts).map(build)


def _message_class(desc: _d.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)  # type: ignore[no-any-return]


def _first(stream: Any) -> None:
    try:
        next(stream, None)
    except grpc.RpcError:
        pass  # read from stream.code() by the caller


def call(channel: grpc.Channel, service: _d.ServiceDescriptor, method: _d.MethodDescriptor, request: Message,
         timeout: float = 10, quiet: float = QUIET_SECONDS) -> str:
    """Sends one request; the status code name (a stream is read to its first event, then cancelled)."""
    path = f"/{service.full_name}/{method.name}"
    response_cls = _message_class(method.output_type)
    RAN[method.name] += 1
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                          response_deserializer=response_cls.FromString)(request, timeout=timeout)
            # A refusal arrives at once; a stream that was accepted either sends an event soon or
            # stays quiet (an alert stream with nothing to say): both count as accepted.
            reader = threading.Thread(target=_first, args=(stream,), daemon=True)
            reader.start()
            reader.join(quiet)
            stream.cancel()
            reader.join(5)
            code = stream.code()
            return "OK" if code in (None, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) else code.name
        channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=response_cls.FromString)(request, timeout=timeout)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name  # type: ignore[no-any-return]


def _accept(method: _d.MethodDescriptor, code: str, request: Message) -> None:
    allowed = DOCUMENTED | (STREAM_ONLY if method.server_streaming else set())
    assert code in allowed, f"{method.name} answered {code} to {str(request)[:500]!r}"


def _snapshot(reg: Registry) -> Any:
    client = reg.client
    models = sorted((m.model.name, sorted(m.model.aliases.items()) if hasattr(m.model, "aliases") else None)
                    for m in client.status().models)  # type: ignore[attr-defined]
    versions = {name: [(v.version, v.stage, sorted(v.tags.items()), sorted(v.aliases))
                       for v in client.iter_versions(name)]  # type: ignore[attr-defined]
                for name, _ in models}
    audit = [(e.id, e.outcome) for e in client.iter_audit_events()]  # type: ignore[attr-defined]
    jobs = [(j.job_id, j.state) for j in client.list_jobs(page_size=1000).jobs]  # type: ignore[attr-defined]
    return models, versions, audit, jobs


def _serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def fuzz_registry(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> Iterator[Registry]:
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copy(_sqlite_template, folder / "mlflow.db")
    reg = start_registry(f"sqlite:///{folder}/mlflow.db", jobs_factory=jobs_factory)  # no worker: jobs queue
    v1, v2, v3 = reg.seed(MODEL, [realistic_metrics(i) for i in range(3)])
    reg.client.promote(MODEL, v1, "production")  # type: ignore[attr-defined]
    reg.client.promote(MODEL, v2, "production")  # type: ignore[attr-defined]
    reg.client.promote(MODEL, v3, "staging")  # type: ignore[attr-defined]
    try:
        yield reg
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def channel(fuzz_registry: Registry) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(fuzz_registry.target, options=[("grpc.max_send_message_length", -1),
                                                              ("grpc.max_receive_message_length", 64 << 20)])
    try:
        yield ch
    finally:
        ch.close()


def _fuzz(channel: grpc.Channel, service: _d.ServiceDescriptor, method: _d.MethodDescriptor,
          overrides: dict[str, Any] | None = None, examples: int = EXAMPLES, after: Any = None) -> None:
    strategy = message_strategy(method.input_type, _message_class(method.input_type), overrides=overrides)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(request: Message) -> None:
        code = call(channel, service, method, request)
        _accept(method, code, request)
        if after is not None:
            after(method, code, request)

    run()


def test_read_only_rpcs_answer_only_documented_codes_and_change_nothing(fuzz_registry: Registry,
                                                                       channel: grpc.Channel) -> None:
    before = _snapshot(fuzz_registry)
    start = dict(RAN)
    for name in READ_ONLY:
        _fuzz(channel, REGISTRY, REGISTRY.methods_by_name[name])
    assert _serving(channel)
    assert _snapshot(fuzz_registry) == before
    print("\nread-only RPCs, examples run: " + ", ".join(f"{n}={RAN[n] - start.get(n, 0)}" for n in READ_ONLY))


def test_mutating_rpcs_answer_only_documented_codes(fuzz_registry: Registry, channel: grpc.Channel) -> None:
    client = fuzz_registry.client
    created: set[str] = set()

    def tidy(method: _d.MethodDescriptor, code: str, request: Message) -> None:
        # keep the model's queue free so that later Retrain examples reach their validation
        for job in client.list_jobs(page_size=100).jobs:  # type: ignore[attr-defined]
            if job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING):
                created.add(job.job_id)
                client.cancel_job(job.job_id, "fuzz")  # type: ignore[attr-defined]

    mutating = [m for m in REGISTRY.methods if m.name not in READ_ONLY]
    assert {m.name for m in mutating} >= {"PromoteModelVersion", "RollbackModel", "CleanupModelVersions",
                                          "Retrain", "CancelRetrainJob"}
    start = dict(RAN)
    for method in mutating:
        overrides = {"dataset": st.builds(wpb.DatasetSpec, spec=st.one_of(st.sampled_from(BAD_SPECS + ["synthetic"]),
                                                                           st.text(max_size=30)))}
        _fuzz(channel, REGISTRY, method, overrides, after=tidy if method.name == "Retrain" else None)
        assert _serving(channel), f"the registry stopped serving after {method.name}"
    print("\nmutating RPCs, examples run: " + ", ".join(f"{m.name}={RAN[m.name] - start.get(m.name, 0)}"
                                                        for m in mutating))
    assert client.status().backend.healthy  # type: ignore[attr-defined]
    prod = [v.version for v in client.iter_versions(MODEL, stage="production")]  # type: ignore[attr-defined]
    assert len(prod) <= 1


def test_every_rpc_refuses_an_oversize_message_with_resource_exhausted(fuzz_registry: Registry,
                                                                        channel: grpc.Channel) -> None:
    huge = "x" * OVERSIZE
    for method in REGISTRY.methods:
        cls = _message_class(method.input_type)
        field = next((f for f in method.input_type.fields if f.type == _d.FieldDescriptor.TYPE_STRING
                      and not f.is_repeated), None)
        if field is None:
            continue  # a request without a string field (GetStatus) cannot be made oversize this way
        request = cls(**{field.name: huge})
        assert call(channel, REGISTRY, method, request, quiet=10) == "RESOURCE_EXHAUSTED", method.name
    assert _serving(channel)


def test_training_worker_rpcs_answer_only_documented_codes(tmp_path: Path, _sqlite_template: Path) -> None:
    from aqimodels.training.main import create_worker
    from aqimodels.training.servicer import WorkerConfig

    shutil.copy(_sqlite_template, tmp_path / "mlflow.db")
    server, port, _servicer = create_worker(WorkerConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
                                            "127.0.0.1:0")
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
    try:
        start = dict(RAN)
        # never a dataset that trains for real: the fuzzing is about input handling
        overrides = {"dataset": st.builds(wpb.DatasetSpec, spec=st.one_of(st.sampled_from(BAD_SPECS),
                                                                           st.text(min_size=1, max_size=30)))}
        for method in WORKER.methods:
            _fuzz(ch, WORKER, method, overrides)
            assert _serving(ch)
        huge = wpb.TrainRequest(job_id="job-x", model_type=wpb.MODEL_TYPE_XGBOOST,
                                dataset=wpb.DatasetSpec(spec="x" * OVERSIZE))
        assert call(ch, WORKER, WORKER.methods_by_name["Train"], huge, quiet=10) == "RESOURCE_EXHAUSTED"
        print("\nworker RPCs, examples run: " + ", ".join(f"{m.name}={RAN[m.name] - start.get(m.name, 0)}"
                                                          for m in WORKER.methods))
    finally:
        ch.close()
        server.stop(1).wait()


def test_every_registry_rpc_is_fuzzed() -> None:
    """Guards the lists above: a new RPC lands in one of the two fuzz tests."""
    assert set(READ_ONLY) <= {m.name for m in REGISTRY.methods}
    assert not math.isnan(EXAMPLES)
