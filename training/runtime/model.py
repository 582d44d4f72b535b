"""The pyfunc models: raw hourly data in, forecasts of the target pollutant and its AQI out.

``predict(context, model_input, params=None)``: ``model_input`` is a DataFrame (or a dict of
columns) in the long format of :mod:`.frame`: ``station, time, <target>`` and every input column
the model was trained with (see ``required_inputs``), at least ``window`` hours of every trained
station. The result is one row per origin, station and horizon:
``station, origin_time, forecast_time, horizon, <target>, aqi, aqi_category, filled_inputs``
(``<target>`` is the pollutant's name, e.g. ``pm25``, in µg/m³, never negative;
``filled_inputs`` lists the trained input columns that were missing and filled, else "").

Params:

* ``origins`` (list of times): forecast from each of these hours (each needs ``window`` hours of
  input ending there); one call, the same numbers as one call per origin.
* ``all_origins`` (bool): forecast from every hour with a full window (default: the last hour).
* ``allow_missing_inputs`` (bool): a trained input column that is absent or empty is refused by
  default, naming it; with this it is filled with the training medians and named in
  ``filled_inputs``.
* ``ignore_unknown_stations`` (bool): rows of stations the model was not trained on are refused
  by default; with this they are dropped (they cannot be scored: every station has its own
  embedding and place in the graph).

Values outside :data:`.frame.PHYSICAL_RANGES` are refused with the row and column named.

State on disk (:func:`save_state` / :func:`load_state`; no pickle): ``manifest.json``,
``pipeline.json`` and ``forecaster/`` (``booster.ubj`` or ``weights.pt`` plus
``forecaster.json``) for one model; ``members/<i>/`` for an ensemble.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from . import FORMAT
from .aqi import category_names, to_aqi
from .errors import InputError
from .frame import Grid, check_ranges, from_frame, parse_times
from .pipeline import FeaturePipeline, origin_positions


def _flag(params: dict[str, Any] | None, key: str) -> bool:
    v = (params or {}).get(key, False)
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def _origins(params: dict[str, Any] | None) -> np.ndarray | None:
    raw = (params or {}).get("origins")
    if raw is None or (not isinstance(raw, str) and len(raw) == 0):
        return None
    values = [raw] if isinstance(raw, str) else list(raw)
    origins: np.ndarray = parse_times(pd.Series(values), field="origins").to_numpy(dtype="datetime64[ns]")
    return origins


def prepare_input(model: Any, model_input: Any, params: dict[str, Any] | None) -> tuple[Grid, list[str]]:
    """Validated canonical input for ``model`` and the trained inputs that were filled."""
    if isinstance(model_input, Grid) or hasattr(model_input, "station_names"):
        return model_input, []
    df = pd.DataFrame(model_input) if isinstance(model_input, dict) else model_input
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame in the long format, got {type(df).__name__}",
                         field="model_input")
    check_ranges(df)
    known = set(model.stations)
    given = df["station"].astype(str) if "station" in df.columns else None
    if given is not None:
        unknown = sorted(set(given) - known)
        if unknown:
            if not _flag(params, "ignore_unknown_stations"):
                raise InputError(
                    f"input has station(s) {', '.join(unknown)} that the model was not trained on (it knows "
                    f"{', '.join(sorted(known))}); drop them, or pass params={{'ignore_unknown_stations': true}}",
                    field="model_input")
            df = df[given.isin(known).to_numpy()]
    frame, stations = from_frame(df, target=model.target, field="model_input")
    missing = [c for c in model.required_inputs() if frame[c].isna().all()]
    if missing and not _flag(params, "allow_missing_inputs"):
        raise InputError(
            f"input lacks column(s) {', '.join(missing)} that the model was trained with (absent or empty); "
            "give them, or pass params={'allow_missing_inputs': true} to fill them with the training medians",
            field="model_input")
    return Grid(frame, stations), missing


def forecast_frame(stations: list[str], pred: np.ndarray, times: np.ndarray, target: str = "pm25",
                   filled: list[str] | None = None) -> pd.DataFrame:
    """``pred [N, S, H]`` at origin ``times [N]`` as the long output DataFrame."""
    N, S, H = pred.shape
    origin = np.repeat(np.asarray(times, dtype="datetime64[ns]"), S * H)
    horizon = np.tile(np.arange(1, H + 1), N * S)
    values = pred.reshape(-1).astype(np.float64)
    aqi = np.asarray(to_aqi(values, target), dtype=np.float64)
    return pd.DataFrame({
        "station": np.tile(np.repeat(np.asarray(stations, dtype=object), H), N),
        "origin_time": origin,
        "forecast_time": origin + horizon.astype("timedelta64[h]"),
        "horizon": horizon.astype(np.int64),
        target: values,
        "aqi": aqi,
        "aqi_category": category_names(aqi),
        "filled_inputs": ",".join(filled or []),
    })


# MLflow prints "Add type hints to the `predict` method" when a PythonModel subclass without hints
# is defined, under its own warnings.simplefilter("once"), which beats any filter of ours. These
# models' signatures are given explicitly (no inference from hints wanted), so the notice is
# dropped where it is shown, while the classes below are defined, and only that notice.
_showwarning = warnings.showwarning


def _without_type_hint_notice(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                              line: str | None = None) -> None:
    if "Add type hints to the `predict` method" not in str(message):
        _showwarning(message, category, filename, lineno, file, line)


warnings.showwarning = _without_type_hint_notice


class AqiForecastModel(PythonModel):
    """One trained model: the feature pipeline plus the forecaster over scaled windows."""

    def __init__(self, pipeline: FeaturePipeline, forecaster: Any, model_type: str,
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

    @property
    def target(self) -> str:
        return self.pipeline.target_name

    @property
    def target_transform(self) -> str:
        """The space it was trained in (:mod:`.target_space`): ``none`` or ``log1p``."""
        return str(getattr(self.forecaster, "transform", "none"))

    def required_inputs(self) -> list[str]:
        return self.pipeline.required_inputs()

    def forecast(self, data: Any, all_origins: bool = False,
                 origins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Forecasts ``[N, S, H]`` (µg/m³, >= 0) and origin times from canonical data."""
        x, times = self.pipeline.transform(data, all_origins=all_origins, origins=origins)
        return np.clip(np.asarray(self.forecaster.predict(x), dtype=np.float32), 0.0, None), times

    def predict_dataset(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        """Forecasts for every origin with a full window: ``(pred [N, S, H], times [N])``."""
        return self.forecast(data, all_origins=True)

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: MLflow reads them
        data, filled = prepare_input(self, model_input, params)
        pred, times = self.forecast(data, all_origins=_flag(params, "all_origins"), origins=_origins(params))
        return forecast_frame(self.stations, pred, times, self.target, filled)


class EnsembleForecastModel(PythonModel):
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

    @property
    def target(self) -> str:
        return self.members[0].target

    @property
    def target_transform(self) -> str:
        """The members' common training space, or each member's (``xgboost:log1p,lstm:none``)."""
        spaces = [m.target_transform for m in self.members]
        if len(set(spaces)) == 1:
            return spaces[0]
        return ",".join(f"{n}:{t}" for n, t in zip(self.names, spaces, strict=True))

    def required_inputs(self) -> list[str]:
        out: list[str] = []
        for m in self.members:
            out += [c for c in m.required_inputs() if c not in out]
        return out

    def member_predictions(self, data: Any, all_origins: bool = True,
                           origins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Member forecasts aligned on their common origins: ``([M, N, S, H], times [N])``."""
        if origins is not None:  # refuse origins without the widest member's window, naming them
            origin_positions(data.times, origins, self.window)
        outs = [m.forecast(data, all_origins=all_origins and origins is None, origins=origins) for m in self.members]
        common = outs[0][1]
        if origins is None:
            for _, t in outs[1:]:
                common = np.intersect1d(common, t)
        stacked = []
        for m, (pred, t) in zip(self.members, outs, strict=True):
            idx = np.arange(len(t)) if origins is not None else np.searchsorted(t, common)
            order = [m.stations.index(s) for s in self.stations]
            stacked.append(pred[idx][:, order])
        return np.stack(stacked), common

    def combine(self, member_preds: np.ndarray) -> np.ndarray:
        return combine(member_preds, self.weights)

    def predict_dataset(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        preds, times = self.member_predictions(data)
        return self.combine(preds), times

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: MLflow reads them
        data, filled = prepare_input(self, model_input, params)
        origins = _origins(params)
        if origins is not None:
            preds, times = self.member_predictions(data, origins=origins)
        elif _flag(params, "all_origins"):
            preds, times = self.member_predictions(data, all_origins=True)
        else:  # the last hour: each member's last window only
            preds, times = self.member_predictions(data, all_origins=False, origins=data.times[-1:])
        return forecast_frame(self.stations, self.combine(preds), times, self.target, filled)


def combine(member_preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted forecast ``[M, N, S, H]`` -> ``[N, S, H]``, with weights ``[M]`` (one set for all
    horizons) or ``[M, H]`` (one set per horizon); >= 0 as every member is."""
    preds = np.asarray(member_preds, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape == (preds.shape[0],):
        out = np.tensordot(w, preds, axes=1)
    elif w.shape == (preds.shape[0], preds.shape[-1]):
        out = np.einsum("mh,mnsh->nsh", w, preds)
    else:
        raise ValueError(f"weights {w.shape} do not match {preds.shape[0]} members and {preds.shape[-1]} horizons")
    return np.clip(out, 0.0, None).astype(np.float32)


# ---- portable state (no pickle) ----


def save_state(model: AqiForecastModel | EnsembleForecastModel, folder: str) -> None:
    """Write ``model`` as plain files (JSON, XGBoost's format, a torch state dict) under ``folder``."""
    os.makedirs(folder, exist_ok=True)
    manifest: dict[str, Any] = {"format": FORMAT, "model_type": model.model_type, "target": model.target,
                                "metadata": {k: str(v) for k, v in model.metadata.items()}}
    if isinstance(model, EnsembleForecastModel):
        manifest.update(kind="ensemble", names=model.names, weights=np.asarray(model.weights).tolist())
        for i, m in enumerate(model.members):
            save_state(m, os.path.join(folder, "members", str(i)))
    else:
        manifest["kind"] = "single"
        with open(os.path.join(folder, "pipeline.json"), "w") as f:
            json.dump(model.pipeline.to_dict(), f)
        model.forecaster.save(os.path.join(folder, "forecaster"))
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def load_state(folder: str) -> AqiForecastModel | EnsembleForecastModel:
    """The model written by :func:`save_state`."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a portable aqimodels model (format {manifest.get('format')!r})")
    if manifest["kind"] == "ensemble":
        members = [load_state(os.path.join(folder, "members", str(i))) for i in range(len(manifest["names"]))]
        return EnsembleForecastModel(members, np.asarray(manifest["weights"]), manifest["names"],  # type: ignore[arg-type]  # load_state gives the members, all single models here
                                     metadata=manifest.get("metadata"))
    with open(os.path.join(folder, "pipeline.json")) as f:
        pipeline = FeaturePipeline.from_dict(json.load(f))
    sub = os.path.join(folder, "forecaster")
    with open(os.path.join(sub, "forecaster.json")) as f:
        header = json.load(f)
    if header["kind"] == "xgboost":
        from .xgb import XGBoostForecaster

        forecaster: Any = XGBoostForecaster.load(sub, header)
    else:
        from .nets import TorchForecaster

        forecaster = TorchForecaster.load(sub, header)
    return AqiForecastModel(pipeline, forecaster, manifest["model_type"], metadata=manifest.get("metadata"))


class PortableForecastModel(PythonModel):
    """What ``mlflow.pyfunc.load_model`` builds (models-from-code): the model read from its
    ``state`` artifact by :func:`load_state`, predicting as documented above."""

    def __init__(self) -> None:
        self.model: AqiForecastModel | EnsembleForecastModel | None = None

    def load_context(self, context) -> None:  # type: ignore[no-untyped-def]  # no hints: MLflow reads them
        self.model = load_state(context.artifacts["state"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: MLflow reads them
        if self.model is None:
            raise RuntimeError("model state not loaded (load_context was not called)")
        return self.model.predict(context, model_input, params)  # type: ignore[no-untyped-call]  # unannotated on purpose (MLflow reads predict's hints)


warnings.showwarning = _showwarning  # the classes above are defined
