"""The long input format and its canonical form (complete hourly grid), plus physical ranges.

Long format: one row per station and hour, columns ``station, time`` and value columns
:data:`VALUE_COLUMNS` (µg/m³ for pollutants, °C, hPa, mm, m/s, degrees the wind comes from);
optional ``latitude``/``longitude`` per station. ``time`` is anything ``pandas.to_datetime``
parses (datetimes, ISO strings); timezone-aware times are converted to UTC and made naive, then
floored to the hour. Training (``aqimodels.training.data``) and ``predict`` use this one parser.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import InputError

POLLUTANTS: tuple[str, ...] = ("pm25", "pm10", "so2", "no2", "co", "o3")
WEATHER: tuple[str, ...] = ("temp", "pres", "dewp", "rain", "wind_speed", "wind_dir")
VALUE_COLUMNS: tuple[str, ...] = POLLUTANTS + WEATHER
COLUMNS: tuple[str, ...] = ("station", "time") + VALUE_COLUMNS

DISPLAY_NAMES: dict[str, str] = {"pm25": "PM2.5", "pm10": "PM10", "so2": "SO2", "no2": "NO2", "co": "CO", "o3": "O3"}
"""How people write the pollutants (messages, AQI labels)."""

PHYSICAL_RANGES: dict[str, tuple[float, float]] = {
    # µg/m³. The ceilings are far above any hour ever recorded by a reference monitor (Beijing's
    # instrument caps are 999 for PM2.5/PM10 and 10,000 for CO), so a value above them is a unit
    # error (mg vs µg, ppb vs µg/m³ times 1000) or a broken sensor, not air.
    "pm25": (0.0, 1500.0), "pm10": (0.0, 3000.0), "so2": (0.0, 2000.0), "no2": (0.0, 2000.0),
    "co": (0.0, 100000.0), "o3": (0.0, 1500.0),
    "temp": (-60.0, 60.0), "pres": (500.0, 1100.0), "dewp": (-80.0, 40.0), "rain": (0.0, 500.0),
    "wind_speed": (0.0, 100.0), "wind_dir": (0.0, 360.0),
}
"""Inclusive plausible range of every value column; ``predict`` refuses values outside."""


def parse_times(values: pd.Series, field: str = "dataset") -> pd.Series:
    """Naive hourly timestamps (UTC for timezone-aware input) from datetimes or strings."""
    try:
        t = pd.to_datetime(values, utc=False)
    except (ValueError, TypeError) as e:
        try:  # mixed offsets (e.g. around a DST change) parse only as UTC
            t = pd.to_datetime(values, utc=True)
        except (ValueError, TypeError):
            raise InputError(f"column 'time' is not parseable as timestamps: {e}", field=field) from None
    if getattr(t.dt, "tz", None) is not None:
        t = t.dt.tz_convert("UTC").dt.tz_localize(None)
    return t.dt.floor("h").astype("datetime64[ns]")


def check_ranges(df: pd.DataFrame, field: str = "model_input") -> None:
    """Refuses the first value outside :data:`PHYSICAL_RANGES`, naming row, column and value."""
    for c, (lo, hi) in PHYSICAL_RANGES.items():
        if c not in df.columns:
            continue
        v = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(np.isfinite(v) & ((v < lo) | (v > hi)))
        if bad.size:
            i = int(bad[0])
            where = ""
            if "station" in df.columns and "time" in df.columns:
                where = f" (station {df['station'].iloc[i]}, time {df['time'].iloc[i]})"
            raise InputError(
                f"row {i}{where}: column {c} = {v[i]:g} is outside its physical range {lo:g}..{hi:g}"
                f" ({bad.size} value(s) of {c} out of range)", field=field)
    if "wind_dir" in df.columns:
        d = pd.to_numeric(df["wind_dir"], errors="coerce").to_numpy(dtype=np.float64)
        d = d[np.isfinite(d)]
        off_compass = d[(d > 0) & (np.abs(d / 22.5 - np.round(d / 22.5)) > 1e-6)]
        if d.size >= 24 and d.max() <= 2 * np.pi + 1e-6 and off_compass.size > d.size // 2:
            raise InputError(
                f"column wind_dir looks like radians ({d.size} values, all within 0..{d.max():.3f}); "
                "give degrees 0..360, the direction the wind comes from", field=field)


def from_frame(
    df: pd.DataFrame, *, spec: str = "", start: object = None, end: object = None,
    stations: pd.DataFrame | None = None, target: str = "pm25", field: str = "dataset",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate a long-format frame and make it canonical: ``(frame, stations)``.

    ``frame`` has columns :data:`COLUMNS` on a complete hourly grid (NaN where missing), sorted
    by station then time; ``stations`` is ``station, latitude, longitude`` sorted by name
    (coordinates from ``latitude``/``longitude`` columns or the ``stations`` table, else 0).
    Raises :class:`InputError` for missing columns or no values of ``target``.
    """
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame in the long format, got {type(df).__name__}", field=field)
    required = ("station", "time", target)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            f"dataset is missing required column(s) {', '.join(missing)} "
            f"(required: {', '.join(required)}; found: {', '.join(map(str, df.columns))})", field=field
        )
    out = pd.DataFrame({"station": df["station"].astype(str).to_numpy()})
    out["time"] = parse_times(df["time"], field=field).to_numpy()
    for c in VALUE_COLUMNS:
        if c in df.columns:
            out[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64).to_numpy()
        else:
            out[c] = np.nan
    out = out[out["time"].notna()]
    if start is not None:
        out = out[out["time"] >= pd.Timestamp(start)]
    if end is not None:
        out = out[out["time"] < pd.Timestamp(end)]
    if out.empty:
        raise InputError("dataset has no rows" + (" in the requested time range" if start or end else ""), field=field)
    if not out[target].notna().any():
        raise InputError(f"dataset has no {DISPLAY_NAMES.get(target, target)} values at all "
                         f"(column {target!r} is empty)", field=field)

    if stations is None:
        if "latitude" in df.columns and "longitude" in df.columns:
            coords = pd.DataFrame({
                "station": df["station"].astype(str).to_numpy(),
                "latitude": pd.to_numeric(df["latitude"], errors="coerce").to_numpy(),
                "longitude": pd.to_numeric(df["longitude"], errors="coerce").to_numpy(),
            }).groupby("station", sort=True)[["latitude", "longitude"]].first()
        else:
            coords = pd.DataFrame(columns=["latitude", "longitude"], dtype=np.float64)
    else:
        coords = stations.set_index("station")[["latitude", "longitude"]]

    if out.duplicated(["station", "time"]).any():
        out = out.groupby(["station", "time"], sort=True, as_index=False)[list(VALUE_COLUMNS)].mean()
    names = sorted(out["station"].unique())
    hours = pd.date_range(out["time"].min(), out["time"].max(), freq="h")
    grid = pd.MultiIndex.from_product([names, hours], names=["station", "time"])
    out = out.set_index(["station", "time"]).reindex(grid).reset_index()
    out["time"] = out["time"].astype("datetime64[ns]")
    out = out[list(COLUMNS)]
    st = pd.DataFrame({"station": names})
    st["latitude"] = [float(coords["latitude"].get(n, np.nan)) if n in coords.index else np.nan for n in names]
    st["longitude"] = [float(coords["longitude"].get(n, np.nan)) if n in coords.index else np.nan for n in names]
    st[["latitude", "longitude"]] = st[["latitude", "longitude"]].fillna(0.0)
    return out.reset_index(drop=True), st


class Grid:
    """The canonical frame as ``[T, S]`` columns (what the feature pipeline reads); the training
    data (``aqimodels.training.data.AirQualityData``) is one too."""

    frame: pd.DataFrame
    stations: pd.DataFrame

    def __init__(self, frame: pd.DataFrame, stations: pd.DataFrame) -> None:
        self.frame = frame
        self.stations = stations

    @property
    def station_names(self) -> list[str]:
        return [str(s) for s in self.stations["station"]]

    @property
    def times(self) -> np.ndarray:
        """The hours of the grid, datetime64[ns] ``[T]``."""
        s = len(self.stations)
        hours: np.ndarray = self.frame["time"].to_numpy(dtype="datetime64[ns]")[: len(self.frame) // max(s, 1)]
        return hours

    def column(self, name: str) -> np.ndarray:
        """One value column as float64 ``[T, S]`` (NaN where missing)."""
        s = len(self.stations)
        values: np.ndarray = self.frame[name].to_numpy(dtype=np.float64).reshape(s, -1).T
        return values
