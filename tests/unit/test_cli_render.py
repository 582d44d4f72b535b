"""The CLI's rendering: retrain events folded into progress state, tables, times and metric formats."""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime, timedelta

import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import render
from aqimodels.client.errors import InvalidArgumentError
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def ts(dt: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt)
    return t


def ev(job: str, seq: int, state: int, model_type: int = wpb.MODEL_TYPE_LSTM, **kind: object) -> pb.RetrainEvent:
    return pb.RetrainEvent(job_id=job, sequence=seq, model_type=model_type, state=state, **kind)  # type: ignore[arg-type]


def progress(seq: int, **kind: object) -> wpb.TrainEvent:
    return wpb.TrainEvent(sequence=seq, **kind)  # type: ignore[arg-type]


def lstm_success_events(job: str = "job-lstm") -> list[pb.RetrainEvent]:
    R = pb.JOB_STATE_RUNNING
    return [
        ev(job, 1, pb.JOB_STATE_QUEUED, queued=pb.JobQueued(position=2, reason="waiting for a worker")),
        ev(job, 2, R, dispatched=pb.JobDispatched(worker="127.0.0.1:50052")),
        ev(job, 3, R, progress=progress(1, started=wpb.TrainStarted(run_id="run1", total_steps=10))),
        ev(job, 4, R, progress=progress(2, data_loaded=wpb.DataLoaded(stations=8, hours=2880))),
        ev(job, 5, R, progress=progress(3, epoch=wpb.EpochFinished(epoch=1, total_epochs=10, loss=0.5,
                                                                  validation_rmse=30.1, elapsed_seconds=2.0))),
        ev(job, 6, R, progress=progress(4, epoch=wpb.EpochFinished(epoch=2, total_epochs=10, loss=0.25,
                                                                  validation_rmse=24.5, elapsed_seconds=4.5))),
        ev(job, 7, R, progress=progress(5, evaluating=wpb.Evaluating(test_samples=500))),
        ev(job, 8, R, progress=progress(6, registering=wpb.Registering(model_name="aqi_predictor_lstm"))),
        ev(job, 9, R, progress=progress(7, finished=wpb.TrainFinished(
            model_name="aqi_predictor_lstm", version=4, run_id="run1", metrics={"rmse": 21.25, "mae": 14.0}))),
        ev(job, 10, pb.JOB_STATE_SUCCEEDED, succeeded=pb.JobSucceeded(
            version=pb.ModelVersion(name="aqi_predictor_lstm", version=4, metrics={"rmse": 21.25, "mae": 14.0}),
            promotion=pb.PromotionDecision(considered=True, promoted=True, metric="rmse", candidate_value=21.25,
                                           production_value=24.0, production_version=3, reason="better"))),
    ]


def test_events_fold_into_progress_from_queued_to_succeeded() -> None:
    jobs: dict[str, render.JobProgress] = {}
    events = lstm_success_events()
    seen_phases = []
    for e in events:
        job = render.apply_event(jobs, e)
        seen_phases.append(job.phase)
        if e.sequence == 1:
            assert job.state == pb.JOB_STATE_QUEUED and job.phase.startswith("queued #2")
            assert job.model_type == "lstm" and not job.done
        if e.sequence == 2:
            assert job.worker == "127.0.0.1:50052"
        if e.sequence == 3:
            assert (job.run_id, job.total, job.completed) == ("run1", 10, 0)
        if e.sequence == 6:
            assert (job.epoch, job.total, job.loss, job.validation_rmse, job.elapsed) == (2, 10, 0.25, 24.5, 4.5)
            assert render.progress_fields(job) == {"loss": "loss 0.2500", "val": "val rmse 24.50",
                                                   "elapsed": "4 s, ETA 18 s"}
        if e.sequence == 7:
            assert job.phase == "evaluating" and job.completed == 2  # what ran, not the maximum
    job = jobs["job-lstm"]
    assert list(jobs) == ["job-lstm"]
    assert job.done and job.state == pb.JOB_STATE_SUCCEEDED
    assert job.version == 4 and job.metrics["rmse"] == 21.25
    assert job.promotion.startswith("promoted (rmse 21.25 vs v3 24.00)")
    assert job.last_sequence == 10
    assert job.description.startswith("lstm") and "v4" in job.description
    assert "data loaded: 8 stations, 2880 h" in seen_phases
    assert "registering" in seen_phases


def test_failure_and_ended_events_record_the_reason() -> None:
    jobs: dict[str, render.JobProgress] = {}
    R = pb.JOB_STATE_RUNNING
    render.apply_event(jobs, ev("j", 1, R, model_type=wpb.MODEL_TYPE_GNN,
                                progress=progress(1, failed=wpb.TrainFailed(reason="out of memory",
                                                                            code="RESOURCE_EXHAUSTED"))))
    assert jobs["j"].phase == "failed (RESOURCE_EXHAUSTED)" and jobs["j"].error == "out of memory"
    assert not jobs["j"].done
    job = render.apply_event(jobs, ev("j", 2, pb.JOB_STATE_FAILED, model_type=wpb.MODEL_TYPE_GNN,
                                      ended=pb.JobEnded(state=pb.JOB_STATE_FAILED, reason="out of memory")))
    assert job.done and job.state == pb.JOB_STATE_FAILED and job.model_type == "gnn"
    assert job.phase == "failed: out of memory"
    table = render.render_text(render.summary_table([job]))
    assert "gnn" in table and "failed" in table and "out of memory" in table


def test_ensemble_member_epochs_and_several_jobs_stay_apart() -> None:
    jobs: dict[str, render.JobProgress] = {}
    R = pb.JOB_STATE_RUNNING
    render.apply_event(jobs, ev("a", 1, R, model_type=wpb.MODEL_TYPE_ENSEMBLE, progress=progress(
        1, epoch=wpb.EpochFinished(epoch=3, total_epochs=5, member="lstm", loss=0.1, validation_rmse=20.0))))
    render.apply_event(jobs, ev("b", 1, pb.JOB_STATE_QUEUED, model_type=wpb.MODEL_TYPE_XGBOOST,
                                queued=pb.JobQueued(position=1)))
    assert jobs["a"].phase == "training lstm" and jobs["a"].epoch == 3 and jobs["a"].total == 5
    assert jobs["b"].model_type == "xgboost" and jobs["b"].epoch == 0 and jobs["b"].phase == "queued #1"


def test_retrain_view_drives_one_bar_per_job() -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    with render.RetrainView(console) as view:
        for e in lstm_success_events("j1")[:6]:
            view.update(e)
        view.update(ev("j2", 1, pb.JOB_STATE_QUEUED, model_type=wpb.MODEL_TYPE_XGBOOST,
                       queued=pb.JobQueued(position=1)))
    tasks = {t.id: t for t in view.progress.tasks}
    t1, t2 = tasks[view.tasks["j1"]], tasks[view.tasks["j2"]]
    assert (t1.completed, t1.total) == (2, 10)
    assert t1.description.startswith("lstm") and "training" in t1.description
    assert t1.fields["val"] == "val rmse 24.50"
    assert t2.total is None and "xgboost" in t2.description
    text = out.getvalue()
    # Off a terminal, state changes are logged as lines (bars only render at the end).
    assert "j1 lstm: dispatched to 127.0.0.1:50052" in text
    assert "j2 xgboost: queued #1" in text


def test_event_json_keeps_proto_field_names() -> None:
    e = lstm_success_events()[4]
    line = render.to_json(e, indent=None)
    assert "\n" not in line
    assert '"job_id": "job-lstm"' in line and '"validation_rmse": 30.1' in line


@pytest.mark.parametrize(("delta", "expected"), [
    (timedelta(seconds=2), "just now"), (timedelta(seconds=42), "42 s ago"), (timedelta(minutes=5), "5 min ago"),
    (timedelta(hours=3, minutes=59), "3 h ago"), (timedelta(days=1, hours=2), "1 day ago"),
    (timedelta(days=9), "9 days ago"), (timedelta(minutes=-3), "in 3 min"),
])
def test_human_time(delta: timedelta, expected: str) -> None:
    assert render.human_time(ts(NOW - delta), NOW) == expected


def test_unset_time_is_never() -> None:
    assert render.human_time(Timestamp(), NOW) == "never"
    assert render.absolute_time(Timestamp(), NOW) == "—"
    assert render.absolute_time(ts(NOW - timedelta(hours=2)), NOW) == "2026-06-01 10:00:00 UTC (2 h ago)"


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("rmse", 21.2549, "21.25"), ("accuracy", 0.7843, "78.4%"), ("aqi_accuracy", 1.0, "100.0%"),
    ("r2", 0.62527, "0.625"), ("rmse", math.nan, "—"), ("rmse", None, "—"), ("latency_ms", 0.00123, "0.00123"),
    ("throughput", 123456.7, "123,457"), ("epochs", 40.0, "40"), ("train_samples", 12000.0, "12,000"), ("rmse", 24.0, "24.00"),
])
def test_fmt_metric(name: str, value: float | None, expected: str) -> None:
    assert render.fmt_metric(name, value) == expected


def test_parse_versions_and_job_states() -> None:
    assert render.parse_versions("1, 2,5") == [1, 2, 5]
    assert render.parse_versions(None) == []
    with pytest.raises(InvalidArgumentError) as err:
        render.parse_versions("1,two")
    assert err.value.field == "versions"
    assert render.job_state_value("Running") == pb.JOB_STATE_RUNNING
    with pytest.raises(InvalidArgumentError):
        render.job_state_value("sleeping")


def _version(v: int, rmse: float, stage: int = pb.STAGE_NONE) -> pb.ModelVersion:
    return pb.ModelVersion(name="m", version=v, stage=stage, metrics={
        "rmse": rmse, "mae": rmse * 0.7, "r2": 0.5, "accuracy": 0.7, "rmse_h1": rmse / 2, "baseline_rmse": 33.0})


def test_compare_table_marks_the_best_row_and_the_direction() -> None:
    resp = pb.CompareModelVersionsResponse(
        metric="rmse", direction=pb.METRIC_DIRECTION_LOWER_IS_BETTER, best_version=2,
        metric_names=["rmse", "mae", "r2", "accuracy", "rmse_h1", "baseline_rmse", "training_seconds"],
        versions=[pb.VersionComparison(version=_version(2, 20.0, pb.STAGE_PRODUCTION), rank=1, value=20.0),
                  pb.VersionComparison(version=_version(1, 25.0), rank=2, value=25.0, delta_to_best=0.25)])
    text = render.render_text(render.compare_table("m", resp))
    assert "lower is better" in text
    best_line = next(line for line in text.splitlines() if "★ best" in line)
    assert "v2" in best_line and "production" in best_line
    other = next(line for line in text.splitlines() if " v1 " in line)
    assert "★" not in other and "+25.0%" in other
    assert "rmse_h1" in text and "baseline" in text and "rmse_h24" not in text
    assert "training_seconds" not in text


def test_status_view_for_an_empty_registry_says_what_to_do() -> None:
    text = render.render_text(render.status_view(pb.GetStatusResponse(
        backend=pb.BackendStatus(healthy=True, tracking_uri="sqlite:///x.db", latency_ms=3))))
    assert "No models registered yet" in text and "aqimodels retrain" in text
    assert "MLflow backend: healthy" in text


def test_status_view_says_when_the_backend_is_unhealthy() -> None:
    text = render.render_text(render.status_view(pb.GetStatusResponse(
        backend=pb.BackendStatus(healthy=False, tracking_uri="postgresql://db/x", message="connection refused"))))
    assert "UNHEALTHY" in text and "connection refused" in text
    assert "No models registered yet" not in text


def test_connection_options_are_accepted_after_the_command_too() -> None:
    from aqimodels.client.cli import hoist_global_options

    assert hoist_global_options(["status", "--target", "h:1", "--json", "--token=t"]) == [
        "--target", "h:1", "--token=t", "status", "--json"]
    assert hoist_global_options(["--target", "h:1", "list", "m"]) == ["--target", "h:1", "list", "m"]
    assert hoist_global_options(["show", "m", "1", "--", "--target"]) == ["show", "m", "1", "--", "--target"]


def _plain(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, width=220, force_terminal=False, color_system=None).print(renderable)
    return out.getvalue()


def test_compare_shows_each_versions_dataset_and_marks_other_test_data_not_comparable() -> None:
    rows = [pb.VersionComparison(version=pb.ModelVersion(name="m", version=2, metrics={"rmse": 45.0}), rank=1,
                                 value=45.0, delta_to_best=0.0, comparable=True, dataset="beijing:/d test 2016..2017"),
            pb.VersionComparison(version=pb.ModelVersion(name="m", version=3, metrics={"rmse": 15.0}), rank=0,
                                 value=15.0, delta_to_best=math.nan, comparable=False, dataset="file:/uk.csv test 2020")]
    resp = pb.CompareModelVersionsResponse(versions=rows, metric="rmse", best_version=2, metric_names=["rmse"],
                                           reference_dataset="beijing:/d test 2016..2017")
    text = _plain(render.compare_table("m", resp))
    v3 = next(line for line in text.splitlines() if "file:/uk.csv" in line)
    assert "not comparable" in v3 and "★" not in v3
    assert "★ best" in next(line for line in text.splitlines() if "beijing:/d" in line)
    assert "ranked on beijing:/d test 2016..2017" in text


def test_show_prints_the_lineage() -> None:
    mv = pb.ModelVersion(name="aqi_predictor_ensemble", version=4, lineage=pb.VersionLineage(
        run_id="r1", dataset="synthetic", data_fingerprint="ab" * 32, stations="S01,S02", target="pm25",
        test_start="2024-01-01T00:00:00", test_end="2024-01-05T00:00:00", test_key="cd" * 32, code_version="0.1.0",
        git_commit="0123456789abcdef", members=["aqi_predictor_xgboost:3", "aqi_predictor_lstm:2"]))
    text = _plain(render.version_view(mv))
    for fragment in ("synthetic (target pm25)", "stations S01,S02", "2024-01-01T00:00:00 .. 2024-01-05T00:00:00",
                     "0.1.0 (git 0123456789ab)", "aqi_predictor_xgboost:3, aqi_predictor_lstm:2"):
        assert fragment in text, fragment
