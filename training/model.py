"""The MLflow pyfunc models: raw hourly data in, PM2.5/AQI forecasts out.

``AqiForecastModel`` holds one :class:`FeaturePipeline` and one ``Forecaster``;
``EnsembleForecastModel`` holds member ``AqiForecastModel`` objects and their weights (each
member applies its OWN pipeline to the raw data, so members with different windows combine).

``predict(context, model_input, params=None)``: ``model_input`` is a DataFrame in the long
format of ``aqimodels.training.data`` (``station, time, pm25`` required, other pollutant and
weather columns optional but needed if the model was trained with them; at least ``window``
hours of every trained station). The result is one row per station and horizon for the
latest origin (params ``{"all_origins": True}``: for every origin with a full window):
``station, origin_time, forecast_time, horizon, pm25, aqi, aqi_category``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from aqimodels.training.core import Forecaster
from aqimodels.training.data import VALUE_COLUMNS, AirQualityData, from_frame
from aqimodels.training.evaluation import AQI_CATEGORIES, aqi_category_index, pm25_to_aqi
from aqimodels.training.features import FeaturePipeline
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

# Two MLflow notices our own models trigger, on every worker start and every training: the
# models' signatures are given explicitly (no type-hint inference wanted), and a pyfunc saved
# from a Python object is pickled by design (the artifact is ours). Only those two are silenced.
# (MLflow emits the first under its own warnings.simplefilter("once"), which beats a filter of
# ours: the notice is dropped where it is shown, while the two classes below are defined.)
_showwarning = warnings.showwarning


def _without_type_hint_notice(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                              line: str | None = None) -> None:
    if "Add type hints to the `predict` method" not in str(message):
        _showwarning(message, category, filename, lineno, file, line)


class _NoCloudPickleNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "serialized using CloudPickle" not in record.getMessage()


logging.getLogger("mlflow.pyfunc").addFilter(_NoCloudPickleNotice())

OUTPUT_COLUMNS = ("station", "origin_time", "forecast_time", "horizon", "pm25", "aqi", "aqi_category")


def _to_data(model_input: Any) -> AirQualityData:
    if isinstance(model_input, AirQualityData):
        return model_input
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    return from_frame(model_input, spec="inference")


def _all_origins(params: dict[str, Any] | None) -> bool:
    v = (params or {}).get("all_origins", False)
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def forecast_frame(stations: list[str], pred: np.ndarray, times: np.ndarray) -> pd.DataFrame:
    """``pred [N, S, H]`` at origin ``times [N]`` as the long output DataFrame."""
    N, S, H = pred.shape
    origin = np.repeat(np.asarray(times, dtype="datetime64[ns]"), S * H)
    horizon = np.tile(np.arange(1, H + 1), N * S)
    values = pred.reshape(-1).astype(np.float64)
    aqi = np.asarray(pm25_to_aqi(values), dtype=np.float64)
    cat = aqi_category_index(aqi)
    names = np.array(AQI_CATEGORIES + ("",), dtype=object)
    return pd.DataFrame({
        "station": np.tile(np.repeat(np.asarray(stations, dtype=object), H), N),
        "origin_time": origin,
        "forecast_time": origin + horizon.astype("timedelta64[h]"),
        "horizon": horizon.astype(np.int64),
        "pm25": values,
        "aqi": aqi,
        "aqi_category": names[cat],
    })


warnings.showwarning = _without_type_hint_notice  # put back after EnsembleForecastModel


class AqiForecastModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """One trained model: the feature pipeline plus the forecaster over scaled windows."""

    def __init__(self, pipeline: FeaturePipeline, forecaster: Forecaster, model_type: str,
                 metadata: dict[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self.forecaster = forecaster
        self.model_type = model_type
        self.metadata = dict(metadata or {})

    @property
    def window(self) -> int:
        return self.pipeline.window

    @property
    def stations(self) -> list[str]:
        return list(self.pipeline.stations)

    def forecast(self, data: AirQualityData, all_origins: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """PM2.5 forecasts ``[N, S, H]`` (µg/m³) and origin times from raw data."""
        x, times = self.pipeline.transform(data, all_origins=all_origins)
        return np.asarray(self.forecaster.predict(x), dtype=np.float32), times

    def predict_dataset(self, data: AirQualityData) -> tuple[np.ndarray, np.ndarray]:
        """Forecasts for every origin with a full window: ``(pred [N, S, H], times [N])``."""
        return self.forecast(data, all_origins=True)

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: MLflow reads them
        data = _to_data(model_input)
        pred, times = self.forecast(data, all_origins=_all_origins(params))
        return forecast_frame(self.stations, pred, times)


class EnsembleForecastModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """A weighted combination of member models (weights non-negative, summing to 1)."""

    def __init__(self, members: list[AqiForecastModel], weights: np.ndarray, names: list[str],
                 metadata: dict[str, Any] | None = None) -> None:
        if len(members) != len(weights) or len(members) != len(names):
            raise ValueError("members, weights and names must have the same length")
        self.members = list(members)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.names = list(names)
        self.model_type = "ensemble"
        self.metadata = dict(metadata or {})
        self.pipeline = max(self.members, key=lambda m: m.window).pipeline  # the widest window

    @property
    def window(self) -> int:
        return max(m.window for m in self.members)

    @property
    def stations(self) -> list[str]:
        return list(self.members[0].stations)

    def member_predictions(self, data: AirQualityData, all_origins: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Member forecasts aligned on their common origins: ``([M, N, S, H], times [N])``."""
        outs = [m.forecast(data, all_origins=all_origins) for m in self.members]
        common = outs[0][1]
        for _, t in outs[1:]:
            common = np.intersect1d(common, t)
        stacked = []
        for m, (pred, t) in zip(self.members, outs):
            idx = np.searchsorted(t, common)
            order = [m.stations.index(s) for s in self.stations]
            stacked.append(pred[idx][:, order])
        return np.stack(stacked), common

    def combine(self, member_preds: np.ndarray) -> np.ndarray:
        return combine(member_preds, self.weights)

    def predict_dataset(self, data: AirQualityData) -> tuple[np.ndarray, np.ndarray]:
        preds, times = self.member_predictions(data)
        return self.combine(preds), times

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: MLflow reads them
        data = _to_data(model_input)
        preds, times = self.member_predictions(data, all_origins=True)
        pred = self.combine(preds)
        if not _all_origins(params):
            pred, times = pred[-1:], times[-1:]
        return forecast_frame(self.stations, pred, times)


warnings.showwarning = _showwarning


def combine(member_preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The ensemble combination (``aqimodels.training.trainers.ensemble.combine``)."""
    try:
        from aqimodels.training.trainers.ensemble import combine as _combine
    except ImportError:  # the ensemble module is optional at inference: same formula
        w = np.asarray(weights, dtype=np.float64)
        return np.tensordot(w, np.asarray(member_preds, dtype=np.float64), axes=1).astype(np.float32)
    return np.asarray(_combine(np.asarray(member_preds), np.asarray(weights)), dtype=np.float32)


# ---- MLflow packaging ----


def signature() -> ModelSignature:
    """Raw long-format input (station, time, pm25 required) -> forecast rows."""
    optional = [c for c in VALUE_COLUMNS if c != "pm25"] + ["latitude", "longitude"]
    inputs = Schema(
        [ColSpec("string", "station"), ColSpec("datetime", "time"), ColSpec("double", "pm25")]
        + [ColSpec("double", c, required=False) for c in optional]
    )
    outputs = Schema([
        ColSpec("string", "station"), ColSpec("datetime", "origin_time"), ColSpec("datetime", "forecast_time"),
        ColSpec("long", "horizon"), ColSpec("double", "pm25"), ColSpec("double", "aqi"),
        ColSpec("string", "aqi_category"),
    ])
    params = ParamSchema([ParamSpec("all_origins", "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


_DISTRIBUTIONS = {
    "xgboost": ["xgboost-cpu"],
    "lstm": ["torch"],
    "gnn": ["torch", "torch-geometric"],
    "ensemble": ["xgboost-cpu", "torch", "torch-geometric"],
}


def pip_requirements(model_type: str) -> list[str]:
    """Explicit requirements (no inference subprocess; never both xgboost and xgboost-cpu)."""
    out = []
    for dist in ["mlflow", "numpy", "pandas", "scikit-learn", *_DISTRIBUTIONS.get(model_type, [])]:
        try:
            version = importlib.metadata.version(dist).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0
            out.append(f"{dist}=={version}")
        except importlib.metadata.PackageNotFoundError:
            out.append(dist)
    return out


def save_pyfunc(model: AqiForecastModel | EnsembleForecastModel, path: str) -> None:
    """Write the pyfunc model directory (explicit signature and requirements: fast)."""
    import warnings

    with warnings.catch_warnings():  # "no input example" / cloudpickle notices: the signature is explicit
        warnings.simplefilter("ignore", UserWarning)
        _save(model, path)


def _save(model: AqiForecastModel | EnsembleForecastModel, path: str) -> None:
    mlflow.pyfunc.save_model(
        path, python_model=model, signature=signature(), pip_requirements=pip_requirements(model.model_type),
        metadata={"model_type": model.model_type, "window": model.window,
                  "stations": model.stations, **{k: str(v) for k, v in model.metadata.items()}},
    )
