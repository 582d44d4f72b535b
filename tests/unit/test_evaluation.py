"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from aqimodels.training.evaluation import aqi_category, evaluate, forecast_metrics, persistence, pm25_to_aqi


def test_aqi_breakpoints() -> None:
    assert pm25_to_aqi(0.0) == 0
    assert pm25_to_aqi(9.0) == 50
    assert pm25_to_aqi(9.1) == 51
    assert pm25_to_aqi(35.4) == 100
    assert pm25_to_aqi(35.5) == 101
    assert pm25_to_aqi(55.5) == 151
    assert pm25_to_aqi(125.4) == 200
    assert pm25_to_aqi(225.5) == 301
    assert pm25_to_aqi(325.4) == 500
    assert pm25_to_aqi(12.0) == round(51 + 49 / 26.3 * 2.9)
    assert np.isnan(pm25_to_aqi(np.array([np.nan]))[0])
    assert aqi_category(50) == "Good" and aqi_category(51) == "Moderate"
    assert aqi_category(150) == "Unhealthy for Sensitive Groups" and aqi_category(151) == "Unhealthy"
    assert aqi_category(300) == "Very Unhealthy" and aqi_category(301) == "Hazardous"
    assert aqi_category(pm25_to_aqi(999.0)) == "Hazardous"


def test_metrics_hand_computed_with_mask() -> None:
    # N=1, S=2, H=24; only horizons 1 and 6 observed at station 0, horizon 1 at station 1
    y = np.full((1, 2, 24), np.nan)
    p = np.full((1, 2, 24), 50.0)
    y[0, 0, 0], p[0, 0, 0] = 10.0, 14.0  # err 4: within 10 -> accurate; AQI cat Moderate vs Moderate
    y[0, 0, 5], p[0, 0, 5] = 100.0, 120.0  # err 20 > max(10, 15) -> not accurate; both Unhealthy
    y[0, 1, 0], p[0, 1, 0] = 40.0, 30.0  # err -10 -> accurate (<=10); USG vs Moderate
    m = forecast_metrics(p, y)
    assert m["rmse"] == pytest.approx(np.sqrt((16 + 400 + 100) / 3))
    assert m["mae"] == pytest.approx((4 + 20 + 10) / 3)
    t = np.array([10.0, 100.0, 40.0])
    assert m["r2"] == pytest.approx(1 - 516 / np.sum((t - t.mean()) ** 2))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["aqi_accuracy"] == pytest.approx(2 / 3)
    assert m["rmse_h1"] == pytest.approx(np.sqrt((16 + 100) / 2))
    assert m["rmse_h6"] == pytest.approx(20.0)
    assert np.isnan(m["rmse_h24"])  # nothing observed: NaN, not 0


def test_persistence_baseline_and_skill() -> None:
    rng = np.random.default_rng(0)
    y = rng.uniform(10, 80, (5, 3, 24))
    last = rng.uniform(10, 80, (5, 3))
    base = persistence(last, 24)
    assert base.shape == (5, 3, 24) and np.all(base[..., 7] == last)
    m = evaluate(base, y, last)
    assert m["rmse"] == pytest.approx(m["baseline_rmse"])
    assert m["skill_h6"] == pytest.approx(0.0)
    perfect = evaluate(y, y, last)
    assert perfect["rmse"] == 0 and perfect["skill"] == 1.0 and perfect["r2"] == 1.0
    assert perfect["baseline_rmse_h6"] == pytest.approx(np.sqrt(np.mean((y[..., 5] - last) ** 2)))
