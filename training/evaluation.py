"""Forecast metrics on ``[N, S, H]`` PM2.5 arrays (µg/m³) with a mask of observed targets.

Metric names (overall, then per report horizon +1, +6, +24 h with suffix ``_h1``, ``_h6``, ``_h24``):

* ``rmse``, ``mae``: root mean squared / mean absolute error over observed cells.
* ``r2``: ``1 - SSE / SST`` with SST around the mean of the observed targets of the same cells.
* ``accuracy``: within-threshold accuracy, the fraction of cells with
  ``|pred - actual| <= max(10 µg/m³, 0.15 * actual)`` (an absolute floor for clean air,
  15% relative tolerance for polluted air).
* ``aqi_accuracy``: the fraction of cells whose predicted US EPA AQI category equals the
  actual one (the target pollutant's breakpoints, ``aqimodels.training.runtime.aqi``).
* ``baseline_rmse``, ``baseline_mae``, ``baseline_accuracy`` (+ ``_hK``): the persistence
  forecast (the last observed PM2.5 at the origin, for every horizon) on the same cells.
* ``skill``, ``skill_hK``: ``1 - rmse / baseline_rmse`` (> 0: better than persistence).

AQI: US EPA PM2.5 breakpoints as revised in February 2024 (24-hour PM2.5, µg/m³, truncated to
0.1): 0-9.0 Good (0-50), 9.1-35.4 Moderate (51-100), 35.5-55.4 Unhealthy for Sensitive
Groups (101-150), 55.5-125.4 Unhealthy (151-200), 125.5-225.4 Very Unhealthy (201-300),
225.5-325.4 Hazardous (301-500); above 325.4 the last segment is extrapolated ("beyond the
AQI", still Hazardous). The hourly forecast is mapped with the same breakpoints (a NowCast
would need the forecast history; this is the usual simplification).
"""

from __future__ import annotations

import numpy as np
from aqimodels.training.core import REPORT_HORIZONS
from aqimodels.training.runtime.aqi import (  # noqa: F401 - public names of this module
    AQI_CATEGORIES,
    PM25_BREAKPOINTS,
    aqi_category,
    aqi_category_index,
    pm25_to_aqi,
    to_aqi,
)

ABS_TOLERANCE = 10.0
REL_TOLERANCE = 0.15


def pm25_category_index(x: np.ndarray, pollutant: str = "pm25") -> np.ndarray:
    """AQI category index of concentrations of ``pollutant`` (PM2.5 by default)."""
    return aqi_category_index(to_aqi(x, pollutant))


def persistence(last_pm25: np.ndarray, horizon: int) -> np.ndarray:
    """The persistence forecast ``[N, S, H]``: the last observed value for every horizon."""
    return np.repeat(np.asarray(last_pm25, dtype=np.float64)[..., None], horizon, axis=-1)


def _basic(pred: np.ndarray, y: np.ndarray, m: np.ndarray, target: str = "pm25") -> dict[str, float]:
    p, t = pred[m].astype(np.float64), y[m].astype(np.float64)
    if t.size == 0:
        return {k: float("nan") for k in ("rmse", "mae", "r2", "accuracy", "aqi_accuracy")}
    err = p - t
    sse = float(np.sum(err**2))
    sst = float(np.sum((t - t.mean()) ** 2))
    return {
        "rmse": float(np.sqrt(sse / t.size)),
        "mae": float(np.mean(np.abs(err))),
        "r2": float(1 - sse / sst) if sst > 0 else float("nan"),
        "accuracy": float(np.mean(np.abs(err) <= np.maximum(ABS_TOLERANCE, REL_TOLERANCE * np.abs(t)))),
        "aqi_accuracy": float(np.mean(pm25_category_index(p, target) == pm25_category_index(t, target))),
    }


def forecast_metrics(
    pred: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None, horizons: tuple[int, ...] = REPORT_HORIZONS,
    target: str = "pm25",
) -> dict[str, float]:
    """rmse, mae, r2, accuracy, aqi_accuracy overall and at each report horizon (``_h1`` ...)."""
    pred, y = np.asarray(pred), np.asarray(y)
    if pred.shape != y.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {y.shape}")
    m = np.isfinite(y) & np.isfinite(pred)
    if mask is not None:
        m &= mask
    out = _basic(pred, y, m, target)
    H = y.shape[-1]
    for h in horizons:
        if h <= H:
            k = h - 1
            out.update({f"{name}_h{h}": v for name, v in _basic(pred[..., k], y[..., k], m[..., k], target).items()})
    return out


def evaluate(
    pred: np.ndarray, y: np.ndarray, last_pm25: np.ndarray, mask: np.ndarray | None = None,
    horizons: tuple[int, ...] = REPORT_HORIZONS, target: str = "pm25",
) -> dict[str, float]:
    """Model metrics plus the persistence baseline on exactly the same cells, and skill scores.

    Cells count where the target, the prediction and the baseline are all finite (and ``mask``).
    """
    pred, y = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    base = persistence(last_pm25, y.shape[-1])
    m = np.isfinite(y) & np.isfinite(pred) & np.isfinite(base)
    if mask is not None:
        m &= mask
    out = forecast_metrics(pred, y, m, horizons, target)
    b = forecast_metrics(base, y, m, horizons, target)
    for k in ("rmse", "mae", "accuracy", "aqi_accuracy"):
        out[f"baseline_{k}"] = b[k]
        for h in horizons:
            if f"{k}_h{h}" in b:
                out[f"baseline_{k}_h{h}"] = b[f"{k}_h{h}"]
    out["skill"] = _skill(out["rmse"], b["rmse"])
    for h in horizons:
        if f"rmse_h{h}" in out:
            out[f"skill_h{h}"] = _skill(out[f"rmse_h{h}"], b[f"rmse_h{h}"])
    out["test_cells"] = float(m.sum())
    return out


def _skill(rmse: float, baseline: float) -> float:
    return float(1 - rmse / baseline) if baseline and np.isfinite(baseline) and baseline > 0 else float("nan")


def masked_rmse(pred: np.ndarray, y: np.ndarray) -> float:
    """RMSE over the finite targets (µg/m³)."""
    m = np.isfinite(y) & np.isfinite(pred)
    return float(np.sqrt(np.mean((pred[m] - y[m]) ** 2))) if m.any() else float("nan")
