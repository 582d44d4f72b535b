"""One feature pipeline for every model type.

``build_features(data)`` turns an :class:`~aqimodels.training.data.AirQualityData` into a
:class:`~aqimodels.training.core.FeatureSet` (scaled input windows, raw targets, a
chronological train/validation/test split) and the fitted :class:`FeaturePipeline`, which
reproduces exactly the same inputs from raw data at inference time and serialises to JSON.

Per station and hour the features are (in this order, those with data only):
pollutants ``pm25 pm10 so2 no2 co o3``, weather ``temp pres dewp rain wind_speed``, the
wind vector ``wind_u wind_v`` (m/s, direction the air moves to; from speed + direction),
calendar ``hour_sin hour_cos dow_sin dow_cos doy_sin doy_cos`` and ``pm25_missing``
(1 where the hour's PM2.5 was not observed).

Missing inputs (never zero-filled): the last observation is carried forward up to 6 hours
(causal: no future value enters a window); longer gaps get the training-period median of
that station and feature (the feature's median over all stations if the station has none).
Then every feature except calendar/indicator columns is standardised with a mean and
standard deviation fitted on the TRAINING hours only (hours up to the last training origin).
PM2.5's input scaler is also the target scaler (``FeatureSet.target_mean/std``).

Samples: an origin hour ``t`` has the input window ``t-window+1 .. t`` and targets
``t+1 .. t+horizon`` (raw µg/m³, NaN where unobserved). The origins are split in time
order: the last ``test_fraction`` (20%) are test, the preceding ``val_fraction`` (10%)
validation, the rest training; ``stride`` keeps every stride-th origin (memory).
``last_pm25`` is the last observed PM2.5 at or before the origin (persistence baseline).

Memory: ``x`` arrays are built as views of one ``[T, S, F]`` float32 array and copied only
when small (< 512 MB); the full Beijing data (12 stations × 35,064 h × 22 features) is
~37 MB as that base array. Views are read-only: copy a batch before modifying it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import HORIZON_HOURS, FeatureSet, Split
from aqimodels.training.data import AirQualityData
from aqimodels.training.runtime.pipeline import (
    CALENDAR,
    DESPIKE_RATIO,
    FFILL_LIMIT_HOURS,
    INPUT_COLUMNS,
    PIPELINE_VERSION,
    FeaturePipeline,
    despike,
)
from aqimodels.training.runtime.pipeline import ffill as _ffill
from aqimodels.training.runtime.pipeline import raw_columns as _raw_columns
from aqimodels.training.runtime.pipeline import targets as _targets
from aqimodels.training.runtime.pipeline import windows as _windows

__all__ = ["FeaturePipeline", "build_features", "describe", "min_hours"]  # FeaturePipeline: old pickles name it here

MIN_ORIGINS = 20
"""The fewest forecast origins a dataset must yield (so every split has samples)."""
COPY_LIMIT_BYTES = 512 * 2**20


def _invalid(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, field="dataset")


def min_hours(window: int, horizon: int = HORIZON_HOURS) -> int:
    """Hours a dataset needs for ``window`` + ``horizon`` and :data:`MIN_ORIGINS` origins."""
    return window + horizon + MIN_ORIGINS - 1


def build_features(
    data: AirQualityData,
    window: int = 24,
    horizon: int = HORIZON_HOURS,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    stride: int = 1,
    target: str = "pm25",
) -> tuple[FeatureSet, FeaturePipeline]:
    """Fit the pipeline on the training hours and build the split feature set (``target``: the
    pollutant forecast; its one-hour spikes and dips are despiked in the inputs, see the runtime)."""
    if window < 1:
        raise InvalidArgumentError(f"window must be at least 1 hour, got {window}", field="window_hours")
    if stride < 1:
        raise _invalid(f"stride must be at least 1, got {stride}")
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise _invalid(f"bad split fractions test={test_fraction} val={val_fraction}")
    T, S = data.n_hours, len(data.stations)
    need = min_hours(window, horizon)
    if T < need:
        raise _invalid(
            f"too few hours: the dataset has {T} hours per station, but window {window} h + horizon "
            f"{horizon} h needs at least {need} hours ({MIN_ORIGINS} forecast origins)"
        )
    cols, times = _raw_columns(data)
    n = T - window - horizon + 1
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    n_train = n - n_test - n_val
    origins = np.arange(window - 1, window - 1 + n)
    train_end = int(origins[n_train - 1]) + 1  # training hours: [0, train_end)

    # fit: medians per station, feature list, scalers on training hours
    names: list[str] = []
    medians: dict[str, list[float]] = {}
    means: list[float] = []
    stds: list[float] = []
    for c in INPUT_COLUMNS:
        a = cols[c][:train_end]
        if c in ("pm25", "pm10") and c in cols:  # the same despiking the pipeline applies
            a = np.where(despike(a, DESPIKE_RATIO), np.nan, a)
        if not np.isfinite(a).any():
            if c == target:
                raise _invalid(
                    f"no {target} values in the training period (the first {train_end} hours); "
                    f"the dataset needs observed {target} to train on"
                )
            continue  # absent/empty optional column: not a feature
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(a, axis=0)
        med = np.where(np.isnan(med), np.nanmedian(a), med)
        medians[c] = med.tolist()
        filled = _ffill(a, FFILL_LIMIT_HOURS)
        filled = np.where(np.isnan(filled), med[None, :], filled)
        sd = float(filled.std())
        names.append(c)
        means.append(float(filled.mean()))
        stds.append(sd if sd > 1e-6 else 1.0)
    for c in CALENDAR + (f"{target}_missing",):
        names.append(c)
        means.append(0.0)
        stds.append(1.0)
    pipe = FeaturePipeline(
        feature_names=names, window=window, horizon=horizon, stations=data.station_names,
        coords=data.stations[["latitude", "longitude"]].to_numpy(dtype=np.float64).tolist(),
        mean=means, std=stds, medians=medians, version=PIPELINE_VERSION, target=target,
        despike_ratio=DESPIKE_RATIO,
    )
    feats, pm25, last, _ = pipe.features(data)
    w = _windows(feats, window)
    y_all = _targets(pm25, horizon)

    def split(sel: np.ndarray) -> Split:
        sel = sel[::stride]
        x = w[sel - window + 1]  # fancy indexing copies; use a strided view when large
        return Split(x=x, y=y_all[sel], last_pm25=last[sel], times=times[sel])

    estimated = n * window * S * len(names) * 4 / stride
    if estimated > COPY_LIMIT_BYTES:
        def split(sel: np.ndarray) -> Split:
            a, b = int(sel[0]) - window + 1, int(sel[-1]) - window + 2
            return Split(x=w[a:b:stride], y=y_all[sel[::stride]], last_pm25=last[sel[::stride]],
                         times=times[sel[::stride]])

    fs = FeatureSet(
        stations=pipe.stations,
        coords=np.asarray(pipe.coords, dtype=np.float64).reshape(S, 2),
        feature_names=list(names),
        window=window,
        horizon=horizon,
        train=split(origins[:n_train]),
        val=split(origins[n_train:n_train + n_val]),
        test=split(origins[n_train + n_val:]),
        target_mean=pipe.target_mean,
        target_std=pipe.target_std,
        target=target,
    )
    if len(fs.train) == 0 or len(fs.val) == 0 or len(fs.test) == 0:  # pragma: no cover - guarded above
        raise _invalid("the split produced an empty part; use more data or a smaller stride")
    return fs, pipe


def describe(fs: FeatureSet) -> dict[str, Any]:
    """Feature metadata (for the run's ``features.json`` artifact)."""
    return {
        "feature_names": fs.feature_names, "window": fs.window, "horizon": fs.horizon,
        "stations": fs.stations, "coords": fs.coords.tolist(),
        "samples": {"train": len(fs.train), "val": len(fs.val), "test": len(fs.test)},
        "target_mean": fs.target_mean, "target_std": fs.target_std,
        "split_times": {
            k: [str(s.times[0]), str(s.times[-1])] for k, s in (("train", fs.train), ("val", fs.val), ("test", fs.test))
        },
        "x_shape_per_sample": [fs.window, len(fs.stations), len(fs.feature_names)],
        "bytes_per_sample": int(math.prod([fs.window, len(fs.stations), len(fs.feature_names)]) * 4),
    }
