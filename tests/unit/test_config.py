"""Configuration is read once from the environment; a bad value names the variable."""

from __future__ import annotations

import pytest

from aqimodels.server.config import ConfigError, ServerConfig


def test_defaults() -> None:
    config = ServerConfig.from_env({})
    assert config.host == "127.0.0.1" and config.port == 50051
    assert config.tracking_uri.startswith("sqlite:////") and config.tracking_uri.endswith("mlruns/mlflow.db")
    assert config.experiment_name == "aqi-predictor"
    assert config.auto_promotion is False
    assert config.workers == ("local",)
    assert config.own_database_url == config.tracking_uri


def test_values_are_read() -> None:
    config = ServerConfig.from_env({
        "AQIMODELS_HOST": "127.0.0.2", "AQIMODELS_PORT": "6000", "MLFLOW_AUTO_PROMOTION": "true",
        "AQIMODELS_WORKERS": "a:1, b:2", "MLFLOW_TRACKING_URI": "postgresql+psycopg://u@h/db",
        "MLFLOW_EXPERIMENT_NAME": "exp"})
    assert (config.host, config.port, config.auto_promotion) == ("127.0.0.2", 6000, True)
    assert config.workers == ("a:1", "b:2")
    assert config.own_database_url == "postgresql+psycopg://u@h/db"
    assert ServerConfig.from_env({"AQIMODELS_WORKERS": "none"}).workers == ()
    assert ServerConfig.from_env({}).job_lease_seconds == 15.0
    assert ServerConfig.from_env({"AQIMODELS_JOB_LEASE_SECONDS": "2.5"}).job_lease_seconds == 2.5
    http = ServerConfig.from_env({"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert http.own_database_url.startswith("sqlite:////")


@pytest.mark.parametrize(("name", "value"), [
    ("AQIMODELS_PORT", "http"), ("AQIMODELS_PORT", "70000"), ("MLFLOW_AUTO_PROMOTION", "maybe"),
    ("AQIMODELS_CACHE_TTL_SECONDS", "-1"), ("AQIMODELS_LOG_LEVEL", "loud"), ("AQIMODELS_PROMOTION_MARGIN", "x"),
    ("AQIMODELS_JOB_LEASE_SECONDS", "0.5"), ("AQIMODELS_JOB_LEASE_SECONDS", "301"),
    ("AQIMODELS_JOB_LEASE_SECONDS", "soon"),
])
def test_a_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_env({name: value})
    assert name in str(info.value)


def test_client_exports_are_sorted_and_importable() -> None:
    import aqimodels.client as client

    assert client.__all__ == sorted(client.__all__)
    for name in client.__all__:
        assert hasattr(client, name)
