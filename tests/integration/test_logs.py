"""Logs that say something (issue 13): a worker's health probes at debug, what changes at info, and
no MLflow notices triggered by our own models in a training's output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import structlog
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.api.training.v1 import worker_pb2_grpc
from aqimodels.training.main import create_worker
from aqimodels.training.servicer import WorkerConfig

TRAIN = """
import threading
from aqimodels.training import core
from aqimodels.training.runner import run_training
job = core.TrainJob(job_id="j1", model_type="xgboost", dataset="synthetic:stations=2,days=12",
                    config=core.TrainConfig(max_epochs=3), experiment_name="e",
                    registered_model_name="aqi_predictor_xgboost", ensemble_members=(), tags={}, start_time=None,
                    end_time=None)
for ev in run_training(job, threading.Event(), tracking_uri="sqlite:///{db}"):
    pass
print("trained")
"""


def test_a_training_prints_no_mlflow_notices_and_describes_its_version(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", TRAIN.replace("{db}", str(tmp_path / "m.db"))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr
    assert "Add type hints" not in done.stderr, done.stderr
    assert "CloudPickle" not in done.stderr, done.stderr
    # ... and MLflow's UI reads naturally: the model and the version say what they are (issue 13)
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert "xgboost forecaster of PM2.5 and AQI" in mlflow.get_registered_model("aqi_predictor_xgboost").description
    described = mlflow.get_model_version("aqi_predictor_xgboost", "1").description
    assert described.startswith("xgboost trained by aqimodels job j1 on synthetic:stations=2,days=12 "
                                "(2 stations, 288 hours). Test rmse "), described
    assert "persistence" in described and "+1/+6/+24 h" in described


def test_health_probes_log_at_debug_and_failures_at_info(tmp_path: Path) -> None:
    server, port, _ = create_worker(WorkerConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", port=0), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, structlog.testing.capture_logs() as logs:
            stub = worker_pb2_grpc.TrainingWorkerStub(channel)
            for _ in range(3):
                stub.GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=5)
            try:
                stub.ValidateDataset(wpb.ValidateDatasetRequest(dataset=wpb.DatasetSpec(spec="nonsense:x")), timeout=30)
            except grpc.RpcError:
                pass
        finished = [(e["log_level"], e["code"]) for e in logs if e["event"] == "rpc_finished"]
        assert finished == [("debug", "OK")] * 3 + [("info", "INVALID_ARGUMENT")], finished
    finally:
        server.stop(0)
