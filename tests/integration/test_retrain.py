"""Retrain end to end: a real registry, a real worker PROCESS, a real MLflow store, small data.

The registry dispatches each job to the worker over TrainingWorker.Train and relays every event;
these tests follow, watch, cancel and auto-promote through the real client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Registry, registry_with_worker, start_registry

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import AlreadyExistsError, InvalidArgumentError, NotFoundError
from aqimodels.server.jobs import jobs_factory

SMALL = "synthetic:stations=4,days=30,seed=3"
FAST = wpb.TrainParams(max_epochs=3)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> Iterator[Registry]:
    yield from registry_with_worker(tmp_path_factory.mktemp("retrain"), _sqlite_template)


def _by_job(events: list[pb.RetrainEvent]) -> dict[str, list[pb.RetrainEvent]]:
    out: dict[str, list[pb.RetrainEvent]] = {}
    for ev in events:
        out.setdefault(ev.job_id, []).append(ev)
    return out


def test_xgboost_retrain_streams_in_order_and_registers_a_loadable_version(system: Registry) -> None:
    events = list(system.client.retrain(["xgboost"], dataset=SMALL, params=FAST))  # type: ignore[attr-defined]
    jobs = _by_job(events)
    assert len(jobs) == 1
    (job_id, evs), = jobs.items()
    assert [e.sequence for e in evs] == list(range(1, len(evs) + 1))
    kinds = [e.WhichOneof("event") for e in evs]
    assert kinds[0] == "queued" and "dispatched" in kinds and kinds[-1] == "succeeded"
    progress = [e.progress.WhichOneof("event") for e in evs if e.WhichOneof("event") == "progress"]
    assert progress[0] == "started" and progress[1] == "data_loaded"
    assert progress.count("epoch") >= 1 and progress[-3:] == ["evaluating", "registering", "finished"]
    epochs = [e.progress.epoch.epoch for e in evs if e.progress.WhichOneof("event") == "epoch"]
    assert epochs == sorted(epochs) and epochs[0] == 1
    final = evs[-1].succeeded.version
    assert final.name == "aqi_predictor_xgboost" and final.version >= 1 and final.job_id == job_id
    assert final.metrics["rmse"] > 0 and "baseline_rmse_h6" in final.metrics
    job = system.client.get_job(job_id)  # type: ignore[attr-defined]
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.version == final.version and job.run_id

    # the registered model reloads through MLflow and forecasts from raw input
    import mlflow

    from aqimodels.training.data import load_dataset

    mlflow.set_tracking_uri(system.tracking_uri)  # what any MLflow user does (or MLFLOW_TRACKING_URI)
    model = mlflow.pyfunc.load_model(final.model_uri)
    raw = _last_hours(load_dataset(SMALL).frame, 72)
    forecast = model.predict(raw)
    assert set(forecast["horizon"]) == set(range(1, 25))
    assert forecast["pm25"].notna().all()


def test_watch_after_disconnect_replays_what_was_missed(system: Registry) -> None:
    stream = system.client.retrain(["xgboost"], dataset=SMALL, params=FAST)  # type: ignore[attr-defined]
    first = [next(stream), next(stream)]
    stream.close()  # the caller goes away; the job does not
    job_id = first[0].job_id
    rest = list(system.client.watch_job(job_id, after_sequence=first[-1].sequence))  # type: ignore[attr-defined]
    assert [e.sequence for e in rest] == list(range(first[-1].sequence + 1, first[-1].sequence + 1 + len(rest)))
    assert rest[-1].WhichOneof("event") == "succeeded"
    replay = list(system.client.watch_job(job_id))  # type: ignore[attr-defined]
    assert [e.sequence for e in replay] == list(range(1, len(replay) + 1))
    assert replay[-1].sequence == rest[-1].sequence


def test_second_retrain_of_a_running_model_is_refused_and_cancel_registers_nothing(system: Registry) -> None:
    slow = wpb.TrainParams(max_epochs=500, early_stopping_patience=500)
    stream = system.client.retrain(["lstm"], dataset=SMALL, params=slow)  # type: ignore[attr-defined]
    job_id = ""
    for ev in stream:
        job_id = ev.job_id
        if ev.progress.WhichOneof("event") == "epoch":
            break
    with pytest.raises(AlreadyExistsError) as info:
        list(system.client.retrain(["lstm"], dataset=SMALL, params=FAST))  # type: ignore[attr-defined]
    assert job_id in info.value.message
    before = _versions(system, "aqi_predictor_lstm")
    cancelled = system.client.cancel_job(job_id, reason="test")  # type: ignore[attr-defined]
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    rest = list(stream)
    assert rest and rest[-1].WhichOneof("event") == "ended" and rest[-1].ended.state == pb.JOB_STATE_CANCELLED
    assert _versions(system, "aqi_predictor_lstm") == before
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=system.tracking_uri).get_run(cancelled.run_id)
    deadline = time.monotonic() + 20
    while run.info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
        run = MlflowClient(tracking_uri=system.tracking_uri).get_run(cancelled.run_id)
    assert run.info.status == "KILLED"


def _last_hours(frame, hours: int):  # type: ignore[no-untyped-def]
    """The last ``hours`` hours of every station of a long-format frame."""
    import pandas as pd

    return frame[frame["time"] > frame["time"].max() - pd.Timedelta(hours=hours)]


def _versions(reg: Registry, name: str) -> list[int]:
    try:
        return [v.version for v in reg.client.iter_versions(name)]  # type: ignore[attr-defined]
    except NotFoundError:
        return []


def test_bad_data_is_refused_before_any_job_exists(system: Registry, tmp_path: Path) -> None:
    jobs_before = len(system.client.list_jobs(page_size=1000).jobs)  # type: ignore[attr-defined]
    bad = tmp_path / "bad.csv"
    bad.write_text("station,time,temperature\nA,2024-01-01 00:00,3\n")
    for spec, fragment in ((f"file:{bad}", "pm25"), ("file:/no/such/file.csv", "no/such"),
                           ("nonsense:spec", "nonsense"), ("synthetic:days=2", "hours")):
        with pytest.raises(InvalidArgumentError) as info:
            list(system.client.retrain(["xgboost"], dataset=spec))  # type: ignore[attr-defined]
        assert fragment in info.value.message.lower(), info.value.message
    assert len(system.client.list_jobs(page_size=1000).jobs) == jobs_before  # type: ignore[attr-defined]


def test_auto_promotion_promotes_a_better_version_and_refuses_a_worse_one(system: Registry) -> None:
    name = "aqi_predictor_xgboost"
    # production with an impossible rmse: the new version cannot beat it
    great = system.store.create_version(name, {"rmse": 0.001})  # type: ignore[attr-defined]
    system.client.promote(name, great, "production")  # type: ignore[attr-defined]
    events = list(system.client.retrain(["xgboost"], dataset=SMALL, params=FAST, auto_promote=True))  # type: ignore[attr-defined]
    decision = events[-1].succeeded.promotion
    assert decision.considered and not decision.promoted
    assert decision.production_version == great and decision.production_value == pytest.approx(0.001)
    assert system.client.get_version(name, great).stage == pb.STAGE_PRODUCTION  # type: ignore[attr-defined]
    # production with a terrible rmse: the new version beats it and is promoted
    awful = system.store.create_version(name, {"rmse": 1e6})  # type: ignore[attr-defined]
    system.client.promote(name, awful, "production")  # type: ignore[attr-defined]
    events = list(system.client.retrain(["xgboost"], dataset=SMALL, params=FAST, auto_promote=True))  # type: ignore[attr-defined]
    decision = events[-1].succeeded.promotion
    new_version = events[-1].succeeded.version.version
    assert decision.promoted and decision.candidate_value < 1e6
    assert system.client.get_version(name, new_version).stage == pb.STAGE_PRODUCTION  # type: ignore[attr-defined]
    assert system.client.get_version(name, awful).stage == pb.STAGE_ARCHIVED  # type: ignore[attr-defined]
    audit = [e for e in system.client.iter_audit_events(model_name=name) if e.action == "AutoPromotion"]  # type: ignore[attr-defined]
    assert [e.outcome for e in audit[:2]] == ["ok", "declined"]
    tags = system.client.get_version(name, new_version).tags  # type: ignore[attr-defined]
    assert '"promoted": true' in tags["aqimodels.promotion_decision"]


@pytest.mark.slow
def test_all_four_models_train_register_and_the_ensemble_follows_its_members(system: Registry) -> None:
    events = list(system.client.retrain([], dataset=SMALL, params=FAST))  # type: ignore[attr-defined]
    jobs = _by_job(events)
    assert len(jobs) == 4
    finals = {evs[0].model_type: evs[-1] for evs in jobs.values()}
    for model_type, final in finals.items():
        assert final.WhichOneof("event") == "succeeded", (model_type, final)
    ensemble_id = next(j for j, evs in jobs.items() if evs[0].model_type == wpb.MODEL_TYPE_ENSEMBLE)
    ensemble_start = next(e.time.ToNanoseconds() for e in jobs[ensemble_id] if e.WhichOneof("event") == "dispatched")
    for j, evs in jobs.items():
        if j != ensemble_id:
            assert evs[-1].time.ToNanoseconds() <= ensemble_start  # members end before the ensemble starts
    status = {m.model.name: m for m in system.client.status().models}  # type: ignore[attr-defined]
    assert {"aqi_predictor_lstm", "aqi_predictor_gnn", "aqi_predictor_ensemble"} <= set(status)
    ens = finals[wpb.MODEL_TYPE_ENSEMBLE].succeeded.version
    assert ens.metrics["rmse"] > 0
    assert any(k.startswith("weight_") for k in ens.metrics)

    import mlflow

    from aqimodels.training.data import load_dataset

    mlflow.set_tracking_uri(system.tracking_uri)
    raw = _last_hours(load_dataset(SMALL).frame, 72)
    for final in finals.values():
        forecast = mlflow.pyfunc.load_model(final.succeeded.version.model_uri).predict(raw)
        assert len(forecast) == 4 * 24 and forecast["pm25"].notna().all()


def test_job_state_survives_a_registry_restart(system: Registry) -> None:
    jobs = system.client.list_jobs(page_size=1000).jobs  # type: ignore[attr-defined]
    finished = [j for j in jobs if j.state == pb.JOB_STATE_SUCCEEDED]
    assert finished
    other = start_registry(system.tracking_uri, workers=(), jobs_factory=jobs_factory)
    try:
        again = other.client.get_job(finished[0].job_id)  # type: ignore[attr-defined]
        assert again.state == pb.JOB_STATE_SUCCEEDED and again.version == finished[0].version
        replay = list(other.client.watch_job(finished[0].job_id))  # type: ignore[attr-defined]
        assert replay[-1].WhichOneof("event") == "succeeded"
    finally:
        other.client.close()  # type: ignore[attr-defined]
        other.server.stop(1)  # type: ignore[attr-defined]


def test_a_worker_at_capacity_refuses_more_with_resource_exhausted(sqlite_uri: str) -> None:
    """One training at a time by default: a second Train call is refused, not queued on the worker."""
    import grpc

    from aqimodels.api.training.v1 import worker_pb2_grpc
    from aqimodels.training.main import create_worker
    from aqimodels.training.servicer import WorkerConfig

    server, port, _ = create_worker(WorkerConfig(tracking_uri=sqlite_uri, port=0), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.TrainingWorkerStub(channel)
            slow = wpb.TrainRequest(job_id="job-a", model_type=wpb.MODEL_TYPE_LSTM, dataset=wpb.DatasetSpec(spec=SMALL),
                                    params=wpb.TrainParams(max_epochs=500, early_stopping_patience=500))
            first = stub.Train(slow)
            assert next(first).WhichOneof("event") == "started"
            with pytest.raises(grpc.RpcError) as info:
                next(stub.Train(wpb.TrainRequest(job_id="job-b", model_type=wpb.MODEL_TYPE_XGBOOST)))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "capacity" in info.value.details() and "job-a" in info.value.details()
            first.cancel()
    finally:
        server.stop(0)
