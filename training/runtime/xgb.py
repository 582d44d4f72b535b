"""The XGBoost forecaster at inference: tabular rows derived from the input window, one booster.

The features are DERIVED FROM THE WINDOW ``x`` only (so ``predict(x)`` needs nothing else): target
lags (+0, 1, 2, 3, 5, 11, 23 h back), rolling means (3, 6, 12, window h) and standard deviations
(6 h, window), the 3 h change, every feature at the origin hour, 6 h means of wind and rain, the
neighbours' mean target (now, 3 h ago, 6 h mean), every station's target now and 3 h ago, the
number of missing target hours in the window, and the station index. The booster predicts the
change from the origin's value, scaled by the target's standard deviation, or with
``target_transform="log1p"`` the log change (:mod:`.target_space`). (Training is in
``aqimodels.training.trainers.xgboost``.)
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .target_space import DEFAULT_TARGET_TRANSFORM, from_log_change

PM_LAGS = (0, 1, 2, 3, 5, 11, 23)
ROLL_MEANS = (3, 6, 12)


def derive_features(x: np.ndarray, feature_names: list[str], target_mean: float, target_std: float,
                    target: str = "pm25") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Tabular rows ``[N*S, D]`` from windows ``x [N, W, S, F]``, plus the raw target at each
    origin ``[N*S]`` and the column names. Rows are ordered sample-major (n, s). Column names
    keep the ``pm25_`` prefix for every target (they name roles, and old boosters use them)."""
    N, W, S, _ = x.shape
    p = feature_names.index(target)
    pm = np.asarray(x[..., p], dtype=np.float32)  # [N, W, S], scaled
    cols: list[np.ndarray] = []  # each [N, S]
    names: list[str] = []

    def add(name: str, a: np.ndarray) -> None:
        cols.append(np.asarray(a, dtype=np.float32))
        names.append(name)

    for lag in PM_LAGS:
        if lag < W:
            add(f"pm25_lag{lag}", pm[:, W - 1 - lag])
    for k in (*ROLL_MEANS, W):
        if k <= W and f"pm25_mean{k}" not in names:
            add(f"pm25_mean{k}", pm[:, W - k:].mean(axis=1))
    for k in (6, W):
        if 2 <= k <= W and f"pm25_std{k}" not in names:
            add(f"pm25_std{k}", pm[:, W - k:].std(axis=1))
    if W > 3:
        add("pm25_diff3", pm[:, -1] - pm[:, -4])
    last = np.asarray(x[:, -1], dtype=np.float32)  # [N, S, F]
    for j, f in enumerate(feature_names):
        add(f"{f}_now", last[:, :, j])
    k6 = min(6, W)
    for f in ("wind_u", "wind_v", "rain", "wind_speed"):
        if f in feature_names:
            add(f"{f}_mean6", np.asarray(x[:, W - k6:, :, feature_names.index(f)]).mean(axis=1))
    indicator = f"{target}_missing"
    if indicator in feature_names:
        add("pm25_missing_count", np.asarray(x[..., feature_names.index(indicator)]).sum(axis=1))
    if S > 1:
        tot_now = pm[:, -1].sum(axis=1, keepdims=True)
        add("neigh_pm25_now", (tot_now - pm[:, -1]) / (S - 1))
        if W > 3:
            tot3 = pm[:, -4].sum(axis=1, keepdims=True)
            add("neigh_pm25_lag3", (tot3 - pm[:, -4]) / (S - 1))
        m6 = pm[:, W - k6:].mean(axis=1)
        add("neigh_pm25_mean6", (m6.sum(axis=1, keepdims=True) - m6) / (S - 1))
        for s in range(S):
            add(f"st{s}_pm25_now", np.repeat(pm[:, -1, s:s + 1], S, axis=1))
            if W > 3:
                add(f"st{s}_pm25_lag3", np.repeat(pm[:, -4, s:s + 1], S, axis=1))
    add("station", np.broadcast_to(np.arange(S, dtype=np.float32), (N, S)))
    tab = np.stack(cols, axis=-1).reshape(N * S, len(cols))
    origin_raw = (pm[:, -1] * target_std + target_mean).reshape(N * S)
    return tab, origin_raw, names


class XGBoostForecaster:
    """A fitted booster plus the transform from windows to tabular rows; forecasts are >= 0."""

    def __init__(self, booster: Any, feature_names: list[str], target_mean: float, target_std: float,
                 horizon: int, best_iteration: int, target: str = "pm25",
                 target_transform: str = DEFAULT_TARGET_TRANSFORM, log_scale: float = 1.0) -> None:
        self.booster = booster
        self.feature_names = list(feature_names)
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)
        self.horizon = int(horizon)
        self.best_iteration = int(best_iteration)
        self.target = target
        self.target_transform = target_transform
        self.log_scale = float(log_scale)

    @property
    def transform(self) -> str:  # boosters pickled before the option have no attribute
        return str(self.__dict__.get("target_transform", DEFAULT_TARGET_TRANSFORM))

    def predict_unbounded(self, x: np.ndarray) -> np.ndarray:
        """The booster's forecast before the lower bound (for measuring what the bound changes)."""
        N, _, S, _ = x.shape
        if N == 0:
            return np.zeros((0, S, self.horizon), dtype=np.float32)
        tab, origin, _ = derive_features(x, self.feature_names, self.target_mean, self.target_std,
                                         getattr(self, "target", "pm25"))
        delta = self.booster.inplace_predict(tab, iteration_range=(0, self.best_iteration + 1))
        delta = np.asarray(delta, dtype=np.float32).reshape(N * S, self.horizon)
        if self.transform == "log1p":
            origin = np.maximum(origin.astype(np.float64), 0.0)
            logged: np.ndarray = from_log_change(delta, origin, self.log_scale, getattr(self, "target", "pm25"))
            return logged.reshape(N, S, self.horizon)
        forecast: np.ndarray = (origin[:, None] + delta * self.target_std).reshape(N, S, self.horizon)
        return forecast

    def predict(self, x: np.ndarray) -> np.ndarray:
        bounded: np.ndarray = np.clip(self.predict_unbounded(x), 0.0, None)
        return bounded

    # ---- portable state: the booster in XGBoost's own format plus a JSON header ----
    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.booster.save_model(os.path.join(folder, "booster.ubj"))
        with open(os.path.join(folder, "forecaster.json"), "w") as f:
            json.dump({"kind": "xgboost", "feature_names": self.feature_names, "target_mean": self.target_mean,
                       "target_std": self.target_std, "horizon": self.horizon,
                       "best_iteration": self.best_iteration, "target": getattr(self, "target", "pm25"),
                       "target_transform": self.transform, "log_scale": float(self.__dict__.get("log_scale", 1.0))}, f)

    @classmethod
    def load(cls, folder: str, header: dict[str, Any]) -> XGBoostForecaster:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(os.path.join(folder, "booster.ubj"))
        return cls(booster, header["feature_names"], header["target_mean"], header["target_std"],
                   header["horizon"], header["best_iteration"], header.get("target", "pm25"),
                   header.get("target_transform", DEFAULT_TARGET_TRANSFORM), header.get("log_scale", 1.0))
