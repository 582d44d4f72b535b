"""Gradient-boosted trees over lag/rolling features derived from the input window.

One row per (sample, station). The features are DERIVED FROM THE WINDOW ``x`` only (so the
forecaster's ``predict(x)`` applies the same transform and needs nothing else): PM2.5 lags
(+0, 1, 2, 3, 5, 11, 23 h back), rolling means (3, 6, 12, window h) and standard deviations
(6 h, window), the 3 h change, every feature at the origin hour (weather, calendar, missing
indicator), 6 h means of wind and rain, the neighbours' mean PM2.5 (now, 3 h ago, 6 h mean),
every station's PM2.5 now and 3 h ago (so trees can learn upwind transport), the number of
missing PM2.5 hours in the window, and the station index.

Targets: the 24 horizons at once (``multi_strategy="one_output_per_tree"``) as the change from
the origin's PM2.5, scaled by the PM2.5 standard deviation; with ``extra["target_transform"] =
"log1p"`` as the log change ``log1p(y) - log1p(origin)`` scaled by its training standard
deviation (:mod:`aqimodels.training.runtime.target_space`). The objective is a masked squared
error: unobserved targets get zero gradient and hessian, so they do not count. Early stopping
on the validation RMSE (µg/m³, a custom metric over observed targets only).

Progress: ``xgb.train`` runs in a thread; a ``TrainingCallback`` puts one ``EpochFinished``
per boosting round on a queue and returns ``stop.is_set()``; ``fit`` drains the queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import xgboost as xgb
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import EpochFinished, FeatureSet, TrainConfig, TrainingCancelled
from aqimodels.training.runtime.target_space import (
    check_transform,
    fit_log_scale,
    from_log_change,
    log_change,
)
from aqimodels.training.runtime.xgb import (  # noqa: F401 - XGBoostForecaster: old pickles name it here
    PM_LAGS,
    ROLL_MEANS,
    XGBoostForecaster,
    derive_features,
)

DEFAULTS: dict[str, Any] = {
    "max_epochs": 300,
    "learning_rate": 0.1,
    "early_stopping_patience": 15,
    "max_depth": 5,
    "min_child_weight": 3.0,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "reg_lambda": 1.0,
    "max_bin": 64,
}

METRIC = "val_rmse_ugm3"


class _Progress(xgb.callback.TrainingCallback):
    def __init__(self, q: queue.Queue[Any], stop: _Either, total: int, std: float, t0: float) -> None:
        super().__init__()
        self.q, self.stop, self.total, self.std, self.t0 = q, stop, total, std, t0

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        train = evals_log.get("train", {}).get(METRIC, [float("nan")])[-1]
        val = evals_log.get("val", {}).get(METRIC, [float("nan")])[-1]
        self.q.put(EpochFinished(
            epoch=epoch + 1, total_epochs=self.total,
            loss=float((train / self.std) ** 2),  # masked MSE in scaled units
            validation_rmse=float(val), elapsed_seconds=time.monotonic() - self.t0,
        ))
        return self.stop.is_set()


def _float(extra: dict[str, str], key: str, default: float) -> float:
    try:
        return float(extra.get(key, default))
    except ValueError:
        raise InvalidArgumentError(f"xgboost parameter {key} must be a number, got {extra[key]!r}", field="config") from None


def _transform(extra: dict[str, str]) -> str:
    try:
        return str(check_transform(extra.get("target_transform", "")))
    except ValueError as e:
        raise InvalidArgumentError(str(e), field="config") from None


class XGBoostTrainer:
    """The Trainer protocol (core.py) for gradient-boosted trees."""

    name = "xgboost"

    def __init__(self) -> None:
        self.forecaster: XGBoostForecaster | None = None
        self.convergence: dict[str, float] = {}
        self.params: dict[str, Any] = {}

    def resolve_params(self, config: TrainConfig) -> dict[str, Any]:
        e = config.extra or {}
        return {
            "max_epochs": int(config.max_epochs or DEFAULTS["max_epochs"]),
            "learning_rate": float(config.learning_rate or DEFAULTS["learning_rate"]),
            "early_stopping_patience": int(config.early_stopping_patience or DEFAULTS["early_stopping_patience"]),
            "max_depth": int(_float(e, "max_depth", DEFAULTS["max_depth"])),
            "min_child_weight": _float(e, "min_child_weight", DEFAULTS["min_child_weight"]),
            "subsample": _float(e, "subsample", DEFAULTS["subsample"]),
            "colsample_bytree": _float(e, "colsample_bytree", DEFAULTS["colsample_bytree"]),
            "reg_lambda": _float(e, "reg_lambda", DEFAULTS["reg_lambda"]),
            "max_bin": int(_float(e, "max_bin", DEFAULTS["max_bin"])),
            "seed": int(config.seed),
            "target_transform": _transform(e),
        }

    def fit(self, features: FeatureSet, config: TrainConfig, stop: threading.Event) -> Iterator[EpochFinished]:
        t0 = time.monotonic()
        p = self.params = self.resolve_params(config)
        fs = features
        std, mean, H = fs.target_std, fs.target_mean, fs.horizon

        target = fs.target
        log = p["target_transform"] == "log1p"
        log_scale = 1.0
        if log:
            _, train_origin, _ = derive_features(fs.train.x, fs.feature_names, mean, std, target)
            log_scale = fit_log_scale(np.asarray(fs.train.y).reshape(-1, H), np.maximum(train_origin, 0.0))

        def matrix(split: Any) -> tuple[xgb.DMatrix, np.ndarray, tuple[np.ndarray, np.ndarray]]:
            tab, origin, names = derive_features(split.x, fs.feature_names, mean, std, target)
            y = np.asarray(split.y, dtype=np.float64).reshape(-1, H)
            mask = np.isfinite(y)
            origin = np.maximum(origin.astype(np.float64), 0.0) if log else origin
            change = log_change(y, origin) / log_scale if log else (y - origin[:, None]) / std
            label = np.where(mask, change, 0.0).astype(np.float32)
            keep = mask.any(axis=1)  # rows with no observed target carry nothing
            dm = xgb.DMatrix(tab[keep], label=label[keep], feature_names=names, nthread=-1)
            observed = (origin[keep], np.where(mask, y, 0.0)[keep]) if log else (origin[:0], y[:0])
            return dm, mask[keep].astype(np.float32), observed

        dtrain, mtrain, ttrain = matrix(fs.train)
        dval, mval, tval = matrix(fs.val)
        masks = {id(dtrain): mtrain, id(dval): mval}
        truth = {id(dtrain): ttrain, id(dval): tval}  # origin and target in µg/m³ (log1p only)

        def objective(predt: np.ndarray, dm: xgb.DMatrix) -> tuple[np.ndarray, np.ndarray]:
            m = masks[id(dm)]
            label = dm.get_label().reshape(m.shape)
            pr = predt.reshape(m.shape)
            return ((pr - label) * m).reshape(predt.shape), m.reshape(predt.shape) + 1e-6 * (1 - m.reshape(predt.shape))

        def metric(predt: np.ndarray, dm: xgb.DMatrix) -> tuple[str, float]:
            m = masks[id(dm)]
            if log:  # judged in µg/m³ like every model, whatever space it is trained in
                origin, y = truth[id(dm)]
                err = (from_log_change(predt.reshape(m.shape), origin, log_scale, target) - y) * m
                return METRIC, float(np.sqrt((err**2).sum() / max(m.sum(), 1.0)))
            label = dm.get_label().reshape(m.shape)
            err = (predt.reshape(m.shape) - label) * m
            return METRIC, float(np.sqrt((err**2).sum() / max(m.sum(), 1.0)) * std)

        params = {
            "tree_method": "hist", "device": "cpu", "multi_strategy": "one_output_per_tree",
            "eta": p["learning_rate"], "max_depth": p["max_depth"], "min_child_weight": p["min_child_weight"],
            "subsample": p["subsample"], "colsample_bytree": p["colsample_bytree"], "lambda": p["reg_lambda"],
            "max_bin": p["max_bin"], "seed": p["seed"], "base_score": 0.0, "disable_default_eval_metric": 1,
        }
        q: queue.Queue[Any] = queue.Queue()
        abandon = threading.Event()
        both = _Either(stop, abandon)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["booster"] = xgb.train(
                    params, dtrain, num_boost_round=p["max_epochs"], evals=[(dtrain, "train"), (dval, "val")],
                    obj=objective, custom_metric=metric, verbose_eval=False,
                    callbacks=[
                        _Progress(q, both, p["max_epochs"], std, t0),  # first: `any()` short-circuits
                        xgb.callback.EarlyStopping(rounds=p["early_stopping_patience"], metric_name=METRIC,
                                                   data_name="val", maximize=False, save_best=False),
                    ],
                )
            except BaseException as e:  # noqa: BLE001 - re-raised in the generator
                result["error"] = e
            finally:
                q.put(None)

        thread = threading.Thread(target=work, name="xgb-train", daemon=True)
        thread.start()
        last: EpochFinished | None = None
        try:
            while True:
                ev = q.get()
                if ev is None:
                    break
                last = ev
                yield ev
                if stop.is_set():
                    abandon.set()
        finally:
            abandon.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        if stop.is_set():
            raise TrainingCancelled("xgboost training cancelled")
        booster: xgb.Booster = result["booster"]
        rounds = booster.num_boosted_rounds()
        try:
            best = int(booster.best_iteration)
        except AttributeError:
            best = rounds - 1
        self.forecaster = XGBoostForecaster(booster, fs.feature_names, mean, std, H, best, target,
                                            p["target_transform"], log_scale)
        self.convergence = {
            "epochs_run": float(rounds), "best_epoch": float(best + 1),
            "final_loss": float(last.loss) if last else float("nan"),
            "best_val_rmse": float(booster.attr("best_score") or (last.validation_rmse if last else float("nan"))),
            "early_stopped": float(rounds < p["max_epochs"]),
        }


class _Either:
    """``is_set()`` of either event (the callback's stop flag)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()
