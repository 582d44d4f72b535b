"""Models trained in log space (``target_transform=log1p``): training, evaluation, the logged
model and its portable load, end to end on small synthetic data through the real runner.

The xgboost, lstm and gnn models and the ensemble of those three are trained once with
``extra={"target_transform": "log1p"}`` on a SQLite store. Portability is checked in a
subprocess where ``import aqimodels`` fails (asserted first), through plain
``mlflow.pyfunc.load_model``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import EnsembleMemberRef, Finished, TrainConfig, TrainJob
from aqimodels.training.model import load_forecast_model, raw_forecast
from aqimodels.training.runner import run_training
from mlflow.models import Model
from test_portable_models import ASSERT_BLOCKED, Store

DATA = "synthetic:stations=3,days=12,seed=3"
TYPES = ("xgboost", "lstm", "gnn", "ensemble")
LOG = {"target_transform": "log1p"}


def _job(model_type: str, extra: dict[str, str], members: tuple[EnsembleMemberRef, ...] = (),
         job_id: str = "") -> TrainJob:
    return TrainJob(job_id=job_id or f"log-{model_type}", model_type=model_type, dataset=DATA,
                    config=TrainConfig(max_epochs=3, window_hours=12, hidden_size=8, extra=dict(extra)),
                    ensemble_members=members)


def _run(uri: str, job: TrainJob) -> Finished:
    events = list(run_training(job, threading.Event(), tracking_uri=uri))
    assert isinstance(events[-1], Finished)
    return events[-1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    s = Store(tmp_path_factory.mktemp("log1p"))
    members: list[EnsembleMemberRef] = []
    for t in TYPES:
        fin = _run(s.uri, _job(t, LOG, tuple(members) if t == "ensemble" else ()))
        s.finished[t] = fin
        if t != "ensemble":
            members.append(EnsembleMemberRef(t, fin.model_name, fin.version, fin.model_uri))
    return s


def _glitched(example: pd.DataFrame) -> pd.DataFrame:
    """A polluted episode ending in the one-hour dip of the Beijing glitch (461 -> 3) at the origin."""
    g = example.copy()
    times = sorted(g["time"].unique())
    for t, v in zip(times[-4:], (380.0, 420.0, 461.0, 3.0), strict=True):
        g.loc[g["time"] == t, "pm25"] = v
    return g


def _crash(example: pd.DataFrame) -> pd.DataFrame:
    """An extreme episode, then zero at the origin (the case that drove networks negative)."""
    c = example.copy()
    c["pm25"] = np.where(c["time"] == c["time"].max(), 0.0, 999.0)
    return c


def test_the_space_is_logged_as_a_param_and_in_the_model(store: Store) -> None:
    for t in TYPES:
        fin = store.finished[t]
        params = store.client.get_run(fin.run_id).data.params
        assert params["target_transform"] == "log1p", t
        assert (Model.load(store.local(t)).metadata or {})["target_transform"] == "log1p"
        assert load_forecast_model(store.local(t)).target_transform == "log1p"
    assert store.client.get_run(store.finished["xgboost"].run_id).data.params["trainer_target_transform"] == "log1p"


def test_log_space_models_are_evaluated_in_micrograms(store: Store) -> None:
    # An output left in log units (about 4 for 60 µg/m³) would score an rmse near the level itself.
    for t in TYPES:
        m = store.finished[t].metrics
        assert m["rmse"] < 1.5 * m["baseline_rmse"], (t, m["rmse"], m["baseline_rmse"])
        assert m["negative_share"] == 0.0
    for t in ("xgboost", "lstm", "gnn"):
        # before the clip a log1p forecast is >= -1 and below 0 only where it forecasts a fall to about 0
        assert store.finished[t].metrics["negative_share_unbounded"] <= 0.001


@pytest.mark.parametrize("model_type", TYPES)
def test_log_space_forecasts_are_never_negative_on_the_glitch(store: Store, model_type: str) -> None:
    model = mlflow.pyfunc.load_model(store.local(model_type))
    example = store.example(model_type)
    for frame in (_glitched(example), _crash(example)):
        out = model.predict(frame)
        assert (out["pm25"] >= 0).all()
        assert out["pm25"].max() < 1500  # in µg/m³, and below the physical ceiling


@pytest.mark.parametrize("model_type", ["xgboost", "lstm", "gnn"])
def test_before_the_last_guard_a_log_space_forecast_cannot_fall_below_minus_one(store: Store, model_type: str) -> None:
    model = load_forecast_model(store.local(model_type))
    for frame in (_glitched(store.example(model_type)), _crash(store.example(model_type))):
        from aqimodels.training.runtime.model import prepare_input

        grid, _ = prepare_input(model, frame, None)
        x, _ = model.pipeline.transform(grid)
        raw = raw_forecast(model, x)
        assert np.isfinite(raw).all() and (raw >= -1.0).all()
        # and it is the inverse of the log space: forecasts move with the origin's level
        assert raw.mean() > 0


def test_a_log_space_model_loads_without_aqimodels_and_predicts_as_in_process(store: Store, tmp_path: Path) -> None:
    expected: dict[str, Any] = {}
    for t in TYPES:
        model = mlflow.pyfunc.load_model(store.local(t))
        expected[t] = {"example": model.predict(store.example(t))["pm25"].round(4).tolist(),
                       "glitch": model.predict(_glitched(store.example(t)))["pm25"].round(4).tolist()}
        in_process = load_forecast_model(store.local(t)).predict(None, store.example(t))
        assert in_process["pm25"].round(4).tolist() == expected[t]["example"]
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text('import sys; sys.modules["aqimodels"] = None\n')
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in TYPES:
        _glitched(store.example(t)).to_json(frames / f"{t}.json", orient="records")
    script = ASSERT_BLOCKED + (
        "import json, mlflow\n"
        "import pandas as pd\n"
        "from mlflow.models import Model\n"
        "out = {}\n"
        f"for t in {list(TYPES)!r}:\n"
        "    uri = f'models:/aqi_predictor_{t}/1'\n"
        "    model = mlflow.pyfunc.load_model(uri)\n"
        "    local = mlflow.artifacts.download_artifacts(uri)\n"
        "    example = Model.load(local).load_input_example(local)\n"
        f"    glitch = pd.read_json({str(frames)!r} + f'/{{t}}.json', orient='records', convert_dates=False)\n"
        "    glitch = glitch.astype({c: float for c in glitch.columns if c not in ('station', 'time')})\n"
        "    out[t] = {'example': model.predict(example)['pm25'].round(4).tolist(),\n"
        "              'glitch': model.predict(glitch)['pm25'].round(4).tolist(),\n"
        "              'module': type(model.unwrap_python_model()).__module__}\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(block), MLFLOW_TRACKING_URI=store.uri, MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("PYTHONSTARTUP", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for t in TYPES:
        assert got[t]["module"] == "aqi_forecast_runtime.model"
        assert got[t]["example"] == expected[t]["example"], t
        assert got[t]["glitch"] == expected[t]["glitch"], t
        assert min(got[t]["glitch"]) >= 0


def test_an_unknown_space_is_refused_before_a_run_exists(store: Store) -> None:
    exp = store.client.get_experiment_by_name("aqi-predictor")
    assert exp is not None
    before = len(store.client.search_runs([exp.experiment_id]))
    for t in ("xgboost", "lstm"):
        with pytest.raises(InvalidArgumentError, match=r"target_transform must be one of none, log1p, got 'sqrt'"):
            list(run_training(_job(t, {"target_transform": "sqrt"}, job_id="bad"), threading.Event(),
                              tracking_uri=store.uri))
    assert len(store.client.search_runs([exp.experiment_id])) == before


def test_an_ensemble_asking_for_log_space_refuses_members_trained_otherwise(store: Store) -> None:
    plain = _run(store.uri, _job("xgboost", {}, job_id="plain-xgboost"))
    assert store.client.get_run(plain.run_id).data.params["target_transform"] == "none"
    lstm = store.finished["lstm"]
    refs = (EnsembleMemberRef("xgboost", plain.model_name, plain.version, plain.model_uri),
            EnsembleMemberRef("lstm", lstm.model_name, lstm.version, lstm.model_uri))
    with pytest.raises(InvalidArgumentError, match=rf"aqi_predictor_xgboost v{plain.version} \(none\) were not trained "
                                                   "with target_transform log1p"):
        list(run_training(_job("ensemble", LOG, refs, job_id="mixed"), threading.Event(), tracking_uri=store.uri))
    # without asking, it combines them and says what each member was trained in
    mixed = _run(store.uri, _job("ensemble", {}, refs, job_id="mixed-ok"))
    assert store.client.get_run(mixed.run_id).data.params["target_transform"] == "xgboost:none,lstm:log1p"
