"""Packaging of the pyfunc models for MLflow: portable (models-from-code), plus loading old ones.

The models and their ``predict`` live in :mod:`aqimodels.training.runtime.model` (documented
there: input, params, output). This module writes them as MLflow models that load with plain
``mlflow.pyfunc.load_model`` where aqimodels is not installed, and reads them back.

Why models-from-code with ``code_paths`` (not a pickled ``python_model``): a pickle names the
classes by their import path, ``aqimodels.training...``, so it loads only where aqimodels is
installed, and unpickling runs code. A portable model is instead

* ``state/`` (artifact): the model as plain files (pipeline JSON, the booster in XGBoost's own
  format, torch weights as a state dict loaded with ``weights_only``), see ``runtime.model.save_state``;
* ``code/aqi_forecast_runtime/`` (``code_paths``): a copy of :mod:`aqimodels.training.runtime`,
  which imports nothing of aqimodels, so its inference code is exactly what training used;
* ``mlflow_model_code.py``: the models-from-code file that builds the model from ``state/``;
* ``requirements.txt`` listing only third-party distributions, an explicit signature (params
  included) and an input example (the model's last training window, raw).

Models registered before (pickled ``python_model.pkl`` referring to ``aqimodels.training.model``,
``...features``, ``...trainers.*``) still load where aqimodels is installed: those names are
re-exported from the runtime.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import warnings
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from aqimodels.training import runtime
from aqimodels.training.runtime.frame import VALUE_COLUMNS
from aqimodels.training.runtime.model import (
    AqiForecastModel,
    EnsembleForecastModel,
    combine,
    forecast_frame,
    load_state,
    save_state,
)
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

__all__ = [
    "OUTPUT_COLUMNS", "AqiForecastModel", "EnsembleForecastModel", "combine", "forecast_frame", "input_example",
    "load_forecast_model", "load_state", "pip_requirements", "raw_forecast", "save_pyfunc", "save_state", "signature",
]

OUTPUT_COLUMNS = ("station", "origin_time", "forecast_time", "horizon", "pm25", "aqi", "aqi_category",
                  "filled_inputs")
"""The output columns of a PM2.5 model (another target's column is named after it)."""

RUNTIME_DIR = os.path.dirname(os.path.abspath(runtime.__file__))
MODEL_CODE_FILE = os.path.join(RUNTIME_DIR, "mlflow_model_code.py")


def signature(target: str = "pm25") -> ModelSignature:
    """Raw long-format input (station, time, target required; ``time`` of any type, parsed like
    training: datetimes, ISO strings, timezone-aware) -> forecast rows, with the params."""
    optional = [c for c in VALUE_COLUMNS if c != target] + ["latitude", "longitude"]
    any_time = AnyType()  # type: ignore[no-untyped-call]  # mlflow's AnyType() is unannotated
    columns: list[ColSpec | TensorSpec] = [ColSpec("string", "station"), ColSpec(any_time, "time"),
                                           ColSpec("double", target)]
    inputs = Schema(columns + [ColSpec("double", c, required=False) for c in optional])
    outputs = Schema([
        ColSpec("string", "station"), ColSpec("datetime", "origin_time"), ColSpec("datetime", "forecast_time"),
        ColSpec("long", "horizon"), ColSpec("double", target), ColSpec("double", "aqi"),
        ColSpec("string", "aqi_category"), ColSpec("string", "filled_inputs"),
    ])
    params = ParamSchema([
        ParamSpec("all_origins", "boolean", False), ParamSpec("origins", "string", [], shape=(-1,)),
        ParamSpec("allow_missing_inputs", "boolean", False), ParamSpec("ignore_unknown_stations", "boolean", False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example(model: AqiForecastModel | EnsembleForecastModel, data: Any) -> pd.DataFrame:
    """The model's documented input: its last ``window`` hours of raw data, ``time`` as ISO strings."""
    frame = data.frame
    last = frame["time"].max()
    tail = frame[frame["time"] > last - pd.Timedelta(hours=model.window)]
    cols = ["station", "time"] + [c for c in VALUE_COLUMNS if tail[c].notna().any()]
    out = tail[cols].copy()
    out["time"] = out["time"].dt.strftime("%Y-%m-%dT%H:%M:%S")
    return out.reset_index(drop=True)


_DISTRIBUTIONS = {
    "xgboost": ["xgboost-cpu"],
    "lstm": ["torch"],
    "gnn": ["torch", "torch-geometric"],
    "ensemble": ["xgboost-cpu", "torch", "torch-geometric"],
}


def pip_requirements(model_type: str) -> list[str]:
    """Explicit requirements: third-party only (never aqimodels; never both xgboost and xgboost-cpu)."""
    out = []
    for dist in ["mlflow", "numpy", "pandas", *_DISTRIBUTIONS.get(model_type, [])]:
        try:
            version = importlib.metadata.version(dist).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0
            out.append(f"{dist}=={version}")
        except importlib.metadata.PackageNotFoundError:
            out.append(dist)
    return out


def save_pyfunc(model: AqiForecastModel | EnsembleForecastModel, path: str, example: pd.DataFrame | None = None) -> None:
    """Write the portable pyfunc model directory (explicit signature and requirements: fast)."""
    with tempfile.TemporaryDirectory(prefix="aqimodel-save-") as tmp:
        state = os.path.join(tmp, "state")
        save_state(model, state)
        code = os.path.join(tmp, runtime.SHIPPED_NAME)
        shutil.copytree(RUNTIME_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "py.typed"))
        with warnings.catch_warnings():  # MLflow's notices about type hints: the signature is explicit
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path, python_model=MODEL_CODE_FILE, artifacts={"state": state}, code_paths=[code],
                signature=signature(model.target), input_example=example,
                pip_requirements=pip_requirements(model.model_type),
                metadata={"model_type": model.model_type, "window": model.window, "stations": model.stations,
                          "target": model.target, "target_transform": model.target_transform,
                          "format": runtime.FORMAT,
                          "required_inputs": model.required_inputs(),
                          **{k: str(v) for k, v in model.metadata.items()}},
            )


def load_forecast_model(local_path: str) -> Any:
    """The model object of a downloaded model directory, portable or pickled (before portability).

    Portable models are read from their ``state/`` with this process's own runtime (so the
    objects are :class:`AqiForecastModel`, and no second copy of the runtime is imported)."""
    from mlflow.models import Model

    conf = Model.load(os.path.join(local_path, "MLmodel")).flavors.get("python_function", {})
    state = (conf.get("artifacts") or {}).get("state")
    if state:
        return load_state(os.path.join(local_path, state["path"]))
    return mlflow.pyfunc.load_model(local_path).unwrap_python_model()


def raw_forecast(model: Any, x: np.ndarray) -> np.ndarray:
    """A single model's forecaster output before the lower bound (bench/measurement only)."""
    fc = model.forecaster
    return np.asarray(fc.predict_unbounded(x) if hasattr(fc, "predict_unbounded") else fc.predict(x))
