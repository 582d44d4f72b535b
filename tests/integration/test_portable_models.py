"""Registered models are portable, physically sane and honest about their input (issue 12).

Four tiny models (synthetic data, a few epochs) are trained once through the real runner on a
SQLite store. Portability is checked in subprocesses where ``import aqimodels`` is made to fail
(a ``sitecustomize`` on PYTHONPATH puts ``None`` in ``sys.modules["aqimodels"]``; every
subprocess first asserts that the import fails), through plain ``mlflow.pyfunc.load_model`` and
through ``mlflow models serve``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import EnsembleMemberRef, Finished, TrainConfig, TrainJob
from aqimodels.training.model import load_forecast_model
from aqimodels.training.runner import run_training
from aqimodels.training.runtime.aqi import to_aqi
from aqimodels.training.runtime.pipeline import despike
from mlflow import MlflowClient
from mlflow.models import Model

DATA = "synthetic:stations=3,days=12,seed=3"
TYPES = ("xgboost", "lstm", "gnn", "ensemble")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_models"
BLOCK = 'import sys; sys.modules["aqimodels"] = None\n'
ASSERT_BLOCKED = (
    "import sys\n"
    "try:\n"
    "    import aqimodels  # noqa: F401\n"
    "except ImportError:\n"
    "    pass\n"
    "else:\n"
    "    sys.exit('aqimodels is importable: the portability check would prove nothing')\n"
)


def _train(uri: str, model_type: str, dataset: str = DATA, members: tuple[EnsembleMemberRef, ...] = (),
           target: str = "pm25") -> Finished:
    job = TrainJob(job_id=f"t-{model_type}-{target}", model_type=model_type, dataset=dataset, target=target,
                   config=TrainConfig(max_epochs=2, window_hours=12, hidden_size=8), ensemble_members=members)
    events = list(run_training(job, threading.Event(), tracking_uri=uri))
    assert isinstance(events[-1], Finished)
    return events[-1]


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.finished: dict[str, Finished] = {}
        self.client = MlflowClient(self.uri, registry_uri=self.uri)

    def local(self, model_type: str) -> str:
        fin = self.finished[model_type]
        src = self.client.get_model_version_download_uri(fin.model_name, str(fin.version))
        return mlflow.artifacts.download_artifacts(artifact_uri=src, tracking_uri=self.uri)

    def model(self, model_type: str) -> Any:
        return mlflow.pyfunc.load_model(self.local(model_type))

    def example(self, model_type: str) -> pd.DataFrame:
        local = self.local(model_type)
        return Model.load(local).load_input_example(local)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    s = Store(tmp_path_factory.mktemp("portable"))
    members = []
    for t in TYPES:
        fin = _train(s.uri, t, members=tuple(members) if t == "ensemble" else ())
        s.finished[t] = fin
        if t != "ensemble":
            members.append(EnsembleMemberRef(t, fin.model_name, fin.version, fin.model_uri))
    s.client.set_registered_model_alias("aqi_predictor_xgboost", "production", str(s.finished["xgboost"].version))
    return s


def _blocked_env(tmp: Path, uri: str) -> dict[str, str]:
    block = tmp / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(BLOCK)
    env = dict(os.environ, PYTHONPATH=str(block), MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # uvicorn for serve
    env.pop("PYTHONSTARTUP", None)
    return env


# ---- portable: load and serve without aqimodels ----


def test_every_model_type_loads_and_predicts_where_aqimodels_cannot_be_imported(store: Store, tmp_path: Path) -> None:
    expected = {}
    for t in TYPES:
        out = store.model(t).predict(store.example(t))
        expected[t] = out["pm25"].round(4).tolist()
    script = ASSERT_BLOCKED + (
        "import json, mlflow\n"
        "from mlflow.models import Model\n"
        "out = {}\n"
        f"for t in {list(TYPES)!r}:\n"
        "    uri = f'models:/aqi_predictor_{t}/1'\n"
        "    model = mlflow.pyfunc.load_model(uri)\n"
        "    local = mlflow.artifacts.download_artifacts(uri)\n"
        "    example = Model.load(local).load_input_example(local)\n"
        "    pred = model.predict(example)\n"
        "    out[t] = {'pm25': pred['pm25'].round(4).tolist(), 'columns': list(pred.columns),\n"
        "              'module': type(model.unwrap_python_model()).__module__}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_blocked_env(tmp_path, store.uri), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for t in TYPES:
        assert got[t]["module"] == "aqi_forecast_runtime.model"  # the copy shipped in the model
        assert got[t]["columns"] == ["station", "origin_time", "forecast_time", "horizon", "pm25", "aqi",
                                     "aqi_category", "filled_inputs"]
        assert got[t]["pm25"] == expected[t]


def test_logged_requirements_and_code_hold_no_aqimodels(store: Store) -> None:
    for t in TYPES:
        local = Path(store.local(t))
        reqs = (local / "requirements.txt").read_text()
        assert "aqimodels" not in reqs and "xgboost==" not in reqs, reqs
        shipped = local / "code" / "aqi_forecast_runtime"
        assert (shipped / "model.py").exists()
        for src in shipped.glob("*.py"):
            if src.name == "mlflow_model_code.py":  # imports the shipped copy; aqimodels' only while saving
                continue
            text = src.read_text()
            assert "from aqimodels" not in text.replace("from aqimodels.client.errors import", "")
            assert "import aqimodels" not in text
        assert (local / "serving_input_example.json").exists()
        assert not (local / "python_model.pkl").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mlflow_models_serve_answers_invocations_without_aqimodels(store: Store, tmp_path: Path) -> None:
    env = _blocked_env(tmp_path, store.uri)
    check = subprocess.run([sys.executable, "-c", ASSERT_BLOCKED], env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, check.stderr  # the server's interpreter cannot import aqimodels
    port = _free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", "models:/aqi_predictor_xgboost@production", "--env-manager", "local",
         "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 120 s"
            time.sleep(0.5)
        body = (Path(store.local("xgboost")) / "serving_input_example.json").read_bytes()
        last = store.example("xgboost")["time"].iloc[-1]
        payload = json.loads(body)
        payload["params"] = {"origins": [last]}
        for data in (body, json.dumps(payload).encode()):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.status == 200
                rows = json.loads(r.read())["predictions"]
            assert len(rows) == 3 * 24
            assert {"station", "origin_time", "forecast_time", "horizon", "pm25", "aqi", "aqi_category"} <= set(rows[0])
            assert all(row["pm25"] >= 0 for row in rows)
        bad = json.loads(body)
        bad["dataframe_split"]["data"][0][bad["dataframe_split"]["columns"].index("pm25")] = -5.0
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(bad).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400 and "outside its physical range" in err.value.read().decode()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("model_type", TYPES)
def test_models_registered_before_portability_still_load(model_type: str) -> None:
    """Pickled pyfunc models written by the code before this change (tests/fixtures/legacy_models)."""
    model = mlflow.pyfunc.load_model(str(FIXTURES / model_type))
    frame = pd.read_csv(FIXTURES / "input.csv", parse_dates=["time"])  # their signature says datetime
    out = model.predict(frame, params={"all_origins": True})
    before = pd.read_csv(FIXTURES / f"expected_{model_type}.csv")
    assert len(out) == len(before)
    # unchanged but for the lower bound at 0 that now applies to old models too
    np.testing.assert_allclose(out["pm25"].to_numpy(), np.clip(before["pm25"].to_numpy(), 0, None), rtol=1e-5, atol=1e-4)
    assert (out["station"].to_numpy() == before["station"].to_numpy()).all()
    assert type(load_forecast_model(str(FIXTURES / model_type))).__name__.endswith("ForecastModel")


# ---- physical sanity ----


def test_the_beijing_glitch_is_an_outlier_and_nothing_else_there() -> None:
    # Wanshouxigong 2016-12-20 11:00..19:00, the glitch at 15:00 (issue 12)
    a = np.array([[435.0], [451.0], [446.0], [461.0], [3.0], [170.0], [398.0], [378.0], [363.0]])
    assert despike(a).ravel().tolist() == [False, False, False, False, True, False, False, False, False]
    clean = np.array([[5.0], [40.0], [12.0], [60.0], [185.0], [120.0], [60.0], [22.0], [10.0]])
    assert not despike(clean).any()  # clean-air noise and a fast but real front are kept


def _glitched(example: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The example with a one-hour dip at the origin after a polluted episode, and the same with
    that hour missing instead."""
    g = example.copy()
    times = sorted(g["time"].unique())
    for t, v in zip(times[-4:], (380.0, 420.0, 461.0, 3.0), strict=True):
        g.loc[g["time"] == t, "pm25"] = v
    missing = g.copy()
    missing.loc[missing["time"] == times[-1], "pm25"] = np.nan
    return g, missing


@pytest.mark.parametrize("model_type", TYPES)
def test_a_one_hour_glitch_is_treated_as_a_missing_hour_and_never_gives_negative_forecasts(
        store: Store, model_type: str) -> None:
    model = store.model(model_type)
    glitch, missing = _glitched(store.example(model_type))
    out = model.predict(glitch)
    assert (out["pm25"] >= 0).all()
    np.testing.assert_allclose(out["pm25"], model.predict(missing)["pm25"], rtol=1e-6)
    # and a drop to zero after an extreme episode, the case that drove networks negative
    crash = store.example(model_type).copy()
    crash["pm25"] = np.where(crash["time"] == crash["time"].max(), 0.0, 999.0)
    assert (model.predict(crash)["pm25"] >= 0).all()


# ---- honest inputs ----


def test_missing_trained_columns_are_refused_by_name_unless_allowed(store: Store) -> None:
    model, example = store.model("xgboost"), store.example("xgboost")
    with pytest.raises(Exception, match=r"lacks column\(s\) temp, wind_speed, wind_dir"):
        model.predict(example.drop(columns=["temp", "wind_speed", "wind_dir"]))
    only = example[["station", "time", "pm25"]]
    with pytest.raises(Exception, match=r"lacks column\(s\) pm10, so2, no2, co, o3, temp"):
        model.predict(only)
    out = model.predict(example.assign(temp=np.nan), params={"allow_missing_inputs": True})
    assert set(out["filled_inputs"]) == {"temp"}
    assert set(model.predict(example)["filled_inputs"]) == {""}


def test_unknown_stations_are_refused_or_dropped_on_request(store: Store) -> None:
    model, example = store.model("gnn"), store.example("gnn")
    extra = pd.concat([example, example[example["station"] == "S01"].assign(station="Elsewhere")])
    with pytest.raises(Exception, match="station\\(s\\) Elsewhere that the model was not trained on"):
        model.predict(extra)
    out = model.predict(extra, params={"ignore_unknown_stations": True})
    pd.testing.assert_frame_equal(out, model.predict(example))


@pytest.mark.parametrize(("column", "value", "message"), [
    ("pm25", -4.0, r"row 7 \(station S01, time .*\): column pm25 = -4 is outside its physical range 0..1500"),
    ("pm25", 71_000.0, r"row 7 .*column pm25 = 71000 is outside"),
    ("wind_dir", 400.0, r"row 7 .*column wind_dir = 400 is outside its physical range 0..360"),
    ("no2", -1.0, r"row 7 .*column no2 = -1"),
])
def test_values_outside_physical_ranges_are_refused_naming_row_and_column(
        store: Store, column: str, value: float, message: str) -> None:
    model, example = store.model("lstm"), store.example("lstm")
    bad = example.copy()
    bad.loc[7, column] = value
    with pytest.raises(Exception, match=message):
        model.predict(bad)


def test_wind_direction_in_radians_is_refused(store: Store) -> None:
    model, example = store.model("xgboost"), store.example("xgboost")
    with pytest.raises(Exception, match="wind_dir looks like radians"):
        model.predict(example.assign(wind_dir=np.radians(example["wind_dir"])))


def test_time_is_parsed_like_training_strings_datetimes_and_timezones(store: Store) -> None:
    model, example = store.model("ensemble"), store.example("ensemble")
    assert example["time"].map(type).eq(str).all()  # the logged example itself is strings
    base = model.predict(example)
    naive = example.assign(time=pd.to_datetime(example["time"]))
    pd.testing.assert_frame_equal(model.predict(naive), base)
    aware = example.assign(time=pd.to_datetime(example["time"]).dt.tz_localize("UTC").dt.tz_convert("Asia/Shanghai"))
    pd.testing.assert_frame_equal(model.predict(aware), base)


@pytest.mark.parametrize("model_type", TYPES)
def test_chosen_origins_in_one_call_equal_one_call_per_origin(store: Store, model_type: str, tmp_path: Path) -> None:
    from aqimodels.training.data import load_dataset

    model = store.model(model_type)
    frame = load_dataset(DATA).frame
    frame = frame[frame["time"] >= frame["time"].max() - pd.Timedelta(hours=60)]
    times = sorted(frame["time"].unique())
    chosen = [times[-1], times[20], times[-30], times[11]]  # any order, the earliest with exactly a window
    batch = model.predict(frame, params={"origins": [str(t) for t in chosen]})
    singles = pd.concat([model.predict(frame[frame["time"] <= t]) for t in chosen], ignore_index=True)
    pd.testing.assert_frame_equal(batch, singles)
    with pytest.raises(Exception, match="fewer than window=12 hours"):
        model.predict(frame, params={"origins": [str(times[3])]})
    with pytest.raises(Exception, match="are not hours of the input"):
        model.predict(frame, params={"origins": ["2001-01-01T00:00:00"]})


def test_every_model_type_logs_one_definition_of_latency(store: Store) -> None:
    for t in TYPES:
        m = store.finished[t].metrics
        assert m["inference_latency_ms"] > 0 and m["inference_batch_latency_ms"] > 0
        assert m["inference_batch_origins"] >= 20
        assert m["inference_throughput"] == pytest.approx(m["inference_batch_origins"] / m["inference_batch_latency_ms"]
                                                          * 1000, rel=1e-6)


# ---- lineage and evaluation context ----


def test_versions_record_their_evaluation_context_and_code(store: Store) -> None:
    for t in TYPES:
        fin = store.finished[t]
        tags = store.client.get_model_version(fin.model_name, str(fin.version)).tags
        run_tags = store.client.get_run(fin.run_id).data.tags
        for key in ("eval.dataset", "eval.data_fingerprint", "eval.stations", "eval.target", "eval.test_start",
                    "eval.test_end", "eval.test_key", "code.version"):
            assert tags[key] and tags[key] == run_tags[key], key
        assert tags["eval.dataset"] == DATA and tags["eval.stations"] == "S01,S02,S03" and tags["eval.target"] == "pm25"
    keys = {store.client.get_model_version(f.model_name, str(f.version)).tags["eval.test_key"]
            for f in store.finished.values()}
    assert len(keys) == 1  # same data, same window: the same test rows


def test_an_ensemble_records_exactly_its_member_versions(store: Store) -> None:
    fin = store.finished["ensemble"]
    tags = store.client.get_model_version(fin.model_name, str(fin.version)).tags
    want = ",".join(f"aqi_predictor_{t}:{store.finished[t].version}" for t in ("xgboost", "lstm", "gnn"))
    assert tags["ensemble.members"] == want
    params = store.client.get_run(fin.run_id).data.params
    assert params["member_xgboost"] == f"aqi_predictor_xgboost:{store.finished['xgboost'].version}"


def test_ensemble_members_trained_on_other_data_are_refused_before_training(store: Store) -> None:
    xgb = store.finished["xgboost"]
    ref = EnsembleMemberRef("xgboost", xgb.model_name, xgb.version, xgb.model_uri)
    runs_before = len(store.client.search_runs([store.client.get_run(xgb.run_id).info.experiment_id]))
    with pytest.raises(InvalidArgumentError, match=r"member\(s\) aqi_predictor_xgboost v1 .* other data"):
        list(run_training(TrainJob(job_id="other", model_type="ensemble", dataset="synthetic:stations=3,days=12,seed=4",
                                   ensemble_members=(ref,)), threading.Event(), tracking_uri=store.uri))
    assert len(store.client.search_runs([store.client.get_run(xgb.run_id).info.experiment_id])) == runs_before


# ---- the target pollutant ----


def test_a_no2_target_trains_end_to_end_from_a_file_without_pm25(tmp_path: Path) -> None:
    from aqimodels.training.data import load_dataset

    frame = load_dataset(DATA).frame.drop(columns=["pm25"])
    path = tmp_path / "no2.csv"
    frame.to_csv(path, index=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    fin = _train(uri, "xgboost", dataset=f"file:{path}", target="no2")
    assert fin.model_name == "aqi_predictor_xgboost_no2"
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version(fin.model_name, "1").tags["eval.target"] == "no2"
    assert fin.metrics["rmse_h1"] < fin.metrics["baseline_rmse_h6"] * 5  # trained on NO2, sane numbers
    src = client.get_model_version_download_uri(fin.model_name, "1")
    local = mlflow.artifacts.download_artifacts(artifact_uri=src, tracking_uri=uri)
    model = mlflow.pyfunc.load_model(local)
    out = model.predict(Model.load(local).load_input_example(local))
    assert "no2" in out.columns and "pm25" not in out.columns
    np.testing.assert_array_equal(out["aqi"], to_aqi(out["no2"].to_numpy(), "no2"))
    assert to_aqi(100 * 1.88, "no2") == 100 and to_aqi(101 * 1.88, "no2") == 101  # ppb breakpoints, µg/m³ in
    # the same file cannot train a PM2.5 model, refused before any run exists
    with pytest.raises(InvalidArgumentError, match="missing required column\\(s\\) pm25"):
        _train(uri, "xgboost", dataset=f"file:{path}")
    with pytest.raises(InvalidArgumentError, match="target 'so4' is not a pollutant with AQI breakpoints"):
        _train(uri, "xgboost", dataset=f"file:{path}", target="so4")
    assert len(client.search_runs(["1"])) == 1


# ---- the README's service example runs as written ----


def _readme_service_example() -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Use a production model in a service", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_readme_service_example_runs_as_written_without_aqimodels(shared_beijing: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = TrainJob(job_id="readme", model_type="xgboost", dataset=f"beijing:{shared_beijing}",
                   start_time=np.datetime64("2017-02-01"), config=TrainConfig(max_epochs=3))
    fin = list(run_training(job, threading.Event(), tracking_uri=uri))[-1]
    assert isinstance(fin, Finished)
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias(fin.model_name, "production", str(fin.version))
    env = dict(_blocked_env(tmp_path, uri), BEIJING_DATA=str(shared_beijing))
    proc = subprocess.run([sys.executable, "-c", ASSERT_BLOCKED + _readme_service_example()], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "origin_time" in proc.stdout and "aqi_category" in proc.stdout
