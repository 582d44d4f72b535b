"""Moved to ``aqimodels.process.health``: this path stays only until the branches written against it are merged."""

from aqimodels.process.health import HealthServicer

__all__ = ["HealthServicer"]
