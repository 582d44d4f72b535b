"""Configuration of bounded waits, the health probe and the change reconciler (issue 11)."""

from __future__ import annotations

import pytest
from aqimodels.server.config import ConfigError, ServerConfig
from aqimodels.server.dbtimeouts import DbTimeouts


def test_defaults_bound_every_wait() -> None:
    config = ServerConfig.from_env({})
    assert config.db_timeouts == DbTimeouts(connect=5.0, statement=30.0, lock=10.0)
    assert config.health_interval_seconds == 2.0 and config.health_timeout == 1.0
    assert config.reconcile_after_seconds == 30.0 and config.fault_point == ""
    assert (config.mlflow_http_timeout_seconds, config.mlflow_http_max_retries) == (10.0, 2)
    assert (config.db_pool_size, config.db_start_timeout_seconds) == (10, 30.0)


def test_the_pool_size_and_the_start_bound_are_read() -> None:
    config = ServerConfig.from_env({"AQIMODELS_DB_POOL_SIZE": "3", "AQIMODELS_DB_START_TIMEOUT_SECONDS": "7.5"})
    assert (config.db_pool_size, config.db_start_timeout_seconds) == (3, 7.5)


def test_values_are_read_and_the_health_timeout_follows_the_interval() -> None:
    config = ServerConfig.from_env({"AQIMODELS_DB_STATEMENT_TIMEOUT_SECONDS": "4.5", "AQIMODELS_HEALTH_INTERVAL_SECONDS": "0.5",
                                    "AQIMODELS_RECONCILE_AFTER_SECONDS": "3", "AQIMODELS_FAULT_POINT": "RollbackModel:2"})
    assert config.db_timeouts.statement == 4.5 and config.health_timeout == 0.25
    assert config.reconcile_after_seconds == 3.0 and config.fault_point == "RollbackModel:2"


@pytest.mark.parametrize("name, value", [
    ("AQIMODELS_DB_CONNECT_TIMEOUT_SECONDS", "0"), ("AQIMODELS_DB_LOCK_TIMEOUT_SECONDS", "soon"),
    ("AQIMODELS_HEALTH_INTERVAL_SECONDS", "-1"), ("AQIMODELS_MLFLOW_HTTP_MAX_RETRIES", "99"),
    ("AQIMODELS_RECONCILE_AFTER_SECONDS", "0"), ("AQIMODELS_FAULT_POINT", "PromoteModelVersion"),
    ("AQIMODELS_DB_POOL_SIZE", "0"), ("AQIMODELS_DB_START_TIMEOUT_SECONDS", "-3")])
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        ServerConfig.from_env({name: value})
