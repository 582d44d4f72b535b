"""The ``aqimodels`` CLI against a real registry server over a real MLflow SQLite store.

Most tests run the Typer app in-process through ``CliRunner`` (fast); a few run the installed
``.venv/bin/aqimodels`` console script as a true subprocess. The retrain and jobs commands run
against a scripted job manager plugged into the real server (the training worker is not needed to
exercise the CLI's streaming, JSON, detach and error paths).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.cli import app
from aqimodels.client.errors import JobNotFoundError
from conftest import Registry, realistic_metrics, start_registry
from typer.testing import CliRunner, Result

LSTM = "aqi_predictor_lstm"
XGB = "aqi_predictor_xgboost"
AQIMODELS = Path(sys.executable).parent / "aqimodels"
runner = CliRunner(env={"COLUMNS": "220", "AQIMODELS_TARGET": None, "AQIMODELS_TOKEN": None})


@pytest.fixture(autouse=True)
def _server_logs_stay_out_of_cli_output() -> Iterator[list[Any]]:
    """The in-process server logs through structlog to the sys.stdout of the moment, which CliRunner
    swaps for its capture; captured logs keep the CLI's own output clean."""
    with structlog.testing.capture_logs() as logs:
        yield logs


def cli(reg: Registry | str, *args: str) -> Result:
    target = reg if isinstance(reg, str) else reg.target
    return runner.invoke(app, ["--target", target, *args])


def ok(reg: Registry | str, *args: str) -> str:
    result = cli(reg, *args)
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stderr == "", result.stderr
    return result.stdout


def failed(reg: Registry | str, *args: str, code: str) -> Result:
    result = cli(reg, *args)
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.startswith(f"{code}: "), result.stderr
    assert result.stdout == ""
    return result


def rows(out: str) -> list[list[str]]:
    """The cells of every table body row in rich output."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines()
            if line.lstrip().startswith("│")]


def simple_rows(out: str) -> list[list[str]]:
    """The cells of a borderless table (compare, compact status): the lines under its header rule."""
    found: list[list[str]] = []
    under = False
    for line in out.splitlines():
        if line.startswith("─"):
            under = True
        elif under and line.strip() and line.startswith((" ", "1", "2", "3", "4", "5", "6", "7", "8", "9", "—")):
            found.append([c for c in re.split(r"\s{2,}", line.strip())])
        else:
            under = False
    return found


def metrics(rmse: float) -> dict[str, float]:
    m = realistic_metrics(0)
    m.update(rmse=rmse, mae=rmse * 0.7, rmse_h1=rmse * 0.5, rmse_h6=rmse * 0.9, rmse_h24=rmse * 1.3)
    return m


@pytest.fixture
def lstm(sqlite_registry: Registry) -> Registry:
    """LSTM v1..v3 with rmse 25, 20 (best), 30; v1 in production."""
    sqlite_registry.seed(LSTM, [metrics(25.0), metrics(20.0), metrics(30.0)], tags={"team": "air"})
    sqlite_registry.client.promote(LSTM, 1, "production")  # type: ignore[attr-defined]
    return sqlite_registry


def stage_of(reg: Registry, version: int) -> int:
    return int(reg.client.get_version(LSTM, version).stage)  # type: ignore[attr-defined]


# ---- status ----

def test_empty_registry_says_so_and_what_to_run(sqlite_registry: Registry) -> None:
    out = ok(sqlite_registry, "status")
    assert "No models registered yet" in out
    assert "aqimodels retrain" in out and "make demo" in out
    assert "MLflow backend: healthy" in out
    assert "Training workers: none configured" in out
    assert "No models registered yet" in ok(sqlite_registry, "list")


def test_status_shows_pointers_with_metrics_and_backend(lstm: Registry) -> None:
    lstm.client.promote(LSTM, 3, "staging")  # type: ignore[attr-defined]
    compact = ok(lstm, "status")
    row = next(re.split(r"\s{2,}", line.strip()) for line in compact.splitlines() if line.startswith(LSTM))
    assert row[1:6] == ["healthy", "v1 25.00", "v3 30.00", "v3 30.00", "just now"], row
    assert lstm.tracking_uri in compact and "running jobs" not in compact
    out = ok(lstm, "status", "--wide")
    assert LSTM in out and "healthy" in out and "3 versions" in out and "last trained just now" in out
    table = {r[0]: r for r in rows(out)}
    assert table["production"][1:3] == ["v1", "25.00"]
    assert table["staging"][1:3] == ["v3", "30.00"]
    assert table["latest"][1:3] == ["v3", "30.00"]
    assert "r2" in out and "accuracy" in out and "running jobs: none" in out
    assert lstm.tracking_uri in out


def test_status_of_some_models(lstm: Registry) -> None:
    lstm.seed(XGB, [metrics(22.0)])
    both = json.loads(ok(lstm, "status", "--json"))["models"]
    assert sorted(m["model"]["name"] for m in both) == sorted([LSTM, XGB])
    one = json.loads(ok(lstm, "status", "--model", XGB, "--json"))["models"]
    assert [m["model"]["name"] for m in one] == [XGB]
    by_prefix = json.loads(ok(lstm, "status", "--prefix", LSTM[:-2], "--json"))["models"]
    assert [m["model"]["name"] for m in by_prefix] == [LSTM]
    failed(lstm, "status", "--model", "no_such_model", code="NOT_FOUND")


# ---- list, show, compare ----

def test_list_models_and_versions(lstm: Registry) -> None:
    lstm.seed(XGB, [metrics(22.0)])
    out = ok(lstm, "list")
    table = {r[0]: r for r in rows(out)}
    assert table[LSTM][1:4] == ["3", "v3", "v1"]  # versions, latest, production
    assert table[XGB][1:4] == ["1", "v1", "—"]

    out = ok(lstm, "list", LSTM)
    assert [r[0] for r in rows(out)] == ["v3", "v2", "v1"]

    prod = json.loads(ok(lstm, "list", LSTM, "--stage", "production", "--json"))["versions"]
    assert [int(v["version"]) for v in prod] == [1]
    best_first = json.loads(ok(lstm, "list", LSTM, "--order-by", "metric.rmse", "--json"))["versions"]
    assert [int(v["version"]) for v in best_first] == [2, 1, 3]
    limited = json.loads(ok(lstm, "list", LSTM, "--limit", "2", "--json"))["versions"]
    assert len(limited) == 2
    everywhere = json.loads(ok(lstm, "list", "--stage", "production", "--json"))["versions"]
    assert [(v["name"], int(v["version"])) for v in everywhere] == [(LSTM, 1)]


def test_show_prints_identity_sorted_metrics_and_tags(lstm: Registry) -> None:
    mv = lstm.client.get_version(LSTM, 2)  # type: ignore[attr-defined]
    out = ok(lstm, "show", LSTM, "2")
    assert mv.run_id in out and f"models:/{LSTM}/2" in out and "UTC" in out
    names = [r[0] for r in rows(out) if r[0] in mv.metrics]
    assert names == sorted(mv.metrics) and len(names) == len(mv.metrics)
    assert "team" in out and "air" in out
    assert "20.00" in out  # its rmse


def test_compare_ranks_and_marks_the_best(lstm: Registry) -> None:
    out = ok(lstm, "compare", LSTM)
    assert "lower is better" in out
    best = [r for r in simple_rows(out) if r[-1] == "★ best"]
    assert len(best) == 1 and best[0][:2] == ["1", "v2"]
    for col in ("rmse", "mae", "r2", "accuracy", "rmse_h1", "rmse_h6", "rmse_h24", "baseline"):
        assert col in out
    assert [r[:2] for r in simple_rows(out)] == [["1", "v2"], ["2", "v1"], ["3", "v3"]]

    out = ok(lstm, "compare", LSTM, "--versions", "1,3")
    assert [(r[1], r[-1] == "★ best") for r in simple_rows(out)] == [("v1", True), ("v3", False)]

    data = json.loads(ok(lstm, "compare", LSTM, "--metric", "r2", "--json"))
    assert data["metric"] == "r2" and data["direction"] == "METRIC_DIRECTION_HIGHER_IS_BETTER"
    assert "higher is better" in ok(lstm, "compare", LSTM, "--metric", "r2")


# ---- promote, rollback, cleanup, audit ----

def test_promote_version_then_best(lstm: Registry) -> None:
    out = ok(lstm, "promote", LSTM, "3", "--stage", "staging", "--reason", "canary")
    assert "v3 is now staging" in out and "no version held staging before" in out
    assert stage_of(lstm, 3) == pb.STAGE_STAGING

    out = ok(lstm, "promote", LSTM, "--best", "--expect-current", "1")
    assert "v2 is now production" in out and "best by rmse" in out and "replaces v1" in out
    assert "archived: v1" in out
    assert stage_of(lstm, 2) == pb.STAGE_PRODUCTION and stage_of(lstm, 1) == pb.STAGE_ARCHIVED


def test_promote_with_a_stale_expectation_is_aborted(lstm: Registry) -> None:
    result = failed(lstm, "promote", LSTM, "2", "--expect-current", "3", code="ABORTED")
    assert "3" in result.stderr
    assert stage_of(lstm, 1) == pb.STAGE_PRODUCTION and stage_of(lstm, 2) == pb.STAGE_NONE


def test_promote_needs_a_version_or_best(lstm: Registry) -> None:
    failed(lstm, "promote", LSTM, code="INVALID_ARGUMENT")
    failed(lstm, "promote", LSTM, "2", "--best", code="INVALID_ARGUMENT")


@pytest.mark.parametrize("args", [
    ("show", "aqi_predictor_nope", "1"), ("compare", "aqi_predictor_nope"), ("list", "aqi_predictor_nope"),
    ("promote", "aqi_predictor_nope", "1"), ("rollback", "aqi_predictor_nope"), ("show", LSTM, "99"),
])
def test_unknown_model_or_version_is_not_found(lstm: Registry, args: tuple[str, ...]) -> None:
    result = failed(lstm, *args, code="NOT_FOUND")
    assert args[1] in result.stderr


@pytest.mark.parametrize("args", [
    ("promote", LSTM, "2", "--stage", "bogus"), ("list", LSTM, "--stage", "bogus"),
    ("compare", LSTM, "--versions", "1,x"), ("cleanup", LSTM), ("jobs", "--state", "sleeping"),
    ("retrain", "transformer"),
])
def test_bad_arguments_are_invalid_argument(lstm: Registry, args: tuple[str, ...]) -> None:
    failed(lstm, *args, code="INVALID_ARGUMENT")


def test_rollback_moves_production_back(lstm: Registry) -> None:
    lstm.client.promote(LSTM, 2, "production")  # type: ignore[attr-defined]
    failed(lstm, "rollback", LSTM, "--expect-current", "1", code="ABORTED")
    out = ok(lstm, "rollback", LSTM, "--expect-current", "2", "--reason", "v2 misbehaves")
    assert "rolled back to v1" in out and "v2 archived" in out
    assert stage_of(lstm, 1) == pb.STAGE_PRODUCTION and stage_of(lstm, 2) == pb.STAGE_ARCHIVED


def test_cleanup_dry_run_deletes_nothing_and_protects_production(lstm: Registry) -> None:
    out = ok(lstm, "cleanup", LSTM, "--keep", "1", "--dry-run")
    assert "would delete v2" in out and "protected by an alias: v1" in out and "dry run" in out
    assert lstm.client.list_versions(LSTM).total_size == 3  # type: ignore[attr-defined]
    out = ok(lstm, "cleanup", LSTM, "--keep", "1")
    assert "deleted v2" in out
    assert [v.version for v in lstm.client.iter_versions(LSTM)] == [3, 1]  # type: ignore[attr-defined]
    failed(lstm, "cleanup", LSTM, "--versions", "1", code="FAILED_PRECONDITION")


def test_audit_lists_mutations_and_filters(lstm: Registry) -> None:
    ok(lstm, "promote", LSTM, "2", "--reason", "better rmse")
    out = ok(lstm, "audit", "--model", LSTM)
    promotions = [r for r in rows(out) if r[2] == "PromoteModelVersion"]
    assert len(promotions) == 2
    assert promotions[0][1].startswith("anonymous") and promotions[0][4:6] == ["v2", "ok"]
    assert "No audit events match." in ok(lstm, "audit", "--actor", "somebody-else")
    assert len(json.loads(ok(lstm, "audit", "--limit", "1", "--json"))["events"]) == 1


@pytest.mark.parametrize("args", [
    ("status",), ("list",), ("list", LSTM), ("show", LSTM, "1"), ("compare", LSTM), ("audit",), ("health",),
    ("list", LSTM, "--stage", "production"),
])
def test_every_read_command_prints_json(lstm: Registry, args: tuple[str, ...]) -> None:
    data = json.loads(ok(lstm, *args, "--json"))
    assert isinstance(data, dict) and data
    if args[0] == "status":
        assert data["models"][0]["model"]["name"] == LSTM and data["backend"]["healthy"] is True
    if args[0] == "show":
        assert data["name"] == LSTM and data["stage"] == "STAGE_PRODUCTION"
    if args[0] == "compare":
        assert data["best_version"] == "2"


# ---- health and connection errors ----

def test_health_serving_and_not_serving(sqlite_registry: Registry) -> None:
    assert ok(sqlite_registry, "health").strip() == "SERVING"
    ready = ("health", "--service", "aqimodels.api.registry.v1.ModelRegistry")
    deadline = time.monotonic() + 30
    while cli(sqlite_registry, *ready).stdout.strip() != "SERVING":  # readiness: once the read model is warm
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.05)
    sqlite_registry.server.set_serving(False)  # type: ignore[attr-defined]
    result = cli(sqlite_registry, *ready)
    assert result.exit_code == 1 and result.stdout.strip() == "NOT_SERVING"
    result = cli(sqlite_registry, "health")
    assert result.exit_code == 1 and result.stdout.strip() == "NOT_SERVING"


def test_a_server_that_does_not_answer_says_how_to_start_one() -> None:
    result = failed("127.0.0.1:1", "--timeout", "3", "status", code="UNAVAILABLE")
    assert "127.0.0.1:1 does not answer" in result.stderr
    assert "make run" in result.stderr and "aqimodels serve" in result.stderr


def test_retrain_on_a_server_without_job_manager_is_unimplemented(sqlite_registry: Registry) -> None:
    failed(sqlite_registry, "retrain", "lstm", code="UNIMPLEMENTED")
    failed(sqlite_registry, "jobs", code="UNIMPLEMENTED")


# ---- subprocess ----

def _subprocess_env(target: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQIMODELS_")}
    env.update(AQIMODELS_TARGET=target, COLUMNS="200", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def test_console_script_status_json_and_error_exit(lstm: Registry) -> None:
    env = _subprocess_env(lstm.target)
    done = subprocess.run([str(AQIMODELS), "status", "--json"], check=False, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["models"][0]["production"]["version"] == "1"

    done = subprocess.run([str(AQIMODELS), "show", "aqi_predictor_nope", "1"], check=False, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("NOT_FOUND: ") and "aqi_predictor_nope" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_piped_status_needs_neither_rich_nor_pydantic(lstm: Registry) -> None:
    """What `status` loads off a terminal (bench/cli_start.py): rich and pydantic marked absent
    before the CLI starts, the answers are the same (plain columns, JSON, a repeated --model, an error)."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        code = ("import sys; sys.modules['rich'] = sys.modules['pydantic'] = None; "
                f"sys.argv = ['aqimodels', *{list(args)!r}]; from aqimodels.client.cli import main; main()")
        return subprocess.run([sys.executable, "-c", code], check=False, env=_subprocess_env(lstm.target),
                              capture_output=True, text=True, timeout=60)

    done = run("status")
    assert done.returncode == 0, done.stderr
    row = next(re.split(r"\s{2,}", line.strip()) for line in done.stdout.splitlines() if line.startswith(LSTM))
    assert row[1:7] == ["healthy", "v1 25.00", "—", "v3 30.00", "just now", "none"], row
    assert "MLflow backend: healthy" in done.stdout
    lstm.seed(XGB, [metrics(22.0)])
    lstm.seed("aqi_predictor_gnn", [metrics(21.0)])
    done = run("status", "--json", "--model", LSTM, "-m", XGB)
    assert done.returncode == 0, done.stderr
    assert sorted(m["model"]["name"] for m in json.loads(done.stdout)["models"]) == sorted([LSTM, XGB])
    done = run("status", "--model", "no_such_model")
    assert done.returncode == 1 and done.stderr.startswith("NOT_FOUND: ") and "Traceback" not in done.stderr


@pytest.mark.parametrize(("command", "blocked", "extra"), [("serve", "grpc_reflection", "server"),
                                                         ("worker", "numpy", "training")])
def test_serve_and_worker_in_a_client_only_install_give_the_hint(command: str, blocked: str, extra: str) -> None:
    """A client-only install lacks the extras' modules (here: marked absent before the CLI starts)."""
    code = (f"import sys; sys.modules[{blocked!r}] = None; sys.argv = ['aqimodels', {command!r}]; "
            "from aqimodels.client.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code], check=False, env=_subprocess_env("127.0.0.1:1"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"`aqimodels {command}` needs the {extra} extra: pip install 'aqimodels[{extra}]' (missing module {blocked})"]


def _wait_until_mapped(pid: int, library: str, timeout: float = 60) -> None:
    """Until the process has ``library`` (a native module) mapped: a point of its start that
    comes after the CLI's first line of code, however loaded the machine."""
    deadline = time.monotonic() + timeout
    maps = Path(f"/proc/{pid}/maps")
    while library not in maps.read_text():
        assert time.monotonic() < deadline, f"{library} not loaded within {timeout} s"
        time.sleep(0.001)


def test_ctrl_c_at_any_moment_of_the_start_exits_130_quietly() -> None:
    """SIGINT while the CLI's modules load and while it waits on a silent server: exit 130, no
    KeyboardInterrupt traceback.

    The signals are timed from grpc's native module being mapped (while the modules load, after
    aqimodels.client has installed its handler), not from the process start: before our first
    line runs (the interpreter's start and site, up to 0.13 s measured on this machine under
    load) Ctrl-C is Python's own, and a fixed delay from the start landed there on a loaded
    machine (a KeyboardInterrupt traceback: the test's flake)."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []

    def hold() -> None:  # accepts every connection and keeps it open, never speaking HTTP/2
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return

    threading.Thread(target=hold, daemon=True).start()
    target = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        # 0 to 0.1 s: grpc, the protos, typer still loading; 1.2 s: waiting on the silent server.
        for delay in (0.0, 0.01, 0.03, 0.1, 0.3, 1.2):
            proc = subprocess.Popen([str(AQIMODELS), "--target", target, "--timeout", "30", "list"],
                                    env=_subprocess_env(target), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - Ctrl-C back to default in the child (a background shell ignores it); no other way before exec
            _wait_until_mapped(proc.pid, "cygrpc")
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 130, (delay, proc.returncode, err)
            assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delay, err)
            assert "Exception ignored" not in err, (delay, err)
    finally:
        silent.close()
        for conn in held:
            conn.close()


# ---- retrain and jobs against a scripted job manager ----

class ScriptedJobs:
    """A job manager that plays scripted events through the real server (no worker, no training).

    ``gnn`` jobs fail; with dataset ``slow`` every job stays running until the caller goes away.
    """

    def __init__(self) -> None:
        self.jobs: dict[str, pb.RetrainJob] = {}
        self.events: dict[str, list[pb.RetrainEvent]] = {}
        self.disconnected = threading.Event()
        self.counter = 0

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def running_by_model(self) -> dict[str, list[Any]]:
        return {}

    def _script(self, job_id: str, mt: int) -> list[pb.RetrainEvent]:
        name = f"aqi_predictor_{wpb.ModelType.Name(mt).removeprefix('MODEL_TYPE_').lower()}"
        R = pb.JOB_STATE_RUNNING
        evs: list[Any] = [
            (pb.JOB_STATE_QUEUED, {"queued": pb.JobQueued(position=1)}),
            (R, {"dispatched": pb.JobDispatched(worker="127.0.0.1:50052")}),
            (R, {"progress": wpb.TrainEvent(started=wpb.TrainStarted(run_id="r" + job_id, total_steps=3))}),
        ]
        evs += [(R, {"progress": wpb.TrainEvent(epoch=wpb.EpochFinished(
            epoch=i, total_epochs=3, loss=1.0 / i, validation_rmse=30.0 - i, elapsed_seconds=i))}) for i in (1, 2)]
        if mt == wpb.MODEL_TYPE_GNN:
            evs += [(pb.JOB_STATE_FAILED, {"ended": pb.JobEnded(state=pb.JOB_STATE_FAILED, reason="diverged")})]
        else:
            evs += [(R, {"progress": wpb.TrainEvent(finished=wpb.TrainFinished(model_name=name, version=7,
                                                                                metrics={"rmse": 19.5}))}),
                    (pb.JOB_STATE_SUCCEEDED, {"succeeded": pb.JobSucceeded(
                        version=pb.ModelVersion(name=name, version=7, metrics={"rmse": 19.5}),
                        promotion=pb.PromotionDecision(considered=False))})]
        return [pb.RetrainEvent(job_id=job_id, sequence=i, model_type=mt, state=state, **kind)
                for i, (state, kind) in enumerate(evs, start=1)]

    def retrain(self, request: pb.RetrainRequest, caller: Any, stop: threading.Event) -> Iterator[pb.RetrainEvent]:
        types = list(request.model_types) or [1, 2, 3, 4]
        ids = []
        for mt in types:
            self.counter += 1
            job_id = f"job{self.counter}"
            ids.append(job_id)
            self.events[job_id] = self._script(job_id, mt)
            self.jobs[job_id] = pb.RetrainJob(job_id=job_id, model_type=mt, state=pb.JOB_STATE_QUEUED,
                                              model_name=self.events[job_id][-1].succeeded.version.name)
        slow = request.dataset.spec == "slow"
        try:
            for job_id in ids:
                yield self.events[job_id][0]
        except GeneratorExit:  # the caller went away between two events: gRPC drops the stream
            if slow:
                self.disconnected.set()
            raise
        if slow:
            self._wait_for_disconnect(stop)
            return
        for job_id in ids:
            yield from self.events[job_id][1:]

    def _wait_for_disconnect(self, stop: threading.Event) -> None:
        if stop.wait(20):  # set by the servicer when the caller goes away
            self.disconnected.set()

    def get(self, job_id: str) -> pb.RetrainJob:
        if job_id not in self.jobs:
            raise JobNotFoundError(f"retrain job {job_id!r} does not exist")
        return self.jobs[job_id]

    def list_jobs(self, page_size: int, page_token: str, state: int, model_name: str) -> tuple[list[pb.RetrainJob], str]:
        return [j for j in self.jobs.values() if (not state or j.state == state)
                and (not model_name or j.model_name == model_name)], ""

    def watch(self, job_id: str, after: int, stop: threading.Event) -> Iterator[pb.RetrainEvent]:
        self.get(job_id)
        evs = [e for e in self.events[job_id] if e.sequence > after]
        if job_id.endswith("-slow"):
            yield from evs[:3]
            self._wait_for_disconnect(stop)
            return
        yield from evs

    def cancel(self, job_id: str, reason: str, caller: Any) -> pb.RetrainJob:
        job = self.get(job_id)
        job.state = pb.JOB_STATE_CANCELLED
        job.error = reason
        return job


@pytest.fixture
def jobs_registry(sqlite_uri: str) -> Iterator[tuple[Registry, ScriptedJobs]]:
    scripted = ScriptedJobs()
    reg = start_registry(sqlite_uri, jobs_factory=lambda config, service, db: (scripted, None))
    try:
        yield reg, scripted
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_retrain_follows_with_bars_and_a_summary(jobs_registry: tuple[Registry, ScriptedJobs]) -> None:
    reg, _ = jobs_registry
    out = ok(reg, "retrain", "lstm", "xgboost", "--epochs", "3")
    summary = out[out.index("Retrain summary"):]
    table = {r[0]: r for r in rows(summary)}
    assert table["job1"][1:5] == ["lstm", "succeeded", "v7", "19.50"]
    assert table["job2"][1:5] == ["xgboost", "succeeded", "v7", "19.50"]
    assert "job1 lstm: dispatched to 127.0.0.1:50052" in out  # event lines off a terminal


def test_retrain_with_a_failed_job_exits_non_zero(jobs_registry: tuple[Registry, ScriptedJobs]) -> None:
    reg, _ = jobs_registry
    result = cli(reg, "retrain", "gnn", "xgboost")
    assert result.exit_code == 1
    assert "1 of 2 job(s) did not succeed" in result.stderr and "diverged" in result.stderr
    assert "failed" in result.stdout and "Retrain summary" in result.stdout


def test_retrain_json_prints_one_event_per_line(jobs_registry: tuple[Registry, ScriptedJobs]) -> None:
    reg, _ = jobs_registry
    lines = ok(reg, "retrain", "lstm", "--json").splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["sequence"] for e in events] == [str(i) for i in range(1, 8)]
    assert "queued" in events[0] and events[-1]["state"] == "JOB_STATE_SUCCEEDED"
    assert events[3]["progress"]["epoch"]["validation_rmse"] == 29.0


def test_retrain_no_follow_prints_ids_and_detaches(jobs_registry: tuple[Registry, ScriptedJobs]) -> None:
    reg, scripted = jobs_registry
    started = time.monotonic()
    result = cli(reg, "retrain", "--data", "slow", "--no-follow")
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - started < 10
    ids = [line.split()[0] for line in result.stdout.splitlines()]
    assert ids == ["job1", "job2", "job3", "job4"]
    assert "aqimodels jobs watch JOB" in result.stderr
    assert scripted.disconnected.wait(10)


def test_jobs_list_watch_show_and_cancel(jobs_registry: tuple[Registry, ScriptedJobs]) -> None:
    reg, _ = jobs_registry
    assert cli(reg, "retrain", "lstm", "gnn", "--json").exit_code == 1  # the gnn job fails
    out = ok(reg, "jobs")
    assert "job1" in out and "job2" in out
    listed = json.loads(ok(reg, "jobs", "--model", "aqi_predictor_lstm", "--json"))["jobs"]
    assert [j["job_id"] for j in listed] == ["job1"]
    watched = [json.loads(line) for line in ok(reg, "jobs", "watch", "job1", "--after", "5", "--json").splitlines()]
    assert [e["sequence"] for e in watched] == ["6", "7"]
    out = ok(reg, "jobs", "watch", "job1")
    assert "Retrain summary" in out and "succeeded" in out
    assert json.loads(ok(reg, "jobs", "show", "job2", "--json"))["job_id"] == "job2"
    assert "cancelled" in ok(reg, "jobs", "cancel", "job2", "--reason", "not needed")
    failed(reg, "jobs", "watch", "nope", code="NOT_FOUND")


def test_ctrl_c_while_following_detaches_and_tells_how_to_watch_again(
        jobs_registry: tuple[Registry, ScriptedJobs]) -> None:
    reg, scripted = jobs_registry
    ok(reg, "retrain", "lstm", "--json")
    scripted.events["job1-slow"] = [e.__deepcopy__() for e in scripted.events["job1"]]
    for e in scripted.events["job1-slow"]:
        e.job_id = "job1-slow"
    scripted.jobs["job1-slow"] = scripted.jobs["job1"]
    # SIGINT back to its default in the child: a suite started in the background by a shell
    # without job control inherits SIGINT ignored, and Python then installs no Ctrl-C handler.
    proc = subprocess.Popen([str(AQIMODELS), "jobs", "watch", "job1-slow"], env=_subprocess_env(reg.target),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - Ctrl-C back to default in the child (a background shell ignores it); no other way before exec
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the first event line: the stream is live
    assert "job1-slow" in line
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "Detached" in err and "aqimodels jobs watch job1-slow --after 3" in err
    assert scripted.disconnected.wait(10)


def test_detaching_from_several_jobs_offers_one_command_for_all(
        jobs_registry: tuple[Registry, ScriptedJobs]) -> None:
    reg, scripted = jobs_registry
    ok(reg, "retrain", "lstm", "xgboost", "--json")
    for source in ("job1", "job2"):
        slow = f"{source}-slow"
        scripted.events[slow] = [e.__deepcopy__() for e in scripted.events[source]]
        for e in scripted.events[slow]:
            e.job_id = slow
        scripted.jobs[slow] = scripted.jobs[source]
    proc = subprocess.Popen([str(AQIMODELS), "jobs", "watch", "job1-slow", "job2-slow"],
                            env=_subprocess_env(reg.target), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - Ctrl-C back to default in the child (a background shell ignores it); no other way before exec
    assert proc.stdout is not None
    seen = {proc.stdout.readline().split(" ", 1)[0] for _ in range(2)}  # both streams are live
    assert seen <= {"job1-slow", "job2-slow"}
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines.count("Detached: the jobs go on on the server. Watch them all again with:") == 1, err
    assert lines.count("  aqimodels jobs watch job1-slow job2-slow") == 1, err
    assert len(lines) == 2, err
