"""The real processes: `aqimodels serve` as a newcomer runs it, SIGTERM, a bad configuration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aqimodels.client import RegistryClient
from aqimodels.client.errors import AqiModelsError
from conftest import serve_process

AQIMODELS = str(Path(sys.executable).with_name("aqimodels"))


def _serve(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], int]:
    return serve_process(env, cwd=tmp_path)


def test_serve_runs_a_local_worker_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`make run`'s path: default SQLite store under ./mlruns, a local worker, SIGTERM drains."""
    proc, port = _serve(tmp_path)
    try:
        with RegistryClient(f"127.0.0.1:{port}") as client:
            assert client.health() == "SERVING"
            status = client.status()
            assert list(status.models) == [] and status.backend.healthy
            assert status.backend.tracking_uri.endswith("mlruns/mlflow.db")
            deadline = time.monotonic() + 90
            while not (client.status().workers and client.status().workers[0].healthy):
                assert time.monotonic() < deadline, client.status().workers
                time.sleep(0.5)
            worker_target = client.status().workers[0].target
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert (tmp_path / "mlruns" / "mlflow.db").exists()
        # the local worker went with it
        with RegistryClient(worker_target) as gone, pytest.raises(AqiModelsError):
            gone.health(timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_bad_environment_value_stops_serve_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run([AQIMODELS, "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "AQIMODELS_PORT": "not-a-port"})
    assert result.returncode != 0
    assert "AQIMODELS_PORT" in result.stderr


def test_the_readme_token_example_leaves_the_local_worker_working(tmp_path: Path) -> None:
    """`AQIMODELS_TOKENS_FILE=tokens.toml make run`: the local worker reads the same file and still
    trusts its registry (a per-process token handed over at spawn), so a retrain trains."""
    import grpc
    from aqimodels.api.training.v1 import worker_pb2 as wpb
    from aqimodels.api.training.v1 import worker_pb2_grpc
    from aqimodels.client.errors import UnauthenticatedError
    from aqimodels.client.tokens import new_token, toml_entry

    token = new_token()
    (tmp_path / "tokens.toml").write_text(toml_entry("ci-deployer", "admin", token))
    proc, port = _serve(tmp_path, AQIMODELS_TOKENS_FILE="tokens.toml")
    try:
        with RegistryClient(f"127.0.0.1:{port}") as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.status()
        with RegistryClient(f"127.0.0.1:{port}", token=token) as client:
            deadline = time.monotonic() + 90
            while not (client.status().workers and client.status().workers[0].healthy):
                assert time.monotonic() < deadline, client.status().workers
                time.sleep(0.5)
            events = list(client.retrain(["xgboost"], dataset="synthetic:stations=2,days=12",
                                         params=wpb.TrainParams(max_epochs=3)))
            assert events[-1].WhichOneof("event") == "succeeded", events[-1]
            with grpc.insecure_channel(client.status().workers[0].target) as channel:
                with pytest.raises(grpc.RpcError) as refused:  # the worker still refuses anyone else
                    worker_pb2_grpc.TrainingWorkerStub(channel).GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
