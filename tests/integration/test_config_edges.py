"""Every variable of the README's configuration tables, set to a bad value, stops the process
that reads it at start: exit 2 and one line naming the variable, never a traceback (issue 13).

The variables come from the README itself, so a variable documented without a bad value here
fails the test. Most are checked in-process (``main()`` of `serve` and `worker`, the CLI through
CliRunner); a selection runs the installed console script as a newcomer would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
AQIMODELS = str(Path(sys.executable).with_name("aqimodels"))


def readme_variables() -> list[str]:
    """Every variable named in the README's configuration tables (``_KEY`` after ``X_CERT`` is ``X_KEY``)."""
    found: list[str] = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("| `") or "_" not in line.split("|")[1]:
            continue
        previous = ""
        for name in re.findall(r"`([A-Z_][A-Z0-9_]*)`", line.split("|")[1]):
            full = previous.rsplit("_", 1)[0] + name if name.startswith("_") and previous else name
            if full.startswith(("AQIMODELS_", "MLFLOW_")):
                found.append(full)
                previous = full
    return found


# A file that is neither TOML nor PEM, and a "folder" below a file (unwritable even for root).
@pytest.fixture(scope="module")
def junk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("junk") / "junk.txt"
    path.write_text("this is [not toml = and not a certificate\n")
    return path


def bad_values(junk: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """variable -> (bad value, the processes that read it: serve, worker, cli)."""
    j = str(junk)
    return {
        "MLFLOW_TRACKING_URI": ("nonsense://x", ("serve", "worker")),
        "MLFLOW_EXPERIMENT_NAME": ("x" * 300, ("serve", "worker")),
        "MLFLOW_AUTO_PROMOTION": ("maybe", ("serve",)),
        "AQIMODELS_HOST": ("::::", ("serve",)),
        "AQIMODELS_PORT": ("not-a-port", ("serve",)),
        "AQIMODELS_WORKERS": ("::::", ("serve",)),
        "AQIMODELS_WORKER_HOST": ("::::", ("worker",)),
        "AQIMODELS_WORKER_PORT": ("70000", ("worker",)),
        "AQIMODELS_WORKER_CAPACITY": ("0", ("worker",)),
        "AQIMODELS_METRICS_PORT": ("port", ("serve",)),
        "AQIMODELS_WORKER_METRICS_PORT": ("-1", ("worker",)),
        "AQIMODELS_DATABASE_URL": ("garbage://x", ("serve",)),
        "AQIMODELS_PROMOTION_METRIC": ("bad metric!!", ("serve",)),
        "AQIMODELS_PROMOTION_MARGIN": ("-0.5", ("serve",)),
        "AQIMODELS_CACHE_TTL_SECONDS": ("soon", ("serve",)),
        "AQIMODELS_LOG_FORMAT": ("xml", ("serve",)),
        "AQIMODELS_LOG_LEVEL": ("loud", ("serve",)),
        "AQIMODELS_TOKENS_FILE": (j, ("serve", "worker")),
        "AQIMODELS_TLS_CERT": (j, ("serve", "worker")),
        "AQIMODELS_TLS_KEY": (j, ("serve", "worker")),
        "AQIMODELS_TLS_CLIENT_CA": (j, ("serve", "worker")),
        "AQIMODELS_WORKER_TOKEN": ("two words", ("serve",)),
        "AQIMODELS_WORKER_CA_CERT": (j, ("serve",)),
        "AQIMODELS_WORKER_CLIENT_CERT": (j, ("serve",)),
        "AQIMODELS_WORKER_CLIENT_KEY": (j, ("serve",)),
        "AQIMODELS_TARGET": ("::::", ("cli",)),
        "AQIMODELS_TOKEN": ("two words", ("cli",)),
        "AQIMODELS_CA_CERT": (j, ("cli",)),
        "AQIMODELS_DEGRADATION_RATIO": ("0.5", ("serve",)),
        "AQIMODELS_DEGRADATION_MIN_SAMPLES": ("many", ("serve",)),
        "AQIMODELS_DEGRADATION_WINDOW_HOURS": ("0", ("serve",)),
        "AQIMODELS_RETRAIN_ON_DEGRADATION": ("sometimes", ("serve",)),
        "AQIMODELS_RETRAIN_SCHEDULE": ("every day", ("serve",)),
        "AQIMODELS_RETRAIN_MODELS": ("xgboost,forest", ("serve",)),
        "AQIMODELS_RETRAIN_DATASET": ("nonsense:::", ("serve",)),
        "AQIMODELS_RETENTION": ("keep_last=0", ("serve",)),
        "AQIMODELS_ARTIFACT_LOCATION": ("nonsense://y", ("serve", "worker")),
        "AQIMODELS_JOB_LEASE_SECONDS": ("500", ("serve",)),
        "AQIMODELS_WORKER_RETAIN_SECONDS": ("0.5", ("worker",)),
        "AQIMODELS_SHUTDOWN_GRACE_SECONDS": ("soon", ("serve",)),
        "AQIMODELS_DB_CONNECT_TIMEOUT_SECONDS": ("0", ("serve",)),
        "AQIMODELS_DB_STATEMENT_TIMEOUT_SECONDS": ("-1", ("serve",)),
        "AQIMODELS_DB_LOCK_TIMEOUT_SECONDS": ("soon", ("serve",)),
        "AQIMODELS_DB_POOL_SIZE": ("0", ("serve",)),
        "AQIMODELS_DB_START_TIMEOUT_SECONDS": ("-3", ("serve",)),
        "AQIMODELS_HEALTH_INTERVAL_SECONDS": ("-1", ("serve",)),
        "AQIMODELS_HEALTH_TIMEOUT_SECONDS": ("soon", ("serve",)),
        "AQIMODELS_MLFLOW_HTTP_TIMEOUT_SECONDS": ("0", ("serve",)),
        "AQIMODELS_MLFLOW_HTTP_MAX_RETRIES": ("99", ("serve",)),
        "AQIMODELS_RECONCILE_AFTER_SECONDS": ("0", ("serve",)),
        "AQIMODELS_WEBHOOK_RETRY_SECONDS": ("soon", ("serve",)),
        "AQIMODELS_WEBHOOK_BACKOFF_SECONDS": ("0", ("serve",)),
        "AQIMODELS_WEBHOOK_BACKOFF_MAX_SECONDS": ("0.5", ("serve",)),  # below the first backoff (1)
        "AQIMODELS_WEBHOOK_TIMEOUT_SECONDS": ("301", ("serve",)),
        "AQIMODELS_WEBHOOK_LEASE_SECONDS": ("15", ("serve",)),  # not more than twice the timeout (10)
        "AQIMODELS_WEBHOOK_POLL_SECONDS": ("61", ("serve",)),
        "AQIMODELS_WEBHOOK_LOG_RETENTION_DAYS": ("-1", ("serve",)),
        "AQIMODELS_APPROVAL_MODELS": ("aqi_predictor_lstm;drop table", ("serve",)),
        "AQIMODELS_APPROVAL_EXPIRY_SECONDS": ("0", ("serve",)),
    }


def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AQIMODELS_") or name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                                                     "MLFLOW_AUTO_PROMOTION"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def _one_line_naming(stderr: str, variable: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("configuration error: ") and variable in lines[0], stderr
    assert "Traceback" not in stderr


def test_every_documented_variable_has_a_bad_value(junk: Path) -> None:
    documented = readme_variables()
    assert len(documented) >= 35, documented
    assert set(documented) - set(bad_values(junk)) == set()


def test_each_bad_value_stops_its_process_with_one_line(junk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import aqimodels.training.main as worker_main
    from aqimodels.client.cli import app as cli_app
    from aqimodels.server import app
    from aqimodels.server.main import main as serve_main

    def started(*_: object, **__: object) -> None:
        raise AssertionError("the process started despite the bad value")

    monkeypatch.setattr(app, "serve", started)  # only reached when a bad value slips through
    monkeypatch.setattr(worker_main, "create_worker", started)
    runner = CliRunner()
    checked = 0
    for variable, (value, readers) in bad_values(junk).items():
        for reader in readers:
            _clean_env(monkeypatch, tmp_path)
            monkeypatch.setenv(variable, value)
            if reader == "cli":
                result = runner.invoke(cli_app, ["status"], env={variable: value})
                assert result.exit_code == 2, (variable, result.output)
                _one_line_naming(result.stderr if result.stderr_bytes is not None else result.output, variable)
            else:
                code = serve_main() if reader == "serve" else worker_main.main()
                err = capsys.readouterr().err
                assert code == 2, (variable, reader, err)
                _one_line_naming(err, variable)
            checked += 1
    assert checked >= 40


def test_the_console_scripts_exit_2_without_a_traceback(junk: Path, tmp_path: Path) -> None:
    """The real processes, side by side: the issue's cases that printed tracebacks or started anyway."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AQIMODELS_") and not k.startswith("MLFLOW_")}
    base.update({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "AQIMODELS_WORKERS": "none",
                 "MLFLOW_DISABLE_TELEMETRY": "true"})
    cases = [("serve", "MLFLOW_TRACKING_URI", "nonsense://x"), ("worker", "MLFLOW_TRACKING_URI", "nonsense://x"),
             ("serve", "AQIMODELS_TOKENS_FILE", str(junk)), ("serve", "AQIMODELS_DATABASE_URL", "garbage://x"),
             ("serve", "AQIMODELS_TLS_CERT", str(junk)), ("worker", "AQIMODELS_ARTIFACT_LOCATION", "nonsense://y"),
             ("serve", "AQIMODELS_WORKERS", "::::"), ("worker", "AQIMODELS_ARTIFACT_LOCATION", f"{junk}/below-a-file")]
    procs = []
    for command, variable, value in cases:
        env = {**base, variable: value}
        if variable == "AQIMODELS_TLS_CERT":
            env["AQIMODELS_TLS_KEY"] = str(junk)
        procs.append((command, variable, subprocess.Popen([AQIMODELS, command], env=env, cwd=tmp_path,
                                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for command, variable, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (command, variable, err)
        _one_line_naming(err, variable)


def test_an_unwritable_artifact_location_is_found_before_training(tmp_path: Path, junk: Path) -> None:
    """An experiment whose artifact folder cannot be written: Train answers FAILED_PRECONDITION at once."""
    import grpc
    from aqimodels.api.training.v1 import worker_pb2 as wpb
    from aqimodels.api.training.v1 import worker_pb2_grpc
    from aqimodels.training.main import create_worker
    from aqimodels.training.servicer import WorkerConfig
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment("below-a-file", artifact_location=f"{junk}/artifacts")
    server, port, _ = create_worker(WorkerConfig(tracking_uri=uri, port=0), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = worker_pb2_grpc.TrainingWorkerStub(channel).Train(wpb.TrainRequest(
                job_id="job-artifacts", model_type=wpb.MODEL_TYPE_XGBOOST, experiment_name="below-a-file",
                dataset=wpb.DatasetSpec(spec="synthetic:stations=2,days=10"), params=wpb.TrainParams(max_epochs=2)),
                timeout=120)
            with pytest.raises(grpc.RpcError) as raised:
                events = list(call)
                pytest.fail(f"training ran: {events}")
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is not writable" in (raised.value.details() or "")
        runs = MlflowClient(tracking_uri=uri).search_runs(
            [MlflowClient(tracking_uri=uri).get_experiment_by_name("below-a-file").experiment_id])
        assert runs == []  # no run was started
    finally:
        server.stop(0)
