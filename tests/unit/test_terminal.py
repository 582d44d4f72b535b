"""The terminal edges of issue 13, rendered at 80 and 160 columns and off a terminal (piped):
progress bars that keep their numbers, early stopping shown as what ran, an ETA, a periodic
line in pipes, comparisons by a horizon metric, whole numbers, JSON integers, compact status."""

from __future__ import annotations

import io
import re
import time

import pytest
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import render
from google.protobuf.struct_pb2 import Struct
from rich.console import Console

R = pb.JOB_STATE_RUNNING
WAITING = "waiting for its members: job-0a1b2c3d4e5f, job-1a2b3c4d5e6f, job-2a3b4c5d6e7f"


def ev(job: str, seq: int, state: int, model_type: int = wpb.MODEL_TYPE_LSTM, **kind: object) -> pb.RetrainEvent:
    return pb.RetrainEvent(job_id=job, sequence=seq, model_type=model_type, state=state, **kind)  # type: ignore[arg-type]


def epoch(job: str, seq: int, n: int, total: int, model_type: int = wpb.MODEL_TYPE_LSTM) -> pb.RetrainEvent:
    return ev(job, seq, R, model_type, progress=wpb.TrainEvent(epoch=wpb.EpochFinished(
        epoch=n, total_epochs=total, loss=0.5 / n, validation_rmse=30.0 - n, elapsed_seconds=2.0 * n)))


def console(width: int | None, terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width or 4096, force_terminal=terminal, color_system=None,
                   legacy_windows=False), out


@pytest.mark.parametrize("width", [80, 160])
def test_bars_and_numbers_survive_a_long_queued_text(width: int) -> None:
    c, _ = console(width, True)
    with render.RetrainView(c) as view:
        view.update(epoch("job-lstm", 1, 3, 30))
        view.update(ev("job-ens", 1, pb.JOB_STATE_QUEUED, wpb.MODEL_TYPE_ENSEMBLE,
                       queued=pb.JobQueued(position=1, reason=WAITING)))
        view.progress.refresh()
    lines = [line for line in render.render_text(view.progress.make_tasks_table(view.progress.tasks),
                                                 width=width).splitlines() if line.strip()]
    assert all(len(line) <= width for line in lines), lines
    lstm = next(line for line in lines if line.startswith("lstm"))
    assert "3/30" in lstm and "loss 0.1667" in lstm and "val rmse 27.00" in lstm and "ETA" in lstm, lstm
    ensemble = next(line for line in lines if line.startswith("ensemble"))
    assert "…" in ensemble or width >= 160, ensemble  # the status text gives way, not the bar


def test_early_stopping_shows_what_ran() -> None:
    jobs: dict[str, render.JobProgress] = {}
    for e in [ev("j", 1, R, progress=wpb.TrainEvent(started=wpb.TrainStarted(total_steps=30))),
              *[epoch("j", 1 + i, i, 30) for i in range(1, 7)],
              ev("j", 8, R, progress=wpb.TrainEvent(evaluating=wpb.Evaluating(test_samples=10))),
              ev("j", 9, R, progress=wpb.TrainEvent(finished=wpb.TrainFinished(
                  version=3, metrics={"rmse": 20.0, "epochs_run": 6, "best_epoch": 1, "early_stopped": 1}))),
              ev("j", 10, pb.JOB_STATE_SUCCEEDED, succeeded=pb.JobSucceeded(version=pb.ModelVersion(
                  version=3, metrics={"rmse": 20.0, "epochs_run": 6, "best_epoch": 1, "early_stopped": 1})))]:
        job = render.apply_event(jobs, e)
        if e.sequence == 8:
            assert (job.completed, job.total) == (6, 30)
    assert (job.completed, job.total) == (6, 30)
    assert "6/30, stopped early, best epoch 1" in job.description
    assert render.eta_seconds(job) is None


def test_xgboost_stopping_at_round_49_of_300_shows_49() -> None:
    jobs: dict[str, render.JobProgress] = {}
    render.apply_event(jobs, epoch("x", 1, 49, 300, wpb.MODEL_TYPE_XGBOOST))
    job = render.apply_event(jobs, ev("x", 2, pb.JOB_STATE_SUCCEEDED, wpb.MODEL_TYPE_XGBOOST,
                                      succeeded=pb.JobSucceeded(version=pb.ModelVersion(
                                          version=1, metrics={"epochs_run": 49, "best_epoch": 39,
                                                              "early_stopped": 1}))))
    assert (job.completed, job.total) == (49, 300)
    assert "49/300, stopped early, best epoch 39" in job.description


def test_eta_once_there_is_a_rate() -> None:
    jobs: dict[str, render.JobProgress] = {}
    job = render.apply_event(jobs, ev("j", 1, R, progress=wpb.TrainEvent(started=wpb.TrainStarted(total_steps=10))))
    assert render.eta_seconds(job) is None and "ETA" not in render.progress_fields(job)["elapsed"]
    job = render.apply_event(jobs, epoch("j", 2, 2, 10))  # 2 epochs in 4 s: 8 left take 16 s
    assert render.eta_seconds(job) == pytest.approx(16.0)
    assert render.progress_fields(job)["elapsed"] == "4 s, ETA 16 s"


def test_off_a_terminal_a_progress_line_comes_at_least_every_interval() -> None:
    c, out = console(None, False)
    with render.RetrainView(c, heartbeat_seconds=0.2) as view:
        view.update(epoch("job-gnn", 1, 1, 30, wpb.MODEL_TYPE_GNN))
        time.sleep(1.5)  # no event meanwhile (a long GNN epoch)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("job-gnn gnn:") and "1/30" in line]
    assert len(lines) >= 2, out.getvalue()
    assert "ETA" in lines[0] and "val rmse 29.00" in lines[0]


def versions_compared() -> pb.CompareModelVersionsResponse:
    metrics = {"rmse": 15.0, "mae": 10.0, "r2": 0.8, "rmse_h1": 8.0, "rmse_h6": 14.0, "rmse_h24": 20.0,
               "baseline_rmse": 15.11, "baseline_rmse_h6": 12.03}
    return pb.CompareModelVersionsResponse(
        metric="rmse_h6", direction=pb.METRIC_DIRECTION_LOWER_IS_BETTER, best_version=1,
        metric_names=list(metrics),
        versions=[pb.VersionComparison(version=pb.ModelVersion(version=1, metrics=metrics), rank=1,
                                       delta_to_best=0.0)])


@pytest.mark.parametrize("width", [80, 160, None])
def test_compare_by_a_horizon_metric(width: int | None) -> None:
    text = render.render_text(render.compare_table("m", versions_compared(), width), width=width or 4096)
    assert all(len(line.rstrip()) <= (width or 4096) for line in text.splitlines())
    header = next(line for line in text.splitlines() if line.startswith("rank"))
    cells = [c.strip() for c in re.split(r"\s{2,}", header.strip())]
    assert cells.count("rmse_h6 *") == 1 and "rmse_h6" not in cells, cells
    assert "baseline +6 h" in cells and "best" in cells and "" not in cells, cells
    row = next(line for line in text.splitlines() if "v1" in line)
    assert "12.03" in row and "15.11" not in row


def test_whole_numbers_print_without_decimals() -> None:
    assert render.fmt_metric("best_epoch", 6.0) == "6"
    assert render.fmt_metric("epochs_run", 30.0) == "30"
    assert render.fmt_metric("rmse", 25.0) == "25.00"
    assert render.fmt_metric("training_seconds", 20.0) == "20.00"
    mv = pb.ModelVersion(name="m", version=1, metrics={"best_epoch": 6.0, "rmse": 20.5})
    text = render.render_text(render.version_view(mv))
    assert "6.00" not in text and " 6 " in text


def test_json_integers_in_audit_before_and_after() -> None:
    before, after = Struct(), Struct()
    before.update({"production": 1, "archived": [2, 3]})
    after.update({"production": 4, "ratio": 1.5})
    event = pb.AuditEvent(id="a", before=before, after=after)
    data = render.to_dict(pb.ListAuditEventsResponse(events=[event]))
    assert data["events"][0]["before"] == {"production": 1, "archived": [2, 3]}
    assert data["events"][0]["after"] == {"production": 4, "ratio": 1.5}
    assert re.search(r'"production": 1[,\n]', render.to_json({"events": [render.to_dict(event)]}))


def status_response() -> pb.GetStatusResponse:
    models = []
    for name in ("aqi_predictor_ensemble", "aqi_predictor_gnn", "aqi_predictor_lstm", "aqi_predictor_xgboost"):
        v = pb.ModelVersion(name=name, version=7, metrics={"rmse": 19.25})
        models.append(pb.ModelStatus(model=pb.RegisteredModel(name=name, version_count=7), production=v,
                                     latest=v, health=pb.MODEL_HEALTH_HEALTHY))
    return pb.GetStatusResponse(models=models, backend=pb.BackendStatus(healthy=True, tracking_uri="sqlite:///x"))


@pytest.mark.parametrize("width", [80, 160, None])
def test_status_is_compact_by_default(width: int | None) -> None:
    text = render.render_text(render.status_view(status_response()), width=width or 4096)
    lines = text.splitlines()
    assert len(lines) <= 14, text  # 4 models: one table row each, then backend and workers
    for name in ("aqi_predictor_ensemble", "aqi_predictor_xgboost"):
        assert any(name in line for line in lines), text  # full names, never cut
    wide = render.render_text(render.status_view(status_response(), wide=True), width=width or 4096)
    assert len(wide.splitlines()) > 30 and "accuracy" in wide


def _with_jobs_and_workers(resp: pb.GetStatusResponse) -> pb.GetStatusResponse:
    resp.models[0].running_jobs.append(pb.RetrainJob(job_id="job-0a1b2c3d4e5f", state=R, epoch=3, total_epochs=30))
    resp.models[1].ClearField("production")
    resp.models[1].health = pb.MODEL_HEALTH_NO_PRODUCTION
    resp.server_version = "0.1.0"
    return resp


@pytest.mark.parametrize("case", ["models", "empty", "backend down"])
def test_piped_status_prints_the_same_lines_without_rich(case: str) -> None:
    """Off a terminal `status` prints render.plain_status (no rich loaded): line for line what rich
    prints there, full names, nothing cut."""
    resp = _with_jobs_and_workers(status_response()) if case == "models" else pb.GetStatusResponse(
        backend=pb.BackendStatus(healthy=case == "empty", tracking_uri="postgresql://db/x", message="refused"))
    rich_lines = [line.rstrip() for line in render.render_text(render.status_view(resp), width=4096).splitlines()]
    assert render.plain_status(resp).splitlines() == rich_lines
    if case == "models":
        row = {line.split()[0]: line for line in rich_lines if line.startswith("aqi_predictor_")}
        assert row["aqi_predictor_ensemble"].endswith("job-0a1b2c3d4e5f (running, epoch 3/30)")
        assert "no prod" in row["aqi_predictor_gnn"]


def test_piped_status_lists_the_workers_in_plain_columns() -> None:
    resp = status_response()
    resp.workers.extend([pb.WorkerStatus(target="10.0.0.7:50052", healthy=True, running=1, capacity=2),
                         pb.WorkerStatus(target="10.0.0.8:50052", healthy=False, capacity=1, restarts=2,
                                         message="UNAVAILABLE: connection refused")])
    lines = render.plain_status(resp).splitlines()
    head = lines.index("Training workers")
    assert re.split(r"\s{2,}", lines[head + 1]) == ["worker", "health", "running", "restarts", "message"]
    assert re.split(r"\s{2,}", lines[head + 3]) == ["10.0.0.7:50052", "healthy", "1/2", "0"]
    assert re.split(r"\s{2,}", lines[head + 4]) == ["10.0.0.8:50052", "unhealthy", "0/1", "2",
                                                    "UNAVAILABLE: connection refused"]
