"""The space a model is trained in: the concentration itself, or log1p of it, relative to the origin.

``target_transform`` (a training option, ``TrainConfig.extra["target_transform"]``):

* ``none`` (default): the model predicts the concentration (networks: standardised; XGBoost: the
  change from the origin hour's value, standardised). Its output can be negative; the forecaster
  clips it at 0.
* ``log1p``: the model predicts ``log1p(y) - log1p(y_origin)`` (the log change from the origin
  hour's value, divided by ``log_scale``, the standard deviation of that change over the
  training cells), and the forecast is ``expm1(log1p(y_origin) + output * log_scale)``. That is
  never below -1 µg/m³ whatever the model outputs, and is 0 or more wherever the model does not
  forecast a fall below the origin's level of log1p; the clip at 0 stays as the last guard.
  Loss (and XGBoost's objective) is the squared error in that log space; early stopping still
  judges the validation rmse in µg/m³.

The exponent is capped at ``log1p`` of the target's physical ceiling (:data:`.frame.PHYSICAL_RANGES`,
1500 µg/m³ for PM2.5) so that a wild output cannot overflow to infinity.
"""

from __future__ import annotations

import numpy as np

from .frame import PHYSICAL_RANGES

TARGET_TRANSFORMS: tuple[str, ...] = ("none", "log1p")
DEFAULT_TARGET_TRANSFORM = "none"


def origin_values(x: np.ndarray, target_index: int, target_mean: float, target_std: float) -> np.ndarray:
    """The target at each window's last hour, µg/m³ ``[N, S]`` (>= 0), from scaled windows ``x``
    ``[N, W, S, F]`` (an unobserved scaled input counts as 0, the training mean, as the networks see it)."""
    scaled = np.nan_to_num(np.asarray(x[:, -1, :, target_index], dtype=np.float64))
    return np.maximum(scaled * target_std + target_mean, 0.0)


def log_change(y: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """``log1p(y) - log1p(origin)`` for ``y [N, S, H]`` and ``origin [N, S]`` (NaN where y is)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(np.log1p(np.maximum(np.asarray(y, dtype=np.float64), 0.0)) - np.log1p(origin)[..., None])


def fit_log_scale(y: np.ndarray, origin: np.ndarray) -> float:
    """The standard deviation of the log change over the observed training cells (1 if none)."""
    d = log_change(y, origin)
    d = d[np.isfinite(d)]
    s = float(d.std()) if d.size else 1.0
    return s if s > 1e-6 else 1.0


def from_log_change(z: np.ndarray, origin: np.ndarray, log_scale: float, target: str = "pm25") -> np.ndarray:
    """The forecast in µg/m³ ``[N, S, H]`` from scaled log changes ``z`` and ``origin [N, S]``."""
    ceiling = np.log1p(PHYSICAL_RANGES.get(target, (0.0, 1e5))[1])
    level = np.log1p(origin)[..., None] + np.asarray(z, dtype=np.float64) * log_scale
    return np.asarray(np.expm1(np.minimum(level, ceiling)), dtype=np.float32)


def check_transform(name: str) -> str:
    """``name`` normalised, or ValueError naming the allowed ones."""
    value = (name or DEFAULT_TARGET_TRANSFORM).strip().lower()
    if value not in TARGET_TRANSFORMS:
        raise ValueError(f"target_transform must be one of {', '.join(TARGET_TRANSFORMS)}, got {name!r}")
    return value
