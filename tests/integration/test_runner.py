"""The runner end to end on a real MLflow SQLite store (no mocks)."""

from __future__ import annotations

import os
import threading

import mlflow
import numpy as np
import pytest
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import (
    DataLoaded,
    EpochFinished,
    Evaluating,
    Finished,
    Registering,
    Started,
    TrainConfig,
    TrainingCancelled,
    TrainJob,
)
from aqimodels.training.data import load_dataset
from aqimodels.training.runner import run_training
from mlflow import MlflowClient

SMALL = "synthetic:stations=3,days=14,seed=5"
FAST = TrainConfig(max_epochs=15, window_hours=12, extra={"max_depth": "3"})


def _run(job: TrainJob, uri: str, stop: threading.Event | None = None) -> list[object]:
    return list(run_training(job, stop or threading.Event(), tracking_uri=uri))


def test_xgboost_end_to_end(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    events = _run(TrainJob(job_id="job-1", model_type="xgboost", dataset=SMALL, config=FAST), uri)
    kinds = [type(e) for e in events]
    assert kinds[:2] == [Started, DataLoaded]
    assert kinds[-3:] == [Evaluating, Registering, Finished]
    epochs = [e for e in events if isinstance(e, EpochFinished)]
    assert 1 <= len(epochs) <= 15 and [e.epoch for e in epochs] == list(range(1, len(epochs) + 1))
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.version == 1 and fin.model_uri == "models:/aqi_predictor_xgboost/1"

    client = MlflowClient(uri)
    run = client.get_run(fin.run_id)
    assert run.info.status == "FINISHED"
    m, p = run.data.metrics, run.data.params
    for k in ("rmse", "mae", "r2", "accuracy", "aqi_accuracy", "rmse_h1", "rmse_h6", "rmse_h24", "baseline_rmse",
              "baseline_rmse_h6", "skill_h6", "training_seconds", "peak_memory_mb", "inference_latency_ms",
              "inference_throughput", "epochs_run", "best_epoch", "final_loss", "early_stopped", "train_samples"):
        assert k in m, k
    assert m["rmse"] > 0 and m["inference_throughput"] > 0
    assert p["model_type"] == "xgboost" and p["window_hours"] == "12" and p["dataset"] == SMALL
    assert p["data_fingerprint"] == run.data.tags["data_fingerprint"] == load_dataset(SMALL).fingerprint()
    assert len(client.get_metric_history(fin.run_id, "val_rmse")) == len(epochs)
    arts = {a.path for a in client.list_artifacts(fin.run_id)}
    assert {"pipeline.json", "features.json"} <= arts
    assert (tmp_path / "artifacts").is_dir() and not os.path.exists("mlruns/" + fin.run_id)

    mv = client.get_model_version("aqi_predictor_xgboost", "1")
    assert mv.tags["job_id"] == "job-1" and mv.tags["model_type"] == "xgboost" and mv.run_id == fin.run_id

    # reload through the registry and forecast from a raw long-format frame
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/aqi_predictor_xgboost/1")
        raw = load_dataset(SMALL).frame.tail(3 * 24)  # the last station's rows only: S01, S02 missing
        frame = load_dataset(SMALL).slice(start="2000-01-01").frame
        frame = frame[frame["time"] >= frame["time"].max() - np.timedelta64(30, "h")]
        out = model.predict(frame)
        assert len(out) == 3 * 24
        assert sorted(out["station"].unique()) == ["S01", "S02", "S03"]
        assert out.groupby("station")["horizon"].apply(list).map(lambda h: h == list(range(1, 25))).all()
        assert (out["pm25"] >= 0).all() and out["aqi_category"].str.len().gt(0).all()
        with pytest.raises(InvalidArgumentError, match="lacks station"):
            model.predict(raw)  # two stations missing
        every = model.predict(frame, params={"all_origins": True})
        assert every["origin_time"].nunique() == 31 - 12 + 1
    finally:
        mlflow.set_tracking_uri(None)


def test_validation_errors_before_any_run(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    bad = [
        TrainJob(job_id="a", model_type="xgboost", dataset="nosuch:x"),
        TrainJob(job_id="b", model_type="xgboost", dataset="synthetic:days=2", config=TrainConfig(window_hours=24)),
        TrainJob(job_id="c", model_type="ensemble", dataset=SMALL),
    ]
    for job in bad:
        with pytest.raises(InvalidArgumentError):
            _run(job, uri)
    with pytest.raises(InvalidArgumentError) as e:
        _run(bad[2], uri)
    assert "at least one trained member" in e.value.message and e.value.field == "model_types"
    assert not (tmp_path / "mlflow.db").exists()  # nothing touched MLflow


def test_cancel_mid_training_kills_run_and_registers_nothing(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    stop = threading.Event()
    job = TrainJob(job_id="cancel-me", model_type="xgboost", dataset=SMALL,
                   config=TrainConfig(max_epochs=500, window_hours=12, early_stopping_patience=500))
    seen = []
    with pytest.raises(TrainingCancelled):
        for ev in run_training(job, stop, tracking_uri=uri):
            seen.append(ev)
            if isinstance(ev, EpochFinished) and ev.epoch == 3:
                stop.set()
    run_id = seen[0].run_id
    assert max(e.epoch for e in seen if isinstance(e, EpochFinished)) < 10
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.search_model_versions("name='aqi_predictor_xgboost'") == []


def test_failure_marks_run_failed(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = TrainJob(job_id="boom", model_type="xgboost", dataset=SMALL,
                   config=TrainConfig(max_epochs=5, window_hours=12, extra={"max_depth": "-4"}))
    started: list[object] = []
    with pytest.raises(Exception):  # noqa: B017 - xgboost's own error for a bad parameter
        started.extend(run_training(job, threading.Event(), tracking_uri=uri))
    client = MlflowClient(uri)
    assert client.get_run(started[0].run_id).info.status == "FAILED"
    assert client.search_model_versions("name='aqi_predictor_xgboost'") == []


@pytest.mark.slow
def test_beijing_slice_xgboost_beats_persistence_at_6h(tmp_path, shared_beijing) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = TrainJob(job_id="bj", model_type="xgboost", dataset=f"beijing:{shared_beijing}",
                   start_time=np.datetime64("2016-09-01"), end_time=np.datetime64("2017-01-01"),
                   config=TrainConfig(max_epochs=150, window_hours=24))
    fin = _run(job, uri)[-1]
    assert isinstance(fin, Finished)
    m = fin.metrics
    assert m["data_stations"] == 12
    assert m["rmse_h6"] < m["baseline_rmse_h6"], (m["rmse_h6"], m["baseline_rmse_h6"])
    assert m["skill_h6"] > 0  # measured: small (about 0.002 on this slice); the bar is "beats persistence"
