"""The wire-format shortcuts of convert.py build exactly the messages the plain constructors build."""

from __future__ import annotations

import math
from dataclasses import replace

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.server import convert
from aqimodels.server.domain import BackendHealth, ModelVersion, RegisteredModel
from aqimodels.server.service import Comparison, ModelSnapshot, ModelStatusView


def _version(n: int) -> ModelVersion:
    return ModelVersion(name="aqi_predictor_lstm", version=n, run_id=f"run{n:04d}", source=f"runs:/run{n}/model",
                        create_time_ms=1_700_000_000_000 + n, update_time_ms=1_700_000_000_500 + n,
                        aliases=("production",) if n == 2 else (), tags={"job_id": f"job-{n}", "ü": "ß"},
                        metrics={"rmse": 20.0 + n / 7, "r2": 0.8, "bad": math.nan}, description=f"version {n}")


def _plain(v: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(name=v.name, version=v.version, stage=convert.stage_to_proto(v.stage),
                           aliases=list(v.aliases), run_id=v.run_id, model_uri=v.model_uri, source=v.source,
                           create_time=convert.ts_from_ms(v.create_time_ms),
                           update_time=convert.ts_from_ms(v.update_time_ms),
                           metrics=v.metrics, tags=v.tags,
                           description=v.description, job_id=v.job_id,
                           lineage=pb.VersionLineage(run_id=v.run_id))  # no evaluation tags: the run only


def _wire(message: object) -> bytes:
    return message.SerializeToString(deterministic=True)  # type: ignore[attr-defined, no-any-return]


def test_a_page_of_versions_is_the_same_message() -> None:
    versions = [_version(n) for n in (300, 2, 1)]
    fast = pb.ListModelVersionsResponse.FromString(convert.versions_page_wire(versions, "tok", 1234).data)
    plain = pb.ListModelVersionsResponse(versions=[_plain(v) for v in versions], next_page_token="tok",
                                         total_size=1234)
    assert _wire(fast) == _wire(plain)  # NaN metrics travel as NaN: compare bytes, not messages
    assert convert.versions_page_wire([], "", 0).data == b""  # an empty page: the empty message


def test_a_comparison_is_the_same_message() -> None:
    versions = [_version(n) for n in (1, 2, 200)]
    rows = [(versions[0], 1, 20.14, 0.0), (versions[1], 2, 20.28, 0.14), (versions[2], -1, math.nan, -3.5)]
    c = Comparison(name="aqi_predictor_lstm", metric="rmse", higher_is_better=False, rows=rows, best_version=1,
                   metric_names=["r2", "rmse"])
    fast = pb.CompareModelVersionsResponse.FromString(convert.comparison_wire(c).data)
    plain = pb.CompareModelVersionsResponse(
        versions=[pb.VersionComparison(version=_plain(v), rank=r, value=x, delta_to_best=d, comparable=True,
                                       dataset="unknown (before evaluation tags)") for v, r, x, d in rows],
        metric="rmse", direction=pb.METRIC_DIRECTION_LOWER_IS_BETTER, best_version=1, metric_names=["r2", "rmse"])
    assert _wire(fast) == _wire(plain)


def test_a_comparison_marks_versions_evaluated_on_other_data() -> None:
    tags = {"eval.dataset": "file:/uk.csv", "eval.test_start": "2020-01-01T00:00:00",
            "eval.test_end": "2020-03-01T00:00:00", "eval.test_key": "k2"}
    other = replace(_version(7), tags=tags)
    rows = [(_version(1), 1, 20.14, 0.0), (other, 0, 15.0, math.nan)]
    c = Comparison(name="aqi_predictor_lstm", metric="rmse", higher_is_better=False, rows=rows, best_version=1,
                   metric_names=["rmse"], not_comparable=frozenset({7}), reference_dataset="synthetic")
    fast = pb.CompareModelVersionsResponse.FromString(convert.comparison_wire(c).data)
    assert [r.comparable for r in fast.versions] == [True, False]
    assert fast.versions[1].dataset == "file:/uk.csv test 2020-01-01T00..2020-03-01T00"
    assert fast.reference_dataset == "synthetic"


def test_a_status_carries_the_same_versions() -> None:
    versions = [_version(n) for n in (3, 2, 1)]
    model = RegisteredModel(name="aqi_predictor_lstm", description="", create_time_ms=1, update_time_ms=2,
                            aliases={"production": 2}, version_count=3, latest_version=3)
    status = convert.model_status_to_proto(ModelStatusView(ModelSnapshot(model, versions, 0.0), []))
    assert _wire(status.production) == _wire(_plain(versions[1])) and _wire(status.latest) == _wire(_plain(versions[0]))
    assert not status.HasField("staging") and status.health == pb.MODEL_HEALTH_HEALTHY


def test_a_status_response_is_the_same_message_and_its_kept_bytes_follow_the_model() -> None:
    versions = [_version(n) for n in (3, 2, 1)]
    model = RegisteredModel(name="aqi_predictor_lstm", description="", create_time_ms=1, update_time_ms=2,
                            aliases={"production": 2}, version_count=3, latest_version=3)
    snap = ModelSnapshot(model, versions, 0.0)
    health = BackendHealth(healthy=True, tracking_uri="sqlite:///x.db", message="ok", latency_ms=1.5)
    workers = [pb.WorkerStatus(target="127.0.0.1:1", healthy=True, capacity=1)]

    def plain(view: ModelStatusView) -> pb.GetStatusResponse:
        return pb.GetStatusResponse(models=[convert.model_status_to_proto(view)],
                                    backend=convert.backend_to_proto(health), workers=workers,
                                    server_version="9.9")

    def fast(view: ModelStatusView) -> pb.GetStatusResponse:
        response = pb.GetStatusResponse.FromString(convert.status_wire([view], health, workers, "9.9").data)
        assert response.time.seconds > 0
        response.ClearField("time")
        return response

    healthy = ModelStatusView(snap, [])
    assert _wire(fast(healthy)) == _wire(plain(healthy))
    degraded = ModelStatusView(snap, [], degraded=True)  # the same snapshot, another health: not the kept bytes
    assert fast(degraded).models[0].health == pb.MODEL_HEALTH_DEGRADED
    job = pb.RetrainJob(job_id="j1", model_name="aqi_predictor_lstm", epoch=3)
    running = ModelStatusView(snap, [job])
    assert list(fast(running).models[0].running_jobs) == [job]
    assert list(fast(healthy).models[0].running_jobs) == []
    promoted = ModelSnapshot(replace(model, aliases={"production": 3}), versions, 0.0)
    assert fast(ModelStatusView(promoted, [])).models[0].production.version == 3


def test_metric_values_read_like_a_dict_and_share_their_names() -> None:
    import pytest
    from aqimodels.server.domain import metric_values

    a = metric_values(["rmse", "mae", "r2"], [20.5, 14.0, math.nan])
    b = metric_values(("rmse", "mae", "r2"), (30.0, 21.0, 0.5))
    assert {k: v for k, v in a.items() if k != "r2"} == {"rmse": 20.5, "mae": 14.0} and math.isnan(a["r2"])
    assert b == {"rmse": 30.0, "mae": 21.0, "r2": 0.5} and b != {"rmse": 30.0}
    assert a.get("rmse") == 20.5 and a.get("nope") is None and a.get("nope", 1.0) == 1.0
    assert "mae" in a and "nope" not in a and list(a) == ["rmse", "mae", "r2"] and len(a) == 3
    assert dict(b.items()) == {"rmse": 30.0, "mae": 21.0, "r2": 0.5} and {**b} == dict(b)
    assert a._index is b._index  # one name index per metric set, not one per version
    assert metric_values(["rmse", "rmse"], [1.0, 2.0]) == {"rmse": 2.0}  # a repeated name: the last wins
    assert metric_values((), ()) == {} and not metric_values((), ())
    with pytest.raises(KeyError):
        a["nope"]


def test_a_version_with_metric_values_serialises_as_with_a_dict() -> None:
    from aqimodels.server.domain import ModelVersion, metric_values

    values = {"rmse": 20.5, "mae": 14.0}
    kept = ModelVersion("m", 3, "r" * 32, "s", 1000, 2000, ("production",), {"k": "v"},
                        metric_values(list(values), list(values.values())))
    plain = ModelVersion("m", 3, "r" * 32, "s", 1000, 2000, ("production",), {"k": "v"}, values)
    assert convert.model_version_to_proto(kept) == convert.model_version_to_proto(plain)
    assert dict(convert.model_version_to_proto(kept).metrics) == values
