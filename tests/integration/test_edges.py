"""Every outside edge answers clearly (issue 13): bytes that are not protobuf, huge strings,
error messages quoting huge inputs, and grpc.health.v1.Health/List.

Raw bytes go through real channels to a real registry and a real worker, both with a token file:
no caller ever sees INTERNAL, authentication comes first, a refused body is one structured log
line with the request id, and a refused change is on the audit trail.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import RegistryClient
from aqimodels.client.tokens import new_token, toml_entry
from aqimodels.server.auth import RPC_ROLES
from aqimodels.training.main import create_worker
from aqimodels.training.servicer import WorkerConfig
from conftest import Registry, start_registry
from google.protobuf import descriptor as _d
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Bodies no request message parses: truncated and overlong varints, field number 0, wire types 6
# and 7, an unterminated group, a length running past the end.
HOSTILE: dict[str, bytes] = {
    "truncated varint": b"\x08\xff",
    "overlong varint": b"\x08" + b"\xff" * 10 + b"\x01",
    "field number 0": b"\x00",
    "wire type 6": b"\x0e\x00",
    "wire type 7": b"\x0f\x00",
    "unterminated group": b"\x0b\x08\x01",
    "length past the end": b"\x0a\x7fabc",
}


def _request_class(method: str) -> Any:
    service, rpc = method.strip("/").rsplit("/", 1)
    proto = pb if "ModelRegistry" in service else wpb
    desc = proto.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods_by_name[rpc]
    return desc.input_type


def _bad_utf8(desc: _d.Descriptor) -> bytes | None:
    """A body whose first string field holds invalid UTF-8 (None when the message has no string field)."""
    for field in desc.fields:
        if field.type == _d.FieldDescriptor.TYPE_STRING:
            return bytes([(field.number << 3) | 2, 2]) + b"\xff\xfe"
    return None


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    token = new_token()
    path.write_text(toml_entry("edge-admin", "admin", token))
    return str(path), token


@pytest.fixture(scope="module")
def edge_registry(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path,
                  tokens: tuple[str, str]) -> Iterator[Registry]:
    folder = tmp_path_factory.mktemp("edges")
    shutil.copy(_sqlite_template, folder / "mlflow.db")
    reg = start_registry(f"sqlite:///{folder}/mlflow.db", tokens_file=tokens[0])
    yield reg
    reg.client.close()  # type: ignore[attr-defined]
    reg.server.stop(1)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def edge_worker(tokens: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("edge-worker")
    server, port, _ = create_worker(WorkerConfig(tracking_uri=f"sqlite:///{folder}/mlflow.db", port=0,
                                                 tokens_file=tokens[0]), "127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _raw_call(channel: grpc.Channel, method: str, body: bytes, token: str | None) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    md = (("authorization", f"Bearer {token}"),) if token else ()
    streaming = method.rsplit("/", 1)[1] in ("WatchRetrainJob", "WatchAlerts", "Retrain", "Train")
    try:
        if streaming:
            call = channel.unary_stream(method)(body, metadata=md, timeout=10)
            for _ in call:
                call.cancel()
                return grpc.StatusCode.OK, "", {}
            return call.code(), call.details() or "", dict(call.trailing_metadata() or ())
        _, call = channel.unary_unary(method).with_call(body, metadata=md, timeout=10)
        return grpc.StatusCode.OK, "", dict(call.trailing_metadata() or ())
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ())


def test_bytes_that_are_not_protobuf_answer_invalid_argument_after_authentication(
        edge_registry: Registry, edge_worker: str, tokens: tuple[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="grpc")
    token = tokens[1]
    seen = 0
    with structlog.testing.capture_logs() as logs:
        for method in RPC_ROLES:
            target = edge_registry.target if "ModelRegistry" in method else edge_worker
            desc = _request_class(method)
            bodies = dict(HOSTILE)
            utf8 = _bad_utf8(desc)
            if utf8 is not None:
                bodies["invalid UTF-8 in a string field"] = utf8
            with grpc.insecure_channel(target) as channel:
                for what, body in bodies.items():
                    code, _, _ = _raw_call(channel, method, body, None)
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (method, what, code)
                    code, details, trailing = _raw_call(channel, method, body, token)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, what, code, details)
                    assert details == f"request is not a valid {desc.name}", (method, what, details)
                    assert len(trailing.get("x-request-id", "")) == 32, (method, what, trailing)
                    seen += 1
    assert seen > len(HOSTILE) * len(RPC_ROLES)
    finished = [e for e in logs if e["event"] == "rpc_finished" and e.get("code") == "INVALID_ARGUMENT"]
    assert len(finished) == seen  # one structured line per refused body
    assert not [e for e in logs if e["event"] == "rpc_failed_unexpectedly"]
    assert not [r for r in caplog.records if "deserializ" in r.getMessage().lower()]


def test_a_refused_change_is_audited_with_its_request_id(edge_registry: Registry, tokens: tuple[str, str]) -> None:
    with grpc.insecure_channel(edge_registry.target) as channel:
        method = "/aqimodels.api.registry.v1.ModelRegistry/PromoteModelVersion"
        code, details, trailing = _raw_call(channel, method, HOSTILE["wire type 7"], tokens[1])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    client = RegistryClient(edge_registry.target, token=tokens[1], timeout=10)
    found = [e for e in client.iter_audit_events(actor="edge-admin")  # type: ignore[attr-defined]
             if e.request_id == trailing["x-request-id"]]
    assert [(e.action, e.outcome, e.message) for e in found] == [
        ("PromoteModelVersion", "rejected", details)]
    client.close()


def test_health_list_and_bad_health_bytes(edge_registry: Registry, edge_worker: str) -> None:
    for target, service in ((edge_registry.target, "aqimodels.api.registry.v1.ModelRegistry"),
                            (edge_worker, "aqimodels.api.training.v1.TrainingWorker")):
        with grpc.insecure_channel(target) as channel:
            listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
            assert listed.statuses[service].status == health_pb2.HealthCheckResponse.SERVING
            assert "" in listed.statuses
            code, details, _ = _raw_call(channel, "/grpc.health.v1.Health/Check", HOSTILE["wire type 6"], None)
            assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid HealthCheckRequest")
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=5)
            assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()


def _code_details(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            for _ in result:
                break
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def test_every_string_field_is_capped_at_the_edge(edge_registry: Registry, edge_worker: str,
                                                  tokens: tuple[str, str]) -> None:
    from aqimodels.api.registry.v1 import registry_pb2_grpc
    from aqimodels.api.training.v1 import worker_pb2_grpc

    md = (("authorization", f"Bearer {tokens[1]}"),)
    huge = "x" * 100_000
    with grpc.insecure_channel(edge_registry.target) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        cases = [
            (lambda: stub.ListAuditEvents(pb.ListAuditEventsRequest(model_name=huge), metadata=md, timeout=10),
             "model_name is longer than 256 characters"),
            (lambda: stub.ListAuditEvents(pb.ListAuditEventsRequest(actor=huge), metadata=md, timeout=10),
             "actor is longer than 256 characters"),
            (lambda: stub.ListRetrainJobs(pb.ListRetrainJobsRequest(model_name=huge), metadata=md, timeout=10),
             "model_name is longer than 256 characters"),
            (lambda: stub.PromoteModelVersion(pb.PromoteModelVersionRequest(name="m", version=1, reason=huge),
                                              metadata=md, timeout=10),
             "reason is longer than 4096 characters"),
        ]
        for call, message in cases:
            assert _code_details(call) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    with grpc.insecure_channel(edge_worker) as channel:
        wstub = worker_pb2_grpc.TrainingWorkerStub(channel)
        code, details = _code_details(lambda: wstub.ValidateDataset(
            wpb.ValidateDatasetRequest(dataset=wpb.DatasetSpec(spec=huge)), metadata=md, timeout=10))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "dataset.spec is longer than 4096 characters")
        code, details = _code_details(lambda: wstub.Train(
            wpb.TrainRequest(job_id="j", model_type=wpb.MODEL_TYPE_XGBOOST, tags={"k": huge}), metadata=md,
            timeout=10))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "tags[k] is longer than 4096 characters")


def test_error_messages_quote_at_most_200_characters_of_an_input(edge_worker: str, tokens: tuple[str, str]) -> None:
    """A spec just under its cap: the worker's answer quotes 200 characters of it, then "…"."""
    from aqimodels.api.training.v1 import worker_pb2_grpc

    md = (("authorization", f"Bearer {tokens[1]}"),)
    with grpc.insecure_channel(edge_worker) as channel:
        stub = worker_pb2_grpc.TrainingWorkerStub(channel)
        for spec in ("nonsense:" + "y" * 4000, "/no/such/" + "z" * 4000, "synthetic:" + "w" * 4000):
            code, details = _code_details(lambda spec=spec: stub.ValidateDataset(  # type: ignore[misc]
                wpb.ValidateDatasetRequest(dataset=wpb.DatasetSpec(spec=spec)), metadata=md, timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (spec[:20], code, details)
            assert "…" in details and len(details) < 500, (spec[:20], len(details), details[:300])


def test_times_in_mlflow_tags_are_iso_8601_utc(sqlite_registry: Registry) -> None:
    import re

    from aqimodels.server.domain import tag_time_ms

    name = "aqi_predictor_lstm"
    v1, v2 = sqlite_registry.seed(name, [{"rmse": 20.0}, {"rmse": 19.0}])
    client = sqlite_registry.client
    client.promote(name, v1, "production")  # type: ignore[attr-defined]
    client.promote(name, v2, "production")  # type: ignore[attr-defined]
    promoted = client.get_version(name, v2).tags["aqimodels.promoted_time"]  # type: ignore[attr-defined]
    archived = client.get_version(name, v1).tags["aqimodels.archived_time"]  # type: ignore[attr-defined]
    for value in (promoted, archived):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value), value
        assert tag_time_ms(value) is not None
    history = client.history(name)  # type: ignore[attr-defined]
    assert [p.version for p in history.production_periods] == [v1, v2]  # the monitor reads them back
