"""US EPA AQI from hourly concentrations (µg/m³) of PM2.5, PM10, NO2 or O3.

Breakpoints (EPA, Technical Assistance Document for the Reporting of Daily Air Quality, PM2.5 as
revised in February 2024); the concentration is truncated to the table's precision first:

* ``pm25`` (µg/m³, 0.1): 0-9.0, 9.1-35.4, 35.5-55.4, 55.5-125.4, 125.5-225.4, 225.5-325.4
* ``pm10`` (µg/m³, 1): 0-54, 55-154, 155-254, 255-354, 355-424, 425-604
* ``no2`` (ppb, 1; 1 ppb = 1.88 µg/m³): 0-53, 54-100, 101-360, 361-649, 650-1249, 1250-2049
* ``o3`` (ppm, 0.001; 1 ppb = 1.96 µg/m³): the 8-hour table 0-0.054, 0.055-0.070, 0.071-0.085,
  0.086-0.105, then 0.106-0.404 as one Very Unhealthy segment (the 8-hour table's 0.106-0.200 and,
  above 0.200 where EPA switches to 1-hour values, the 1-hour table's 0.205-0.404), then the 1-hour
  table's 0.405-0.604 for Hazardous. Categories follow EPA exactly; inside Very Unhealthy the index
  is interpolated over the joined segment.

for AQI 0-50 Good, 51-100 Moderate, 101-150 Unhealthy for Sensitive Groups, 151-200 Unhealthy,
201-300 Very Unhealthy, 301-500 Hazardous. Above the last breakpoint the last segment is
extrapolated (still Hazardous). Hourly forecasts are mapped with these averaging-period tables (a
NowCast would need the forecast history; this is the usual simplification). Negative values count
as 0 (forecasts are never negative anyway); NaN stays NaN.
"""

from __future__ import annotations

import numpy as np

AQI_CATEGORIES: tuple[str, ...] = (
    "Good", "Moderate", "Unhealthy for Sensitive Groups", "Unhealthy", "Very Unhealthy", "Hazardous",
)
_AQI_UPPER = (50, 100, 150, 200, 300)
_INDEX = ((0, 50), (51, 100), (101, 150), (151, 200), (201, 300), (301, 500))

# pollutant -> (factor from µg/m³ to the table's unit, truncation step, [(C_low, C_high)] per AQI segment)
BREAKPOINTS: dict[str, tuple[float, float, tuple[tuple[float, float], ...]]] = {
    "pm25": (1.0, 0.1, ((0.0, 9.0), (9.1, 35.4), (35.5, 55.4), (55.5, 125.4), (125.5, 225.4), (225.5, 325.4))),
    "pm10": (1.0, 1.0, ((0, 54), (55, 154), (155, 254), (255, 354), (355, 424), (425, 604))),
    "no2": (1 / 1.88, 1.0, ((0, 53), (54, 100), (101, 360), (361, 649), (650, 1249), (1250, 2049))),
    "o3": (1 / 1960.0, 0.001, ((0.0, 0.054), (0.055, 0.070), (0.071, 0.085), (0.086, 0.105), (0.106, 0.404),
                                (0.405, 0.604))),
}
AQI_POLLUTANTS: tuple[str, ...] = tuple(BREAKPOINTS)
"""Pollutants that can be a model's target (the AQI needs their breakpoints)."""

PM25_BREAKPOINTS: tuple[tuple[float, float, float, float], ...] = tuple(
    (lo, hi, i_lo, i_hi) for (lo, hi), (i_lo, i_hi) in zip(BREAKPOINTS["pm25"][2], _INDEX, strict=True))


def to_aqi(x: np.ndarray | float, pollutant: str = "pm25") -> np.ndarray | float:
    """US EPA AQI of concentrations (µg/m³) of ``pollutant``; NaN stays NaN, negatives count as 0."""
    if pollutant not in BREAKPOINTS:
        raise ValueError(f"no AQI breakpoints for {pollutant!r}; known: {', '.join(BREAKPOINTS)}")
    factor, step, table = BREAKPOINTS[pollutant]
    c = np.clip(np.asarray(x, dtype=np.float64), 0, None) * factor
    c = np.floor(c / step + 1e-9) * step
    out = np.full(c.shape, np.nan)
    for (c_lo, c_hi), (i_lo, i_hi) in zip(table, _INDEX, strict=True):
        # each segment covers [c_lo, next c_lo); the gaps between segments fall to the lower one
        sel = (c >= c_lo - 1e-12) & (c <= c_hi + step * 0.999) & np.isnan(out)
        out[sel] = i_lo + (i_hi - i_lo) / (c_hi - c_lo) * (np.minimum(c[sel], c_hi) - c_lo)
    (c_lo, c_hi), (i_lo, i_hi) = table[-1], _INDEX[-1]
    beyond = c > c_hi
    out[beyond] = i_lo + (i_hi - i_lo) / (c_hi - c_lo) * (c[beyond] - c_lo)
    out = np.round(out)
    if np.ndim(x) == 0:
        return float(out)
    return out


def pm25_to_aqi(x: np.ndarray | float) -> np.ndarray | float:
    """US EPA AQI of PM2.5 concentrations (µg/m³)."""
    return to_aqi(x, "pm25")


def aqi_category_index(aqi: np.ndarray | float) -> np.ndarray:
    """Category index 0..5 of AQI values (-1 for NaN)."""
    a = np.asarray(aqi, dtype=np.float64)
    idx = np.searchsorted(np.asarray(_AQI_UPPER, dtype=np.float64), np.round(a), side="left")
    return np.where(np.isnan(a), -1, idx)


def aqi_category(aqi: float) -> str:
    """The EPA category name of one AQI value (e.g. 42 -> "Good"); "" for NaN."""
    i = int(aqi_category_index(aqi))
    return AQI_CATEGORIES[i] if i >= 0 else ""


def category_names(aqi: np.ndarray) -> np.ndarray:
    """Category names (object array; "" for NaN) of AQI values."""
    names = np.array(AQI_CATEGORIES + ("",), dtype=object)
    return np.asarray(names[aqi_category_index(aqi)])
