"""Monitoring and automation settings: parsed from the environment, a bad value names its variable."""

from __future__ import annotations

import math

import pytest

from aqimodels.client.errors import InvalidArgumentError
from aqimodels.server.config import ConfigError, ServerConfig, parse_retention
from aqimodels.server.monitoring import aggregate


def test_defaults_and_values() -> None:
    default = ServerConfig.from_env({})
    assert (default.degradation_ratio, default.degradation_min_samples, default.retrain_on_degradation) == (1.5, 100,
                                                                                                           False)
    assert default.retrain_schedule == "" and default.retention_keep_last == 0
    cfg = ServerConfig.from_env({"AQIMODELS_DEGRADATION_RATIO": "2", "AQIMODELS_DEGRADATION_MIN_SAMPLES": "50",
                                 "AQIMODELS_RETRAIN_ON_DEGRADATION": "true", "AQIMODELS_RETRAIN_SCHEDULE": "0  3 * * *",
                                 "AQIMODELS_RETRAIN_MODELS": "xgboost, LSTM", "AQIMODELS_RETENTION": "keep_last=5"})
    assert (cfg.degradation_ratio, cfg.degradation_min_samples, cfg.retrain_on_degradation) == (2.0, 50, True)
    assert cfg.retrain_schedule == "0 3 * * *" and cfg.retrain_models == ("xgboost", "lstm")
    assert parse_retention("keep_last=5,older_than_days=30") == (5, 30.0)
    assert parse_retention("older_than_days=7.5") == (0, 7.5)


@pytest.mark.parametrize(("name", "value"), [
    ("AQIMODELS_DEGRADATION_RATIO", "x"), ("AQIMODELS_DEGRADATION_RATIO", "0.9"),
    ("AQIMODELS_DEGRADATION_MIN_SAMPLES", "0"), ("AQIMODELS_DEGRADATION_WINDOW_HOURS", "0"),
    ("AQIMODELS_RETRAIN_ON_DEGRADATION", "maybe"), ("AQIMODELS_RETRAIN_SCHEDULE", "61 * * * *"),
    ("AQIMODELS_RETRAIN_SCHEDULE", "every day"), ("AQIMODELS_RETRAIN_MODELS", "xgboost,transformer"),
    ("AQIMODELS_RETENTION", "keep_last=0"), ("AQIMODELS_RETENTION", "keep=5"), ("AQIMODELS_RETENTION", "5"),
    ("AQIMODELS_RETENTION", "older_than_days=-1"),
])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_env({name: value})
    assert name in str(info.value)


def test_aggregate_pairs_and_windows() -> None:
    assert aggregate(0, 0, 0, [(3.0, 0.0), (-4.0, 0.0)]) == (pytest.approx(math.sqrt(12.5)), 3.5, 2)
    assert aggregate(2.0, 1.5, 10, []) == (2.0, 1.5, 10)
    assert aggregate(0.0, 0.0, 10, []) == (0.0, 0.0, 10)  # a perfect window is a valid report
    for args, field in (((math.nan, 0, 1, []), "rmse"), ((1, -1, 1, []), "mae"), ((1, 1, 0, []), "sample_count"),
                        ((0, 0, 0, [(math.nan, 1.0)]), "pairs[0].predicted")):
        with pytest.raises(InvalidArgumentError) as info:
            aggregate(*args)  # type: ignore[arg-type]
        assert info.value.field == field
