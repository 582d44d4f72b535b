"""Moved to ``aqimodels.process.metrics``: this path stays only until the branches written against it are merged."""

from aqimodels.process.metrics import (
    REGISTRY_METRICS_PORT,
    WORKER_METRICS_PORT,
    Metrics,
    endpoint_host,
    state_name,
)

__all__ = ["REGISTRY_METRICS_PORT", "WORKER_METRICS_PORT", "Metrics", "endpoint_host", "state_name"]
