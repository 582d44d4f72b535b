"""Dataset specs and loading: every source becomes one :class:`AirQualityData`.

Dataset specs (the ``dataset`` field of a retrain request, ``load_dataset(spec)``):

``synthetic`` (also the empty string) or ``synthetic:stations=6,days=90,seed=7``
    A seeded generator, no download, about 0.1 s for the default. Defaults: 6 stations,
    90 days (2,160 hours), seed 7. Stations lie in a ~50 km region; PM2.5 has daily, weekly
    and seasonal cycles, episodic build-ups under stagnant air, rain washout, and is carried
    by the wind between stations (an upwind station's PM2.5 arrives downwind hours later,
    so neighbours carry information a single-station model cannot see). Weather: temperature,
    pressure, dew point, rain, wind speed and a persistent wind direction. Parameters:
    ``stations`` (1..50), ``days`` (2..3650), ``seed`` (int).

``beijing:<folder>``
    The UCI Beijing Multi-Site files ``PRSA_Data_*.csv`` or ``.csv.gz`` in ``<folder>``.
    Coordinates come from ``stations.csv`` beside them (columns station, latitude,
    longitude), else from :data:`BEIJING_STATIONS` (the same KDD-Cup-2018 table).
    Wind direction compass points (N, NNE, ... NNW) become degrees (N = 0, E = 90).
    **999 caps**: PM2.5/PM10 values of 999 (and CO 10000) look like instrument caps. They
    are KEPT: the true value is at least the cap, the hour is certainly "Hazardous", and
    dropping them would remove the worst episodes from training and evaluation (they are
    a few dozen rows out of 420,768).

``file:<path>`` or a bare path
    A CSV or Parquet file, or a folder of them (all ``*.csv``, ``*.csv.gz``, ``*.parquet``),
    in the long format below. Required columns: ``station``, ``time``, ``pm25``. Optional:
    ``pm10, so2, no2, co, o3, temp, pres, dewp, rain, wind_speed, wind_dir`` (degrees,
    direction the wind comes from), and ``latitude``/``longitude`` (per station; when absent
    every station gets (0, 0) and the GNN sees equidistant stations). Optional columns that
    are absent (or entirely empty) are not used as features.

Long format (``AirQualityData.frame``): one row per station and hour, columns
``station, time, pm25, pm10, so2, no2, co, o3, temp, pres, dewp, rain, wind_speed, wind_dir``
(µg/m³ for pollutants, °C, hPa, mm, m/s, degrees). The loader makes the grid complete:
every station has every hour from the first to the last time; hours that were absent are
rows of NaN. Duplicate (station, time) rows are averaged. Times are naive hours (floored).

Missing values are handled explicitly and never silently zero-filled:

* The frame keeps NaN where a value is missing (this module does no imputation).
* Inputs (``aqimodels.training.features``): a gap of up to 6 hours is filled by carrying
  the last observation forward (causal, so training and inference see the same thing and
  no future value leaks into a window); longer gaps get the TRAINING-period median of that
  station and feature (or of the feature over all stations if the station has none), and
  a ``pm25_missing`` indicator feature marks hours whose PM2.5 was not observed.
* Targets stay NaN and are masked out of losses and metrics (``Split.mask``).

Validation raises ``InvalidArgumentError(message, field="dataset")`` before any training:
unknown scheme, missing path, missing required columns, no PM2.5 values, unparseable
synthetic parameters; ``build_features`` adds "too few hours for window + horizon".
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from aqimodels.client.errors import InvalidArgumentError, quote
from aqimodels.training.runtime import frame as _frame
from aqimodels.training.runtime.frame import COLUMNS, POLLUTANTS, VALUE_COLUMNS, WEATHER, Grid  # noqa: F401 - public names


DEFAULT_SYNTHETIC = {"stations": 6, "days": 90, "seed": 7}

COMPASS_DEGREES: dict[str, float] = {
    name: i * 22.5
    for i, name in enumerate(
        ["N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE", "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW"]
    )
}

BEIJING_STATIONS: dict[str, tuple[float, float]] = {
    # KDD Cup 2018 station table (see the README of the shared data copy); WGS84, 3 decimals.
    "Aotizhongxin": (39.982, 116.397),
    "Changping": (40.217, 116.230),
    "Dingling": (40.292, 116.220),
    "Dongsi": (39.929, 116.417),
    "Guanyuan": (39.929, 116.339),
    "Gucheng": (39.914, 116.184),
    "Huairou": (40.328, 116.628),
    "Nongzhanguan": (39.937, 116.461),
    "Shunyi": (40.127, 116.655),
    "Tiantan": (39.886, 116.407),
    "Wanliu": (39.987, 116.287),
    "Wanshouxigong": (39.878, 116.352),
}

BEIJING_COLUMNS = {
    "PM2.5": "pm25", "PM10": "pm10", "SO2": "so2", "NO2": "no2", "CO": "co", "O3": "o3",
    "TEMP": "temp", "PRES": "pres", "DEWP": "dewp", "RAIN": "rain", "WSPM": "wind_speed",
}


def _invalid(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, field="dataset")


@dataclass
class AirQualityData(Grid):
    """Hourly air-quality data of several stations.

    Attributes:
        frame: long format, one row per station and hour (complete grid, NaN where missing),
            sorted by station then time; columns :data:`COLUMNS`.
        stations: ``station, latitude, longitude``, one row per station, sorted by name.
        spec: the dataset spec it was loaded from (informational).
    """

    frame: pd.DataFrame
    stations: pd.DataFrame
    spec: str = ""
    target: str = "pm25"

    @property
    def n_hours(self) -> int:
        return len(self.frame) // max(len(self.stations), 1)

    def slice(self, start: object = None, end: object = None) -> AirQualityData:
        """Hours in ``[start, end)`` (either may be None)."""
        return from_frame(self.frame.assign(
            latitude=self.frame["station"].map(dict(zip(self.stations["station"], self.stations["latitude"], strict=True))),
            longitude=self.frame["station"].map(dict(zip(self.stations["station"], self.stations["longitude"], strict=True))),
        ), spec=self.spec, start=start, end=end, target=self.target)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical data: station table, times and every value column."""
        h = hashlib.sha256()
        h.update(b"aqimodels-data-v1\n")
        for row in self.stations.itertuples(index=False):
            h.update(f"{row.station},{float(row.latitude):.6f},{float(row.longitude):.6f}\n".encode())
        h.update(self.frame["time"].to_numpy(dtype="datetime64[ns]").astype(np.int64).tobytes())
        for c in VALUE_COLUMNS:
            v = np.ascontiguousarray(self.frame[c].to_numpy(dtype=np.float64))
            h.update(c.encode())
            h.update(np.round(v, 6).tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# canonical form


def from_frame(
    df: pd.DataFrame, *, spec: str = "", start: object = None, end: object = None,
    stations: pd.DataFrame | None = None, target: str = "pm25",
) -> AirQualityData:
    """Validate a long-format frame and make it canonical (complete hourly grid, sorted).

    The parser is the one models use at predict (``aqimodels.training.runtime.frame``).
    ``latitude``/``longitude`` columns (or the ``stations`` table) give coordinates.
    Raises ``InvalidArgumentError(field="dataset")`` for missing columns or no ``target`` values.
    """
    frame, st = _frame.from_frame(df, spec=spec, start=start, end=end, stations=stations, target=target)
    return AirQualityData(frame=frame, stations=st, spec=spec, target=target)


# ---------------------------------------------------------------------------------------------
# loading


def split_target(spec: str | None) -> tuple[str, str | None]:
    """``(spec, target)`` of a spec with an optional ``?target=<pollutant>`` suffix."""
    spec = (spec or "").strip()
    base, sep, query = spec.rpartition("?")
    if sep and query.strip().lower().startswith("target="):
        return base.strip(), query.split("=", 1)[1].strip().lower()
    return spec, None


def load_dataset(spec: str | None = "synthetic", start: object = None, end: object = None,
                 target: str | None = None) -> AirQualityData:
    """Load a dataset by spec (see the module docstring), optionally the hours in ``[start, end)``.

    ``target`` (or a ``?target=<pollutant>`` suffix of the spec) is the pollutant to forecast,
    ``pm25`` by default; a dataset without values of it is refused."""
    spec, spec_target = split_target(spec)
    if spec_target and target and spec_target != target:
        raise _invalid(f"dataset spec asks for target {spec_target} but the request for {target}")
    target = spec_target or target or "pm25"
    data = _load(spec, start, end, target)
    if target not in data.frame.columns or not data.frame[target].notna().any():
        raise _invalid(f"dataset {spec or 'synthetic'} has no {target} values; it cannot train a {target} model")
    data.target = target
    return data


def _load(spec: str, start: object, end: object, target: str) -> AirQualityData:
    if spec == "" or spec == "synthetic" or spec.startswith("synthetic:"):
        params = _parse_synthetic(spec.partition(":")[2])
        data = synthetic_data(**params)
        data.spec = spec or "synthetic"
        data.target = target
        if start is not None or end is not None:
            data = data.slice(start, end)
        return data
    if spec.startswith("beijing:"):
        return load_beijing(spec[len("beijing:"):], start=start, end=end, target=target)
    if spec.startswith("file:"):
        return load_files(spec[len("file:"):], start=start, end=end, target=target)
    scheme, sep, _ = spec.partition(":")
    if sep and len(scheme) > 1 and not os.path.exists(spec):
        raise _invalid(
            f"unknown dataset scheme {scheme!r} in {quote(spec)}; use 'synthetic[:stations=6,days=90,seed=7]', "
            "'beijing:<folder>', 'file:<path>' or a path to a CSV/Parquet file or folder"
        )
    return load_files(spec, start=start, end=end, target=target)


def _parse_synthetic(text: str) -> dict[str, int]:
    params = dict(DEFAULT_SYNTHETIC)
    limits = {"stations": (1, 50), "days": (2, 3650), "seed": (-(2**31), 2**31 - 1)}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in params:
            raise _invalid(
                f"cannot parse synthetic dataset parameter {quote(part)}; expected key=value with keys "
                f"{', '.join(params)} (e.g. 'synthetic:stations=6,days=90,seed=7')"
            )
        try:
            params[key] = int(value.strip())
        except ValueError:
            raise _invalid(f"synthetic dataset parameter {key!r} must be an integer, got {quote(value.strip())}") from None
        lo, hi = limits[key]
        if not lo <= params[key] <= hi:
            raise _invalid(f"synthetic dataset parameter {key}={params[key]} is out of range {lo}..{hi}")
    return params


def _read_table(path: str) -> pd.DataFrame:
    try:
        if path.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        return pd.read_csv(path, na_values=["NA"], keep_default_na=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the caller's bad file
        raise _invalid(f"cannot read dataset file {quote(path)}: {quote(str(e))}") from None


def load_files(path: str, start: object = None, end: object = None, target: str = "pm25") -> AirQualityData:
    """A CSV/Parquet file or a folder of them, in the long format."""
    path = os.path.expanduser(path)
    if not path:
        raise _invalid("dataset path is empty")
    if not os.path.exists(path):
        raise _invalid(f"dataset path {quote(path)} does not exist")
    if os.path.isdir(path):
        files = sorted(
            f for pat in ("*.csv", "*.csv.gz", "*.parquet", "*.pq") for f in glob.glob(os.path.join(path, pat))
        )
        if not files:
            raise _invalid(f"dataset folder {quote(path)} holds no *.csv, *.csv.gz or *.parquet files")
    else:
        files = [path]
    df = pd.concat([_read_table(f) for f in files], ignore_index=True)
    return from_frame(df, spec=f"file:{path}", start=start, end=end, target=target)


def load_beijing(folder: str, start: object = None, end: object = None, target: str = "pm25") -> AirQualityData:
    """The UCI Beijing Multi-Site files in ``folder`` (see the module docstring)."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise _invalid(f"Beijing dataset folder {quote(folder)} does not exist")
    files = sorted(glob.glob(os.path.join(folder, "PRSA_Data_*.csv")) + glob.glob(os.path.join(folder, "PRSA_Data_*.csv.gz")))
    if not files:
        raise _invalid(f"Beijing dataset folder {quote(folder)} holds no PRSA_Data_*.csv(.gz) files")
    t0 = pd.Timestamp(start) if start is not None else None
    t1 = pd.Timestamp(end) if end is not None else None
    parts = []
    usecols = ["year", "month", "day", "hour", "station", "wd", *BEIJING_COLUMNS]
    for f in files:
        try:
            raw = pd.read_csv(f, na_values=["NA"], keep_default_na=False, usecols=usecols)
        except ValueError as e:
            raise _invalid(f"{os.path.basename(f)} is not a Beijing Multi-Site file: {e}") from None
        time = pd.to_datetime(raw[["year", "month", "day", "hour"]])
        keep = np.ones(len(raw), dtype=bool)
        if t0 is not None:
            keep &= (time >= t0).to_numpy()
        if t1 is not None:
            keep &= (time < t1).to_numpy()
        raw, time = raw[keep], time[keep]
        part = pd.DataFrame({"station": raw["station"].astype(str), "time": time})
        for src, dst in BEIJING_COLUMNS.items():
            part[dst] = pd.to_numeric(raw[src], errors="coerce")
        part["wind_dir"] = raw["wd"].map(COMPASS_DEGREES).astype(np.float64)
        parts.append(part)
    df = pd.concat(parts, ignore_index=True)
    names = sorted(df["station"].unique())
    table = os.path.join(folder, "stations.csv")
    coords = dict(BEIJING_STATIONS)
    if os.path.exists(table):
        st = pd.read_csv(table)
        coords.update({str(r.station): (float(r.latitude), float(r.longitude)) for r in st.itertuples(index=False)})
    unknown = [n for n in names if n not in coords]
    stations = pd.DataFrame({
        "station": names,
        "latitude": [coords.get(n, (0.0, 0.0))[0] for n in names],
        "longitude": [coords.get(n, (0.0, 0.0))[1] for n in names],
    })
    if unknown:
        import logging

        logging.getLogger(__name__).warning("no coordinates for Beijing stations %s; using (0, 0)", unknown)
    return from_frame(df, spec=f"beijing:{folder}", start=start, end=end, stations=stations, target=target)


# ---------------------------------------------------------------------------------------------
# synthetic generator


def synthetic_data(stations: int = 6, days: int = 90, seed: int = 7) -> AirQualityData:
    """The seeded synthetic dataset (see the module docstring)."""
    rng = np.random.default_rng(seed)
    S, T = stations, days * 24
    # stations: a ~50 km region around a fictional city; positions in km
    pos = rng.uniform(-25.0, 25.0, size=(S, 2))
    lat0, lon0 = 40.0, 116.4
    lat = lat0 + pos[:, 1] / 111.0
    lon = lon0 + pos[:, 0] / (111.0 * np.cos(np.radians(lat0)))
    urban = np.exp(-np.linalg.norm(pos, axis=1) / 20.0)  # emissions higher near the centre

    start = pd.Timestamp("2023-01-01") + pd.Timedelta(days=int(rng.integers(0, 365)))
    times = pd.date_range(start, periods=T, freq="h")
    hour = times.hour.to_numpy()
    dow = times.day_of_week.to_numpy()
    doy = times.day_of_year.to_numpy()

    def ar1(phi: float, sigma: float) -> np.ndarray:
        e = rng.normal(0.0, sigma, T)
        out = np.empty(T)
        acc = 0.0
        for i in range(T):
            acc = phi * acc + e[i]
            out[i] = acc
        return out

    season = 0.5 * np.cos(2 * np.pi * (doy - 15) / 365.25)  # +0.5 mid-January (winter)
    temp = 12 - 12 * season + 5 * np.sin(2 * np.pi * (hour - 9) / 24) + ar1(0.97, 0.6)
    pres = 1015 + 8 * season + ar1(0.995, 0.35)
    dewp = temp - np.abs(6 + ar1(0.95, 0.8))
    # wind: direction (blowing FROM, degrees) as a persistent random walk; speed lognormal AR
    wdir = (225 + np.cumsum(rng.normal(0, 7, T)) + 60 * np.sin(2 * np.pi * np.arange(T) / (24 * 9))) % 360
    wspeed = np.clip(np.exp(0.7 + ar1(0.96, 0.12)) + 0.6 * np.sin(2 * np.pi * (hour - 14) / 24), 0.2, None)
    # rain events
    rain = np.zeros(T)
    i = 0
    while i < T:
        if rng.random() < 0.008:
            length = int(rng.integers(2, 12))
            rain[i:i + length] = rng.gamma(1.5, 1.2, size=len(rain[i:i + length]))
            i += length
        i += 1
    # regional background with episodic build-ups (stagnation episodes) in [T]; an episode
    # ends with a clean-air front (wind picks up from the north-west)
    episode = np.zeros(T)
    i = 48
    while i < T:
        if rng.random() < 0.01:
            length = int(rng.integers(36, 96))
            seg = slice(i, min(i + length, T))
            n = seg.stop - seg.start
            episode[seg] = np.linspace(0, 1, n) * rng.uniform(30, 80)
            wspeed[seg] *= 0.6  # stagnant air
            front = slice(seg.stop, min(seg.stop + 12, T))
            wspeed[front] += 3.0
            wdir[front] = 315.0 + rng.normal(0, 10, front.stop - front.start)
            i += length + 24
        i += 1
    background = 12 + 6 * season + episode

    # emissions per station [T, S]: traffic peaks, weekday effect, heating season
    traffic = 1 + 0.8 * np.exp(-((hour - 8) ** 2) / 4) + 0.9 * np.exp(-((hour - 19) ** 2) / 6)
    weekday = np.where(dow < 5, 1.0, 0.7)
    heating = 1 + 0.4 * np.clip(season, 0, None)
    emis = (2.0 + 6.0 * urban[None, :]) * (traffic * weekday * heating)[:, None]
    emis *= np.exp(rng.normal(0, 0.1, size=(T, S)))
    # boundary layer: strong daytime mixing (ventilation), shallow night-time layer
    mixing = 0.6 + 0.8 * np.clip(np.sin(2 * np.pi * (hour - 7) / 24), 0, None)

    # transport: wind blowing TO direction (wdir + 180); unit vector in km axes (x east, y north)
    to = np.radians(wdir + 180.0)
    wvec = np.stack([np.sin(to), np.cos(to)], axis=1)  # [T, 2]
    d = pos[None, :, :] - pos[:, None, :]  # d[i, j] = pos_j - pos_i (from i to j)
    dist = np.linalg.norm(d, axis=2)
    unit = np.divide(d, dist[..., None], out=np.zeros_like(d), where=dist[..., None] > 0)
    c = np.zeros((T, S))
    c[0] = background[0] + 10
    for t in range(1, T):
        speed_kmh = wspeed[t] * 3.6
        align = unit @ wvec[t]  # [S, S]: how much i -> j is downwind
        wgt = np.clip(align, 0, None) ** 2 * np.exp(-dist / 30.0)
        np.fill_diagonal(wgt, 0.0)
        lag = np.clip(np.rint(dist / max(speed_kmh, 1.0)), 1, 12).astype(int)
        src = c[np.clip(t - lag, 0, None), np.arange(S)[:, None]]  # src[i, j] = c_i(t - lag_ij)
        wsum = wgt.sum(axis=0)
        upwind = (wgt * src).sum(axis=0) / np.maximum(wsum, 1e-9)
        mix = np.clip(0.12 * wspeed[t], 0.05, 0.6)
        frac_up = np.clip(wsum, 0, 1)
        inflow = frac_up * upwind + (1 - frac_up) * background[t]
        keep = np.exp(-(0.04 + 0.04 * wspeed[t] * mixing[t] + 0.3 * rain[t]))
        local = keep * c[t - 1] + emis[t] / mixing[t]
        c[t] = (1 - mix) * local + mix * inflow
    pm25 = np.clip(c * np.exp(rng.normal(0, 0.05, size=(T, S))), 1.0, None)
    pm10 = pm25 * rng.uniform(1.3, 1.8, S) + 10 * wspeed[:, None] * (rain[:, None] == 0) + rng.normal(0, 3, (T, S))
    no2 = 15 + 25 * urban[None, :] * traffic[:, None] / np.sqrt(wspeed[:, None]) + rng.normal(0, 3, (T, S))
    so2 = 3 + 0.08 * pm25 * heating[:, None] + rng.normal(0, 1, (T, S))
    co = 300 + 8 * pm25 + rng.normal(0, 50, (T, S))
    o3 = np.clip(30 + 40 * np.clip(np.sin(2 * np.pi * (hour - 8) / 24), 0, None)[:, None] * (1 - 0.6 * season[:, None])
                 - 0.3 * no2 + rng.normal(0, 5, (T, S)), 1, None)

    values = {"pm25": pm25, "pm10": np.clip(pm10, 1, None), "so2": np.clip(so2, 1, None),
              "no2": np.clip(no2, 1, None), "co": np.clip(co, 100, None), "o3": o3}
    weather = {"temp": temp, "pres": pres, "dewp": dewp, "rain": rain, "wind_speed": wspeed, "wind_dir": wdir}
    for k, v in weather.items():  # stations share the regional weather, plus a little local noise
        noise = 0.0 if k in ("rain", "wind_dir") else rng.normal(0, 0.05 * (np.std(v) + 1e-9), (T, S))
        values[k] = np.repeat(v[:, None], S, axis=1) + noise
    values["wind_speed"] = np.clip(values["wind_speed"], 0.1, None)
    values["rain"] = np.round(values["rain"], 1)
    for k, v in values.items():
        values[k] = np.round(v, 1 if k != "co" else 0)
    # missing values: isolated hours and a few instrument outages
    for k in POLLUTANTS:
        values[k][rng.random((T, S)) < 0.01] = np.nan
    for _ in range(max(1, days // 30) * S // 2):
        s, t0, length = int(rng.integers(0, S)), int(rng.integers(0, T)), int(rng.integers(3, 30))
        for k in POLLUTANTS:
            values[k][t0:t0 + length, s] = np.nan
    names = [f"S{i + 1:02d}" for i in range(S)]
    frame = pd.DataFrame({
        "station": np.repeat(names, T),
        "time": np.tile(times.to_numpy(dtype="datetime64[ns]"), S),
        **{k: values[k].T.reshape(-1) for k in VALUE_COLUMNS},
    })
    st = pd.DataFrame({"station": names, "latitude": np.round(lat, 4), "longitude": np.round(lon, 4)})
    return AirQualityData(frame=frame[list(COLUMNS)], stations=st, spec="synthetic")
