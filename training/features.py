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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import HORIZON_HOURS, FeatureSet, Split
from aqimodels.training.data import POLLUTANTS, AirQualityData
from numpy.lib.stride_tricks import sliding_window_view

PIPELINE_VERSION = 1
FFILL_LIMIT_HOURS = 6
MIN_ORIGINS = 20
"""The fewest forecast origins a dataset must yield (so every split has samples)."""
COPY_LIMIT_BYTES = 512 * 2**20

INPUT_COLUMNS: tuple[str, ...] = POLLUTANTS + ("temp", "pres", "dewp", "rain", "wind_speed", "wind_u", "wind_v")
CALENDAR: tuple[str, ...] = ("hour_sin", "hour_cos", "dow_sin", "dow_cos", "doy_sin", "doy_cos")
INDICATORS: tuple[str, ...] = ("pm25_missing",)


def _invalid(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, field="dataset")


def _raw_columns(data: AirQualityData, stations: list[str] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw input columns as float64 ``[T, S]`` (wind as u/v), in ``stations`` order."""
    cols: dict[str, np.ndarray] = {}
    names = data.station_names
    order = None
    if stations is not None:
        missing = [s for s in stations if s not in names]
        if missing:
            raise _invalid(f"input data lacks station(s) {', '.join(missing)} that the model was trained on")
        order = [names.index(s) for s in stations]
    for c in POLLUTANTS + ("temp", "pres", "dewp", "rain", "wind_speed"):
        cols[c] = data.column(c)
    speed, direction = data.column("wind_speed"), np.radians(data.column("wind_dir"))
    # meteorological direction = where the wind comes FROM; (u, v) = where the air moves to
    cols["wind_u"] = -speed * np.sin(direction)
    cols["wind_v"] = -speed * np.cos(direction)
    if order is not None:
        cols = {k: v[:, order] for k, v in cols.items()}
    return cols, data.times


def _calendar(times: np.ndarray) -> dict[str, np.ndarray]:
    t = pd.DatetimeIndex(times)
    hour, dow, doy = t.hour.to_numpy(), t.day_of_week.to_numpy(), t.day_of_year.to_numpy()
    return {
        "hour_sin": np.sin(2 * np.pi * hour / 24), "hour_cos": np.cos(2 * np.pi * hour / 24),
        "dow_sin": np.sin(2 * np.pi * dow / 7), "dow_cos": np.cos(2 * np.pi * dow / 7),
        "doy_sin": np.sin(2 * np.pi * doy / 365.25), "doy_cos": np.cos(2 * np.pi * doy / 365.25),
    }


def _ffill(a: np.ndarray, limit: int | None) -> np.ndarray:
    """Forward-fill NaN along axis 0 of ``[T, S]``, at most ``limit`` steps (None: unlimited)."""
    return pd.DataFrame(a).ffill(limit=limit).to_numpy()


@dataclass
class FeaturePipeline:
    """The fitted transformation from raw hourly data to model inputs (JSON-serialisable)."""

    feature_names: list[str]
    window: int
    horizon: int
    stations: list[str]
    coords: list[list[float]]  # [S][lat, lon]
    mean: list[float]  # per feature
    std: list[float]
    medians: dict[str, list[float]]  # input column -> per-station training median
    ffill_limit: int = FFILL_LIMIT_HOURS
    version: int = PIPELINE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "feature_names": self.feature_names, "window": self.window,
            "horizon": self.horizon, "stations": self.stations, "coords": self.coords, "mean": self.mean,
            "std": self.std, "medians": self.medians, "ffill_limit": self.ffill_limit, "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeaturePipeline:
        return cls(
            feature_names=list(d["feature_names"]), window=int(d["window"]), horizon=int(d["horizon"]),
            stations=list(d["stations"]), coords=[list(map(float, c)) for c in d["coords"]],
            mean=list(map(float, d["mean"])), std=list(map(float, d["std"])),
            medians={k: [float(x) for x in v] for k, v in d["medians"].items()},
            ffill_limit=int(d.get("ffill_limit", FFILL_LIMIT_HOURS)), version=int(d.get("version", 1)),
            extra=dict(d.get("extra", {})),
        )

    @property
    def pm25_index(self) -> int:
        return self.feature_names.index("pm25")

    @property
    def target_mean(self) -> float:
        return self.mean[self.pm25_index]

    @property
    def target_std(self) -> float:
        return self.std[self.pm25_index]

    # ---- transformation ----
    def features(self, data: AirQualityData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scaled features ``[T, S, F]`` float32, raw PM2.5 ``[T, S]``, last observed PM2.5 ``[T, S]``, times."""
        cols, times = _raw_columns(data, self.stations)
        cal = _calendar(times)
        T, S = len(times), len(self.stations)
        out = np.empty((T, S, len(self.feature_names)), dtype=np.float32)
        pm25 = cols["pm25"]
        for j, name in enumerate(self.feature_names):
            if name in cal:
                out[:, :, j] = cal[name][:, None]
                continue
            if name == "pm25_missing":
                out[:, :, j] = np.isnan(pm25)
                continue
            a = _ffill(cols[name], self.ffill_limit)
            med = np.asarray(self.medians[name], dtype=np.float64)
            a = np.where(np.isnan(a), med[None, :], a)
            out[:, :, j] = (a - self.mean[j]) / self.std[j]
        last = _ffill(pm25, None)
        last = np.where(np.isnan(last), np.asarray(self.medians["pm25"])[None, :], last)
        return out, pm25.astype(np.float32), last.astype(np.float32), times

    def windows_for(self, data: AirQualityData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every origin with a full input window: ``x [N, window, S, F]``, ``y [N, S, H]`` (NaN beyond
        the data), ``last_pm25 [N, S]`` and origin ``times [N]``."""
        feats, pm25, last, times = self.features(data)
        T = len(times)
        if T < self.window:
            raise _invalid(f"input has {T} hours; the model needs at least window={self.window} hours per station")
        origins = np.arange(self.window - 1, T)
        x = _windows(feats, self.window)[origins - self.window + 1]
        y = _targets(pm25, self.horizon)[origins]
        return x, y, last[origins], times[origins]

    def transform(self, data: AirQualityData, all_origins: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs from raw data: the last window (or every full window), ``(x, origin_times)``."""
        feats, _, _, times = self.features(data)
        T = len(times)
        if T < self.window:
            raise _invalid(f"input has {T} hours; the model needs at least window={self.window} hours per station")
        w = _windows(feats, self.window)
        if all_origins:
            return np.ascontiguousarray(w), times[self.window - 1:]
        return np.ascontiguousarray(w[-1:]), times[-1:]


def _windows(feats: np.ndarray, window: int) -> np.ndarray:
    """``[T, S, F]`` -> view ``[T-window+1, window, S, F]``."""
    return sliding_window_view(feats, window, axis=0).transpose(0, 3, 1, 2)


def _targets(pm25: np.ndarray, horizon: int) -> np.ndarray:
    """``[T, S]`` -> ``[T, S, H]``: row t holds t+1..t+H (NaN past the end)."""
    T, S = pm25.shape
    padded = np.concatenate([pm25[1:], np.full((horizon, S), np.nan, dtype=pm25.dtype)], axis=0)
    return np.ascontiguousarray(sliding_window_view(padded, horizon, axis=0)[:T])


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
) -> tuple[FeatureSet, FeaturePipeline]:
    """Fit the pipeline on the training hours and build the split feature set."""
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
        if not np.isfinite(a).any():
            if c == "pm25":
                raise _invalid(
                    f"no PM2.5 values in the training period (the first {train_end} hours); "
                    "the dataset needs observed PM2.5 to train on"
                )
            continue  # absent/empty optional column: not a feature
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
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
    for c in CALENDAR + INDICATORS:
        names.append(c)
        means.append(0.0)
        stds.append(1.0)
    pipe = FeaturePipeline(
        feature_names=names, window=window, horizon=horizon, stations=data.station_names,
        coords=data.stations[["latitude", "longitude"]].to_numpy(dtype=np.float64).tolist(),
        mean=means, std=stds, medians=medians,
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
