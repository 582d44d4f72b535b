"""Moved to ``aqimodels.process.deadlines``: this path stays only until the branches written against it are merged."""

from aqimodels.process.deadlines import NO_DEADLINE, Deadline, bound, current, set_current, wait_bound, within

__all__ = ["NO_DEADLINE", "Deadline", "bound", "current", "set_current", "wait_bound", "within"]
