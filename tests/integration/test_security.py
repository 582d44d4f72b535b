"""Tokens and roles, TLS and mutual TLS, denials audited, refusing to run open off loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Certs, Registry, make_certs, start_registry
from typer.testing import CliRunner

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.registry.v1 import registry_pb2_grpc
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.api.training.v1 import worker_pb2_grpc
from aqimodels.client import RegistryClient
from aqimodels.client.cli import app
from aqimodels.client.tokens import ROLES, new_token, toml_entry
from aqimodels.server.auth import MUTATING_RPCS, RPC_ROLES
from aqimodels.server.config import ConfigError, ServerConfig
from aqimodels.training.main import create_worker
from aqimodels.training.servicer import WorkerConfig

AQIMODELS = str(Path(sys.executable).with_name("aqimodels"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """A token file with one token per role; returns its path and role -> token."""
    folder = tmp_path_factory.mktemp("tokens")
    by_role = {role: new_token() for role in ROLES}
    path = folder / "tokens.toml"
    path.write_text("".join(toml_entry(f"{role}-bot", role, tok) for role, tok in by_role.items()))
    return str(path), by_role


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path,
            tokens: tuple[str, dict[str, str]]) -> Iterator[Registry]:
    import shutil

    folder = tmp_path_factory.mktemp("secured")
    shutil.copy(_sqlite_template, folder / "mlflow.db")
    reg = start_registry(f"sqlite:///{folder}/mlflow.db", tokens_file=tokens[0])
    reg.seed("aqi_predictor_lstm", [{"rmse": 20.0}, {"rmse": 19.0}])
    yield reg
    reg.client.close()  # type: ignore[attr-defined]
    reg.server.stop(1)  # type: ignore[attr-defined]


def test_the_role_table_covers_every_rpc_of_both_services() -> None:
    methods = {f"/{s.full_name}/{m.name}" for proto in (pb, wpb) for s in proto.DESCRIPTOR.services_by_name.values()
               for m in s.methods}
    assert methods == set(RPC_ROLES)
    assert set(RPC_ROLES.values()) <= set(ROLES)


def _requests() -> dict[str, Any]:
    """A harmless request for every registry RPC (authorised calls may still fail validation)."""
    return {
        "GetStatus": pb.GetStatusRequest(), "ListModels": pb.ListModelsRequest(),
        "ListModelVersions": pb.ListModelVersionsRequest(name="aqi_predictor_lstm"),
        "GetModelVersion": pb.GetModelVersionRequest(name="aqi_predictor_lstm", version=1),
        "CompareModelVersions": pb.CompareModelVersionsRequest(name="aqi_predictor_lstm"),
        "ListAuditEvents": pb.ListAuditEventsRequest(), "GetRetrainJob": pb.GetRetrainJobRequest(job_id="job-x"),
        "ListRetrainJobs": pb.ListRetrainJobsRequest(), "WatchRetrainJob": pb.WatchRetrainJobRequest(job_id="job-x"),
        "GetModelHistory": pb.GetModelHistoryRequest(name="ghost"), "WatchAlerts": pb.WatchAlertsRequest(model_name="ghost"),
        "Retrain": pb.RetrainRequest(model_types=[99]), "CancelRetrainJob": pb.CancelRetrainJobRequest(job_id="job-x"),
        "ReportPerformance": pb.ReportPerformanceRequest(name="ghost", version=1),
        "PromoteModelVersion": pb.PromoteModelVersionRequest(name="ghost", version=1, stage=pb.STAGE_STAGING),
        "RollbackModel": pb.RollbackModelRequest(name="ghost"),
        "CleanupModelVersions": pb.CleanupModelVersionsRequest(name="ghost", keep_last=1, dry_run=True),
        "SetApprovalPolicy": pb.SetApprovalPolicyRequest(model_name="ghost", required=False),
        "GetApprovalPolicy": pb.GetApprovalPolicyRequest(model_name="ghost"),
        "ListPromotionRequests": pb.ListPromotionRequestsRequest(),
        "ApprovePromotion": pb.ApprovePromotionRequest(id="no-such-request"),
        "RejectPromotion": pb.RejectPromotionRequest(id="no-such-request"),
        "GetWorkerInfo": wpb.GetWorkerInfoRequest(), "ValidateDataset": wpb.ValidateDatasetRequest(
            dataset=wpb.DatasetSpec(spec="nonsense:x")), "Train": wpb.TrainRequest(),
        "AttachTraining": wpb.AttachTrainingRequest(job_id="job-x"),
        "CancelTraining": wpb.CancelTrainingRequest(job_id="job-x"),
        "WatchRegistryEvents": pb.WatchRegistryEventsRequest(replay_only=True),
        "CreateWebhook": pb.CreateWebhookRequest(url="ftp://x"), "ListWebhooks": pb.ListWebhooksRequest(),
        "DeleteWebhook": pb.DeleteWebhookRequest(webhook_id="0" * 32),
        "TestWebhook": pb.TestWebhookRequest(webhook_id="0" * 32),
        "ListWebhookDeliveries": pb.ListWebhookDeliveriesRequest(webhook_id="0" * 32),
        "RedeliverWebhook": pb.RedeliverWebhookRequest(webhook_id="0" * 32, event_sequence=1),
    }


def _call(channel: grpc.Channel, method: str, request: Any, token: str | None) -> grpc.StatusCode:
    service, rpc = method.strip("/").split("/")
    stub: Any = (registry_pb2_grpc.ModelRegistryStub(channel) if service.endswith("ModelRegistry")
                 else worker_pb2_grpc.TrainingWorkerStub(channel))
    md = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        result = getattr(stub, rpc)(request, metadata=md, timeout=10)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            for _ in result:
                result.cancel()
                break
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@pytest.fixture(scope="module")
def secured_worker(tokens: tuple[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("worker")
    server, port, _ = create_worker(WorkerConfig(tracking_uri=f"sqlite:///{folder}/mlflow.db", port=0,
                                                 tokens_file=tokens[0]), "127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_walk_the_whole_role_table(secured: Registry, secured_worker: str, tokens: tuple[str, dict[str, str]]) -> None:
    """Every RPC, streaming ones included: no or unknown token -> UNAUTHENTICATED, a role below the
    table's -> PERMISSION_DENIED, the table's role and above -> past authentication."""
    by_role = tokens[1]
    requests = _requests()
    for method, needed in RPC_ROLES.items():
        target = secured.target if "ModelRegistry" in method else secured_worker
        with grpc.insecure_channel(target) as channel:
            request = requests[method.rsplit("/", 1)[1]]
            assert _call(channel, method, request, None) == grpc.StatusCode.UNAUTHENTICATED, method
            assert _call(channel, method, request, "aqm_forged") == grpc.StatusCode.UNAUTHENTICATED, method
            for role, token in by_role.items():
                code = _call(channel, method, request, token)
                if ROLES[role] < ROLES[needed]:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (method, role, code)
                else:
                    assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                                        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method, role, code)


def test_denials_are_audited_with_the_callers_name(secured: Registry, tokens: tuple[str, dict[str, str]]) -> None:
    by_role = tokens[1]
    with RegistryClient(secured.target, token=by_role["viewer"]) as viewer:
        with pytest.raises(Exception) as info:
            viewer.promote("aqi_predictor_lstm", 1, "production")
        assert info.value.code.name == "PERMISSION_DENIED"  # type: ignore[attr-defined]
        assert "admin" in str(info.value)
    with RegistryClient(secured.target) as nobody:
        with pytest.raises(Exception) as info:
            nobody.status()
        assert info.value.code.name == "UNAUTHENTICATED"  # type: ignore[attr-defined]
    with RegistryClient(secured.target, token=by_role["admin"]) as admin:
        events = list(admin.iter_audit_events())
        admin.promote("aqi_predictor_lstm", 2, "production")
        ok = list(admin.iter_audit_events(actor="admin-bot"))
    denied = [e for e in events if e.outcome == "denied"]
    assert any(e.actor == "viewer-bot" and e.role == "viewer" and e.action == "PromoteModelVersion" for e in denied)
    assert any(e.actor == "anonymous" and e.action == "GetStatus" for e in denied)
    assert ok[0].action == "PromoteModelVersion" and ok[0].role == "admin" and ok[0].outcome == "ok"


def test_every_mutating_rpc_writes_the_audit_table() -> None:
    """Nothing that changes the registry bypasses the audit: each mutating RPC's action is recorded
    by the code that performs it."""
    server_code = "\n".join(p.read_text() for p in (ROOT / "server").glob("*.py"))
    for rpc in MUTATING_RPCS:
        assert re.search(rf'action="{rpc}"', server_code) or re.search(rf'"{rpc}"', server_code), rpc
    servicer = (ROOT / "server" / "servicer.py").read_text()
    for rpc in MUTATING_RPCS:
        assert f"def {rpc}(" in servicer
        assert RPC_ROLES[f"/aqimodels.api.registry.v1.ModelRegistry/{rpc}"] in ("operator", "admin")


def test_token_create_prints_a_token_and_an_entry_that_works(tmp_path: Path, sqlite_uri: str) -> None:
    out = subprocess.run([AQIMODELS, "token", "create", "alice", "--role", "operator"], capture_output=True,
                         text=True, check=True).stdout
    token, entry = out.split("\n", 1)
    assert token.startswith("aqm_") and token not in entry and 'role = "operator"' in entry
    (tmp_path / "tokens.toml").write_text(entry)
    reg = start_registry(sqlite_uri, tokens_file=str(tmp_path / "tokens.toml"))
    try:
        result = CliRunner().invoke(app, ["--target", reg.target, "--token", token, "status", "--json"])
        assert result.exit_code == 0, result.output
        denied = CliRunner().invoke(app, ["--target", reg.target, "--token", token, "rollback", "x"])
        assert denied.exit_code != 0 and "PERMISSION_DENIED" in denied.output
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_refuses_to_listen_beyond_loopback_without_a_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(host="0.0.0.0").checked()
    assert "aqimodels token create" in str(info.value)
    ServerConfig(host="::1").checked()  # loopback is fine
    env = {**os.environ, "AQIMODELS_WORKERS": "none"}
    result = subprocess.run([AQIMODELS, "serve", "--host", "0.0.0.0"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=env, check=False)
    assert result.returncode == 2 and "AQIMODELS_TOKENS_FILE" in result.stderr
    result = subprocess.run([sys.executable, "-m", "aqimodels.training.main", "--host", "0.0.0.0"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 2 and "aqimodels token create" in result.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls_and_mutual_tls(certs: Certs, sqlite_uri: str) -> None:
    reg = start_registry(sqlite_uri, tls_cert=certs.server_cert, tls_key=certs.server_key)
    try:
        with RegistryClient(reg.target, ca_cert=certs.ca) as tls:
            assert tls.health() == "SERVING" and tls.status().backend.healthy
        with RegistryClient(reg.target, timeout=3) as plain:
            with pytest.raises(Exception) as info:
                plain.status()
            assert info.value.code.name == "UNAVAILABLE"  # type: ignore[attr-defined]
        result = CliRunner().invoke(app, ["--target", reg.target, "--ca-cert", certs.ca, "status", "--json"])
        assert result.exit_code == 0, result.output
    finally:
        reg.server.stop(0)  # type: ignore[attr-defined]
    mutual = start_registry(sqlite_uri, tls_cert=certs.server_cert, tls_key=certs.server_key,
                            tls_client_ca=certs.ca)
    try:
        with RegistryClient(mutual.target, ca_cert=certs.ca, timeout=3) as no_client_cert:
            with pytest.raises(Exception) as info:
                no_client_cert.status()
            assert info.value.code.name == "UNAVAILABLE"  # type: ignore[attr-defined]
        with RegistryClient(mutual.target, ca_cert=certs.ca, client_cert=certs.client_cert,
                            client_key=certs.client_key) as ok:
            assert ok.status().backend.healthy
    finally:
        mutual.server.stop(0)  # type: ignore[attr-defined]


def test_the_registry_authenticates_to_its_workers_with_its_own_token_over_tls(
        certs: Certs, tokens: tuple[str, dict[str, str]], sqlite_uri: str) -> None:
    from aqimodels.server.jobs import jobs_factory

    server, port, _ = create_worker(WorkerConfig(
        tracking_uri=sqlite_uri, port=0, tokens_file=tokens[0], tls_cert=certs.server_cert, tls_key=certs.server_key,
        tls_client_ca=certs.ca), "127.0.0.1:0")
    reg = start_registry(sqlite_uri, workers=(f"127.0.0.1:{port}",), jobs_factory=jobs_factory,
                         worker_token=tokens[1]["operator"], worker_ca_cert=certs.ca,
                         worker_client_cert=certs.client_cert, worker_client_key=certs.client_key)
    try:
        import time

        deadline = time.monotonic() + 30
        while not reg.client.status().workers[0].healthy:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, reg.client.status().workers  # type: ignore[attr-defined]
            time.sleep(0.2)
        # ValidateDataset needs the operator role on the worker: the answer is the worker's own
        with pytest.raises(Exception) as info:
            list(reg.client.retrain(["xgboost"], dataset="nonsense:spec"))  # type: ignore[attr-defined]
        assert info.value.code.name == "INVALID_ARGUMENT" and "nonsense" in str(info.value)  # type: ignore[attr-defined]
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(0)  # type: ignore[attr-defined]
        server.stop(0)
