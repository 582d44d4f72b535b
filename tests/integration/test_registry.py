"""The ModelRegistry RPCs end to end: a real server on an ephemeral port, a real MLflow store
(SQLite in a temp dir, then a fresh PostgreSQL database), reached through the real client."""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import math
import shutil
import threading

import grpc
import pytest
from conftest import Registry, realistic_metrics, start_registry
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.registry.v1 import registry_pb2_grpc
from aqimodels.client import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RegistryClient,
    StaleVersionError,
    UnimplementedError,
)

LSTM = "aqi_predictor_lstm"
XGB = "aqi_predictor_xgboost"


def _seed_three(reg: Registry) -> None:
    reg.seed(LSTM, [{**realistic_metrics(i), "rmse": r, "r2": q} for i, (r, q) in
                    enumerate([(30.0, 0.70), (24.0, 0.80), (27.0, 0.75)])])
    reg.seed(XGB, [realistic_metrics(i, seed=1) for i in range(2)])


def test_status_of_an_empty_registry_says_nothing_is_registered(registry: Registry) -> None:
    status = registry.client.status()
    assert list(status.models) == []
    assert status.backend.healthy
    assert "mlflow.db" in status.backend.tracking_uri or "postgresql" in status.backend.tracking_uri
    assert status.server_version == importlib.metadata.version("aqimodels")


def test_status_lists_models_with_production_staging_and_latest(registry: Registry) -> None:
    _seed_three(registry)
    c = registry.client
    c.promote(LSTM, 2, "production")
    c.promote(LSTM, 3, "staging")
    status = c.status()
    by_name = {m.model.name: m for m in status.models}
    assert set(by_name) == {LSTM, XGB}
    lstm = by_name[LSTM]
    assert lstm.production.version == 2 and lstm.production.metrics["rmse"] == pytest.approx(24.0)
    assert lstm.staging.version == 3
    assert lstm.latest.version == 3
    assert lstm.health == pb.MODEL_HEALTH_HEALTHY
    assert lstm.last_training_time.seconds > 0
    assert by_name[XGB].health == pb.MODEL_HEALTH_NO_PRODUCTION
    assert not by_name[XGB].HasField("production")


def test_list_models_and_versions_and_get_version(registry: Registry) -> None:
    _seed_three(registry)
    c = registry.client
    models = c.list_models()
    assert [m.name for m in models.models] == sorted([LSTM, XGB])
    assert models.total_size == 2
    lstm = next(m for m in models.models if m.name == LSTM)
    assert lstm.version_count == 3 and lstm.latest_version == 3
    versions = c.list_versions(LSTM)
    assert [v.version for v in versions.versions] == [3, 2, 1]
    v2 = c.get_version(LSTM, 2)
    assert v2.model_uri == f"models:/{LSTM}/2"
    assert v2.run_id and v2.metrics["rmse"] == pytest.approx(24.0)
    assert v2.stage == pb.STAGE_NONE


def test_list_versions_filters_by_stage_and_orders_by_metric(registry: Registry) -> None:
    _seed_three(registry)
    c = registry.client
    c.promote(LSTM, 1, "production")
    c.promote(LSTM, 2, "production")  # archives 1
    assert [v.version for v in c.list_versions(LSTM, stage="archived").versions] == [1]
    assert [v.version for v in c.list_versions(LSTM, stage="production").versions] == [2]
    assert [v.version for v in c.list_versions(LSTM, stage="none").versions] == [3]
    # rmse: lower is better, so best first is ascending
    assert [v.version for v in c.list_versions(LSTM, order_by="metric.rmse").versions] == [2, 3, 1]
    assert [v.version for v in c.list_versions(LSTM, order_by="metric.rmse desc").versions] == [1, 3, 2]
    # r2: higher is better, so best first is descending
    assert [v.version for v in c.list_versions(LSTM, order_by="metric.r2").versions] == [2, 3, 1]
    assert [v.version for v in c.list_versions(LSTM, order_by="version asc").versions] == [1, 2, 3]


def test_compare_is_metric_direction_aware_and_names_the_best(registry: Registry) -> None:
    _seed_three(registry)
    c = registry.client
    by_rmse = c.compare(LSTM, metric="rmse")
    assert by_rmse.best_version == 2
    assert by_rmse.direction == pb.METRIC_DIRECTION_LOWER_IS_BETTER
    assert [r.version.version for r in by_rmse.versions] == [2, 3, 1]
    assert [r.rank for r in by_rmse.versions] == [1, 2, 3]
    assert by_rmse.versions[1].delta_to_best == pytest.approx(27.0 / 24.0 - 1)
    by_r2 = c.compare(LSTM, metric="r2")
    assert by_r2.best_version == 2 and by_r2.direction == pb.METRIC_DIRECTION_HIGHER_IS_BETTER
    subset = c.compare(LSTM, versions=[1, 3], metric="rmse")
    assert subset.best_version == 3 and len(subset.versions) == 2
    assert {"rmse", "mae", "r2", "rmse_h6"} <= set(by_rmse.metric_names)


def test_promote_archives_the_replaced_production_version_and_rollback_restores_it(registry: Registry) -> None:
    _seed_three(registry)
    c = registry.client
    first = c.promote(LSTM, 1, "production")
    assert first.previous_version == 0 and list(first.archived_versions) == []
    second = c.promote(LSTM, 2, "production", expected_current_version=1, reason="better rmse")
    assert second.previous_version == 1 and list(second.archived_versions) == [1]
    assert c.get_version(LSTM, 1).stage == pb.STAGE_ARCHIVED
    assert c.get_version(LSTM, 2).stage == pb.STAGE_PRODUCTION
    assert "production" in c.get_version(LSTM, 2).aliases
    back = c.rollback(LSTM)
    assert back.version.version == 1 and back.replaced_version == 2
    assert c.get_version(LSTM, 1).stage == pb.STAGE_PRODUCTION
    assert c.get_version(LSTM, 2).stage == pb.STAGE_ARCHIVED
    # staging then production moves the alias; archiving a staging version clears it
    c.promote(LSTM, 3, "staging")
    c.promote(LSTM, 3, "archived")
    assert c.get_version(LSTM, 3).stage == pb.STAGE_ARCHIVED
    assert c.status().models[0].HasField("staging") is False


def test_promote_best_selects_by_metric_server_side(registry: Registry) -> None:
    _seed_three(registry)
    result = registry.client.promote(LSTM, select_best_by="rmse")
    assert result.version.version == 2 and result.version.stage == pb.STAGE_PRODUCTION


def test_production_alias_is_a_plain_mlflow_alias(registry: Registry) -> None:
    """models:/name@production resolves in any MLflow client, not only through aqimodels."""
    from mlflow.tracking import MlflowClient

    _seed_three(registry)
    registry.client.promote(LSTM, 2, "production")
    mv = MlflowClient(tracking_uri=registry.tracking_uri).get_model_version_by_alias(LSTM, "production")
    assert int(mv.version) == 2


def test_cleanup_keeps_last_n_and_aliased_versions(registry: Registry) -> None:
    registry.seed(LSTM, [realistic_metrics(i) for i in range(6)])
    c = registry.client
    c.promote(LSTM, 1, "production")
    c.promote(LSTM, 2, "staging")
    dry = c.cleanup(LSTM, keep_last=2, dry_run=True)
    assert dry.dry_run and list(dry.deleted_versions) == [3, 4]
    assert list(dry.protected_versions) == [1, 2]
    assert [v.version for v in c.list_versions(LSTM).versions] == [6, 5, 4, 3, 2, 1]  # nothing deleted
    done = c.cleanup(LSTM, keep_last=2)
    assert list(done.deleted_versions) == [3, 4] and not done.dry_run
    assert [v.version for v in c.list_versions(LSTM).versions] == [6, 5, 2, 1]
    events = list(c.iter_audit_events(model_name=LSTM))
    assert [e.outcome for e in events if e.action == "CleanupModelVersions"] == ["ok", "dry_run"]


def test_audit_records_every_mutation_with_before_and_after(registry: Registry) -> None:
    _seed_three(registry)
    c = registry.client
    c.promote(LSTM, 1, "production", request_id="req-one")
    c.promote(LSTM, 2, "production")
    c.rollback(LSTM)
    events = list(c.iter_audit_events(model_name=LSTM, page_size=2))
    assert [e.action for e in events] == ["RollbackModel", "PromoteModelVersion", "PromoteModelVersion"]
    oldest = events[-1]
    assert oldest.request_id == "req-one" and oldest.actor == "anonymous" and oldest.outcome == "ok"
    assert dict(oldest.before)["production"] is None and dict(oldest.after)["production"] == 1
    assert events[0].sequence > events[1].sequence > events[2].sequence
    assert all(e.time.seconds > 0 for e in events)
    assert list(c.iter_audit_events(model_name=XGB)) == []


def test_idempotent_promotion_returns_the_first_result(registry: Registry) -> None:
    _seed_three(registry)
    c = registry.client
    first = c.promote(LSTM, 2, "production", request_id="same-id")
    again = c.promote(LSTM, 2, "production", request_id="same-id")
    assert again.audit_event_id == first.audit_event_id
    assert len([e for e in c.iter_audit_events(model_name=LSTM) if e.action == "PromoteModelVersion"]) == 1


def test_idempotency_key_in_the_request_wins_over_the_header(registry: Registry) -> None:
    """A raw caller that sets only PromoteModelVersionRequest.request_id still gets idempotency."""
    _seed_three(registry)
    with grpc.insecure_channel(registry.target) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        request = pb.PromoteModelVersionRequest(name=LSTM, version=3, stage=pb.STAGE_PRODUCTION, request_id="k-1")
        first = stub.PromoteModelVersion(request, metadata=(("x-request-id", "header-a"),))
        again = stub.PromoteModelVersion(request, metadata=(("x-request-id", "header-b"),))
    assert first.audit_event_id == again.audit_event_id


def test_pagination_walks_250_versions_without_loss_or_duplicates(registry: Registry) -> None:
    registry.seed(LSTM, [realistic_metrics(i) for i in range(250)])
    c = registry.client
    for order_by in ("", "metric.rmse", "create_time asc"):
        seen: list[int] = []
        token = ""
        pages = 0
        while True:
            page = c.list_versions(LSTM, order_by=order_by, page_size=40, page_token=token)
            seen += [v.version for v in page.versions]
            pages += 1
            token = page.next_page_token
            assert page.total_size == 250
            if not token:
                break
        assert pages == 7
        assert sorted(seen) == list(range(1, 251)) and len(seen) == 250
    by_rmse = [v.metrics["rmse"] for v in c.iter_versions(LSTM, order_by="metric.rmse", page_size=33)]
    assert by_rmse == sorted(by_rmse)


def test_thirty_concurrent_promotions_leave_an_unbroken_audit_chain(registry: Registry) -> None:
    registry.seed(LSTM, [realistic_metrics(i) for i in range(30)])
    barrier = threading.Barrier(30)
    codes: list[str] = []

    def promote(version: int) -> str:
        with RegistryClient(registry.target, timeout=120) as own:  # one channel per caller
            barrier.wait()
            try:
                own.promote(LSTM, version, "production")
                return "OK"
            except (StaleVersionError, FailedPreconditionError) as exc:
                return exc.code.name

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(promote, range(1, 31)))
    assert codes.count("OK") == 30  # different versions, no compare-and-set: all succeed, one at a time
    events = list(reversed([e for e in registry.client.iter_audit_events(model_name=LSTM)
                            if e.action == "PromoteModelVersion"]))
    assert len(events) == 30
    previous_after = None
    for e in events:
        before, after = dict(e.before), dict(e.after)
        assert before["production"] == previous_after
        assert after["production"] == e.version
        previous_after = after["production"]
    production = [v.version for v in registry.client.iter_versions(LSTM, stage="production")]
    assert production == [int(previous_after)]
    archived = [v.version for v in registry.client.iter_versions(LSTM, stage="archived")]
    assert len(archived) == 29


def test_concurrent_compare_and_set_lets_exactly_one_win(registry: Registry) -> None:
    registry.seed(LSTM, [realistic_metrics(i) for i in range(11)])
    registry.client.promote(LSTM, 1, "production")
    barrier = threading.Barrier(10)

    def promote(version: int) -> str:
        with RegistryClient(registry.target, timeout=120) as own:
            barrier.wait()
            try:
                own.promote(LSTM, version, "production", expected_current_version=1)
                return "OK"
            except StaleVersionError as exc:
                return exc.code.name

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(promote, range(2, 12)))
    assert codes.count("OK") == 1 and codes.count("ABORTED") == 9


# ---- the error table: every row answered with its documented status ----

ERROR_CASES = [
    ("unknown model", lambda c: c.get_version("no_such_model", 1), NotFoundError, "NOT_FOUND", "no_such_model"),
    ("unknown version", lambda c: c.get_version(LSTM, 99), NotFoundError, "NOT_FOUND", "99"),
    ("unknown model list", lambda c: c.list_versions("ghost"), NotFoundError, "NOT_FOUND", "ghost"),
    ("unknown model compare", lambda c: c.compare("ghost"), NotFoundError, "NOT_FOUND", "ghost"),
    ("bad page token", lambda c: c.list_versions(LSTM, page_token="not-a-token"), InvalidArgumentError,
     "INVALID_ARGUMENT", "page_token"),
    ("token of another query", lambda c: c.list_versions(
        LSTM, order_by="metric.rmse", page_token=c.list_versions(LSTM, page_size=1).next_page_token),
     InvalidArgumentError, "INVALID_ARGUMENT", "page_token"),
    ("negative page size", lambda c: c.list_models(page_size=-1), InvalidArgumentError, "INVALID_ARGUMENT",
     "page_size"),
    ("bad stage", lambda c: c.promote(LSTM, 1, pb.STAGE_NONE), InvalidArgumentError, "INVALID_ARGUMENT", "stage"),
    ("unknown stage number", lambda c: c.promote(LSTM, 1, 42), InvalidArgumentError, "INVALID_ARGUMENT", "stage"),
    ("bad stage filter", lambda c: c.list_versions(LSTM, stage=42), InvalidArgumentError, "INVALID_ARGUMENT",
     "stage"),
    ("bad order_by", lambda c: c.list_versions(LSTM, order_by="colour"), InvalidArgumentError, "INVALID_ARGUMENT",
     "order_by"),
    ("empty name", lambda c: c.get_version("", 1), InvalidArgumentError, "INVALID_ARGUMENT", "name"),
    ("zero version", lambda c: c.get_version(LSTM, 0), InvalidArgumentError, "INVALID_ARGUMENT", "version"),
    ("unknown metric", lambda c: c.compare(LSTM, metric="colour"), InvalidArgumentError, "INVALID_ARGUMENT",
     "metric"),
    ("stale compare-and-set", lambda c: c.promote(LSTM, 3, "production", expected_current_version=2),
     StaleVersionError, "ABORTED", "not the expected"),
    ("already in production", lambda c: c.promote(LSTM, 1, "production"), FailedPreconditionError,
     "FAILED_PRECONDITION", "already production"),
    ("production to staging", lambda c: c.promote(LSTM, 1, "staging"), FailedPreconditionError,
     "FAILED_PRECONDITION", "in production"),
    ("rollback without history", lambda c: c.rollback(LSTM), FailedPreconditionError, "FAILED_PRECONDITION",
     "nothing to roll back"),
    ("cleanup of an aliased version", lambda c: c.cleanup(LSTM, versions=[1]), FailedPreconditionError,
     "FAILED_PRECONDITION", "aliased"),
    ("cleanup keep 0", lambda c: c.cleanup(LSTM, keep_last=0), InvalidArgumentError, "INVALID_ARGUMENT",
     "keep_last"),
    ("history of an unknown model", lambda c: c._unary(c._stub.GetModelHistory, pb.GetModelHistoryRequest(name="ghost")),
     NotFoundError, "NOT_FOUND", "ghost"),
    ("retrain without a job manager", lambda c: list(c.retrain(["lstm"])), UnimplementedError, "UNIMPLEMENTED",
     "retrain"),
]


@pytest.fixture(scope="module")
def error_registry(tmp_path_factory: pytest.TempPathFactory, _sqlite_template) -> Registry:
    folder = tmp_path_factory.mktemp("errors")
    shutil.copy(_sqlite_template, folder / "mlflow.db")
    reg = start_registry(f"sqlite:///{folder}/mlflow.db")
    reg.seed(LSTM, [realistic_metrics(i) for i in range(3)])
    reg.client.promote(LSTM, 1, "production")  # type: ignore[attr-defined]
    yield reg
    reg.client.close()  # type: ignore[attr-defined]
    reg.server.stop(1)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("case", "call", "error", "code", "fragment"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_table(error_registry: Registry, case: str, call, error: type, code: str, fragment: str) -> None:
    before = [(v.version, v.stage) for v in error_registry.client.iter_versions(LSTM)]  # type: ignore[attr-defined]
    with pytest.raises(error) as info:
        call(error_registry.client)
    assert info.value.code.name == code
    assert fragment.lower() in info.value.message.lower(), info.value.message
    after = [(v.version, v.stage) for v in error_registry.client.iter_versions(LSTM)]  # type: ignore[attr-defined]
    assert after == before  # a refused request changes nothing


def test_raw_grpc_status_codes_and_request_id_echo(error_registry: Registry) -> None:
    """The status travels on the wire (not only through our client), and the request id comes back."""
    with grpc.insecure_channel(error_registry.target) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelVersion(pb.GetModelVersionRequest(name="ghost", version=1),
                                 metadata=(("x-request-id", "trace-123"),))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "trace-123") in tuple(info.value.trailing_metadata())


def test_health_and_reflection(error_registry: Registry) -> None:
    assert error_registry.client.health() == "SERVING"  # type: ignore[attr-defined]
    with grpc.insecure_channel(error_registry.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="aqimodels.api.registry.v1.ModelRegistry"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in responses[0].list_services_response.service}
        assert "aqimodels.api.registry.v1.ModelRegistry" in names and "grpc.health.v1.Health" in names


def test_nan_metrics_do_not_break_comparison(sqlite_registry: Registry) -> None:
    sqlite_registry.seed(LSTM, [{"rmse": 20.0}, {"mae": 3.0}])
    result = sqlite_registry.client.compare(LSTM, metric="rmse")  # type: ignore[attr-defined]
    assert result.best_version == 1
    assert result.versions[-1].rank == 0 and math.isnan(result.versions[-1].value)
